"""The cluster configuration (``geoclus node run --config FILE``).

One TOML file per node names the cluster, this node, every configured node
with its site and its addresses on one or more private networks, the quorum
kind, and the timers (units in their names). It is parsed once into frozen
dataclasses; any problem raises :class:`~geoclus.errors.ConfigError` naming
the file, the dotted key and what is wrong, and unknown keys are refused.

Example (written by ``geoclus cluster init``)::

    [cluster]
    name = "prod"
    quorum = "majority+witness"      # or "majority", "disk"
    ca = "ca/ca.crt"

    [node]
    name = "a1"                      # this node: one of [[nodes]]
    cert = "ca/a1.crt"
    key = "ca/a1.key"
    state_dir = "state"

    [[nodes]]
    name = "a1"
    site = "A"
    addresses = ["10.0.0.1:7800", "10.9.0.1:7800"]   # one per private network

    [[nodes]]
    name = "b1"
    site = "B"
    addresses = ["10.0.1.1:7800", "10.9.1.1:7800"]

    [witness]
    address = "10.0.2.1:7850"        # required for majority+witness

    [quorum_disk]                    # required for quorum = "disk"
    volume = "quorum"                # the export name of the quorum volume
    mirrors = ["10.0.0.9:10809", "10.0.1.9:10809"]   # its NBD export at each site
    allow_over_budget = false        # start even if the mirrors are over rtt_budget_us
    tls = true                       # NBD STARTTLS with this node's cluster certificate

    [timers]
    heartbeat_interval_s = 1.2
    missed_heartbeats_same_site = 5
    missed_heartbeats_cross_site = 8
    regroup_answer_timeout_s = 4
    update_timeout_s = 8
    min_arbitration_s = 7
    max_arbitration_s = 60
    quorum_disk_renew_s = 2          # the owner rewrites its reservation this often
    quorum_disk_hold_s = 6           # and owns the disk this long after a renewal
    quorum_disk_io_timeout_s = 1     # a disk operation slower than this failed
    rtt_budget_us = 500
    snapshot_interval_s = 14400      # checkpoint (and log reset) at least this often

    [log]
    compact_entries = 1000           # reset the log once this many committed entries gather
    max_entries = 100000             # at most this many entries after the snapshot
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from geoclus.cluster.node import ClusterSpec, ClusterTimers
from geoclus.config import Endpoint, parse_endpoint, read_toml
from geoclus.errors import ConfigError
from quorum.arbitration import ArbitrationTimers, check_timers
from quorum.votes import QuorumKind

# The [timers] keys, in the order `cluster init` writes them.
TIMER_KEYS = (
    "heartbeat_interval_s",
    "missed_heartbeats_same_site",
    "missed_heartbeats_cross_site",
    "regroup_answer_timeout_s",
    "update_timeout_s",
    "min_arbitration_s",
    "max_arbitration_s",
    "quorum_disk_renew_s",
    "quorum_disk_hold_s",
    "quorum_disk_io_timeout_s",
    "rtt_budget_us",
    "rtt_sustained_s",
    "snapshot_interval_s",
)
_ALLOWED: dict[str, set[str]] = {
    "cluster": {"name", "quorum", "ca"},
    "node": {"name", "cert", "key", "state_dir"},
    "nodes": {"name", "site", "addresses"},
    "witness": {"address"},
    "quorum_disk": {"volume", "mirrors", "allow_over_budget", "tls"},
    "timers": set(TIMER_KEYS),
    "log": {"compact_entries", "max_entries"},
}
MAX_NODES = 64
MAX_NETWORKS = 4


@dataclass(frozen=True)
class NodeEntry:
    """One configured node: its name, site and one address per network."""

    name: str
    site: str
    addresses: tuple[Endpoint, ...]


@dataclass(frozen=True)
class Timers(ClusterTimers):
    """The node core's timers plus the arbitration, budget and snapshot ones."""

    min_arbitration_s: float = 7.0
    max_arbitration_s: float = 60.0
    quorum_disk_renew_s: float = 2.0
    quorum_disk_hold_s: float = 6.0
    quorum_disk_io_timeout_s: float = 1.0

    def arbitration(self) -> ArbitrationTimers:
        """The quorum disk arbitration's timers."""
        return ArbitrationTimers(
            renew_interval_s=self.quorum_disk_renew_s,
            hold_s=self.quorum_disk_hold_s,
            min_arbitration_s=self.min_arbitration_s,
            max_arbitration_s=self.max_arbitration_s,
            max_io_s=self.quorum_disk_io_timeout_s,
        )

    rtt_budget_us: float = 500.0
    rtt_sustained_s: float = 10.0
    snapshot_interval_s: float = 4 * 3600.0


