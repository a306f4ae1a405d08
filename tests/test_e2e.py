"""End to end: two real daemon processes over loopback, mutual TLS, through the
link emulator, driven through the NBD export by our client and by real NBD
clients (nbdinfo, nbdcopy, qemu-io)."""

from __future__ import annotations

import json
import random
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import xxhash

from geoclus.ca import client_ssl_context, init_ca, issue_node_cert
from geoclus.nbd.client import NbdClient, NbdClientError
from geoclus.testing.sitepair import SiteOptions, running_pair
from replicator.meta import MetaFile

pytestmark = pytest.mark.process

BLOCK = 4096


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return xxhash.xxh3_128_hexdigest(f.read())


class Writer:
    """NBD client plus the history of what it wrote (QD1: order == sequence)."""

    def __init__(self, client: NbdClient, size: int, seed: int = 1) -> None:
        self.client = client
        self.size = size
        self.rng = random.Random(seed)
        self.history: list[tuple[int, bytes]] = []

    async def write(self, n: int, blocks: int | None = None) -> None:
        span = blocks or self.size // BLOCK
        for _ in range(n):
            offset = self.rng.randrange(span) * BLOCK
            data = self.rng.randbytes(BLOCK)
            await self.client.write(offset, data)
            self.history.append((offset, data))

    def image(self, k: int | None = None) -> bytes:
        img = bytearray(self.size)
        for offset, data in self.history[: len(self.history) if k is None else k]:
            img[offset : offset + len(data)] = data
        return bytes(img)


async def read_all(path: str, size: int) -> bytes:
    c = await NbdClient.connect_unix(path, "demo")
    async with trio.open_nursery() as n:
        await n.start(c.run)
        parts = [await c.read(off, 1 << 20) for off in range(0, size, 1 << 20)]
        await c.aclose()
        n.cancel_scope.cancel()
    return b"".join(parts)


async def status(site: object) -> dict:
    return await trio.to_thread.run_sync(site.status)  # type: ignore[attr-defined]


async def test_sync_pipelined_writes_reach_both_sites(tmp_path) -> None:
    opts = SiteOptions(mode="sync", size="16MiB")
    async with running_pair(str(tmp_path), opts) as pair:
        client = await NbdClient.connect_unix(pair.a.nbd, "demo")
        expected = bytearray(16 << 20)
        async with trio.open_nursery() as n:
            await n.start(client.run)
            rng = random.Random(7)

            # 64 concurrent writers on disjoint blocks (order among them is free).
            async def worker(w: int) -> None:
                for i in range(20):
                    off = (w * 20 + i) * BLOCK
                    data = rng.randbytes(BLOCK)
                    expected[off : off + BLOCK] = data
                    await client.write(off, data, fua=(i == 19))

            async with trio.open_nursery() as workers:
                for w in range(64):
                    workers.start_soon(worker, w)
            await client.flush()
            # Sync: every acknowledged write is on the secondary now.
            sb = await status(pair.b)
            sa = await status(pair.a)
            assert sa["connected"] and sa["role"] == "primary" and sa["mode"] == "sync"
            assert sb["applied_seq"] == sa["last_seq"] == 64 * 20
            assert sb["durable_seq"] == sa["last_seq"]  # the flush made them durable there
            # The secondary's export serves reads and refuses writes.
            ro = await NbdClient.connect_unix(pair.b.nbd, "demo")
            assert ro.export is not None and ro.export.read_only
            async with trio.open_nursery() as n2:
                await n2.start(ro.run)
                with pytest.raises(NbdClientError) as err:
                    await ro.write(0, b"x" * BLOCK)
                assert err.value.error == 1  # EPERM
                assert await ro.read(0, BLOCK) == bytes(expected[:BLOCK])
                await ro.aclose()
                n2.cancel_scope.cancel()
            await client.aclose()
            n.cancel_scope.cancel()
        codes = await pair.stop()
    assert codes == (0, 0)
    assert digest(pair.a.store) == digest(pair.b.store) == xxhash.xxh3_128_hexdigest(expected)
    # SIGTERM was a clean shutdown on both sites.
    for site in (pair.a, pair.b):
        meta = MetaFile(site.store + ".meta")
        state = meta.open()
        meta.close()
        assert state is not None and state.clean


