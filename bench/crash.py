"""Crash-consistency campaign: a real filesystem and database on a replicated
volume, the primary site killed mid-workload, the secondary promoted and checked.

The trial itself is :func:`geoclus.testing.dbcrash.trial` (see there): ext4
through nbdfuse + loop on the primary's export, a database running bank
transfers whose total is invariant, a journal of acknowledged transactions
outside the volume, ``kill -9`` of the primary (or a link cut, then the kill),
``promote --force`` of the secondary, and checks of its image (ext4 journal
replay, the database's own check, the transaction log a prefix 1..m with the
balances of the first m transfers, every acknowledged transaction present in
sync mode, ``e2fsck -fn``). Two databases:

* ``sqlite``: SQLite in WAL mode (``synchronous=FULL``, a checkpoint every 50
  pages), checked with ``PRAGMA integrity_check``;
* ``postgresql``: a PostgreSQL server with its data directory on the volume
  (:mod:`geoclus.testing.pgcrash`: ``fsync``, ``full_page_writes``,
  ``synchronous_commit`` on, data checksums, a ``CHECKPOINT`` every 50
  transactions), driven through ``psql``; checked by starting a server on the
  copy (crash recovery) and ``pg_amcheck --all --heapallindexed
  --parent-check``.

The counter-experiment runs the same trials (async mode) with the secondary
holding back a random half of the writes it receives and applying them later
in random order (``GEOCLUS_TEST_FAULTS=secondary-out-of-order``), and counts,
per database, the trials until a check fails (a trial that fails for another
reason, such as a set-up timeout, is reported and not counted as a finding).

Run: ``python -m bench.crash`` (``make crash``); ``--trials N`` per database
and mode; ``--databases sqlite,postgresql`` (default both).
"""

from __future__ import annotations

from typing import Any

import click
import trio

from geoclus.testing.dbcrash import DATABASES, Trial, missing_requirements, trial

TITLE = {
    "sqlite": "SQLite WAL (synchronous=FULL, checkpoint every 50 pages)",
    "postgresql": "PostgreSQL (fsync, full_page_writes, synchronous_commit on, data checksums, "
    "CHECKPOINT every 50 transactions)",
}


def _problems(t: Trial, limit: int) -> str:
    """A trial's problems on one line (tool output spans several)."""
    return " ".join("; ".join(t.problems).split())[:limit]


def _table(results: dict[tuple[str, str], list[Trial]], counter: dict[str, dict[str, Any]]) -> str:
    dbs = list(dict.fromkeys(db for db, _ in results)) or list(counter)
    lines = [
        "crash campaign: ext4 on nbdfuse + loop on the primary's export, bank transfers on "
        + " and on ".join(TITLE[db] for db in dbs)
        + ", primary killed (kill -9, or link cut then kill), secondary promoted and checked",
        "",
        f"{'database':<10} {'mode':<6} {'trials':>6} {'clean':>6} {'kill':>5} {'cut+kill':>8} "
        f"{'acked tx (mean)':>15} {'lost acked tx':>14} "
        f"{'async lag at cut (writes, mean / max)':>38} {'s/trial':>7}",
    ]
    for (db, mode), ts in results.items():
        n = len(ts)
        clean = sum(t.clean for t in ts)
        kills = sum(t.how == "kill" for t in ts)
        cuts = sum(t.how == "cut+kill" for t in ts)
        mean_acked = sum(t.acked for t in ts) / n if n else 0
        lost = sum(max(0, t.acked - t.found) for t in ts if t.found or t.acked)
        lags = [t.lag_writes for t in ts if t.lag_writes is not None]
        lag = f"{sum(lags) / len(lags):.1f} / {max(lags)}" if lags and mode == "async" else "-"
        lost_txt = str(lost) if mode == "sync" else f"{lost} (allowed)"
        secs = sum(t.seconds for t in ts) / n if n else 0
        lines.append(
            f"{db:<10} {mode:<6} {n:>6} {clean:>6} {kills:>5} {cuts:>8} {mean_acked:>15.1f} "
            f"{lost_txt:>14} {lag:>38} {secs:>7.1f}"
        )
    lines.append("")
    for (db, mode), ts in results.items():
        for t in ts:
            if not t.clean:
                lines.append(f"  {db} {mode} trial {t.index} ({t.how}): {_problems(t, 400)}")
    if counter:
        lines.append("")
        lines.append(
            "counter-experiment (secondary holds back half the writes and applies them later "
            "in random order, async mode):"
        )
        for db, c in counter.items():
            if c.get("found"):
                verdict = f"first failed check after {c['trials']} trial(s): {c['problem']}"
            else:
                verdict = f"no failed check in {c['trials']} trial(s)"
            if c.get("errors"):
                verdict += f" ({c['errors']} trial(s) failed otherwise, not counted)"
            lines.append(f"  {db}: {verdict}")
    return "\n".join(lines)


