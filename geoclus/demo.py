"""``geoclus demo``: two sites on one machine, a workload, a link cut, and checks.

For each mode (sync, then async) the demo starts two real daemon processes
joined through the link emulator (0.25 ms each way by default, the seeds'
0.5 ms round-trip budget) with mutual TLS, writes 4 KiB blocks through the
primary's NBD export one at a time (so the order the primary sequenced them is
known exactly), cuts the link in the middle, checks the cut-off secondary
through its own read-only export, restores the link, and at the end compares
both images with xxh3:

* sync: every write acknowledged before the cut is on the secondary, and at
  the end the secondary equals the primary;
* async: during the cut the secondary equals the primary's history after
  exactly the writes it has applied (a prefix), and at the end it has caught
  up completely.

It prints a progress line while it runs, a report at the end, exits non-zero if
any check fails, and removes its processes and files.
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
import xxhash

from geoclus.nbd.client import NbdClient
from geoclus.testing.sitepair import SiteOptions, SitePair, running_pair

BLOCK_BYTES = 4096
READ_CHUNK_BYTES = 1024 * 1024


@dataclass
class ModeResult:
    mode: str
    writes: int = 0
    bytes_written: int = 0
    latencies_s: list[float] = field(default_factory=list)
    largest_lag_bytes: int = 0
    largest_lag_writes: int = 0
    largest_lag_s: float = 0.0
    writes_during_cut: int = 0
    cut_s: float = 0.0
    rtt_ms: float | None = None
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # shown after the checks (event history)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append((name, ok, detail))

    def percentile_ms(self, p: float) -> float | None:
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1e3


class History:
    """The writes the primary sequenced, in order (the demo writes at QD1)."""

    def __init__(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes
        self.writes: list[tuple[int, bytes]] = []

    def image_digest(self, k: int) -> str:
        """xxh3-128 of the image after the first ``k`` writes."""
        img = bytearray(self.size_bytes)
        for offset, data in self.writes[:k]:
            img[offset : offset + len(data)] = data
        return xxhash.xxh3_128_hexdigest(img)


async def _export_digest(path: str, export: str = "demo") -> str:
    client = await NbdClient.connect_unix(path, export)
    h = xxhash.xxh3_128()
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        assert client.export is not None
        for offset in range(0, client.export.size_bytes, READ_CHUNK_BYTES):
            h.update(await client.read(offset, READ_CHUNK_BYTES))
        await client.aclose()
        nursery.cancel_scope.cancel()
    return h.hexdigest()


def _file_digest(path: str) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


class Progress:
    """One progress line, rewritten in place on a terminal, periodic otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self._last = 0.0

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            click.echo(f"\r\033[K{text}", nl=False)
        elif force or now - self._last >= 1.0:
            click.echo(text)
            self._last = now

    def done(self) -> None:
        if self.tty:
            click.echo("\r\033[K", nl=False)


