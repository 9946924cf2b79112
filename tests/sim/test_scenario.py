"""Scenario files: the config schema plus [sim], with config-style errors."""

from __future__ import annotations

import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from loble.__main__ import main
from loble.core import Config, ConfigError
from loble.sim import Distribution, Simulation, build_report, load_scenario, parse_scenario

from .conftest import SCENARIOS, document, scenario


def errors_of(doc: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_scenario(doc)
    return caught.value.errors


def test_every_shipped_scenario_loads() -> None:
    assert len(SCENARIOS) >= 6
    for path in SCENARIOS:
        loaded = load_scenario(path)
        assert loaded.name == path.stem
        assert loaded.config.backends


def test_defaults_fill_in() -> None:
    loaded = parse_scenario({"backends": [{"address": "10.0.0.1:80"}], "sim": {}}, name="minimal")
    assert loaded.sim.duration == 60.0
    assert loaded.sim.clients.arrival == "poisson"
    assert loaded.sim.faults == ()
    assert loaded.config.balancer.algorithm == "round_robin"


def test_missing_sim_table_is_an_error() -> None:
    assert errors_of({"backends": [{"address": "10.0.0.1:80"}]}) == [
        "sim: missing: a scenario needs a [sim] table"
    ]


def test_config_and_sim_errors_come_together_with_key_paths() -> None:
    doc = document(
        balancer={"algorithm": "round_robn"},
        sim_duraton=5,
        sim_clients={"rate": -1, "half_close": 2, "arival": "poisson"},
    )
    errors = errors_of(doc)
    assert (
        "balancer.algorithm: 'round_robn' is not one of round_robin, random, "
        "least_connections, p2c, maglev, ring_hash; did you mean 'round_robin'?" in errors
    )
    assert "sim.duraton: unknown key; did you mean 'duration'?" in errors
    assert "sim.clients.rate: -1 must be >= 0" in errors
    assert "sim.clients.half_close: 2 must be between 0 and 1" in errors
    assert "sim.clients.arival: unknown key; did you mean 'arrival'?" in errors


def test_fault_errors_name_the_fault_and_suggest_the_backend() -> None:
    doc = document(
        sim_faults=[
            {"at": 1.0, "backend": "10.9.0.3:80", "behaviour": "crash"},
            {"at": 5.0, "until": 2.0, "backend": "*", "behaviour": "crsh"},
            {"backend": "10.9.0.1:80", "behavior": "crash"},
            "nonsense",
            {"at": 1.0, "backend": "*", "behaviour": "slow", "delay": -1, "probability": 3},
        ]
    )
    errors = errors_of(doc)
    assert (
        "sim.faults[0].backend: '10.9.0.3:80' is not a backend address (or '*'); "
        "did you mean '10.9.0.2:80'?" in errors
    )
    assert any(e.startswith("sim.faults[1].behaviour: 'crsh' is not one of") for e in errors)
    assert "sim.faults[1].until: 2.0 must be later than at (5)" in errors
    assert "sim.faults[2].behavior: unknown key; did you mean 'behaviour'?" in errors
    assert any(e.startswith("sim.faults[2].at: missing") for e in errors)
    assert "sim.faults[3]: 'nonsense' is not a table" in errors
    assert "sim.faults[4].delay: -1 must be >= 0" in errors
    assert "sim.faults[4].probability: 3 must be between 0 and 1" in errors
    assert errors_of(document(sim_faults={"at": 1})) == [
        "sim.faults: {'at': 1} is not an array of tables ([[sim.faults]])"
    ]


def test_distribution_errors() -> None:
    doc = document(
        sim_clients={
            "duration": {"kind": "gaussian", "mean": 1},
            "bytes": {"mean": 1},
        },
        sim_network={"latency": {"kind": "uniform", "low": 2, "high": 1, "mode": 3}},
    )
    errors = errors_of(doc)
    assert any(e.startswith("sim.clients.duration.kind: 'gaussian' is not one of") for e in errors)
    assert "sim.clients.bytes.kind: missing: one of constant, exponential, uniform, lognormal" in (
        errors
    )
    assert "sim.network.latency.high: 1 must be >= low" in errors
    assert any(e.startswith("sim.network.latency.mode: unknown key") for e in errors)
    errors = errors_of(
        document(
            sim_clients={"duration": {"kind": "exponential"}, "bytes": "lots"},
            sim_network={"latency": {"kind": "lognormal", "median": 0, "sigma": 1}},
        )
    )
    assert "sim.clients.duration.mean: missing: a exponential distribution needs mean" in errors
    assert "sim.clients.bytes: 'lots' is not a number of seconds" in errors
    assert "sim.network.latency.median: 0 must be > 0 seconds" in errors


def test_schedule_errors() -> None:
    doc = document(
        sim_clients={
            "schedule": [
                {"at": 5.0, "rate": 10.0},
                {"at": 4.0, "rate": 10.0},
                {"at": 6.0},
                {"at": 7.0, "rate": -2, "burst": 1},
                3,
            ]
        }
    )
    errors = errors_of(doc)
    assert "sim.clients.schedule[1].at: 4.0 must be later than the phase before" in errors
    assert "sim.clients.schedule[2]: needs both 'at' and 'rate'" in errors
    assert "sim.clients.schedule[3].rate: -2 must be >= 0" in errors
    assert "sim.clients.schedule[3].burst: unknown key; valid keys: at, rate" in errors
    assert "sim.clients.schedule[4]: 3 is not a table" in errors
    assert errors_of(document(sim_clients={"schedule": 5})) == [
        "sim.clients.schedule: 5 is not an array of tables"
    ]


def test_sim_tables_of_the_wrong_type() -> None:
    errors = errors_of({"backends": [{"address": "10.0.0.1:80"}], "sim": {"clients": 3}})
    assert errors == ["sim.clients: 3 is not a table"]
    errors = errors_of({"backends": "x", "sim": {"config": 7}})
    assert "sim.config: 7 is not a path to a config file" in errors


def test_sim_config_includes_a_real_config(tmp_path: Path, repo: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(
        f'[timeouts]\nconnect = 0.25\n\n[sim]\nconfig = "{repo / "config.toml"}"\nduration = 1\n'
    )
    loaded = load_scenario(path)
    assert [b.weight for b in loaded.config.backends] == [10, 5, 5]
    assert loaded.config.timeouts.connect == 0.25  # the scenario's own section wins
    assert loaded.config.listener.address == "127.0.0.1:9000"


def test_distributions_sample_as_documented() -> None:
    rng = random.Random(3)
    assert Distribution(kind="constant", value=2.0).sampler(rng)() == 2.0
    uniform = Distribution(kind="uniform", low=1.0, high=2.0)
    assert all(1.0 <= uniform.sampler(rng)() <= 2.0 for _ in range(100))
    assert uniform.maximum == 2.0
    assert Distribution(kind="constant", value=4.0).maximum == 4.0
    exponential = Distribution(kind="exponential", mean=1.0)
    assert math.isinf(exponential.maximum)
    assert exponential.sampler(rng)() >= 0
    lognormal = Distribution(kind="lognormal", median=1.0, sigma=0.5)
    assert lognormal.sampler(rng)() > 0
    assert [d.describe() for d in (uniform, exponential, lognormal)] == [
        "uniform(1..2)",
        "exponential(mean=1)",
        "lognormal(median=1, sigma=0.5)",
    ]
    assert Distribution(kind="constant", value=4.0).describe() == "4"


def test_bare_number_is_a_constant() -> None:
    loaded = scenario(sim_network={"latency": 0.003})
    assert loaded.sim.network.latency == Distribution(kind="constant", value=0.003)


def test_extreme_values_are_refused_with_one_line_each() -> None:
    """/tmp/rv/sigma.toml and /tmp/rv/flap.toml crashed a run with OverflowError."""
    doc = document(
        sim_clients={
            "duration": {"kind": "lognormal", "median": 1.0, "sigma": 1000.0},
            "bytes": {"kind": "exponential", "mean": 1e-320},
        },
        sim_network={"latency": {"kind": "uniform", "low": 0.001, "high": "x"}},
        sim_faults=[{"at": 1.0, "backend": "*", "behaviour": "flapping", "period": 1e-310}],
    )
    assert errors_of(doc) == [
        "sim.clients.duration.sigma: 1000.0 must be <= 10",
        "sim.clients.bytes.mean: 1e-320 must be >= 1e-09",
        "sim.network.latency.high: 'x' is not a number of seconds",
        "sim.faults[0].period: 1e-310 must be >= 1e-06 seconds",
    ]


def test_timings_too_short_to_simulate_are_refused() -> None:
    """A review found that an idle timeout of 1e-300 s made a run stand still."""
    doc = document(
        timeouts={"connect": 1e-7, "idle": 1e-300, "drain": 0.0},
        health={"probe_interval": 5e-7, "probe_timeout": 1e-6},
    )
    # The config schema itself refuses timings under a millisecond.
    assert errors_of(doc) == [
        "health.probe_interval: 5e-07 must be at least 0.001 seconds",
        "health.probe_timeout: 1e-06 must be at least 0.001 seconds",
        "timeouts.connect: 1e-07 must be at least 0.001 seconds",
        "timeouts.idle: 1e-300 must be at least 0.001 seconds",
    ]


def test_the_largest_accepted_values_run() -> None:
    loaded = scenario(
        sim_duration=1.0,
        sim_clients={"duration": {"kind": "lognormal", "median": 1e9, "sigma": 10.0}},
        sim_faults=[{"at": 0.0, "backend": "*", "behaviour": "flapping", "period": 1e-6}],
    )
    assert build_report(Simulation(loaded, 1).run())["ok"]


# -- a world closer to production (issue 14 item 3) ------------------------------

A, B, C = "10.9.0.1:80", "10.9.0.2:80", "10.9.0.3:80"


def test_the_new_keys_default_to_todays_world() -> None:
    loaded = parse_scenario({"backends": [{"address": A}], "sim": {}})
    clients = loaded.sim.clients
    assert clients.requests is None  # a connection carries data for its duration
    assert clients.think == clients.retry_backoff == Distribution(kind="constant", value=0.0)
    assert clients.connect_timeout is None and clients.retries == 0
    sim = loaded.sim
    assert sim.service is None and sim.backends == () and sim.timer_jitter is None
    assert sim.fault_processes == () and sim.drawn_faults == 0
    assert sim.service_of(A) == Distribution(kind="constant", value=0.0)
    assert sim.latency_of(A) == sim.network.latency


def test_every_new_key_is_parsed() -> None:
    loaded = scenario(
        backends=[{"address": A}, {"address": B}, {"address": C}],
        sim_clients={
            "requests": {"kind": "exponential", "mean": 8},
            "think": {"kind": "uniform", "low": 0.1, "high": 2.0},
            "connect_timeout": 3,
            "retries": 2,
            "retry_backoff": {"kind": "exponential", "mean": 1.5},
        },
        sim_service={"kind": "lognormal", "median": 0.02, "sigma": 0.8},
        sim_backends=[
            {"address": B, "service": {"kind": "exponential", "mean": 0.2}},
            {"address": C, "latency": {"kind": "uniform", "low": 0.01, "high": 0.03}},
        ],
        sim_timer_jitter={"kind": "exponential", "mean": 0.0005},
        sim_fault_processes=[
            {"backend": "*", "behaviour": "crash", "mtbf": 3600, "mttr": 60},
            {
                "zone": [A, C],
                "behaviour": "slow",
                "delay": 0.2,
                "mtbf": {"kind": "uniform", "low": 100, "high": 300},
                "mttr": {"kind": "constant", "value": 30},
                "start": 1.0,
                "stop": 9.0,
            },
            {"backend": B, "behaviour": "kill", "unread": "none", "mtbf": 5, "mttr": 1},
        ],
    )
    clients = loaded.sim.clients
    assert clients.requests == Distribution(kind="exponential", mean=8.0)
    assert clients.think == Distribution(kind="uniform", low=0.1, high=2.0)
    assert clients.connect_timeout == 3.0 and isinstance(clients.connect_timeout, float)
    assert clients.retries == 2
    assert clients.retry_backoff == Distribution(kind="exponential", mean=1.5)
    sim = loaded.sim
    assert sim.service == Distribution(kind="lognormal", median=0.02, sigma=0.8)
    assert sim.service_of(B) == Distribution(kind="exponential", mean=0.2)
    assert sim.service_of(C) == sim.service_of(A) == sim.service
    assert sim.latency_of(C) == Distribution(kind="uniform", low=0.01, high=0.03)
    assert sim.latency_of(B) == sim.latency_of(A) == Distribution(kind="constant", value=0.001)
    assert [b.address for b in sim.backends] == [B, C]
    assert sim.timer_jitter == Distribution(kind="exponential", mean=0.0005)
    every, zone, one = sim.fault_processes
    assert every.units == ((A,), (B,), (C,)) and every.backend == "*"
    assert every.mtbf == Distribution(kind="exponential", mean=3600.0)  # a bare number: a mean
    assert every.mttr == Distribution(kind="exponential", mean=60.0)
    assert every.fault.behaviour == "crash" and (every.start, every.stop) == (0.0, None)
    assert zone.units == ((A, C),) and zone.zone == (A, C) and zone.backend == ""
    assert zone.mtbf == Distribution(kind="uniform", low=100.0, high=300.0)
    assert zone.mttr == Distribution(kind="constant", value=30.0)
    assert (zone.start, zone.stop, zone.fault.delay) == (1.0, 9.0, 0.2)
    assert one.units == ((B,),) and one.fault.unread == "none"
    assert loaded.warnings == ()


def test_requests_take_whole_numbers_in_every_kind() -> None:
    def requests(raw: object) -> Distribution | None:
        return scenario(sim_clients={"requests": raw}).sim.clients.requests

    assert requests(4) == Distribution(kind="constant", value=4.0)
    assert requests({"kind": "constant", "value": 2}) == Distribution(kind="constant", value=2.0)
    assert requests({"kind": "uniform", "low": 1, "high": 9}) == Distribution(
        kind="uniform", low=1.0, high=9.0
    )
    assert requests({"kind": "lognormal", "median": 3, "sigma": 1}) == Distribution(
        kind="lognormal", median=3.0, sigma=1.0
    )


def test_what_the_run_would_not_use_is_a_warning() -> None:
    loaded = scenario(
        sim_clients={"think": 1.0, "retry_backoff": 2.0},
        sim_service=0.1,
        sim_backends=[{"address": B, "service": 0.5}, {"address": A, "latency": 0.01}],
        sim_fault_processes=[
            {"backend": A, "behaviour": "crash", "delay": 1.0, "mtbf": 5, "mttr": 1}
        ],
    )
    assert loaded.warnings == (
        "sim.clients.think: ignored: think is the pause between requests, "
        "and without requests a connection has none",
        "sim.clients.retry_backoff: ignored: a client makes no retry (retries = 0)",
        "sim.fault_processes[0].delay: 'crash' ignores delay; only 'slow' uses it",
        "sim.service: ignored: a service time is per request, and without "
        "sim.clients.requests a connection carries data for its duration",
        "sim.backends[0].service: ignored: a service time is per request, and without "
        "sim.clients.requests a connection carries data for its duration",
    )
    assert scenario(sim_clients={"requests": 2, "duration": 1.0}).warnings == (
        "sim.clients.duration: ignored: with requests, a connection lasts as long as "
        "its requests, think times and round trips",
    )


PROCESS = {"backend": A, "behaviour": "crash", "mtbf": 10.0, "mttr": 1.0}


def process(**changes: object) -> dict[str, object]:
    entry = {**PROCESS, **changes}
    return {key: value for key, value in entry.items() if value is not None}


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"sim_clients": {"requests": 0}}, "sim.clients.requests: 0 must be >= 1"),
        ({"sim_clients": {"requests": 2.5}}, "sim.clients.requests: 2.5 is not an integer"),
        ({"sim_clients": {"requests": True}}, "sim.clients.requests: True is not an integer"),
        (
            {"sim_clients": {"requests": 200_000}},
            "sim.clients.requests: 200000 must be <= 100000",
        ),
        (
            {"sim_clients": {"requests": {"kind": "exponential", "mean": -1}}},
            "sim.clients.requests.mean: -1 must be between 1 and 100000",
        ),
        (
            {"sim_clients": {"requests": {"kind": "exponential", "mean": 0.5}}},
            "sim.clients.requests.mean: 0.5 must be between 1 and 100000",
        ),
        (
            {"sim_clients": {"requests": {"kind": "exponential"}}},
            "sim.clients.requests.mean: missing: a exponential count needs mean",
        ),
        (
            {"sim_clients": {"requests": {"kind": "uniform", "low": 0, "high": 3}}},
            "sim.clients.requests.low: 0 must be >= 1",
        ),
        (
            {"sim_clients": {"requests": {"kind": "uniform", "low": 5, "high": 3}}},
            "sim.clients.requests.high: 3 must be >= low",
        ),
        (
            {"sim_clients": {"requests": {"kind": "constant", "value": 1.5}}},
            "sim.clients.requests.value: 1.5 is not an integer",
        ),
        (
            {"sim_clients": {"requests": {"kind": "lognormal", "median": 2, "sigma": 11}}},
            "sim.clients.requests.sigma: 11 must be <= 10",
        ),
        (
            {"sim_clients": {"requests": {"kind": "lognormal", "median": "x", "sigma": 1}}},
            "sim.clients.requests.median: 'x' is not a number",
        ),
        (
            {"sim_clients": {"requests": {"kind": "gaussian"}}},
            "sim.clients.requests.kind: 'gaussian' is not one of constant, exponential, "
            "uniform, lognormal",
        ),
        (
            {"sim_clients": {"requests": {"kind": "constant", "value": 2, "mean": 2}}},
            "sim.clients.requests.mean: unknown key; valid keys: kind, value",
        ),
        ({"sim_clients": {"think": -1}}, "sim.clients.think: -1 must be >= 0"),
        (
            {"sim_clients": {"think": {"kind": "exponential", "mean": 0}}},
            "sim.clients.think.mean: 0 must be > 0 seconds",
        ),
        (
            {"sim_clients": {"connect_timeout": 0}},
            "sim.clients.connect_timeout: 0 must be > 0 seconds",
        ),
        (
            {"sim_clients": {"connect_timeout": "3s"}},
            "sim.clients.connect_timeout: '3s' is not a number of seconds",
        ),
        (
            {"sim_clients": {"connect_timeout": 1e-9}},
            "sim.clients.connect_timeout: 1e-09 must be >= 1e-06 seconds",
        ),
        ({"sim_clients": {"retries": -1}}, "sim.clients.retries: -1 must be >= 0"),
        ({"sim_clients": {"retries": 101}}, "sim.clients.retries: 101 must be <= 100"),
        ({"sim_clients": {"retries": 1.5}}, "sim.clients.retries: 1.5 is not an integer"),
        (
            {"sim_clients": {"retries": 1, "retry_backoff": {"kind": "uniform", "low": 1}}},
            "sim.clients.retry_backoff.high: missing: a uniform distribution needs high",
        ),
        (
            {"sim_clients": {"retries": 1, "retry_backoff": "1s"}},
            "sim.clients.retry_backoff: '1s' is not a number of seconds",
        ),
        (
            {"sim_clients": {"request": 3}},
            "sim.clients.request: unknown key; did you mean 'requests'?",
        ),
        ({"sim_service": -1}, "sim.service: -1 must be >= 0"),
        (
            {"sim_service": {"kind": "exponential", "mean": 0}},
            "sim.service.mean: 0 must be > 0 seconds",
        ),
        ({"sim_servce": 0.1}, "sim.servce: unknown key; did you mean 'service'?"),
        (
            {"sim_backends": [{"address": C, "service": 0.1}]},
            "sim.backends[0].address: '10.9.0.3:80' is not a backend address; "
            "did you mean '10.9.0.2:80'?",
        ),
        (
            {"sim_backends": [{"service": 0.1}]},
            "sim.backends[0].address: missing: which backend, by its address",
        ),
        (
            {"sim_backends": [{"address": A, "service": 0.1}, {"address": A, "latency": 0.1}]},
            "sim.backends[1].address: '10.9.0.1:80' duplicates sim.backends[0]",
        ),
        (
            {"sim_backends": [{"address": A, "latency": {"kind": "uniform", "low": 2, "high": 1}}]},
            "sim.backends[0].latency.high: 1 must be >= low",
        ),
        (
            {"sim_backends": [{"address": A, "service": {"kind": "lognormal", "median": 1}}]},
            "sim.backends[0].service.sigma: missing: a lognormal distribution needs sigma",
        ),
        (
            {"sim_backends": [{"address": A, "speed": 2}]},
            "sim.backends[0].speed: unknown key; valid keys: address, service, latency",
        ),
        (
            {"sim_backends": {"address": A}},
            "sim.backends: {'address': '10.9.0.1:80'} is not an array of tables ([[sim.backends]])",
        ),
        ({"sim_backends": ["x"]}, "sim.backends[0]: 'x' is not a table"),
        ({"sim_timer_jitter": -0.1}, "sim.timer_jitter: -0.1 must be >= 0"),
        (
            {"sim_timer_jitter": {"kind": "exponential"}},
            "sim.timer_jitter.mean: missing: a exponential distribution needs mean",
        ),
        (
            {"sim_fault_processes": {"backend": A}},
            "sim.fault_processes: {'backend': '10.9.0.1:80'} is not an array of tables "
            "([[sim.fault_processes]])",
        ),
        ({"sim_fault_processes": [3]}, "sim.fault_processes[0]: 3 is not a table"),
        (
            {"sim_fault_processes": [process(backend=None)]},
            "sim.fault_processes[0].backend: missing: a fault process needs backend (an "
            "address, or '*' for each backend on its own) or zone (addresses that fail together)",
        ),
        (
            {"sim_fault_processes": [process(zone=[A])]},
            "sim.fault_processes[0].zone: give backend or zone, not both",
        ),
        (
            {"sim_fault_processes": [process(backend="10.9.0.3:8")]},
            "sim.fault_processes[0].backend: '10.9.0.3:8' is not a backend address (or '*'); "
            "did you mean '10.9.0.2:80'?",
        ),
        (
            {"sim_fault_processes": [process(backend=None, zone=[A, B, A])]},
            "sim.fault_processes[0].zone[2]: '10.9.0.1:80' is listed twice",
        ),
        (
            {"sim_fault_processes": [process(backend=None, zone=[A, "*"])]},
            "sim.fault_processes[0].zone[1]: '*' is not a backend address",
        ),
        (
            {"sim_fault_processes": [process(backend=None, zone=[])]},
            "sim.fault_processes[0].zone: [] is not a list of backend addresses",
        ),
        (
            {"sim_fault_processes": [process(backend=None, zone=A)]},
            "sim.fault_processes[0].zone: '10.9.0.1:80' is not a list of backend addresses",
        ),
        (
            {"sim_fault_processes": [process(behaviour="up")]},
            "sim.fault_processes[0].behaviour: 'up' is not one of crash, blackhole, reset, "
            "slow, capacity, flapping, kill, host_down, accept_hang",
        ),
        (
            {"sim_fault_processes": [process(behaviour=None)]},
            "sim.fault_processes[0].behaviour: missing: one of crash, blackhole, reset, slow, "
            "capacity, flapping, kill, host_down, accept_hang",
        ),
        (
            {"sim_fault_processes": [process(mtbf=None)]},
            "sim.fault_processes[0].mtbf: missing: the mean seconds a backend stays up "
            "between failures",
        ),
        (
            {"sim_fault_processes": [process(mttr=None)]},
            "sim.fault_processes[0].mttr: missing: the mean seconds a failure lasts until "
            "its repair",
        ),
        (
            {"sim_fault_processes": [process(mtbf=0)]},
            "sim.fault_processes[0].mtbf: 0 must be > 0 seconds",
        ),
        (
            {"sim_fault_processes": [process(mtbf="1h")]},
            "sim.fault_processes[0].mtbf: '1h' is not a number of seconds",
        ),
        (
            {"sim_fault_processes": [process(mttr={"kind": "constant", "value": 0})]},
            "sim.fault_processes[0].mttr: 0 must not be always 0",
        ),
        (
            {"sim_fault_processes": [process(mttr={"kind": "normal", "mean": 1})]},
            "sim.fault_processes[0].mttr.kind: 'normal' is not one of constant, exponential, "
            "uniform, lognormal",
        ),
        (
            {"sim_fault_processes": [process(mtbf=1e-5, mttr=1e-5)]},
            "sim.fault_processes[0].mtbf: exponential(mean=1e-05) would draw about 500000 "
            "faults from 0 s to 10 s (at most 100000)",
        ),
        (
            {"sim_fault_processes": [process(start=10)]},
            "sim.fault_processes[0].start: 10 must be before sim.duration (10)",
        ),
        (
            {"sim_fault_processes": [process(stop=11)]},
            "sim.fault_processes[0].stop: 11 must be <= sim.duration (10)",
        ),
        (
            {"sim_fault_processes": [process(start=5, stop=5)]},
            "sim.fault_processes[0].stop: 5 must be later than start (5)",
        ),
        (
            {"sim_fault_processes": [process(start=-1)]},
            "sim.fault_processes[0].start: -1 must be >= 0",
        ),
        (
            {"sim_fault_processes": [process(delay=-1)]},
            "sim.fault_processes[0].delay: -1 must be >= 0",
        ),
        (
            {"sim_fault_processes": [process(unread="some")]},
            "sim.fault_processes[0].unread: 'some' is not one of senders, all, none",
        ),
        (
            {"sim_fault_processes": [process(until=3)]},
            "sim.fault_processes[0].until: unknown key; valid keys: backend, zone, behaviour, "
            "mtbf, mttr, start, stop, period, limit, delay, probability, unread",
        ),
        (
            {
                "sim_fault_processes": [process(backend=C)],
                "sim_operations": [{"at": 1.0, "action": "add", "backend": C}],
            },
            "sim.fault_processes[0].backend: '10.9.0.3:80' is added by an operation: a fault "
            "process names only the scenario's own [[backends]]",
        ),
        ({"runtime": {"workers": 4}}, "runtime.workers: 4 is not modelled: " + "the simulator"),
    ],
)
def test_each_bad_new_value_is_one_line_naming_its_key(
    changes: dict[str, object], line: str
) -> None:
    found = errors_of(document(**changes))
    assert len(found) == 1 and found[0].startswith(line), found


