"""The daemon's control socket: one JSON object per line each way.

Server: a Unix socket created mode 0600 (only the daemon's user may steer it).
Requests are ``{"cmd": NAME, ...}``; answers are ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``. A malformed or over-long line gets an error
answer and changes nothing. Client: :func:`request`, blocking, for the CLI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from geoclus.errors import ControlError, GeoclusError

log = logging.getLogger("geoclus.control")

# A request is a short JSON object; anything longer is a client bug or abuse.
MAX_LINE_BYTES = 64 * 1024
# Control clients at once; more are refused rather than queued without bound.
MAX_CLIENTS = 16

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def remove_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on; refuse a live one or a non-socket.

    Raises GeoclusError naming the path and the problem.
    """
    if not os.path.exists(path):
        return
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise GeoclusError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise GeoclusError(f"{path} is in use by a running daemon; stop it first")
    finally:
        probe.close()


async def _bind(path: str) -> trio.socket.SocketType:
    remove_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(MAX_CLIENTS)
    return sock


async def serve_control(
    path: str, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``handler`` on the Unix socket ``path`` until cancelled; removes the
    socket file on exit."""
    sock = await _bind(path)
    listener = trio.SocketListener(sock)
    limiter = trio.CapacityLimiter(MAX_CLIENTS)

    async def client(stream: trio.SocketStream) -> None:
        async with stream:
            if limiter.available_tokens == 0:
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(_dump({"ok": False, "error": "too many clients"}))
                return
            async with limiter:
                await _serve_client(stream, handler)

    try:
        task_status.started()
        await trio.serve_listeners(client, [listener])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _serve_client(stream: trio.SocketStream, handler: Handler) -> None:
    buf = bytearray()
    while True:
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > MAX_LINE_BYTES:
                await stream.send_all(_dump({"ok": False, "error": "request line too long"}))
                return
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            buf += data
            continue
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        answer = await _answer(line, handler)
        try:
            await stream.send_all(_dump(answer))
        except trio.BrokenResourceError:
            return


async def _answer(line: bytes, handler: Handler) -> dict[str, Any]:
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return {"ok": False, "error": "request is not valid JSON"}
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        return {"ok": False, "error": 'request must be an object with a string "cmd"'}
    try:
        result = await handler(req)
    except GeoclusError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:
        log.exception("control request %r failed", req.get("cmd"))
        return {"ok": False, "error": f"internal error: {exc!r}"}
    return {"ok": True, **result}


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, default=str).encode() + b"\n"


def request(path: str, cmd: str, timeout_s: float = 30.0, **args: Any) -> dict[str, Any]:
    """Send one request to the daemon at ``path`` and return its answer.

    Raises ControlError if the daemon is not reachable or answers with an error.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(
                f"no control socket at {path}: is the daemon running? "
                "(start it with `geoclus volume serve --config FILE`)"
            ) from None
        except OSError as exc:
            raise ControlError(f"cannot reach the daemon at {path}: {exc.strerror}") from None
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise ControlError(
                    f"the daemon at {path} did not answer in {timeout_s} s"
                ) from None
            if not data:
                raise ControlError(f"the daemon at {path} closed the connection")
            buf += data
            if len(buf) > 16 * MAX_LINE_BYTES:
                raise ControlError("answer too long")
    finally:
        sock.close()
    answer = json.loads(buf.split(b"\n", 1)[0])
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "unknown error")))
    return answer
