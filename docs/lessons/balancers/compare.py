"""The four balancers on the scenarios of this folder, beside queueing theory.

Run from anywhere: ``python docs/lessons/balancers/compare.py [--plot FILE]``.
Every run is a seed of the simulator, so the figures are the same each time.
"""

from __future__ import annotations

import argparse
import math
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import Any

from loble.core import BALANCERS
from loble.sim import Scenario, Simulation, build_report, load_scenario

HERE = Path(__file__).parent
ALGORITHMS = ("round_robin", "random", "least_connections", "p2c")
RUNS = {"capacity": 20, "unlimited": 10, "slow": 10}
SLOW = "10.0.6.4:80"


def erlang_b(offered: float, servers: int) -> float:
    """Erlang's loss formula: the share of arrivals that find every server busy,
    when ``offered`` (arrival rate x mean hold time) is the load on ``servers``."""
    blocking = 1.0
    for k in range(1, servers + 1):
        blocking = offered * blocking / (k + offered * blocking)
    return blocking


def expected_busiest(mean: float, backends: int) -> float:
    """The expected largest of ``backends`` independent Poisson(``mean``) counts."""
    expected, cdf, pmf, k = 0.0, 0.0, math.exp(-mean), 0
    while cdf < 1 - 1e-12:
        cdf += pmf
        expected += 1 - cdf**backends  # P(largest > k)
        k += 1
        pmf *= mean / k
    return expected


def run(scenario: Scenario, algorithm: str, seed: int, trace: Any = None) -> dict[str, Any]:
    """One seed with one of the built-in balancers, which come in as a factory."""
    simulation = Simulation(scenario, seed, balancer=BALANCERS[algorithm], trace=trace)
    report = build_report(simulation.run())
    assert report["ok"], f"{algorithm} seed {seed}: an invariant failed"
    return report


def refused(scenario: Scenario, algorithm: str) -> float:
    """The share of clients refused, over all the runs."""
    arrived = failed = 0
    for seed in range(1, RUNS["capacity"] + 1):
        clients = run(scenario, algorithm, seed)["clients"]
        arrived += clients["arrived"]
        failed += clients["outcomes"]["connect_failed"]
    return failed / arrived


class Follower:
    """Reads a run's trace as it is written: each backend's connections, and at
    each arrival how many more of them the busiest backend holds than the mean."""

    def __init__(self, scenario: Scenario) -> None:
        self.active = {backend.address: 0 for backend in scenario.config.backends}
        self.gaps: list[float] = []
        self.peak = 0

    def __call__(self, entry: dict[str, Any]) -> None:
        active = self.active
        if entry.get("output") == "HealthReport":
            if entry["input"] == "connection_started":
                active[entry["address"]] += 1
            elif entry["input"] == "connection_finished":
                active[entry["address"]] -= 1
        elif entry.get("event") == "arrival" and entry["args"] == [True]:
            self.gaps.append(max(active.values()) - sum(active.values()) / len(active))
            self.peak = max(self.peak, *active.values())


def imbalance(scenario: Scenario, algorithm: str) -> tuple[float, float]:
    """The mean of the busiest minus the mean at each arrival, and of each run's peak:
    the most connections one backend held at once."""
    gaps: list[float] = []
    peaks: list[int] = []
    for seed in range(1, RUNS["unlimited"] + 1):
        follower = Follower(scenario)
        run(scenario, algorithm, seed, trace=follower)
        gaps += follower.gaps
        peaks.append(follower.peak)
    return sum(gaps) / len(gaps), sum(peaks) / len(peaks)


