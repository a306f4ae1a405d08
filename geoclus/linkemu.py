"""Link emulator: a TCP proxy that makes loopback look like a link between two sites.

This machine's kernel has no netem, so tests, the demo and the benchmarks put this
proxy between two endpoints to give them a one-way delay, jitter and a bandwidth
limit, and to cut, restore or reset the link on demand.

Two layers:

* :class:`LinkDirection` and :class:`PipeSchedule` are the sans-I/O core: given
  the time a chunk arrives at the emulator (an argument, never read from a clock)
  they compute when it is delivered at the far end.
* :class:`LinkEmulator` is the trio shell: it accepts TCP connections, opens one
  to the target for each, and forwards both directions through the schedule with
  a bounded buffer per direction. It can be controlled from Python
  (:meth:`LinkEmulator.cut`, ...) and, optionally, from other processes over a
  Unix socket speaking one JSON object per line (see :meth:`LinkEmulator.handle_control`
  and :func:`control_request`).

Model (what one chunk of bytes experiences)::

    start     = max(now, time the link direction becomes idle)   # FIFO on the wire
    tx_end    = start + len * 8 / rate_bps                       # serialization
    delivery  = tx_end + delay_s + uniform(0, jitter_s)
    delivery  = max(delivery, previous delivery on this connection direction)

The serializer is shared by every connection in one direction (the rate is the
link's, not each connection's); ordering is per connection direction, exactly
like TCP: bytes within one connection are never reordered. Connection set-up is
not delayed (the TCP handshake to the target does not pay the emulated RTT).

trio's own timers are ~1 ms coarse (its I/O wait has millisecond resolution), so
under the real clock a helper thread wakes the event loop just before each
delivery time and the writer yields until the exact time; see
:class:`LinkEmulatorConfig` ``precise_timers`` / ``timer_spin_s``.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import json
import math
import os
import random
import socket as stdlib_socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import trio
import trio.testing
from trio.lowlevel import ParkingLot

from geoclus.errors import GeoclusError

__all__ = [
    "DEFAULT_MAX_BUFFER_BYTES",
    "MAX_DELAY_S",
    "LinkDirection",
    "LinkEmuError",
    "LinkEmulator",
    "LinkEmulatorConfig",
    "LinkSettings",
    "LinkStatistics",
    "PipeSchedule",
    "control_request",
    "format_hostport",
    "parse_hostport",
]

MIB = 1024 * 1024
DEFAULT_MAX_BUFFER_BYTES = 64 * MIB
#: Upper bound on ``delay_s`` and ``jitter_s`` (one hour); larger values are rejected.
MAX_DELAY_S = 3600.0

_NEG_INF = float("-inf")
# accept() failures that mean "out of resources right now": wait and retry.
_ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_DELAY_S = 0.1
_CONNECTION_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class LinkEmuError(GeoclusError):
    """A link-emulator setting, address or control request is invalid, or the
    emulator cannot bind / reach its control socket. The message says which."""


# --------------------------------------------------------------------------- core


def _as_float(name: str, value: object) -> float:
    """``value`` as a float; :class:`LinkEmuError` unless it is a real number (not bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LinkEmuError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise LinkEmuError(f"{name} is out of range") from None


def _check_seconds(name: str, value: object) -> float:
    v = _as_float(name, value)
    if not math.isfinite(v) or v < 0 or v > MAX_DELAY_S:
        raise LinkEmuError(f"{name} must be between 0 and {MAX_DELAY_S:g} s, got {value!r}")
    return v


@dataclass(frozen=True)
class LinkSettings:
    """The emulated link's properties, the same in both directions.

    ``delay_s`` is the fixed one-way delay, ``jitter_s`` the upper bound of an
    extra uniform random delay per chunk, ``rate_bps`` the bandwidth in bits per
    second (``None`` = unlimited). Construction raises :class:`LinkEmuError` if a
    delay is negative, not finite or above :data:`MAX_DELAY_S`, or if the rate is
    not a finite positive number.
    """

    delay_s: float = 0.0
    jitter_s: float = 0.0
    rate_bps: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "delay_s", _check_seconds("delay_s", self.delay_s))
        object.__setattr__(self, "jitter_s", _check_seconds("jitter_s", self.jitter_s))
        if self.rate_bps is not None:
            rate = _as_float("rate_bps", self.rate_bps)
            if not math.isfinite(rate) or rate <= 0:
                raise LinkEmuError(f"rate_bps must be positive and finite, got {self.rate_bps!r}")
            object.__setattr__(self, "rate_bps", rate)


