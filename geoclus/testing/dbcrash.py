"""One crash trial: a real filesystem and database on a replicated volume, the
primary site killed mid-workload, the secondary promoted and checked (used by
``bench/crash.py`` and the database act of ``geoclus demo``).

Each trial:

1. two real site daemons (mutual TLS, link emulator), a fresh volume;
2. the primary's NBD export becomes a file (``nbdfuse``), a loop device
   (``losetup``), an ext4 filesystem (``mkfs.ext4``), mounted;
3. a driver process runs a bank-transfer workload on SQLite in WAL mode
   (``synchronous=FULL``): every transaction moves money between two of 100
   accounts and appends to a transaction log; the total is invariant. After
   each ``COMMIT`` returns, the driver records the transaction's number in a
   journal *outside* the volume;
4. at a random moment: ``kill -9`` of the primary daemon, or a link cut and
   then the kill;
5. the secondary is promoted (``promote --force``) and stopped cleanly; a copy
   of its store is attached (loop), mounted (ext4 replays its journal), and
   checked: SQLite ``PRAGMA integrity_check`` is ``ok``; the transaction log
   holds exactly transactions 1..m and the balances equal the state after the
   first m transfers (so the invariant holds); in sync mode m covers every
   transaction acknowledged to the driver; then ``e2fsck -fn`` is clean.

The counter-experiment runs the same trials with the secondary applying each
batch out of order (``GEOCLUS_TEST_FAULTS=secondary-out-of-order``) and counts
the trials until a check fails.

Needs root, /dev/fuse, loop devices, nbdfuse, e2fsprogs
(:func:`missing_requirements` says what is missing).
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

import trio

from geoclus.control import request
from geoclus.testing.sitepair import SiteOptions, running_pair

ACCOUNTS = 100
START_BALANCE = 1000
VOLUME = "96MiB"

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
    """Balances after the driver's first ``m`` transfers (same generator)."""
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
    how: str = ""
    acked: int = 0
    found: int = 0
    lag_writes: int | None = None
    lag_bytes: int | None = None
    clean: bool = False
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


async def _run(*cmd: str, timeout_s: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    with trio.fail_after(timeout_s):
        return await trio.run_process(
            list(cmd), capture_stdout=True, capture_stderr=True, check=check
        )


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


def _check_db(db: str, t: Trial, seed: int) -> None:
    """SQLite's own check, then the log must be transactions 1..m and the
    balances those after the first m transfers (so the total is invariant)."""
    con = sqlite3.connect(db)
    try:
        ok = con.execute("PRAGMA integrity_check").fetchall()
        if ok != [("ok",)]:
            t.problems.append(f"integrity_check: {ok[:3]}")
            return
        seqs = [s for (s,) in con.execute("SELECT seq FROM txlog ORDER BY seq")]
        t.found = len(seqs)
        if seqs != list(range(1, len(seqs) + 1)):
            t.problems.append("transaction log is not a prefix 1..m")
        bal = [b for (b,) in con.execute("SELECT balance FROM accounts ORDER BY id")]
        if bal and sum(bal) != ACCOUNTS * START_BALANCE:
            t.problems.append(f"invariant broken: total {sum(bal)}")
        if bal and bal != transfers(seed, len(seqs)):
            t.problems.append("balances differ from the first m transfers")
        if not bal and t.acked > 0 and t.mode == "sync":
            t.problems.append("accounts missing")
    except sqlite3.DatabaseError as exc:
        t.problems.append(f"sqlite: {exc}")
    finally:
        con.close()


async def check_image(store: str, workdir: str, t: Trial, seed: int) -> None:
    """Attach a copy of the promoted secondary's store, replay ext4's journal
    by mounting it, check the database, then e2fsck the unmounted copy."""
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
        try:
            db = os.path.join(mnt, "bank.db")
            if os.path.exists(db):  # noqa: ASYNC240 - one stat
                _check_db(db, t, seed)
            elif t.mode == "sync" and t.acked > 0:
                # Killed before the database reached the secondary: only the
                # empty prefix of an async copy may lack it.
                t.problems.append("database missing although transactions were acknowledged")
            if t.mode == "sync" and t.found < t.acked:
                t.problems.append(
                    f"{t.acked - t.found} acknowledged transactions lost in sync mode"
                )
        finally:
            await _run("umount", mnt, check=False)
        r = await _run("e2fsck", "-fn", loop, check=False, timeout_s=120)
        if r.returncode != 0:
            t.problems.append(f"e2fsck exit {r.returncode}: {r.stdout.decode()[-200:]}")
    finally:
        await _run("losetup", "-d", loop, check=False)
        with contextlib.suppress(OSError):
            os.remove(image)


async def trial(mode: str, index: int, *, out_of_order: bool = False) -> Trial:
    t = Trial(mode, index)
    t0 = time.monotonic()
    rng = random.Random(index * 7919 + (0 if mode == "sync" else 1))
    seed = rng.randrange(1 << 30)
    workdir = tempfile.mkdtemp(prefix="geoclus-crash-")
    journal = os.path.join(workdir, "journal")
    opts = SiteOptions(
        mode=mode,
        size=VOLUME,
        one_way_delay_s=0.00025,
        peer_timeout_s=1.0,
        secondary_fault_out_of_order=out_of_order,
        max_lag_bytes="64MiB",
    )
    try:
        async with running_pair(workdir, opts) as pair:
            async with mounted(workdir, pair.a.nbd) as m:
                driver = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        "-c",
                        DRIVER,
                        os.path.join(m.mnt, "bank.db"),
                        journal,
                        str(seed),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                try:
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
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(driver.pid, signal.SIGKILL)
                    with trio.CancelScope(shield=True), trio.move_on_after(10):
                        await driver.wait()
                t.acked = _acked(journal)
            # The primary site is gone: promote the secondary, stop it cleanly.
            await trio.to_thread.run_sync(
                lambda: request(pair.b.control, "promote", force=True, timeout_s=30.0)
            )
            await pair.stop_site(pair.b)
            await check_image(pair.b.store, workdir, t, seed)
    except Exception as exc:  # a failed trial is reported, the campaign goes on
        t.problems.append(f"trial error: {exc!r}"[:300])
    finally:
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


def missing_requirements() -> str | None:
    """Why a trial cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mount)"
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            return f"{dev} is missing (no FUSE or loop devices here)"
    for tool in ("nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fusermount3", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is missing: install libnbd-bin, fuse3, e2fsprogs, mount"
    return None
