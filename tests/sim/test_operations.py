"""[[sim.operations]]: an operator's drains, weights and reloads in virtual time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loble.core import AdminState, ConfigError, Outcome
from loble.sim import Simulation, build_report, load_scenario, parse_scenario

from .conftest import REPO, document, scenario

A, B = "10.9.0.1:80", "10.9.0.2:80"
C = "10.9.0.3:80"


def run(**changes: Any) -> Simulation:
    return Simulation(scenario(**changes), 1).run()


def ok(simulation: Simulation) -> Simulation:
    assert simulation.monitor.violations == [], simulation.monitor.violations
    return simulation


def errors(operations: Any, tmp: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_scenario(document(sim_operations=operations), base_dir=tmp)
    return error.value.errors


def test_the_shipped_scenario_drains_reloads_and_cuts_at_the_removal_deadline() -> None:
    found = load_scenario(REPO / "scenarios" / "rolling-maintenance.toml")
    report = build_report(Simulation(found, 1).run())
    assert report["ok"]
    assert report["clients"]["outcomes"]["removed"] > 0
    assert [b["address"] for b in report["backends"]][-1] == "10.0.3.4:80"
    assert report["refused_operations"] == []


def test_a_drained_backend_takes_no_new_connections_until_undrained() -> None:
    simulation = ok(
        run(
            sim_operations=[
                {"at": 2.0, "action": "drain", "backend": A},
                {"at": 6.0, "action": "undrain", "backend": A},
            ]
        )
    )
    statistics = simulation.core.statistics()
    assert statistics.backends[0].admin is AdminState.READY
    assert simulation.monitor.started[A] < simulation.monitor.started[B]


def test_maintenance_weight_and_ready() -> None:
    simulation = ok(
        run(
            sim_operations=[
                {"at": 1.0, "action": "maintenance", "backend": B},
                {"at": 2.0, "action": "weight", "backend": A, "weight": 4},
                {"at": 3.0, "action": "ready", "backend": B},
            ]
        )
    )
    assert simulation.monitor.weight[A] == 4


def test_a_refused_operation_is_recorded_and_the_run_goes_on() -> None:
    simulation = ok(
        run(
            sim_operations=[
                {"at": 1.0, "action": "maintenance", "backend": A},
                {"at": 2.0, "action": "undrain", "backend": A},
            ]
        )
    )
    assert simulation.refused == [(2.0, "undrain", f"backend {A}: can't UNDRAIN when admin=MAINT")]
    report = build_report(simulation)
    assert report["refused_operations"] == [
        {"at": 2.0, "action": "undrain", "reason": f"backend {A}: can't UNDRAIN when admin=MAINT"}
    ]


def test_a_reload_adds_removes_and_changes_timeouts() -> None:
    reload = {
        "backends": [{"address": B}, {"address": C, "weight": 3}],
        "timeouts": {"connect": 0.25, "idle": 20.0, "drain": 5.0, "removal": 0.3},
        "health": {"active": True, "probe_interval": 0.5, "probe_timeout": 0.5},
    }
    simulation = ok(run(sim_operations=[{"at": 3.0, "action": "reload", "config": reload}]))
    monitor = simulation.monitor
    assert A not in monitor.addresses
    assert monitor.started[C] > 0
    assert tuple(monitor.known) == (A, B, C)


def test_a_reload_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "next.toml").write_text(f'[[backends]]\naddress = "{C}"\n')
    found = parse_scenario(
        document(sim_operations=[{"at": 1.0, "action": "reload", "config": "next.toml"}]),
        base_dir=tmp_path,
    )
    (operation,) = found.sim.operations
    assert operation.config is not None
    assert [b.address for b in operation.config.backends] == [C]
    assert operation.config.health.probe_interval == 0.5  # the scenario's own section
    ok(Simulation(found, 2).run())


def test_removed_connections_cut_with_a_reset_at_the_deadline() -> None:
    simulation = ok(
        run(
            sim_clients={"rate": 20.0, "duration": {"kind": "constant", "value": 5.0}},
            sim_operations=[
                {
                    "at": 2.0,
                    "action": "reload",
                    "config": {
                        "backends": [{"address": B}],
                        "timeouts": {"connect": 0.5, "idle": 30.0, "removal": 1.0},
                    },
                }
            ],
        )
    )
    assert simulation.monitor.outcomes[Outcome.REMOVED] > 0


@pytest.mark.parametrize(
    ("operations", "message"),
    [
        ({"at": 1.0}, "sim.operations: {'at': 1.0} is not an array of tables"),
        (["drain"], "sim.operations[0]: 'drain' is not a table"),
        ([{"action": "drain", "backend": A}], "sim.operations[0].at: missing"),
        ([{"at": 1.0, "backend": A}], "sim.operations[0].action: missing"),
        (
            [{"at": 1.0, "action": "drian", "backend": A}],
            "sim.operations[0].action: 'drian' is not one of drain, undrain, maintenance, "
            "ready, weight, reload, add, remove; did you mean 'drain'?",
        ),
        (
            [{"at": -1.0, "action": "drain", "backend": A}],
            "sim.operations[0].at: -1.0 must be >= 0",
        ),
        ([{"at": 1.0, "action": "drain"}], "sim.operations[0].backend: missing"),
        (
            [{"at": 1.0, "action": "drain", "backend": "10.9.0.9:80"}],
            "sim.operations[0].backend: '10.9.0.9:80' is not a backend address",
        ),
        ([{"at": 1.0, "action": "drain", "backend": 7}], "sim.operations[0].backend: 7 is not"),
        ([{"at": 1.0, "action": "weight", "backend": A}], "sim.operations[0].weight: missing"),
        (
            [{"at": 1.0, "action": "weight", "backend": A, "weight": 0}],
            "sim.operations[0].weight: 0 must be >= 1",
        ),
        (
            [{"at": 1.0, "action": "drain", "backend": A, "weight": 2}],
            "sim.operations[0].weight: only action 'weight' takes a weight",
        ),
        (
            [{"at": 1.0, "action": "drain", "backend": A, "config": {}}],
            "sim.operations[0].config: only a reload takes a config",
        ),
        ([{"at": 1.0, "action": "reload"}], "sim.operations[0].config: missing"),
        (
            [{"at": 1.0, "action": "reload", "backend": A, "config": {}}],
            "sim.operations[0].backend: a reload takes only 'config'",
        ),
        ([{"at": 1.0, "action": "reload", "config": 3}], "sim.operations[0].config: 3 is not"),
        (
            [{"at": 1.0, "action": "reload", "config": {"backends": [{"address": "x"}]}}],
            "sim.operations[0].config.backends[0].address: 'x' has no port",
        ),
        (
            [{"at": 1.0, "action": "reload", "config": "missing.toml"}],
            "sim.operations[0].config: ",
        ),
        (
            [{"at": 1.0, "action": "drain", "backend": A, "when": 2}],
            "sim.operations[0].when: unknown key",
        ),
    ],
)
def test_each_bad_operation_is_one_line_naming_its_key(operations: Any, message: str) -> None:
    found = errors(operations)
    assert any(line.startswith(message) for line in found), found


def test_an_operation_may_name_a_backend_a_reload_adds() -> None:
    found = scenario(
        sim_operations=[
            {"at": 1.0, "action": "reload", "config": {"backends": [{"address": C}]}},
            {"at": 2.0, "action": "drain", "backend": C},
        ],
        sim_faults=[{"at": 3.0, "backend": C, "behaviour": "crash"}],
    )
    ok(Simulation(found, 1).run())