async def test_async_cut_keeps_secondary_a_prefix(tmp_path) -> None:
    opts = SiteOptions(mode="async", size="8MiB")
    async with running_pair(str(tmp_path), opts) as pair:
        client = await NbdClient.connect_unix(pair.a.nbd, "demo")
        async with trio.open_nursery() as n:
            await n.start(client.run)
            w = Writer(client, 8 << 20)
            await w.write(300, blocks=64)  # overlapping writes, small region
            assert pair.link is not None
            pair.link.cut()
            await w.write(300, blocks=64)  # async keeps going while cut off
            await trio.sleep(0.3)
            sb = await status(pair.b)
            k = sb["applied_seq"]
            assert k < len(w.history)  # it really is behind
            assert await read_all(pair.b.nbd, 8 << 20) == w.image(k)
            sa = await status(pair.a)
            assert sa["lag_writes"] == len(w.history) - sa["peer_applied_seq"] > 0
            assert sa["lag_bytes"] > 0
            pair.link.restore()
            await w.write(50, blocks=64)
            await client.flush()
            with trio.fail_after(20):
                while (await status(pair.a))["lag_writes"]:
                    await trio.sleep(0.05)
            await client.aclose()
            n.cancel_scope.cancel()
        assert await pair.stop() == (0, 0)
    final = xxhash.xxh3_128_hexdigest(w.image())
    assert digest(pair.a.store) == digest(pair.b.store) == final


async def test_secondary_killed_and_restarted_catches_up(tmp_path) -> None:
    opts = SiteOptions(mode="async", size="8MiB")
    async with running_pair(str(tmp_path), opts) as pair:
        client = await NbdClient.connect_unix(pair.a.nbd, "demo")
        async with trio.open_nursery() as n:
            await n.start(client.run)
            w = Writer(client, 8 << 20, seed=3)
            await w.write(200, blocks=256)
            await pair.stop_site(pair.b, signal.SIGKILL)
            await w.write(200, blocks=256)
            await pair._start_site(pair.b)
            sb = await status(pair.b)
            assert sb["role"] == "secondary"
            await pair.wait_connected()
            await w.write(20, blocks=256)
            with trio.fail_after(20):
                while (await status(pair.a))["lag_writes"]:
                    await trio.sleep(0.05)
            sb = await status(pair.b)
            assert sb["applied_seq"] == len(w.history)
            assert sb["consistency"] == "consistent"
            await client.aclose()
            n.cancel_scope.cancel()
        assert await pair.stop() == (0, 0)
    assert digest(pair.b.store) == digest(pair.a.store) == xxhash.xxh3_128_hexdigest(w.image())


async def test_peer_with_foreign_certificate_is_refused(tmp_path) -> None:
    opts = SiteOptions(mode="sync", size="4MiB")
    async with running_pair(str(tmp_path / "pair"), opts) as pair:
        other = tmp_path / "other-ca"
        init_ca(str(other), "intruders")
        issue_node_cert(str(other), "site-a")  # same name, wrong CA
        ctx = client_ssl_context(f"{other}/ca.crt", f"{other}/site-a.crt", f"{other}/site-a.key")
        cfg = Path(pair.b.config).read_text()
        port = int(cfg.split('listen = "127.0.0.1:')[1].split('"')[0])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(stream, ctx, server_hostname=None)
        with pytest.raises(trio.BrokenResourceError) as err:
            with trio.fail_after(10):
                await tls.do_handshake()
                await tls.send_all(b"x")
                await tls.receive_some(10)
        assert isinstance(err.value.__cause__, ssl.SSLError)
        await trio.aclose_forcefully(tls)
        # The real pair is unaffected.
        assert (await status(pair.a))["connected"]
    assert "refused replication connection" in Path(pair.b.log).read_text()


