"""``geoclus sim``: run the cluster simulation for one seed or a range of seeds
(the same runs as tests/test_cluster_sim.py), printing each result, and the
event trace of a failing seed so it can be studied and replayed."""

from __future__ import annotations

import json
import sys

import click

from geoclus.cluster.sim import SafetyViolation, Simulation, settings_for_seed
from quorum.votes import QuorumKind


@click.command("sim")
@click.option("--seed", type=int, default=None, help="Run only this seed (prints its trace).")
@click.option(
    "--seeds",
    type=int,
    default=100,
    show_default=True,
    help="Without --seed: run seeds 0..N-1.",
)
@click.option("--first", type=int, default=0, show_default=True, help="First seed of the range.")
@click.option(
    "--kind",
    type=click.Choice([k.value for k in QuorumKind]),
    default=QuorumKind.MAJORITY.value,
    show_default=True,
)
@click.option("--duration", "duration_s", type=float, default=150.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per seed.")
def sim(
    seed: int | None, seeds: int, first: int, kind: str, duration_s: float, as_json: bool
) -> None:
    """Deterministic simulation of heartbeats, regroup, global updates and
    quorum under partitions, loss, delay, duplication and crashes. Exits 1 at
    the first seed that breaks a safety property, naming it."""
    qk = QuorumKind(kind)
    chosen = [seed] if seed is not None else list(range(first, first + seeds))
    for s in chosen:
        settings = settings_for_seed(
            s, qk, duration_s=duration_s, settle_s=min(60.0, duration_s / 2)
        )
        run = Simulation(s, settings, trace=seed is not None)
        try:
            r = run.run()
        except SafetyViolation as exc:
            if run.trace is not None:
                click.echo("\n".join(run.trace), err=True)
            click.echo(f"FAILED {exc}", err=True)
            click.echo(f"replay: geoclus sim --seed {s} --kind {kind}", err=True)
            sys.exit(1)
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "seed": s,
                        "nodes": settings.nodes,
                        "kind": kind,
                        "steps": r.steps,
                        "committed": r.committed,
                        "views": r.views_formed,
                        "regroups": r.regroups,
                        "faults": len(r.faults),
                        "log_resets": r.snapshots,
                        "snapshots_adopted": r.adopted,
                        "evicted": list(r.evicted),
                    }
                )
            )
        else:
            click.echo(
                f"seed {s}: ok, {settings.nodes} nodes, {r.steps} steps, {len(r.faults)} faults, "
                f"{r.regroups} regroups, {r.views_formed} views, {r.committed} updates committed, "
                f"{r.snapshots} log resets, {r.adopted} caught up from a snapshot"
                + (f", evicted {list(r.evicted)}" if r.evicted else "")
            )
            if seed is not None and run.trace is not None:
                click.echo("\n".join(run.trace))
