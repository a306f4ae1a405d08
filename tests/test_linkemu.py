"""Tests for the link emulator: the sans-I/O schedule, the trio proxy, control, CLI."""

from __future__ import annotations

import functools
import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from click.testing import CliRunner

from geoclus.linkemu import (
    LinkDirection,
    LinkEmuError,
    LinkEmulator,
    LinkEmulatorConfig,
    LinkSettings,
    PipeSchedule,
    control_request,
    parse_hostport,
)
from geoclus.linkemu_cli import linkemu

ROOT = Path(__file__).resolve().parent.parent
EPS = 1e-9

# ------------------------------------------------------------------ sans-I/O core


def _pipe(seed: int = 0) -> PipeSchedule:
    return PipeSchedule(LinkDirection(random.Random(seed)))


def test_fixed_delay_is_added_to_arrival_time() -> None:
    pipe = _pipe()
    settings = LinkSettings(delay_s=0.25)
    assert pipe.schedule(10.0, 100, settings) == 10.25
    assert pipe.schedule(10.5, 100, settings) == 10.75
    assert pipe.schedule(10.5, 0, settings) == 10.75  # EOF takes the same path


def test_jitter_is_seeded_uniform_and_bounded() -> None:
    settings = LinkSettings(delay_s=0.25, jitter_s=0.125)
    link = LinkDirection(random.Random(42))
    expected_rng = random.Random(42)
    for i in range(200):
        now = float(i)  # 1 s apart: no clamping by the previous chunk
        got = PipeSchedule(link).schedule(now, 10, settings)
        assert got == now + 0.25 + expected_rng.uniform(0.0, 0.125)
        assert now + 0.25 <= got <= now + 0.375
    # the same seed gives the same schedule, another seed another one
    a, b, c = _pipe(7), _pipe(7), _pipe(8)
    times_a = [a.schedule(i * 1.0, 1, settings) for i in range(20)]
    assert times_a == [b.schedule(i * 1.0, 1, settings) for i in range(20)]
    assert times_a != [c.schedule(i * 1.0, 1, settings) for i in range(20)]


def test_no_jitter_draws_nothing_from_the_rng() -> None:
    rng = random.Random(3)
    state = rng.getstate()
    PipeSchedule(LinkDirection(rng)).schedule(0.0, 10, LinkSettings(delay_s=0.5))
    assert rng.getstate() == state


def test_rate_serializes_chunks_back_to_back() -> None:
    settings = LinkSettings(delay_s=0.25, rate_bps=8000.0)  # 1000 bytes = 1 s on the wire
    pipe = _pipe()
    assert pipe.schedule(0.0, 1000, settings) == 1.25
    assert pipe.schedule(0.5, 1000, settings) == 2.25  # waits for the wire: 1.0 .. 2.0
    assert pipe.schedule(0.5, 0, settings) == 2.25  # EOF right behind the data
    assert pipe.schedule(5.0, 500, settings) == 5.75  # idle wire: starts at once


def test_rate_is_shared_by_connections_in_one_direction() -> None:
    settings = LinkSettings(rate_bps=8000.0)
    link = LinkDirection(random.Random(0))
    a, b = PipeSchedule(link), PipeSchedule(link)
    assert a.schedule(0.0, 1000, settings) == 1.0
    assert b.schedule(0.0, 1000, settings) == 2.0
    other_direction = PipeSchedule(LinkDirection(random.Random(0)))
    assert other_direction.schedule(0.0, 1000, settings) == 1.0


def test_delivery_is_monotonic_per_connection() -> None:
    pipe = _pipe()
    assert pipe.schedule(0.0, 1, LinkSettings(delay_s=1.0)) == 1.0
    # the delay drops: the next chunk must still not overtake the first
    assert pipe.schedule(0.1, 1, LinkSettings(delay_s=0.0)) == 1.0
    assert pipe.schedule(2.0, 1, LinkSettings(delay_s=0.0)) == 2.0
    # heavy jitter never reorders
    jittery = LinkSettings(delay_s=0.01, jitter_s=0.5)
    pipe = _pipe(11)
    times = [pipe.schedule(i * 0.001, 100, jittery) for i in range(500)]
    assert times == sorted(times)
    assert all(t >= i * 0.001 + 0.01 for i, t in enumerate(times))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delay_s": -0.1},
        {"delay_s": float("nan")},
        {"delay_s": float("inf")},
        {"delay_s": 4000.0},
        {"jitter_s": -1.0},
        {"delay_s": True},
        {"rate_bps": 0},
        {"rate_bps": -5.0},
        {"rate_bps": float("inf")},
        {"rate_bps": "fast"},
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(LinkEmuError):
        LinkSettings(**kwargs)


