"""Resync benchmark: delta resync after a link cut, full sync of a seeded copy.

For each scenario two real site daemons run through the link emulator with a
bandwidth cap; the benchmark makes the copies differ, lets the generation
decision start the resync, and measures:

* time to consistent, bytes on the wire (emulator, primary -> secondary);
* ``bytes_on_wire / bytes_that_differ`` (target <= 1.05);
* resync rate against the link's cap (target >= 0.9);
* application write p99 (4 KiB, QD1) during the resync against idle (target <= 2x).

Run: ``python -m bench.resync`` (``make bench`` runs it after the replication
benchmark). ``--quick`` shrinks everything.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import click
import trio

from geoclus.nbd.client import NbdClient
from geoclus.testing.sitepair import SiteOptions, running_pair

REGION = 64 * 1024


@dataclass
class Result:
    name: str
    differ_bytes: int = 0
    wire_bytes: int = 0
    seconds: float = 0.0
    resync_total_bytes: int = 0
    full: bool | None = None
    p99_idle_ms: float | None = None
    p99_resync_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def _p99(samples: list[float]) -> float | None:
    if not samples:
        return None
    s = sorted(samples)
    return s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3


async def _status(site: Any) -> dict[str, Any]:
    return await trio.to_thread.run_sync(site.status)


async def _writes(
    path: str,
    n: int,
    size: int,
    rng: random.Random,
    length: int = 4096,
    latencies: list[float] | None = None,
    stop: trio.Event | None = None,
) -> None:
    client = await NbdClient.connect_unix(path, "demo")
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        i = 0
        while (n and i < n) or (stop is not None and not stop.is_set()):
            offset = rng.randrange(size // length) * length
            t0 = time.perf_counter()
            await client.write(offset, rng.randbytes(length))
            if latencies is not None:
                latencies.append(time.perf_counter() - t0)
            i += 1
        await client.aclose()
        nursery.cancel_scope.cancel()


async def delta(workdir: str, size: int, dirty_pct: float, rate_bps: float) -> Result:
    res = Result(f"delta {dirty_pct:g}% dirty")
    opts = SiteOptions(
        mode="async",
        size=str(size),
        on_congestion="pull-ahead",
        max_lag_bytes="1MiB",
        rate_bps=rate_bps,
        one_way_delay_s=0.0005,
    )
    async with running_pair(workdir, opts) as pair:
        idle: list[float] = []
        await _writes(pair.a.nbd, 300, size, random.Random(1), latencies=idle)
        res.p99_idle_ms = _p99(idle)
        pair.cut()
        with trio.fail_after(30):  # the primary notices: writes are tracked from now
            while (await _status(pair.a))["connected"]:
                await trio.sleep(0.05)
        regions = size // REGION
        chosen = random.Random(2).sample(range(regions), max(1, int(regions * dirty_pct / 100)))
        client = await NbdClient.connect_unix(pair.a.nbd, "demo")
        async with trio.open_nursery() as n:
            await n.start(client.run)
            rng = random.Random(3)
            for r in chosen:  # one full-region write per dirty region
                await client.write(r * REGION, rng.randbytes(REGION))
            await client.aclose()
            n.cancel_scope.cancel()
        # The truth: the regions written while apart. The bitmap also holds
        # regions of writes the peer had already applied before the cut (they
        # were still in the log); checksums find those identical.
        res.differ_bytes = len(chosen) * REGION
        assert pair.link is not None
        wire0 = pair.link.statistics().bytes_to_target
        t0 = time.monotonic()
        pair.restore()
        # What differs is what the resync plans when it starts; application
        # writes join only then (so they do not add dirty regions first).
        with trio.fail_after(60):
            while not (await _status(pair.a))["resync_active"]:
                await trio.sleep(0.01)
        reconnect_s = time.monotonic() - t0
        t0 = time.monotonic()  # the rate is measured from the resync's start
        during: list[float] = []
        stop = trio.Event()
        async with trio.open_nursery() as n:
            n.start_soon(
                lambda: _writes(pair.a.nbd, 0, size, random.Random(4), latencies=during, stop=stop)
            )
            with trio.move_on_after(600):
                while True:
                    st = await _status(pair.a)
                    if st["resync_active"]:
                        res.resync_total_bytes = max(
                            res.resync_total_bytes, st["resync_total_bytes"]
                        )
                        res.full = st["resync_full"]
                    if st["resyncs_completed"] >= 1 and not st["resync_active"]:
                        break
                    await trio.sleep(0.02)
            res.seconds = time.monotonic() - t0
            stop.set()
        app_bytes = len(during) * 4096
        res.wire_bytes = pair.link.statistics().bytes_to_target - wire0 - app_bytes
        res.notes.append(f"link restored -> resync started: {reconnect_s:.2f} s (not in the rate)")
        res.p99_resync_ms = _p99(during)
        res.notes.append(
            f"{len(during)} app writes ({app_bytes / 2**20:.1f} MiB) during the resync, "
            "subtracted from the wire bytes; the rest is resync data, frame and TLS "
            "overhead, keepalives"
        )
    return res


async def full(workdir: str, size: int, same_pct: float, rate_bps: float) -> Result:
    """A secondary seeded with a store of unknown history (no metadata) joins a
    fresh primary (all zeros): ``same_pct`` of its regions already equal it."""
    res = Result(f"full sync, {same_pct:g}% identical")
    os.makedirs(workdir, exist_ok=True)
    rng = random.Random(5)
    regions = size // REGION
    seed = bytearray(size)
    differ = random.Random(6).sample(range(regions), int(regions * (100 - same_pct) / 100))
    for r in differ:
        seed[r * REGION : (r + 1) * REGION] = rng.randbytes(REGION)
    with open(os.path.join(workdir, "b.img"), "wb") as f:  # noqa: ASYNC230 - setup
        f.write(seed)
    res.differ_bytes = len(differ) * REGION
    opts = SiteOptions(mode="async", size=str(size), rate_bps=rate_bps, one_way_delay_s=0.0005)
    t0 = time.monotonic()
    async with running_pair(workdir, opts) as pair:
        assert pair.link is not None
        with trio.move_on_after(900):
            while True:
                st = await _status(pair.a)
                if st["resync_active"]:
                    res.resync_total_bytes = max(res.resync_total_bytes, st["resync_total_bytes"])
                    res.full = st["resync_full"]
                if st["resyncs_completed"] >= 1 and not st["resync_active"]:
                    break
                await trio.sleep(0.05)
        res.seconds = time.monotonic() - t0
        res.wire_bytes = pair.link.statistics().bytes_to_target
        res.notes.append("includes daemon start-up; regions with equal digests are not sent")
    return res


def _table(results: list[Result], rate_bps: float) -> str:
    cap = rate_bps / 8
    lines = [
        f"resync benchmark: link capped at {rate_bps / 1e6:.0f} Mbit/s "
        f"({cap / 1e6:.1f} MB/s), 1 ms round trip, mutual TLS",
        "",
        f"{'scenario':<26} {'differ MiB':>10} {'planned MiB':>11} {'wire MiB':>9} "
        f"{'wire/differ':>11} "
        f"{'time s':>7} {'MB/s':>7} {'/cap':>6} {'p99 idle':>9} {'p99 resync':>10}",
    ]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<26} ERROR {r.error}")
            continue
        ratio = r.wire_bytes / r.differ_bytes if r.differ_bytes else float("nan")
        rate = r.wire_bytes / r.seconds if r.seconds else 0.0
        p_idle = "-" if r.p99_idle_ms is None else f"{r.p99_idle_ms:.2f} ms"
        p_res = "-" if r.p99_resync_ms is None else f"{r.p99_resync_ms:.2f} ms"
        lines.append(
            f"{r.name:<26} {r.differ_bytes / 2**20:>10.1f} "
            f"{r.resync_total_bytes / 2**20:>11.1f} {r.wire_bytes / 2**20:>9.1f} "
            f"{ratio:>11.2f} {r.seconds:>7.2f} {rate / 1e6:>7.1f} {rate / cap:>6.2f} "
            f"{p_idle:>9} {p_res:>10}"
        )
    lines += ["", "targets: wire/differ <= 1.05; MB/s >= 0.9 x cap; p99 during resync <= 2 x idle"]
    for r in results:
        for note in r.notes:
            lines.append(f"  {r.name}: {note}")
    return "\n".join(lines)


async def run_all(size: int, rate_bps: float, quick: bool, only: str | None = None) -> list[Result]:
    results = []
    scenarios = [("delta", 1.0), ("delta", 10.0), ("full", 0.0), ("full", 50.0)]
    if only:
        scenarios = [sc for sc in scenarios if sc[0] == only]
    for kind, pct in scenarios:
        workdir = tempfile.mkdtemp(prefix="geoclus-resync-bench-")
        click.echo(f"[{kind} {pct:g}%] running ...", err=True)
        try:
            if kind == "delta":
                # The dirty data must exceed the 1 MiB log (so the peer goes
                # outdated and is resynced): always the full-size volume here.
                results.append(await delta(workdir, max(size, 256 * 2**20), pct, rate_bps))
            else:
                results.append(await full(workdir, size // (4 if quick else 1), pct, rate_bps))
        except Exception as exc:  # report and go on with the other scenarios
            results.append(Result(f"{kind} {pct:g}%", error=repr(exc)))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


@click.command()
@click.option("--size-mib", default=256, show_default=True, help="Volume size.")
@click.option("--rate-mbit", default=200.0, show_default=True, help="Link bandwidth cap.")
@click.option("--quick", is_flag=True, help="Smaller volume for a smoke run.")
@click.option("--markdown", "markdown", type=click.Path(dir_okay=False), default=None)
@click.option("--only", type=click.Choice(["delta", "full"]), default=None)
def main(
    size_mib: int, rate_mbit: float, quick: bool, markdown: str | None, only: str | None
) -> None:
    """Measure resync: bytes on the wire, rate against the cap, latency impact."""
    size = (64 if quick else size_mib) * 2**20
    results = trio.run(run_all, size, rate_mbit * 1e6, quick, only)
    table = _table(results, rate_mbit * 1e6)
    click.echo(table)
    if markdown:
        with open(markdown, "w") as f:
            f.write("```\n" + table + "\n```\n")
    if any(r.error for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
