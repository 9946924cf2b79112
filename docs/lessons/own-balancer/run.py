"""Run a balancer of our own in the simulator, under every invariant.

``python docs/lessons/own-balancer/run.py LeastOfThree`` (or ``Forgetful``)
runs it on three scenarios of the other lessons: one that fills backends
up, one that drains a backend, one that flaps one. Exit status 3 if an
invariant failed, as ``loble sim``.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forgetful import Forgetful  # this script's folder is on the import path
from least_of_three import LeastOfThree

from loble.core import BALANCERS, Balancer
from loble.sim import Scenario, Simulation, build_report, load_scenario

# The annotation is where mypy checks that each class fits the protocol.
OURS: dict[str, Callable[[random.Random], Balancer]] = {
    "LeastOfThree": LeastOfThree,
    "Forgetful": Forgetful,
}
LESSONS = Path(__file__).parent.parent
SCENARIOS = {
    LESSONS / "balancers" / "capacity.toml": 10,  # path: runs (seeds 1..runs)
    LESSONS / "drain" / "drain.toml": 10,
    LESSONS / "thresholds" / "threshold-1.toml": 5,
}


def refused(reports: list[dict[str, Any]]) -> str:
    arrived = sum(report["clients"]["arrived"] for report in reports)
    failed = sum(report["clients"]["outcomes"]["connect_failed"] for report in reports)
    return f"{failed / arrived:.2%}"


def run(scenario: Scenario, factory: Callable[[random.Random], Balancer], runs: int) -> list[Any]:
    """Seeds 1..runs with ``factory``'s balancer: a report each."""
    return [
        build_report(Simulation(scenario, seed, balancer=factory).run())
        for seed in range(1, runs + 1)
    ]


def main() -> int:
    name = sys.argv[1]
    ours = OURS[name]
    failed = False
    for path, runs in SCENARIOS.items():
        scenario = load_scenario(path)
        reports = run(scenario, ours, runs)
        broken = [report for report in reports if not report["ok"]]
        if not broken:
            line = f"{name} on {path.name}: {runs} runs, every invariant held"
            if path.name == "capacity.toml":  # beside p2c on the same seeds
                p2c = run(scenario, BALANCERS["p2c"], runs)
                line += f"; refused {refused(reports)} (p2c: {refused(p2c)})"
            print(line)
            continue
        failed = True
        first = broken[0]
        print(f"{name} on {path.name}: {len(broken)} of {runs} runs failed; seed {first['seed']}:")
        for row in first["invariants"]:
            if not row["held"]:
                print(f"  {row['first'][0]}")
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
