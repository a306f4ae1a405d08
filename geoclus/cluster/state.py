"""A cluster node's state directory: what must survive a crash.

* ``cluster-state.json``: the node core's :class:`~geoclus.cluster.node.Disk`
  (promised view, installed view and members, the configuration log as its
  snapshot plus the entries after it, the commit index, the force-quorum
  flag). Written atomically (temporary file, fsync, rename, fsync of the
  directory) before any message that depends on it is sent. Self-checking
  (SHA-256): a corrupt or truncated file stops the node with an error naming
  it; it is never silently reset, because a node that forgot a promise could
  help form two views.
* ``epoch``: the boot epoch, one higher on every start (heartbeat replay
  protection across restarts).
* ``heartbeat.key``: the cluster heartbeat key and its generation, received
  over mutual TLS (mode 0600).
* ``configdb.checkpoint``: the configuration database's latest checkpoint
  (written every ``snapshot_interval_s`` and on demand).
* ``events.jsonl``: this node's view of the cluster-wide event log, bounded
  (the oldest half is dropped when it reaches ``max_events``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from typing import Any

from geoclus.cluster.messages import NO_SNAPSHOT, Entry, Snapshot, View
from geoclus.cluster.node import Disk
from geoclus.cluster.wire import EventRecord, WireError, from_json, to_json
from geoclus.errors import GeoclusError

STATE_FORMAT = "geoclus-cluster-state"
STATE_VERSION = 1
DEFAULT_MAX_EVENTS = 10_000


class StateError(GeoclusError):
    """The state directory cannot be used; the message names the file."""


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` durably: a crash leaves the old or the
    new contents, never a mix."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _sealed(body: dict[str, Any]) -> bytes:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    doc = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "body": text,
    }
    return (json.dumps(doc) + "\n").encode()


def _unseal(path: str, data: bytes) -> dict[str, Any]:
    hint = f"{path} is damaged; restore it from a backup or rejoin the node with an empty state_dir"
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise StateError(f"{path} is not JSON (truncated?): {hint}") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise StateError(f"{path} is not a geoclus cluster state file")
    if doc.get("version") != STATE_VERSION:
        raise StateError(f"{path} has state version {doc.get('version')!r}, expected 1")
    body = doc.get("body")
    if not isinstance(body, str) or hashlib.sha256(body.encode()).hexdigest() != doc.get("sha256"):
        raise StateError(f"{path}: checksum mismatch: {hint}")
    parsed = json.loads(body)
    if not isinstance(parsed, dict):
        raise StateError(f"{path}: body is not an object: {hint}")
    return parsed


def disk_to_json(disk: Disk) -> dict[str, Any]:
    """Plain JSON of a Disk (also what tests compare)."""
    return {
        "promised": list(disk.promised),
        "normal_view": list(disk.normal_view),
        "members": sorted(disk.members),
        "log": to_json(tuple(disk.log)),
        "commit": disk.commit,
        "forced": disk.forced,
        "base": to_json(disk.base),
        "voters": None if disk.voters is None else sorted(disk.voters),
    }


def disk_from_json(doc: dict[str, Any], where: str) -> Disk:
    try:
        return Disk(
            promised=from_json(View, doc["promised"], f"{where}.promised"),
            normal_view=from_json(View, doc["normal_view"], f"{where}.normal_view"),
            members=from_json(frozenset[int], doc["members"], f"{where}.members"),
            log=list(from_json(tuple[Entry, ...], doc["log"], f"{where}.log")),
            commit=from_json(int, doc["commit"], f"{where}.commit"),
            forced=from_json(bool, doc["forced"], f"{where}.forced"),
            base=from_json(Snapshot, doc.get("base", to_json(NO_SNAPSHOT)), f"{where}.base"),
            voters=from_json(frozenset[int] | None, doc.get("voters"), f"{where}.voters"),
        )
    except KeyError as exc:
        raise StateError(f"{where}: missing {exc.args[0]!r}") from None
    except WireError as exc:
        raise StateError(str(exc)) from None


@dataclass
class StateDir:
    """One node's (or the witness's) state directory."""

    path: str
    max_events: int = DEFAULT_MAX_EVENTS

    def __post_init__(self) -> None:
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state_dir {self.path}: {exc.strerror}") from None

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # --- the core's Disk -----------------------------------------------------------

    def load_disk(self) -> Disk | None:
        """The saved Disk, or None on a first start."""
        path = self._file("cluster-state.json")
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return disk_from_json(_unseal(path, f.read()), path)

    def save_disk(self, disk: Disk) -> None:
        write_atomic(self._file("cluster-state.json"), _sealed(disk_to_json(disk)))

    # --- generic sealed JSON (the witness's state) -----------------------------------

    def load_json(self, name: str) -> dict[str, Any] | None:
        path = self._file(name)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return _unseal(path, f.read())

    def save_json(self, name: str, body: dict[str, Any]) -> None:
        write_atomic(self._file(name), _sealed(body))

    # --- boot epoch and heartbeat key ------------------------------------------------

    def next_epoch(self) -> int:
        """One more than the last start's epoch, made durable before it is used."""
        path = self._file("epoch")
        last = 0
        if os.path.exists(path):
            with open(path) as f:
                text = f.read().strip()
            if not text.isdigit():
                raise StateError(f"{path} holds {text[:20]!r}, not an epoch number")
            last = int(text)
        write_atomic(path, f"{last + 1}\n".encode())
        return last + 1

    def load_key(self) -> tuple[int, bytes] | None:
        path = self._file("heartbeat.key")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            gen, _, hexkey = f.read().strip().partition(":")
        try:
            key = bytes.fromhex(hexkey)
            generation = int(gen)
        except ValueError:
            raise StateError(
                f"{path} is damaged: delete it, the cluster hands it out again"
            ) from None
        if len(key) < 16:
            raise StateError(f"{path} holds a key shorter than 16 bytes: delete it")
        return generation, key

    def save_key(self, generation: int, key: bytes) -> None:
        write_atomic(self._file("heartbeat.key"), f"{generation}:{key.hex()}\n".encode())

    @staticmethod
    def new_key() -> bytes:
        return secrets.token_bytes(32)

    # --- configuration checkpoints ------------------------------------------------

    def save_checkpoint(self, data: bytes) -> None:
        write_atomic(self._file("configdb.checkpoint"), data)

    # --- events -------------------------------------------------------------------

    def load_events(self) -> list[EventRecord]:
        path = self._file("events.jsonl")
        out: list[EventRecord] = []
        if not os.path.exists(path):
            return out
        with open(path, "rb") as f:
            for line in f:
                try:
                    out.append(from_json(EventRecord, json.loads(line), "event"))
                except (ValueError, WireError):
                    continue  # a torn last line after a crash: events are advisory
        return out[-self.max_events :]

    def append_events(self, events: list[EventRecord], all_events: list[EventRecord]) -> None:
        """Append ``events``; when the file holds ``max_events``, rewrite it
        with the newest half of ``all_events``."""
        path = self._file("events.jsonl")
        if len(all_events) >= self.max_events:
            keep = all_events[-self.max_events // 2 :]
            data = b"".join(json.dumps(to_json(e)).encode() + b"\n" for e in keep)
            write_atomic(path, data, 0o644)
            return
        with open(path, "ab") as f:
            for e in events:
                f.write(json.dumps(to_json(e)).encode() + b"\n")