async def run_campaign(
    trials: int, modes: list[str], counter_max: int, databases: list[str] | None = None
) -> str:
    databases = databases or ["sqlite"]
    results: dict[tuple[str, str], list[Trial]] = {}
    for db in databases:
        for mode in modes:
            ts = results[(db, mode)] = []
            for i in range(trials):
                t = await trial(mode, i, database=db)
                ts.append(t)
                verdict = "clean" if t.clean else "PROBLEM: " + "; ".join(t.problems)
                click.echo(
                    f"[{db} {mode} {i + 1}/{trials}] {t.how:<8} acked {t.acked:>5} "
                    f"found {t.found:>5} {verdict} ({t.seconds:.1f} s)",
                    err=True,
                )
    counter: dict[str, dict[str, Any]] = {}
    for db in databases if counter_max else []:
        c: dict[str, Any] = {"trials": counter_max, "found": False, "errors": 0}
        for i in range(counter_max):
            t = await trial("async", 1000 + i, out_of_order=True, database=db)
            if t.clean:
                verdict = "clean"
            elif t.errored:
                verdict = "trial failed (not a finding): " + "; ".join(t.problems)
            else:
                verdict = "FAILED: " + "; ".join(t.problems)
            click.echo(
                f"[{db} out-of-order {i + 1}] acked {t.acked:>5} found {t.found:>5} {verdict} "
                f"({t.seconds:.1f} s)",
                err=True,
            )
            if t.errored:
                c["errors"] += 1
            elif not t.clean:
                c.update(trials=i + 1, found=True, problem=_problems(t, 300))
                break
        counter[db] = c
    return _table(results, counter)


def _databases(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    dbs = [d.strip() for d in value.split(",") if d.strip()]
    bad = [d for d in dbs if d not in DATABASES]
    if bad or not dbs:
        raise click.BadParameter(f"{','.join(bad) or value!r}: choose from {','.join(DATABASES)}")
    return list(dict.fromkeys(dbs))


@click.command()
@click.option("--trials", default=50, show_default=True, help="Trials per database and mode.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["sync", "async"]))
@click.option(
    "--databases",
    default=",".join(DATABASES),
    show_default=True,
    callback=_databases,
    help="Comma-separated databases to run.",
)
@click.option(
    "--counter",
    "counter_max",
    default=10,
    show_default=True,
    help="Max out-of-order trials per database (0: no counter-experiment).",
)
@click.option("--markdown", type=click.Path(dir_okay=False), default=None)
def main(
    trials: int,
    modes: tuple[str, ...],
    databases: list[str],
    counter_max: int,
    markdown: str | None,
) -> None:
    """Run the crash-consistency campaign and print its table."""
    for db in databases:
        why = missing_requirements(db)
        if why is not None:
            raise click.ClickException(f"{db}: {why}")
    table = trio.run(run_campaign, trials, list(modes) or ["sync", "async"], counter_max, databases)
    click.echo(table)
    if markdown:
        with open(markdown, "w") as f:
            f.write("```\n" + table + "\n```\n")


if __name__ == "__main__":
    main()
