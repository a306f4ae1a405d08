"""Interop against a replicated primary with a live secondary: two real daemons
(mutual TLS, link emulator) in sync and in async mode, driven by real clients:
nbdinfo, fio's nbd ioengine with crc32c verification, and ext4 through
nbdfuse and a loop device. At the end the secondary's store is checked on its
own: fio verifies it through the secondary's read-only export, e2fsck finds the
file system clean, a read-only mount holds every file written, and it is
byte-identical to the primary's store.

The loop devices, mounts and nbdfuse processes a test sets up are torn down by
:func:`attachments` however the test ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import xxhash

from geoclus.testing.sitepair import SiteOptions, SitePair, running_pair

pytestmark = [pytest.mark.process, pytest.mark.interop]

MiB = 1024 * 1024
VOLUME_BYTES = 64 * MiB
VOLUME = "64MiB"
MODES = ["sync", "async"]

# One client command (mkfs, fio, e2fsck ...) on a 64 MiB volume takes seconds.
COMMAND_TIMEOUT_S = 60
# nbdfuse writes its pid file once the FUSE file is ready to use.
FUSE_START_TIMEOUT_S = 10
# nbdfuse exits once fusermount3 -u has unmounted it.
FUSE_EXIT_TIMEOUT_S = 10
# An async secondary applies a few MiB of backlog well within this.
CATCH_UP_TIMEOUT_S = 30
# Teardown after a failure: each forced step is bounded, and so is the whole.
CLEANUP_STEP_TIMEOUT_S = 20
CLEANUP_TIMEOUT_S = 60

# fio job: 4 KiB random writes, 8 in flight, over the first 16 MiB; every block
# is written once (fio's random map), then read back and checked (crc32c).
FIO_BYTES = 16 * MiB
FIO_JOB = ["--rw=randwrite", "--bs=4k", "--iodepth=8", f"--size={FIO_BYTES}", "--verify=crc32c"]
FIO_SEED = 7

# Debian package providing each binary the tests run.
PACKAGES = {
    "nbdinfo": "libnbd-bin",
    "nbdfuse": "libnbd-bin",
    "fio": "fio",
    "fusermount3": "fuse3",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "sync": "coreutils",
    "qemu-img": "qemu-utils",
}


# -- skips -----------------------------------------------------------------------


def need(*binaries: str) -> None:
    """Skip the test, naming the Debian package, when a binary is missing."""
    for binary in binaries:
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} not installed (Debian package {PACKAGES[binary]})")


def need_fio_nbd() -> None:
    need("fio")
    probe = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("this fio has no nbd ioengine (Debian's fio package has it)")


def need_block_tools() -> None:
    """Root, /dev/fuse, loop devices and the binaries of the ext4 test."""
    if os.geteuid() != 0:
        pytest.skip("needs root: losetup attaches loop devices and mount mounts ext4")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse (the fuse kernel module) for nbdfuse")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("needs loop devices (/dev/loop-control; modprobe loop)")
    need("nbdfuse", "fusermount3", "losetup", "mount", "umount", "mkfs.ext4", "e2fsck", "sync")


# -- helpers ---------------------------------------------------------------------


async def run(*argv: str | Path, cwd: Path | None = None) -> str:
    """Run a command to completion and return its stdout; fail the test on a
    non-zero exit, showing its output."""
    proc = await run_unchecked(*argv, cwd=cwd)
    if proc.returncode != 0:
        pytest.fail(
            f"{[str(a) for a in argv]} exited {proc.returncode}:\n"
            f"{proc.stdout.decode(errors='replace')}\n{proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout.decode()


async def run_unchecked(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    with trio.fail_after(COMMAND_TIMEOUT_S):
        return await trio.run_process(
            [str(a) for a in argv],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=cwd,
        )


def uri(socket_path: str) -> str:
    return f"nbd+unix:///demo?socket={socket_path}"


def digest(path: str | Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


async def status(site: Any) -> dict[str, Any]:
    return await trio.to_thread.run_sync(site.status)


async def replicated(pair: SitePair, mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both sites' status once the secondary has applied every write the
    primary sequenced; in sync mode it must have already (acks wait for it)."""
    sa, sb = await status(pair.a), await status(pair.b)
    if mode == "sync":
        assert sb["applied_seq"] == sa["last_seq"]
    else:
        with trio.fail_after(CATCH_UP_TIMEOUT_S):
            while sb["applied_seq"] != sa["last_seq"]:
                await trio.sleep(0.05)
                sa, sb = await status(pair.a), await status(pair.b)
    assert sa["connected"] and sa["role"] == "primary" and sa["mode"] == mode
    assert sb["role"] == "secondary" and sb["consistency"] == "consistent"
    assert sa["lag_writes"] == 0
    assert sa["nbd"]["requests_failed"] == 0 and sa["nbd"]["protocol_errors"] == 0
    return sa, sb


