"""Traffic policy in the simulator (issue 15): panic, backups, outlier ejection,
redispatch and consistent hashing, through the public API, and the monitor
catching a world or a balancer that breaks each new rule."""

from __future__ import annotations

import json
import random
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from loble.__main__ import main
from loble.core import (
    Backend,
    BackendEjected,
    BackendReturned,
    ConnectBackend,
    ConnectionClosed,
    ConnectRedispatched,
    FirstByteTimeout,
    Outcome,
    PanicChanged,
    ProxyCore,
    Snapshot,
    SnapshotPublished,
)
from loble.sim import Monitor, Simulation, build_report, load_scenario, parse_scenario

from .conftest import REPO, document, scenario

A, B, C = "10.9.0.1:80", "10.9.0.2:80", "10.9.0.3:80"


def shipped(name: str, tmp_path: Path | None = None, replace: tuple[str, str] = ("", "")) -> Any:
    """A shipped scenario, with one line's text replaced if asked."""
    path = REPO / "scenarios" / f"{name}.toml"
    if not replace[0]:
        return load_scenario(path)
    assert tmp_path is not None
    text = path.read_text()
    assert replace[0] in text
    changed = tmp_path / f"{name}.toml"
    changed.write_text(text.replace(replace[0], replace[1]))
    return load_scenario(changed)


