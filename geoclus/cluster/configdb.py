"""The cluster configuration database (sans-I/O): what the global update log
builds, its checkpoints, and its backup files.

Every committed log entry carries one update, a dict with an ``op``:

* ``{"op": "set", "key": K, "value": V}``: set a key (keys are dotted names,
  values JSON);
* ``{"op": "delete", "key": K}``;
* ``{"op": "evict", "node": NAME}``: the node leaves the configuration (and
  the vote total, once the next view forms) and its certificate is refused
  from then on; an eviction is permanent;
* ``{"op": "pause", "node": NAME}`` / ``{"op": "resume", "node": NAME}``;
* ``{"op": "restore", "values": {...}, "evicted": [...], "paused": [...],
  "from_version": N}``: ``geoclus cluster restore``: the whole database is
  replaced by a backup's contents, as one update (atomic, in log order),
  except the evicted nodes: evictions change the vote total one at a time
  through ``evict`` and are never undone, so a restore keeps the current
  evicted set (the daemon reports backup evictions that are not in force).

:class:`ConfigDb` applies entries strictly in log order (an entry whose index
is not the next one is refused) and is *versioned*: ``version`` is the index
of the last applied entry. A bad update (unknown op, missing field, a value
that is not JSON) is refused with :class:`ConfigDbError` before anything
changes; since every node applies the same committed log, every node refuses
the same update and stays identical.

:meth:`ConfigDb.checkpoint` is a self-checking snapshot (JSON with a SHA-256);
the same state is the log's snapshot when the log is reset (compacted): a node
that rejoins with a stale copy receives the snapshot and replays the log
after it (:meth:`ConfigDb.from_state` + :meth:`apply`). The same
format is the backup file of ``geoclus cluster backup`` / ``restore``; a
truncated, corrupt or foreign file is refused naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from geoclus.errors import GeoclusError

FORMAT = "geoclus-configdb"
FORMAT_VERSION = 1
MAX_KEY_BYTES = 256
MAX_VALUE_BYTES = 64 * 1024
MAX_KEYS = 100_000


class ConfigDbError(GeoclusError):
    """An update or a checkpoint was refused; nothing changed."""


@dataclass
class ConfigDb:
    """The configuration as of log index ``version``."""

    cluster: str
    version: int = 0
    values: dict[str, Any] = field(default_factory=dict)
    evicted: set[str] = field(default_factory=set)
    paused: set[str] = field(default_factory=set)

    def apply(self, index: int, update: Any) -> None:
        """Apply the committed entry at ``index`` (must be ``version + 1``)."""
        if index != self.version + 1:
            raise ConfigDbError(
                f"update {index} is out of order: the database is at version {self.version}"
            )
        change = _validate(update)
        op = change["op"]
        if op == "set":
            if change["key"] not in self.values and len(self.values) >= MAX_KEYS:
                raise ConfigDbError(f"the database holds {MAX_KEYS} keys already")
            self.values[change["key"]] = change["value"]
        elif op == "delete":
            self.values.pop(change["key"], None)
        elif op == "evict":
            self.evicted.add(change["node"])
            self.paused.discard(change["node"])
        elif op == "pause":
            self.paused.add(change["node"])
        elif op == "resume":
            self.paused.discard(change["node"])
        elif op == "restore":
            self.values = dict(change["values"])
            self.paused = set(change["paused"]) - self.evicted
        self.version = index

    def state(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "version": self.version,
            "values": self.values,
            "evicted": sorted(self.evicted),
            "paused": sorted(self.paused),
        }

    def checkpoint(self) -> bytes:
        """A self-checking snapshot of this version (also the backup format)."""
        body = json.dumps(self.state(), sort_keys=True, separators=(",", ":"))
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "sha256": hashlib.sha256(body.encode()).hexdigest(),
            "state": body,
        }
        return (json.dumps(doc, sort_keys=True) + "\n").encode()

    @classmethod
    def from_checkpoint(cls, data: bytes, cluster: str | None = None) -> ConfigDb:
        """Load a checkpoint or backup; ``cluster``, if given, must match."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ConfigDbError("not a configuration backup: not JSON (truncated?)") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ConfigDbError("not a configuration backup (no geoclus-configdb header)")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ConfigDbError(
                f"backup format version {doc.get('format_version')!r}; this geoclus reads "
                f"{FORMAT_VERSION}"
            )
        body = doc.get("state")
        if not isinstance(body, str):
            raise ConfigDbError("backup has no state")
        if hashlib.sha256(body.encode()).hexdigest() != doc.get("sha256"):
            raise ConfigDbError("backup checksum mismatch: the file is corrupt")
        try:
            state = json.loads(body)
        except ValueError:
            raise ConfigDbError("backup state is not JSON: the file is corrupt") from None
        return cls.from_state(state, cluster, what="backup")

    @classmethod
    def from_state(cls, state: Any, cluster: str | None = None, what: str = "snapshot") -> ConfigDb:
        """The database whose :meth:`state` is ``state`` (a log snapshot's or a
        checkpoint's), checked field by field: a malformed state raises
        ConfigDbError naming the problem."""
        if not isinstance(state, dict) or set(state) != {
            "cluster",
            "version",
            "values",
            "evicted",
            "paused",
        }:
            raise ConfigDbError(
                f"{what} is not a configuration state (cluster, version, values, evicted, paused)"
            )
        name = state["cluster"]
        if not isinstance(name, str):
            raise ConfigDbError(f"{what}: cluster must be a name")
        if cluster is not None and name != cluster:
            raise ConfigDbError(f"{what} of cluster {name!r}, this is cluster {cluster!r}")
        version = state["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ConfigDbError(f"{what}: version must be a version number")
        _validate_restore(
            {
                "op": "restore",
                "values": state["values"],
                "evicted": state["evicted"],
                "paused": state["paused"],
                "from_version": version,
            }
        )
        return cls(
            cluster=name,
            version=version,
            values=dict(state["values"]),
            evicted=set(state["evicted"]),
            paused=set(state["paused"]),
        )


_FIELDS = {
    "set": {"op", "key", "value"},
    "delete": {"op", "key"},
    "evict": {"op", "node"},
    "pause": {"op", "node"},
    "resume": {"op", "node"},
    "restore": {"op", "values", "evicted", "paused", "from_version"},
}


def validate_update(update: Any) -> dict[str, Any]:
    """``update`` if it is a well-formed update, else ConfigDbError naming the problem."""
    return _validate(update)


def _validate(update: Any) -> dict[str, Any]:
    if not isinstance(update, dict):
        raise ConfigDbError(f"an update must be a table with an op, not {type(update).__name__}")
    op = update.get("op")
    need = _FIELDS.get(op) if isinstance(op, str) else None
    if need is None:
        raise ConfigDbError(
            f"unknown update op {op!r} (set, delete, evict, pause, resume, restore)"
        )
    if set(update) != need:
        raise ConfigDbError(f"update {op} takes exactly {sorted(need)}, got {sorted(update)}")
    if "key" in update:
        key = update["key"]
        if not isinstance(key, str) or not key or len(key.encode()) > MAX_KEY_BYTES:
            raise ConfigDbError(f"key must be a non-empty string of at most {MAX_KEY_BYTES} bytes")
    if "node" in update and (not isinstance(update["node"], str) or not update["node"]):
        raise ConfigDbError("node must be a node name")
    if "value" in update:
        try:
            text = json.dumps(update["value"], allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigDbError(f"value of {update['key']!r} is not JSON: {exc}") from None
        if len(text) > MAX_VALUE_BYTES:
            raise ConfigDbError(f"value of {update['key']!r} is over {MAX_VALUE_BYTES} bytes")
    if op == "restore":
        _validate_restore(update)
    return update


def _validate_restore(update: dict[str, Any]) -> None:
    values = update["values"]
    if not isinstance(values, dict) or len(values) > MAX_KEYS:
        raise ConfigDbError(f"restore: values must be a table of at most {MAX_KEYS} keys")
    for key, value in values.items():
        _validate({"op": "set", "key": key, "value": value})
    for name in ("evicted", "paused"):
        nodes = update[name]
        if not isinstance(nodes, list) or not all(isinstance(n, str) and n for n in nodes):
            raise ConfigDbError(f"restore: {name} must be a list of node names")
    v = update["from_version"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigDbError("restore: from_version must be a version number")
