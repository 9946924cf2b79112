"""The engine: determinism, and what each behaviour does to the core's inputs."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pytest

from loble.core import Backend, HealthState, Outcome, RoundRobin, Snapshot
from loble.sim import Scenario, Simulation, build_report, load_scenario
from loble.sim.cli import run_seed

from .conftest import SCENARIOS, scenario


def fingerprint(loaded: Scenario, seed: int) -> tuple[str, str]:
    trace = io.StringIO()
    report = run_seed(loaded, seed, trace)
    text = json.dumps(report, sort_keys=True)
    return hashlib.sha256(trace.getvalue().encode()).hexdigest(), text


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_same_seed_same_trace_and_report(path: Path) -> None:
    """madsim's check: run each shipped scenario twice and compare every byte."""
    loaded = load_scenario(path)
    first = fingerprint(loaded, 7)
    assert fingerprint(loaded, 7) == first
    assert fingerprint(loaded, 8) != first
    assert json.loads(first[1])["ok"]


def run(loaded: Scenario, seed: int = 1) -> dict[str, Any]:
    return build_report(Simulation(loaded, seed).run())


def outcomes(report: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in report["clients"]["outcomes"].items() if v}


def backend(report: dict[str, Any], index: int) -> dict[str, Any]:
    return dict(report["backends"][index])


def test_all_up_completes_everything() -> None:
    report = run(scenario())
    assert report["ok"]
    assert outcomes(report) == {"completed": report["clients"]["arrived"]}
    assert report["timeline"] == []
    assert report["clients"]["in_flight_at_end"] == 0


def test_crash_takes_a_backend_out_and_recovery_brings_it_back() -> None:
    fault = {"at": 2.0, "until": 5.0, "backend": "10.9.0.1:80", "behaviour": "crash"}
    report = run(scenario(sim_faults=[fault]))
    assert report["ok"]
    changes = [(c["address"], c["new"]) for c in report["timeline"]]
    assert ("10.9.0.1:80", "healthy") in changes
    assert backend(report, 0)["connect_failures"] >= 2
    assert backend(report, 0)["final_state"] == "healthy"
    assert backend(report, 0)["behaviours"] == [[0.0, "up"], [2.0, "crash"], [5.0, "up"]]


def test_blackhole_connects_time_out_and_are_retried() -> None:
    fault = {"at": 0.0, "backend": "10.9.0.2:80", "behaviour": "blackhole"}
    report = run(scenario(sim_faults=[fault]))
    assert report["ok"]
    assert report["clients"]["connect_latency_ms"]["max"] >= 500.0  # one timed-out attempt
    assert backend(report, 1)["final_state"] == "unhealthy"
    assert backend(report, 1)["probes"] == backend(report, 1)["probe_failures"] > 0


def test_every_backend_down_refuses_clients_at_once() -> None:
    fault = {"at": 0.0, "backend": "*", "behaviour": "crash"}
    report = run(scenario(sim_faults=[fault]))
    assert report["ok"]
    seen = outcomes(report)
    assert seen["no_backend"] > 0
    assert seen.get("connect_failed", 0) > 0


def test_slow_connects_beyond_the_timeout_come_back_stale() -> None:
    # Connects answer after 0.8 s, the core gives up at 0.5 s: every report is
    # stale, and the simulated backend hangs up the socket it opened.
    fault = {"at": 0.0, "backend": "*", "behaviour": "slow", "delay": 0.8}
    simulation = Simulation(scenario(sim_faults=[fault], sim_duration=3.0), 1).run()
    report = build_report(simulation)
    assert report["ok"]
    assert outcomes(report).get("completed", 0) == 0
    assert all(world.open == 0 for world in simulation.backends.values())


def test_slow_backend_adds_latency_but_serves() -> None:
    fault = {"at": 0.0, "backend": "*", "behaviour": "slow", "delay": 0.1}
    report = run(scenario(sim_faults=[fault]))
    assert report["ok"]
    assert report["clients"]["connect_latency_ms"]["p50"] >= 100.0
    assert outcomes(report) == {"completed": report["clients"]["arrived"]}


def test_reset_behaviour_resets_a_share_of_streams() -> None:
    fault = {"at": 0.0, "backend": "10.9.0.1:80", "behaviour": "reset", "probability": 1.0}
    report = run(scenario(sim_faults=[fault]))
    assert report["ok"]
    assert backend(report, 0)["resets"] == outcomes(report)["backend_reset"] > 0
    assert backend(report, 1)["resets"] == 0


def test_capacity_limit_refuses_beyond_n() -> None:
    fault = {"at": 0.0, "backend": "*", "behaviour": "capacity", "limit": 2}
    report = run(scenario(sim_faults=[fault], sim_clients={"rate": 100.0, "duration": 1.0}))
    assert report["ok"]
    assert sum(b["connect_failures"] for b in report["backends"]) > 0
    assert outcomes(report)["completed"] > 0