async def run_mode(
    mode: str, workdir: str, *, phase_s: float, delay_s: float, progress: Progress
) -> ModeResult:
    """Run one mode's act and return what it measured and checked."""
    res = ModeResult(mode)
    opts = SiteOptions(mode=mode, one_way_delay_s=delay_s, size="64MiB")
    size = 64 * 1024 * 1024
    history = History(size)
    rng = random.Random(42)
    phase = "start"
    async with running_pair(workdir, opts) as pair:
        a_status = await trio.to_thread.run_sync(pair.a.status)
        client = await NbdClient.connect_unix(pair.a.nbd, "demo")
        stop_sampling = trio.Event()

        async def sample_lag() -> None:
            while not stop_sampling.is_set():
                s = await trio.to_thread.run_sync(pair.a.status)
                res.largest_lag_bytes = max(res.largest_lag_bytes, s["lag_bytes"])
                res.largest_lag_writes = max(res.largest_lag_writes, s["lag_writes"])
                res.largest_lag_s = max(res.largest_lag_s, s["lag_seconds"])
                if s.get("rtt_p50_ms") is not None:
                    res.rtt_ms = s["rtt_p50_ms"]
                progress.show(
                    f"[{mode}] {phase:<10} writes {res.writes:6d}  "
                    f"lag {s['lag_bytes'] / 1024:8.0f} KiB / {s['lag_writes']:5d} writes  "
                    f"peer {'up' if s['connected'] else 'DOWN'}"
                )
                with trio.move_on_after(0.2):
                    await stop_sampling.wait()

        async def write_for(seconds: float) -> int:
            n = 0
            deadline = trio.current_time() + seconds
            while trio.current_time() < deadline:
                offset = rng.randrange(size // BLOCK_BYTES) * BLOCK_BYTES
                data = rng.randbytes(BLOCK_BYTES)
                t0 = time.perf_counter()
                await client.write(offset, data)
                res.latencies_s.append(time.perf_counter() - t0)
                history.writes.append((offset, data))
                res.writes += 1
                res.bytes_written += len(data)
                n += 1
                if res.writes % 64 == 0:
                    await client.flush()
            return n

        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            nursery.start_soon(sample_lag)
            phase = "writing"
            await write_for(phase_s)

            # Cut the link in the middle of the workload.
            phase = "link CUT"
            assert pair.link is not None
            pair.link.cut()
            cut_started = time.monotonic()
            acked_before_cut = res.writes
            writer_done = trio.Event()
            if mode == "async":
                res.writes_during_cut = await write_for(phase_s)
            else:
                # Sync + suspend: the write in flight blocks until the peer is
                # back; a background writer keeps going through the cut.
                async def blocked_writer() -> None:
                    res.writes_during_cut = await write_for(phase_s * 2)
                    writer_done.set()

                nursery.start_soon(blocked_writer)
                await trio.sleep(phase_s)
            # The cut-off secondary, seen through its own read-only export.
            await trio.sleep(0.3)
            b1 = await trio.to_thread.run_sync(pair.b.status)
            digest = await _export_digest(pair.b.nbd)
            b2 = await trio.to_thread.run_sync(pair.b.status)
            k = b1["applied_seq"]
            stable = k == b2["applied_seq"]
            is_prefix = stable and digest == history.image_digest(k)
            res.check(
                "secondary is a prefix during the cut",
                is_prefix,
                f"holds exactly the first {k} of {len(history.writes)} writes"
                if is_prefix
                else f"image after applied_seq={k} does not match the history",
            )
            if mode == "sync":
                res.check(
                    "every acknowledged write is on the secondary",
                    k >= acked_before_cut,
                    f"{acked_before_cut} acknowledged before the cut, {k} on the secondary",
                )
            completed_during_cut = res.writes - acked_before_cut
            if mode == "sync":
                res.check(
                    "writes suspended while the peer was unreachable",
                    completed_during_cut <= 1,
                    f"{completed_during_cut} writes completed during the cut "
                    "(on_peer_loss = suspend; at most the one in flight may land)",
                )
            phase = "restored"
            pair.link.restore()
            res.cut_s = time.monotonic() - cut_started
            if mode == "async":
                await write_for(phase_s)
            else:
                await writer_done.wait()
            phase = "draining"
            await client.flush()
            with trio.move_on_after(30):
                while True:
                    s = await trio.to_thread.run_sync(pair.a.status)
                    if s["lag_writes"] == 0 and s["connected"] and not s["in_flight_writes"]:
                        break
                    await trio.sleep(0.05)
            stop_sampling.set()
            await client.aclose()
            nursery.cancel_scope.cancel()

        final_a = await trio.to_thread.run_sync(pair.a.status)
        res.largest_lag_bytes = max(res.largest_lag_bytes, final_a["max_lag_bytes_seen"])
        res.check(
            "writes went through the export",
            res.writes > 0 and a_status["connected"],
            f"{res.writes} writes",
        )
        if mode == "async":
            res.check(
                "writes continued during the cut",
                res.writes_during_cut > 0,
                f"{res.writes_during_cut} writes while the link was down",
            )
        code_a, code_b = await pair.stop()
        res.check(
            "both daemons stopped cleanly",
            code_a == 0 and code_b == 0,
            f"exit codes {code_a}, {code_b}",
        )
    progress.done()
    pa, pb = pair.a.store, pair.b.store
    da, db = _file_digest(pa), _file_digest(pb)
    expected = history.image_digest(len(history.writes))
    res.check("primary image equals its write history", da == expected, f"xxh3 {da[:16]}")
    res.check(
        "secondary equals primary" if mode == "sync" else "secondary caught up to the full history",
        db == da,
        f"xxh3 {db[:16]}",
    )
    return res


async def _ctl(site: Any, cmd: str, **args: Any) -> dict[str, Any]:
    from geoclus.control import request

    return await trio.to_thread.run_sync(
        lambda: request(site.control, cmd, timeout_s=120.0, **args)
    )


async def _wait(site: Any, predicate: Any, timeout_s: float = 60.0) -> dict[str, Any]:
    with trio.move_on_after(timeout_s):
        while True:
            st = await trio.to_thread.run_sync(site.status)
            if predicate(st):
                return st
            await trio.sleep(0.05)
    return await trio.to_thread.run_sync(site.status)


async def _write_through(
    path: str, history: History, n: int, rng: random.Random, record: bool = True
) -> None:
    client = await NbdClient.connect_unix(path, "demo")
    size = history.size_bytes
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        for _ in range(n):
            offset = rng.randrange(size // BLOCK_BYTES) * BLOCK_BYTES
            data = rng.randbytes(BLOCK_BYTES)
            await client.write(offset, data)
            if record:
                history.writes.append((offset, data))
        await client.flush()
        await client.aclose()
        nursery.cancel_scope.cancel()


async def run_roles(workdir: str, *, delay_s: float, progress: Progress) -> ModeResult:
    """Third act: switchover, forced promotion, split brain and its resolution."""
    res = ModeResult("roles")
    opts = SiteOptions(mode="async", one_way_delay_s=delay_s, size="16MiB")
    history = History(16 * 1024 * 1024)
    rng = random.Random(7)
    async with running_pair(workdir, opts) as pair:
        a, b = pair.a, pair.b
        progress.show("[roles] writing on site A", force=True)
        await _write_through(a.nbd, history, 200, rng)
        await _wait(a, lambda s: s["lag_writes"] == 0)
        # Planned switchover.
        progress.show("[roles] switchover A -> B", force=True)
        d = await _ctl(a, "demote")
        p = await _ctl(b, "promote", force=False) if d["peer_drained"] else None
        sb = await _wait(b, lambda s: s["connected"])
        res.check(
            "switchover without data loss or resync",
            bool(p) and (sb.get("last_decision") or {}).get("action") == "in-sync",
            f"A demoted at write {d['last_seq']} (drained: {d['peer_drained']}); B primary, "
            f"decision {(sb.get('last_decision') or {}).get('action')}",
        )
        await _write_through(b.nbd, history, 100, rng)
        await _wait(b, lambda s: s["lag_writes"] == 0)
        res.writes = len(history.writes)
        # The sites lose each other; B (primary) keeps writing; A is forced up.
        progress.show("[roles] link cut; B keeps writing; A promoted by force", force=True)
        pair.cut()
        await _write_through(b.nbd, history, 50, random.Random(99), record=False)
        f = await _ctl(a, "promote", force=True)
        res.check(
            "forced promotion of the cut-off site",
            f.get("forced") is True,
            f"A primary at write {f['applied_seq']}, generation {f['generation']}",
        )
        await _write_through(a.nbd, history, 60, rng)
        # Link back: two primaries that changed data on their own.
        progress.show("[roles] link restored: two primaries", force=True)
        pair.restore()
        sa = await _wait(a, lambda s: "primary" in (s.get("last_error") or ""), 30)
        detected = "split brain" in (sa.get("last_error") or "")
        res.check(
            "split brain detected and refused", detected, sa.get("last_error") or "not detected"
        )
        # The operator picks the survivor: B is demoted and its changes discarded.
        progress.show("[roles] operator: demote B, discard its changes", force=True)
        await _ctl(b, "demote")
        await _ctl(b, "resolve", discard_local=True)
        sa = await _wait(
            a,
            lambda s: (
                s["connected"]
                and s["resyncs_completed"] >= 1
                and not s["resync_active"]
                and s["lag_writes"] == 0
            ),
        )
        sb = await _wait(b, lambda s: s["consistency"] == "consistent")
        res.check(
            "B rolled back by resync from A",
            sa["resyncs_completed"] >= 1 and sb["consistency"] == "consistent",
            f"decision: {(sa.get('last_decision') or {}).get('reason', '-')}",
        )
        res.writes = len(history.writes)
        res.bytes_written = res.writes * BLOCK_BYTES
        code_a, code_b = await pair.stop()
        res.check(
            "both daemons stopped cleanly",
            code_a == 0 and code_b == 0,
            f"exit codes {code_a}, {code_b}",
        )
    expected = history.image_digest(len(history.writes))
    da, db = _file_digest(pair.a.store), _file_digest(pair.b.store)
    res.check("A holds the surviving history", da == expected, f"xxh3 {da[:16]}")
    res.check("B equals A (its 50 divergent writes discarded)", db == da, f"xxh3 {db[:16]}")
    progress.done()
    return res


async def run_database(progress: Progress) -> ModeResult:
    """Fourth act: SQLite on ext4 on the replicated volume (sync mode), the
    primary site killed mid-workload, the secondary promoted; the database is
    opened there and checked. Skipped (and said so) without root, FUSE or
    loop devices."""
    from geoclus.testing.dbcrash import missing_requirements, trial

    r = ModeResult("database")
    why = missing_requirements()
    if why is not None:
        r.check("database act skipped", True, why)
        return r
    progress.show("[database] SQLite on ext4 on the replicated volume; killing the primary ...")
    t = await trial("sync", 0)
    progress.done()
    r.writes = t.acked
    r.check(
        "the database survives the loss of the primary site",
        t.clean and t.found >= t.acked > 0,
        f"{t.acked} transactions committed on site A before it was killed ({t.how}), "
        f"{t.found} in the database on promoted site B",
    )
    r.check(
        "promoted copy checks clean",
        t.clean,
        "ext4 journal replayed, e2fsck -fn clean, PRAGMA integrity_check ok, "
        "total balance invariant, log = transactions 1..m"
        if t.clean
        else "; ".join(t.problems),
    )
    return r


async def run_cluster(workdir: str, progress: Progress) -> ModeResult:
    """Fifth act: the stretched cluster. Two sites of two node daemons and a
    witness at a third site, as real processes in a private network namespace;
    every link between the sites is cut, the verdict on who kept quorum is
    checked, the link heals, and the replicated event history is shown.
    Skipped (and said so) without root."""
    from geoclus.testing.clusterlab import ClusterLab, LabError, partition_and_heal

    r = ModeResult("cluster")
    if os.geteuid() != 0:
        r.check("cluster act skipped", True, "needs root for ip netns and nft")
        return r
    lab = ClusterLab(workdir)

    def run() -> Any:
        lab.start()
        return partition_and_heal(lab, lambda s: progress.show(f"[cluster] {s} ...", force=True))

    try:
        res = await trio.to_thread.run_sync(run)
    except LabError as exc:
        progress.done()
        r.check("cluster act", False, str(exc))
        lab.close()
        return r
    lab.close()
    progress.done()
    r.cut_s = max(res.stopped_after_s.values(), default=0.0)
    worst = max(res.stopped_after_s.values(), default=float("inf"))
    r.check(
        "exactly one site keeps quorum",
        res.no_overlap and not res.losers_acting_during_cut,
        f"site {res.winner_site} kept it (the witness's vote is sticky to the active view); "
        f"site {res.loser_site} stopped before site {res.winner_site} acted in its new view",
    )
    r.check(
        "the cut-off site stopped within the bound",
        len(res.stopped_after_s) == 2 and worst <= res.stop_bound_s + 1.0,
        f"after {', '.join(f'{n} {s:.2f} s' for n, s in sorted(res.stopped_after_s.items()))}"
        f" (bound {res.stop_bound_s:.2f} s)",
    )
    r.check(
        "updates commit only with quorum",
        res.winner_update_ok and res.loser_update_refused,
        f"site {res.winner_site} committed; site {res.loser_site} could not",
    )
    r.check(
        "after healing: one view, one history",
        res.one_history and len({str(c) for c in res.configs.values()}) == 1,
        f"re-formed {res.reformed_s:.1f} s after healing; "
        f"{len(next(iter(res.histories.values()), []))} updates on every node",
    )
    r.writes = len(next(iter(res.histories.values()), []))
    interesting = ("view", "quorum", "membership", "regroup")
    r.notes = [
        f"{time.strftime('%H:%M:%S', time.localtime(e['wall_time']))} {e['origin']:<4} "
        f"{e['kind']:<8} {e['message']}"
        for e in res.events
        if e["kind"] in interesting
    ][:40]
    return r


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _report(results: list[ModeResult], delay_s: float) -> str:
    lines = [
        "",
        f"geoclus demo: two sites, mutual TLS, link {delay_s * 1e3:.2f} ms each way "
        "(emulated), 4 KiB writes at queue depth 1",
        "",
        f"{'mode':<6} {'writes':>7} {'MB':>7} {'p50 ms':>8} {'p99 ms':>8} {'rtt ms':>7} "
        f"{'largest lag':>20} {'cut s':>6}  verdict",
    ]
    for r in results:
        lag = f"{r.largest_lag_bytes / 1024:.0f} KiB/{r.largest_lag_writes} w"
        rtt = "-" if r.rtt_ms is None else f"{r.rtt_ms:.2f}"
        lines.append(
            f"{r.mode:<6} {r.writes:>7} {r.bytes_written / 1e6:>7.1f} "
            f"{_fmt_ms(r.percentile_ms(50)):>8} {_fmt_ms(r.percentile_ms(99)):>8} {rtt:>7} "
            f"{lag:>20} "
            f"{r.cut_s:>6.1f}  {'OK' if r.ok else 'FAIL'}"
        )
    lines.append("")
    for r in results:
        for name, ok, detail in r.checks:
            lines.append(f"  [{r.mode:<5}] {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    for r in results:
        if r.notes:
            lines += ["", f"{r.mode} event history (replicated; as seen from one node):"]
            lines += [f"  {n}" for n in r.notes]
    return "\n".join(lines)


async def run_demo(
    workdir: str, phase_s: float, delay_s: float, modes: tuple[str, ...]
) -> list[ModeResult]:
    progress = Progress()
    results = []
    for mode in modes:
        if mode == "database":
            results.append(await run_database(progress))
            continue
        if mode == "cluster":
            results.append(await run_cluster(os.path.join(workdir, mode), progress))
            continue
        if mode == "roles":
            results.append(
                await run_roles(os.path.join(workdir, mode), delay_s=delay_s, progress=progress)
            )
            continue
        results.append(
            await run_mode(
                mode,
                os.path.join(workdir, mode),
                phase_s=phase_s,
                delay_s=delay_s,
                progress=progress,
            )
        )
    return results


@click.command()
@click.option(
    "--phase-s",
    default=1.5,
    show_default=True,
    type=float,
    help="Seconds of writing before, during and after the link cut.",
)
@click.option(
    "--delay-ms", default=0.25, show_default=True, type=float, help="Emulated one-way link delay."
)
@click.option(
    "--mode",
    "modes",
    multiple=True,
    type=click.Choice(["sync", "async", "roles", "database", "cluster"]),
    help="Run only these acts (default: sync, async, roles, database, then cluster).",
)
@click.option("--keep", is_flag=True, help="Keep the work directory (logs, images).")
def demo(phase_s: float, delay_ms: float, modes: tuple[str, ...], keep: bool) -> None:
    """Two sites on this machine: replicate, cut the link, verify with xxh3."""
    workdir = tempfile.mkdtemp(prefix="geoclus-demo-")
    modes = modes or ("sync", "async", "roles", "database", "cluster")
    ok = False
    try:
        results = trio.run(run_demo, workdir, phase_s, delay_ms / 1e3, modes)
        click.echo(_report(results, delay_ms / 1e3))
        ok = all(r.ok for r in results)
    finally:
        if keep or not ok:
            click.echo(f"\nwork directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    click.echo("\nverdict: OK" if ok else "\nverdict: FAIL")
    if not ok:
        sys.exit(1)


__all__ = ["SitePair", "demo", "run_demo"]
