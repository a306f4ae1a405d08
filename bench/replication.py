"""Replication benchmark: fio over NBD against a reference server, our primary
alone, and primary + secondary (sync and async) through the link emulator.

Run ``.venv/bin/python -m bench.replication`` (``make bench``); ``--quick`` for a
smoke run of about a minute, ``--markdown PATH`` to also write the report as
Markdown (for ``docs/benchmarks.md``). See ``bench/README.md``.

For every configuration the same three fio jobs run one after the other on one
volume (``--ioengine=nbd``, ``--output-format=json``; no flush or FUA is sent):

* 4 KiB random write, queue depth 1;
* 4 KiB random write, queue depth 16;
* 1 MiB sequential write, queue depth 4.

Configurations:

* ``nbdkit``: ``nbdkit file`` on a sparse file of the same size (reference);
* ``alone``: our primary with no peer: one daemon, ``mode = "async"``,
  ``on_congestion = "pull-ahead"``, its peer address a port nobody listens on
  (writes complete locally; once 256 MiB of writes are retained for the
  missing peer it switches to dirty-region tracking instead of blocking);
* ``sync``/``async`` at 0 and 1 ms added round trip: primary and secondary as
  real processes, mutual TLS (the product default), the link emulator (in this
  process) between them with half the round trip as one-way delay.

For each pair configuration the emulated round trip itself is measured with 500
ping-pongs of 64 bytes through an echo server behind its own link emulator with
the same delay, and the replication link's own ``rtt_p50_ms`` (keepalive
ping/pong, from ``geoclus volume status``) is reported as well.

Everything (daemons, nbdkit, fio, temporary files) is cleaned up on exit,
including Ctrl-C. The targets are printed, not asserted; the exit status is 1
only if a configuration or a fio job failed.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click
import trio

from geoclus.linkemu import LinkEmulator, LinkEmulatorConfig, LinkSettings
from geoclus.testing.sitepair import SiteOptions, SitePair, running_pair
from replicator.units import format_size, parse_size

EXPORT = "demo"
ECHO_PINGS = 500
ECHO_WARMUP = 20
ECHO_BYTES = 64
# Bound on the wait for an async secondary to catch up between two jobs.
SETTLE_TIMEOUT_S = 120.0
# fio gets this long beyond its own runtime before it is killed.
FIO_GRACE_S = 60.0
NBDKIT_START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Job:
    key: str
    label: str
    rw: str
    bs: str
    iodepth: int
    # Bytes of the volume the job touches (None: all of it). The sequential job
    # stays within 256 MiB so that two copies on this one machine fit in the
    # page cache below the kernel's writeback threshold, as the single copy of
    # the "alone" and nbdkit runs does; otherwise it would compare dirty-page
    # throttling against page-cache speed.
    region_bytes: int | None = None


JOBS = (
    Job("4k-qd1", "4k randwrite qd1", "randwrite", "4k", 1),
    Job("4k-qd16", "4k randwrite qd16", "randwrite", "4k", 16),
    Job("1m-qd4", "1M seq write qd4", "write", "1M", 4, 256 * 1024 * 1024),
)


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    kind: str  # "ref", "alone", "sync" or "async"
    rtt_ms: float | None = None


CONFIGS = (
    Config("nbdkit", "nbdkit", "ref"),
    Config("alone", "alone", "alone"),
    Config("sync-0ms", "sync 0ms", "sync", 0.0),
    Config("async-0ms", "async 0ms", "async", 0.0),
    Config("sync-1ms", "sync 1ms", "sync", 1.0),
    Config("async-1ms", "async 1ms", "async", 1.0),
)
CONFIG_KEYS = tuple(c.key for c in CONFIGS)


@dataclass(frozen=True)
class Settings:
    runtime_s: float
    ramp_s: float
    size_bytes: int
    keep: bool


@dataclass
class JobResult:
    iops: float = math.nan
    bw_bytes: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    error: str | None = None

    @property
    def mbps(self) -> float:
        return self.bw_bytes / 1e6


@dataclass
class ConfigResult:
    config: Config
    jobs: dict[str, JobResult] = field(default_factory=dict)
    echo_rtt_p50_ms: float | None = None
    echo_rtt_p99_ms: float | None = None
    link_rtt_p50_ms: float | None = None
    link_rtt_qd1_ms: float | None = None
    daemon_write_p50_qd1_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def job(self, key: str) -> JobResult | None:
        r = self.jobs.get(key)
        return None if r is None or r.error else r


def say(text: str, nl: bool = True) -> None:
    click.echo(text, nl=nl)
    sys.stdout.flush()


# ------------------------------------------------------------------------ fio


def _fio_seconds(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def parse_fio_json(text: str) -> JobResult:
    """The write side of the single job in fio's JSON output."""
    # Engines may print a line before the JSON when it goes to stdout.
    start = text.find("{")
    if start < 0:
        return JobResult(error="fio wrote no JSON")
    try:
        data = json.loads(text[start:])
        job = data["jobs"][0]
        write = job["write"]
    except (ValueError, KeyError, IndexError) as exc:
        return JobResult(error=f"unreadable fio JSON: {exc}")
    if job.get("error"):
        return JobResult(error=f"fio job error {job['error']}")
    if not write.get("total_ios"):
        return JobResult(error="fio completed no writes")
    pct = write.get("clat_ns", {}).get("percentile", {})

    def ms(key: str) -> float:
        value = pct.get(key)
        return math.nan if value is None else value / 1e6

    return JobResult(
        iops=float(write["iops"]),
        bw_bytes=float(write["bw_bytes"]),
        p50_ms=ms("50.000000"),
        p99_ms=ms("99.000000"),
    )


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