class _First:
    """Always the first eligible backend not yet tried: a balancer of one's own."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(
        self, snapshot: Snapshot, active: Callable[[str], int], exclude: Collection[str] = ()
    ) -> Backend | None:
        return next((b for b in snapshot.backends if b.address not in exclude), None)


class _Forgetful(_First):
    """Ignores ``exclude``: a retry goes back to the backend that just failed."""

    def pick(
        self, snapshot: Snapshot, active: Callable[[str], int], exclude: Collection[str] = ()
    ) -> Backend | None:
        return snapshot.backends[0] if snapshot.backends else None


def test_a_balancer_of_ones_own_runs_under_the_invariants() -> None:
    made: list[_First] = []

    def factory(rng: random.Random) -> _First:
        made.append(_First(rng))
        return made[-1]

    simulation = Simulation(scenario(), 1, balancer=factory).run()
    report = build_report(simulation)
    assert report["ok"]
    assert made[0].rng is simulation.rng  # the run's one rng, as the built-in ones get
    assert simulation.core.balancer is made[0]
    assert report["config"]["algorithm"] == "factory"
    assert backend(report, 1)["connections"] == 0  # the first backend takes everything
    assert backend(report, 0)["connections"] == report["clients"]["arrived"]
    # A class is its own factory; the built-in names are just such factories.
    assert build_report(Simulation(scenario(), 1, balancer=_First).run())["config"] == {
        **report["config"],
        "algorithm": "_First",
    }
    built_in = build_report(Simulation(scenario(), 1, balancer=RoundRobin).run())
    assert built_in == run(scenario()) | {
        "config": run(scenario())["config"] | {"algorithm": "RoundRobin"}
    }


def test_a_balancer_that_ignores_exclude_fails_bounded_retries() -> None:
    fault = {"at": 2.0, "backend": "10.9.0.1:80", "behaviour": "crash"}
    report = build_report(Simulation(scenario(sim_faults=[fault]), 1, balancer=_Forgetful).run())
    assert not report["ok"]
    failed = {row["name"]: row["first"] for row in report["invariants"] if not row["held"]}
    # The retry to the backend that just refused is caught, and so is the
    # connection it starts on a backend out of rotation.
    assert "retries 10.9.0.1:80, already tried (10.9.0.1:80)" in failed["bounded retries"][0]
    assert "a connection started on 10.9.0.1:80 while UNHEALTHY" in failed["safe draining"][0]


def test_flapping_alternates() -> None:
    fault = {"at": 1.0, "backend": "10.9.0.1:80", "behaviour": "flapping", "period": 4.0}
    report = run(scenario(sim_faults=[fault], sim_duration=20.0))
    assert report["ok"]
    news = [c["new"] for c in report["timeline"] if c["address"] == "10.9.0.1:80"]
    assert news.count("healthy") >= 2


def test_shutdown_drains_then_cuts_at_the_deadline() -> None:
    loaded = scenario(
        sim_shutdown_at=3.0,
        sim_clients={"rate": 20.0, "duration": {"kind": "uniform", "low": 0.5, "high": 10.0}},
    )
    report = run(loaded)
    assert report["ok"]
    shutdown = report["shutdown"]
    assert shutdown["deadline"] == 8.0
    assert shutdown["finished_at"] == 8.0
    assert shutdown["cut"] == outcomes(report)["cut"] > 0
    assert outcomes(report)["refused_shutting_down"] > 0
    assert report["simulated_seconds"] == 8.0


def test_shutdown_with_nothing_in_flight_stops_at_once() -> None:
    report = run(scenario(sim_shutdown_at=0.0))
    assert report["ok"]
    assert report["shutdown"]["finished_at"] == 0.0
    assert report["shutdown"]["cut"] == 0


def test_constant_arrivals_and_a_rate_schedule() -> None:
    loaded = scenario(
        sim_clients={
            "arrival": "constant",
            "rate": 10.0,
            "schedule": [{"at": 2.0, "rate": 0.0}, {"at": 5.0, "rate": 2.0}],
        }
    )
    report = run(loaded)
    # 10/s on [0, 2) then nothing until 5, then 2/s on [5, 10)
    assert report["clients"]["arrived"] == 20 + 10


def test_long_quiet_connections_are_kept_alive_by_touches() -> None:
    loaded = scenario(
        timeouts={"connect": 0.5, "idle": 1.0, "drain": 5.0},
        sim_clients={"rate": 2.0, "duration": 3.0},
    )
    report = run(loaded)
    assert report["ok"]
    assert outcomes(report) == {"completed": report["clients"]["arrived"]}


def test_the_settle_horizon_leaves_long_connections_open() -> None:
    loaded = scenario(sim_settle=1.0, sim_clients={"rate": 2.0, "duration": 100.0})
    report = run(loaded)
    assert report["ok"]
    assert report["clients"]["in_flight_at_end"] == report["clients"]["arrived"]
    assert report["simulated_seconds"] <= 11.0


def test_monitor_tally_matches_the_core_at_the_end() -> None:
    fault = {"at": 1.0, "until": 4.0, "backend": "10.9.0.2:80", "behaviour": "crash"}
    simulation = Simulation(scenario(sim_faults=[fault]), 3).run()
    monitor = simulation.monitor
    assert monitor.violations == []
    statistics = simulation.core.statistics()
    assert [b.address for b in statistics.backends] == list(monitor.addresses)
    for backend in statistics.backends:
        assert monitor.state[backend.address] is backend.state
        assert monitor.active[backend.address] == backend.active_connections == 0
    assert monitor.state["10.9.0.2:80"] is HealthState.HEALTHY
    assert sum(monitor.outcomes.values()) == monitor.accepted
    assert monitor.outcomes[Outcome.COMPLETED] > 0


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda path: path.stem)
def test_the_monitor_reads_each_health_report_from_the_actions_around_it(path: Path) -> None:
    """Untraced, the core makes no HealthReport and the monitor derives each one.

    Traced, the core makes them (for the reader): the counts the monitor
    derived must be exactly the core's own reports, and the run the same.
    """
    loaded = load_scenario(path)
    lines: list[dict[str, Any]] = []
    traced = Simulation(loaded, 2, trace=lines.append).run()
    counts: dict[tuple[str, str], int] = {}
    for line in lines:
        if line.get("output") == "HealthReport":
            key = (line["address"], line["input"])
            counts[key] = counts.get(key, 0) + 1
    assert counts, "a traced run shows the core's reports"
    monitor = traced.monitor
    for address in monitor.known:
        assert monitor.started[address] == counts.get((address, "connection_started"), 0)
        assert monitor.finished[address] == counts.get((address, "connection_finished"), 0)
        assert monitor.passive_failures[address] == counts.get((address, "passive_failure"), 0)
    untraced = Simulation(loaded, 2)
    assert not untraced.core.health_reports
    assert build_report(untraced.run()) == build_report(traced)


def test_trace_lines_are_json_with_steps(tmp_path: Path) -> None:
    trace = io.StringIO()
    run_seed(scenario(sim_duration=1.0), 1, trace)
    lines = [json.loads(line) for line in trace.getvalue().splitlines()]
    assert lines[0]["output"] == "SnapshotPublished"
    assert {"event", "output"} & set(lines[-1])
    kinds = {line.get("event") or line["output"] for line in lines}
    assert {"arrival", "ConnectBackend", "ConnectionClosed", "HealthReport"} <= kinds
    connect = next(line for line in lines if line.get("output") == "ConnectBackend")
    assert connect["backend"] in ("10.9.0.1:80", "10.9.0.2:80")
    steps = [line["step"] for line in lines]
    assert steps == sorted(steps)


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_skipping_deadline_questions_changes_nothing(path: Path) -> None:
    """The loop skips next_deadline() when it can prove the answer; asking every step agrees."""
    loaded = load_scenario(path)
    fast, exact = io.StringIO(), io.StringIO()
    Simulation(loaded, 3, trace=lambda e: fast.write(json.dumps(e) + "\n")).run()
    Simulation(
        loaded, 3, trace=lambda e: exact.write(json.dumps(e) + "\n"), peek_every_step=True
    ).run()
    assert fast.getvalue() == exact.getvalue()


# -- the fault schedule: a fault lasts until the next one on its backend, or its until ------


def behaviours(faults: list[dict[str, Any]], seed: int = 1) -> list[list[Any]]:
    report = run(scenario(sim_faults=faults), seed)
    return list(backend(report, 0)["behaviours"])


def test_an_until_does_not_cancel_a_later_fault_on_the_same_backend() -> None:
    # /tmp/rv/overlap.toml: crash 2..6, then blackhole from 4 with no end.
    faults = [
        {"at": 2.0, "until": 6.0, "backend": "10.9.0.1:80", "behaviour": "crash"},
        {"at": 4.0, "backend": "10.9.0.1:80", "behaviour": "blackhole"},
    ]
    assert behaviours(faults) == [[0.0, "up"], [2.0, "crash"], [4.0, "blackhole"]]


def test_a_fault_starting_at_another_faults_until_stays_in_force() -> None:
    # /tmp/rv/backtoback.toml: listed in either order, the result is the same.
    crash = {"at": 2.0, "until": 5.0, "backend": "10.9.0.1:80", "behaviour": "crash"}
    slow = {"at": 5.0, "backend": "10.9.0.1:80", "behaviour": "slow", "delay": 0.01}
    expected = [[0.0, "up"], [2.0, "crash"], [5.0, "slow"]]
    assert behaviours([slow, crash]) == behaviours([crash, slow]) == expected


def test_an_until_still_ends_its_own_fault_and_a_star_fault_per_backend() -> None:
    faults = [
        {"at": 1.0, "until": 7.0, "backend": "*", "behaviour": "crash"},
        {"at": 3.0, "until": 5.0, "backend": "10.9.0.2:80", "behaviour": "slow"},
        # The same instant as the fault before it: the one listed later wins.
        {"at": 3.0, "backend": "10.9.0.2:80", "behaviour": "reset"},
    ]
    report = run(scenario(sim_faults=faults))
    assert backend(report, 0)["behaviours"] == [[0.0, "up"], [1.0, "crash"], [7.0, "up"]]
    assert backend(report, 1)["behaviours"] == [
        [0.0, "up"],
        [1.0, "crash"],
        [3.0, "slow"],
        [3.0, "reset"],
    ]


# -- answers in flight when a backend dies ----------------------------------------------------


def passive_successes(loaded: Scenario, address: str) -> list[float]:
    trace = io.StringIO()
    report = run_seed(loaded, 1, trace)
    assert report["ok"]
    return [
        line["t"]
        for line in map(json.loads, trace.getvalue().splitlines())
        if line.get("output") == "HealthReport"
        and line["address"] == address
        and line["input"] == "passive_success"
    ]


def test_connects_in_flight_when_a_backend_crashes_fail() -> None:
    # /tmp/rv/crashrace.toml: connects take 2 s to answer; the backend crashes at t=5.
    loaded = scenario(
        timeouts={"connect": 5.0, "idle": 30.0, "drain": 5.0},
        sim_duration=8.0,
        sim_clients={"rate": 20.0, "duration": 0.5},
        sim_faults=[
            {"at": 0.0, "backend": "10.9.0.1:80", "behaviour": "slow", "delay": 2.0},
            {"at": 5.0, "backend": "10.9.0.1:80", "behaviour": "crash"},
        ],
    )
    successes = passive_successes(loaded, "10.9.0.1:80")
    assert successes and max(successes) < 5.0


def test_connects_in_flight_when_a_backend_flaps_down_fail() -> None:
    # Round trips of 0.3 s against a backend up 0.5 s, down 0.5 s: a connect
    # sent late in an up half lands in the down half and must fail.
    loaded = scenario(
        sim_network={"latency": 0.3},
        timeouts={"connect": 1.0, "idle": 30.0, "drain": 5.0},
        sim_faults=[{"at": 0.0, "backend": "10.9.0.1:80", "behaviour": "flapping", "period": 1.0}],
    )
    successes = passive_successes(loaded, "10.9.0.1:80")
    assert successes
    assert all(int(at / 0.5) % 2 == 0 for at in successes)  # only ever while up


# -- runs always move forward ------------------------------------------------------------------


def test_an_idle_timeout_below_the_clock_resolution_still_finishes() -> None:
    """/tmp/rv/tinyidle.toml: now + idle/2 == now used to touch forever at one instant."""
    loaded = scenario(sim_duration=2.0)  # the scenario check refuses such an idle timeout
    timeouts = dataclasses.replace(loaded.config.timeouts, idle=1e-300)
    loaded = dataclasses.replace(
        loaded, config=dataclasses.replace(loaded.config, timeouts=timeouts)
    )
    events = 0

    def bounded(entry: dict[str, Any]) -> None:
        nonlocal events
        events += 1
        if events > 20_000:
            raise AssertionError("the run stopped moving forward")

    report = build_report(Simulation(loaded, 1, trace=bounded).run())
    assert report["ok"]
    assert outcomes(report) == {"idle_timeout": report["clients"]["arrived"]}


def test_a_probe_answered_by_a_backend_that_then_crashes_fails() -> None:
    # Probes at t=1 and t=2 take 0.5 s to answer; the backend crashes at 2.2,
    # while the second answer is on its way.
    loaded = scenario(
        health={"probe_interval": 1.0, "probe_timeout": 1.0, "active": True},
        sim_duration=2.9,
        sim_clients={"rate": 0.0},
        sim_faults=[
            {"at": 0.0, "backend": "10.9.0.1:80", "behaviour": "slow", "delay": 0.5},
            {"at": 2.2, "backend": "10.9.0.1:80", "behaviour": "crash"},
        ],
    )
    report = run(loaded)
    assert report["ok"]
    assert (backend(report, 0)["probes"], backend(report, 0)["probe_failures"]) == (2, 1)
