"""Real node daemons and a real witness in a private network namespace
(geoclus/testing/clusterlab.py): two sites of two nodes; the inter-site link
is cut with nftables and healed.

* With a witness: exactly one side keeps quorum (the one the witness's vote
  is sticky to), the other stops within the documented bound, nothing
  overlaps, updates commit only on the side with quorum, and after healing
  the cluster re-forms with one history on every node.
* With majority and no witness: both sides lose quorum; force-quorum is
  refused while the other site is seen, and once it is not, it brings site B
  back; the override ends when the cluster heals.
* Log reset: the log is compacted into snapshots as updates commit; a node
  that joins late catches up from the snapshot plus the entries after it,
  and a node killed and restarted rebuilds its database from its own.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from geoclus.cluster.config import load_cluster_config
from geoclus.errors import ControlError
from geoclus.testing.clusterlab import ClusterLab, partition_and_heal

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ip netns and nft")

SLACK_S = 1.0  # scheduling on a loaded 2-core machine, and event timestamps


@pytest.fixture
def lab_factory(tmp_path):
    labs: list[ClusterLab] = []

    def make(hold: tuple[str, ...] = (), **kw) -> ClusterLab:
        lab = ClusterLab(str(tmp_path / f"lab{len(labs)}"), **kw)
        labs.append(lab)
        lab.start(hold)
        return lab

    yield make
    for lab in labs:
        print(lab.logs())  # pytest shows captured output only when a test fails
        lab.close()


def _events(lab: ClusterLab, node: str, kind: str, needle: str) -> list[dict]:
    return [e for e in lab.events(node) if e["kind"] == kind and needle in e["message"]]


def _histories(lab: ClusterLab, nodes: list[str]) -> dict[str, list[tuple[int, str]]]:
    return {n: [(e["index"], e["uid"]) for e in lab.ask(n, "log")["entries"]] for n in nodes}


def _cut_and_see_both_sides_stop(lab: ClusterLab) -> None:
    """Cut every link between sites A and B: every node must log losing
    quorum within the documented bound and stop acting."""
    import time

    st = lab.status("a1")
    assert st is not None
    stop_bound_s = st["stop_bound_s"]
    t_cut = time.time()
    lab.cut("A", "B")
    waited = lab.wait_for(
        "both sides to stop", lambda: not any(lab.acting().values()), stop_bound_s + 5
    )
    assert waited <= stop_bound_s + SLACK_S + 1, waited
    for n in lab.nodes:
        evs = [e for e in _events(lab, n, "quorum", "loses quorum") if e["wall_time"] > t_cut]
        assert evs and evs[0]["wall_time"] - t_cut <= stop_bound_s + SLACK_S, n


def _force_site_b(lab: ClusterLab) -> None:
    """Once b1 no longer hears site A, force-quorum there: site B must form a
    view under the override while site A stays stopped."""
    lab.wait_for(
        "b1 to stop hearing site A",
        lambda: (
            (s := lab.status("b1")) is not None
            and all(n["state"] == "offline" for n in s["nodes"] if n["site"] == "A")
        ),
        20,
    )
    r = lab.cli("cluster", "force-quorum", "--site", "B", "--config", lab.config("b1"))
    assert r.returncode == 0, r.stderr
    lab.wait_for("site B to act under the override", lambda: lab.formed(["b1", "b2"]), 30)
    assert not any(lab.acting(["a1", "a2"]).values())


def _set(lab: ClusterLab, node: str, key: str, value: str, timeout_s: float = 10):
    return lab.cli(
        "cluster", "set", "--config", lab.config(node), key, value, "--timeout", str(timeout_s)
    )


def test_witness_keeps_one_side_and_history_survives_the_cut(lab_factory):
    lab = lab_factory(quorum="majority+witness")
    res = partition_and_heal(lab)
    # Exactly one side keeps quorum: the losers stopped, within the bound,
    # before the winners acted in their new view.
    assert set(res.stopped_after_s) == set(lab.site_nodes(res.loser_site))
    for n, after_s in res.stopped_after_s.items():
        assert after_s <= res.stop_bound_s + SLACK_S, (n, after_s)
    assert res.no_overlap, (res.losers_stopped_at, res.winners_regained_at)
    assert not res.losers_acting_during_cut
    # Updates commit only where there is quorum.
    assert res.winner_update_ok and res.loser_update_refused
    # After healing: one history, one configuration, on every node.
    assert res.one_history
    history = next(iter(res.histories.values()))
    assert [i for i, _ in history] == list(range(1, len(history) + 1))
    assert len({json.dumps(c, sort_keys=True) for c in res.configs.values()}) == 1
    values = next(iter(res.configs.values()))["values"]
    assert values["app.before"] == 1 and values["app.during"] == 2 and values["app.after"] == 4
    # Events are replicated: one node holds every node's events.
    assert set(lab.nodes) <= {e["origin"] for e in res.events}
    losers = lab.site_nodes(res.loser_site)
    text = lab.cli("cluster", "status", "--config", lab.config(losers[0])).stdout
    assert "HAS QUORUM" in text and "witness" in text


def test_majority_without_witness_stops_both_sides_until_forced(lab_factory):
    lab = lab_factory(quorum="majority")
    everyone = list(lab.nodes)
    lab.wait_for("the four nodes to form one view", lambda: lab.formed(everyone), 60)
    assert _set(lab, "a1", "app.before", "1").returncode == 0

    # The guard: site A is still seen from b1.
    r = lab.cli("cluster", "force-quorum", "--site", "B", "--config", lab.config("b1"))
    assert r.returncode != 0 and "still answer heartbeats" in r.stderr, r.stderr
    st = lab.status("b1")
    assert st is not None and not st["forced"]
    _cut_and_see_both_sides_stop(lab)

    # Wrong site, then the right one.
    r = lab.cli("cluster", "force-quorum", "--site", "A", "--config", lab.config("b1"))
    assert r.returncode != 0 and "not A" in r.stderr
    _force_site_b(lab)
    assert all((s or {}).get("forced") for s in lab.statuses(["b1", "b2"]).values())
    assert _set(lab, "b2", "app.forced", "2").returncode == 0

    lab.heal()
    lab.wait_for("the cluster to re-form after healing", lambda: lab.formed(everyone), 60)
    sts = lab.statuses()
    assert not any(s["forced"] for s in sts.values() if s), "the override did not end"
    lab.wait_for(
        "one history",
        lambda: len({json.dumps(v) for v in _histories(lab, everyone).values()}) == 1,
        20,
    )
    values = json.loads(lab.cli("cluster", "get", "--json", "--config", lab.config("a1")).stdout)[
        "values"
    ]
    assert values == {"app.before": 1, "app.forced": 2}


def test_evict_refuses_the_node_and_leave_re_forms_at_once(lab_factory):
    lab = lab_factory(quorum="majority+witness")
    everyone = list(lab.nodes)
    lab.wait_for("the four nodes to form one view", lambda: lab.formed(everyone), 60)

    # check-latency: a verdict per link and network, every probe answered.
    r = lab.cli("cluster", "check-latency", "--json", "--count", "30", "--config", lab.config("a1"))
    links = json.loads(r.stdout)
    assert sorted(link["peer"] for link in links) == ["a2", "b1", "b2"]
    assert all(link["samples"] == 30 and link["lost"] == 0 for link in links), links
    assert r.returncode == (0 if all(link["ok"] for link in links) else 1)

    st0 = lab.status("a1")
    assert st0 is not None
    generation = st0["key_generation"]
    assert st0["quorum"]["total"] == 5  # four nodes and the witness
    r = lab.cli("cluster", "evict", "b2", "--config", lab.config("a1"))
    assert r.returncode == 0, r.stderr
    rest = ["a1", "a2", "b1"]
    lab.wait_for("the view without b2", lambda: lab.formed(rest), 30)
    lab.wait_for(
        "the heartbeat key to rotate everywhere",
        lambda: all(
            (s or {}).get("key_generation", 0) > generation for s in lab.statuses(rest).values()
        ),
        10,
    )
    # b2's vote left the total: three voters and the witness.
    for n, s in lab.statuses(rest).items():
        assert s is not None and s["voters"] == rest, (n, s)
        assert (s["quorum"]["total"], s["quorum"]["needed"]) == (4, 3), (n, s["quorum"])
    text = lab.cli("cluster", "status", "--config", lab.config("a1")).stdout
    assert "voters    a1, a2, b1" in text, text
    # b2 was running: it learnt of its eviction, stopped, and says why.
    assert lab.procs["b2"].wait(timeout=20) == 1
    with open(os.path.join(lab.workdir, "b2.log")) as f:
        assert "b2 was evicted from cluster lab" in f.read()
    # Restarted with its state, it stops again at once. Restarted with an
    # empty state (its old certificate, nothing else), it is refused: its
    # connections are refused and its heartbeats dropped; it never gets in.
    lab.start_node("b2")
    assert lab.procs["b2"].wait(timeout=20) == 1
    b2_state = load_cluster_config(lab.config("b2")).state_dir
    shutil.rmtree(b2_state)

    def refused() -> int:
        return sum(
            v
            for s in lab.statuses(rest).values()
            for k, v in (s or {}).get("dropped", {}).items()
            if "refused connection (evicted)" in k
        )

    before = refused()
    lab.start_node("b2")
    lab.wait_for("b2 to run again", lambda: lab.status("b2") is not None, 15)
    lab.wait_for("b2's connections to be refused", lambda: refused() > before, 15)
    for _ in range(10):
        assert lab.formed(rest)
        b2 = lab.status("b2")
        assert b2 is not None and not b2["acting"]
    r = lab.cli("cluster", "get", "--json", "--config", lab.config("b1"))
    assert json.loads(r.stdout)["evicted"] == ["b2"]

    # A planned leave of a member that is not the locker: the others form
    # their next view at once, well before the missed-heartbeat threshold (2 s
    # here) would notice. (A leaving locker also holds the witness's vote,
    # which its successor gets only when that lease ends: docs/cluster.md.)
    st = lab.status("a1")
    assert st is not None
    leaver = next(n for n in rest if n != st["locker"])
    stay = sorted(n for n in rest if n != leaver)
    r = lab.cli("cluster", "leave", "--config", lab.config(leaver))
    assert r.returncode == 0, r.stderr
    lab.wait_for(f"the view without {leaver}", lambda: lab.formed(stay), 20)
    assert lab.procs[leaver].wait(timeout=10) == 0
    left = _events(lab, stay[0], "membership", f"{leaver} leaves the cluster")
    assert left, "the leave was not in the replicated event log"
    formed = [
        e["wall_time"]
        for n in stay
        for e in _events(lab, n, "view", f"members [{', '.join(stay)}]")
        if e["wall_time"] >= left[0]["wall_time"]
    ]
    assert formed and min(formed) - left[0]["wall_time"] < 1.0, (left, formed)


def _disk(lab: ClusterLab, node: str) -> dict:
    st = lab.status(node)
    assert st is not None and st["quorum_disk"] is not None
    return st["quorum_disk"]


def _cut_until_both_sides_stop(lab: ClusterLab) -> None:
    """Cut the sites apart; both must stop within the bound and stay stopped
    (the disk fails closed: no side can renew or take it)."""
    import time

    _cut_and_see_both_sides_stop(lab)
    # Longer than a whole challenge (min_arbitration_s + the settle wait):
    # nobody takes the disk while its mirrors cannot reach each other.
    deadline = time.monotonic() + 8.0
    while time.monotonic() < deadline:
        assert not any(lab.acting().values()), lab.acting()
        time.sleep(0.5)
    errors = [_disk(lab, n)["last_error"] for n in lab.nodes]
    assert any("both mirrors" in e or "no answer" in e for e in errors), errors
    r = _set(lab, "a1", "app.cut", "9", timeout_s=3)
    assert r.returncode != 0 and "not committed within" in r.stderr, r.stderr


def test_disk_quorum_both_sides_stop_and_force_quorum_brings_one_back(lab_factory):
    lab = lab_factory(quorum="disk")
    everyone = list(lab.nodes)
    lab.wait_for("the four nodes to form one view", lambda: lab.formed(everyone), 60)
    st = lab.status("b1")
    assert st is not None and st["quorum"]["reason"] == "holds the quorum disk"
    assert _disk(lab, st["locker"])["owner_here"]
    assert sum(_disk(lab, n)["owner_here"] for n in everyone) == 1
    # the nodes reach the quorum volume's export with NBD STARTTLS
    for n in everyone:
        assert _disk(lab, n)["tls"] and not _events(lab, n, "arbitration", "plain TCP")
    assert lab.mirror_status("A")["status"]["nbd"]["tls_sessions"] >= len(everyone)
    assert _set(lab, "b2", "app.before", "1").returncode == 0

    r = lab.cli("cluster", "force-quorum", "--site", "B", "--config", lab.config("b1"))
    assert r.returncode != 0 and "still answer heartbeats" in r.stderr, r.stderr

    _cut_until_both_sides_stop(lab)

    _force_site_b(lab)
    assert _set(lab, "b2", "app.forced", "2").returncode == 0

    lab.heal()
    lab.wait_for("the cluster to re-form after healing", lambda: lab.formed(everyone), 60)
    lab.wait_for(
        "the override to end (the view holds the disk again)",
        lambda: all(
            s is not None and not s["forced"] and s["quorum"]["reason"] == "holds the quorum disk"
            for s in lab.statuses().values()
        ),
        30,
    )
    lab.wait_for(
        "one history",
        lambda: len({json.dumps(v) for v in _histories(lab, everyone).values()}) == 1,
        20,
    )
    values = json.loads(lab.cli("cluster", "get", "--json", "--config", lab.config("a1")).stdout)[
        "values"
    ]
    # The update refused during the cut stayed queued at a1 (as the refusal
    # said) and may commit once a1 is in a view with quorum again.
    assert values.pop("app.cut", 9) == 9
    assert values == {"app.before": 1, "app.forced": 2}
    text = lab.cli("cluster", "status", "--config", lab.config("a2")).stdout
    assert "disk      quorum via" in text and "held by this view" in text, text


def test_disk_quorum_operator_lets_the_surviving_mirror_run_degraded(lab_factory):
    """The degraded-mirror decision: the quorum volume's primary (site A) is
    told to complete writes without its cut-off mirror, so site A's nodes can
    take the disk again; site B cannot (its mirror is a read-only secondary)."""
    lab = lab_factory(quorum="disk")
    everyone = list(lab.nodes)
    lab.wait_for("the four nodes to form one view", lambda: lab.formed(everyone), 60)
    assert _set(lab, "a1", "app.before", "1").returncode == 0
    _cut_until_both_sides_stop(lab)

    r = lab.cli("volume", "allow-degraded", "--config", os.path.join(lab.workdir, "qvol-A.toml"))
    assert r.returncode == 0, r.stderr
    lab.wait_for("site A to take the disk and act", lambda: lab.formed(["a1", "a2"]), 40)
    assert not any(lab.acting(["b1", "b2"]).values())
    assert _set(lab, "a2", "app.degraded", "3").returncode == 0

    lab.heal()
    lab.wait_for("the cluster to re-form after healing", lambda: lab.formed(everyone), 60)
    lab.wait_for(
        "one history",
        lambda: len({json.dumps(v) for v in _histories(lab, everyone).values()}) == 1,
        20,
    )
    values = json.loads(lab.cli("cluster", "get", "--json", "--config", lab.config("b1")).stdout)[
        "values"
    ]
    assert values.pop("app.cut", 9) == 9
    assert values == {"app.before": 1, "app.degraded": 3}


def test_disk_quorum_refuses_mirrors_over_the_round_trip_budget(lab_factory):
    lab = lab_factory(quorum="disk", timers={"rtt_budget_us": 1})
    for n in lab.nodes:
        assert lab.procs[n].wait(timeout=30) != 0
    with open(os.path.join(lab.workdir, "a1.log")) as f:
        text = f.read()
    assert "over rtt_budget_us = 1" in text and "allow_over_budget = true" in text, text
    # The operator's explicit override: the node starts and says so.
    path = lab.config("a1")
    with open(path) as f:
        cfg = f.read()
    with open(path, "w") as f:
        f.write(cfg.replace("allow_over_budget = false", "allow_over_budget = true"))
    lab.start_node("a1")
    lab.wait_for("a1 to answer", lambda: lab.status("a1") is not None, 20)
    assert _events(lab, "a1", "rtt", "OVER rtt_budget_us")
    assert _disk(lab, "a1")["allow_over_budget"]


def test_log_resets_and_a_late_joiner_catches_up_from_the_snapshot(lab_factory):
    lab = lab_factory(
        quorum="majority", sites={"A": 2, "B": 1}, log_compact_entries=4, hold=("b1",)
    )
    lab.wait_for("a1 and a2 to form (2 of 3 votes)", lambda: lab.formed(["a1", "a2"]), 60)
    for i in range(10):
        r = _set(lab, ["a1", "a2"][i % 2], f"app.k{i}", str(i))
        assert r.returncode == 0, r.stderr
    for n in ("a1", "a2"):
        lab.wait_for(
            f"{n} to apply every update", lambda n=n: lab.status(n)["config_version"] >= 10, 10
        )
    st = lab.status("a1")
    assert st is not None and st["snapshot_index"] >= 8, st
    assert st["log_length"] == st["config_version"]
    log = lab.ask("a1", "log")
    assert log["snapshot_index"] == st["snapshot_index"]
    assert all(e["index"] > log["snapshot_index"] for e in log["entries"])
    assert _events(lab, "a1", "config", "log reset")
    r = lab.cli("cluster", "log", "--config", lab.config("a1"))
    assert r.returncode == 0 and f"snapshot: updates 1-{log['snapshot_index']}" in r.stdout, r
    # the snapshot on log reset is also the checkpoint file, a valid backup
    from geoclus.cluster.configdb import ConfigDb

    with open(os.path.join(lab.workdir, "state-a1", "configdb.checkpoint"), "rb") as f:
        checkpoint = ConfigDb.from_checkpoint(f.read(), "lab")
    assert checkpoint.version >= 8 and checkpoint.values["app.k0"] == 0

    def config(node: str) -> dict:
        r = lab.cli("cluster", "get", "--json", "--config", lab.config(node))
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    # b1 joins with an empty state directory: it gets the snapshot and the tail.
    lab.start_node("b1")
    lab.wait_for("b1 to join", lambda: lab.formed(["a1", "a2", "b1"]), 60)
    lab.wait_for("b1 to catch up", lambda: config("b1") == config("a1"), 10)
    assert _events(lab, "b1", "config", "taken from the log's snapshot")
    b1 = lab.status("b1")
    assert b1 is not None and b1["snapshot_index"] >= 8

    # a2, killed, rebuilds its database from its own snapshot and log.
    lab.kill("a2")
    lab.start_node("a2")
    lab.wait_for("a2 to rejoin", lambda: lab.formed(["a1", "a2", "b1"]), 60)
    assert _set(lab, "b1", "app.after", "11").returncode == 0
    lab.wait_for(
        "one configuration everywhere",
        lambda: config("a1") == config("a2") == config("b1"),
        10,
    )
    assert config("a2")["values"]["app.after"] == 11


def _witness_ticket(lab: ClusterLab) -> dict:
    return lab.ask("witness", "status")["status"]["mirrors"].get("quorum", {})


def test_disk_quorum_the_witness_decides_the_degraded_mirror(lab_factory):
    """The witness decides for the quorum volume's mirrors: on a cut between
    the sites the primary runs alone at once (site A keeps the disk, no
    operator); after healing it reports the sync; when site A is then lost
    for good, the witness hands the volume to site B's mirror, which promotes
    itself, and site B's nodes take the disk with every committed update."""
    lab = lab_factory(quorum="disk", mirror_witness=True)
    everyone = list(lab.nodes)
    lab.wait_for("the four nodes to form one view", lambda: lab.formed(everyone), 60)
    assert _set(lab, "b1", "app.before", "1").returncode == 0

    lab.cut("A", "B")
    lab.wait_for(
        "site A to keep the disk and site B to stop",
        lambda: lab.formed(["a1", "a2"]) and not any(lab.acting(["b1", "b2"]).values()),
        40,
    )
    ticket = _witness_ticket(lab)
    assert ticket["holder"] == "qvol-A" and ticket["alone"], ticket
    cut_epoch = ticket["epoch"]
    st = lab.mirror_status("A")["status"]
    assert st["degraded_allowed"] and st["witness"]["by_witness"], st["witness"]
    assert not lab.mirror_status("B")["status"]["witness"]["alone_allowed"]
    text = lab.cli("volume", "status", "--config", os.path.join(lab.workdir, "qvol-A.toml"))
    assert "allowed by the witness" in text.stdout and "may run alone" in text.stdout, text.stdout
    assert _set(lab, "a2", "app.cut", "2").returncode == 0

    lab.heal()
    lab.wait_for("the cluster to re-form after healing", lambda: lab.formed(everyone), 60)
    lab.wait_for(
        "the primary to report the sync (site B's mirror no longer outdated)",
        lambda: not _witness_ticket(lab)["alone"],
        30,
    )
    assert not lab.mirror_status("A")["status"]["degraded_allowed"]

    for name in ("a1", "a2", "qvol-A"):
        lab.kill(name)
    lab.wait_for(
        "the witness to give site B's mirror the volume and site B to take the disk",
        lambda: lab.formed(["b1", "b2"]),
        60,
    )
    st = lab.mirror_status("B")["status"]
    assert st["role"] == "primary" and st["witness"]["by_witness"], st
    ticket = _witness_ticket(lab)
    assert ticket["holder"] == "qvol-B" and ticket["alone"], ticket
    assert ticket["epoch"] == cut_epoch + 1, ticket  # one new alone period: B's
    text = lab.cli("witness", "status", "--config", lab.config("witness")).stdout
    assert f"volume quorum: ticket held by qvol-B (epoch {cut_epoch + 1})" in text, text
    events = " | ".join(e["message"] for e in lab.ask_volume_events("B"))
    assert "the witness granted this mirror the volume: promoting it" in events, events
    values = json.loads(lab.cli("cluster", "get", "--json", "--config", lab.config("b2")).stdout)[
        "values"
    ]
    assert values == {"app.before": 1, "app.cut": 2}
    assert _set(lab, "b2", "app.after", "3").returncode == 0

    # Site A's mirror comes back: the witness calls it outdated, it never runs
    # alone, and once the operator demotes it, it resynchronises from site B.
    lab.start_mirror("A")

    def outdated() -> bool:
        try:
            return bool(lab.mirror_status("A")["status"]["witness"]["outdated"])
        except ControlError:
            return False  # not started yet

    lab.wait_for("the returning mirror to learn that it is outdated", outdated, 30)
    st = lab.mirror_status("A")["status"]
    assert not st["witness"]["alone_allowed"] and not st["degraded_allowed"], st["witness"]
    qvol_a = os.path.join(lab.workdir, "qvol-A.toml")
    text = lab.cli("volume", "status", "--config", qvol_a).stdout
    assert "OUTDATED per the witness: qvol-B" in text, text
    r = lab.cli("volume", "demote", "--config", qvol_a)
    assert r.returncode == 0, r.stderr
    lab.wait_for(
        "site B's mirror to report the sync after the resync",
        lambda: not _witness_ticket(lab)["alone"],
        60,
    )
    for name in ("a1", "a2"):
        lab.start_node(name)
    lab.wait_for("the cluster to re-form", lambda: lab.formed(everyone), 60)
