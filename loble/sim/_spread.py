"""Many seeds as distributions: what ``--runs K`` leads with.

One seed is one draw: it says what can happen, not how often, nor how bad
it gets. Over K seeds each figure of the report becomes a distribution:
each count of what clients saw (``clients.seen`` and its split by Loble's
outcome, ``clients.seen_rows``), the impact window (the first and the last
client failure the report times, ``clients.impact``), the number of state
changes (flapping shows here: its count varies from seed to seed) and the
time of each state change, named by its place in its backend's history
(``10.0.1.3:8080 -> unhealthy (2nd)``: the second time that backend went
unhealthy, whatever it went through before), which only some runs may have.

:func:`over_runs` computes them from the reports alone, so the figures are
the same whichever executor ran the seeds, and :func:`render_distributions`
prints them. Each distribution is the minimum, the nearest-rank p50, p90
and p99 and the maximum over the runs that have the figure, and the seeds
behind the minimum and the maximum, each with the command that replays it:
an operator reads the worst case, then replays it.

Nearest rank (pX is the ``ceil(X% * n)``-th smallest of n values) is a value
some run really had, never an interpolation between two runs; it also means
p90 is the maximum below 10 runs and p99 below 100, which the table says.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from loble.core import Outcome

from ._report import AFTER_STOP, SEEN, percentile

__all__ = [
    "PERCENTILES",
    "distribution",
    "impact_window",
    "ordinal",
    "over_runs",
    "rank_note",
    "render_distributions",
    "transition_label",
    "transition_times",
]

PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
"""The percentiles of each distribution, between its min and its max."""

_TRANSITION_ROWS = 40
"""The table shows this many state changes' times; ``--json`` has all."""

_OUTCOME_ORDER = {
    name: index for index, name in enumerate([*(outcome.value for outcome in Outcome), AFTER_STOP])
}
"""Loble's outcomes in the report's order, then the refusals after the process stopped."""
_SEEN_ORDER = {name: index for index, name in enumerate(SEEN)}

Replay = Callable[[int], str]
"""The command that replays a seed (``loble sim SCENARIO --seed N``, ``--swarm`` if drawn)."""


# -- one figure over the runs ----------------------------------------------------------


def distribution(values: Mapping[int, float], replay: Replay) -> dict[str, Any]:
    """The distribution of one figure, from ``{seed: value}`` over the runs that have it.

    ``at_min`` and ``at_max`` name the lowest seed with that value, how many
    runs share it, and the command that replays that seed. A figure no run
    has has no distribution: the caller leaves it out.
    """
    if not values:
        raise ValueError("a distribution needs at least one run")
    ordered = sorted(values.values())
    result: dict[str, Any] = {"runs": len(ordered), "min": ordered[0]}
    for label, fraction in PERCENTILES:
        result[label] = percentile(ordered, fraction)
    result["max"] = ordered[-1]
    for end, value in (("at_min", ordered[0]), ("at_max", ordered[-1])):
        seeds = sorted(seed for seed, figure in values.items() if figure == value)
        result[end] = {"seed": seeds[0], "runs": len(seeds), "replay": replay(seeds[0])}
    return result


# -- what one report gives -------------------------------------------------------------