def test_workers_are_refused_with_the_reason() -> None:
    (line,) = errors_of(document(runtime={"workers": 2}))
    assert line == (
        "runtime.workers: 2 is not modelled: the simulator runs one worker process, and with "
        "N workers each runs its own health checks (N times the failures to take a backend "
        "out, each worker logging its own state changes); simulate with workers = 1"
    )
    assert scenario(runtime={"workers": 1}).config.runtime.workers == 1


# -- add and remove: the reload they stand for -------------------------------------


def reload_of(operations: list[dict[str, object]], index: int = 0) -> Config:
    """The configuration the operation at ``index`` (in file order) reloads."""
    config = scenario(sim_operations=operations).sim.operations[index].config
    assert config is not None
    return config


def test_add_is_the_reload_an_operator_would_write() -> None:
    found = scenario(sim_operations=[{"at": 2.0, "action": "add", "backend": C, "weight": 3}])
    (operation,) = found.sim.operations
    assert (operation.action, operation.written_as) == ("reload", "add")
    assert (operation.at, operation.backend, operation.weight) == (2.0, C, 3)
    by_hand = {"backends": [{"address": A}, {"address": B}, {"address": C, "weight": 3}]}
    assert operation.config == reload_of([{"at": 2.0, "action": "reload", "config": by_hand}])
    # The weight is 1 unless given, as in [[backends]].
    added = reload_of([{"at": 2.0, "action": "add", "backend": C}])
    assert [(b.address, b.weight) for b in added.backends] == [(A, 1), (B, 1), (C, 1)]


