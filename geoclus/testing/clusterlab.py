"""A real cluster on one machine, for the end-to-end tests and the demo.

:class:`ClusterLab` writes a cluster with ``geoclus cluster init`` (sites of
nodes, optionally a witness), creates a private network namespace with its
own loopback, and runs every node daemon and the witness there as real
processes (``geoclus node run`` / ``geoclus witness run``). Site ``A``'s nodes
are 127.0.1.x, site ``B``'s 127.0.2.x, the witness 127.0.3.1; cutting the
link between two sites is an nftables rule in that namespace that drops every
packet between their address ranges (both directions, UDP heartbeats and TLS
alike), and healing deletes it. Control sockets are files, so the lab talks
to each daemon from outside the namespace.

With ``quorum="disk"`` the lab also runs the mirrored quorum disk: a small
replicated volume (``geoclus volume serve``, ``sync``, ``on_peer_loss =
"suspend"``) with its primary mirror at site A (127.0.1.9) and its secondary
at site B (127.0.2.9), each exporting it over NBD; the inter-site cut cuts
its replication link too.

Needs root (``ip netns``, ``nft``). :meth:`close` stops every process and
deletes the namespace, whatever state the run ended in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from geoclus.control import request
from geoclus.errors import ControlError, GeoclusError

SITE_NETS = {"A": "127.0.1", "B": "127.0.2", "C": "127.0.3"}
WITNESS_ADDR = "127.0.3.1"
PORT = 7800
WITNESS_PORT = 7850
MIRROR_HOST = 9  # the quorum volume's daemon at each site: 127.0.X.9
MIRROR_NBD_PORT = 10809
MIRROR_LINK_PORT = 7790
# Short disk timers for the lab (the defaults are the seeds' seconds).
LAB_DISK_TIMERS = {
    "quorum_disk_renew_s": 0.5,
    "quorum_disk_hold_s": 2.0,
    "quorum_disk_io_timeout_s": 0.5,
    "min_arbitration_s": 2.5,
    "max_arbitration_s": 20.0,
}
# Loopback between Python processes on a loaded 2-core machine is far from the
# seeds' 500 us; the lab's budget is set where a healthy run stays under it.
LAB_RTT_BUDGET_US = 50_000


class LabError(GeoclusError):
    """The lab could not be set up or a wait ran out (the message says which)."""


def _run(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")


@dataclass
class ClusterLab:
    """Node daemons and a witness as real processes in a private namespace."""

    workdir: str
    sites: dict[str, int] = field(default_factory=lambda: {"A": 2, "B": 2})
    quorum: str = "majority+witness"
    timers: dict[str, float] = field(
        default_factory=lambda: {
            "heartbeat_interval_s": 0.4,
            "missed_heartbeats_same_site": 5,
            "missed_heartbeats_cross_site": 6,
            "regroup_answer_timeout_s": 1.6,
            "update_timeout_s": 4.0,
            "rtt_budget_us": LAB_RTT_BUDGET_US,
        }
    )
    log_compact_entries: int = 1000
    disk_tls: bool = True  # the quorum disk's exports over NBD STARTTLS
    mirror_witness: bool = False  # disk: the witness decides which mirror runs alone
    netns: str = field(default_factory=lambda: f"gclab-{uuid.uuid4().hex[:8]}")
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)  # name -> site
    cut_sites: set[tuple[str, str]] = field(default_factory=set)
    _ns_made: bool = False

    @property
    def site_names(self) -> list[str]:
        return list(self.sites)

    @property
    def witness(self) -> bool:
        return self.quorum == "majority+witness" or (self.disk and self.mirror_witness)

    @property
    def disk(self) -> bool:
        return self.quorum == "disk"

    def mirror(self, site: str) -> str:
        return f"{SITE_NETS[site]}.{MIRROR_HOST}"

    def _write_mirror_configs(self) -> None:
        from geoclus.ca import issue_node_cert

        a, b = self.site_names[:2]
        for site, role, peer in ((a, "primary", b), (b, "secondary", a)):
            export_tls = ""
            cert = os.path.join(self.workdir, "ca", f"qvol-{site}.crt")
            if (self.disk_tls or self.mirror_witness) and not os.path.exists(cert):
                issue_node_cert(os.path.join(self.workdir, "ca"), f"qvol-{site}")
            rep_tls = "false"
            if self.disk_tls:  # the nodes reach the export with STARTTLS, cluster CA
                # and the mirrors replicate over mutual TLS, each checking the other's name
                rep_tls = (
                    f'{{ ca = "ca/ca.crt", cert = "ca/qvol-{site}.crt", '
                    f'key = "ca/qvol-{site}.key", peer_node = "qvol-{peer}" }}'
                )
                export_tls = (
                    f'tls = {{ ca = "ca/ca.crt", cert = "ca/qvol-{site}.crt", '
                    f'key = "ca/qvol-{site}.key" }}\n'
                )
            text = (
                f'[volume]\nname = "quorum"\nsize = "4MiB"\nstore = "qvol-{site}.img"\n'
                f'mode = "sync"\nrole = "{role}"\non_peer_loss = "suspend"\n'
                f'[node]\nname = "qvol-{site}"\n'
                f'[replication]\nlisten = "{self.mirror(site)}:{MIRROR_LINK_PORT}"\n'
                f'peer = "{self.mirror(peer)}:{MIRROR_LINK_PORT}"\ntls = {rep_tls}\n'
                "keepalive_interval_s = 0.3\npeer_timeout_s = 1.5\nconnect_timeout_s = 1.0\n"
                f'[export]\nnbd = "tcp://{self.mirror(site)}:{MIRROR_NBD_PORT}"\n'
                + export_tls
                + f'[control]\nsocket = "qvol-{site}.ctl"\n'
            )
            if self.mirror_witness:
                text += (
                    f'[witness]\naddress = "{WITNESS_ADDR}:{WITNESS_PORT}"\ncluster = "lab"\n'
                    f'ca = "ca/ca.crt"\ncert = "ca/qvol-{site}.crt"\nkey = "ca/qvol-{site}.key"\n'
                    "renew_s = 0.3\n"
                )
            with open(os.path.join(self.workdir, f"qvol-{site}.toml"), "w") as f:
                f.write(text)

    def start_mirror(self, site: str) -> None:
        self._spawn(
            f"qvol-{site}",
            ["volume", "serve", "--config", os.path.join(self.workdir, f"qvol-{site}.toml")],
        )

    def _mirror_connected(self, site: str) -> bool:
        try:
            return bool(self.mirror_status(site)["status"]["connected"])
        except (ControlError, KeyError):
            return False

    def mirror_status(self, site: str) -> dict[str, Any]:
        return request(os.path.join(self.workdir, f"qvol-{site}.ctl"), "status", 5.0)

    def ask_volume_events(self, site: str) -> list[dict[str, Any]]:
        """The quorum volume's events at ``site``'s mirror."""
        path = os.path.join(self.workdir, f"qvol-{site}.ctl")
        return list(request(path, "events", 5.0, since=0)["events"])

    def config(self, node: str) -> str:
        return os.path.join(self.workdir, f"{node}.toml")

    def setup(self) -> None:
        """Write the configuration and create the namespace (no process yet)."""
        if os.geteuid() != 0:
            raise LabError("the cluster lab needs root (ip netns, nft)")
        args = ["cluster", "init", "--dir", self.workdir, "--name", "lab", "--quorum", self.quorum]
        for site, count in self.sites.items():
            for i in range(1, count + 1):
                name = f"{site.lower()}{i}"
                self.nodes[name] = site
                args += ["--node", f"{name}@{site}={SITE_NETS[site]}.{i}:{PORT}"]
        if self.witness:
            args += ["--witness", f"{WITNESS_ADDR}:{WITNESS_PORT}"]
        timers = dict(self.timers)
        if self.disk:
            for site in self.site_names[:2]:
                args += ["--mirror", f"{self.mirror(site)}:{MIRROR_NBD_PORT}"]
            timers = {**LAB_DISK_TIMERS, **timers}
            if self.disk_tls:
                args += ["--quorum-disk-tls"]
            if self.mirror_witness:
                for site in self.site_names[:2]:
                    args += ["--mirror-name", f"qvol-{site}"]
        for k, v in timers.items():
            args += ["--timer", f"{k}={v}"]
        args += ["--log-compact-entries", str(self.log_compact_entries)]
        res = subprocess.run(
            [sys.executable, "-m", "geoclus", *args], capture_output=True, text=True
        )
        if res.returncode != 0:
            raise LabError(f"cluster init failed: {res.stderr.strip()}")
        _run("ip", "netns", "add", self.netns)
        self._ns_made = True
        _run("ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up")
        if self.disk:
            self._write_mirror_configs()

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(os.path.join(self.workdir, f"{name}.log"), "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-m", "geoclus", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def start_node(self, name: str) -> None:
        self._spawn(name, ["node", "run", "--config", self.config(name)])

    def start_witness(self) -> None:
        self._spawn("witness", ["witness", "run", "--config", self.config("witness")])

    def start(self, hold: tuple[str, ...] = ()) -> None:
        """Set up and start every process (but the nodes in ``hold``, which
        the caller starts later with :meth:`start_node`)."""
        self.setup()
        if self.witness:
            self.start_witness()
        if self.disk:
            a, b = self.site_names[:2]
            self.start_mirror(b)
            self.start_mirror(a)
            self.wait_for(
                "the quorum volume's mirrors to connect",
                lambda: self._mirror_connected(a),
                30,
            )
        for name in self.nodes:
            if name not in hold:
                self.start_node(name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs.pop(name, None)
        if p is not None and p.poll() is None:
            os.killpg(p.pid, sig)
            p.wait(timeout=10)

    def close(self) -> None:
        for name in list(self.procs):
            try:
                self.kill(name, signal.SIGTERM)
            except subprocess.TimeoutExpired:
                self.kill(name, signal.SIGKILL)
        if self._ns_made:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
            self._ns_made = False

    # --- talking to daemons --------------------------------------------------------

    def ask(self, name: str, cmd: str, timeout_s: float = 10.0, **args: Any) -> dict[str, Any]:
        state = "witness-state" if name == "witness" else f"state-{name}"
        return request(os.path.join(self.workdir, state, "control.sock"), cmd, timeout_s, **args)

    def status(self, name: str) -> dict[str, Any] | None:
        """The node's status, or None if it does not answer."""
        try:
            return self.ask(name, "status", timeout_s=5)["status"]
        except ControlError:
            return None

    def statuses(self, names: list[str] | None = None) -> dict[str, dict[str, Any] | None]:
        return {n: self.status(n) for n in (names or list(self.nodes))}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a `geoclus` command outside the namespace (control sockets are files)."""
        return subprocess.run(
            [sys.executable, "-m", "geoclus", *args], capture_output=True, text=True, timeout=120
        )

    def wait_for(
        self, what: str, check: Callable[[], bool], timeout_s: float, poll_s: float = 0.1
    ) -> float:
        """Poll ``check`` until true; returns the seconds waited; LabError naming
        ``what`` on timeout."""
        t0 = time.monotonic()
        while True:
            if check():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise LabError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(poll_s)

    def acting(self, names: list[str] | None = None) -> dict[str, bool]:
        out = {}
        for n, st in self.statuses(names).items():
            out[n] = bool(st and st["acting"])
        return out

    def formed(self, names: list[str]) -> bool:
        """Every one of ``names`` acts in one view whose members are exactly them."""
        sts = self.statuses(names)
        if any(st is None or not st["acting"] for st in sts.values()):
            return False
        views = {tuple(st["view"]) for st in sts.values() if st}
        members = {tuple(st["members"]) for st in sts.values() if st}
        return len(views) == 1 and members == {tuple(sorted(names))}

    def site_nodes(self, site: str) -> list[str]:
        return [n for n, s in self.nodes.items() if s == site]

    # --- faults --------------------------------------------------------------------

    def _nft(self, *args: str) -> None:
        _run("ip", "netns", "exec", self.netns, "nft", *args)

    def cut(self, a: str, b: str) -> None:
        """Drop every packet between sites ``a`` and ``b`` (both directions)."""
        if not self.cut_sites:
            self._nft("add", "table", "inet", "gclab")
            self._nft(
                "add",
                "chain",
                "inet",
                "gclab",
                "out",
                "{ type filter hook output priority 0 ; policy accept ; }",
            )
        self.cut_sites.add((a, b))
        for x, y in ((a, b), (b, a)):
            self._nft(
                "add",
                "rule",
                "inet",
                "gclab",
                "out",
                "ip",
                "saddr",
                f"{SITE_NETS[x]}.0/24",
                "ip",
                "daddr",
                f"{SITE_NETS[y]}.0/24",
                "drop",
            )

    def heal(self) -> None:
        """Remove every cut."""
        if self.cut_sites:
            self._nft("delete", "table", "inet", "gclab")
            self.cut_sites.clear()

    def events(self, name: str) -> list[dict[str, Any]]:
        return list(self.ask(name, "events")["events"])

    def logs(self) -> str:
        """The tail of every process's log (for failure messages)."""
        out = []
        for f in sorted(os.listdir(self.workdir)):
            if f.endswith(".log"):
                with open(os.path.join(self.workdir, f), errors="replace") as fh:
                    out.append(f"--- {f}\n" + "".join(fh.readlines()[-15:]))
        return "\n".join(out)