def mounted_under(root: Path) -> list[str]:
    """Mount points below ``root`` (from /proc/self/mountinfo)."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == str(root) or p.startswith(f"{root}/")]


def loops_under(root: Path) -> list[str]:
    """Loop devices whose backing file lies below ``root``."""
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue  # not attached
        if backing.startswith(f"{root}/"):
            found.append(f"/dev/{entry.name}")
    return found


class Attachments:
    """The loop devices, mounts and nbdfuse processes one test sets up, all
    below ``workdir``.

    ``attach``, ``mount`` and ``fuse`` record what they set up; ``detach``,
    ``umount`` and ``unfuse`` undo it, check it worked and forget it. Whatever
    is still recorded when :func:`attachments` exits (a failed assertion) is
    undone by :meth:`release_all`, in reverse order, forcefully."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._held: list[tuple[str, str]] = []  # (kind, device or mount point)
        self._fuse_procs: dict[str, trio.Process] = {}

    async def attach(self, path: str | Path, *, read_only: bool = False) -> str:
        """Attach ``path`` to a free loop device; return the device."""
        ro = ["--read-only"] if read_only else []
        dev = (await run("losetup", "--find", "--show", *ro, path)).strip()
        assert dev.startswith("/dev/loop"), dev
        self._held.append(("loop", dev))
        return dev

    async def detach(self, dev: str) -> None:
        await run("losetup", "--detach", dev)
        self._held.remove(("loop", dev))

    async def mount(self, dev: str, mountpoint: Path, options: str = "") -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        opts = ["-o", options] if options else []
        await run("mount", "-t", "ext4", *opts, dev, mountpoint)
        self._held.append(("mount", str(mountpoint)))

    async def umount(self, mountpoint: Path) -> None:
        await run("umount", mountpoint)
        self._held.remove(("mount", str(mountpoint)))

    async def fuse(self, nbd_uri: str, mountpoint: Path) -> Path:
        """Start nbdfuse (in its own session, reaped by :meth:`unfuse` or
        :meth:`release_all`) exposing ``nbd_uri`` as ``mountpoint/disk``; wait
        until it is ready and return the file."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        pidfile = self.workdir / f"{mountpoint.name}.nbdfuse.pid"
        log = self.workdir / f"{mountpoint.name}.nbdfuse.log"
        with open(log, "wb") as logf:
            proc = await trio.lowlevel.open_process(
                ["nbdfuse", "--pidfile", str(pidfile), f"{mountpoint}/disk", nbd_uri],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._held.append(("fuse", str(mountpoint)))
        self._fuse_procs[str(mountpoint)] = proc
        with trio.fail_after(FUSE_START_TIMEOUT_S):
            while not pidfile.exists():
                assert proc.poll() is None, f"nbdfuse exited {proc.returncode}:\n{log.read_text()}"
                await trio.sleep(0.02)
        assert str(mountpoint) in mounted_under(self.workdir)
        return mountpoint / "disk"

    async def unfuse(self, mountpoint: Path) -> int:
        """Unmount an nbdfuse mount; return nbdfuse's exit code."""
        await run("fusermount3", "-u", mountpoint)
        proc = self._fuse_procs.pop(str(mountpoint))
        self._held.remove(("fuse", str(mountpoint)))
        with trio.fail_after(FUSE_EXIT_TIMEOUT_S):
            return await proc.wait()

    def leftovers(self) -> list[str]:
        """What the kernel still holds of ours: mounts, loop devices, processes."""
        procs = [f"nbdfuse pid {p.pid}" for p in self._fuse_procs.values() if p.poll() is None]
        return mounted_under(self.workdir) + loops_under(self.workdir) + procs

    async def release_all(self) -> None:
        """Undo everything still recorded, newest first, ignoring failures."""

        async def quietly(*argv: str) -> bool:
            with trio.move_on_after(CLEANUP_STEP_TIMEOUT_S):
                proc = await trio.run_process(
                    list(argv), capture_stdout=True, capture_stderr=True, check=False
                )
                return proc.returncode == 0
            return False

        while self._held:
            kind, key = self._held.pop()
            if kind == "mount":
                if not await quietly("umount", key):
                    await quietly("umount", "--lazy", key)
            elif kind == "loop":
                await quietly("losetup", "--detach", key)
            else:
                if not await quietly("fusermount3", "-u", key):
                    await quietly("umount", "--lazy", key)
                proc = self._fuse_procs.pop(key)
                with trio.move_on_after(FUSE_EXIT_TIMEOUT_S):
                    await proc.wait()
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
                    await quietly("umount", "--lazy", key)