def ordinal(number: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ``11th``, ``21st``, ``112th``."""
    if number % 100 in (11, 12, 13):
        return f"{number}th"
    return f"{number}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(number % 10, 'th') }"


def transition_times(report: Mapping[str, Any]) -> dict[tuple[str, str, int], float]:
    """Each state change of a run, keyed by (backend, new state, how many times so far).

    The key names the change by what it did, not by its position in the run,
    so the same change lines up across seeds even when another backend's
    changes come in between, or a seed takes a detour through draining.
    """
    seen: dict[tuple[str, str], int] = {}
    times: dict[tuple[str, str, int], float] = {}
    for change in report["timeline"]:
        address, state = change["address"], change["new"]
        nth = seen[(address, state)] = seen.get((address, state), 0) + 1
        times[(address, state, nth)] = change["at"]
    return times


def impact_window(report: Mapping[str, Any]) -> tuple[float, float] | None:
    """The first and the last client failure the report times, or None if none failed.

    Every row of ``clients.impact`` counts, refusals after the process
    stopped too. Truncated streams do not: the report counts them
    (``clients.seen.truncated``) but does not time them.
    """
    rows = report["clients"]["impact"]
    if not rows:
        return None
    return min(row["first"] for row in rows), max(row["last"] for row in rows)


# -- all the runs ----------------------------------------------------------------------


def over_runs(reports: Sequence[Mapping[str, Any]], replay: Replay) -> dict[str, Any]:
    """Every distribution over ``reports`` (one per seed), as plain data.

    ``clients``: ``arrived``, ``still_open_at_end``, ``seen`` (the five ways
    of :data:`SEEN`, always all five) and ``seen_rows`` (each way split by
    Loble's outcome, every pair some run had; a run without it counts 0).
    ``impact``: ``first``, ``last`` and ``window`` (last minus first) over
    the runs that had a failure, or None if none had. ``state_changes``: the
    count per run. ``transitions``: each state change some run made, in the
    order of its median time, with ``at`` over the runs that made it.
    """
    if not reports:
        raise ValueError("over_runs needs at least one report")

    def per_run(figure: Callable[[Mapping[str, Any]], float]) -> dict[str, Any]:
        return distribution({report["seed"]: figure(report) for report in reports}, replay)

    rows: dict[tuple[str, str], None] = {}
    for report in reports:
        for row in report["clients"]["seen_rows"]:
            rows[(row["saw"], row["outcome"])] = None
    last = len(_OUTCOME_ORDER)  # a way or an outcome this module does not know yet: at the end
    ordered_rows = sorted(
        rows, key=lambda key: (_SEEN_ORDER.get(key[0], last), _OUTCOME_ORDER.get(key[1], last))
    )
    clients = {
        "arrived": per_run(lambda report: report["clients"]["arrived"]),
        "still_open_at_end": per_run(lambda report: report["clients"]["in_flight_at_end"]),
        "seen": {saw: per_run(_seen(saw)) for saw in SEEN},
        "seen_rows": [
            {"saw": saw, "outcome": outcome, **per_run(_seen_row(saw, outcome))}
            for saw, outcome in ordered_rows
        ],
    }

    windows = {
        report["seed"]: window
        for report in reports
        if (window := impact_window(report)) is not None
    }
    impact = None
    if windows:
        impact = {
            "first": distribution({seed: w[0] for seed, w in windows.items()}, replay),
            "last": distribution({seed: w[1] for seed, w in windows.items()}, replay),
            "window": distribution(
                {seed: round(w[1] - w[0], 6) for seed, w in windows.items()}, replay
            ),
        }

    times: dict[tuple[str, str, int], dict[int, float]] = {}
    for report in reports:
        for key, at in transition_times(report).items():
            times.setdefault(key, {})[report["seed"]] = at
    transitions: list[dict[str, Any]] = [
        {
            "address": address,
            "state": state,
            "nth": nth,
            "at": distribution(times[(address, state, nth)], replay),
        }
        for address, state, nth in times
    ]
    transitions.sort(key=lambda row: (row["at"]["p50"], row["address"], row["state"], row["nth"]))
    return {
        "runs": len(reports),
        "clients": clients,
        "impact": impact,
        "state_changes": per_run(lambda report: len(report["timeline"])),
        "transitions": transitions,
    }


def _seen(saw: str) -> Callable[[Mapping[str, Any]], int]:
    return lambda report: int(report["clients"]["seen"][saw])


def _seen_row(saw: str, outcome: str) -> Callable[[Mapping[str, Any]], int]:
    def count(report: Mapping[str, Any]) -> int:
        rows = report["clients"]["seen_rows"]
        key = (saw, outcome)
        return sum(int(row["connections"]) for row in rows if (row["saw"], row["outcome"]) == key)

    return count


# -- for people ------------------------------------------------------------------------


def transition_label(row: Mapping[str, Any]) -> str:
    """``10.0.1.3:8080 -> unhealthy (1st)``."""
    return f"{row['address']} -> {row['state']} ({ordinal(row['nth'])})"


def rank_note(runs: int) -> str | None:
    """What nearest rank cannot tell with ``runs`` seeds (None from 100 on): the
    percentiles that are only the max, since it takes 10 runs for p90 to be
    another run's figure and 100 for p99."""
    maxed = [label for label, fraction in PERCENTILES if math.ceil(fraction * runs) >= runs]
    if not maxed:
        return None
    if runs == 1:
        return "With 1 run, every figure is that run's: run more seeds for a distribution"
    verb = "is" if len(maxed) == 1 else "are"
    return f"With {runs} runs, {' and '.join(maxed)} {verb} the max: run more seeds for the tail"


def render_distributions(distributions: Mapping[str, Any], console: Console) -> None:
    """The table of every distribution, then the replay command of each seed it names."""
    runs = distributions["runs"]
    table = Table(title=f"Over {runs} runs", title_justify="left")
    table.add_column("figure")
    for column in ("runs", "min", *(label for label, _ in PERCENTILES), "max"):
        table.add_column(column, justify="right")
    table.add_column("min seed", justify="right")
    table.add_column("max seed", justify="right")
    replays: dict[int, str] = {}

    def add(label: str, figure: Mapping[str, Any], spec: str) -> None:
        values = (figure[key] for key in ("min", *(name for name, _ in PERCENTILES), "max"))
        table.add_row(
            Text(label),  # an address is not markup: [::1]:80
            str(figure["runs"]),
            *(format(value, spec) for value in values),
            _seed(figure["at_min"]),
            _seed(figure["at_max"]),
        )
        for end in ("at_min", "at_max"):
            replays[figure[end]["seed"]] = figure[end]["replay"]

    clients = distributions["clients"]
    add("clients arrived", clients["arrived"], "d")
    for saw, label in SEEN.items():
        figure = clients["seen"][saw]
        if not figure["max"]:
            continue
        add(f"saw {label}", figure, "d")
        split = [row for row in clients["seen_rows"] if row["saw"] == saw]
        if len(split) > 1:
            for row in split:
                what = (
                    "none: the process had stopped"
                    if row["outcome"] == AFTER_STOP
                    else f"Loble: {row['outcome'].replace('_', ' ')}"
                )
                add(f"  {what}", row, "d")
    if clients["still_open_at_end"]["max"]:
        add("still open at the end", clients["still_open_at_end"], "d")
    table.add_section()
    impact = distributions["impact"]
    if impact is not None:
        add("first client failure at (s)", impact["first"], ".3f")
        add("last client failure at (s)", impact["last"], ".3f")
        add("impact window (s)", impact["window"], ".3f")
        table.add_section()
    add("state changes", distributions["state_changes"], "d")
    transitions = distributions["transitions"]
    for row in transitions[:_TRANSITION_ROWS]:
        add(f"{transition_label(row)} at (s)", row["at"], ".3f")
    hidden = len(transitions) - _TRANSITION_ROWS
    if hidden > 0:
        table.caption = f"{hidden} more state changes in --json"
    console.print(table)
    console.print(
        "runs: the runs that have the figure; min and max seed: the lowest seed with that value, "
        "+N: N more runs have it"
    )
    console.print(
        "p50, p90, p99: nearest rank, each a value some run had (the max below 10 runs for p90, "
        "below 100 for p99)"
    )
    note = rank_note(runs)
    if note is not None:
        console.print(note)
    console.print("Replay a seed behind a min or a max:")
    for seed in sorted(replays):
        console.print(f"  {replays[seed]}", soft_wrap=True, markup=False, highlight=False)


def _seed(extreme: Mapping[str, Any]) -> str:
    more = extreme["runs"] - 1
    return f"{extreme['seed']}" + (f" +{more}" if more else "")