@dataclass
class PartitionResult:
    """What :func:`partition_and_heal` observed (the test and the demo judge it)."""

    stop_bound_s: float
    winner_site: str = ""
    loser_site: str = ""
    stopped_after_s: dict[str, float] = field(default_factory=dict)  # loser -> cut to "loses"
    winners_regained_at: float | None = None  # first "gains quorum" on the winning side
    losers_stopped_at: float | None = None  # last "loses quorum" on the losing side
    winner_update_ok: bool = False
    loser_update_refused: bool = False
    losers_acting_during_cut: bool = True
    reformed_s: float = 0.0
    histories: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def one_history(self) -> bool:
        import json

        return len({json.dumps(h) for h in self.histories.values()}) == 1 and bool(self.histories)

    @property
    def no_overlap(self) -> bool:
        return (
            self.winners_regained_at is not None
            and self.losers_stopped_at is not None
            and self.winners_regained_at >= self.losers_stopped_at
        )


def _set(lab: ClusterLab, node: str, key: str, value: str, timeout_s: float) -> bool:
    r = lab.cli(
        "cluster", "set", "--config", lab.config(node), key, value, "--timeout", str(timeout_s)
    )
    return r.returncode == 0


def partition_and_heal(
    lab: ClusterLab, progress: Callable[[str], None] = lambda s: None
) -> PartitionResult:
    """On a running two-site lab with a witness: form, commit, cut the sites
    apart, watch which side keeps quorum and how fast the other stops, try an
    update on each side, heal, and collect every node's history and config."""
    import json

    everyone = list(lab.nodes)
    progress("forming the cluster")
    lab.wait_for("the nodes to form one view", lambda: lab.formed(everyone), 60)
    if not _set(lab, everyone[1], "app.before", "1", 10):
        raise LabError("an update before the cut did not commit")
    st = lab.status(everyone[0])
    assert st is not None
    res = PartitionResult(stop_bound_s=st["stop_bound_s"])
    res.winner_site = lab.nodes[st["locker"]]  # the witness's vote is sticky to the locker's side
    res.loser_site = next(s for s in lab.sites if s != res.winner_site)
    winners, losers = lab.site_nodes(res.winner_site), lab.site_nodes(res.loser_site)

    progress(f"cutting every link between the sites (locker at site {res.winner_site})")
    t_cut = time.time()
    lab.cut(*lab.site_names)
    lab.wait_for(
        f"site {res.loser_site} to stop",
        lambda: not any(lab.acting(losers).values()),
        res.stop_bound_s + 5,
    )
    lab.wait_for(f"site {res.winner_site} to re-form", lambda: lab.formed(winners), 30)
    for n in losers:
        evs = [
            e
            for e in lab.events(n)
            if e["kind"] == "quorum" and "loses quorum" in e["message"] and e["wall_time"] > t_cut
        ]
        if evs:
            res.stopped_after_s[n] = evs[0]["wall_time"] - t_cut
            res.losers_stopped_at = max(res.losers_stopped_at or 0.0, evs[0]["wall_time"])
    regained = [
        e["wall_time"]
        for n in winners
        for e in lab.events(n)
        if e["kind"] == "quorum" and "gains quorum" in e["message"] and e["wall_time"] > t_cut
    ]
    res.winners_regained_at = min(regained) if regained else None
    progress("updates on both sides during the cut")
    res.winner_update_ok = _set(lab, winners[0], "app.during", "2", 10)
    res.loser_update_refused = not _set(lab, losers[0], "app.loser", "3", 3)
    res.losers_acting_during_cut = any(any(lab.acting(losers).values()) for _ in range(5))

    progress("healing the link")
    t_heal = time.monotonic()
    lab.heal()
    lab.wait_for("the cluster to re-form after healing", lambda: lab.formed(everyone), 60)
    res.reformed_s = time.monotonic() - t_heal
    if not _set(lab, losers[-1], "app.after", "4", 10):
        raise LabError("an update after healing did not commit")

    def histories() -> dict[str, list[tuple[int, str]]]:
        return {n: [(e["index"], e["uid"]) for e in lab.ask(n, "log")["entries"]] for n in everyone}

    def same() -> bool:
        res.histories = histories()
        return res.one_history

    lab.wait_for("every node to hold one history", same, 20)
    for n in everyone:
        out = lab.cli("cluster", "get", "--json", "--config", lab.config(n)).stdout
        res.configs[n] = json.loads(out)
    res.events = [e for e in lab.events(everyone[-1]) if e["wall_time"] >= t_cut - 1]
    return res
