"""The PostgreSQL workload of the crash trial (:mod:`geoclus.testing.dbcrash`).

On the primary's mounted ext4 volume:

1. ``initdb`` a data directory (data checksums on, 1 MiB WAL segments; it
   fsyncs everything it wrote), start a server on it as the ``postgres`` user
   (``fsync``, ``full_page_writes`` and ``synchronous_commit`` on, a small
   ``shared_buffers`` and ``max_wal_size``, no TCP: a Unix socket in a
   directory *outside* the volume), create 100 accounts and a transaction log
   (with a secondary index); in async mode wait until the secondary has all of
   that (the set-up is not what is tested);
2. a driver process feeds ``psql`` (no Python driver needed) the same bank
   transfers as the SQLite driver (same generator, so
   :func:`~geoclus.testing.dbcrash.transfers` models both), one transaction at
   a time, and appends a transaction's number to the journal outside the
   volume once ``psql`` reported its ``COMMIT``. Every 50 transactions it
   runs a ``CHECKPOINT`` (as SQLite checkpoints every 50 pages): the data
   files are rewritten in place, ``pg_control`` moves on and old WAL segments
   are recycled many times per trial, not only the WAL appended to;
3. after the primary site is killed, the driver and every server process are
   SIGKILLed (they sit on a dead filesystem; the mount stack below is torn
   down lazily, which ends any I/O still pending);
4. on the mounted copy of the promoted secondary: the dead primary's lock
   file is removed (it names a process of another machine), a server is started
   on the copy (crash recovery replays the WAL), ``pg_amcheck --all`` (heap,
   TOAST and every B-tree with ``--heapallindexed --parent-check``; the data
   checksums are verified as pages are read) must be clean, the log and the
   balances must be those of a prefix of the transfers, and the server is
   shut down cleanly before the copy is unmounted and e2fsck'ed.

Needs the PostgreSQL server binaries (Debian package ``postgresql``: they live
in ``/usr/lib/postgresql/<version>/bin``; ``GEOCLUS_PG_BINDIR`` overrides) and
a ``postgres`` system user (the package creates it; the server refuses to run
as root). :func:`missing_postgres` says what is missing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess

import trio

from geoclus.testing.dbcrash import (
    ACCOUNTS,
    START_BALANCE,
    Trial,
    Workload,
    _run,
    check_rows,
    kill_driver,
    spawn_driver,
    wait_caught_up,
)
from geoclus.testing.sitepair import SitePair

PG_USER = "postgres"
PG_TOOLS = ("initdb", "postgres", "psql", "pg_isready", "pg_amcheck")
# initdb writes ~28 MiB with 1 MiB WAL segments; the workload a few more, and
# ext4 keeps 5 % for root (the server is not root).
PG_VOLUME = "128MiB"
PG_SETTINGS = {
    "listen_addresses": "",
    "fsync": "on",
    "full_page_writes": "on",
    "synchronous_commit": "on",
    "shared_buffers": "16MB",
    "max_connections": "20",
    "max_wal_size": "4MB",
    "min_wal_size": "2MB",
    "checkpoint_timeout": "30s",
    "huge_pages": "off",
    "log_checkpoints": "on",
}
# How long a server may take to accept connections (crash recovery included;
# the machine is shared) and to shut down.
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0

# The driver runs a CHECKPOINT after every this many transactions.
CHECKPOINT_EVERY = 50

# The driver: feeds psql one transaction at a time and journals a transaction
# once psql printed its COMMIT. psql's tags are checked: a transaction that
# failed must not be journalled (ON_ERROR_STOP makes psql exit on an error).
DRIVER = r"""
import random, subprocess, sys
psql, sock, user, journal, seed = sys.argv[1:6]
p = subprocess.Popen(
    [psql, "-X", "-h", sock, "-U", user, "-d", "postgres", "-v", "ON_ERROR_STOP=1"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
)

def run(sql, marker, want):
    p.stdin.write(f"{sql}\\echo {marker}\n")
    p.stdin.flush()
    tags = []
    while (line := p.stdout.readline()).strip() != marker:
        if not line:
            sys.exit(f"psql ended before {marker}: {tags}")
        tags.append(line.strip())
    if tags != want:
        sys.exit(f"{marker}: psql said {tags}")

j = open(journal, "a", buffering=1)
j.write("0\n")
rng = random.Random(int(seed))
seq = 0
while True:
    seq += 1
    src, dst = rng.sample(range(NACC), 2)
    amount = rng.randrange(1, 50)
    pad = rng.randbytes(rng.randrange(100, 3000))
    run(
        "BEGIN;\n"
        f"UPDATE accounts SET balance = balance - {amount} WHERE id = {src};\n"
        f"UPDATE accounts SET balance = balance + {amount} WHERE id = {dst};\n"
        f"INSERT INTO txlog VALUES ({seq}, {src}, {dst}, {amount}, '\\x{pad.hex()}');\n"
        "COMMIT;\n",
        f"acked {seq}",
        ["BEGIN", "UPDATE 1", "UPDATE 1", "INSERT 0 1", "COMMIT"],
    )
    j.write(f"{seq}\n")
    if seq % CKPT == 0:
        run("CHECKPOINT;\n", f"checkpoint {seq}", ["CHECKPOINT"])
""".replace("NACC", str(ACCOUNTS)).replace("CKPT", str(CHECKPOINT_EVERY))

SCHEMA = f"""
CREATE TABLE accounts(id int PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE txlog(seq int PRIMARY KEY, src int NOT NULL, dst int NOT NULL,
                   amount int NOT NULL, pad bytea);
CREATE INDEX txlog_src ON txlog(src, seq);
INSERT INTO accounts SELECT g, {START_BALANCE} FROM generate_series(0, {ACCOUNTS - 1}) g;
"""


def pg_bindir() -> str | None:
    """The directory holding the PostgreSQL server binaries, or None."""
    candidates = []
    if os.environ.get("GEOCLUS_PG_BINDIR"):
        candidates.append(os.environ["GEOCLUS_PG_BINDIR"])
    else:

        def version(path: str) -> float:
            try:
                return float(path.split("/")[-2])
            except ValueError:
                return 0.0

        candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
        if shutil.which("pg_ctl"):
            candidates.append(os.path.dirname(os.path.realpath(shutil.which("pg_ctl") or "")))
    for d in candidates:
        if all(os.access(os.path.join(d, t), os.X_OK) for t in PG_TOOLS):
            return d
    return None


def missing_postgres() -> str | None:
    """Why PostgreSQL trials cannot run here (binaries, user), or None."""
    if pg_bindir() is None:
        where = os.environ.get("GEOCLUS_PG_BINDIR") or "/usr/lib/postgresql/*/bin"
        return (
            f"PostgreSQL server binaries ({', '.join(PG_TOOLS)}) not found in {where}: "
            "install the Debian package postgresql (or set GEOCLUS_PG_BINDIR)"
        )
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        return (
            f"no {PG_USER!r} system user (PostgreSQL refuses to run as root): install the "
            f"Debian package postgresql, or `useradd --system {PG_USER}`"
        )
    return None


def _tool(name: str) -> str:
    d = pg_bindir()
    if d is None:
        raise RuntimeError(missing_postgres() or "PostgreSQL binaries not found")
    return os.path.join(d, name)


def _as_postgres(*cmd: str) -> list[str]:
    return ["setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups", *cmd]


def _chown_dir(path: str, mode: int = 0o700) -> None:
    os.makedirs(path, exist_ok=True)
    pw = pwd.getpwnam(PG_USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, mode)


_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C", "LC_ALL": "C"}


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def _children(pid: int) -> dict[int, int]:
    """Processes whose parent is ``pid``, with their start times (the server's
    backends and helpers: each is its own session leader, so no process group
    holds them all)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[1] == pid:
                out[int(entry)] = st[2]
    return out


def _alive(pid: int, started: int) -> bool:
    """The process ``pid`` that started at ``started`` runs (not reused, not a zombie)."""
    st = _stat(pid)
    return st is not None and st[2] == started and st[0] not in ("Z", "X")


class Server:
    """One PostgreSQL server we started (postmaster is our child)."""

    def __init__(
        self, datadir: str, sockdir: str, log: str, settings: dict[str, str] | None = None
    ) -> None:
        self.datadir = datadir
        self.sockdir = sockdir
        self.log = log
        self.settings = {**PG_SETTINGS, **(settings or {}), "unix_socket_directories": sockdir}
        self.proc: trio.Process | None = None
        # Every server process seen (pid -> start time), to be waited for.
        self.pids: dict[int, int] = {}

    def tail(self, lines: int = 8) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return " | ".join(ln.strip() for ln in f.readlines()[-lines:])
        except OSError:
            return ""

    async def start(self) -> None:
        _chown_dir(self.sockdir)
        args = [_tool("postgres"), "-D", self.datadir]
        for k, v in self.settings.items():
            args += ["-c", f"{k}={v}"]
        logf = open(self.log, "ab")  # noqa: SIM115, ASYNC230 - handed to the child
        try:
            self.proc = await trio.lowlevel.open_process(
                _as_postgres(*args),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd="/",
                env=_ENV,
            )
        finally:
            logf.close()
        st = _stat(self.proc.pid)
        if st is not None:
            self.pids[self.proc.pid] = st[2]
        with trio.move_on_after(START_TIMEOUT_S):
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(
                        f"postgres exited with {self.proc.returncode}: {self.tail()}"
                    )
                r = await _run(
                    _tool("pg_isready"), "-q", "-h", self.sockdir, "-U", PG_USER, check=False
                )
                if r.returncode == 0:
                    return
                await trio.sleep(0.1)
        raise RuntimeError(f"postgres not ready in {START_TIMEOUT_S:.0f} s: {self.tail()}")

    async def psql(self, sql: str, timeout_s: float = 60) -> str:
        r = await _run(
            _tool("psql"),
            "-X",
            "-q",
            "-At",
            "-h",
            self.sockdir,
            "-U",
            PG_USER,
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
            check=False,
            timeout_s=timeout_s,
        )
        if r.returncode != 0:
            raise RuntimeError(f"psql: {r.stderr.decode(errors='replace').strip()[:300]}")
        return str(r.stdout.decode())

    async def stop(self) -> bool:
        """Fast shutdown (SIGINT), bounded; True if the server stopped cleanly.
        Kills it when it does not."""
        if self.proc is None or self.proc.returncode is not None:
            return True  # never started, or exited already (start said so)
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT_S):
            await self.proc.wait()
        clean = self.proc.returncode == 0
        if not clean:
            await self.kill()
        return clean

    async def kill(self) -> None:
        """SIGKILL the postmaster and every process it started; bounded wait."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            # Its children seen first, then the postmaster killed (it forks no
            # more), then the children; one forked in between notices the
            # postmaster's death and exits by itself.
            self.pids.update(_children(self.proc.pid))
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            for pid, started in self.pids.items():
                with contextlib.suppress(ProcessLookupError):
                    if _alive(pid, started):
                        os.kill(pid, signal.SIGKILL)
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await self.proc.wait()

    async def wait_gone(self, timeout_s: float) -> list[int]:
        """Wait until every server process seen has exited; the ones left."""
        with trio.move_on_after(timeout_s):
            while any(_alive(p, s) for p, s in self.pids.items()):
                await trio.sleep(0.1)
        return [p for p, s in sorted(self.pids.items()) if _alive(p, s)]


class PostgresWorkload(Workload):
    name = "postgresql"
    volume = PG_VOLUME

    def __init__(self) -> None:
        super().__init__()
        self.server: Server | None = None

    async def start(self, mnt: str, workdir: str, journal: str, seed: int, pair: SitePair) -> None:
        os.chmod(workdir, 0o711)  # the server (not root) reaches its socket and data
        datadir = os.path.join(mnt, "pgdata")
        _chown_dir(datadir)
        r = await _run(
            *_as_postgres(
                _tool("initdb"),
                "-D",
                datadir,
                "--auth=trust",
                f"--username={PG_USER}",
                "--encoding=UTF8",
                "--locale=C",
                "--wal-segsize=1",
                "--data-checksums",
                "--no-instructions",
            ),
            check=False,
            timeout_s=180,
            cwd="/",
            env=_ENV,
        )
        if r.returncode != 0:
            raise RuntimeError(f"initdb: {r.stderr.decode(errors='replace').strip()[-300:]}")
        self.server = Server(
            datadir, os.path.join(workdir, "pgsock"), os.path.join(workdir, "pg.log")
        )
        await self.server.start()
        await self.server.psql(SCHEMA)
        if pair.options.mode == "async":
            await wait_caught_up(pair)
        self.driver = await spawn_driver(
            DRIVER,
            _tool("psql"),
            self.server.sockdir,
            PG_USER,
            journal,
            str(seed),
            stderr_path=os.path.join(workdir, "driver.err"),
        )

    async def kill(self) -> None:
        await kill_driver(self.driver)
        self.driver = None
        if self.server is not None:
            await self.server.kill()

    async def close(self) -> list[str]:
        """Every server process must be gone once the mount stack is (its
        pending I/O fails then)."""
        if self.server is None:
            return []
        await self.server.kill()
        left = await self.server.wait_gone(20)
        self.server = None
        return [f"cleanup: postgres processes {left} still running"] if left else []

    async def check(self, mnt: str, workdir: str, t: Trial, seed: int) -> None:
        datadir = os.path.join(mnt, "pgdata")
        if not os.path.isfile(os.path.join(datadir, "PG_VERSION")):  # noqa: ASYNC240
            t.problems.append("postgres data directory missing on the secondary")
            return
        # The dead primary's lock file: its PID belongs to another machine.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(datadir, "postmaster.pid"))
        # The copy is scratch: its own durability does not matter (what is
        # checked is the state crash recovery reaches), so no fsync there.
        server = Server(
            datadir,
            os.path.join(workdir, "pgsock-check"),
            os.path.join(workdir, "pg-check.log"),
            {"fsync": "off"},
        )
        try:
            try:
                await server.start()
            except RuntimeError as exc:
                t.problems.append(f"postgres recovery failed: {exc}"[:400])
                return
            r = await _run(
                _tool("pg_amcheck"),
                "-h",
                server.sockdir,
                "-U",
                PG_USER,
                "--all",
                "--install-missing",
                "--heapallindexed",
                "--parent-check",
                check=False,
                timeout_s=120,
            )
            if r.returncode != 0:
                out = (r.stdout + r.stderr).decode(errors="replace").strip()
                t.problems.append(f"pg_amcheck exit {r.returncode}: {out[:300]}")
            try:
                seqs = [
                    int(x)
                    for x in (await server.psql("SELECT seq FROM txlog ORDER BY seq")).split()
                ]
                bal = [
                    int(x)
                    for x in (await server.psql("SELECT balance FROM accounts ORDER BY id")).split()
                ]
            except RuntimeError as exc:
                t.problems.append(f"postgres: {exc}"[:300])
                return
            if len(bal) != ACCOUNTS:
                t.problems.append(f"{len(bal)} accounts instead of {ACCOUNTS}")
            check_rows(t, seed, seqs, bal)
        finally:
            with trio.CancelScope(shield=True):
                if not await server.stop():
                    t.problems.append(
                        f"postgres on the copy did not stop cleanly: {server.tail(3)}"
                    )
                left = await server.wait_gone(10)
                if left:
                    t.problems.append(f"cleanup: postgres processes {left} still running")