@pytest.mark.interop
@pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nbdinfo", "nbdcopy", "qemu-io")),
    reason="needs nbdinfo, nbdcopy (Debian libnbd-bin) and qemu-io (qemu-utils)",
)
async def test_real_nbd_clients_against_replicated_primary(tmp_path) -> None:
    for mode in ("sync", "async"):
        opts = SiteOptions(mode=mode, size="16MiB")
        work = tmp_path / mode
        async with running_pair(str(work), opts) as pair:
            uri_a = f"nbd+unix:///demo?socket={pair.a.nbd}"
            uri_b = f"nbd+unix:///demo?socket={pair.b.nbd}"

            async def run(*cmd: str) -> str:
                with trio.fail_after(60):
                    proc = await trio.run_process(
                        list(cmd), capture_stdout=True, capture_stderr=True, check=False
                    )
                assert proc.returncode == 0, (cmd, proc.stderr.decode())
                return proc.stdout.decode()

            info = json.loads(await run("nbdinfo", "--json", uri_a))
            export = info["exports"][0]
            assert export["export-size"] == 16 << 20
            assert export["is_read_only"] is False
            assert export["can_flush"] and export["can_fua"]
            # One write must fit one replication frame: the export says so.
            assert export["block_size_maximum"] <= 16 << 20
            info_b = json.loads(await run("nbdinfo", "--json", uri_b))
            assert info_b["exports"][0]["is_read_only"] is True
            src = work / "src.bin"
            src.write_bytes(random.Random(5).randbytes(8 << 20))
            await run("nbdcopy", str(src), uri_a)
            out = work / "out.bin"
            await run("nbdcopy", uri_a, str(out))
            assert out.read_bytes()[: 8 << 20] == src.read_bytes()
            await run(
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "write -P 0xab 9M 64k",
                "-c",
                "flush",
                "-c",
                "read -P 0xab 9M 64k",
                uri_a,
            )
            with trio.fail_after(20):
                while (await status(pair.a))["lag_writes"]:
                    await trio.sleep(0.05)
            # The secondary's read-only export already shows the same data.
            out_b = work / "out_b.bin"
            await run("nbdcopy", uri_b, str(out_b))
            assert (
                out_b.read_bytes()
                == out.read_bytes()[: 9 << 20]
                + b"\xab" * 65536
                + out.read_bytes()[(9 << 20) + 65536 :]
            )
            assert await pair.stop() == (0, 0)
        assert digest(pair.a.store) == digest(pair.b.store)


async def test_out_of_order_fault_is_caught_end_to_end(tmp_path) -> None:
    """With the test-only fault, the secondary applies batches in reverse: the
    end-to-end comparison must notice (this shows the check can fail)."""
    opts = SiteOptions(mode="async", size="4MiB", secondary_fault_out_of_order=True)
    async with running_pair(str(tmp_path), opts) as pair:
        client = await NbdClient.connect_unix(pair.a.nbd, "demo")
        async with trio.open_nursery() as n:
            await n.start(client.run)
            rng = random.Random(9)
            # Many pipelined writes to few blocks, so batches hold overlapping writes.
            async with trio.open_nursery() as ws:
                for _ in range(32):

                    async def burst() -> None:
                        for _ in range(30):
                            await client.write(rng.randrange(4) * BLOCK, rng.randbytes(BLOCK))

                    ws.start_soon(burst)
            await client.flush()
            # Finish with one concurrent burst to a single block: it goes out as
            # one batch (async coalescing), so which write lands last differs
            # when the batch is applied backwards.
            async with trio.open_nursery() as ws:
                for i in range(32):
                    ws.start_soon(client.write, 0, bytes([i + 1]) * BLOCK)
            await client.flush()
            with trio.fail_after(20):
                while (await status(pair.a))["lag_writes"]:
                    await trio.sleep(0.05)
            await client.aclose()
            n.cancel_scope.cancel()
        await pair.stop()
    assert "TEST FAULTS ENABLED" in Path(pair.b.log).read_text()
    assert digest(pair.a.store) != digest(pair.b.store)


