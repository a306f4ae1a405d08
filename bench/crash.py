"""Crash-consistency campaign: a real filesystem and database on a replicated
volume, the primary site killed mid-workload, the secondary promoted and checked.

The trial itself is :func:`geoclus.testing.dbcrash.trial` (see there): ext4
through nbdfuse + loop on the primary's export, SQLite in WAL mode running bank
transfers whose total is invariant, a journal of acknowledged transactions
outside the volume, ``kill -9`` of the primary (or a link cut, then the kill),
``promote --force`` of the secondary, and checks of its image (ext4 journal
replay, ``PRAGMA integrity_check``, the transaction log a prefix 1..m with the
balances of the first m transfers, every acknowledged transaction present in
sync mode, ``e2fsck -fn``).

The counter-experiment runs the same trials with the secondary applying the
writes of each 100 ms window in random order, interruptibly
(``GEOCLUS_TEST_FAULTS=secondary-out-of-order``), and counts the trials until a
check fails.

Run: ``python -m bench.crash`` (``make crash``); ``--trials N`` per mode.
"""

from __future__ import annotations

from typing import Any

import click
import trio

from geoclus.testing.dbcrash import Trial, missing_requirements, trial


def _table(results: dict[str, list[Trial]], counter: dict[str, Any]) -> str:
    lines = [
        "crash campaign: ext4 on nbdfuse + loop on the primary's export, SQLite WAL "
        "(synchronous=FULL, checkpoint every 50 pages) bank transfers, primary killed "
        "(kill -9, or link cut then kill), secondary promoted and checked",
        "",
        f"{'mode':<6} {'trials':>6} {'clean':>6} {'kill':>5} {'cut+kill':>8} "
        f"{'acked tx (mean)':>15} {'lost acked tx':>13} "
        f"{'async lag at cut (writes, mean / max)':>38}",
    ]
    for mode, ts in results.items():
        n = len(ts)
        clean = sum(t.clean for t in ts)
        kills = sum(t.how == "kill" for t in ts)
        cuts = sum(t.how == "cut+kill" for t in ts)
        mean_acked = sum(t.acked for t in ts) / n if n else 0
        lost = sum(max(0, t.acked - t.found) for t in ts if t.found or t.acked)
        lags = [t.lag_writes for t in ts if t.lag_writes is not None]
        lag = f"{sum(lags) / len(lags):.1f} / {max(lags)}" if lags and mode == "async" else "-"
        lost_txt = str(lost) if mode == "sync" else f"{lost} (allowed)"
        lines.append(
            f"{mode:<6} {n:>6} {clean:>6} {kills:>5} {cuts:>8} {mean_acked:>15.1f} "
            f"{lost_txt:>13} {lag:>38}"
        )
    lines.append("")
    for mode, ts in results.items():
        for t in ts:
            if not t.clean:
                lines.append(f"  {mode} trial {t.index} ({t.how}): {'; '.join(t.problems)}")
    if counter:
        lines.append("")
        lines.append(
            f"counter-experiment (secondary applies each batch out of order, {counter['mode']} "
            f"mode): first failed check after {counter['trials']} trial(s): {counter['problem']}"
        )
    return "\n".join(lines)


async def run_campaign(trials: int, modes: list[str], counter_max: int) -> str:
    results: dict[str, list[Trial]] = {}
    for mode in modes:
        results[mode] = []
        for i in range(trials):
            t = await trial(mode, i)
            results[mode].append(t)
            verdict = "clean" if t.clean else "PROBLEM: " + "; ".join(t.problems)
            click.echo(
                f"[{mode} {i + 1}/{trials}] {t.how:<8} acked {t.acked:>5} found {t.found:>5} "
                f"{verdict} ({t.seconds:.1f} s)",
                err=True,
            )
    counter: dict[str, Any] = {}
    if counter_max:
        for i in range(counter_max):
            t = await trial("async", 1000 + i, out_of_order=True)
            verdict = "clean" if t.clean else "FAILED: " + "; ".join(t.problems)
            click.echo(f"[out-of-order {i + 1}] {verdict}", err=True)
            if not t.clean:
                counter = {"mode": "async", "trials": i + 1, "problem": "; ".join(t.problems)[:300]}
                break
        else:
            counter = {"mode": "async", "trials": f"none of {counter_max}", "problem": "none found"}
    return _table(results, counter)


@click.command()
@click.option("--trials", default=50, show_default=True, help="Trials per mode.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["sync", "async"]))
@click.option(
    "--counter", "counter_max", default=10, show_default=True, help="Max out-of-order trials."
)
@click.option("--markdown", type=click.Path(dir_okay=False), default=None)
def main(trials: int, modes: tuple[str, ...], counter_max: int, markdown: str | None) -> None:
    """Run the crash-consistency campaign and print its table."""
    why = missing_requirements()
    if why is not None:
        raise click.ClickException(why)
    table = trio.run(run_campaign, trials, list(modes) or ["sync", "async"], counter_max)
    click.echo(table)
    if markdown:
        with open(markdown, "w") as f:
            f.write("```\n" + table + "\n```\n")


if __name__ == "__main__":
    main()
