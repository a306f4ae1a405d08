"""One crash trial: a real filesystem and database on a replicated volume, the
primary site killed mid-workload, the secondary promoted and checked (used by
``bench/crash.py`` and the database act of ``geoclus demo``).

Each trial:

1. two real site daemons (mutual TLS, link emulator), a fresh volume;
2. the primary's NBD export becomes a file (``nbdfuse``), a loop device
   (``losetup``), an ext4 filesystem (``mkfs.ext4``), mounted;
3. a driver process runs a bank-transfer workload on the database under test:
   SQLite in WAL mode (``synchronous=FULL``), or PostgreSQL
   (:mod:`geoclus.testing.pgcrash`: a server whose data directory is on the
   volume). Every transaction moves money between two of 100 accounts and
   appends to a transaction log; the total is invariant. After each
   ``COMMIT`` returns, the driver records the transaction's number in a
   journal *outside* the volume;
4. at a random moment: ``kill -9`` of the primary daemon, or a link cut and
   then the kill;
5. the secondary is promoted (``promote --force``) and stopped cleanly; a copy
   of its store is attached (loop), mounted (ext4 replays its journal), and
   checked: the database's own check is clean (SQLite ``PRAGMA
   integrity_check``; PostgreSQL crash recovery, then ``pg_amcheck``); the transaction log
   holds exactly transactions 1..m and the balances equal the state after the
   first m transfers (so the invariant holds); in sync mode m covers every
   transaction acknowledged to the driver; then ``e2fsck -fn`` is clean.

The counter-experiment runs the same trials with the secondary applying each
batch out of order (``GEOCLUS_TEST_FAULTS=secondary-out-of-order``) and counts
the trials until a check fails.

Each database is a :class:`Workload`: how to start its driver on the mounted
volume, how to stop it and anything else still running there after the kill,
and how to check a mounted copy. The trial, the mount stack and the checks of
the transaction log are shared.

Needs root, /dev/fuse, loop devices, nbdfuse, e2fsprogs, and for PostgreSQL
its server binaries and a ``postgres`` user (:func:`missing_requirements` says
what is missing).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import trio

from geoclus.control import request
from geoclus.testing.sitepair import SiteOptions, SitePair, running_pair

ACCOUNTS = 100
START_BALANCE = 1000
VOLUME = "96MiB"
DATABASES = ("sqlite", "postgresql")

# The driver: runs in its own process (its I/O may hang or fail when the
# primary dies; it is killed, never waited on).
DRIVER = r"""
import os, random, sqlite3, sys
db, journal, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
con = sqlite3.connect(db, isolation_level=None, timeout=30)
con.execute("PRAGMA journal_mode=WAL")
con.execute("PRAGMA synchronous=FULL")
con.execute("PRAGMA wal_autocheckpoint=50")  # checkpoints often: main file written in place
con.execute("CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
con.execute("CREATE TABLE txlog(seq INTEGER PRIMARY KEY, src INT, dst INT, amount INT, pad BLOB)")
con.execute("BEGIN")
con.executemany("INSERT INTO accounts VALUES (?, ?)", [(i, START) for i in range(NACC)])
con.execute("COMMIT")
j = open(journal, "a", buffering=1)
j.write("0\n")
rng = random.Random(seed)
seq = 0
while True:
    seq += 1
    src, dst = rng.sample(range(NACC), 2)
    amount = rng.randrange(1, 50)
    pad = rng.randbytes(rng.randrange(100, 3000))
    con.execute("BEGIN IMMEDIATE")
    con.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, src))
    con.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, dst))
    con.execute("INSERT INTO txlog VALUES (?, ?, ?, ?, ?)", (seq, src, dst, amount, pad))
    con.execute("COMMIT")
    j.write(f"{seq}\n")