@dataclass(frozen=True)
class ClusterConfig:
    """Everything ``geoclus node run`` needs."""

    path: str
    name: str
    quorum: QuorumKind
    ca: str
    node: str
    cert: str
    key: str
    state_dir: str
    nodes: tuple[NodeEntry, ...]
    witness: Endpoint | None
    quorum_disk_volume: str | None
    allow_over_budget: bool
    timers: Timers
    quorum_disk_mirrors: tuple[Endpoint, ...] = ()
    quorum_disk_tls: bool = False
    log_compact_entries: int = 1000
    max_log_entries: int = 100_000

    @property
    def node_ids(self) -> dict[str, int]:
        """Node names to the core's node ids (their order in the file)."""
        return {n.name: i for i, n in enumerate(self.nodes)}

    def spec(self) -> ClusterSpec:
        """The core's view of this configuration."""
        ids = self.node_ids
        return ClusterSpec(
            nodes=tuple(ids.values()),
            sites={ids[n.name]: n.site for n in self.nodes},
            kind=self.quorum,
            timers=self.timers,
            arbitration=self.timers.arbitration(),
            max_log_entries=self.max_log_entries,
            log_compact_entries=self.log_compact_entries,
            removal=_Removal(ids),
        )


@dataclass(frozen=True, eq=False)
class _Removal:
    """Which node a configuration update evicts (``{"op": "evict", "node":
    NAME}``), as the core's :attr:`ClusterSpec.removal` wants it."""

    ids: dict[str, int]

    def __call__(self, payload: Any) -> int | None:
        if isinstance(payload, dict) and payload.get("op") == "evict":
            return self.ids.get(payload.get("node"))  # type: ignore[arg-type]
        return None


def _fail(path: str, key: str, problem: str) -> ConfigError:
    return ConfigError(path, key, problem)


def _table(path: str, data: dict[str, Any], name: str, required: bool) -> dict[str, Any]:
    value = data.get(name)
    if value is None:
        if required:
            raise _fail(path, name, f"missing table [{name}]")
        return {}
    if not isinstance(value, dict):
        raise _fail(path, name, f"must be a table [{name}]")
    _no_unknown(path, name, value, _ALLOWED[name])
    return value


def _no_unknown(path: str, where: str, table: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise _fail(
            path,
            f"{where}.{sorted(unknown)[0]}",
            f"unknown key (allowed: {', '.join(sorted(allowed))})",
        )


def _name(path: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, key, "must be a non-empty string")
    if len(value) > 64 or not all(c.isalnum() or c in "-_." for c in value):
        raise _fail(path, key, f"{value!r} must be 1-64 letters, digits, '-', '_' or '.'")
    return value


def _file(path: str, base: str, key: str, value: Any, *, must_exist: bool = True) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, key, "must be a path")
    full = os.path.join(base, os.path.expanduser(value))
    if must_exist and not os.path.isfile(full):
        raise _fail(path, key, f"{full} does not exist (create it with `geoclus cluster init`)")
    return full


def _number(path: str, key: str, value: Any, *, integer: bool = False, low: float = 0.0) -> float:
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _fail(path, key, f"must be {'an integer' if integer else 'a number'}")
    if not value > low:  # also refuses nan
        raise _fail(path, key, f"must be greater than {low:g}, not {value}")
    return value


def load_cluster_config(path: str) -> ClusterConfig:
    """Read and validate ``path``; raise ConfigError naming the key on any problem."""
    return parse_cluster_config(read_toml(path), path)