def test_remove_is_the_reload_an_operator_would_write() -> None:
    found = scenario(sim_operations=[{"at": 2.0, "action": "remove", "backend": A}])
    (operation,) = found.sim.operations
    assert (operation.action, operation.written_as, operation.backend) == ("reload", "remove", A)
    by_hand = {"backends": [{"address": B}]}
    assert operation.config == reload_of([{"at": 2.0, "action": "reload", "config": by_hand}])


def test_add_and_remove_build_on_the_configuration_in_force_in_time_order() -> None:
    """Listed out of order, applied by time: a reload changes timeouts and the
    fleet, an operator sets a weight, then a backend is added and another removed.
    Each built reload is what the operator would have written at that point."""
    timeouts = {"connect": 0.25, "idle": 20.0, "drain": 5.0, "removal": 1.0}
    d = "10.9.0.4:80"
    operations: list[dict[str, object]] = [
        {"at": 4.0, "action": "remove", "backend": B},
        {"at": 3.0, "action": "add", "backend": C, "weight": 2},
        {"at": 2.0, "action": "weight", "backend": A, "weight": 5},
        {
            "at": 1.0,
            "action": "reload",
            "config": {
                "timeouts": timeouts,
                "backends": [{"address": A}, {"address": B}, {"address": d}],
            },
        },
        {"at": 6.0, "action": "drain", "backend": C},
    ]
    at_3 = {
        "timeouts": timeouts,
        "backends": [
            {"address": A, "weight": 5},
            {"address": B},
            {"address": d},
            {"address": C, "weight": 2},
        ],
    }
    at_4 = {
        "timeouts": timeouts,
        "backends": [{"address": A, "weight": 5}, {"address": d}, {"address": C, "weight": 2}],
    }
    assert reload_of(operations, 1) == reload_of([{"at": 3.0, "action": "reload", "config": at_3}])
    assert reload_of(operations, 0) == reload_of([{"at": 4.0, "action": "reload", "config": at_4}])
    found = scenario(sim_operations=operations)
    assert [op.written_as for op in found.sim.operations] == ["remove", "add", "", "", ""]
    # At one instant, file order: an add then a remove of the same backend.
    same = [
        {"at": 1.0, "action": "add", "backend": C},
        {"at": 1.0, "action": "remove", "backend": C},
    ]
    assert [b.address for b in reload_of(same, 1).backends] == [A, B]


