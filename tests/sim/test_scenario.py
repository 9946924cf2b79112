"""Scenario files: the config schema plus [sim], with config-style errors."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from loble.core import ConfigError
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
        "least_connections, p2c; did you mean 'round_robin'?" in errors
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