def parse_cluster_config(data: dict[str, Any], path: str = "<memory>") -> ClusterConfig:
    """Validate an already-parsed document (see :func:`load_cluster_config`)."""
    base = os.path.dirname(os.path.abspath(path))
    unknown = set(data) - set(_ALLOWED)
    if unknown:
        raise _fail(
            path, sorted(unknown)[0], f"unknown table (allowed: {', '.join(sorted(_ALLOWED))})"
        )
    cl = _table(path, data, "cluster", True)
    me = _table(path, data, "node", True)
    wt = _table(path, data, "witness", False)
    qd = _table(path, data, "quorum_disk", False)
    tm = _table(path, data, "timers", False)
    lg = _table(path, data, "log", False)

    name = _name(path, "cluster.name", cl.get("name"))
    kind_text = cl.get("quorum")
    try:
        kind = QuorumKind(kind_text)
    except ValueError:
        raise _fail(
            path,
            "cluster.quorum",
            f"{kind_text!r} is not one of {', '.join(repr(k.value) for k in QuorumKind)}",
        ) from None
    ca = _file(path, base, "cluster.ca", cl.get("ca"))

    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise _fail(path, "nodes", "give every node of the cluster as a [[nodes]] table")
    if len(raw_nodes) > MAX_NODES:
        raise _fail(path, "nodes", f"{len(raw_nodes)} nodes: at most {MAX_NODES}")
    nodes: list[NodeEntry] = []
    seen: dict[object, str] = {}
    networks: int | None = None
    for i, entry in enumerate(raw_nodes):
        where = f"nodes[{i}]"
        if not isinstance(entry, dict):
            raise _fail(path, where, "must be a table")
        _no_unknown(path, where, entry, _ALLOWED["nodes"])
        nname = _name(path, f"{where}.name", entry.get("name"))
        site = _name(path, f"{where}.site", entry.get("site"))
        addrs = entry.get("addresses")
        if not isinstance(addrs, list) or not addrs or not all(isinstance(a, str) for a in addrs):
            raise _fail(path, f"{where}.addresses", "must be a list of HOST:PORT, one per network")
        if len(addrs) > MAX_NETWORKS:
            raise _fail(path, f"{where}.addresses", f"at most {MAX_NETWORKS} networks")
        if networks is None:
            networks = len(addrs)
        elif len(addrs) != networks:
            raise _fail(
                path,
                f"{where}.addresses",
                f"{len(addrs)} addresses, but nodes[0] has {networks}: every node needs one "
                "address on every private network",
            )
        eps = tuple(
            parse_endpoint(a, lambda problem, k=f"{where}.addresses": _fail(path, k, problem))
            for a in addrs
        )
        owned: list[tuple[str, tuple[str, object]]] = [(f"{where}.name", ("name", nname))]
        owned += [(f"{where}.addresses", ("address", (e.host, e.port))) for e in eps]
        for key, value in owned:
            if value in seen:
                raise _fail(path, key, f"the same {value[0]} as {seen[value]}")
            seen[value] = key
        nodes.append(NodeEntry(nname, site, eps))

    node = _name(path, "node.name", me.get("name"))
    if node not in {n.name for n in nodes}:
        raise _fail(path, "node.name", f"{node!r} is not one of the [[nodes]]")
    cert = _file(path, base, "node.cert", me.get("cert"))
    key = _file(path, base, "node.key", me.get("key"))
    state_value = me.get("state_dir", "state")
    if not isinstance(state_value, str) or not state_value:
        raise _fail(path, "node.state_dir", "must be a directory path")
    state_dir = os.path.join(base, os.path.expanduser(state_value))

    witness = None
    if kind is QuorumKind.MAJORITY_WITNESS and "address" not in wt:
        raise _fail(path, "witness.address", "missing: majority+witness needs the witness")
    if "address" in wt:
        if not isinstance(wt["address"], str):
            raise _fail(path, "witness.address", "must be HOST:PORT")
        witness = parse_endpoint(
            wt["address"], lambda problem: _fail(path, "witness.address", problem)
        )
    if kind is QuorumKind.MAJORITY and len(nodes) == 2:
        raise _fail(
            path,
            "cluster.quorum",
            "majority with two nodes stops when either is lost: use majority+witness or disk",
        )
    volume = qd.get("volume")
    if kind is QuorumKind.DISK and not isinstance(volume, str):
        raise _fail(path, "quorum_disk.volume", "missing: the disk quorum needs a mirrored volume")
    mirrors: tuple[Endpoint, ...] = ()
    if kind is QuorumKind.DISK:
        raw = qd.get("mirrors")
        if not isinstance(raw, list) or not raw or not all(isinstance(a, str) for a in raw):
            raise _fail(
                path,
                "quorum_disk.mirrors",
                "must list the quorum volume's NBD exports as HOST:PORT, one per site",
            )
        mirrors = tuple(
            parse_endpoint(a, lambda problem: _fail(path, "quorum_disk.mirrors", problem))
            for a in raw
        )
    allow = qd.get("allow_over_budget", False)
    if not isinstance(allow, bool):
        raise _fail(path, "quorum_disk.allow_over_budget", "must be true or false")
    disk_tls = qd.get("tls", False)
    if not isinstance(disk_tls, bool):
        raise _fail(path, "quorum_disk.tls", "must be true or false")
    sites = {n.site for n in nodes}
    if kind is QuorumKind.DISK and len(sites) != 2:
        raise _fail(path, "nodes", f"the disk quorum mirrors between two sites, not {len(sites)}")

    t = Timers()
    values: dict[str, float] = {}
    for k in _ALLOWED["timers"]:
        if k in tm:
            integer = k.startswith("missed_")
            values[k] = _number(path, f"timers.{k}", tm[k], integer=integer)
    t = Timers(**values)  # type: ignore[arg-type]
    if t.max_arbitration_s <= t.min_arbitration_s:
        raise _fail(path, "timers.max_arbitration_s", "must be longer than min_arbitration_s")
    try:
        check_timers(t.arbitration())
    except ValueError as exc:
        raise _fail(path, "timers.quorum_disk_hold_s", str(exc)) from None
    if t.regroup_answer_timeout_s <= t.heartbeat_interval_s:
        raise _fail(
            path,
            "timers.regroup_answer_timeout_s",
            "must be longer than heartbeat_interval_s (a regroup must outlast a heartbeat)",
        )
    compact = int(
        _number(path, "log.compact_entries", lg.get("compact_entries", 1000), integer=True)
    )
    max_entries = int(
        _number(path, "log.max_entries", lg.get("max_entries", 100_000), integer=True)
    )
    if max_entries <= compact:
        raise _fail(
            path,
            "log.max_entries",
            f"must be larger than compact_entries ({compact}): the log resets at compact_entries",
        )
    return ClusterConfig(
        path=path,
        name=name,
        quorum=kind,
        ca=ca,
        node=node,
        cert=cert,
        key=key,
        state_dir=state_dir,
        nodes=tuple(nodes),
        witness=witness,
        quorum_disk_volume=volume if isinstance(volume, str) else None,
        allow_over_budget=allow,
        timers=t,
        quorum_disk_mirrors=mirrors,
        quorum_disk_tls=disk_tls,
        log_compact_entries=compact,
        max_log_entries=max_entries,
    )