def test_invalid_schedule_input_is_refused() -> None:
    with pytest.raises(LinkEmuError):
        _pipe().schedule(0.0, -1, LinkSettings())
    with pytest.raises(LinkEmuError):
        _pipe().schedule(float("nan"), 1, LinkSettings())


def test_invalid_config_is_refused() -> None:
    with pytest.raises(LinkEmuError):
        LinkEmulatorConfig(target_host="127.0.0.1", target_port=0)
    with pytest.raises(LinkEmuError):
        LinkEmulatorConfig(target_host="127.0.0.1", target_port=1, max_buffer_bytes=0)
    with pytest.raises(LinkEmuError):
        LinkEmulatorConfig(target_host="127.0.0.1", target_port=70000)
    with pytest.raises(LinkEmuError):
        LinkEmulatorConfig(target_host="127.0.0.1", target_port=1, timer_spin_s=1.0)


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_hostport("[::1]:80") == ("::1", 80)
    for bad in ("nohost", ":80", "h:x", "h:70000"):
        with pytest.raises(LinkEmuError):
            parse_hostport(bad)


# ------------------------------------------------------------------- trio shell


class Target:
    """An echo server on 127.0.0.1 recording when each byte arrived (trio time)."""

    def __init__(self) -> None:
        self.port = 0
        self.arrivals: list[tuple[float, bytes]] = []
        self.ended: list[str] = []  # "eof" or "error" per connection
        self._changed = trio.Event()

    @property
    def received(self) -> bytes:
        return b"".join(data for _, data in self.arrivals)

    async def wait_received(self, nbytes: int) -> None:
        while len(self.received) < nbytes:
            await self._changed.wait()

    async def wait_ended(self) -> None:
        while not self.ended:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def start(self, nursery: trio.Nursery) -> int:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
        )
        self.port = listeners[0].socket.getsockname()[1]
        return self.port

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    self.ended.append("eof")
                    self._notify()
                    await stream.send_eof()
                    return
                self.arrivals.append((trio.current_time(), data))
                self._notify()
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.ended.append("error")
            self._notify()
        finally:
            await trio.aclose_forcefully(stream)


async def _start(
    nursery: trio.Nursery, target: Target, **config: object
) -> tuple[LinkEmulator, int]:
    await target.start(nursery)
    emu = LinkEmulator(
        LinkEmulatorConfig(target_host="127.0.0.1", target_port=target.port, **config)  # type: ignore[arg-type]
    )
    port = await nursery.start(emu.serve)
    return emu, port


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        assert data, f"EOF after {len(buf)} of {n} bytes"
        buf += data
    return bytes(buf)


async def _refused_at_once(port: int) -> bool:
    """True if a new connection to ``port`` is closed or reset without any byte.

    The emulator accepts and resets it; depending on timing the reset reaches the
    client during connect (an OSError) or after (EOF or a broken stream).
    """
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    try:
        return await _connection_ends(stream)
    finally:
        await stream.aclose()


async def _connection_ends(stream: trio.abc.ReceiveStream) -> bool:
    """True if the stream ends (EOF or reset) without delivering any byte."""
    try:
        return await stream.receive_some(1) == b""
    except trio.BrokenResourceError:
        return True