async def run_fio(job: Job, socket_path: str, workdir: str, s: Settings) -> JobResult:
    out = os.path.join(workdir, f"fio-{job.key}.json")
    cmd = [
        "fio",
        f"--name={job.key}",
        "--ioengine=nbd",
        f"--uri=nbd+unix:///{EXPORT}?socket={socket_path}",
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        f"--size={min(s.size_bytes, job.region_bytes or s.size_bytes)}",
        "--time_based",
        f"--runtime={_fio_seconds(s.runtime_s)}",
        f"--ramp_time={_fio_seconds(s.ramp_s)}",
        "--percentile_list=50:99",
        "--output-format=json",
        f"--output={out}",
    ]
    proc: subprocess.CompletedProcess[bytes] | None = None
    with trio.move_on_after(s.runtime_s + s.ramp_s + FIO_GRACE_S):
        proc = await trio.run_process(
            cmd, stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False
        )
    if proc is None:
        return JobResult(error="fio did not finish in time (killed)")
    result = parse_fio_json(_read_text(out))
    if proc.returncode != 0:
        lines = (proc.stderr + proc.stdout).decode(errors="replace").strip().splitlines()
        detail = lines[-1] if lines else "no message"
        result = JobResult(error=f"fio exit {proc.returncode}: {detail}")
    return result


# ------------------------------------------------------------------ echo RTT


async def _echo(stream: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)


async def measure_echo_rtt(delay_s: float, pings: int = ECHO_PINGS) -> tuple[float, float]:
    """p50 and p99 (ms) of 64-byte ping-pongs through an emulated link of
    ``delay_s`` each way to an echo server on 127.0.0.1."""
    samples: list[float] = []
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        echo_port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, _echo, listeners)
        link = LinkEmulator(
            LinkEmulatorConfig(
                target_host="127.0.0.1",
                target_port=echo_port,
                settings=LinkSettings(delay_s),
                seed=1,
            )
        )
        link_port = await nursery.start(link.serve)
        stream = await trio.open_tcp_stream("127.0.0.1", link_port)
        async with stream:
            payload = b"x" * ECHO_BYTES
            for i in range(ECHO_WARMUP + pings):
                t0 = time.perf_counter()
                await stream.send_all(payload)
                got = 0
                while got < ECHO_BYTES:
                    data = await stream.receive_some(ECHO_BYTES - got)
                    if not data:
                        raise OSError("echo connection closed")
                    got += len(data)
                if i >= ECHO_WARMUP:
                    samples.append(time.perf_counter() - t0)
        nursery.cancel_scope.cancel()
    samples.sort()
    return _pct(samples, 50) * 1e3, _pct(samples, 99) * 1e3


