"""Distributions over seeds (``--runs K``), computed from known reports by hand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from loble.sim._report import SEEN
from loble.sim._spread import (
    distribution,
    impact_window,
    ordinal,
    over_runs,
    rank_note,
    transition_times,
)
from loble.sim._timeline import evenly


def replay(seed: int) -> str:
    return f"loble sim s.toml --seed {seed}"


def report(
    seed: int,
    *,
    complete: int = 100,
    reset: int = 0,
    changes: Sequence[tuple[float, str, str]] = (),
    impact: Sequence[tuple[str, float, float]] = (),
) -> dict[str, Any]:
    """The fields of a report the distributions read, and nothing else."""
    seen = dict.fromkeys(SEEN, 0)
    seen.update(complete=complete, reset=reset)
    rows = [{"saw": "complete", "outcome": "completed", "connections": complete}]
    if reset:
        rows.append({"saw": "reset", "outcome": "backend_reset", "connections": reset})
    return {
        "seed": seed,
        "timeline": [
            {"at": at, "address": address, "old": "?", "new": new, "reason": ""}
            for at, address, new in changes
        ],
        "clients": {
            "arrived": complete + reset,
            "seen": seen,
            "seen_rows": rows,
            "in_flight_at_end": 0,
            "impact": [
                {"outcome": outcome, "first": first, "last": last, "connections": 1}
                for outcome, first, last in impact
            ],
        },
    }


def test_nearest_rank_percentiles_and_the_seeds_behind_the_extremes() -> None:
    # Seeds 1..10 with the values 10, 20, ..., 100 in a shuffled order.
    shuffled = (70, 10, 100, 40, 30, 90, 20, 60, 50, 80)
    values = dict(zip(range(1, 11), shuffled, strict=True))
    got = distribution(values, replay)
    assert {key: got[key] for key in ("runs", "min", "p50", "p90", "p99", "max")} == {
        "runs": 10,
        "min": 10,
        "p50": 50,  # the 5th smallest of 10
        "p90": 90,  # the 9th
        "p99": 100,  # the 10th: below 100 runs, p99 is the max
        "max": 100,
    }
    assert got["at_min"] == {"seed": 2, "runs": 1, "replay": "loble sim s.toml --seed 2"}
    assert got["at_max"] == {"seed": 3, "runs": 1, "replay": "loble sim s.toml --seed 3"}
    five = distribution({seed: float(seed) for seed in range(1, 6)}, replay)
    assert (five["p50"], five["p90"], five["p99"], five["max"]) == (3.0, 5.0, 5.0, 5.0)
    hundred = distribution({seed: seed for seed in range(100)}, replay)
    assert (hundred["p50"], hundred["p90"], hundred["p99"], hundred["max"]) == (49, 89, 98, 99)
    # Ties: the lowest seed, and how many runs share the value.
    tied = distribution({7: 3, 4: 3, 9: 5, 5: 3}, replay)
    assert tied["at_min"]["seed"] == 4 and tied["at_min"]["runs"] == 3
    assert tied["at_max"] == {"seed": 9, "runs": 1, "replay": replay(9)}
    with pytest.raises(ValueError, match="at least one run"):
        distribution({}, replay)


def test_state_changes_line_up_by_backend_state_and_count_across_seeds() -> None:
    a, b = "10.0.0.1:80", "10.0.0.2:80"
    detour = [(5.0, a, "draining"), (6.0, a, "unhealthy"), (9.0, a, "healthy")]
    reports = [
        report(1, changes=[(5.0, a, "unhealthy"), (8.0, a, "healthy")]),
        report(2, changes=detour),
        report(
            3,
            changes=[
                (4.0, b, "unhealthy"),
                (7.0, a, "unhealthy"),
                (12.0, a, "healthy"),
                (13.0, a, "unhealthy"),
            ],
        ),
    ]
    assert transition_times(reports[2]) == {
        (b, "unhealthy", 1): 4.0,
        (a, "unhealthy", 1): 7.0,
        (a, "healthy", 1): 12.0,
        (a, "unhealthy", 2): 13.0,
    }
    spread = over_runs(reports, replay)
    rows = {(row["address"], row["state"], row["nth"]): row["at"] for row in spread["transitions"]}
    assert [(row["address"], row["state"], row["nth"]) for row in spread["transitions"]] == [
        (b, "unhealthy", 1),  # in the order of the median time
        (a, "draining", 1),
        (a, "unhealthy", 1),
        (a, "healthy", 1),
        (a, "unhealthy", 2),
    ]
    unhealthy = rows[(a, "unhealthy", 1)]
    assert (unhealthy["runs"], unhealthy["min"], unhealthy["p50"], unhealthy["max"]) == (
        3,
        5.0,
        6.0,
        7.0,
    )
    assert unhealthy["at_min"]["seed"] == 1 and unhealthy["at_max"]["seed"] == 3
    assert rows[(a, "draining", 1)]["runs"] == 1 and rows[(a, "unhealthy", 2)]["runs"] == 1
    changes = spread["state_changes"]
    assert (changes["min"], changes["p50"], changes["max"]) == (2, 3, 4)
    assert changes["at_max"] == {"seed": 3, "runs": 1, "replay": replay(3)}


def test_what_clients_saw_and_the_impact_window_over_runs() -> None:
    reports = [
        report(1, complete=90, reset=10, impact=[("backend_reset", 20.0, 20.5)]),
        report(2, complete=100),
        report(
            3,
            complete=95,
            reset=5,
            impact=[("no_backend", 21.0, 30.0), ("refused_after_stop", 31.0, 33.0)],
        ),
    ]
    assert impact_window(reports[1]) is None
    assert impact_window(reports[2]) == (21.0, 33.0)
    spread = over_runs(reports, replay)
    assert spread["runs"] == 3
    clients = spread["clients"]
    assert set(clients["seen"]) == set(SEEN)  # all five, a way no run saw too
    reset = clients["seen"]["reset"]
    assert (reset["runs"], reset["min"], reset["p50"], reset["max"]) == (3, 0, 5, 10)
    assert reset["at_min"]["seed"] == 2 and reset["at_max"]["seed"] == 1
    assert clients["seen"]["truncated"]["max"] == 0
    assert [(row["saw"], row["outcome"]) for row in clients["seen_rows"]] == [
        ("complete", "completed"),
        ("reset", "backend_reset"),
    ]
    assert clients["seen_rows"][1]["min"] == 0  # seed 2 had none: it counts 0
    assert clients["arrived"]["min"] == clients["arrived"]["max"] == 100
    impact = spread["impact"]
    assert impact["first"]["runs"] == 2 and impact["first"]["min"] == 20.0
    assert impact["last"]["max"] == 33.0 and impact["last"]["at_max"]["seed"] == 3
    assert (impact["window"]["min"], impact["window"]["max"]) == (0.5, 12.0)
    assert over_runs([report(1)], replay)["impact"] is None
    with pytest.raises(ValueError, match="at least one report"):
        over_runs([], replay)


def test_ordinals_and_what_few_runs_cannot_tell() -> None:
    numbers = (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 111, 112)
    assert [ordinal(n) for n in numbers] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th",
        "21st", "22nd", "23rd", "101st", "111th", "112th",
    ]  # fmt: skip
    assert (
        rank_note(1) == "With 1 run, every figure is that run's: run more seeds for a distribution"
    )
    assert rank_note(5) == "With 5 runs, p90 and p99 are the max: run more seeds for the tail"
    assert rank_note(9) == "With 9 runs, p90 and p99 are the max: run more seeds for the tail"
    assert rank_note(10) == "With 10 runs, p99 is the max: run more seeds for the tail"
    assert rank_note(99) == "With 99 runs, p99 is the max: run more seeds for the tail"
    assert rank_note(100) is None


def test_evenly_spreads_whole_connections_over_the_span() -> None:
    assert evenly(10, 1.0, 3.0, 1.0, 4) == [0, 5, 5, 0]
    assert evenly(7, 2.5, 2.5, 1.0, 4) == [0, 0, 7, 0]
    spread = evenly(564, 38.005, 44.98, 0.5, 90)
    assert sum(spread) == 564
    assert all(count == 0 for count in spread[: int(38.005 / 0.5)])
    assert spread[int(44.98 / 0.5) + 1 :] == [0] * (90 - int(44.98 / 0.5) - 1)
    assert max(spread) - min(spread[77:89]) <= 1  # the full bins: 564 / 6.975 s * 0.5 s each