class LinkDirection:
    """Sans-I/O serializer for one direction of the link, shared by all its connections.

    Guarantees: chunks are put on the wire in the order :meth:`transmit` is called;
    the wire is busy ``nbytes * 8 / rate_bps`` seconds per chunk (no time when the
    rate is unlimited); the random jitter comes only from the ``rng`` passed in and
    is drawn only when ``jitter_s > 0`` (one ``rng.uniform(0, jitter_s)`` call per
    chunk), so a seeded ``random.Random`` makes the schedule reproducible.
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.busy_until_s: float = _NEG_INF

    def transmit(self, now_s: float, nbytes: int, settings: LinkSettings) -> float:
        """Put ``nbytes`` on the wire at ``now_s``; return when they reach the far end.

        Not yet ordered against earlier chunks of the same connection (see
        :class:`PipeSchedule`). Raises :class:`LinkEmuError` if ``now_s`` is not
        finite or ``nbytes`` is negative.
        """
        if not math.isfinite(now_s):
            raise LinkEmuError(f"now_s must be finite, got {now_s!r}")
        if nbytes < 0:
            raise LinkEmuError(f"nbytes must be >= 0, got {nbytes!r}")
        start_s = max(now_s, self.busy_until_s)
        tx_s = nbytes * 8 / settings.rate_bps if settings.rate_bps is not None else 0.0
        self.busy_until_s = start_s + tx_s
        jitter_s = self._rng.uniform(0.0, settings.jitter_s) if settings.jitter_s > 0 else 0.0
        return self.busy_until_s + settings.delay_s + jitter_s


class PipeSchedule:
    """Sans-I/O delivery schedule for one direction of one connection.

    Guarantees: the delivery times it returns never decrease (bytes of one
    connection are never reordered, whatever the jitter or a setting change),
    and a chunk is never delivered before ``now_s + delay_s``.
    """

    def __init__(self, link: LinkDirection) -> None:
        self._link = link
        self.last_delivery_s: float = _NEG_INF

    def schedule(self, now_s: float, nbytes: int, settings: LinkSettings) -> float:
        """Return the delivery time of ``nbytes`` arriving at ``now_s`` (0 bytes = EOF).

        Raises :class:`LinkEmuError` like :meth:`LinkDirection.transmit`.
        """
        at_s = max(self._link.transmit(now_s, nbytes, settings), self.last_delivery_s)
        self.last_delivery_s = at_s
        return at_s


# -------------------------------------------------------------------------- shell


@dataclass(frozen=True)
class LinkEmulatorConfig:
    """Where the emulator listens and forwards to, its initial link and its bounds.

    ``listen_port`` 0 picks a free port (reported by :meth:`LinkEmulator.serve`).
    Memory per proxied connection is bounded by ``2 * max_buffer_bytes`` (one
    buffer per direction) plus one chunk of ``max_chunk_bytes`` per direction;
    ``max_buffer_chunks`` bounds the number of queued chunks per direction.
    ``control_path`` (optional) is a Unix socket for :func:`control_request`.
    ``seed`` seeds the jitter (``None`` = from the OS).

    Timer precision: the event loop alone oversleeps by up to ~1 ms (its I/O wait
    has millisecond resolution), far too coarse for a 0.25 ms delay. With
    ``precise_timers`` (used only under trio's real clock, never a mock clock) a
    helper thread wakes the loop ``timer_spin_s`` before each delivery time and
    the writer then yields in a loop (``trio.sleep(0)``) until the exact time:
    deliveries are then typically within tens of microseconds, at the cost of
    up to ``timer_spin_s`` of CPU per chunk. ``timer_spin_s=0`` keeps the helper
    thread but never spins (~0.1-0.3 ms late on a VM). At most
    ``max_timer_entries`` wake-ups are pending; more fall back to ms precision.

    Construction raises
    :class:`LinkEmuError` on a non-positive bound or a port out of range.
    """

    target_host: str
    target_port: int
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    settings: LinkSettings = LinkSettings()
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES
    max_buffer_chunks: int = 65536
    max_chunk_bytes: int = 65536
    max_connections: int = 1024
    connect_timeout_s: float = 10.0
    listen_backlog: int = 128
    control_path: str | None = None
    max_control_line_bytes: int = 4096
    max_control_clients: int = 16
    control_idle_timeout_s: float = 60.0
    seed: int | None = None
    precise_timers: bool = True
    timer_spin_s: float = 0.0005
    max_timer_entries: int = 65536

    def __post_init__(self) -> None:
        for name in ("target_port", "listen_port"):
            port = getattr(self, name)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise LinkEmuError(f"{name} must be 0..65535, got {port!r}")
        if self.target_port == 0:
            raise LinkEmuError("target_port must not be 0")
        for name in (
            "max_buffer_bytes",
            "max_buffer_chunks",
            "max_chunk_bytes",
            "max_connections",
            "listen_backlog",
            "max_control_line_bytes",
            "max_control_clients",
            "max_timer_entries",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise LinkEmuError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.timer_spin_s, int | float) and 0 <= self.timer_spin_s <= 0.01):
            raise LinkEmuError(f"timer_spin_s must be 0..0.01 s, got {self.timer_spin_s!r}")
        for name in ("connect_timeout_s", "control_idle_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise LinkEmuError(f"{name} must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True)
class LinkStatistics:
    """A snapshot of the emulator.

    ``connections_open`` counts connections being proxied or set up now,
    ``connections_total`` every connection proxied (target reached) so far.
    ``bytes_to_target``/``bytes_to_client`` count bytes delivered (written to the
    far end); ``bytes_held`` is what is read but not yet delivered, over all
    connections and both directions. ``connections_refused`` counts connections
    accepted and closed at once (link cut, ``max_connections`` reached, or the
    target unreachable).
    """

    connections_open: int
    connections_total: int
    connections_refused: int
    bytes_to_target: int
    bytes_to_client: int
    bytes_held: int
    cut: bool
    delay_s: float
    jitter_s: float
    rate_bps: float | None


class _Pipe:
    """One direction of one proxied connection: its schedule and bounded buffer."""

    __slots__ = ("buffered_bytes", "chunks", "data_ready", "schedule", "space_ready")

    def __init__(self, schedule: PipeSchedule) -> None:
        self.schedule = schedule
        self.chunks: deque[tuple[float, bytes | bytearray]] = deque()  # b"" = EOF
        self.buffered_bytes = 0
        self.data_ready = ParkingLot()
        self.space_ready = ParkingLot()


class _Conn:
    """One proxied connection: the cancel scope that aborts it and its two pipes."""

    __slots__ = ("aborted", "clean", "scope", "to_client", "to_target")

    def __init__(self, to_target: _Pipe, to_client: _Pipe) -> None:
        self.scope = trio.CancelScope()
        self.to_target = to_target
        self.to_client = to_client
        self.aborted = False
        self.clean = False

    def abort(self) -> None:
        self.aborted = True
        self.scope.cancel()


async def _abort_stream(stream: trio.abc.AsyncResource) -> None:
    """Close ``stream`` at once; a TCP socket is reset (RST) rather than shut down."""
    sock = getattr(stream, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(
                stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
    await trio.aclose_forcefully(stream)


class _PreciseWaker:
    """Wakes the trio event loop at registered deadlines with sub-millisecond precision.

    trio waits for I/O with ``epoll``, whose timeout Python rounds *up* to whole
    milliseconds, so ``trio.sleep(0.00025)`` lasts about a millisecond. This
    helper thread sleeps (microsecond resolution) until the earliest registered
    deadline and then pokes the loop (``TrioToken.run_sync_soon``), which wakes
    every task whose deadline has passed. It only makes the loop wake earlier;
    the sleeping tasks still use ordinary trio deadlines. Requires trio's default
    clock (``current_time() == perf_counter() + offset``). At most ``max_entries``
    deadlines are pending; beyond that, :meth:`register` ignores them.
    """

    _COALESCE_S = 20e-6  # deadlines this close together share one wake-up

    def __init__(self, max_entries: int) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._offset_s = trio.current_time() - time.perf_counter()
        self._max_entries = max_entries
        self._heap: list[float] = []  # perf_counter times
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="linkemu-timer", daemon=True)
        self._thread.start()

    @staticmethod
    def usable() -> bool:
        """Whether the running trio loop uses a real clock this waker can follow."""
        return not isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)

    def register(self, deadline_s: float) -> None:
        """Make sure the loop wakes up at trio time ``deadline_s`` (best effort)."""
        at = deadline_s - self._offset_s
        with self._cond:
            if self._stopped or len(self._heap) >= self._max_entries:
                return
            heapq.heappush(self._heap, at)
            if self._heap[0] == at:
                self._cond.notify()

    def stop(self) -> None:
        """Stop the thread (idempotent); waits for it briefly."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._heap:
                    self._cond.wait()
                    continue
                wait_s = self._heap[0] - time.perf_counter()
                if wait_s > 0:
                    self._cond.wait(timeout=wait_s)
                    continue
                limit = time.perf_counter() + self._COALESCE_S
                while self._heap and self._heap[0] <= limit:
                    heapq.heappop(self._heap)
                try:
                    self._token.run_sync_soon(_noop)
                except trio.RunFinishedError:
                    return


def _noop() -> None:
    pass


class LinkEmulator:
    """A TCP proxy forwarding every connection through an emulated link.

    Guarantees:

    * bytes of one connection are delivered in order, each chunk at the time the
      :class:`PipeSchedule` computed when it was read (settings changed later
      apply to chunks read later): exactly under a mock clock, typically within
      tens of microseconds under the real clock (see ``precise_timers`` in
      :class:`LinkEmulatorConfig`), never early;
    * per direction at most ``max_buffer_bytes`` are held; at the bound the
      emulator stops reading from the source (TCP backpressure);
    * while cut, nothing is delivered in either direction (a write already in
      progress, at most one chunk of ``max_chunk_bytes``, completes), bytes
      already read stay held, and new connections are accepted and reset at once;
      after :meth:`restore` held bytes flow again in order, chunks whose time
      passed during the cut at once, and chunks read during the cut are
      scheduled from the moment of the restore;
    * a source's EOF is forwarded (half-close) after its last byte, with the same
      delay; a connection error on either side resets both ends.

    The control methods are synchronous and may be called from any trio task of
    the thread running :meth:`serve` (or before it starts).
    """

    def __init__(self, config: LinkEmulatorConfig) -> None:
        self._config = config
        self._settings = config.settings
        rng = random.Random(config.seed)
        self._link_to_target = LinkDirection(rng)
        self._link_to_client = LinkDirection(rng)
        self._cut = False
        self._link_up = ParkingLot()
        self._conns: set[_Conn] = set()
        self._connections_total = 0
        self._connections_refused = 0
        self._bytes_to_target = 0
        self._bytes_to_client = 0
        self._control_clients = 0
        self._bound: tuple[str, int] | None = None
        self._serving = False
        self._waker: _PreciseWaker | None = None

    # ------------------------------------------------------------ control API

    @property
    def config(self) -> LinkEmulatorConfig:
        """The configuration this emulator was built with."""
        return self._config

    @property
    def settings(self) -> LinkSettings:
        """The current link settings."""
        return self._settings

    @property
    def bound_address(self) -> tuple[str, int]:
        """``(host, port)`` the emulator listens on; raises :class:`LinkEmuError`
        before :meth:`serve` has started."""
        if self._bound is None:
            raise LinkEmuError("the link emulator is not listening yet")
        return self._bound

    def set_settings(self, settings: LinkSettings) -> None:
        """Replace the link settings; applies to every chunk read from now on."""
        if not isinstance(settings, LinkSettings):
            raise LinkEmuError(f"expected LinkSettings, got {type(settings).__name__}")
        self._settings = settings

    def set_delay(self, delay_s: float, jitter_s: float = 0.0) -> None:
        """Set the one-way delay and jitter (both replaced; the rate is kept).

        Raises :class:`LinkEmuError` on an invalid value, changing nothing.
        """
        self._settings = replace(self._settings, delay_s=delay_s, jitter_s=jitter_s)

    def set_rate(self, rate_bps: float | None) -> None:
        """Set the bandwidth in bits/s (``None`` = unlimited); delays are kept.

        Raises :class:`LinkEmuError` on an invalid value, changing nothing.
        """
        self._settings = replace(self._settings, rate_bps=rate_bps)

    @property
    def is_cut(self) -> bool:
        """Whether the link is currently cut."""
        return self._cut

    def cut(self) -> None:
        """Take the link down (idempotent): nothing is delivered until :meth:`restore`."""
        self._cut = True

    def restore(self) -> None:
        """Bring the link back up (idempotent); held bytes flow again in order."""
        self._cut = False
        self._link_up.unpark_all()

    def reset(self) -> int:
        """Abort every current proxied connection at both ends; return how many.

        The link stays up (or cut) as it was; new connections are served as usual.
        """
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        return len(conns)

    def statistics(self) -> LinkStatistics:
        """A consistent snapshot of connections, byte counters, cut state and settings."""
        held = sum(c.to_target.buffered_bytes + c.to_client.buffered_bytes for c in self._conns)
        s = self._settings
        return LinkStatistics(
            connections_open=len(self._conns),
            connections_total=self._connections_total,
            connections_refused=self._connections_refused,
            bytes_to_target=self._bytes_to_target,
            bytes_to_client=self._bytes_to_client,
            bytes_held=held,
            cut=self._cut,
            delay_s=s.delay_s,
            jitter_s=s.jitter_s,
            rate_bps=s.rate_bps,
        )

    # --------------------------------------------------------- control protocol

    def handle_control(self, request: object) -> dict[str, Any]:
        """Apply one decoded control request and return the reply object.

        Requests: ``{"cmd": "cut"}``, ``{"cmd": "restore"}``, ``{"cmd": "reset"}``,
        ``{"cmd": "stats"}`` and ``{"cmd": "set", "delay_ms": .., "jitter_ms": ..,
        "rate_mbit": ..}`` (each key optional but at least one; ``rate_mbit`` 0 or
        null = unlimited; keys left out keep their value). Replies are
        ``{"ok": true, "stats": {...}}`` (plus ``"aborted": n`` for ``reset``) or
        ``{"ok": false, "error": "..."}``; an invalid request changes nothing.
        Never raises for a bad request.
        """
        try:
            extra = self._apply_control(request)
        except LinkEmuError as err:
            return {"ok": False, "error": str(err)}
        return {"ok": True, **extra, "stats": asdict(self.statistics())}

    def handle_control_line(self, line: bytes) -> bytes:
        """Decode one JSON request line, apply it, return the encoded reply line."""
        line = line.rstrip(b"\r")
        try:
            request = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            reply: dict[str, Any] = {"ok": False, "error": "request is not valid UTF-8"}
        except ValueError as err:
            reply = {"ok": False, "error": f"request is not valid JSON: {err}"}
        except RecursionError:
            reply = {"ok": False, "error": "request is nested too deeply"}
        else:
            reply = self.handle_control(request)
        return json.dumps(reply, separators=(",", ":")).encode() + b"\n"

    def _apply_control(self, request: object) -> dict[str, Any]:
        if not isinstance(request, dict):
            raise LinkEmuError('request must be a JSON object like {"cmd": "stats"}')
        cmd = request.get("cmd")
        if not isinstance(cmd, str):
            raise LinkEmuError(f'"cmd" must be a string, got {cmd!r}')
        if cmd in {"cut", "restore", "reset", "stats"}:
            if set(request) != {"cmd"}:
                extra = sorted(set(request) - {"cmd"})
                raise LinkEmuError(f"{cmd!r} takes no arguments, got {extra}")
            if cmd == "cut":
                self.cut()
            elif cmd == "restore":
                self.restore()
            elif cmd == "reset":
                return {"aborted": self.reset()}
            return {}
        if cmd == "set":
            self.set_settings(_settings_from_request(request, self._settings))
            return {}
        raise LinkEmuError(f"unknown cmd {cmd!r}; expected one of cut, restore, reset, set, stats")

    # ---------------------------------------------------------------- serving

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, then proxy connections until cancelled; report the bound port.

        Raises :class:`LinkEmuError` (before ``task_status.started``) if the listen
        address or the control socket cannot be bound, or if already serving. On
        cancellation every proxied connection is reset and the control socket
        file removed.
        """
        if self._serving:
            raise LinkEmuError("this link emulator is already serving")
        self._serving = True
        if self._config.precise_timers and _PreciseWaker.usable():
            self._waker = _PreciseWaker(self._config.max_timer_entries)
        try:
            listener = await self._open_listener()
            control: trio.SocketListener | None = None
            control_inode = 0
            try:
                if self._config.control_path is not None:
                    control, control_inode = await _bind_control_socket(self._config.control_path)
                try:
                    async with trio.open_nursery() as nursery:
                        if control is not None:
                            nursery.start_soon(self._control_accept_loop, control, nursery)
                        nursery.start_soon(self._accept_loop, listener, nursery)
                        task_status.started(self.bound_address[1])
                finally:
                    if control is not None and self._config.control_path is not None:
                        _unlink_control_socket(self._config.control_path, control_inode)
                        with trio.CancelScope(shield=True):
                            await trio.aclose_forcefully(control)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(listener)
        finally:
            self._serving = False
            if self._waker is not None:
                self._waker.stop()
                self._waker = None

    async def forward(self, client: trio.abc.Stream, target: trio.abc.Stream) -> None:
        """Proxy an already-connected pair of streams through the link until both
        directions have ended; the streams are closed on return (reset on error).

        Counts as a proxied connection (statistics, :meth:`reset`). Never raises
        for connection errors; they end the connection. Delivery times have
        sub-millisecond precision only while :meth:`serve` runs (it owns the
        timer helper); otherwise trio's ~1 ms timer granularity applies.
        """
        await self._run_conn(self._new_conn(), client, target)

    async def _open_listener(self) -> trio.SocketListener:
        cfg = self._config
        try:
            infos = await trio.socket.getaddrinfo(
                cfg.listen_host,
                cfg.listen_port,
                type=stdlib_socket.SOCK_STREAM,
                flags=stdlib_socket.AI_PASSIVE,
            )
        except OSError as err:
            raise LinkEmuError(f"cannot resolve listen host {cfg.listen_host!r}: {err}") from err
        family, type_, proto, _, sockaddr = infos[0]
        sock = trio.socket.socket(family, type_, proto)
        try:
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
            await sock.bind(sockaddr)
            sock.listen(cfg.listen_backlog)
        except OSError as err:
            sock.close()
            where = format_hostport(cfg.listen_host, cfg.listen_port)
            raise LinkEmuError(f"cannot listen on {where}: {err.strerror or err}") from err
        host, port = sock.getsockname()[:2]
        self._bound = (host, port)
        return trio.SocketListener(sock)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as err:
                if err.errno in _ACCEPT_RETRY_ERRNOS:
                    await trio.sleep(_ACCEPT_RETRY_DELAY_S)
                    continue
                raise
            if self._cut or len(self._conns) >= self._config.max_connections:
                self._connections_refused += 1
                await _abort_stream(stream)
                continue
            # Registered before the target connect, so reset() and the
            # max_connections bound cover connections still being set up.
            nursery.start_soon(self._run_conn, self._new_conn(), stream, None)

    def _new_conn(self) -> _Conn:
        conn = _Conn(
            _Pipe(PipeSchedule(self._link_to_target)), _Pipe(PipeSchedule(self._link_to_client))
        )
        self._conns.add(conn)
        return conn

    async def _run_conn(
        self, conn: _Conn, client: trio.abc.Stream, target: trio.abc.Stream | None
    ) -> None:
        """Connect to the target if ``target`` is None, then proxy until both
        directions end; always closes both streams (reset unless it ended cleanly)."""
        cfg = self._config
        try:
            with conn.scope:
                if target is None:
                    try:
                        with trio.fail_after(cfg.connect_timeout_s):
                            target = await trio.open_tcp_stream(cfg.target_host, cfg.target_port)
                    except (OSError, trio.TooSlowError):
                        self._connections_refused += 1
                        return
                self._connections_total += 1
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_side, conn, client, conn.to_target)
                    nursery.start_soon(self._write_side, conn, target, conn.to_target, True)
                    nursery.start_soon(self._read_side, conn, target, conn.to_client)
                    nursery.start_soon(self._write_side, conn, client, conn.to_client, False)
                conn.clean = not conn.aborted
        finally:
            self._conns.discard(conn)
            if not conn.clean and target is None and conn.aborted:
                self._connections_refused += 1  # reset() while connecting to the target
            with trio.CancelScope(shield=True):
                for stream in (client, target):
                    if stream is None:
                        continue
                    if conn.clean:
                        with contextlib.suppress(*_CONNECTION_ERRORS):
                            await stream.aclose()
                    else:
                        await _abort_stream(stream)

    async def _sleep_until(self, at_s: float) -> None:
        """``trio.sleep_until`` with sub-millisecond precision under a real clock."""
        waker = self._waker
        if waker is None:
            await trio.sleep_until(at_s)
            return
        wake_s = at_s - self._config.timer_spin_s
        if wake_s > trio.current_time():
            waker.register(wake_s)
            await trio.sleep_until(wake_s)
        else:
            await trio.lowlevel.checkpoint()
        # Deliberate spin for the last timer_spin_s: yields to every other task.
        while trio.current_time() < at_s:
            await trio.lowlevel.checkpoint()

    async def _wait_link_up(self) -> None:
        while self._cut:
            await self._link_up.park()

    async def _read_side(self, conn: _Conn, src: trio.abc.ReceiveStream, pipe: _Pipe) -> None:
        cfg = self._config
        try:
            while True:
                while (
                    pipe.buffered_bytes >= cfg.max_buffer_bytes
                    or len(pipe.chunks) >= cfg.max_buffer_chunks
                ):
                    await pipe.space_ready.park()
                want = min(cfg.max_chunk_bytes, cfg.max_buffer_bytes - pipe.buffered_bytes)
                data = await src.receive_some(want)
                pipe.buffered_bytes += len(data)  # held from now on, within the bound
                await self._wait_link_up()
                at_s = pipe.schedule.schedule(trio.current_time(), len(data), self._settings)
                pipe.chunks.append((at_s, data))
                pipe.data_ready.unpark_all()
                if not data:
                    return
        except _CONNECTION_ERRORS:
            conn.abort()

    async def _write_side(
        self, conn: _Conn, dst: trio.abc.SendStream, pipe: _Pipe, to_target: bool
    ) -> None:
        try:
            while True:
                while not pipe.chunks:
                    await pipe.data_ready.park()
                at_s, data = pipe.chunks[0]
                await self._sleep_until(at_s)
                await self._wait_link_up()
                if not data:
                    pipe.chunks.popleft()
                    if isinstance(dst, trio.abc.HalfCloseableStream):
                        await dst.send_eof()
                    return
                await dst.send_all(data)
                pipe.chunks.popleft()
                pipe.buffered_bytes -= len(data)
                pipe.space_ready.unpark_all()
                if to_target:
                    self._bytes_to_target += len(data)
                else:
                    self._bytes_to_client += len(data)
        except _CONNECTION_ERRORS:
            conn.abort()

    # ------------------------------------------------------------ control socket

    async def _control_accept_loop(
        self, listener: trio.SocketListener, nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as err:
                if err.errno in _ACCEPT_RETRY_ERRNOS:
                    await trio.sleep(_ACCEPT_RETRY_DELAY_S)
                    continue
                raise
            nursery.start_soon(self._control_client, stream)

    async def _control_client(self, stream: trio.SocketStream) -> None:
        cfg = self._config
        if self._control_clients >= cfg.max_control_clients:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await stream.send_all(_error_line("too many control clients, try again later"))
            await trio.aclose_forcefully(stream)
            return
        self._control_clients += 1
        try:
            buf = bytearray()
            while True:
                data = None
                with trio.move_on_after(cfg.control_idle_timeout_s):
                    data = await stream.receive_some(cfg.max_control_line_bytes + 1)
                if not data:  # None: idle too long; b"": the client closed
                    return
                buf += data
                while (nl := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    if len(line) > cfg.max_control_line_bytes:
                        await stream.send_all(_line_too_long(cfg.max_control_line_bytes))
                        return
                    await stream.send_all(self.handle_control_line(line))
                if len(buf) > cfg.max_control_line_bytes:
                    await stream.send_all(_line_too_long(cfg.max_control_line_bytes))
                    return
        except _CONNECTION_ERRORS:
            pass
        finally:
            self._control_clients -= 1
            await trio.aclose_forcefully(stream)


def _error_line(message: str) -> bytes:
    return json.dumps({"ok": False, "error": message}).encode() + b"\n"


def _line_too_long(limit: int) -> bytes:
    return _error_line(f"request line longer than {limit} bytes; closing")


def _settings_from_request(request: Mapping[str, Any], current: LinkSettings) -> LinkSettings:
    allowed = {"cmd", "delay_ms", "jitter_ms", "rate_mbit"}
    unknown = sorted(set(request) - allowed)
    if unknown:
        raise LinkEmuError(
            f"unknown key(s) for 'set': {unknown}; allowed: delay_ms, jitter_ms, rate_mbit"
        )
    if len(request) == 1:
        raise LinkEmuError("'set' needs at least one of delay_ms, jitter_ms, rate_mbit")

    def number(key: str) -> float:
        value = _as_float(key, request[key])
        if not math.isfinite(value) or value < 0:
            raise LinkEmuError(f"{key} must be finite and >= 0, got {request[key]!r}")
        return value

    delay_s = number("delay_ms") / 1000 if "delay_ms" in request else current.delay_s
    jitter_s = number("jitter_ms") / 1000 if "jitter_ms" in request else current.jitter_s
    rate_bps = current.rate_bps
    if "rate_mbit" in request:
        rate_bps = None if request["rate_mbit"] is None else number("rate_mbit") * 1e6
        if rate_bps == 0:
            rate_bps = None
    return LinkSettings(delay_s=delay_s, jitter_s=jitter_s, rate_bps=rate_bps)


async def _bind_control_socket(path: str) -> tuple[trio.SocketListener, int]:
    """Bind a Unix stream socket at ``path`` with mode 0600.

    A stale socket file (nothing listening) is replaced; a live one or any other
    kind of file makes it raise :class:`LinkEmuError`. Returns the listener and
    the socket file's inode (so shutdown removes only its own file).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise LinkEmuError(f"control path {path} exists and is not a socket; remove it first")
        probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listening
        else:
            raise LinkEmuError(f"control socket {path} is in use by another process")
        finally:
            probe.close()
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        # On Linux the socket inode's mode becomes the file's mode at bind(), so the
        # file never exists with wider permissions; chmod afterwards for other OSes.
        os.fchmod(sock.fileno(), 0o600)
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
    except OSError as err:
        sock.close()
        raise LinkEmuError(f"cannot bind control socket {path}: {err.strerror or err}") from err
    return trio.SocketListener(sock), os.lstat(path).st_ino


def _unlink_control_socket(path: str, inode: int) -> None:
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == inode:
            os.unlink(path)


def control_request(
    path: str,
    request: Mapping[str, Any],
    *,
    timeout_s: float = 5.0,
    max_reply_bytes: int = 1 * MIB,
) -> dict[str, Any]:
    """Send one request to a running emulator's control socket; return its reply.

    Blocking (plain sockets), for CLIs and scripts; call it via
    ``trio.to_thread.run_sync`` from async code. Returns the reply object whether
    ``ok`` is true or false. Raises :class:`LinkEmuError` if the socket cannot be
    reached, does not answer within ``timeout_s``, or answers something that is
    not one JSON object line of at most ``max_reply_bytes``.
    """
    line = json.dumps(dict(request), separators=(",", ":")).encode() + b"\n"
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(path)
        except OSError as err:
            raise LinkEmuError(
                f"cannot reach link emulator control socket {path}: {err.strerror or err} "
                f"(is `linkemu run --control {path}` running?)"
            ) from err
        buf = bytearray()
        try:
            sock.sendall(line)
            while b"\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
                if len(buf) > max_reply_bytes:
                    raise LinkEmuError(f"reply from {path} longer than {max_reply_bytes} bytes")
        except TimeoutError as err:
            raise LinkEmuError(f"no reply from {path} within {timeout_s:g} s") from err
        except OSError as err:
            raise LinkEmuError(f"control socket {path} failed: {err.strerror or err}") from err
    finally:
        sock.close()
    if b"\n" not in buf:
        raise LinkEmuError(f"control socket {path} closed without a reply")
    try:
        reply = json.loads(bytes(buf[: buf.index(b"\n")]).decode("utf-8"))
    except ValueError as err:
        raise LinkEmuError(f"control socket {path} sent an invalid reply: {err}") from err
    if not isinstance(reply, dict) or "ok" not in reply:
        raise LinkEmuError(f"control socket {path} sent an unexpected reply: {reply!r}")
    return reply


def parse_hostport(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) into ``(host, port)``.

    Raises :class:`LinkEmuError` if the port is missing or not 0..65535 or the
    host is empty.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise LinkEmuError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise LinkEmuError(f"port in {text!r} is not a number") from None
    if not 0 <= port <= 65535 or not host:
        raise LinkEmuError(f"expected HOST:PORT with port 0..65535, got {text!r}")
    return host, port


def format_hostport(host: str, port: int) -> str:
    """Format ``(host, port)`` as ``HOST:PORT``, bracketing IPv6 addresses."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