def test_bad_config_is_refused_naming_the_key(tmp_path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[volume]\nname = "v"\nsize = "12 parsecs"\nstore = "v.img"\nmode = "sync"\n'
        'role = "primary"\n[replication]\nlisten = "127.0.0.1:1"\npeer = "127.0.0.1:2"\n'
        'tls = false\n[export]\nnbd = "v.nbd"\n[control]\nsocket = "v.ctl"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "geoclus", "volume", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "volume.size" in proc.stderr and "unknown unit" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "v.img").exists()  # nothing was created


async def test_link_cut_under_load_then_resync_end_to_end(tmp_path) -> None:
    """Real daemons: async with pull-ahead and a small retained log; the link is
    cut while writes go on, so the peer falls out of the log (outdated, dirty
    bitmap); after the link heals the generation decision starts a delta resync,
    writes continue during it, and at the end both images are identical."""
    opts = SiteOptions(mode="async", size="16MiB", on_congestion="pull-ahead", max_lag_bytes="1MiB")
    async with running_pair(str(tmp_path), opts) as pair:
        client = await NbdClient.connect_unix(pair.a.nbd, "demo")
        async with trio.open_nursery() as n:
            await n.start(client.run)
            w = Writer(client, 16 << 20, seed=11)
            await w.write(100)
            assert pair.link is not None
            pair.link.cut()
            await w.write(600)  # 2.4 MiB while cut off: past the 1 MiB log
            sa = await status(pair.a)
            assert sa["peer_outdated"] is True and sa["dirty_bytes"] > 0
            pair.link.restore()
            await w.write(200)  # during the resync
            with trio.fail_after(60):
                while True:
                    sa = await status(pair.a)
                    sb = await status(pair.b)
                    if (
                        sa["connected"]
                        and sa["resyncs_completed"] >= 1
                        and not sa["resync_active"]
                        and sa["lag_writes"] == 0
                        and sb["consistency"] == "consistent"
                    ):
                        break
                    await trio.sleep(0.05)
            assert sa["last_decision"]["action"] == "resync"
            proc = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "geoclus",
                    "volume",
                    "events",
                    "--config",
                    pair.a.config,
                    "--json",
                ],
                capture_stdout=True,
                capture_stderr=True,
            )
            kinds = [json.loads(line)["kind"] for line in proc.stdout.decode().splitlines()]
            assert "outdated" in kinds and "resync" in kinds and "connected" in kinds
            assert sb["lineage"]["current"] == sa["lineage"]["current"]
            await client.flush()
            await client.aclose()
            n.cancel_scope.cancel()
        assert await pair.stop() == (0, 0)
    final = xxhash.xxh3_128_hexdigest(w.image())
    assert digest(pair.a.store) == digest(pair.b.store) == final


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(120):
        return await trio.run_process(
            [sys.executable, "-m", "geoclus", "volume", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def wait_status(site, predicate, timeout_s: float = 60.0) -> dict:
    with trio.fail_after(timeout_s):
        while True:
            st = await status(site)
            if predicate(st):
                return st
            await trio.sleep(0.05)


async def test_switchover_forced_promotion_and_old_primary_rolled_back(tmp_path) -> None:
    opts = SiteOptions(mode="async", size="8MiB")
    async with running_pair(str(tmp_path), opts) as pair:
        # 1. Writes on A, then a planned switchover: no data loss, no resync.
        ca = await NbdClient.connect_unix(pair.a.nbd, "demo")
        async with trio.open_nursery() as n:
            await n.start(ca.run)
            w = Writer(ca, 8 << 20, seed=21)
            await w.write(100, blocks=512)
            await ca.aclose()
            n.cancel_scope.cancel()
        await wait_status(pair.a, lambda s: s["lag_writes"] == 0)
        proc = await run_cli("switchover", "--config", pair.a.config, "--to", pair.b.config)
        assert proc.returncode == 0, proc.stderr.decode()
        assert b"no resync" in proc.stdout
        sb = await wait_status(pair.b, lambda s: s["role"] == "primary" and s["connected"])
        assert (await status(pair.a))["role"] == "secondary"
        assert sb["last_decision"]["action"] == "in-sync"  # same generation: no resync
        cb = await NbdClient.connect_unix(pair.b.nbd, "demo")
        async with trio.open_nursery() as n:
            await n.start(cb.run)
            w.client = cb
            await w.write(50, blocks=512)
            await wait_status(pair.b, lambda s: s["lag_writes"] == 0)
            # 2. Site B is cut off; it keeps writing (async) what will be lost.
            pair.cut()
            lost = Writer(cb, 8 << 20, seed=99)
            await lost.write(20, blocks=512)
            await cb.aclose()
            n.cancel_scope.cancel()
        proc = await run_cli("promote", "--config", pair.a.config)
        assert proc.returncode != 0 and b"--force" in proc.stderr  # refused without force
        proc = await run_cli("promote", "--config", pair.a.config, "--force")
        assert proc.returncode == 0, proc.stderr.decode()
        assert b"FORCED promotion" in proc.stdout
        ca = await NbdClient.connect_unix(pair.a.nbd, "demo")
        async with trio.open_nursery() as n:
            await n.start(ca.run)
            w.client = ca
            await w.write(30, blocks=512)  # the new primary's writes
            await ca.aclose()
            n.cancel_scope.cancel()
        # 3. The old primary comes back: the operator demotes it, the link heals,
        #    and the forced primary rolls its divergent writes back.
        proc = await run_cli("demote", "--config", pair.b.config)
        assert proc.returncode == 0, proc.stderr.decode()
        pair.restore()
        sa = await wait_status(
            pair.a,
            lambda s: (
                s["connected"]
                and s["resyncs_completed"] >= 1
                and not s["resync_active"]
                and s["lag_writes"] == 0
            ),
        )
        assert sa["last_decision"]["action"] == "resync"
        await wait_status(pair.b, lambda s: s["consistency"] == "consistent")
        assert await pair.stop() == (0, 0)
    expected = xxhash.xxh3_128_hexdigest(w.image())
    assert digest(pair.a.store) == expected  # the forced primary's history
    assert digest(pair.b.store) == expected  # B's 20 divergent writes rolled back


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "geoclus", "volume", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_online_verify_through_the_cli_under_load(tmp_path) -> None:
    """`geoclus volume verify` on real daemons: no false mismatch while writes
    run; silent corruption of the secondary's store is found exactly (exit 3)
    and repaired with --resync (exit 0)."""
    region = 64 * 1024
    opts = SiteOptions(mode="sync", size="16MiB")
    async with running_pair(str(tmp_path), opts) as pair:
        client = await NbdClient.connect_unix(pair.a.nbd, "demo")
        async with trio.open_nursery() as n:
            await n.start(client.run)
            w = Writer(client, 16 << 20, seed=3)
            await w.write(200)
            await client.flush()
            stop = trio.Event()

            async def load() -> None:
                while not stop.is_set():
                    await w.write(1)

            n.start_soon(load)
            r = await trio.to_thread.run_sync(
                lambda: _cli("verify", "--config", pair.a.config, "--json")
            )
            stop.set()
            assert r.returncode == 0, r.stdout + r.stderr
            v = json.loads(r.stdout)
            assert v["state"] == "done" and v["differ_regions"] == 0
            assert v["done_bytes"] == 16 << 20
            await client.flush()
            # Silent corruption of two regions behind the secondary's back.
            with open(pair.b.store, "r+b") as f:
                for r_ in (5, 200):
                    f.seek(r_ * region + 4096)
                    f.write(b"\xee" * 512)
            r = await trio.to_thread.run_sync(
                lambda: _cli("verify", "--config", pair.a.config, "--json")
            )
            assert r.returncode == 3, r.stdout + r.stderr
            v = json.loads(r.stdout)
            assert v["differ_offsets"] == [5 * region, 200 * region]
            r = await trio.to_thread.run_sync(
                lambda: _cli("verify", "--resync", "--config", pair.a.config)
            )
            assert r.returncode == 0, r.stdout + r.stderr
            assert "2 regions differ (2 resynced)" in r.stdout
            r = await trio.to_thread.run_sync(lambda: _cli("verify", "--config", pair.a.config))
            assert r.returncode == 0 and "0 regions differ" in r.stdout, r.stdout
            r = await trio.to_thread.run_sync(lambda: _cli("verify", "--config", pair.b.config))
            assert r.returncode != 0 and "run verify on the primary" in (r.stdout + r.stderr)
            await client.aclose()
            n.cancel_scope.cancel()
        assert await pair.stop() == (0, 0)
    assert digest(pair.a.store) == digest(pair.b.store)


async def test_block_status_of_the_replicated_export_shows_holes_and_data(tmp_path) -> None:
    """`nbdinfo --map` (NBD_CMD_BLOCK_STATUS, base:allocation) on a replicated
    primary: the region written is data, the rest of the new volume a hole."""
    opts = SiteOptions(mode="sync", size="16MiB")
    async with running_pair(str(tmp_path), opts) as pair:
        client = await NbdClient.connect_unix(pair.a.nbd, "demo")
        async with trio.open_nursery() as n:
            await n.start(client.run)
            await client.write(4 << 20, b"\x5a" * (1 << 20))
            await client.flush()
            await client.aclose()
            n.cancel_scope.cancel()
        uri = f"nbd+unix:///demo?socket={pair.a.nbd}"
        r = await trio.run_process(
            ["nbdinfo", "--map", "--json", uri], capture_stdout=True, capture_stderr=True
        )
        extents = json.loads(r.stdout)
        data = [(e["offset"], e["length"]) for e in extents if e["type"] & 1 == 0]
        holes = sum(e["length"] for e in extents if e["type"] & 1)
        assert data == [(4 << 20, 1 << 20)], extents
        assert holes == (16 << 20) - (1 << 20)
        assert await pair.stop() == (0, 0)