async def test_delay_one_way_and_round_trip_in_mock_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    target = Target()
    emu, port = await _start(nursery, target, settings=LinkSettings(delay_s=0.25))
    client = await trio.open_tcp_stream("127.0.0.1", port)
    t0 = trio.current_time()
    await client.send_all(b"hello")
    assert await _receive_exactly(client, 5) == b"hello"
    assert trio.current_time() - t0 == pytest.approx(0.5, abs=EPS)
    assert target.arrivals[0][0] - t0 == pytest.approx(0.25, abs=EPS)

    emu.set_delay(0.125)
    t1 = trio.current_time()
    await client.send_all(b"again")
    assert await _receive_exactly(client, 5) == b"again"
    assert trio.current_time() - t1 == pytest.approx(0.25, abs=EPS)

    # EOF is forwarded with the same delay; the echo's EOF comes back after one RTT
    t2 = trio.current_time()
    await client.send_eof()
    assert await client.receive_some(10) == b""
    assert trio.current_time() - t2 == pytest.approx(0.25, abs=EPS)
    await client.aclose()
    stats = emu.statistics()
    assert (stats.bytes_to_target, stats.bytes_to_client) == (10, 10)
    assert stats.connections_total == 1
    assert target.ended == ["eof"]


async def test_rate_limits_throughput_in_mock_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    target = Target()
    rate = LinkSettings(delay_s=0.25, rate_bps=80_000.0)  # 10_000 bytes = 1 s on the wire
    _, port = await _start(nursery, target, settings=rate)
    client = await trio.open_tcp_stream("127.0.0.1", port)
    t0 = trio.current_time()
    await client.send_all(b"r" * 10_000)
    await target.wait_received(10_000)
    assert target.arrivals[-1][0] - t0 == pytest.approx(1.25, abs=EPS)
    assert await _receive_exactly(client, 10_000) == b"r" * 10_000
    assert trio.current_time() - t0 == pytest.approx(2.5, abs=EPS)
    await client.aclose()