""".replace("START", str(START_BALANCE)).replace("NACC", str(ACCOUNTS))


def transfers(seed: int, m: int) -> list[int]:
    """Balances after the driver's first ``m`` transfers (same generator; every
    driver draws src, dst, amount and the padding in this order)."""
    rng = random.Random(seed)
    bal = [START_BALANCE] * ACCOUNTS
    for _ in range(m):
        src, dst = rng.sample(range(ACCOUNTS), 2)
        amount = rng.randrange(1, 50)
        rng.randbytes(rng.randrange(100, 3000))
        bal[src] -= amount
        bal[dst] += amount
    return bal


@dataclass
class Trial:
    mode: str
    index: int
    database: str = "sqlite"
    how: str = ""
    acked: int = 0
    found: int = 0
    lag_writes: int | None = None
    lag_bytes: int | None = None
    clean: bool = False
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def errored(self) -> bool:
        """The trial itself failed (set-up, timeout), as opposed to a check."""
        return any(p.startswith("trial error") for p in self.problems)


async def _run(
    *cmd: str, timeout_s: float = 60, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess:
    with trio.fail_after(timeout_s):
        return await trio.run_process(
            list(cmd), capture_stdout=True, capture_stderr=True, check=check, **kw
        )


async def spawn_driver(script: str, *args: str, stderr_path: str | None = None) -> trio.Process:
    """Start a driver script (``python -c script args...``) in its own session,
    so that :func:`kill_driver` takes it and its children (a ``psql``) at once."""
    err = open(stderr_path, "ab") if stderr_path else subprocess.DEVNULL  # noqa: SIM115, ASYNC230
    try:
        return await trio.lowlevel.open_process(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    finally:
        if not isinstance(err, int):
            err.close()


async def kill_driver(driver: trio.Process | None) -> None:
    """SIGKILL the driver's process group; reap it within a bound (its I/O may
    be stuck on the dead volume until the mount stack is torn down)."""
    if driver is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(driver.pid, signal.SIGKILL)
    with trio.CancelScope(shield=True), trio.move_on_after(10):
        await driver.wait()


class Mounted:
    """nbdfuse file -> loop device -> ext4 mount, torn down in reverse, always."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.fuse_dir = os.path.join(workdir, "fuse")
        self.mnt = os.path.join(workdir, "mnt")
        self.loop: str | None = None
        self.fuse_proc: subprocess.Popen[bytes] | None = None
        self.mounted = False

    async def attach(self, socket_path: str) -> None:
        os.makedirs(self.fuse_dir, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)
        pidfile = os.path.join(self.workdir, "nbdfuse.pid")
        self.fuse_proc = subprocess.Popen(  # noqa: ASYNC220 - reaped in detach
            [
                "nbdfuse",
                "-P",
                pidfile,
                f"{self.fuse_dir}/disk",
                f"nbd+unix:///demo?socket={socket_path}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        with trio.fail_after(20):
            while not os.path.exists(pidfile):  # noqa: ASYNC240 - polling a pidfile
                if self.fuse_proc.poll() is not None:
                    raise RuntimeError(f"nbdfuse exited with {self.fuse_proc.returncode}")
                await trio.sleep(0.02)
        r = await _run("losetup", "--find", "--show", "--direct-io=off", f"{self.fuse_dir}/disk")
        self.loop = r.stdout.decode().strip()

    async def mkfs_and_mount(self) -> None:
        assert self.loop is not None
        await _run(
            "mkfs.ext4",
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            self.loop,
            timeout_s=120,
        )
        await _run("mount", "-t", "ext4", "-o", "data=ordered", self.loop, self.mnt)
        self.mounted = True

    async def detach(self) -> None:
        """Best effort, never raises, never hangs for long: after a kill the
        filesystem below may return errors or stall."""
        if self.mounted:
            await _run("umount", "-l", self.mnt, timeout_s=20, check=False)
            self.mounted = False
        if self.loop is not None:
            await _run("losetup", "-d", self.loop, timeout_s=20, check=False)
            self.loop = None
        if self.fuse_proc is not None:
            await _run("fusermount3", "-u", "-z", self.fuse_dir, timeout_s=20, check=False)
            with contextlib.suppress(ProcessLookupError):
                if self.fuse_proc.poll() is None:
                    await trio.sleep(0.2)
                if self.fuse_proc.poll() is None:
                    os.killpg(self.fuse_proc.pid, signal.SIGKILL)
            with trio.move_on_after(5):
                while self.fuse_proc.poll() is None:
                    await trio.sleep(0.05)
            self.fuse_proc = None


@contextlib.asynccontextmanager
async def mounted(workdir: str, socket_path: str) -> AsyncIterator[Mounted]:
    m = Mounted(workdir)
    try:
        await m.attach(socket_path)
        await m.mkfs_and_mount()
        yield m
    finally:
        with trio.CancelScope(shield=True):
            await m.detach()


async def wait_caught_up(pair: SitePair, timeout_s: float = 30.0) -> None:
    """Wait until the primary has every write it acknowledged applied on the
    secondary (async mode: the set-up of a workload is on both sites before
    the part of the run that may be cut)."""
    with trio.fail_after(timeout_s):
        while True:
            s = await trio.to_thread.run_sync(pair.a.status)
            if s["connected"] and s["lag_writes"] == 0 and not s.get("in_flight_writes"):
                return
            await trio.sleep(0.05)


def check_rows(t: Trial, seed: int, seqs: list[int], bal: list[int]) -> None:
    """The transaction log must be transactions 1..m and the balances those
    after the first m transfers (so the total is invariant). Sets ``t.found``."""
    t.found = len(seqs)
    if seqs != list(range(1, len(seqs) + 1)):
        t.problems.append("transaction log is not a prefix 1..m")
    if bal and sum(bal) != ACCOUNTS * START_BALANCE:
        t.problems.append(f"invariant broken: total {sum(bal)}")
    if bal and bal != transfers(seed, len(seqs)):
        t.problems.append("balances differ from the first m transfers")


class Workload:
    """One database under test: its driver on the primary's mounted volume, and
    its check of a mounted copy of the promoted secondary. This base class is
    SQLite's (a library: nothing runs but the driver)."""

    name = "sqlite"
    volume = VOLUME

    def __init__(self) -> None:
        self.driver: trio.Process | None = None

    async def start(self, mnt: str, workdir: str, journal: str, seed: int, pair: SitePair) -> None:
        """Set up on the mounted volume and start the driver; return at once."""
        self.driver = await spawn_driver(DRIVER, os.path.join(mnt, "bank.db"), journal, str(seed))

    async def kill(self) -> None:
        """After the primary was killed: SIGKILL whatever of the workload runs
        on its volume. Never raises; bounded (shielded by the caller)."""
        await kill_driver(self.driver)
        self.driver = None

    async def close(self) -> list[str]:
        """After the mount stack is gone: anything still left over (problems)."""
        return []

    async def check(self, mnt: str, workdir: str, t: Trial, seed: int) -> None:
        """Check the database on the mounted copy; append to ``t.problems``."""
        db = os.path.join(mnt, "bank.db")
        if os.path.exists(db):  # noqa: ASYNC240 - one stat
            _check_sqlite(db, t, seed)
        elif t.mode == "sync" and t.acked > 0:
            # Killed before the database reached the secondary: only the
            # empty prefix of an async copy may lack it.
            t.problems.append("database missing although transactions were acknowledged")


def workload(database: str) -> Workload:
    if database == "sqlite":
        return Workload()
    if database == "postgresql":
        from geoclus.testing.pgcrash import PostgresWorkload

        return PostgresWorkload()
    raise ValueError(f"unknown database {database!r}: one of {', '.join(DATABASES)}")


def _check_sqlite(db: str, t: Trial, seed: int) -> None:
    """SQLite's own check, then :func:`check_rows`."""
    con = sqlite3.connect(db)
    try:
        ok = con.execute("PRAGMA integrity_check").fetchall()
        if ok != [("ok",)]:
            t.problems.append(f"integrity_check: {ok[:3]}")
            return
        seqs = [s for (s,) in con.execute("SELECT seq FROM txlog ORDER BY seq")]
        bal = [b for (b,) in con.execute("SELECT balance FROM accounts ORDER BY id")]
        check_rows(t, seed, seqs, bal)
        if not bal and t.acked > 0 and t.mode == "sync":
            t.problems.append("accounts missing")
    except sqlite3.DatabaseError as exc:
        t.problems.append(f"sqlite: {exc}")
    finally:
        con.close()


async def check_image(
    store: str, workdir: str, t: Trial, seed: int, w: Workload | None = None
) -> None:
    """Attach a copy of the promoted secondary's store, replay ext4's journal
    by mounting it, check the database, then e2fsck the unmounted copy."""
    w = w or Workload()
    image = os.path.join(workdir, "check.img")
    await _run("cp", "--sparse=always", store, image, timeout_s=120)
    mnt = os.path.join(workdir, "check")
    os.makedirs(mnt, exist_ok=True)
    loop = (await _run("losetup", "--find", "--show", image)).stdout.decode().strip()
    try:
        r = await _run("mount", "-t", "ext4", loop, mnt, check=False)
        if r.returncode != 0:
            t.problems.append(f"mount failed: {r.stderr.decode().strip()[:200]}")
            return
        unmounted = False
        try:
            await w.check(mnt, workdir, t, seed)
            if t.mode == "sync" and t.found < t.acked:
                t.problems.append(
                    f"{t.acked - t.found} acknowledged transactions lost in sync mode"
                )
        finally:
            with trio.CancelScope(shield=True):
                r = await _run("umount", mnt, check=False)
                unmounted = r.returncode == 0
                if not unmounted:  # something still holds it: never leave it behind
                    t.problems.append(f"umount of the copy: {r.stderr.decode().strip()[:200]}")
                    await _run("umount", "-l", mnt, check=False)
        if not unmounted:
            return
        r = await _run("e2fsck", "-fn", loop, check=False, timeout_s=120)
        if r.returncode != 0:
            t.problems.append(f"e2fsck exit {r.returncode}: {r.stdout.decode()[-200:]}")
    finally:
        with trio.CancelScope(shield=True):
            await _run("losetup", "-d", loop, check=False)
        with contextlib.suppress(OSError):
            os.remove(image)


async def trial(
    mode: str, index: int, *, out_of_order: bool = False, database: str = "sqlite"
) -> Trial:
    t = Trial(mode, index, database)
    t0 = time.monotonic()
    # SQLite keeps the seeds it always had; PostgreSQL trials draw their own.
    rng = random.Random(index * 7919 + (0 if mode == "sync" else 1) + 2 * DATABASES.index(database))
    seed = rng.randrange(1 << 30)
    w = workload(database)
    workdir = tempfile.mkdtemp(prefix="geoclus-crash-")
    journal = os.path.join(workdir, "journal")
    opts = SiteOptions(
        mode=mode,
        size=w.volume,
        one_way_delay_s=0.00025,
        peer_timeout_s=1.0,
        secondary_fault_out_of_order=out_of_order,
        max_lag_bytes="64MiB",
    )
    try:
        async with running_pair(workdir, opts) as pair:
            async with mounted(workdir, pair.a.nbd) as m:
                try:
                    await w.start(m.mnt, workdir, journal, seed, pair)
                    await trio.sleep(rng.uniform(1.0, 4.0))
                    t.how = "cut+kill" if rng.random() < 0.3 else "kill"
                    if t.how == "cut+kill":
                        pair.cut()
                        await trio.sleep(rng.uniform(0.05, 0.5))
                    with contextlib.suppress(Exception):
                        st = await trio.to_thread.run_sync(pair.a.status)
                        t.lag_writes, t.lag_bytes = st.get("lag_writes"), st.get("lag_bytes")
                    await pair.stop_site(pair.a, signal.SIGKILL)
                finally:
                    with trio.CancelScope(shield=True):
                        await w.kill()
                t.acked = _acked(journal)
            # The primary site is gone: promote the secondary, stop it cleanly.
            await trio.to_thread.run_sync(
                lambda: request(pair.b.control, "promote", force=True, timeout_s=30.0)
            )
            await pair.stop_site(pair.b)
            await check_image(pair.b.store, workdir, t, seed, w)
    except Exception as exc:  # a failed trial is reported, the campaign goes on
        t.problems.append(f"trial error: {exc!r}"[:300])
    finally:
        with trio.CancelScope(shield=True):
            t.problems.extend(await w.close())
        shutil.rmtree(workdir, ignore_errors=True)
    t.clean = not t.problems
    t.seconds = time.monotonic() - t0
    return t


def _acked(journal: str) -> int:
    try:
        with open(journal) as f:
            lines = [ln for ln in f.read().split("\n") if ln.strip()]
    except OSError:
        return 0
    return max((int(x) for x in lines), default=0)


def missing_requirements(database: str = "sqlite") -> str | None:
    """Why a trial of ``database`` cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mount)"
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            return f"{dev} is missing (no FUSE or loop devices here)"
    for tool in ("nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fusermount3", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is missing: install libnbd-bin, fuse3, e2fsprogs, mount"
    if database == "postgresql":
        from geoclus.testing.pgcrash import missing_postgres

        return missing_postgres()
    if database != "sqlite":
        return f"unknown database {database!r}: one of {', '.join(DATABASES)}"
    return None