def _pct(ordered: list[float], p: float) -> float:
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# -------------------------------------------------------------- configurations


async def run_jobs(
    res: ConfigResult,
    socket_path: str,
    workdir: str,
    s: Settings,
    after_job: Callable[[Job], Any] | None = None,
) -> None:
    for job in JOBS:
        say(f"[{res.config.label}] {job.label} ...", nl=False)
        r = await run_fio(job, socket_path, workdir, s)
        res.jobs[job.key] = r
        if r.error:
            say(f" ERROR: {r.error}")
        else:
            say(
                f" {r.iops:,.0f} IOPS, {r.mbps:.1f} MB/s, "
                f"p50 {r.p50_ms:.3f} ms, p99 {r.p99_ms:.3f} ms"
            )
        if after_job is not None:
            await after_job(job)


async def _wait_for_socket(path: str, proc: trio.Process, timeout_s: float) -> None:
    with trio.move_on_after(timeout_s):
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"nbdkit exited at start (code {proc.returncode})")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(path)
                    return
                except OSError:
                    pass
            await trio.sleep(0.05)
    raise RuntimeError(f"nbdkit did not listen on {path} within {timeout_s} s")


def _sparse_file(path: str, size_bytes: int) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)


async def run_reference(res: ConfigResult, workdir: str, s: Settings) -> None:
    store = os.path.join(workdir, "ref.img")
    sock = os.path.join(workdir, "ref.nbd")
    _sparse_file(store, s.size_bytes)
    log = os.open(os.path.join(workdir, "nbdkit.log"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        # No --exit-with-parent: that is PR_SET_PDEATHSIG, which fires when
        # the *thread* that started nbdkit exits, and trio starts processes
        # from worker threads that end when idle (nbdkit died mid-run). The
        # finally below stops it.
        proc = await trio.lowlevel.open_process(
            ["nbdkit", "--foreground", "--unix", sock, "file", store],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    finally:
        os.close(log)
    try:
        await _wait_for_socket(sock, proc, NBDKIT_START_TIMEOUT_S)
        res.notes.append("nbdkit file plugin, default threads, sparse file")
        await run_jobs(res, sock, workdir, s)
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def _status(pair: SitePair) -> dict[str, Any]:
    return await trio.to_thread.run_sync(pair.a.status)


async def _settle(pair: SitePair, res: ConfigResult, job: Job) -> None:
    """Wait until the secondary has every write (async) before the next job."""
    t0 = time.monotonic()
    st = await _status(pair)
    if not st["connected"]:
        res.notes.append(f"peer disconnected after {job.key}: {st.get('last_error')}")
    with trio.move_on_after(SETTLE_TIMEOUT_S):
        while st["lag_writes"] or st["in_flight_writes"]:
            await trio.sleep(0.05)
            st = await _status(pair)
    waited = time.monotonic() - t0
    if st["lag_writes"]:
        res.notes.append(f"after {job.key}: lag did not drain in {SETTLE_TIMEOUT_S:.0f} s")
    elif waited >= 0.5:
        res.notes.append(f"after {job.key}: secondary caught up in {waited:.1f} s")


async def run_ours(res: ConfigResult, workdir: str, s: Settings) -> None:
    cfg = res.config
    common: dict[str, Any] = {
        "size": str(s.size_bytes),
        # The product's default timers, not SiteOptions' fast test timers.
        "keepalive_interval_s": 0.5,
        "peer_timeout_s": 5.0,
    }
    if cfg.kind == "alone":
        opts = SiteOptions(mode="async", on_congestion="pull-ahead", with_secondary=False, **common)
    else:
        assert cfg.rtt_ms is not None
        opts = SiteOptions(mode=cfg.kind, one_way_delay_s=cfg.rtt_ms / 2e3, **common)
    async with running_pair(workdir, opts) as pair:

        async def after_job(job: Job) -> None:
            if job.key == JOBS[0].key:
                # The daemon's own view right after the QD1 job (its ring of
                # recent writes holds only that job's writes).
                st = await _status(pair)
                res.daemon_write_p50_qd1_ms = st.get("write_latency_p50_ms")
                res.link_rtt_qd1_ms = st.get("rtt_p50_ms")
            if cfg.kind != "alone":
                await _settle(pair, res, job)

        if cfg.kind == "alone":
            res.notes.append(
                "one daemon: async, on_congestion=pull-ahead, peer port unreachable, mutual TLS"
            )
        else:
            p50, p99 = await measure_echo_rtt(opts.one_way_delay_s)
            res.echo_rtt_p50_ms, res.echo_rtt_p99_ms = p50, p99
            say(f"[{cfg.label}] emulated link echo rtt p50 {p50:.3f} ms, p99 {p99:.3f} ms")
        await run_jobs(res, pair.a.nbd, workdir, s, after_job)
        st = await _status(pair)
        res.link_rtt_p50_ms = st.get("rtt_p50_ms")
        if cfg.kind == "async":
            res.notes.append(f"largest async lag {format_size(st['max_lag_bytes_seen'])}")
        if cfg.kind == "alone" and st.get("peer_outdated"):
            res.notes.append(
                "switched to dirty-region tracking after "
                f"{format_size(parse_size(opts.max_lag_bytes))} retained"
            )
        code_a, code_b = await pair.stop()
        if code_a not in (0, None) or code_b not in (0, None):
            res.notes.append(f"daemon exit codes {code_a}, {code_b}")


async def run_config(cfg: Config, root: str, s: Settings) -> ConfigResult:
    res = ConfigResult(cfg)
    workdir = os.path.join(root, cfg.key)
    os.makedirs(workdir)
    t0 = time.monotonic()
    try:
        if cfg.kind == "ref":
            await run_reference(res, workdir, s)
        else:
            await run_ours(res, workdir, s)
    except Exception as exc:  # one broken configuration must not hide the others
        res.error = f"{type(exc).__name__}: {exc}".strip()
        say(f"[{cfg.label}] FAILED: {res.error}")
        s_keep = True
    else:
        s_keep = s.keep
    finally:
        res.seconds = time.monotonic() - t0
    if not s_keep:
        # The images are up to the volume size each; free the space as we go.
        shutil.rmtree(workdir, ignore_errors=True)
    return res


async def run_all(configs: list[Config], root: str, s: Settings) -> list[ConfigResult]:
    return [await run_config(cfg, root, s) for cfg in configs]


# ----------------------------------------------------------------- reporting


def _cmd_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def tree_state() -> str:
    """HEAD plus a digest of the uncommitted changes to tracked files (read-only)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, timeout=10, check=False
        ).stdout
        diff = subprocess.run(
            ["git", "-C", repo, "diff", "HEAD"], capture_output=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return hashlib.sha256(head + b"\0" + diff).hexdigest()


def machine_info() -> list[tuple[str, str]]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = _cmd_version(["git", "-C", repo, "rev-parse", "--short", "HEAD"])
    dirty = _cmd_version(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"])
    if dirty not in ("unknown", "not found"):
        commit += " (with uncommitted changes)"
    return [
        ("CPU", cpu),
        ("cores", str(os.cpu_count())),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("trio", trio.__version__),
        ("fio", _cmd_version(["fio", "--version"])),
        ("nbdkit", _cmd_version(["nbdkit", "--version"])),
        ("geoclus commit", commit),
        ("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def _f(value: float | None, fmt: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    return format(value, fmt)


@dataclass
class Ratio:
    name: str
    value: float | None
    detail: str
    target: str | None  # e.g. "<= 1.25"; None = for information
    ok: bool | None

    @property
    def mark(self) -> str:
        if self.target is None:
            return "info"
        if self.ok is None:
            return "n/a"
        return "PASS" if self.ok else "MISS"


def compute_ratios(results: list[ConfigResult]) -> list[Ratio]:
    by = {r.config.key: r for r in results}

    def job(cfg: str, key: str) -> JobResult | None:
        r = by.get(cfg)
        return None if r is None else r.job(key)

    def check(value: float | None, target: str | None) -> bool | None:
        if value is None or target is None or math.isnan(value):
            return None
        op, bound = target.split()
        return value <= float(bound) if op == "<=" else value >= float(bound)

    out: list[Ratio] = []
    alone1 = job("alone", "4k-qd1")
    for ms, target in ((1, "<= 1.25"), (0, None)):
        sync = job(f"sync-{ms}ms", "4k-qd1")
        rtt = by[f"sync-{ms}ms"].echo_rtt_p50_ms if f"sync-{ms}ms" in by else None
        value = detail = None
        if sync and alone1 and rtt is not None:
            value = sync.p50_ms / (alone1.p50_ms + rtt)
            detail = f"{sync.p50_ms:.3f} / ({alone1.p50_ms:.3f} + {rtt:.3f})"
        out.append(
            Ratio(
                f"sync p50 / (alone p50 + rtt), 4k qd1, {ms} ms",
                value,
                detail or "-",
                target,
                check(value, target),
            )
        )
    for ms in (0, 1):
        a = job(f"async-{ms}ms", "4k-qd1")
        value = None if not (a and alone1) else a.p50_ms / alone1.p50_ms
        detail = f"{a.p50_ms:.3f} / {alone1.p50_ms:.3f}" if a and alone1 else "-"
        out.append(
            Ratio(
                f"async p50 / alone p50, 4k qd1, {ms} ms",
                value,
                detail,
                "<= 1.2",
                check(value, "<= 1.2"),
            )
        )
    sync_seq, alone_seq = job("sync-0ms", "1m-qd4"), job("alone", "1m-qd4")
    value = None if not (sync_seq and alone_seq) else sync_seq.mbps / alone_seq.mbps
    detail = f"{sync_seq.mbps:.1f} / {alone_seq.mbps:.1f}" if sync_seq and alone_seq else "-"
    out.append(
        Ratio(
            "sync MB/s / alone MB/s, 1M seq, 0 ms", value, detail, ">= 0.6", check(value, ">= 0.6")
        )
    )
    for key, metric in (("4k-qd1", "IOPS"), ("4k-qd16", "IOPS"), ("1m-qd4", "MB/s")):
        ours, ref = job("alone", key), job("nbdkit", key)
        value = None
        detail = "-"
        if ours and ref:
            if metric == "IOPS":
                value, detail = ours.iops / ref.iops, f"{ours.iops:,.0f} / {ref.iops:,.0f}"
            else:
                value, detail = ours.mbps / ref.mbps, f"{ours.mbps:.1f} / {ref.mbps:.1f}"
        label = next(j.label for j in JOBS if j.key == key)
        out.append(Ratio(f"alone / nbdkit {metric}, {label}", value, detail, None, None))
    return out


def _method_lines(s: Settings) -> list[str]:
    return [
        f"fio --ioengine=nbd over a Unix socket, {_fio_seconds(s.ramp_s)} ramp + "
        f"{_fio_seconds(s.runtime_s)} measured per job, volume {format_size(s.size_bytes)} "
        "(sparse files); 4k jobs over the whole volume, the 1M job over its first 256 MiB "
        "(two copies on one machine must stay below the kernel's dirty-page writeback "
        "threshold to compare page cache with page cache); no flush/FUA; latency = fio clat.",
        "alone: one daemon, role primary, mode async, on_congestion pull-ahead, peer address "
        "a port nobody listens on: writes complete locally (the first 256 MiB are retained "
        "for the missing peer, then it switches to dirty-region tracking).",
        "sync/async: primary and secondary daemons, mutual TLS, link emulator in the "
        "benchmark process (one-way delay = rtt/2); async waits for the secondary to catch "
        "up between jobs.",
        "echo rtt: 500 ping-pongs of 64 B from Python through its own link emulator with the "
        "same delay (p50/p99). link rtt: the primary's rtt_p50_ms (keepalive ping/pong every "
        "0.5 s, recent samples) after the qd1 job and at the end (pings queue behind data "
        "under load). daemon write p50 qd1: the primary's own write_latency_p50_ms after the "
        "qd1 job (inside the daemon, without fio and the NBD socket).",
        "Everything (fio, daemons, emulator, nbdkit) shares this machine's cores; other "
        "work on the machine (see the load average) adds noise.",
    ]


LINK_COLUMNS = (
    "config",
    "echo rtt p50/p99 ms",
    "link rtt p50 ms qd1/end",
    "daemon write p50 qd1",
    "notes",
)


def _link_rows(results: list[ConfigResult]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for r in results:
        echo = (
            "-"
            if r.echo_rtt_p50_ms is None
            else f"{r.echo_rtt_p50_ms:.3f} / {_f(r.echo_rtt_p99_ms, '.3f')}"
        )
        link = (
            "-"
            if r.link_rtt_qd1_ms is None and r.link_rtt_p50_ms is None
            else f"{_f(r.link_rtt_qd1_ms, '.3f')} / {_f(r.link_rtt_p50_ms, '.3f')}"
        )
        write = _f(r.daemon_write_p50_qd1_ms, ".3f")
        rows.append((r.config.label, echo, link, write, "; ".join(r.notes) or "-"))
    return rows


def text_report(
    results: list[ConfigResult], s: Settings, machine: list[tuple[str, str]], when: str
) -> str:
    lines = ["", f"geoclus replication benchmark ({when})", ""]
    lines.append(f"{'config':<10} {'job':<18} {'IOPS':>9} {'MB/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    lines.append("-" * 66)
    for r in results:
        if r.error and not r.jobs:
            lines.append(f"{r.config.label:<10} FAILED: {r.error}")
            continue
        for job in JOBS:
            j = r.jobs.get(job.key)
            if j is None:
                lines.append(f"{r.config.label:<10} {job.label:<18} {'not run':>9}")
            elif j.error:
                lines.append(f"{r.config.label:<10} {job.label:<18} ERROR: {j.error}")
            else:
                lines.append(
                    f"{r.config.label:<10} {job.label:<18} {j.iops:>9,.0f} {j.mbps:>8.1f} "
                    f"{j.p50_ms:>8.3f} {j.p99_ms:>8.3f}"
                )
        if r.error:
            lines.append(f"{r.config.label:<10} FAILED: {r.error}")
    head = LINK_COLUMNS
    lines += ["", f"{head[0]:<10} {head[1]:>20} {head[2]:>23} {head[3]:>20}  {head[4]}"]
    lines.append("-" * 80)
    for row in _link_rows(results):
        lines.append(f"{row[0]:<10} {row[1]:>20} {row[2]:>23} {row[3]:>20}  {row[4]}")
    lines += ["", f"{'ratio':<44} {'value':>7} {'target':>8}  mark  detail"]
    lines.append("-" * 66)
    for q in compute_ratios(results):
        lines.append(
            f"{q.name:<44} {_f(q.value, '.2f'):>7} {q.target or '-':>8}  {q.mark:<4}  {q.detail}"
        )
    lines += ["", "method:"] + [f"  - {m}" for m in _method_lines(s)]
    lines += ["", "machine:"] + [f"  {k:<22} {v}" for k, v in machine]
    return "\n".join(lines)


def markdown_report(
    results: list[ConfigResult],
    s: Settings,
    machine: list[tuple[str, str]],
    when: str,
    argv: list[str],
) -> str:
    md = [
        "## Replication benchmark",
        "",
        f"Run {when} with `{shlex.join(['python', '-m', 'bench.replication', *argv])}`.",
        "",
        "| config | job | IOPS | MB/s | p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        for job in JOBS:
            j = r.jobs.get(job.key)
            if j is None:
                md.append(f"| {r.config.label} | {job.label} | not run | | | |")
            elif j.error:
                md.append(f"| {r.config.label} | {job.label} | error: {j.error} | | | |")
            else:
                md.append(
                    f"| {r.config.label} | {job.label} | {j.iops:,.0f} | {j.mbps:.1f} | "
                    f"{j.p50_ms:.3f} | {j.p99_ms:.3f} |"
                )
        if r.error:
            md.append(f"| {r.config.label} | failed: {r.error} | | | | |")
    md += ["", "| " + " | ".join(LINK_COLUMNS) + " |", "|---|---:|---:|---:|---|"]
    md += ["| " + " | ".join(row) + " |" for row in _link_rows(results)]
    md += ["", "| ratio | value | target | | detail |", "|---|---:|---:|---|---|"]
    for q in compute_ratios(results):
        md.append(
            f"| {q.name} | {_f(q.value, '.2f')} | {q.target or '-'} | {q.mark} | {q.detail} |"
        )
    md += ["", "Method:", ""] + [f"- {m}" for m in _method_lines(s)]
    md += ["", "Machine:", ""] + [f"- {k}: {v}" for k, v in machine]
    return "\n".join(md) + "\n"


# ----------------------------------------------------------------------- CLI


def _is_interrupt(exc: BaseException) -> bool:
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(KeyboardInterrupt)[0] is not None
    return False


@click.command()
@click.option(
    "--runtime-s",
    type=click.FloatRange(min=0.5),
    default=None,
    help="Measured seconds per fio job [default: 5; 2 with --quick].",
)
@click.option(
    "--ramp-s",
    type=click.FloatRange(min=0),
    default=None,
    help="fio ramp time per job, not measured [default: 1; 0.5 with --quick].",
)
@click.option("--size", "size_text", default="1GiB", show_default=True, help="Volume size.")
@click.option("--quick", is_flag=True, help="Short smoke run (about a minute).")
@click.option(
    "--config",
    "only",
    multiple=True,
    type=click.Choice(CONFIG_KEYS),
    help="Run only these configurations (repeatable; default all).",
)
@click.option(
    "--markdown",
    "markdown_path",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write the report as Markdown to this file.",
)
@click.option("--keep", is_flag=True, help="Keep the work directory (logs, fio JSON, images).")
def main(
    runtime_s: float | None,
    ramp_s: float | None,
    size_text: str,
    quick: bool,
    only: tuple[str, ...],
    markdown_path: str | None,
    keep: bool,
) -> None:
    """Replication benchmark: fio over NBD, nbdkit vs our volume alone, sync and async."""
    try:
        size_bytes = parse_size(size_text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--size") from None
    if size_bytes < 16 * 1024 * 1024 or size_bytes % (1024 * 1024):
        raise click.BadParameter(
            "must be a multiple of 1 MiB, at least 16 MiB", param_hint="--size"
        )
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            raise click.ClickException(f"{tool} is not installed (make debs)")
    s = Settings(
        runtime_s=runtime_s if runtime_s is not None else (2.0 if quick else 5.0),
        ramp_s=ramp_s if ramp_s is not None else (0.5 if quick else 1.0),
        size_bytes=size_bytes,
        keep=keep,
    )
    configs = [c for c in CONFIGS if not only or c.key in only]
    machine = machine_info()
    tree_at_start = tree_state()
    started = datetime.datetime.now(datetime.UTC)
    root = tempfile.mkdtemp(prefix="geoclus-bench-")
    say(
        f"geoclus replication benchmark: {len(configs)} configurations x {len(JOBS)} jobs, "
        f"{s.ramp_s:g} s ramp + {s.runtime_s:g} s each, volume {format_size(s.size_bytes)}"
    )
    results: list[ConfigResult] = []
    interrupted = False
    try:
        results = trio.run(run_all, configs, root, s)
    except BaseException as exc:
        # trio delivers Ctrl-C as KeyboardInterrupt, possibly inside a group.
        if not _is_interrupt(exc):
            raise
        interrupted = True
    finally:
        if keep or any(r.error for r in results):
            say(f"work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if interrupted:
        say("\ninterrupted: processes stopped" + ("" if keep else ", files removed"))
        sys.exit(130)
    elapsed = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
    if tree_state() != tree_at_start:
        machine.append(
            ("note", "the source tree changed during the run (daemons started later ran it)")
        )
    when = f"started {started:%Y-%m-%d %H:%M} UTC, took {elapsed / 60:.1f} min"
    say(text_report(results, s, machine, when))
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(markdown_report(results, s, machine, when, sys.argv[1:]))
        say(f"\nMarkdown written to {markdown_path}")
    if any(r.error or any(j.error for j in r.jobs.values()) for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