async def test_rate_is_shared_by_two_connections(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    target = Target()
    _, port = await _start(nursery, target, settings=LinkSettings(rate_bps=80_000.0))
    a = await trio.open_tcp_stream("127.0.0.1", port)
    b = await trio.open_tcp_stream("127.0.0.1", port)
    t0 = trio.current_time()
    await a.send_all(b"a" * 10_000)
    await b.send_all(b"b" * 10_000)
    await target.wait_received(20_000)
    assert target.arrivals[-1][0] - t0 == pytest.approx(2.0, abs=EPS)
    await a.aclose()
    await b.aclose()


async def test_cut_stalls_everything_and_restore_delivers_in_order(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    target = Target()
    emu, port = await _start(nursery, target, settings=LinkSettings(delay_s=0.25))
    client = await trio.open_tcp_stream("127.0.0.1", port)
    await client.send_all(b"warm")
    assert await _receive_exactly(client, 4) == b"warm"

    # in flight when the link goes down: held, delivered at the restore
    t0 = trio.current_time()
    await client.send_all(b"in-flight|")
    await trio.sleep(0.1)
    emu.cut()
    assert emu.statistics().cut
    await trio.sleep(0.1)
    await client.send_all(b"during-cut|")
    await trio.sleep(0.1)
    await client.send_all(b"more")
    with trio.move_on_after(30):
        await client.receive_some(100)
        pytest.fail("bytes were delivered while the link was cut")
    assert target.received == b"warm"
    stats = emu.statistics()
    assert 0 < stats.bytes_held <= len(b"in-flight|during-cut|more")
    assert stats.connections_open == 1

    # new connections are accepted and closed at once while cut
    refused_before = stats.connections_refused
    t_other = trio.current_time()
    assert await _refused_at_once(port)
    assert trio.current_time() == t_other
    assert emu.statistics().connections_refused == refused_before + 1

    t_restore = trio.current_time()
    assert t_restore - t0 > 30
    emu.restore()
    payload = b"in-flight|during-cut|more"
    assert await _receive_exactly(client, len(payload)) == payload
    assert target.received == b"warm" + payload
    # the in-flight chunk reaches the target at the restore, the rest after the delay
    assert target.arrivals[1][0] == pytest.approx(t_restore, abs=EPS)
    assert target.arrivals[1][1] == b"in-flight|"
    assert target.arrivals[-1][0] == pytest.approx(t_restore + 0.25, abs=EPS)
    await trio.testing.wait_all_tasks_blocked()
    assert emu.statistics().bytes_held == 0
    await client.aclose()


async def test_reset_ends_both_sides_and_link_stays_up(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    target = Target()
    emu, port = await _start(nursery, target, settings=LinkSettings(delay_s=0.01))
    client = await trio.open_tcp_stream("127.0.0.1", port)
    await client.send_all(b"ping")
    assert await _receive_exactly(client, 4) == b"ping"
    assert emu.reset() == 1
    assert await _connection_ends(client)
    await target.wait_ended()
    assert target.ended == ["error"] or target.ended == ["eof"]
    await client.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert emu.statistics().connections_open == 0

    again = await trio.open_tcp_stream("127.0.0.1", port)
    await again.send_all(b"pong")
    assert await _receive_exactly(again, 4) == b"pong"
    await again.aclose()


async def test_unreachable_target_closes_the_client(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    emu = LinkEmulator(LinkEmulatorConfig(target_host="127.0.0.1", target_port=dead_port))
    port = await nursery.start(emu.serve)
    assert await _refused_at_once(port)
    stats = emu.statistics()
    assert (stats.connections_refused, stats.connections_total) == (1, 0)


async def test_max_connections_bound(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    target = Target()
    emu, port = await _start(nursery, target, max_connections=1)
    first = await trio.open_tcp_stream("127.0.0.1", port)
    await first.send_all(b"x")
    assert await _receive_exactly(first, 1) == b"x"
    assert await _refused_at_once(port)
    assert emu.statistics().connections_refused == 1
    await first.aclose()


async def test_buffer_bound_applies_backpressure(mock_clock: trio.testing.MockClock) -> None:
    # Lockstep streams: the sender's send_all returns only once the emulator has
    # read every byte, so it blocking proves the emulator stopped reading.
    client, emu_client_end = trio.testing.lockstep_stream_pair()
    emu_target_end, target = trio.testing.lockstep_stream_pair()
    emu = LinkEmulator(
        LinkEmulatorConfig(
            target_host="127.0.0.1",
            target_port=9,
            settings=LinkSettings(delay_s=100.0),
            max_buffer_bytes=1000,
            max_chunk_bytes=300,
        )
    )
    payload = bytes(range(256)) * 20  # 5120 bytes
    sent = trio.Event()

    async def send() -> None:
        await client.send_all(payload)
        sent.set()

    received = bytearray()
    all_received = trio.Event()

    async def receive() -> None:
        while len(received) < len(payload):
            received.extend(await target.receive_some(65536))
        all_received.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(emu.forward, emu_client_end, emu_target_end)
        nursery.start_soon(send)
        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        # mock time is frozen: the delay never elapses; the buffer is full
        assert emu.statistics().bytes_held == 1000
        assert not sent.is_set()
        assert not received
        mock_clock.autojump_threshold = 0  # let time run: everything flows, in order
        await sent.wait()
        await all_received.wait()
        assert bytes(received) == payload
        await trio.testing.wait_all_tasks_blocked()  # the writer's send_all has returned
        stats = emu.statistics()
        assert (stats.bytes_to_target, stats.bytes_held) == (len(payload), 0)
        nursery.cancel_scope.cancel()


def _timer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "linkemu-timer"]


async def test_timer_thread_only_under_real_clock_and_stopped_after_serve() -> None:
    emu = LinkEmulator(LinkEmulatorConfig(target_host="127.0.0.1", target_port=9))
    before = len(_timer_threads())
    async with trio.open_nursery() as nursery:
        await nursery.start(emu.serve)
        assert len(_timer_threads()) == before + 1
        nursery.cancel_scope.cancel()
    assert len(_timer_threads()) == before


async def test_no_timer_thread_under_mock_clock(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    before = len(_timer_threads())
    emu = LinkEmulator(LinkEmulatorConfig(target_host="127.0.0.1", target_port=9))
    await nursery.start(emu.serve)
    assert len(_timer_threads()) == before


# --------------------------------------------------------------- control socket


def _control_emulator(tmp_path: Path, target_port: int = 9, **extra: object) -> LinkEmulator:
    return LinkEmulator(
        LinkEmulatorConfig(
            target_host="127.0.0.1",
            target_port=target_port,
            control_path=str(tmp_path / "ctl.sock"),
            max_control_line_bytes=256,
            **extra,  # type: ignore[arg-type]
        )
    )


def test_handle_control_without_sockets() -> None:
    emu = LinkEmulator(LinkEmulatorConfig(target_host="127.0.0.1", target_port=9))
    reply = emu.handle_control({"cmd": "set", "delay_ms": 5, "rate_mbit": 100})
    assert reply["ok"] and reply["stats"]["delay_s"] == 0.005
    assert emu.settings == LinkSettings(delay_s=0.005, rate_bps=100e6)
    assert emu.handle_control({"cmd": "set", "jitter_ms": 1})["ok"]
    assert emu.settings == LinkSettings(delay_s=0.005, jitter_s=0.001, rate_bps=100e6)
    assert emu.handle_control({"cmd": "set", "rate_mbit": 0})["stats"]["rate_bps"] is None
    before = emu.settings
    for bad in (
        [1, 2],
        "cut",
        {},
        {"cmd": "bogus"},
        {"cmd": "cut", "now": True},
        {"cmd": "set"},
        {"cmd": "set", "delay_ms": -1},
        {"cmd": "set", "delay_ms": "5"},
        {"cmd": "set", "delay_ms": True},
        {"cmd": "set", "delay_ms": 1, "bogus": 2},
        {"cmd": "set", "delay_ms": 1, "jitter_ms": 1e12},
        {"cmd": "set", "delay_ms": 10**400},
        {"cmd": "set", "rate_mbit": -1},
        {"cmd": ["cut"]},
        {"cmd": None},
    ):
        reply = emu.handle_control(bad)
        assert reply["ok"] is False and reply["error"], bad
    assert emu.settings == before and not emu.is_cut
    assert emu.handle_control({"cmd": "cut"})["stats"]["cut"] is True
    assert emu.handle_control({"cmd": "restore"})["stats"]["cut"] is False
    assert emu.handle_control({"cmd": "reset"})["aborted"] == 0
    assert json.loads(emu.handle_control_line(b"\xff\xfe\n"))["ok"] is False
    assert json.loads(emu.handle_control_line(b"{nope"))["ok"] is False
    assert json.loads(emu.handle_control_line(b"[" * 4000))["ok"] is False
    assert json.loads(emu.handle_control_line(b'{"cmd": "stats"}\r'))["ok"] is True


async def test_control_socket_protocol(tmp_path: Path) -> None:
    emu = _control_emulator(tmp_path)
    path = str(tmp_path / "ctl.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(emu.serve)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

        stream = await trio.open_unix_socket(path)
        buf = bytearray()

        async def ask(line: bytes) -> dict[str, Any]:
            await stream.send_all(line)
            while b"\n" not in buf:
                data = await stream.receive_some(4096)
                assert data, "control socket closed"
                buf.extend(data)
            nl = buf.index(b"\n")
            reply: dict[str, Any] = json.loads(bytes(buf[:nl]))
            del buf[: nl + 1]
            return reply

        assert (await ask(b'{"cmd": "cut"}\n'))["stats"]["cut"] is True
        assert emu.is_cut
        assert (await ask(b'{"cmd": "restore"}\n'))["stats"]["cut"] is False
        reply = await ask(b'{"cmd": "set", "delay_ms": 2.5, "jitter_ms": 0.5, "rate_mbit": 8}\n')
        assert reply["ok"] is True
        assert emu.settings == LinkSettings(delay_s=0.0025, jitter_s=0.0005, rate_bps=8e6)
        for bad in (b"garbage\n", b"[]\n", b'{"cmd": "explode"}\n', b'{"cmd":"set","x":1}\n'):
            reply = await ask(bad)
            assert reply["ok"] is False and isinstance(reply["error"], str)
        assert emu.settings == LinkSettings(delay_s=0.0025, jitter_s=0.0005, rate_bps=8e6)
        # two requests in one write are answered in order
        await stream.send_all(b'{"cmd":"stats"}\n{"cmd":"reset"}\n')
        assert "stats" in await ask(b"")
        assert (await ask(b""))["aborted"] == 0

        # an over-long line gets an error, then the connection is closed
        reply = await ask(b"x" * 1000)
        assert reply["ok"] is False and "longer than 256" in reply["error"]
        assert await _connection_ends(stream)  # EOF, or a reset: unread bytes were dropped
        await stream.aclose()

        # the blocking client used by the CLI
        reply = await trio.to_thread.run_sync(control_request, path, {"cmd": "stats"})
        assert reply["ok"] is True and reply["stats"]["rate_bps"] == 8e6
        nursery.cancel_scope.cancel()
    assert not await trio.Path(path).exists()


async def test_control_socket_refuses_live_or_foreign_path(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    path.write_text("not a socket")
    with pytest.raises(LinkEmuError, match="not a socket"):
        await _control_emulator(tmp_path).serve()
    path.unlink()
    first = _control_emulator(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.serve)
        with pytest.raises(LinkEmuError, match="in use"):
            await _control_emulator(tmp_path).serve()
        nursery.cancel_scope.cancel()
    # a stale socket file (nobody listening) is replaced
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    async with trio.open_nursery() as nursery:
        await nursery.start(_control_emulator(tmp_path).serve)
        nursery.cancel_scope.cancel()


def test_control_request_without_server(tmp_path: Path) -> None:
    with pytest.raises(LinkEmuError, match="cannot reach"):
        control_request(str(tmp_path / "none.sock"), {"cmd": "stats"})


# -------------------------------------------------------------------------- CLI


def test_cli_client_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(linkemu, ["cut", "--control", str(tmp_path / "none.sock")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot reach")
    assert "Traceback" not in result.output
    result = runner.invoke(linkemu, ["set", "--control", str(tmp_path / "none.sock")])
    assert result.exit_code == 2
    result = runner.invoke(linkemu, ["run", "--listen", "nonsense", "--target", "127.0.0.1:9"])
    assert result.exit_code == 2 and "HOST:PORT" in result.output


def test_cli_run_reports_bind_errors(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            linkemu, ["run", "--listen", f"127.0.0.1:{port}", "--target", "127.0.0.1:9"]
        )
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: cannot listen on")
    assert result.output.count("\n") == 1


class _EchoServer:
    """A blocking echo server on 127.0.0.1 in a daemon thread (for the subprocess test)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_cli_run_as_a_subprocess(tmp_path: Path) -> None:
    echo = _EchoServer()
    control = str(tmp_path / "ctl.sock")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from geoclus.linkemu_cli import linkemu; linkemu()",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--target",
            f"127.0.0.1:{echo.port}",
            "--delay-ms",
            "1",
            "--control",
            control,
            "--seed",
            "1",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    runner = CliRunner()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        port = int(match.group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            t0 = time.monotonic()
            conn.sendall(b"ping")
            assert conn.recv(100) == b"ping"
            assert time.monotonic() - t0 >= 0.002  # 1 ms each way

            result = runner.invoke(linkemu, ["cut", "--control", control])
            assert result.exit_code == 0, result.output
            conn.sendall(b"held")
            conn.settimeout(0.3)
            with pytest.raises(TimeoutError):
                conn.recv(100)
            stats = json.loads(
                runner.invoke(linkemu, ["stats", "--json", "--control", control]).output
            )
            assert stats["cut"] is True and stats["connections_open"] == 1

            result = runner.invoke(linkemu, ["restore", "--control", control])
            assert result.exit_code == 0, result.output
            conn.settimeout(5)
            assert conn.recv(100) == b"held"

        result = runner.invoke(linkemu, ["set", "--control", control, "--rate-mbit", "100"])
        assert result.exit_code == 0 and "100 Mbit/s" in result.output
        result = runner.invoke(linkemu, ["stats", "--control", control])
        assert result.exit_code == 0
        assert "link: up" in result.output and "8 to target" in result.output
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            echo.close()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not os.path.exists(control)
