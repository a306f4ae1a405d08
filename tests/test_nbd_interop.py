"""Interop with real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-io, qemu-img).

The server runs in the test's trio loop; the clients run as subprocesses through
``trio.run_process`` so the server keeps serving while we wait for them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from geoclus.nbd import NbdAddresses, NbdServer
from replicator.memory import MemoryDevice

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
COMMAND_TIMEOUT_S = 60

# Debian package providing each client binary.
PACKAGES = {
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "qemu-io": "qemu-utils",
    "qemu-img": "qemu-utils",
}


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not installed (Debian package {PACKAGES[binary]})")
    return path


async def run(*argv: str) -> str:
    """Run a client to completion; return its stdout. Fails the test on non-zero exit."""
    with trio.fail_after(COMMAND_TIMEOUT_S):
        result = await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=False
        )
    if result.returncode != 0:
        pytest.fail(
            f"{argv} exited {result.returncode}:\n{result.stdout.decode()}\n"
            f"{result.stderr.decode()}"
        )
    return result.stdout.decode()


@dataclass
class Served:
    addresses: NbdAddresses
    devices: dict[str, MemoryDevice]
    server: NbdServer

    def unix_uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.addresses.unix_path}"

    def tcp_uri(self, export: str) -> str:
        host, port = self.addresses.tcp[0]
        return f"nbd://{host}:{port}/{export}"

    def qemu_unix(self, export: str) -> str:
        return f"nbd:unix:{self.addresses.unix_path}:exportname={export}"


@pytest.fixture
async def served(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Served]:
    devices = {
        "disk": MemoryDevice(8 * MiB),
        "ro": MemoryDevice(2 * MiB, read_only=True),
    }
    server = NbdServer(devices, unix_path=str(tmp_path / "nbd.sock"), tcp_port=0)
    addresses = await nursery.start(server.serve)
    yield Served(addresses, devices, server)


async def test_nbdinfo_json(served: Served) -> None:
    nbdinfo = need("nbdinfo")
    for uri in (served.unix_uri("disk"), served.tcp_uri("disk")):
        info = json.loads(await run(nbdinfo, "--json", uri))
        (export,) = info["exports"]
        assert export["export-size"] == 8 * MiB
        assert export["is_read_only"] is False
        assert export["can_flush"] and export["can_fua"] and export["can_trim"]
        assert export["block_size_minimum"] == 512
    info = json.loads(await run(nbdinfo, "--json", served.unix_uri("ro")))
    (export,) = info["exports"]
    assert export["export-size"] == 2 * MiB
    assert export["is_read_only"] is True


async def test_nbdinfo_list(served: Served) -> None:
    nbdinfo = need("nbdinfo")
    info = json.loads(await run(nbdinfo, "--json", "--list", served.unix_uri("")))
    assert sorted(e["export-name"] for e in info["exports"]) == ["disk", "ro"]


async def test_nbdcopy_in_and_out(served: Served, tmp_path: Path) -> None:
    nbdcopy = need("nbdcopy")
    source = tmp_path / "in.bin"
    source.write_bytes(os.urandom(8 * MiB))
    back = tmp_path / "out.bin"
    await run(nbdcopy, str(source), served.unix_uri("disk"))
    assert await served.devices["disk"].read(0, 8 * MiB) == source.read_bytes()
    await run(nbdcopy, served.tcp_uri("disk"), str(back))
    assert back.read_bytes() == source.read_bytes()


async def test_qemu_io_write_read_flush(served: Served) -> None:
    qemu_io = need("qemu-io")
    for target in (served.unix_uri("disk"), served.qemu_unix("disk")):
        out = await run(
            qemu_io,
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "flush",
            "-c",
            "write -z 1M 64k",
            "-c",
            "read -P 0 1M 64k",
            target,
        )
        assert "Pattern verification failed" not in out
        assert "read 1048576/1048576 bytes at offset 0" in out
    assert await served.devices["disk"].read(0, MiB) == b"\xab" * MiB
    assert served.devices["disk"].flushes >= 2


async def test_qemu_io_read_only_export(served: Served) -> None:
    qemu_io = need("qemu-io")
    out = await run(qemu_io, "-f", "raw", "-r", "-c", "read -P 0 0 64k", served.unix_uri("ro"))
    assert "read 65536/65536 bytes" in out
    with trio.fail_after(COMMAND_TIMEOUT_S):
        result = await trio.run_process(
            [qemu_io, "-f", "raw", "-c", "write 0 512", served.unix_uri("ro")],
            capture_stdout=True,
            stderr=subprocess.STDOUT,
            check=False,
        )
    assert result.returncode != 0 or b"denied" in result.stdout or b"read-only" in result.stdout


async def test_qemu_img_convert_and_compare(served: Served, tmp_path: Path) -> None:
    qemu_img = need("qemu-img")
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(3 * MiB) + bytes(2 * MiB) + os.urandom(3 * MiB))
    await run(
        qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(image), served.unix_uri("disk")
    )
    await run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(image), served.tcp_uri("disk"))
    exported = tmp_path / "exported.raw"
    await run(
        qemu_img, "convert", "-f", "raw", "-O", "raw", served.qemu_unix("disk"), str(exported)
    )
    assert exported.read_bytes() == image.read_bytes()
    assert served.server.statistics().protocol_errors == 0