def traced(loaded: Any, seed: int = 1) -> tuple[Simulation, list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    simulation = Simulation(loaded, seed, trace=records.append).run()
    return simulation, records


# -- the shipped scenarios ---------------------------------------------------------------


def test_panic_puts_every_primary_in_the_snapshot_while_it_lasts(tmp_path: Path) -> None:
    simulation, records = traced(shipped("panic-mode"))
    report = build_report(simulation)
    assert report["ok"], report["invariants"]
    (period,) = report["traffic_policy"]["panic"]
    assert 20.0 < period["from"] < 21.0 and 50.0 < period["until"] < 52.0
    everyone = tuple(b.address for b in simulation.scenario.config.backends)
    snapshots = [r for r in records if r.get("output") == "SnapshotPublished"]
    # The one in force as panic begins (published with it) holds all four, alone till the end.
    begun = [r for r in snapshots if r["t"] <= period["from"] + 1e-6]
    assert tuple(begun[-1]["addresses"]) == everyone
    assert not [r for r in snapshots if period["from"] + 1e-6 < r["t"] < period["until"] - 1e-3]
    before = [r for r in snapshots if r["t"] < period["from"] - 1e-6]
    assert len(before[-1]["addresses"]) < 4  # the dead ones left before panic began
    # Connections started on the dead ones during panic, and the monitor allowed it.
    dead = everyone[:3]
    started = [
        r
        for r in records
        if r.get("output") == "ConnectBackend" and period["from"] < r["t"] < period["until"] - 2
    ]
    assert {r["backend"] for r in started} == set(everyone)
    assert any(r["backend"] in dead for r in started)
    # Without panic the survivor takes everything, and the report has no panic row.
    calm = build_report(
        Simulation(
            shipped(
                "panic-mode", tmp_path, replace=("panic_threshold = 0.5", "panic_threshold = 0.0")
            ),
            1,
        ).run()
    )
    assert calm["ok"] and "traffic_policy" not in calm
    survivor = {row["address"]: row["connections"] for row in calm["backends"]}[everyone[3]]
    in_panic_survivor = {row["address"]: row["connections"] for row in report["backends"]}
    assert survivor > 1.5 * in_panic_survivor[everyone[3]]


def test_backups_take_over_only_while_no_primary_is_healthy() -> None:
    simulation, records = traced(shipped("backup-takeover"))
    assert build_report(simulation)["ok"]
    backup = "10.0.11.9:8080"
    times = [
        r["t"] for r in records if r.get("output") == "ConnectBackend" and r["backend"] == backup
    ]
    down = [r["t"] for r in records if r.get("output") == "BackendStateChanged"]
    assert times and min(times) >= min(down) and max(times) <= max(down)
    assert len(times) > 300  # it carried the outage


def test_outlier_ejections_last_base_times_n_and_return_on_time() -> None:
    report = build_report(Simulation(shipped("outlier-ejection"), 1).run())
    assert report["ok"], report["invariants"]
    policy = report["traffic_policy"]
    ejections = policy["ejections"]
    assert [e["address"] for e in ejections] == ["10.0.12.2:8080"] * len(ejections)
    assert len(ejections) >= 2
    assert ejections[0]["at"] <= 10.0 + 1e-6  # within the first interval
    for number, ejection in enumerate(ejections, 1):
        assert ejection["ejections"] == number
        assert ejection["until"] - ejection["at"] == pytest.approx(30.0 * number)
    returns = [r["at"] for r in policy["returned"]]
    assert returns == [e["until"] for e in ejections][: len(returns)]
    assert policy["ejected"]["10.0.12.2:8080"]["ejections"] == len(ejections)
    # Health alone never took it out.
    assert all(row["final_state"] == "healthy" for row in report["backends"])


def test_redispatch_lowers_the_connect_latency_p99(tmp_path: Path) -> None:
    on = build_report(Simulation(shipped("redispatch"), 1).run())
    off = build_report(
        Simulation(
            shipped(
                "redispatch",
                tmp_path,
                replace=("redispatch_pending = true", "redispatch_pending = false"),
            ),
            1,
        ).run()
    )
    assert on["ok"] and off["ok"]
    assert on["traffic_policy"]["redispatched"] > 0 and "traffic_policy" not in off
    p99_on = on["clients"]["connect_latency_ms"]["p99"]
    p99_off = off["clients"]["connect_latency_ms"]["p99"]
    assert p99_off >= 10_000 and p99_on < p99_off / 4


def test_hashing_moves_about_one_in_n_when_one_of_n_leaves() -> None:
    report = build_report(Simulation(shipped("consistent-hashing"), 1).run())
    assert report["ok"], report["invariants"]
    hashing = report["traffic_policy"]["hashing"]
    assert hashing["population"] == 500 and hashing["addresses_seen"] == 500
    leave, back = hashing["moves"]
    for move in (leave, back):
        assert move["clients"] > 400
        assert 0.12 < move["share"] < 0.28  # 1/5, within sampling error
    print(f"hashing: moved {leave['share']:.1%} as one of 5 left, {back['share']:.1%} back")


def test_client_addresses_are_a_function_of_the_seed_and_keep_old_runs() -> None:
    hashed = document(
        balancer={"algorithm": "maglev"},
        sim_clients={"rate": 50.0, "population": 30, "retries": 1},
    )
    first = build_report(Simulation(parse_scenario(hashed), 4).run())
    again = build_report(Simulation(parse_scenario(hashed), 4).run())
    assert first == again and first["ok"]
    assert first["traffic_policy"]["hashing"]["addresses_seen"] <= 30
    assert "traffic_policy" not in build_report(Simulation(scenario(), 4).run())


def test_the_command_line_prints_the_policy_rows(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(REPO / "scenarios" / "outlier-ejection.toml")
    assert main(["sim", path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["traffic_policy"]["ejected"]
    assert main(["sim", path]) == 0
    assert "Ejected: 10.0.12.2:8080" in capsys.readouterr().out
    assert main(["sim", str(REPO / "scenarios" / "panic-mode.toml")]) == 0
    assert "Panic:" in capsys.readouterr().out
    assert main(["sim", str(REPO / "scenarios" / "consistent-hashing.toml")]) == 0
    assert "Hashing: 500 of 500 addresses" in capsys.readouterr().out
    assert main(["sim", str(REPO / "scenarios" / "redispatch.toml")]) == 0
    assert "Redispatched:" in capsys.readouterr().out


def test_first_byte_timeout_ejects_a_backend_that_accepts_and_says_nothing() -> None:
    loaded = parse_scenario(
        document(
            health={"active": False, "failure_threshold": 2, "success_threshold": 2},
            outlier={
                "first_byte_timeout": 0.5,
                "consecutive_resets": 3,
                "max_ejection_percent": 50,
            },
            sim_faults=[{"at": 2.0, "backend": B, "behaviour": "accept_hang"}],
            timeouts={"connect": 0.5, "idle": 2.0, "drain": 5.0},
        )
    )
    report = build_report(Simulation(loaded, 1).run())
    assert report["ok"], report["invariants"]
    ejections = report["traffic_policy"]["ejections"]
    assert ejections and ejections[0]["address"] == B and ejections[0]["at"] > 2.0
    assert ejections[0]["reason"] == "3 consecutive first-byte timeouts"
    # With requests, the first response is the backend's first byte.
    loaded = parse_scenario(
        document(
            outlier={"first_byte_timeout": 0.5, "consecutive_resets": 3},
            sim_clients={"rate": 20.0, "requests": 3},
        )
    )
    report = build_report(Simulation(loaded, 1).run())
    assert report["ok"] and "traffic_policy" not in report


# -- the monitor catches what breaks each rule -----------------------------------------


def policy_monitor(**changes: Any) -> Monitor:
    loaded = parse_scenario(document(**changes))
    core = ProxyCore(loaded.config, random.Random(1))
    watcher = Monitor(loaded.config, core)
    addresses = tuple(b.address for b in loaded.config.backends if not b.backup) or tuple(
        b.address for b in loaded.config.backends
    )
    watcher.snapshot_published(SnapshotPublished(at=0.0, version=1, addresses=addresses), 0.0)
    return watcher


def connect(monitor: Monitor, connection_id: int, address: str, attempt: int = 1) -> None:
    action = ConnectBackend(
        connection_id=connection_id, backend=Backend(address=address), attempt=attempt
    )
    monitor.connect_started(action, monitor.now)


def names(monitor: Monitor) -> list[str]:
    return [v.invariant for v in monitor.violations]


def eject(monitor: Monitor, address: str, until: float = 30.0, ejections: int = 1) -> None:
    event = BackendEjected(at=0.0, address=address, until=until, reason="test", ejections=ejections)
    monitor.backend_ejected(event, 0.0)


THREE = [{"address": A}, {"address": B}, {"address": C}]


def test_a_start_on_an_ejected_backend_outside_panic_is_unsafe() -> None:
    monitor = policy_monitor(backends=THREE, outlier={"consecutive_resets": 1})
    eject(monitor, A)
    monitor.snapshot_published(SnapshotPublished(at=0.0, version=2, addresses=(B, C)), 0.0)
    connect(monitor, 1, A)
    assert names(monitor) == ["safe draining"]


def test_a_start_on_a_draining_backend_is_allowed_only_in_panic() -> None:
    monitor = policy_monitor(backends=THREE, balancer={"panic_threshold": 0.5})
    monitor.state[A] = monitor.state[B] = monitor.state[C]
    from loble.core import HealthState

    monitor.state[A] = HealthState.UNHEALTHY
    connect(monitor, 1, A)
    assert names(monitor) == ["safe draining"]
    monitor.violations.clear()
    monitor.panic_changed(PanicChanged(at=0.0, panic=True, healthy=1, total=3), 0.0)
    connect(monitor, 2, A)
    assert monitor.violations == []
    # ...but the panic was announced with two of three healthy: not the core's rule.
    monitor.end_step()
    assert "no churn" in names(monitor)


def test_a_panic_announced_twice_is_churn() -> None:
    monitor = policy_monitor(balancer={"panic_threshold": 0.5})
    monitor.panic_changed(PanicChanged(at=0.0, panic=False, healthy=2, total=2), 0.0)
    assert "no churn" in names(monitor)


def test_a_start_on_a_backup_while_a_primary_is_eligible_is_unsafe() -> None:
    monitor = policy_monitor(backends=[{"address": A}, {"address": B, "backup": True}])
    connect(monitor, 1, B)
    assert names(monitor) == ["safe draining"]


def test_the_snapshot_must_follow_the_rule_with_backups() -> None:
    monitor = policy_monitor(backends=[{"address": A}, {"address": B, "backup": True}])
    monitor.snapshot_published(SnapshotPublished(at=0.0, version=2, addresses=(A, B)), 0.0)
    assert names(monitor) == ["no churn"]


def test_ejections_beyond_the_cap_or_emptying_the_snapshot_are_caught() -> None:
    monitor = policy_monitor(backends=THREE, outlier={"max_ejection_percent": 34})
    eject(monitor, A)
    eject(monitor, B)  # max(1, 3 * 34 // 100) = 1
    assert names(monitor) == ["no churn"]
    monitor = policy_monitor(outlier={"max_ejection_percent": 100})
    eject(monitor, A)
    eject(monitor, B)
    assert names(monitor) == ["no churn"]  # nobody left in rotation


def test_an_ejection_of_the_wrong_length_or_a_return_off_time_is_caught() -> None:
    monitor = policy_monitor(backends=THREE, outlier={"base_ejection_time": 10.0})
    eject(monitor, A, until=25.0, ejections=2)  # the second lasts 20 s
    assert names(monitor) == ["timeouts on time"]
    monitor = policy_monitor(backends=THREE, outlier={"base_ejection_time": 10.0})
    eject(monitor, A, until=10.0)
    monitor.now = 9.0
    monitor.backend_returned(BackendReturned(at=9.0, address=A), 9.0)
    assert names(monitor) == ["timeouts on time"]
    monitor.backend_returned(BackendReturned(at=9.0, address=B), 9.0)
    assert names(monitor)[-1] == "no churn"  # never ejected
    monitor = policy_monitor(backends=THREE, outlier={"base_ejection_time": 10.0})
    eject(monitor, A, until=10.0)
    monitor.now = 11.0
    monitor.end_run()
    assert "timeouts on time" in names(monitor)  # never returned


def test_a_redispatched_attempt_may_end_early_but_must_have_been_pending() -> None:
    monitor = policy_monitor(backends=THREE)
    connect(monitor, 1, A)
    monitor.now = 0.1  # long before the connect timeout
    event = ConnectRedispatched(at=0.1, connection_id=1, attempt=1, backend=A)
    monitor.connect_redispatched(event, 0.1)
    monitor.timer_step = True
    connect(monitor, 1, B, attempt=2)
    monitor.timer_step = False
    assert monitor.violations == []
    assert monitor.active[A] == 0 and monitor.active[B] == 1
    monitor.connect_redispatched(
        ConnectRedispatched(at=0.1, connection_id=7, attempt=1, backend=C), 0.1
    )
    assert names(monitor) == ["bounded retries", "conservation"]


def test_an_attempt_abandoned_early_without_a_redispatch_still_trips() -> None:
    monitor = policy_monitor(backends=THREE)
    connect(monitor, 1, A)
    monitor.now = 0.1
    monitor.timer_step = True
    connect(monitor, 1, B, attempt=2)
    assert names(monitor) == ["timeouts on time"]


class _Scatter:
    """A 'hashing' balancer that ignores the key: a client lands anywhere."""

    keyed = True

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(
        self, snapshot: Snapshot, active: Any, exclude: Collection[str] = ()
    ) -> Backend | None:
        choices = [b for b in snapshot.backends if b.address not in exclude]
        return self.rng.choice(choices) if choices else None

    def pick_for(
        self,
        key: int | None,
        snapshot: Snapshot,
        active: Any,
        exclude: Collection[str] = (),
        *rest: Any,
    ) -> Backend | None:
        return self.pick(snapshot, active, exclude)


def test_a_hashing_balancer_that_ignores_the_client_is_caught() -> None:
    loaded = parse_scenario(
        document(
            balancer={"algorithm": "maglev"},
            sim_clients={"rate": 50.0, "population": 10},
        )
    )
    report = build_report(Simulation(loaded, 1, balancer=_Scatter).run())
    assert not report["ok"]
    churn = next(row for row in report["invariants"] if row["name"] == "no churn")
    assert churn["violations"] and "same snapshot" in churn["first"][0]
    # The real one holds.
    assert build_report(Simulation(loaded, 1).run())["ok"]


def closed(monitor: Monitor, connection_id: int, address: str, outcome: Outcome) -> None:
    """A connection accepted, connected and ended on ``address`` (opened here too)."""
    if connection_id not in monitor.open:
        monitor.accepted_connection(connection_id, [])
        connect(monitor, connection_id, address)
    event = ConnectionClosed(
        at=monitor.now,
        connection_id=connection_id,
        backend=address,
        outcome=outcome,
        attempts=1,
        opened_at=0.0,
        connected_at=0.0,
    )
    monitor.connection_closed(event, monitor.now)


def test_an_ejection_by_count_must_follow_that_many_failures_in_a_row() -> None:
    monitor = policy_monitor(backends=THREE, outlier={"consecutive_resets": 2})
    for number, outcome in enumerate([Outcome.BACKEND_RESET, Outcome.COMPLETED], 1):
        closed(monitor, number, A, outcome)
    closed(monitor, 3, A, Outcome.BACKEND_RESET)
    reason = "2 consecutive resets"
    monitor.backend_ejected(
        BackendEjected(at=0.0, address=A, until=30.0, reason=reason, ejections=1), 0.0
    )
    assert names(monitor) == ["no flapping"]  # a completion broke the run: one in a row
    monitor = policy_monitor(backends=THREE, outlier={"consecutive_resets": 2})
    closed(monitor, 1, A, Outcome.BACKEND_RESET)
    monitor.first_byte_timeout(FirstByteTimeout(at=0.0, connection_id=2, backend=A), 0.0)
    assert names(monitor) == ["no flapping"]  # no first_byte_timeout is set
    monitor = policy_monitor(
        backends=THREE, outlier={"consecutive_resets": 2, "first_byte_timeout": 1.0}
    )
    closed(monitor, 1, A, Outcome.BACKEND_RESET)
    monitor.accepted_connection(2, [])
    connect(monitor, 2, A)
    monitor.first_byte_timeout(FirstByteTimeout(at=0.0, connection_id=2, backend=A), 0.0)
    closed(monitor, 2, A, Outcome.COMPLETED)  # judged already: its end is no verdict
    reason = "2 consecutive failures (1 reset, 1 first-byte timeout)"
    monitor.backend_ejected(
        BackendEjected(at=0.0, address=A, until=30.0, reason=reason, ejections=1), 0.0
    )
    assert names(monitor) == []