def test_add_and_remove_run_in_todays_engine_as_reloads() -> None:
    found = scenario(
        sim_operations=[
            {"at": 2.0, "action": "add", "backend": C, "weight": 2},
            {"at": 4.0, "action": "drain", "backend": C},
            {"at": 5.0, "action": "remove", "backend": A},
        ],
        sim_faults=[{"at": 6.0, "backend": C, "behaviour": "crash", "until": 7.0}],
    )
    simulation = Simulation(found, 1).run()
    report = build_report(simulation)
    assert report["ok"] and report["refused_operations"] == []
    monitor = simulation.monitor
    assert monitor.started[C] > 0 and A not in monitor.addresses
    assert tuple(monitor.known) == (A, B, C)


@pytest.mark.parametrize(
    ("operations", "line"),
    [
        (
            [{"at": 1.0, "action": "add", "backend": A}],
            "sim.operations[0].backend: '10.9.0.1:80' is already a backend at 1 s",
        ),
        (
            [{"at": 1.0, "action": "remove", "backend": C}],
            "sim.operations[0].backend: '10.9.0.3:80' is not a backend at 1 s "
            "(they are 10.9.0.1:80, 10.9.0.2:80)",
        ),
        (
            [
                {"at": 2.0, "action": "remove", "backend": A},
                {"at": 1.0, "action": "reload", "config": {"backends": [{"address": B}]}},
            ],
            "sim.operations[0].backend: '10.9.0.1:80' is not a backend at 2 s (they are "
            "10.9.0.2:80)",
        ),
        (
            [
                {"at": 1.0, "action": "remove", "backend": A},
                {"at": 2.0, "action": "remove", "backend": B},
            ],
            "sim.operations[1].backend: '10.9.0.2:80' is the last backend: there must be one "
            "at least",
        ),
        (
            [{"at": 1.0, "action": "add", "backend": "x"}],
            "sim.operations[0].backend: 'x' has no port",
        ),
        (
            [{"at": 1.0, "action": "add", "backend": "10.9.0.01:80"}],
            "sim.operations[0].backend: '10.9.0.01:80' ",
        ),
        (
            [{"at": 1.0, "action": "add"}],
            "sim.operations[0].backend: missing: 'add' needs the backend's address",
        ),
        (
            [{"at": 1.0, "action": "remove", "backend": 3}],
            "sim.operations[0].backend: 3 is not an address",
        ),
        (
            [{"at": 1.0, "action": "add", "backend": C, "weight": 0}],
            "sim.operations[0].weight: 0 must be >= 1",
        ),
        (
            [{"at": 1.0, "action": "remove", "backend": A, "weight": 2}],
            "sim.operations[0].weight: only action 'weight' takes a weight (and 'add', the new "
            "backend's), not 'remove'",
        ),
        (
            [{"at": 1.0, "action": "add", "backend": C, "config": {}}],
            "sim.operations[0].config: only a reload takes a config, not 'add'",
        ),
    ],
)
def test_each_bad_add_or_remove_is_one_line_naming_its_key(
    operations: list[dict[str, object]], line: str
) -> None:
    found = errors_of(document(sim_operations=operations))
    assert len(found) == 1 and found[0].startswith(line), found