@contextlib.asynccontextmanager
async def attachments(workdir: Path) -> AsyncIterator[Attachments]:
    """An :class:`Attachments` whose leftovers are released however the block exits."""
    workdir.mkdir(parents=True, exist_ok=True)
    att = Attachments(workdir)
    try:
        yield att
    finally:
        with trio.move_on_after(CLEANUP_TIMEOUT_S) as scope:
            scope.shield = True
            await att.release_all()


def write_tree(root: Path, seed: int) -> dict[str, str]:
    """Write files of known content below ``root`` (about 3 MiB in all);
    return their sha256 by path relative to ``root``."""
    rng = random.Random(seed)
    contents = {
        "hello.txt": b"geoclus interop: ext4 over nbdfuse over a replicated volume\n",
        "odd.bin": rng.randbytes(4097),  # crosses a block boundary by one byte
        "dir/a.bin": rng.randbytes(300 * 1024),
        "dir/sub/b.bin": rng.randbytes(2 * MiB + 12345),
        "zeros.bin": bytes(512 * 1024),
        "empty": b"",
    }
    for rel, data in contents.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in contents.items()}


def read_tree(root: Path) -> dict[str, str]:
    """sha256 of every regular file below ``root`` except lost+found."""
    found = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] == "lost+found" or not path.is_file():
            continue
        found[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


async def fio(target_uri: str, workdir: Path, *job: str) -> tuple[int, dict[str, Any]]:
    """Run the fio job against ``target_uri``; return its exit code and its
    JSON report's only job."""
    report = workdir / "fio.json"
    report.unlink(missing_ok=True)
    proc = await run_unchecked(
        "fio",
        "--name=interop",
        "--ioengine=nbd",
        f"--uri={target_uri}",
        *FIO_JOB,
        *job,
        "--output-format=json",
        f"--output={report}",
        cwd=workdir,
    )
    jobs = json.loads(report.read_text())["jobs"]
    assert len(jobs) == 1, jobs
    return proc.returncode, jobs[0]


# -- tests -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_nbdinfo_sees_writable_primary_and_read_only_secondary(tmp_path, mode) -> None:
    need("nbdinfo")
    async with running_pair(str(tmp_path), SiteOptions(mode=mode, size=VOLUME)) as pair:
        info_a = json.loads(await run("nbdinfo", "--json", uri(pair.a.nbd)))["exports"]
        info_b = json.loads(await run("nbdinfo", "--json", uri(pair.b.nbd)))["exports"]
        assert [e["export-name"] for e in info_a] == [e["export-name"] for e in info_b] == ["demo"]
        a, b = info_a[0], info_b[0]
        assert a["export-size"] == b["export-size"] == VOLUME_BYTES
        assert a["is_read_only"] is False
        assert b["is_read_only"] is True
        assert a["can_flush"] and a["can_fua"]
        # The one-flag forms agree (exit 0: true, 2: false).
        assert int(await run("nbdinfo", "--size", uri(pair.a.nbd))) == VOLUME_BYTES
        assert (await run_unchecked("nbdinfo", "--can", "write", uri(pair.a.nbd))).returncode == 0
        assert (await run_unchecked("nbdinfo", "--can", "write", uri(pair.b.nbd))).returncode == 2
        assert await pair.stop() == (0, 0)


@pytest.mark.parametrize("mode", MODES)
async def test_fio_verify_on_primary_and_on_live_secondary(tmp_path, mode) -> None:
    """fio writes and crc32c-verifies 16 MiB on the primary; the same job in
    verify-only mode passes on the secondary's read-only export (and fails on
    a region fio never wrote, so it does check); both stores end identical."""
    need_fio_nbd()
    async with running_pair(str(tmp_path), SiteOptions(mode=mode, size=VOLUME)) as pair:
        code, job = await fio(uri(pair.a.nbd), tmp_path, "--do_verify=1", f"--randseed={FIO_SEED}")
        assert code == 0 and job["error"] == 0, job
        assert job["write"]["io_bytes"] == FIO_BYTES
        assert job["read"]["io_bytes"] == FIO_BYTES  # the verify pass read it all back
        sa, _ = await replicated(pair, mode)
        assert sa["last_seq"] >= FIO_BYTES // 4096
        assert sa["nbd"]["bytes_written"] == FIO_BYTES

        # The secondary's export, while it replicates, holds what fio wrote.
        code, job = await fio(uri(pair.b.nbd), tmp_path, "--verify_only", f"--randseed={FIO_SEED}")
        assert code == 0 and job["error"] == 0, job
        assert job["read"]["io_bytes"] == FIO_BYTES
        # The check can fail: the next 16 MiB were never written (zeros).
        code, job = await fio(
            uri(pair.b.nbd),
            tmp_path,
            "--verify_only",
            f"--randseed={FIO_SEED}",
            f"--offset={FIO_BYTES}",
        )
        assert code != 0 and job["error"] != 0, "fio verified blocks it never wrote"
        assert (await status(pair.b))["nbd"]["bytes_written"] == 0
        assert await pair.stop() == (0, 0)
    assert digest(pair.a.store) == digest(pair.b.store)


@pytest.mark.parametrize("mode", MODES)
async def test_ext4_through_nbdfuse_on_primary_mounts_on_secondary_store(tmp_path, mode) -> None:
    """mkfs.ext4 and files through nbdfuse + a loop device on the primary's
    export; after a clean stop the secondary's store file checks clean with
    e2fsck, mounts read-only with every file intact, and equals the primary's."""
    need_block_tools()
    expected: dict[str, str] = {}
    async with running_pair(str(tmp_path / "pair"), SiteOptions(mode=mode, size=VOLUME)) as pair:
        async with attachments(tmp_path) as att:
            disk = await att.fuse(uri(pair.a.nbd), tmp_path / "fuse")
            assert disk.stat().st_size == VOLUME_BYTES
            dev = await att.attach(disk)
            await run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
            mnt = tmp_path / "mnt-primary"
            await att.mount(dev, mnt)
            expected = await trio.to_thread.run_sync(write_tree, mnt, 5)
            # Not in this thread: in sync mode the flush waits for the link
            # emulator, which runs in this trio loop.
            await run("sync")
            await att.umount(mnt)
            await run("e2fsck", "-fn", dev)
            await att.detach(dev)
            assert await att.unfuse(tmp_path / "fuse") == 0
            assert att.leftovers() == []
        sa, _ = await replicated(pair, mode)
        assert sa["nbd"]["bytes_written"] >= 3 * MiB  # the files and the metadata
        assert await pair.stop() == (0, 0)

    store_b = pair.b.store
    await run("e2fsck", "-fn", store_b)
    before = digest(store_b)
    async with attachments(tmp_path) as att:
        dev = await att.attach(store_b, read_only=True)
        mnt = tmp_path / "mnt-secondary"
        await att.mount(dev, mnt, "ro,noload")
        found = await trio.to_thread.run_sync(read_tree, mnt)
        await att.umount(mnt)
        await att.detach(dev)
        assert att.leftovers() == []
    assert found == expected
    assert digest(store_b) == before  # the read-only mount wrote nothing
    assert digest(pair.a.store) == before


@pytest.mark.parametrize("mode", MODES)
async def test_qemu_img_convert_and_compare_both_ways(tmp_path, mode) -> None:
    """qemu-img writes an image into the primary's export and reads it back;
    `qemu-img compare` says the export, the secondary's export (once caught
    up) and the source are identical, and that a changed copy differs."""
    need("qemu-img")
    src = tmp_path / "src.img"
    rng = random.Random(11)
    with open(src, "wb") as f:
        for _ in range(16):
            f.write(rng.randbytes(MiB))
    opts = SiteOptions(mode=mode, size=VOLUME)
    async with running_pair(str(tmp_path / "pair"), opts) as pair:
        uri_a = f"nbd+unix:///demo?socket={pair.a.nbd}"
        uri_b = f"nbd+unix:///demo?socket={pair.b.nbd}"
        await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri_a)
        back = tmp_path / "back.img"
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri_a, back)
        with open(back, "rb") as f:
            assert f.read(16 * MiB) == src.read_bytes()
        # The export is 64 MiB, the source 16: compare the first 16 MiB.
        small = tmp_path / "small.img"
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri_a, small)
        with open(small, "r+b") as f:
            f.truncate(16 * MiB)
        out = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", small, src)
        assert "identical" in out.lower()
        with trio.fail_after(CATCH_UP_TIMEOUT_S):
            while True:
                sa = await trio.to_thread.run_sync(pair.a.status)
                sb = await trio.to_thread.run_sync(pair.b.status)
                if sb["applied_seq"] >= sa["last_seq"]:
                    break
                await trio.sleep(0.05)
        out = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri_a, uri_b)
        assert "identical" in out.lower()
        with open(small, "r+b") as f:
            f.seek(5 * MiB)
            f.write(b"\x01" * 512)
        r = await run_unchecked("qemu-img", "compare", "-f", "raw", "-F", "raw", small, src)
        assert r.returncode == 1, r  # a difference is found, not an error
        assert await pair.stop() == (0, 0)