def starter_config(
    cluster: str,
    node: str,
    nodes: list[tuple[str, str, str]],
    quorum: QuorumKind,
    witness: str | None,
    timers: Timers | None = None,
    *,
    quorum_volume: str = "quorum",
    mirrors: list[str] | None = None,
    log_compact_entries: int = 1000,
    quorum_disk_tls: bool = False,
) -> str:
    """The TOML ``geoclus cluster init`` writes for ``node`` (``nodes`` as
    (name, site, address) triples; certificates under ``ca/``; the state in
    ``state-NODE`` so that several nodes can share one directory in tests)."""
    lines = [
        "# geoclus cluster configuration (docs/cluster.md). Every key is checked at start.",
        "[cluster]",
        f'name = "{cluster}"',
        f'quorum = "{quorum.value}"',
        'ca = "ca/ca.crt"',
        "",
        "[node]",
        f'name = "{node}"',
        f'cert = "ca/{node}.crt"',
        f'key = "ca/{node}.key"',
        f'state_dir = "state-{node}"',
    ]
    for name, site, address in nodes:
        lines += [
            "",
            "[[nodes]]",
            f'name = "{name}"',
            f'site = "{site}"',
            f'addresses = ["{address}"]',
        ]
    if witness is not None and quorum is not QuorumKind.DISK:
        # With disk quorum the witness decides for the quorum volume's
        # mirrors (their [witness] table), not for the nodes.
        lines += ["", "[witness]", f'address = "{witness}"']
    if quorum is QuorumKind.DISK:
        listed = ", ".join(f'"{m}"' for m in mirrors or [])
        lines += [
            "",
            "[quorum_disk]",
            f'volume = "{quorum_volume}"',
            f"mirrors = [{listed}]",
            "allow_over_budget = false",
            f"tls = {'true' if quorum_disk_tls else 'false'}",
        ]
    t = timers or Timers()
    lines += ["", "[timers]"]
    lines += [f"{k} = {getattr(t, k)!r}" for k in TIMER_KEYS]
    max_entries = max(100_000, 2 * log_compact_entries)
    lines += ["", "[log]", f"compact_entries = {log_compact_entries}"]
    lines += [f"max_entries = {max_entries}"]
    return "\n".join(lines) + "\n"