def test_an_operation_or_a_fault_may_name_the_backend_an_add_brings() -> None:
    found = scenario(
        sim_operations=[
            {"at": 1.0, "action": "add", "backend": C},
            {"at": 2.0, "action": "weight", "backend": C, "weight": 4},
        ],
        sim_faults=[{"at": 3.0, "backend": C, "behaviour": "crash"}],
        sim_backends=[{"address": C, "service": 0.5}],
    )
    assert found.sim.service_of(C) == Distribution(kind="constant", value=0.5)
    assert build_report(Simulation(found, 1).run())["ok"]


# -- loble sim on a bad file: one line per problem, exit 1 ------------------------

BAD_WORLD = """
[runtime]
workers = 2

[[backends]]
address = "10.0.0.1:80"

[sim]
duration = 10.0

[sim.clients]
requests = { kind = "exponential", mean = -1 }
retries = -1

[[sim.backends]]
address = "10.0.0.9:80"
service = 0.1

[[sim.fault_processes]]
zone = ["10.0.0.1:80", "10.0.0.1:80"]
behaviour = "crash"
mtbf = 0
mttr = 5

[[sim.operations]]
at = 5.0
action = "remove"
backend = "10.0.0.1:80"
"""


def test_loble_sim_prints_one_line_per_bad_new_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad-world.toml"
    path.write_text(BAD_WORLD)
    assert main(["sim", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.splitlines() == [
        f"error: runtime.workers: 2 {WORKERS}",
        "error: sim.operations[0].backend: '10.0.0.1:80' is the last backend: there must be "
        "one at least",
        "error: sim.clients.requests.mean: -1 must be between 1 and 100000",
        "error: sim.clients.retries: -1 must be >= 0",
        "error: sim.backends[0].address: '10.0.0.9:80' is not a backend address; did you mean "
        "'10.0.0.1:80'?",
        "error: sim.fault_processes[0].zone[1]: '10.0.0.1:80' is listed twice",
        "error: sim.fault_processes[0].mtbf: 0 must be > 0 seconds",
    ]


def test_loble_sim_refuses_workers_in_a_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "workers.toml"
    path.write_text('[runtime]\nworkers = 3\n\n[[backends]]\naddress = "10.0.0.1:80"\n\n[sim]\n')
    done = subprocess.run(
        [sys.executable, "-m", "loble", "sim", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"error: runtime.workers: 3 {WORKERS}\n"


WORKERS = (
    "is not modelled: the simulator runs one worker process, and with N workers each runs "
    "its own health checks (N times the failures to take a backend out, each worker "
    "logging its own state changes); simulate with workers = 1"
)


def test_the_documented_world_example_is_valid(repo: Path) -> None:
    """docs/simulation.md's example of the new keys loads, with no warning."""
    page = (repo / "docs" / "simulation.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", page, flags=re.DOTALL)
    (block,) = [block for block in blocks if "[[sim.fault_processes]]" in block]
    loaded = parse_scenario(tomllib.loads(block))
    assert loaded.warnings == ()
    assert loaded.sim.clients.requests is not None and len(loaded.sim.fault_processes) == 2
    (added,) = loaded.sim.operations
    assert (added.action, added.written_as) == ("reload", "add")


def test_a_fault_on_a_backend_an_operation_brings_must_come_after_it() -> None:
    """It crashed the engine (KeyError) before: at one instant faults change
    before operations run, so the backend is not there yet."""
    for operation in (
        {"at": 3.0, "action": "add", "backend": C},
        {"at": 3.0, "action": "reload", "config": {"backends": [{"address": C}]}},
    ):
        for at in (1.0, 3):
            found = errors_of(
                document(
                    sim_operations=[operation],
                    sim_faults=[{"at": at, "backend": C, "behaviour": "crash"}],
                )
            )
            assert found == [
                f"sim.faults[0].at: {at!r} must be later than 3 s, when an operation brings "
                "'10.9.0.3:80'"
            ]
        later = scenario(
            sim_operations=[operation],
            sim_faults=[{"at": 3.5, "backend": C, "behaviour": "crash", "until": 5.0}],
        )
        assert build_report(Simulation(later, 1).run())["ok"]
