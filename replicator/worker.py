"""A small pool of dedicated threads for a store's blocking system calls.

``trio.to_thread.run_sync`` is general (thread cache, limiter, cancellation
machinery) and costs about 160-190 µs per call on this project's 2-core test
machine; a thread already waiting on a queue costs about 90 µs, most of it the
two cross-thread wake-ups. The store makes one such call per write, so the
difference is directly visible in write latency.

Guarantees: the event-loop thread never runs the function; calls are not
cancellable once submitted (like ``to_thread.run_sync`` by default), so a
started write always finishes and its outcome is delivered; at most
``threads`` calls run at once and at most ``max_queued`` wait (the caller then
waits for a free slot: nothing grows without bound).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_STOP = object()


class BlockingWorkers:
    """``threads`` daemon threads serving one trio run. Create inside ``trio.run``."""

    def __init__(self, threads: int = 4, max_queued: int = 1024, name: str = "store") -> None:
        if threads <= 0 or max_queued <= 0:
            raise ValueError("threads and max_queued must be positive")
        self._token = trio.lowlevel.current_trio_token()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._slots = trio.Semaphore(max_queued)
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-io-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()
        self._closed = False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, args, task = item
            result = outcome.capture(fn, *args)
            try:
                self._token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:
                return

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker thread and return (or raise) its result."""
        if self._closed:
            raise RuntimeError("workers are closed")
        async with self._slots:
            await trio.lowlevel.checkpoint_if_cancelled()
            task = trio.lowlevel.current_task()
            self._queue.put((fn, args, task))

            def abort(_: Any) -> trio.lowlevel.Abort:
                # The call is already queued or running: it must finish and its
                # outcome must reach us, so cancellation waits for it.
                return trio.lowlevel.Abort.FAILED

            result: T = await trio.lowlevel.wait_task_rescheduled(abort)
            return result

    def close(self) -> None:
        """Stop the threads once they finish what is queued (idempotent)."""
        if not self._closed:
            self._closed = True
            for _ in self._threads:
                self._queue.put(_STOP)
