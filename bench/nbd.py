"""NBD data-path benchmark: fio's ``nbd`` engine against ``nbdkit file`` and our
export, alone and replicating, with a py-spy profile of our daemon.

Run ``.venv/bin/python -m bench.nbd``; ``--quick`` for a smoke run (3 s per
job), ``--markdown PATH`` to write the report as a Markdown section,
``--plots DIR`` for the PNG charts (default ``bench/plots``).

Targets (each on a fresh 1 GiB store file in one temporary directory, so on one
filesystem):

* ``nbdkit``: ``nbdkit --foreground --unix SOCKET file FILE`` (default threads),
  the reference NBD server;
* ``alone``: our primary with no reachable peer: one daemon, ``mode = "async"``,
  ``on_congestion = "pull-ahead"``, mutual TLS configured, its peer address a
  port nobody listens on. The fill below overflows the retained log (256 MiB),
  so the peer is outdated and every region already dirty when the measured jobs
  start: they measure NBD -> sequencing -> store, with no replication, no log
  retention and no bitmap write-ahead. (``mode = "sync"`` with
  ``on_peer_loss = "continue"`` takes the same path once the peer is outdated:
  a disconnected peer is not required, see ``PrimaryCore._required``; target
  ``alone-sync``, run only when named, measures it.)
* ``sync-0ms``/``sync-1ms``, ``async-0ms``/``async-1ms``: primary and secondary
  daemons (real processes, mutual TLS) joined through the link emulator (in this
  process) with 0 ms or 1 ms added round trip (half each way).

Per target, first a fill: fio writes the whole volume sequentially (1 MiB,
QD4) so that every later read hits written data and every write overwrites
allocated blocks, on every target alike. Then six time-based fio jobs, one after
the other: 4 KiB random write at QD1, QD16 and QD64, 4 KiB random read at QD16,
1 MiB sequential write and read at QD4. Between jobs the page cache is written
back (``sync``) and, in async mode, the bench waits for the secondary to catch
up, so no job pays for the previous one's backlog.

After the measured jobs of ``alone`` one more 4 KiB random write QD16 job runs
with ``py-spy record`` attached to the daemon (not part of the table); its
samples are aggregated by function (self and total) and by module.

Every process (nbdkit, daemons, link emulator, fio, py-spy) is stopped on exit,
including on Ctrl-C or a failure. Targets are printed, not asserted; the exit
status is 1 only if a target or a fio job failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import click
import trio

from bench.replication import machine_info, measure_echo_rtt, say, tree_state
from geoclus.testing.sitepair import SiteOptions, SitePair, running_pair
from replicator.units import format_size, parse_size

EXPORT = "demo"
# fio gets this long beyond its own runtime before it is killed.
FIO_GRACE_S = 60.0
# The fill writes the whole volume; through a slow replication link this bounds it.
FILL_TIMEOUT_S = 300.0
NBDKIT_START_TIMEOUT_S = 10.0
# How long fio may take to stop after SIGINT before its group is killed.
FIO_STOP_TIMEOUT_S = 3.0
# Bound on the wait for an async secondary to catch up between two jobs.
SETTLE_TIMEOUT_S = 120.0
# Interval of the /proc scan for other processes' CPU (a scan costs a few ms).
FOREIGN_SAMPLE_S = 1.0
# py-spy samples per second (its default); blocking mode, so stacks are exact.
PROFILE_RATE_HZ = 100
PROFILE_TOP = 15
DEFAULT_PLOTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots")


@dataclass(frozen=True)
class Job:
    key: str
    label: str
    rw: str
    bs: str
    iodepth: int
    # Bytes of the volume the job touches (None: all of it). The 1 MiB jobs
    # stay in the first 256 MiB, as in bench/replication.py: two copies on this
    # one machine then stay far below the kernel's dirty-page writeback
    # threshold, so page cache is compared with page cache.
    region_bytes: int | None = None

    @property
    def side(self) -> str:
        """The section of fio's JSON that holds this job's numbers."""
        return "read" if "read" in self.rw else "write"


SEQ_REGION_BYTES = 256 * 1024 * 1024
JOBS = (
    Job("4k-w-qd1", "4k randwrite qd1", "randwrite", "4k", 1),
    Job("4k-w-qd16", "4k randwrite qd16", "randwrite", "4k", 16),
    Job("4k-w-qd64", "4k randwrite qd64", "randwrite", "4k", 64),
    Job("4k-r-qd16", "4k randread qd16", "randread", "4k", 16),
    Job("1m-w-qd4", "1M seq write qd4", "write", "1M", 4, SEQ_REGION_BYTES),
    Job("1m-r-qd4", "1M seq read qd4", "read", "1M", 4, SEQ_REGION_BYTES),
)
JOB_BY_KEY = {j.key: j for j in JOBS}
FILL = Job("fill", "fill (1M seq write qd4, whole volume)", "write", "1M", 4)
PROFILE_JOB = JOB_BY_KEY["4k-w-qd16"]


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    kind: str  # "ref", "alone", "sync" or "async"
    rtt_ms: float | None = None
    # For "alone": the primary's mode ("sync" runs with on_peer_loss = "continue").
    alone_mode: str = "async"
    # Run without --target (the others only when named).
    default: bool = True


TARGETS = (
    Target("nbdkit", "nbdkit", "ref"),
    Target("alone", "alone", "alone"),
    Target("alone-sync", "alone sync", "alone", alone_mode="sync", default=False),
    Target("sync-0ms", "sync 0ms", "sync", 0.0),
    Target("async-0ms", "async 0ms", "async", 0.0),
    Target("sync-1ms", "sync 1ms", "sync", 1.0),
    Target("async-1ms", "async 1ms", "async", 1.0),
)
TARGET_KEYS = tuple(t.key for t in TARGETS)


@dataclass(frozen=True)
class Settings:
    runtime_s: float
    ramp_s: float
    size_bytes: int
    keep: bool
    profile: bool
    # Directory put first on the daemons' PYTHONPATH (None: this tree).
    daemon_source: str | None = None


@dataclass
class JobResult:
    iops: float = math.nan
    bw_bytes: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    p999_ms: float = math.nan
    seconds: float = math.nan
    # CPU used by the serving processes over the whole fio run (ramp
    # included), in cores: the primary (or nbdkit), and the secondary.
    cpu_cores: float = math.nan
    peer_cpu_cores: float = math.nan
    error: str | None = None

    @property
    def mbps(self) -> float:
        return self.bw_bytes / 1e6

    @property
    def cpu_us_per_io(self) -> float:
        """Server CPU time per I/O (primary or nbdkit), microseconds."""
        return self.cpu_cores / self.iops * 1e6 if self.iops else math.nan


@dataclass
class ThreadProfile:
    """One daemon thread during the profile window."""

    tid: int
    name: str
    samples: int = 0  # py-spy samples, waits included (see _WAIT_FRAMES)
    wait_samples: int = 0  # of which the thread was waiting for work
    cpu_s: float = math.nan  # CPU seconds from /proc (user + system)
    # Seconds the thread was runnable but waited for a core (/proc schedstat).
    runq_s: float = math.nan


@dataclass
class Aggregate:
    """py-spy stacks of one group of threads, aggregated (counts are samples)."""

    samples: int = 0  # excluding waits
    wait_samples: int = 0
    self_by_func: Counter[str] = field(default_factory=Counter)
    self_by_line: Counter[str] = field(default_factory=Counter)
    self_by_module: Counter[str] = field(default_factory=Counter)
    total_by_func: Counter[str] = field(default_factory=Counter)


@dataclass
class Profile:
    """py-spy samples of the daemon during one fio job, per thread group."""

    window_s: float
    rate_hz: int
    fio: JobResult
    threads: list[ThreadProfile]
    main: Aggregate  # the trio thread
    workers: Aggregate  # every other thread (the store's blocking workers)
    machine_busy_pct: float = math.nan
    fio_cpu_cores: float = math.nan
    raw_path: str | None = None


@dataclass
class TargetResult:
    target: Target
    jobs: dict[str, JobResult] = field(default_factory=dict)
    fill: JobResult | None = None
    echo_rtt_p50_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    profile: Profile | None = None
    profile_error: str | None = None
    error: str | None = None
    seconds: float = 0.0
    load_1min: float = math.nan
    # CPU seconds used by processes that are not this benchmark's, and the
    # machine's busy CPU seconds, over the target's wall time (from /proc/stat
    # and getrusage): a measure of outside noise.
    foreign_cpu_s: float = math.nan
    foreign_top: str = ""  # the busiest of those processes

    def job(self, key: str) -> JobResult | None:
        r = self.jobs.get(key)
        return None if r is None or r.error else r


# ------------------------------------------------------------------- helpers


def _fio_seconds(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _busy_jiffies() -> int:
    """Non-idle CPU time of the whole machine, in clock ticks."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]
    return sum(fields[:8]) - fields[3] - fields[4]


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """Every process: pid -> (parent pid, user + system ticks, command name)."""
    out: dict[int, tuple[int, int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        text = _read_text(f"/proc/{entry}/stat")
        with contextlib.suppress(ValueError, IndexError):
            head, rest = text.rsplit(")", 1)
            fields = rest.split()
            out[int(entry)] = (
                int(fields[1]),
                int(fields[11]) + int(fields[12]),
                head[head.find("(") + 1 :],
            )
    return out


class ForeignCpu:
    """CPU used by user processes that are not this benchmark's (nor kernel
    threads), sampled from /proc every ``FOREIGN_SAMPLE_S``: other work on the
    machine, i.e. noise. A process that starts and ends between two samples is
    missed; one that started since the last sample counts from its start."""

    def __init__(self) -> None:
        self.ticks: Counter[str] = Counter()
        self._last: dict[int, int] = {}
        self._sampled = False
        self._me = os.getpid()

    def sample(self) -> None:
        table = _proc_table()
        ours: set[int] = set()
        for pid in table:
            chain: list[int] = []
            q = pid
            while q and q not in ours and q != self._me and len(chain) < 64:
                chain.append(q)
                q = table[q][0] if q in table else 0
            if q == self._me or q in ours:
                ours.update(chain)
        seen = {}
        for pid, (ppid, ticks, name) in table.items():
            if pid in ours or pid == self._me or pid == 2 or ppid == 2:
                continue
            seen[pid] = ticks
            if self._sampled:
                self.ticks[name] += ticks - self._last.get(pid, 0)
        self._last = seen
        self._sampled = True

    async def run(self) -> None:
        while True:
            await trio.to_thread.run_sync(self.sample)
            await trio.sleep(FOREIGN_SAMPLE_S)


def parse_fio_json(text: str, side: str) -> JobResult:
    """The ``side`` ("read" or "write") of the single job in fio's JSON output."""
    start = text.find("{")  # an engine may print a line before the JSON
    if start < 0:
        return JobResult(error="fio wrote no JSON")
    try:
        job = json.loads(text[start:])["jobs"][0]
        part = job[side]
    except (ValueError, KeyError, IndexError) as exc:
        return JobResult(error=f"unreadable fio JSON: {exc}")
    if job.get("error"):
        return JobResult(error=f"fio job error {job['error']}")
    if not part.get("total_ios"):
        return JobResult(error=f"fio completed no {side}s")
    pct = part.get("clat_ns", {}).get("percentile", {})

    def ms(key: str) -> float:
        value = pct.get(key)
        return math.nan if value is None else value / 1e6

    return JobResult(
        iops=float(part["iops"]),
        bw_bytes=float(part["bw_bytes"]),
        p50_ms=ms("50.000000"),
        p99_ms=ms("99.000000"),
        p999_ms=ms("99.900000"),
        seconds=float(part.get("runtime", 0)) / 1e3,
    )


async def run_fio(
    job: Job, socket_path: str, workdir: str, s: Settings, *, timed: bool = True
) -> JobResult:
    """Run one fio job against the export on ``socket_path``; never raises for
    a failed job (the result carries the error)."""
    out = os.path.join(workdir, f"fio-{job.key}-{time.monotonic_ns()}.json")
    size = min(s.size_bytes, job.region_bytes or s.size_bytes)
    cmd = [
        "fio",
        f"--name={job.key}",
        "--ioengine=nbd",
        f"--uri=nbd+unix:///{EXPORT}?socket={socket_path}",
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        f"--size={size}",
        "--percentile_list=50:99:99.9",
        "--output-format=json",
        f"--output={out}",
    ]
    if timed:
        cmd += [
            "--time_based",
            f"--runtime={_fio_seconds(s.runtime_s)}",
            f"--ramp_time={_fio_seconds(s.ramp_s)}",
        ]
        limit_s = s.runtime_s + s.ramp_s + FIO_GRACE_S
    else:
        limit_s = FILL_TIMEOUT_S
    proc: subprocess.CompletedProcess[bytes] | None = None
    t0 = time.monotonic()
    with trio.move_on_after(limit_s):
        proc = await trio.run_process(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            # fio forks its job processes: its own process group, so that a
            # cancellation stops them all.
            start_new_session=True,
            deliver_cancel=_stop_group,
        )
    if proc is None:
        return JobResult(error=f"fio did not finish in {limit_s:.0f} s (killed)")
    result = parse_fio_json(_read_text(out), job.side)
    if proc.returncode != 0:
        lines = (proc.stderr + proc.stdout).decode(errors="replace").strip().splitlines()
        detail = lines[-1] if lines else "no message"
        result = JobResult(error=f"fio exit {proc.returncode}: {detail}")
    if not timed and result.error is None:
        result.seconds = time.monotonic() - t0
    return result


async def _stop_group(proc: trio.Process) -> None:
    """Cancel a process that leads its own group: SIGINT (fio stops its jobs
    and exits), then SIGKILL to the whole group after a bound."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with trio.move_on_after(FIO_STOP_TIMEOUT_S):
        await proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _writeback() -> None:
    """Write the page cache back so the next job starts from clean pages."""
    await trio.to_thread.run_sync(os.sync)


def _show(tag: str, job: Job, r: JobResult) -> None:
    if r.error:
        say(f"[{tag}] {job.label}: ERROR: {r.error}")
    else:
        say(
            f"[{tag}] {job.label}: {r.iops:,.0f} IOPS, {r.mbps:.1f} MB/s, p50 {r.p50_ms:.3f} ms, "
            f"p99 {r.p99_ms:.3f} ms, p99.9 {r.p999_ms:.3f} ms"
        )


# ------------------------------------------------------------------- profile


_FRAME_LINE = re.compile(r"^(.*) (\d+)$")
_THREAD = re.compile(r"^thread \((\d+)\): ?(.*)$")
_LINENO = re.compile(r":\d+\)$")
# Frames that only carry the process's start-up (click, runpy, threading) or
# the scheduler's loop: on nearly every stack, so useless in a "total" list.
_BOILERPLATE = (
    "(<frozen runpy>)",
    "(click/",
    "(geoclus/__main__.py)",
    "(geoclus/cli.py)",
    "(threading.py)",
    "run (trio/_core/_run.py)",
    "unrolled_run (trio/_core/_run.py)",
)


# Leaf frames that are waits, not work. py-spy's idle detection does not see
# them under blocking sampling (the threads are stopped when it looks): the
# event loop waiting in epoll_wait, and a store worker waiting on its queue
# (``self._queue.get()``, the only call in ``BlockingWorkers._run`` itself;
# the work runs in deeper frames). epoll_wait with ready events is real work
# counted here as waiting too; the CPU column from /proc is the ground truth.
_WAIT_FRAMES = (
    "EpollIOManager.get_events (trio/_core/_io_epoll.py)",
    "BlockingWorkers._run (replicator/worker.py)",
)


def _module_of(frame: str) -> str:
    """``"func (pkg/mod.py)"`` -> ``"pkg/mod.py"``."""
    open_at = frame.rfind(" (")
    return frame[open_at + 2 : -1] if open_at >= 0 and frame.endswith(")") else frame


def aggregate_profile(text: str, main_names: Sequence[str] = ("MainThread",)) -> dict[str, Any]:
    """Aggregate py-spy ``record --format raw --threads`` output: per thread
    (samples) and per group (the trio thread named in ``main_names``, and all
    others)."""
    threads: dict[int, ThreadProfile] = {}
    main, workers = Aggregate(), Aggregate()
    for line in text.splitlines():
        m = _FRAME_LINE.match(line.strip())
        if not m:
            continue
        stack, count = m.group(1), int(m.group(2))
        frames = stack.split(";")
        tm = _THREAD.match(frames[0]) if frames else None
        tid, name = (int(tm.group(1)), tm.group(2) or "?") if tm else (0, "?")
        if tm:
            # The name is the first frame after the thread id when py-spy knows it.
            frames = frames[1:]
            if frames and " (" not in frames[0]:
                name, frames = frames[0], frames[1:]
        if not frames:
            continue
        th = threads.setdefault(tid, ThreadProfile(tid, name))
        th.samples += count
        agg = main if name in main_names else workers
        leaf = frames[-1]
        func = _LINENO.sub(")", leaf)
        if func in _WAIT_FRAMES:
            th.wait_samples += count
            agg.wait_samples += count
            continue
        agg.samples += count
        agg.self_by_line[leaf] += count
        agg.self_by_func[func] += count
        agg.self_by_module[_module_of(func)] += count
        for frame in {_LINENO.sub(")", f) for f in frames}:
            if not any(b in frame for b in _BOILERPLATE):
                agg.total_by_func[frame] += count
    return {"threads": list(threads.values()), "main": main, "workers": workers}


def _thread_cpu(pid: int) -> dict[int, tuple[int, int]]:
    """Per thread of ``pid``: (user + system clock ticks, run-queue wait in ns)."""
    out: dict[int, tuple[int, int]] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ValueError, IndexError):
                fields = _read_text(f"/proc/{pid}/task/{tid}/stat").rsplit(")", 1)[1].split()
                sched = _read_text(f"/proc/{pid}/task/{tid}/schedstat").split()
                out[int(tid)] = (int(fields[11]) + int(fields[12]), int(sched[1]))
    return out


def _descendants(pid: int, comm: str) -> list[int]:
    """Processes named ``comm`` below ``pid`` in the process tree."""
    parent: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            text = _read_text(f"/proc/{entry}/stat")
            with contextlib.suppress(ValueError, IndexError):
                head, rest = text.rsplit(")", 1)
                names[int(entry)] = head.split("(", 1)[1]
                parent[int(entry)] = int(rest.split()[1])
    found = []
    for p, name in names.items():
        if name != comm:
            continue
        q = parent.get(p)
        while q:
            if q == pid:
                found.append(p)
                break
            q = parent.get(q)
    return found


async def profile_daemon(
    pid: int, socket_path: str, workdir: str, s: Settings
) -> tuple[Profile | None, str | None]:
    """Run PROFILE_JOB with py-spy sampling the daemon ``pid`` during fio's
    measured window; return the aggregate (or an error)."""
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.access(py_spy, os.X_OK):
        return None, "py-spy not found (pip install py-spy)"
    raw = os.path.join(workdir, "profile.raw")
    duration_s = max(1, int(s.runtime_s) - 1)
    spy: subprocess.CompletedProcess[bytes] | None = None
    fio: JobResult | None = None
    cpu0: dict[int, tuple[int, int]] = {}
    cpu1: dict[int, tuple[int, int]] = {}
    window_s = math.nan
    busy_pct = fio_cores = math.nan

    async def sample() -> None:
        nonlocal spy, cpu0, cpu1, window_s, busy_pct, fio_cores
        await trio.sleep(s.ramp_s + 0.5)
        cmd = [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(duration_s),
            "--rate",
            str(PROFILE_RATE_HZ),
            "--format",
            "raw",
            "--threads",
            "--output",
            raw,
        ]
        fios = _descendants(os.getpid(), "fio")
        fio0 = [_process_cpu_ticks(p) for p in fios]
        cpu0, busy0, t0 = _thread_cpu(pid), _busy_jiffies(), time.monotonic()
        with trio.move_on_after(duration_s + 30):
            spy = await trio.run_process(
                cmd, stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False
            )
        cpu1, busy1, window_s = _thread_cpu(pid), _busy_jiffies(), time.monotonic() - t0
        fio1 = [_process_cpu_ticks(p) for p in fios]
        tick = os.sysconf("SC_CLK_TCK")
        busy_pct = (busy1 - busy0) / tick / window_s / (os.cpu_count() or 1) * 100
        if fios and None not in fio0 and None not in fio1:
            fio_cores = (sum(fio1) - sum(fio0)) / tick / window_s  # type: ignore[arg-type]

    async def load() -> None:
        nonlocal fio
        fio = await run_fio(PROFILE_JOB, socket_path, workdir, s)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        nursery.start_soon(load)
    assert fio is not None
    if spy is None:
        return None, "py-spy did not finish (killed)"
    if spy.returncode != 0:
        lines = (spy.stderr + spy.stdout).decode(errors="replace").strip().splitlines()
        return None, f"py-spy exit {spy.returncode}: {lines[-1] if lines else 'no message'}"
    agg = aggregate_profile(_read_text(raw))
    if not agg["main"].samples and not agg["workers"].samples:
        return None, "py-spy recorded no samples"
    tick = os.sysconf("SC_CLK_TCK")
    threads: list[ThreadProfile] = agg["threads"]
    known = {t.tid for t in threads}
    for tid in cpu1:
        if tid not in known and tid in cpu0 and cpu1[tid][0] > cpu0[tid][0]:
            threads.append(ThreadProfile(tid, "(not sampled)"))
    for t in threads:
        if t.tid in cpu0 and t.tid in cpu1:
            t.cpu_s = (cpu1[t.tid][0] - cpu0[t.tid][0]) / tick
            t.runq_s = (cpu1[t.tid][1] - cpu0[t.tid][1]) / 1e9
    threads.sort(key=lambda t: (t.name != "MainThread", t.name))
    return (
        Profile(
            window_s=window_s,
            rate_hz=PROFILE_RATE_HZ,
            fio=fio,
            threads=threads,
            main=agg["main"],
            workers=agg["workers"],
            machine_busy_pct=busy_pct,
            fio_cpu_cores=fio_cores,
            raw_path=raw,
        ),
        None,
    )


# ------------------------------------------------------------------- targets


def _process_cpu_ticks(pid: int) -> int | None:
    """User + system clock ticks of process ``pid`` (all its threads)."""
    try:
        fields = _read_text(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (IndexError, ValueError):
        return None


async def run_measured(
    job: Job, socket_path: str, workdir: str, s: Settings, pids: Sequence[int]
) -> JobResult:
    """:func:`run_fio`, plus the CPU the server processes ``pids`` used meanwhile."""
    before = [_process_cpu_ticks(pid) for pid in pids]
    t0 = time.monotonic()
    r = await run_fio(job, socket_path, workdir, s)
    wall_s = time.monotonic() - t0
    after = [_process_cpu_ticks(pid) for pid in pids]
    tick = os.sysconf("SC_CLK_TCK")
    cores = [
        math.nan if b is None or a is None else (a - b) / tick / wall_s
        for b, a in zip(before, after)
    ]
    if cores:
        r.cpu_cores = cores[0]
    if len(cores) > 1:
        r.peer_cpu_cores = cores[1]
    return r


async def run_jobs(
    res: TargetResult,
    socket_path: str,
    workdir: str,
    s: Settings,
    pair: SitePair | None,
    pids: Sequence[int],
) -> None:
    tag = res.target.label
    say(f"[{tag}] filling the volume ({format_size(s.size_bytes)}) ...")
    res.fill = await run_fio(FILL, socket_path, workdir, s, timed=False)
    if res.fill.error:
        raise RuntimeError(f"fill failed: {res.fill.error}")
    say(f"[{tag}] fill: {res.fill.mbps:.0f} MB/s in {res.fill.seconds:.1f} s")
    await _between(res, pair, FILL)
    for job in JOBS:
        r = await run_measured(job, socket_path, workdir, s, pids)
        res.jobs[job.key] = r
        _show(tag, job, r)
        await _between(res, pair, job)


async def _between(res: TargetResult, pair: SitePair | None, job: Job) -> None:
    if pair is not None and res.target.kind == "async" and job.side == "write":
        await _settle(pair, res, job)
    await _writeback()


async def _wait_for_socket(path: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    with trio.move_on_after(timeout_s):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nbdkit exited at start (code {proc.returncode})")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(path)
                    return
                except OSError:
                    pass
            await trio.sleep(0.05)
    raise RuntimeError(f"nbdkit did not listen on {path} within {timeout_s} s")


async def _stop_popen(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after a bound; reap."""
    if proc.poll() is None:
        proc.terminate()
        try:
            await trio.to_thread.run_sync(proc.wait, 5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            await trio.to_thread.run_sync(proc.wait)


def _start_nbdkit(sock: str, store: str, log_path: str) -> subprocess.Popen[bytes]:
    """Start ``nbdkit file`` on ``store``, listening on ``sock``.

    Blocking (a fork and exec), and called from the event loop's thread on
    purpose: ``--exit-with-parent`` is PR_SET_PDEATHSIG, which fires when the
    *thread* that forked exits, and ``trio.lowlevel.open_process`` forks from a
    worker thread that ends when idle (nbdkit then died in the middle of a job).
    """
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            ["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock, "file", store],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def run_reference(res: TargetResult, workdir: str, s: Settings) -> None:
    store = os.path.join(workdir, "ref.img")
    sock = os.path.join(workdir, "ref.nbd")
    log_path = os.path.join(workdir, "nbdkit.log")
    fd = os.open(store, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, s.size_bytes)  # sparse, as our store starts; the fill allocates it
    finally:
        os.close(fd)
    proc = _start_nbdkit(sock, store, log_path)
    try:
        await _wait_for_socket(sock, proc, NBDKIT_START_TIMEOUT_S)
        await run_jobs(res, sock, workdir, s, None, [proc.pid])
        if proc.poll() is not None:
            tail = _read_text(log_path).strip().splitlines()[-3:]
            raise RuntimeError(f"nbdkit exited (code {proc.returncode}): {' / '.join(tail)}")
    finally:
        with trio.CancelScope(shield=True):
            await _stop_popen(proc)


async def _status(pair: SitePair) -> dict[str, Any]:
    return await trio.to_thread.run_sync(pair.a.status)


async def _settle(pair: SitePair, res: TargetResult, job: Job) -> None:
    """Wait until the async secondary has every write before the next job."""
    t0 = time.monotonic()
    st = await _status(pair)
    if not st["connected"]:
        res.notes.append(f"peer disconnected after {job.key}: {st.get('last_error')}")
    with trio.move_on_after(SETTLE_TIMEOUT_S):
        while st["lag_writes"] or st["in_flight_writes"]:
            await trio.sleep(0.05)
            st = await _status(pair)
    if st["lag_writes"]:
        res.notes.append(f"after {job.key}: lag did not drain in {SETTLE_TIMEOUT_S:.0f} s")
    elif (waited := time.monotonic() - t0) >= 0.5:
        res.notes.append(f"after {job.key}: secondary caught up in {waited:.1f} s")


async def run_ours(res: TargetResult, workdir: str, s: Settings) -> None:
    t = res.target
    env = {}
    if s.daemon_source:
        env["PYTHONPATH"] = os.pathsep.join(
            x for x in (s.daemon_source, os.environ.get("PYTHONPATH")) if x
        )
    common: dict[str, Any] = {
        "extra_env": env,
        "size": str(s.size_bytes),
        # The product's default timers, not SiteOptions' fast test timers.
        "keepalive_interval_s": 0.5,
        "peer_timeout_s": 5.0,
    }
    if t.kind == "alone" and t.alone_mode == "sync":
        opts = SiteOptions(mode="sync", on_peer_loss="continue", with_secondary=False, **common)
    elif t.kind == "alone":
        opts = SiteOptions(mode="async", on_congestion="pull-ahead", with_secondary=False, **common)
    else:
        assert t.rtt_ms is not None
        opts = SiteOptions(mode=t.kind, one_way_delay_s=t.rtt_ms / 2e3, **common)
    async with running_pair(workdir, opts) as pair:
        if t.kind != "alone":
            p50, _ = await measure_echo_rtt(opts.one_way_delay_s)
            res.echo_rtt_p50_ms = p50
            say(f"[{t.label}] emulated link echo rtt p50 {p50:.3f} ms")
        pids = [site.process.pid for site in (pair.a, pair.b) if site.process is not None]
        await run_jobs(res, pair.a.nbd, workdir, s, pair, pids)
        st = await _status(pair)
        if t.kind == "alone":
            res.notes.append(
                "peer outdated (no log retained)"
                if st.get("peer_outdated")
                else "peer NOT outdated: writes were retained for the peer"
            )
        elif not st["connected"]:
            res.notes.append(f"peer not connected at the end: {st.get('last_error')}")
        if t.key == "alone" and s.profile:
            assert pair.a.process is not None
            say(f"[{t.label}] profiling the daemon during {PROFILE_JOB.label} (py-spy) ...")
            res.profile, res.profile_error = await profile_daemon(
                pair.a.process.pid, pair.a.nbd, workdir, s
            )
            if res.profile_error:
                say(f"[{t.label}] profile: ERROR: {res.profile_error}")
            else:
                assert res.profile is not None
                _show(t.label + " under py-spy", PROFILE_JOB, res.profile.fio)
        code_a, code_b = await pair.stop()
        if code_a not in (0, None) or code_b not in (0, None):
            res.notes.append(f"daemon exit codes {code_a}, {code_b}")


async def run_target(t: Target, root: str, s: Settings, profile_dir: str | None) -> TargetResult:
    res = TargetResult(t)
    workdir = os.path.join(root, t.key)
    os.makedirs(workdir)
    res.load_1min = os.getloadavg()[0]
    foreign = ForeignCpu()
    t0 = time.monotonic()
    keep = s.keep
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(foreign.run)
            if t.kind == "ref":
                await run_reference(res, workdir, s)
            else:
                await run_ours(res, workdir, s)
            nursery.cancel_scope.cancel()
    except Exception as exc:  # one broken target must not hide the others
        res.error = _describe(exc)
        say(f"[{t.label}] FAILED: {res.error}")
        keep = True
    finally:
        res.seconds = time.monotonic() - t0
        with contextlib.suppress(OSError):
            foreign.sample()
        tick = os.sysconf("SC_CLK_TCK")
        res.foreign_cpu_s = sum(foreign.ticks.values()) / tick
        top = [f"{name} {n / tick:.0f} s" for name, n in foreign.ticks.most_common(2) if n >= tick]
        res.foreign_top = ", ".join(top)
    if res.profile is not None and res.profile.raw_path and profile_dir:
        os.makedirs(profile_dir, exist_ok=True)
        dest = os.path.join(profile_dir, "nbd_profile_alone_4k_qd16.collapsed")
        shutil.copyfile(res.profile.raw_path, dest)
        res.profile.raw_path = dest
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)  # the images are 1 GiB or more each
    return res


def _describe(exc: BaseException) -> str:
    """The innermost exceptions of ``exc`` (trio wraps them in groups), one line."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


class Terminated(Exception):
    """SIGTERM or SIGHUP arrived: stop everything like Ctrl-C does."""


async def _watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            raise Terminated(signal.Signals(signum).name)


async def run_all(
    targets: Sequence[Target], root: str, s: Settings, profile_dir: str | None
) -> list[TargetResult]:
    results = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals)
        for t in targets:
            results.append(await run_target(t, root, s, profile_dir))
        nursery.cancel_scope.cancel()
    return results


# ----------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    name: str
    value: float | None
    op: str  # "<=" or ">="
    bound: float
    detail: str

    @property
    def met(self) -> bool | None:
        if self.value is None or math.isnan(self.value):
            return None
        return self.value <= self.bound if self.op == "<=" else self.value >= self.bound

    @property
    def mark(self) -> str:
        return {True: "met", False: "MISSED", None: "n/a"}[self.met]

    @property
    def margin(self) -> str:
        v, b = self.value, self.bound
        if self.met is None or v is None:
            return "-"
        if self.op == ">=":
            if self.met:
                return f"{v / b:.2f}x the bound ({(v / b - 1) * 100:.0f} % to spare)"
            return f"{(1 - v / b) * 100:.0f} % short: needs {b / v:.2f}x more"
        if self.met:
            return f"{(1 - v / b) * 100:.0f} % under the bound"
        return f"{(v / b - 1) * 100:.0f} % over: latency must fall {v / b:.2f}x"


def compute_verdicts(results: Sequence[TargetResult]) -> list[Verdict]:
    by = {r.target.key: r for r in results}

    def job(target: str, key: str) -> JobResult | None:
        r = by.get(target)
        return None if r is None else r.job(key)

    out: list[Verdict] = []
    specs = (
        ("4k randwrite qd1 p50 latency", "4k-w-qd1", "p50", "<=", 1.5),
        ("4k randwrite qd16 IOPS", "4k-w-qd16", "iops", ">=", 0.3),
        ("4k randread qd16 IOPS", "4k-r-qd16", "iops", ">=", 0.3),
        ("1M seq write MB/s", "1m-w-qd4", "mbps", ">=", 0.8),
        ("1M seq read MB/s", "1m-r-qd4", "mbps", ">=", 0.8),
    )
    for name, key, metric, op, bound in specs:
        ours, ref = job("alone", key), job("nbdkit", key)
        value: float | None = None
        detail = "-"
        if ours and ref:
            if metric == "p50":
                value = ours.p50_ms / ref.p50_ms
                detail = f"{ours.p50_ms:.3f} ms / {ref.p50_ms:.3f} ms"
            elif metric == "iops":
                value = ours.iops / ref.iops
                detail = f"{ours.iops:,.0f} / {ref.iops:,.0f} IOPS"
            else:
                value = ours.mbps / ref.mbps
                detail = f"{ours.mbps:,.0f} / {ref.mbps:,.0f} MB/s"
        out.append(Verdict(f"alone / nbdkit, {name}", value, op, bound, detail))
    return out


# ----------------------------------------------------------------- reporting


def _f(value: float | None, fmt: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    return format(value, fmt)


COLUMNS = (
    "target",
    "job",
    "IOPS",
    "MB/s",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "IOPS / nbdkit",
    "p50 / nbdkit",
    "server CPU",
    "CPU us/IO",
)


def table_rows(results: Sequence[TargetResult]) -> list[tuple[str, ...]]:
    ref = next((r for r in results if r.target.kind == "ref"), None)
    rows: list[tuple[str, ...]] = []
    for r in results:
        if r.error and not r.jobs:
            rows.append((r.target.label, f"FAILED: {r.error}", *[""] * 9))
            continue
        for job in JOBS:
            j = r.jobs.get(job.key)
            if j is None or j.error:
                msg = "not run" if j is None else f"error: {j.error}"
                rows.append((r.target.label, job.label, msg, *[""] * 8))
                continue
            base = ref.job(job.key) if ref is not None else None
            iops_ratio = p50_ratio = "-"
            if base is not None and r is not ref:
                iops_ratio = f"{j.iops / base.iops:.2f}x"
                p50_ratio = f"{j.p50_ms / base.p50_ms:.2f}x"
            cpu = _f(j.cpu_cores, ".2f")
            if not math.isnan(j.peer_cpu_cores):
                cpu += f" + {j.peer_cpu_cores:.2f}"
            rows.append(
                (
                    r.target.label,
                    job.label,
                    f"{j.iops:,.0f}",
                    f"{j.mbps:,.1f}",
                    f"{j.p50_ms:.3f}",
                    f"{j.p99_ms:.3f}",
                    f"{j.p999_ms:.3f}",
                    iops_ratio,
                    p50_ratio,
                    cpu,
                    _f(j.cpu_us_per_io, ".0f"),
                )
            )
        if r.error:
            rows.append((r.target.label, f"FAILED: {r.error}", *[""] * 9))
    return rows


def notes_rows(results: Sequence[TargetResult], s: Settings) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for r in results:
        fill = "-"
        if r.fill is not None and not r.fill.error:
            fill = f"{r.fill.mbps:,.0f} MB/s"
        wall_cpu = r.seconds * (os.cpu_count() or 1)
        foreign = "-"
        if not math.isnan(r.foreign_cpu_s) and wall_cpu > 0:
            foreign = f"{r.foreign_cpu_s / wall_cpu * 100:.0f} %"
            if r.foreign_top:
                foreign += f" ({r.foreign_top})"
        rows.append(
            (
                r.target.label,
                fill,
                _f(r.echo_rtt_p50_ms, ".3f"),
                f"{r.load_1min:.2f}",
                foreign,
                "; ".join(r.notes) or "-",
            )
        )
    return rows


NOTES_COLUMNS = (
    "target",
    "fill",
    "echo rtt p50 ms",
    "load at start",
    "other CPU",
    "notes",
)


def _pct(n: int, d: int) -> str:
    return f"{n / d * 100:.1f} %" if d else "-"


def _short(frame: str) -> str:
    return frame.replace("site-packages/", "")


def profile_lines(p: Profile, md: bool, link_base: str | None = None) -> list[str]:
    """The profile as report lines; ``link_base``: make the stacks' path
    relative to this directory."""
    expected = p.window_s * p.rate_hz
    m, w = p.main, p.workers
    out = [
        f"`py-spy record --rate {p.rate_hz} --threads --format raw` (blocking sampling) on the "
        f"`alone` daemon for {p.window_s:.1f} s of an extra {PROFILE_JOB.label} job run after "
        f"the measured ones ({p.fio.iops:,.0f} IOPS under the profiler). In that window the "
        f"machine's {os.cpu_count()} cores were {p.machine_busy_pct:.0f} % busy; fio used "
        f"{_f(p.fio_cpu_cores, '.2f')} cores. Per daemon thread: CPU (user + system) and "
        "run-queue wait (runnable, waiting for a core) from /proc, as a share of the window; "
        "py-spy samples, of which waits (the event loop in epoll_wait, a store worker on its "
        "queue), which py-spy's idle filter does not drop under blocking sampling.",
        "",
    ]
    rows: list[tuple[str, ...]] = [
        ("thread", "CPU", "CPU us/IO", "run-queue wait", "samples", "of which waits")
    ]
    ios = p.fio.iops * p.window_s
    for t in p.threads:
        cpu = "-" if math.isnan(t.cpu_s) else f"{t.cpu_s / p.window_s * 100:.0f} %"
        per_io = "-" if math.isnan(t.cpu_s) or not ios else f"{t.cpu_s / ios * 1e6:.0f}"
        rq = "-" if math.isnan(t.runq_s) else f"{t.runq_s / p.window_s * 100:.0f} %"
        rows.append((t.name, cpu, per_io, rq, str(t.samples), str(t.wait_samples)))
    total_cpu = sum(t.cpu_s for t in p.threads if not math.isnan(t.cpu_s))
    if ios:
        rows.append(
            (
                "all threads",
                f"{total_cpu / p.window_s * 100:.0f} %",
                f"{total_cpu / ios * 1e6:.0f}",
                "",
                str(sum(t.samples for t in p.threads)),
                str(sum(t.wait_samples for t in p.threads)),
            )
        )
    out += _table(rows, md)

    def ranked(title: str, counter: Counter[str], of: int, label: str, n: int) -> None:
        nonlocal out
        out += ["", f"{title} (% of {of} samples, waits excluded):", ""]
        body = [(_short(k), _pct(v, of)) for k, v in counter.most_common(n)]
        out += _table([(label, "share"), *body], md)

    ranked("Trio thread, self time by module", m.self_by_module, m.samples, "module", 12)
    ranked("Trio thread, self time by function", m.self_by_func, m.samples, "function", PROFILE_TOP)
    ranked(
        "Trio thread, total time by function (start-up and scheduler-loop frames left out)",
        m.total_by_func,
        m.samples,
        "function",
        PROFILE_TOP,
    )
    if w.samples:
        ranked("Store worker threads, self time by line", w.self_by_line, w.samples, "line", 8)
    if p.raw_path:
        path = os.path.relpath(p.raw_path, link_base) if link_base else p.raw_path
        out += [
            "",
            f"Collapsed stacks with line numbers (speedscope.app or flamegraph.pl): `{path}`"
            f" ({expected:.0f} samples expected per thread).",
        ]
    return out


# Columns of text (left-aligned); all others hold numbers (right-aligned).
_TEXT_COLUMNS = frozenset(
    (
        "target",
        "job",
        "thread",
        "module",
        "function",
        "line",
        "verdict",
        "margin",
        "detail",
        "notes",
    )
)


def _table(rows: Sequence[Sequence[str]], md: bool) -> list[str]:
    """``rows[0]`` is the header; Markdown or aligned plain text."""
    head, *body = rows
    left = [h in _TEXT_COLUMNS for h in head]
    if md:
        align = "|" + "|".join("---" if lf else "---:" for lf in left) + "|"
        return ["| " + " | ".join(head) + " |", align] + [
            "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body
        ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for k, row in enumerate(rows):
        cells = [c.ljust(widths[i]) if left[i] else c.rjust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("-" * len(lines[-1]))
    return lines


def method_lines(s: Settings) -> list[str]:
    return [
        f"fio {_cmd_version(['fio', '--version'])} `--ioengine=nbd` over a Unix socket, "
        f"`--output-format=json`, time-based: {_fio_seconds(s.ramp_s)} ramp + "
        f"{_fio_seconds(s.runtime_s)} measured per job, one job at a time; volume "
        f"{format_size(s.size_bytes)}; 4 KiB jobs over the whole volume, 1 MiB jobs over its "
        "first 256 MiB; no flush or FUA is sent; latencies are fio's completion latency "
        "(clat) percentiles.",
        "Every target's volume is first filled (1 MiB sequential writes over all of it), so "
        "reads hit written data and writes overwrite allocated blocks; the page cache is "
        "written back (`sync`) after the fill and after every job; reads are served from the "
        "page cache on every target.",
        "nbdkit: `nbdkit --foreground --unix SOCKET file FILE` (default threads) on a file in "
        "the same directory (same filesystem) as our stores.",
        'alone: one daemon, role primary, `mode = "async"`, `on_congestion = "pull-ahead"`, '
        "mutual TLS configured, peer address a port nobody listens on. The 1 GiB fill "
        "overflows the 256 MiB retained log, so the peer is outdated and every region dirty "
        "before the measured jobs: they measure NBD + sequencing + store without replication. "
        '(`mode = "sync"` with `on_peer_loss = "continue"` takes the same path once the '
        "peer is outdated.)",
        "sync/async: primary and secondary daemons, mutual TLS, link emulator in the "
        "benchmark process (one-way delay = rtt/2); in async mode the bench waits for the "
        "secondary to catch up after each write job.",
        "echo rtt: 500 ping-pongs of 64 B through an emulator with the same delay. load: the "
        "1-minute load average when the target started (this benchmark's own processes "
        "included). other CPU: CPU time of user processes that are not this benchmark's "
        "(sampled from /proc every second; kernel threads such as writeback left out), as a "
        "share of all cores over the target's wall time, with the busiest of them: noise.",
        "server CPU: cores used by the serving processes (user + system time from /proc over "
        "the whole fio run, ramp included): nbdkit or our primary, `+` the secondary; the "
        "link emulator's share is not counted. CPU us/IO: the first of these per I/O.",
        "fio, the daemons, the link emulator and nbdkit share the machine's cores.",
    ]


def _cmd_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def machine_summary(machine: list[tuple[str, str]]) -> str:
    info = dict(machine)
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / 2**20:.0f} GiB"
    kernel = info.get("kernel", "?")
    kernel_short = ".".join(kernel.split()[-1].split(".")[:2]) if kernel != "?" else "?"
    return (
        f"{info.get('cores', '?')} cores ({info.get('CPU', '?')}, virtualised), {mem}, "
        f"Linux {kernel_short}, {info.get('Python', '?')}, trio {info.get('trio', '?')}, "
        f"{info.get('fio', '?')}, {info.get('nbdkit', '?')}"
    )


def verdict_rows(results: Sequence[TargetResult]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("target", "value", "bound", "verdict", "margin", "detail")]
    for v in compute_verdicts(results):
        value = "-" if v.met is None else f"{v.value:.2f}x"
        rows.append((v.name, value, f"{v.op} {v.bound:g}x", v.mark, v.margin, v.detail))
    return rows


def text_report(
    results: Sequence[TargetResult], s: Settings, machine: list[tuple[str, str]], when: str
) -> str:
    lines = ["", f"geoclus NBD benchmark ({when})", ""]
    lines += _table([COLUMNS, *table_rows(results)], md=False)
    lines += [""]
    lines += _table([NOTES_COLUMNS, *notes_rows(results, s)], md=False)
    lines += ["", "targets for alone vs nbdkit:", ""]
    lines += _table(
        verdict_rows(results),
        md=False,
    )
    for r in results:
        if r.profile is not None:
            lines += ["", "where the time goes (alone, 4k randwrite qd16):", ""]
            lines += ["  " + x for x in profile_lines(r.profile, md=False)]
        if r.profile_error:
            lines += ["", f"profile: {r.profile_error}"]
    lines += ["", "method:"] + [f"  - {m}" for m in method_lines(s)]
    lines += ["", "machine:"] + [f"  {k:<22} {v}" for k, v in machine]
    return "\n".join(lines)


def markdown_report(
    results: Sequence[TargetResult],
    s: Settings,
    machine: list[tuple[str, str]],
    when: str,
    argv: list[str],
    plots: list[str],
    md_path: str,
) -> str:
    md = [
        "## NBD data path (`bench/nbd.py`)",
        "",
        f"Run {when} with `{shlex.join(['python', '-m', 'bench.nbd', *argv])}`.",
        "",
        f"Machine: {machine_summary(machine)}. Everything runs on this one machine.",
        "",
        "Targets: `nbdkit` (`nbdkit file`, the reference); `alone` (our primary with no "
        "reachable peer: async, pull-ahead, peer outdated, so no replication); `sync`/`async` "
        "(primary + secondary through the link emulator at 0 and 1 ms added round trip, "
        "mutual TLS). Ratios are ours / nbdkit for the same job.",
        "",
    ]
    md += _table([COLUMNS, *table_rows(results)], md=True)
    md += [""]
    md += _table([NOTES_COLUMNS, *notes_rows(results, s)], md=True)
    md += ["", "### Targets: `alone` against `nbdkit`", ""]
    md += _table(
        verdict_rows(results),
        md=True,
    )
    base = os.path.dirname(os.path.abspath(md_path))
    if plots:
        md += ["", "### Plots", ""]
        for path in plots:
            rel = os.path.relpath(path, base)
            md.append(f"![{os.path.basename(path)}]({rel})")
            md.append("")
    for r in results:
        if r.profile is not None:
            md += ["", "### Where the time goes (`alone`, 4 KiB random write QD16)", ""]
            md += profile_lines(r.profile, md=True, link_base=base)
        if r.profile_error:
            md += ["", f"Profile: not taken ({r.profile_error})."]
    md += ["", "### Method", ""] + [f"- {m}" for m in method_lines(s)]
    md += ["", "Machine details:", ""] + [f"- {k}: {v}" for k, v in machine]
    return "\n".join(md) + "\n"


# --------------------------------------------------------------------- plots


def make_plots(results: Sequence[TargetResult], out_dir: str) -> list[str]:
    """Grouped bar charts (IOPS and p99 per job, one bar per target) as PNG.
    Returns the written paths; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    shown = [r for r in results if r.jobs]
    written = []
    for metric, ylabel, fname, title in (
        ("iops", "IOPS (log scale)", "nbd_iops.png", "IOPS per job and target"),
        (
            "p99_ms",
            "p99 completion latency, ms (log scale)",
            "nbd_p99.png",
            "p99 latency per job and target",
        ),
    ):
        fig, ax = plt.subplots(figsize=(11, 5.5))
        n = max(1, len(shown))
        width = 0.8 / n
        for i, r in enumerate(shown):
            xs, ys = [], []
            for k, job in enumerate(JOBS):
                j = r.job(job.key)
                if j is not None:
                    xs.append(k - 0.4 + width * (i + 0.5))
                    ys.append(getattr(j, metric))
            ax.bar(xs, ys, width, label=r.target.label)
        ax.set_xticks(range(len(JOBS)), [j.label for j in JOBS], rotation=15)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(f"geoclus NBD benchmark: {title}")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(ncol=3, fontsize="small")
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------- CLI


def export_commit(rev: str, dest: str) -> str:
    """Extract ``rev`` of this repository into ``dest``; return its short hash."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sha = subprocess.run(
        ["git", "-C", repo, "rev-parse", "--short", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    os.makedirs(dest)
    archive = subprocess.run(
        ["git", "-C", repo, "archive", "--format=tar", sha],
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return sha


def _is_interrupt(exc: BaseException) -> bool:
    if isinstance(exc, KeyboardInterrupt | Terminated):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.split((KeyboardInterrupt, Terminated))[0] is not None
    return False


@click.command()
@click.option(
    "--runtime-s",
    type=click.FloatRange(min=1),
    default=None,
    help="Measured seconds per fio job [default: 10; 3 with --quick].",
)
@click.option(
    "--ramp-s",
    type=click.FloatRange(min=0),
    default=None,
    help="fio ramp time per job, not measured [default: 1; 0.5 with --quick].",
)
@click.option("--size", "size_text", default="1GiB", show_default=True, help="Volume size.")
@click.option("--quick", is_flag=True, help="Smoke run (3 s per job, about 3 minutes).")
@click.option(
    "--target",
    "only",
    multiple=True,
    type=click.Choice(TARGET_KEYS),
    help="Run only these targets (repeatable; default all but alone-sync: the primary "
    "alone in sync mode with on_peer_loss = continue).",
)
@click.option(
    "--markdown",
    "markdown_path",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write the report as a Markdown section to this file.",
)
@click.option(
    "--plots",
    "plots_dir",
    type=click.Path(file_okay=False),
    default=DEFAULT_PLOTS_DIR,
    show_default=True,
    help="Directory for the PNG charts and the collapsed profile.",
)
@click.option("--no-plots", is_flag=True, help="Do not draw charts.")
@click.option("--no-profile", is_flag=True, help="Do not run the py-spy profile of alone.")
@click.option(
    "--daemon-commit",
    default=None,
    help="Run the daemons from this commit (exported with git archive into the work "
    "directory, first on their PYTHONPATH) instead of the working tree, e.g. HEAD while "
    "the tree is being edited.",
)
@click.option("--keep", is_flag=True, help="Keep the work directory (logs, fio JSON, images).")
def main(
    runtime_s: float | None,
    ramp_s: float | None,
    size_text: str,
    quick: bool,
    only: tuple[str, ...],
    markdown_path: str | None,
    plots_dir: str,
    no_plots: bool,
    no_profile: bool,
    daemon_commit: str | None,
    keep: bool,
) -> None:
    """NBD data path: fio against nbdkit and our export (alone, sync, async)."""
    try:
        size_bytes = parse_size(size_text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--size") from None
    if size_bytes < SEQ_REGION_BYTES or size_bytes % (1024 * 1024):
        raise click.BadParameter(
            "must be a multiple of 1 MiB, at least 256 MiB", param_hint="--size"
        )
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            raise click.ClickException(f"{tool} is not installed (make debs)")
    s = Settings(
        runtime_s=runtime_s if runtime_s is not None else (3.0 if quick else 10.0),
        ramp_s=ramp_s if ramp_s is not None else (0.5 if quick else 1.0),
        size_bytes=size_bytes,
        keep=keep,
        profile=not no_profile,
    )
    targets = [t for t in TARGETS if t.key in only or (not only and t.default)]
    machine = machine_info()
    tree_at_start = tree_state()
    started = datetime.datetime.now(datetime.UTC)
    root = tempfile.mkdtemp(prefix="geoclus-bench-nbd-")
    if daemon_commit:
        try:
            sha = export_commit(daemon_commit, os.path.join(root, "src"))
        except (OSError, subprocess.CalledProcessError) as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise click.ClickException(f"cannot export {daemon_commit}: {exc}") from None
        s = dataclasses.replace(s, daemon_source=os.path.join(root, "src"))
        machine.append(("daemons ran", f"commit {sha} (git archive), not the working tree"))
    say(
        f"geoclus NBD benchmark: {len(targets)} targets x {len(JOBS)} jobs, "
        f"{s.ramp_s:g} s ramp + {s.runtime_s:g} s each, volume {format_size(s.size_bytes)}"
    )
    results: list[TargetResult] = []
    interrupted = 0  # the exit status when interrupted
    try:
        results = trio.run(run_all, targets, root, s, None if no_plots else plots_dir)
    except BaseException as exc:
        # trio delivers Ctrl-C as KeyboardInterrupt, possibly inside a group.
        if not _is_interrupt(exc):
            raise
        interrupted = 143 if _describe(exc).startswith("Terminated") else 130
        say(f"\ninterrupted ({_describe(exc)})")
    finally:
        if keep or any(r.error for r in results):
            say(f"work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if interrupted:
        say("processes stopped" + ("" if keep else ", files removed"))
        sys.exit(interrupted)
    elapsed = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
    machine.append(("load average at end", " ".join(f"{x:.2f}" for x in os.getloadavg())))
    if not daemon_commit and tree_state() != tree_at_start:
        machine.append(
            ("note", "the source tree changed during the run (daemons started later ran it)")
        )
    when = f"started {started:%Y-%m-%d %H:%M} UTC, took {elapsed / 60:.1f} min"
    plots: list[str] = []
    if not no_plots:
        try:
            plots = make_plots(results, plots_dir)
        except ImportError:
            say("matplotlib is not installed: no plots (pip install matplotlib)")
    say(text_report(results, s, machine, when))
    for path in plots:
        say(f"plot written to {path}")
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(markdown_report(results, s, machine, when, sys.argv[1:], plots, markdown_path))
        say(f"Markdown written to {markdown_path}")
    if any(r.error or any(j.error for j in r.jobs.values()) for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
