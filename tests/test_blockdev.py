"""A store on an existing block device (a loop device made for the test)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from geoclus.errors import IOAlignmentError, StoreError
from replicator.store import FileStore

SIZE = 8 * 1024 * 1024


def _can_loop() -> str | None:
    if os.geteuid() != 0:
        return "needs root to attach a loop device"
    if shutil.which("losetup") is None:
        return "needs losetup (Debian util-linux / mount)"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control on this machine"
    return None


@pytest.fixture
def loop_device(tmp_path):
    reason = _can_loop()
    if reason:
        pytest.skip(reason)
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    proc = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        pytest.skip(f"losetup could not attach a loop device: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "--detach", dev], timeout=30, check=False)


def test_store_on_a_block_device(loop_device) -> None:
    dev, backing = loop_device
    store = FileStore(dev, SIZE)
    try:
        assert store.info.is_block_device and not store.info.created
        data = bytes(range(256)) * 16
        store.write(4096, data, fua=True)
        assert store.read(4096, len(data)) == data
        store.write_zeroes(4096, 512)
        assert store.read(4096, 512) == bytes(512)
        store.fdatasync()
        with pytest.raises(IOAlignmentError):
            store.write(SIZE - 512, bytes(1024))
    finally:
        store.close()
    with open(backing, "rb") as f:  # it really went to the device
        f.seek(4096 + 512)
        assert f.read(len(data) - 512) == data[512:]


def test_block_device_smaller_than_configured_is_refused(loop_device) -> None:
    dev, _ = loop_device
    with pytest.raises(StoreError, match=r"block device .* holds"):
        FileStore(dev, SIZE * 2)
