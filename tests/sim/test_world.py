"""The world's pure draws: request schedules and faults from a failure process.

Every test here draws with fixed seeds, so none can flake: a tolerance below
says how far an empirical mean may be from the configured one at the sample
size used (several standard errors), and the seeds are held to it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
from pathlib import Path
from typing import Any

import pytest

from loble.sim import Distribution, Fault, Scenario, Simulation, build_report, load_scenario
from loble.sim._scenario import PROCESS_BEHAVIOURS, SimConfig
from loble.sim._swarm import run_once, swarm_scenario
from loble.sim._world import (
    RequestModel,
    completed_requests,
    count_sampler,
    draw_faults,
    latency_samplers,
    process_faults,
    request_schedule,
    with_drawn_faults,
)

from .conftest import SCENARIOS, scenario

A, B, C = "10.9.0.1:80", "10.9.0.2:80", "10.9.0.3:80"
FLEET = [{"address": A}, {"address": B}, {"address": C}]


def constant(value: float) -> Any:
    return lambda: value


# -- request counts and schedules ------------------------------------------------


@pytest.mark.parametrize(
    ("distribution", "mean"),
    [
        (Distribution(kind="constant", value=3.0), 3.0),
        (Distribution(kind="uniform", low=2.0, high=8.0), 5.0),
        (Distribution(kind="exponential", mean=5.0), 5.0),
        (Distribution(kind="exponential", mean=40.0), 40.0),
        (Distribution(kind="exponential", mean=1.0), 1.0),
    ],
    ids=["constant", "uniform", "exponential", "exponential-long", "exponential-one"],
)
def test_a_request_count_has_the_configured_mean(distribution: Distribution, mean: float) -> None:
    """200,000 draws: the standard error is under 0.3% of the mean; the tolerance is 2%."""
    draw = count_sampler(distribution, random.Random(11))
    counts = [draw() for _ in range(200_000)]
    assert all(isinstance(count, int) and count >= 1 for count in counts)
    assert statistics.fmean(counts) == pytest.approx(mean, rel=0.02)
    if distribution.kind == "uniform":
        assert set(counts) == set(range(2, 9))  # every whole number from low to high
    if distribution.kind == "exponential" and mean > 1:
        # Geometric from 1: P(N = 1) is 1 / mean, as a client closing after each
        # request with that probability.
        assert counts.count(1) / len(counts) == pytest.approx(1 / mean, rel=0.05)


def test_a_lognormal_count_is_rounded_around_its_median() -> None:
    draw = count_sampler(Distribution(kind="lognormal", median=6.0, sigma=0.5), random.Random(2))
    counts = [draw() for _ in range(50_001)]
    assert statistics.median(counts) == 6
    assert min(counts) >= 1
    tiny = count_sampler(Distribution(kind="lognormal", median=1.0, sigma=3.0), random.Random(2))
    assert min(tiny() for _ in range(10_000)) == 1  # never below 1


def test_a_schedule_adds_round_trips_service_and_think_times() -> None:
    ends = request_schedule(constant(3), constant(0.1), constant(0.01), constant(0.5))
    assert ends == pytest.approx([0.11, 0.72, 1.33])
    assert request_schedule(constant(1), constant(0.2), constant(0.0), constant(9.0)) == [0.2]
    # A cut tells how many requests completed and how many were lost.
    assert [completed_requests(ends, t) for t in (0.0, 0.11, 0.5, 1.0, 1.33, 5.0)] == [
        0,
        1,
        1,
        2,
        3,
        3,
    ]


def test_a_schedule_draws_in_a_stated_order_from_the_one_generator() -> None:
    """Count, then per request a round trip, a service time and (before each but the first) a think."""
    drawn: list[str] = []

    def sampler(name: str, value: float) -> Any:
        def draw() -> float:
            drawn.append(name)
            return value

        return draw

    def count() -> int:
        drawn.append("count")
        return 3

    request_schedule(count, sampler("service", 1.0), sampler("latency", 0.0), sampler("think", 0))
    assert drawn == ["count", "latency", "service"] + ["think", "latency", "service"] * 2


def request_world(**clients: Any) -> SimConfig:
    return scenario(
        backends=FLEET,
        sim_clients={"requests": {"kind": "exponential", "mean": 8}, **clients},
        sim_service={"kind": "exponential", "mean": 0.02},
        sim_backends=[{"address": B, "service": 1.0, "latency": 0.1}],
    ).sim


def test_request_schedules_have_the_configured_mean_number_of_requests() -> None:
    """20,000 connections: a standard error of 0.7% of the mean; the tolerance is 3%."""
    model = RequestModel(request_world(think=0.5), random.Random(5))
    schedules = [model.schedule(A) for _ in range(20_000)]
    assert statistics.fmean(len(ends) for ends in schedules) == pytest.approx(8.0, rel=0.03)
    assert all(ends == sorted(ends) for ends in schedules)
    # Each request is a round trip (0.001 s) plus a service time (mean 0.02 s),
    # with a think time of 0.5 s between two: the mean duration follows.
    durations = [ends[-1] for ends in schedules]
    per_connection = statistics.fmean(
        len(ends) * 0.021 + (len(ends) - 1) * 0.5 for ends in schedules
    )
    assert statistics.fmean(durations) == pytest.approx(per_connection, rel=0.02)


def test_each_backend_serves_at_its_own_pace() -> None:
    sim = request_world()
    model = RequestModel(sim, random.Random(1))
    slow = model.schedule(B)  # service 1.0 and a round trip of 0.1: 1.1 s a request
    gaps = [later - earlier for earlier, later in zip([0.0, *slow[:-1]], slow, strict=True)]
    assert gaps == pytest.approx([1.1] * len(slow))
    assert max(model.schedule(A)[0] for _ in range(100)) < 0.5  # the default, mean 0.021
    assert sim.service_of(B) == Distribution(kind="constant", value=1.0)
    assert sim.service_of(A) == Distribution(kind="exponential", mean=0.02)
    assert sim.latency_of(B) == Distribution(kind="constant", value=0.1)
    assert sim.latency_of(A) == Distribution(kind="constant", value=0.001)
    samplers = latency_samplers(sim, random.Random(1))
    assert list(samplers) == [B] and samplers[B]() == 0.1


def test_a_request_model_draws_the_same_schedules_from_the_same_seed() -> None:
    sim = request_world(think={"kind": "uniform", "low": 0.0, "high": 1.0})
    first = RequestModel(sim, random.Random(9))
    second = RequestModel(sim, random.Random(9))
    assert [first.schedule(A) for _ in range(50)] == [second.schedule(A) for _ in range(50)]


def test_a_request_model_needs_requests() -> None:
    with pytest.raises(ValueError, match="requests"):
        RequestModel(SimConfig(), random.Random(1))


# -- faults drawn from a process -------------------------------------------------


def processes(*entries: dict[str, Any], duration: float = 1000.0, **changes: Any) -> Scenario:
    return scenario(
        backends=FLEET, sim_duration=duration, sim_fault_processes=list(entries), **changes
    )


def ups_and_downs(faults: tuple[Fault, ...], start: float = 0.0) -> tuple[list[float], list[float]]:
    """Time up before each failure (from the start or the last repair), and each time down."""
    ups, downs, repaired = [], [], start
    for fault in faults:
        assert fault.until is not None and fault.until > fault.at >= repaired
        ups.append(fault.at - repaired)
        downs.append(fault.until - fault.at)
        repaired = fault.until
    return ups, downs


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_drawn_faults_have_the_configured_mtbf_and_mttr(seed: int) -> None:
    """About 9,000 failures over 10^6 s: a standard error of about 1.1% on
    each mean; the tolerance is 5%."""
    found = processes(
        {"backend": A, "behaviour": "crash", "mtbf": 100.0, "mttr": 10.0}, duration=1e6
    )
    faults = draw_faults(found, seed)
    assert len(faults) > 8000
    ups, downs = ups_and_downs(faults)
    assert statistics.fmean(ups) == pytest.approx(100.0, rel=0.05)
    assert statistics.fmean(downs) == pytest.approx(10.0, rel=0.05)
    # Exponential by default: the standard deviation is the mean.
    assert statistics.stdev(ups) == pytest.approx(100.0, rel=0.05)
    assert all(f.backend == A and f.behaviour == "crash" for f in faults)
    assert all(f.at < 1e6 for f in faults)


def test_any_distribution_can_be_a_time_between_failures() -> None:
    found = processes(
        {
            "backend": A,
            "behaviour": "slow",
            "delay": 0.25,
            "mtbf": {"kind": "constant", "value": 10.0},
            "mttr": {"kind": "constant", "value": 2.0},
            "start": 5.0,
            "stop": 60.0,
        }
    )
    faults = draw_faults(found, 1)
    assert [(f.at, f.until) for f in faults] == [
        (15.0, 17.0),
        (27.0, 29.0),
        (39.0, 41.0),
        (51.0, 53.0),
    ]
    assert all(f.delay == 0.25 and f.behaviour == "slow" for f in faults)
    uniform = processes(
        {
            "backend": B,
            "behaviour": "blackhole",
            "mtbf": {"kind": "uniform", "low": 20.0, "high": 60.0},
            "mttr": {"kind": "lognormal", "median": 3.0, "sigma": 0.5},
        },
        duration=1e6,
    )
    ups, downs = ups_and_downs(draw_faults(uniform, 4))
    assert statistics.fmean(ups) == pytest.approx(40.0, rel=0.02)
    assert min(ups) >= 20.0 and max(ups) <= 60.0
    assert statistics.median(downs) == pytest.approx(3.0, rel=0.05)


def test_draws_are_deterministic_per_seed_and_leave_the_run_generator_alone() -> None:
    found = processes({"backend": "*", "behaviour": "kill", "mtbf": 50.0, "mttr": 5.0})
    state = random.getstate()
    first = draw_faults(found, 7)
    assert random.getstate() == state  # the module's generator is untouched
    assert draw_faults(found, 7) == first
    assert draw_faults(found, 8) != first
    assert first == draw_faults(dataclasses.replace(found), 7)  # a copy draws the same


def test_star_fails_each_backend_on_its_own_and_a_zone_together() -> None:
    found = processes(
        {"backend": "*", "behaviour": "crash", "mtbf": 100.0, "mttr": 10.0},
        {"zone": [A, C], "behaviour": "host_down", "mtbf": 200.0, "mttr": 20.0},
        duration=10_000.0,
    )
    faults = draw_faults(found, 3)
    crashes = {address: [f for f in faults if f.behaviour == "crash" and f.backend == address]
               for address in (A, B, C)}  # fmt: skip
    assert all(len(drawn) > 50 for drawn in crashes.values())
    times = [[f.at for f in drawn] for drawn in crashes.values()]
    assert len({tuple(t) for t in times}) == 3  # three independent histories
    zone = [f for f in faults if f.behaviour == "host_down"]
    assert {f.backend for f in zone} == {A, C}
    on_a = [(f.at, f.until) for f in zone if f.backend == A]
    on_c = [(f.at, f.until) for f in zone if f.backend == C]
    assert on_a == on_c and len(on_a) > 20  # they fail, and come back, together
    # At one instant a zone's backends fail in the order it lists them.
    assert [f.backend for f in zone[:2]] == [A, C]


def test_a_backend_s_failures_do_not_depend_on_the_rest_of_the_fleet() -> None:
    """Each unit draws from its own generator: adding a backend (or a process)
    leaves the others' histories as they were, so two fleets compare under
    the same failures."""
    entry = {"backend": "*", "behaviour": "crash", "mtbf": 30.0, "mttr": 3.0}
    two = scenario(backends=FLEET[:2], sim_duration=1000.0, sim_fault_processes=[entry])
    three = processes(entry, {"backend": C, "behaviour": "reset", "mtbf": 9.0, "mttr": 1.0})
    for address in (A, B):
        assert [f for f in draw_faults(two, 5) if f.backend == address] == [
            f for f in draw_faults(three, 5) if f.backend == address and f.behaviour == "crash"
        ]


def test_drawn_faults_follow_the_fixed_ones_in_time_order() -> None:
    fixed = [
        {"at": 500.0, "backend": B, "behaviour": "crash", "until": 510.0},
        {"at": 5.0, "backend": "*", "behaviour": "slow", "delay": 0.1},
    ]
    found = processes(
        {"backend": A, "behaviour": "crash", "mtbf": 20.0, "mttr": 2.0},
        {"backend": C, "behaviour": "flapping", "period": 4.0, "mtbf": 30.0, "mttr": 5.0},
        sim_faults=fixed,
    )
    faults = draw_faults(found, 2)
    assert faults[:2] == found.sim.faults  # at the indexes the file gives them
    drawn = faults[2:]
    assert drawn == process_faults(found, 2)
    assert [f.at for f in drawn] == sorted(f.at for f in drawn)
    assert {f.behaviour for f in drawn} == {"crash", "flapping"}
    assert all(f.period == 4.0 for f in drawn if f.behaviour == "flapping")


def test_with_drawn_faults_replaces_the_processes_by_their_faults_once() -> None:
    found = processes(
        {"backend": A, "behaviour": "crash", "mtbf": 20.0, "mttr": 2.0},
        sim_faults=[{"at": 1.0, "backend": B, "behaviour": "crash", "until": 2.0}],
    )
    drawn = with_drawn_faults(found, 4)
    assert drawn.sim.faults == draw_faults(found, 4)
    assert drawn.sim.fault_processes == ()
    assert drawn.sim.drawn_faults == len(drawn.sim.faults) - 1 > 10
    assert with_drawn_faults(drawn, 4) is drawn  # applied twice, drawn once
    assert drawn.config == found.config and drawn.warnings == found.warnings
    plain = scenario()
    assert with_drawn_faults(plain, 4) is plain


def test_a_process_window_bounds_the_failures_not_the_repairs() -> None:
    found = processes(
        {"backend": A, "behaviour": "crash", "mtbf": 5.0, "mttr": 50.0, "start": 100, "stop": 400}
    )
    faults = draw_faults(found, 1)
    assert faults and all(100.0 <= f.at < 400.0 for f in faults)
    assert max(f.until or 0.0 for f in faults) > 400.0  # the last repair may come after


@pytest.mark.parametrize("behaviour", PROCESS_BEHAVIOURS)
def test_drawn_faults_run_in_todays_engine_under_every_invariant(behaviour: str) -> None:
    found = scenario(
        sim_duration=20.0,
        sim_fault_processes=[
            {"backend": "*", "behaviour": behaviour, "mtbf": 4.0, "mttr": 1.0},
            {"zone": [A, B], "behaviour": "crash", "mtbf": 15.0, "mttr": 0.5},
        ],
    )
    drawn = with_drawn_faults(found, 3)
    assert drawn.sim.drawn_faults > 3
    report = build_report(Simulation(drawn, 3).run())
    assert report["ok"], report["invariants"]


def test_a_swarm_composes_with_drawn_faults() -> None:
    found = processes(
        {"backend": A, "behaviour": "crash", "mtbf": 100.0, "mttr": 10.0},
        sim_faults=[{"at": 1.0, "backend": B, "behaviour": "crash"}],
    )
    swarmed = swarm_scenario(found, 6)
    both = with_drawn_faults(swarmed, 6)
    assert both.sim.faults == swarmed.sim.faults + process_faults(found, 6)


# -- the shipped scenarios run as before -----------------------------------------


WORLD_SCENARIOS = ("client-retries", "keepalive-requests", "random-failures")
"""The shipped scenarios that show the new keys (tests/sim/test_world_engine.py)."""
TODAYS = [path for path in SCENARIOS if path.stem not in WORLD_SCENARIOS]


def test_the_world_scenarios_are_shipped() -> None:
    assert sorted(set(p.stem for p in SCENARIOS) & set(WORLD_SCENARIOS)) == list(WORLD_SCENARIOS)
    assert len(TODAYS) >= 10


@pytest.mark.parametrize("path", TODAYS, ids=[p.stem for p in TODAYS])
def test_a_shipped_scenario_is_todays_world(path: Path) -> None:
    """No other shipped scenario sets a new key, so each runs as it did
    before them: every new field has its default, there is nothing to draw,
    and the report of a run is the same with or without
    :func:`with_drawn_faults`."""
    loaded = load_scenario(path)
    new_defaults = SimConfig()
    for name in ("service", "backends", "fault_processes", "drawn_faults", "timer_jitter"):
        assert getattr(loaded.sim, name) == getattr(new_defaults, name)
    clients = loaded.sim.clients
    assert clients.requests is None and clients.connect_timeout is None
    assert clients.retries == 0
    assert clients.think == clients.retry_backoff == Distribution(kind="constant", value=0.0)
    assert with_drawn_faults(loaded, 1) is loaded
    assert all(op.written_as == "" for op in loaded.sim.operations)
    assert loaded.warnings == ()
    report = json.dumps(run_once(loaded, 1)[0], sort_keys=True)
    assert json.dumps(run_once(with_drawn_faults(loaded, 1), 1)[0], sort_keys=True) == report
