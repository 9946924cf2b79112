"""How fast the simulator runs, against the same model written in SimPy.

Not a test: run it by hand, ``python bench/sim_speed.py`` (``--minutes 5``
for a quick look, ``--profile`` for the hot spots, ``--core`` to time the
core alone, ``--floor`` the bare event loop). It runs one fixed scenario,
100 backends, 1,000 Poisson connections per second for one hour of simulated
time, a crash and a recovery every 5 minutes and a blackhole every 15,
with every invariant checked at every step, then the same arrival and duration
model in SimPy (one process per connection holding for its duration: the
trivial model a Python user would otherwise start from). It prints simulated
connections per wall-clock second for both and the ratio.
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import itertools
import pstats
import random
import statistics
import time
from typing import Any

import simpy

from loble.core import ConnectBackend, ProxyCore
from loble.sim import Simulation, build_report, parse_scenario

RATE = 1_000.0
MEAN_DURATION = 2.0
BACKENDS = 100


def scenario_document(minutes: float) -> dict[str, Any]:
    duration = minutes * 60.0
    faults: list[dict[str, Any]] = []
    for index, at in enumerate(range(60, int(duration), 300)):
        faults.append(
            {
                "at": float(at),
                "until": float(at + 60),
                "backend": f"10.3.{index % BACKENDS // 250}.{index % BACKENDS + 1}:80",
                "behaviour": "crash" if index % 3 else "blackhole",
            }
        )
    return {
        "balancer": {"algorithm": "round_robin", "connect_retries": 2},
        "health": {"failure_threshold": 3, "success_threshold": 2, "probe_interval": 2.0},
        "timeouts": {"connect": 1.0, "idle": 60.0, "drain": 30.0},
        "backends": [{"address": f"10.3.0.{i + 1}:80"} for i in range(BACKENDS)],
        "sim": {
            "duration": duration,
            "clients": {
                "arrival": "poisson",
                "rate": RATE,
                "duration": {"kind": "exponential", "mean": MEAN_DURATION},
                "half_close": 0.5,
            },
            "network": {"latency": {"kind": "uniform", "low": 0.0005, "high": 0.002}},
            "faults": faults,
        },
    }


def run_loble(minutes: float, seed: int) -> tuple[int, float, bool]:
    scenario = parse_scenario(scenario_document(minutes), name="bench")
    started = time.perf_counter()
    simulation = Simulation(scenario, seed).run()
    elapsed = time.perf_counter() - started
    report = build_report(simulation)
    return simulation.arrived, elapsed, bool(report["ok"])


def run_simpy(minutes: float, seed: int) -> tuple[int, float]:
    rng = random.Random(seed)
    env = simpy.Environment()
    duration = minutes * 60.0
    count = 0

    def connection(env: simpy.Environment, hold: float) -> Any:
        yield env.timeout(hold)

    def clients(env: simpy.Environment) -> Any:
        nonlocal count
        while True:
            yield env.timeout(rng.expovariate(RATE))
            if env.now >= duration:
                return
            count += 1
            env.process(connection(env, rng.expovariate(1.0 / MEAN_DURATION)))

    env.process(clients(env))
    started = time.perf_counter()
    env.run()
    return count, time.perf_counter() - started


def run_core(connections: int, seed: int) -> float:
    """The core alone in a tight loop: microseconds per connection.

    Each connection is accept, connected, client EOF, backend EOF and a
    ``next_deadline``, on the benchmark's fleet: no world, no heap, no checks.
    """
    config = parse_scenario(scenario_document(1.0), name="bench").config
    # As both drivers run it: no HealthReport objects (they read them from the actions).
    core = ProxyCore(config, random.Random(seed), health_reports=False)
    core.start(0.0)
    now = 0.0
    started = time.perf_counter()
    for _ in range(connections):
        now += 0.001
        connection_id, outputs = core.accept(now)
        attempt = next(o.attempt for o in outputs if isinstance(o, ConnectBackend))
        core.connected(connection_id, attempt, now)
        core.client_eof(connection_id, now)
        core.backend_eof(connection_id, now)
        core.next_deadline()
    return (time.perf_counter() - started) / connections * 1e6


def run_floor(connections: int, seed: int) -> float:
    """The event loop alone: microseconds per connection, nothing decided or checked.

    Four heap events a connection, as the simulator has them (the arrival,
    the connect's answer, the first end of stream, the second), each popped
    and handed to a handler that schedules the next: the least a discrete-event
    loop in CPython pays for this world, before any core call or check.
    """
    rng = random.Random(seed)
    heap: list[tuple[float, int, int, int]] = []
    sequence = itertools.count().__next__
    gap, hold = rng.expovariate, rng.expovariate
    push, pop = heapq.heappush, heapq.heappop

    def answer(event: tuple[float, int, int, int]) -> None:
        push(heap, (event[0] + 0.001, sequence(), 2, event[3]))

    def established(event: tuple[float, int, int, int]) -> None:
        push(heap, (event[0] + hold(1.0 / MEAN_DURATION), sequence(), 3, event[3]))

    def first_end(event: tuple[float, int, int, int]) -> None:
        push(heap, (event[0] + 0.001, sequence(), 4, event[3]))

    def second_end(event: tuple[float, int, int, int]) -> None:
        pass

    handlers = (None, answer, established, first_end, second_end)
    arrival = (gap(RATE), sequence(), 1, 0)
    count = 0
    started = time.perf_counter()
    while True:
        if heap and heap[0] < arrival:
            event = pop(heap)
        else:
            event, count = arrival, count + 1
            if count > connections:
                break
            arrival = (event[0] + gap(RATE), sequence(), 1, count)
        handlers[event[2]](event)  # type: ignore[misc]
    return (time.perf_counter() - started) / connections * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="simulated minutes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved Loble/SimPy rounds")
    parser.add_argument("--profile", action="store_true", help="cProfile the Loble run")
    parser.add_argument(
        "--core", action="store_true", help="time the core alone (no world, heap or checks)"
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="time the bare event loop (four heap events a connection, no decision)",
    )
    args = parser.parse_args()
    if args.floor:
        per_connection = min(run_floor(300_000, args.seed) for _ in range(3))
        print(
            f"event loop alone: {per_connection:.2f} us per connection "
            f"({1e6 / per_connection:,.0f} connections/s)"
        )
        return
    if args.core:
        per_connection = run_core(200_000, args.seed)
        print(
            f"core alone: {per_connection:.2f} us per connection "
            f"({1e6 / per_connection:,.0f} connections/s)"
        )
        return
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(run_loble, args.minutes, args.seed)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return
    ratios: list[float] = []
    for round_number in range(1, args.rounds + 1):
        # Interleaved: on a shared machine the speed drifts from minute to
        # minute, and each ratio compares two runs made next to each other.
        if args.rounds > 1:
            print(f"round {round_number} of {args.rounds}")
        connections, elapsed, ok = run_loble(args.minutes, args.seed)
        loble_rate = connections / elapsed
        print(
            f"loble sim: {connections:,} connections in {elapsed:.1f} s wall: "
            f"{loble_rate:,.0f} simulated connections/s (invariants {'held' if ok else 'FAILED'})"
        )
        simpy_connections, simpy_elapsed = run_simpy(args.minutes, args.seed)
        simpy_rate = simpy_connections / simpy_elapsed
        print(
            f"simpy model: {simpy_connections:,} connections in {simpy_elapsed:.1f} s wall: "
            f"{simpy_rate:,.0f} simulated connections/s"
        )
        ratios.append(loble_rate / simpy_rate)
        print(f"ratio loble/simpy: {ratios[-1]:.2f}x")
    if args.rounds > 1:
        print(f"median ratio over {args.rounds} rounds: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
