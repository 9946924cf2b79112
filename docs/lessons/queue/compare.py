"""Loble's own connection limits and queue on pool.toml, beside Erlang C and B.

Run from anywhere: ``python docs/lessons/queue/compare.py``. Every run is a
seed of the simulator, so the figures are the same each time.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from loble.core import BALANCERS, Outcome
from loble.sim import Scenario, Simulation, load_scenario

HERE = Path(__file__).parent
ALGORITHMS = ("round_robin", "random", "least_connections", "p2c")
RUNS = 20


def erlang_b(offered: float, servers: int) -> float:
    """Erlang's loss formula: the share of arrivals that find every server busy
    and are lost, ``offered`` (arrival rate x mean hold time) on ``servers``."""
    blocking = 1.0
    for k in range(1, servers + 1):
        blocking = offered * blocking / (k + offered * blocking)
    return blocking


def erlang_c(offered: float, servers: int) -> float:
    """Erlang's delay formula: the share of arrivals that find every server busy
    and wait, when nobody is lost (it needs ``offered`` below ``servers``)."""
    blocking = erlang_b(offered, servers)
    return servers * blocking / (servers - offered * (1 - blocking))


def without_queue(scenario: Scenario) -> Scenario:
    """The same scenario with no room to wait: ``queue_size = 0``."""
    balancer = dataclasses.replace(scenario.config.balancer, queue_size=0)
    config = dataclasses.replace(scenario.config, balancer=balancer)
    return dataclasses.replace(scenario, config=config)


def one_run(scenario: Scenario, algorithm: str, seed: int) -> tuple[int, int, float, int]:
    """One seed: (arrived, queued, seconds waited in all, refused for a full queue)."""
    simulation = Simulation(scenario, seed, balancer=BALANCERS[algorithm]).run()
    monitor = simulation.monitor
    assert not monitor.violations, f"{algorithm} seed {seed}: {monitor.violations[0]}"
    return (
        monitor.accepted,
        monitor.queued_total,
        sum(monitor.queue_waits),
        monitor.outcomes[Outcome.QUEUE_FULL],
    )


def measure(
    pool: ProcessPoolExecutor, scenario: Scenario, algorithm: str
) -> tuple[float, float, float]:
    """(share that waited, mean wait over every client in s, share refused), over the runs."""
    seeds = range(1, RUNS + 1)
    runs = list(pool.map(one_run, [scenario] * RUNS, [algorithm] * RUNS, seeds))
    arrived = sum(run[0] for run in runs)
    queued = sum(run[1] for run in runs)
    waited = sum(run[2] for run in runs)
    refused = sum(run[3] for run in runs)
    return queued / arrived, waited / arrived, refused / arrived


def main() -> None:
    scenario = load_scenario(HERE / "pool.toml")
    clients, backends = scenario.sim.clients, scenario.config.backends
    places = sum(backend.max_connections for backend in backends)
    # A connection holds its place from the connect to the close: its data,
    # plus the connect's round trip and the close's.
    hold = clients.duration.mean + 2 * scenario.sim.network.latency.value
    offered = clients.rate * hold
    delay = erlang_c(offered, places)
    mean_wait = delay * hold / (places - offered)
    print(
        f"{len(backends)} backends of {places // len(backends)} places, {clients.rate:g} clients/s, ",
        end="",
    )
    print(f"each held {hold:g} s: {offered:.2f} erlangs on {places} places; {RUNS} runs each")
    print(f"\nwith the queue: Erlang C({offered:.2f}, {places}) = {delay:.1%} wait, ", end="")
    print(f"{mean_wait * 1000:.1f} ms on average")
    with ProcessPoolExecutor() as pool:
        print("  algorithm           waited  mean wait")
        for algorithm in ALGORITHMS:
            share, wait, _ = measure(pool, scenario, algorithm)
            print(f"  {algorithm:18} {share:7.1%}  {wait * 1000:6.1f} ms")
        lost = erlang_b(offered, places)
        print(f"\nqueue_size = 0: Erlang B({offered:.2f}, {places}) = {lost:.2%} refused")
        print("  algorithm          refused")
        for algorithm in ALGORITHMS:
            _, _, refused = measure(pool, without_queue(scenario), algorithm)
            print(f"  {algorithm:18} {refused:7.2%}")


if __name__ == "__main__":
    main()