def slow_share(scenario: Scenario, algorithm: str) -> float:
    """The share of connections sent to the slow backend, over all the runs."""
    sent = total = 0
    for seed in range(1, RUNS["slow"] + 1):
        for backend in run(scenario, algorithm, seed)["backends"]:
            total += backend["connections"]
            sent += backend["connections"] if backend["address"] == SLOW else 0
    return sent / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="FILE", help="also draw the three tables")
    plot = parser.parse_args().plot
    capacity = load_scenario(HERE / "capacity.toml")
    clients = capacity.sim.clients
    backends = len(capacity.config.backends)
    limit = capacity.sim.faults[0].limit
    # A connection holds its place from the connect to the close: its data,
    # plus the connect's round trip and the close's.
    hold = clients.duration.mean + 2 * capacity.sim.network.latency.value
    offered = clients.rate * hold / backends
    print(f"{backends} backends, {clients.rate:g} clients/s, each held {hold:g} s on average:")
    print(f"{offered:.3f} connections per backend, {offered * backends:.2f} in all")
    unlimited = load_scenario(HERE / "unlimited.toml")
    slow = load_scenario(HERE / "slow.toml")
    with ProcessPoolExecutor() as pool:  # each run is on its own: one process per core
        refusals = pool.map(refused, repeat(capacity), ALGORITHMS)
        gaps = pool.map(imbalance, repeat(unlimited), ALGORITHMS)
        sent = pool.map(slow_share, repeat(slow), ALGORITHMS)
        rows, spread, shares = (
            dict(zip(ALGORITHMS, refusals, strict=True)),
            dict(zip(ALGORITHMS, gaps, strict=True)),
            dict(zip(ALGORITHMS, sent, strict=True)),
        )

    alone, pooled = erlang_b(offered, limit), erlang_b(offered * backends, limit * backends)
    print(f"\ncapacity.toml: each backend refuses beyond {limit}; {RUNS['capacity']} runs")
    print(f"  {'algorithm':<18} {'refused':>8}  theory")
    theory = {
        "random": f"{alone:.2%}  Erlang B({offered:.2f}, {limit}): each backend alone",
        "least_connections": f"{pooled:.2%}  Erlang B({offered * backends:.2f}, "
        f"{limit * backends}): one pool of {limit * backends}",
    }
    for name, share in rows.items():
        print(f"  {name:<18} {share:8.2%}  {theory.get(name, '')}".rstrip())

    busiest = expected_busiest(offered, backends) - offered
    print(f"\nunlimited.toml: no limit; {RUNS['unlimited']} runs")
    print(f"  {'algorithm':<18} {'busiest - mean':>14} {'theory':>7} {'peak':>6}")
    for name, (gap, peak) in spread.items():
        theory_ = f"{busiest:.2f}" if name == "random" else ""
        print(f"  {name:<18} {gap:14.2f} {theory_:>7} {peak:6.1f}")

    delay = slow.sim.faults[0].delay
    # Little's law: connections held = arrival rate x hold time. Keeping the
    # connections held even sends the slow one (hold + 2 delays) fewer arrivals.
    fast, late = 1 / hold, 1 / (hold + 2 * delay)
    little = late / (late + (backends - 1) * fast)
    print(f"\nslow.toml: {SLOW} answers {delay:g} s late, holds each connection ", end="")
    print(f"{hold + 2 * delay:g} s; {RUNS['slow']} runs")
    print(f"  {'algorithm':<18} {'sent to it':>10}  theory")
    theory = {
        "round_robin": f"{1 / backends:.1%}  1 in {backends}",
        "random": f"{1 / backends:.1%}  1 in {backends}",
        "least_connections": f"{little:.1%}  Little's law",
    }
    for name, share in shares.items():
        print(f"  {name:<18} {share:10.1%}  {theory.get(name, '')}".rstrip())

    if plot:
        draw(plot, rows, (alone, pooled), spread, busiest, shares, little)


def draw(
    path: str,
    rows: dict[str, float],
    erlang: tuple[float, float],
    spread: dict[str, tuple[float, float]],
    busiest: float,
    shares: dict[str, float],
    little: float,
) -> None:
    from matplotlib.figure import Figure  # pip install 'loble[plot]'

    figure = Figure(figsize=(11, 3.6), layout="constrained")
    left, middle, right = figure.subplots(1, 3)
    names = list(ALGORITHMS)
    panels = (
        (left, [100 * rows[n] for n in names], "refused, % (capacity.toml)"),
        (middle, [spread[n][0] for n in names], "busiest - mean (unlimited.toml)"),
        (right, [100 * shares[n] for n in names], f"% sent to {SLOW} (slow.toml)"),
    )
    for axes, values, title in panels:
        axes.bar(names, values, color=["#90a4ae", "#ef6c00", "#2e7d32", "#1565c0"])
        axes.set_title(title, fontsize=10)
        axes.tick_params(axis="x", labelsize=8, rotation=15)
    left.axhline(100 * erlang[0], color="k", linestyle="--", label="Erlang B, each alone")
    left.axhline(100 * erlang[1], color="k", linestyle=":", label="Erlang B, one pool")
    middle.axhline(busiest, color="k", linestyle="--", label="independent Poisson counts")
    right.axhline(25.0, color="k", linestyle="--", label="1 in 4")
    right.axhline(100 * little, color="k", linestyle=":", label="Little's law")
    for axes in (left, middle, right):
        axes.set_ylim(0, axes.get_ylim()[1] * 1.3)  # room for the legend
        axes.legend(fontsize=8, loc="upper right")
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
