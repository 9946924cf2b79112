"""The monitor catches each kind of violation: feed it outputs a broken core would give."""

from __future__ import annotations

import random

import pytest

from loble.core import (
    BackendStateChanged,
    CloseConnection,
    ConnectionClosed,
    HealthInput,
    HealthReport,
    HealthState,
    Outcome,
    ProxyCore,
    ShutdownFinished,
    ShutdownStarted,
    SnapshotPublished,
    StateMachineError,
)
from loble.sim import Monitor, Simulation, build_report

from .conftest import scenario

A, B = "10.9.0.1:80", "10.9.0.2:80"
H, D, U = HealthState.HEALTHY, HealthState.DRAINING, HealthState.UNHEALTHY


@pytest.fixture
def monitor() -> Monitor:
    loaded = scenario()
    core = ProxyCore(loaded.config, random.Random(1))
    watcher = Monitor(loaded.config, core)
    watcher.snapshot_published(SnapshotPublished(at=0.0, version=1, addresses=(A, B)), 0.0)
    return watcher


def report(monitor: Monitor, address: str, health_input: HealthInput) -> None:
    monitor.health_report(HealthReport(address=address, input=health_input), 0.0)


def change(monitor: Monitor, address: str, old: HealthState, new: HealthState) -> None:
    event = BackendStateChanged(at=0.0, address=address, old=old, new=new, reason="test")
    monitor.state_changed(event, 0.0)


def closed(connection_id: int, outcome: Outcome, at: float = 1.0) -> ConnectionClosed:
    return ConnectionClosed(
        at=at,
        connection_id=connection_id,
        backend=A,
        outcome=outcome,
        attempts=1,
        opened_at=0.0,
        connected_at=None,
    )


def invariants(monitor: Monitor) -> list[str]:
    return [v.invariant for v in monitor.violations]


def test_a_clean_monitor_has_no_violations(monitor: Monitor) -> None:
    monitor.end_step()
    assert monitor.violations == []


def test_transition_without_its_run_of_failures_is_flapping(monitor: Monitor) -> None:
    report(monitor, A, HealthInput.PASSIVE_FAILURE)  # threshold is 2
    change(monitor, A, H, U)
    assert invariants(monitor) == ["no flapping"]
    assert "after 1 consecutive failures (threshold 2)" in str(monitor.violations[0])


def test_recovery_without_its_run_of_successes_is_flapping(monitor: Monitor) -> None:
    for _ in range(2):
        monitor.probe_result(A, False)
    change(monitor, A, H, U)
    monitor.probe_result(A, True)
    change(monitor, A, U, H)
    assert invariants(monitor) == ["no flapping"]


def test_impossible_transitions(monitor: Monitor) -> None:
    change(monitor, A, U, D)  # A was healthy, and U -> D is no transition
    assert invariants(monitor) == ["no flapping", "no flapping", "safe draining"]


def test_unhealthy_while_active_breaks_safe_draining(monitor: Monitor) -> None:
    report(monitor, A, HealthInput.CONNECTION_STARTED)
    for _ in range(2):
        report(monitor, A, HealthInput.PASSIVE_FAILURE)
    change(monitor, A, H, U)
    report(monitor, A, HealthInput.CONNECTION_STARTED)
    assert invariants(monitor) == ["safe draining", "safe draining"]


def test_snapshot_churn(monitor: Monitor) -> None:
    monitor.snapshot_published(SnapshotPublished(at=0.0, version=3, addresses=(A, B)), 0.0)
    assert invariants(monitor) == ["no churn", "no churn"]
    monitor.end_step()  # the core's snapshot is still version 1
    assert invariants(monitor)[-1] == "no churn"


def test_membership_change_without_a_snapshot(monitor: Monitor) -> None:
    for _ in range(2):
        monitor.probe_result(B, False)
    change(monitor, B, H, U)
    monitor.end_step()
    assert "membership changed without a new snapshot" in str(monitor.violations[0])


def test_conservation(monitor: Monitor) -> None:
    monitor.accepted_connection(1, [])
    monitor.connection_closed(closed(1, Outcome.COMPLETED), 1.0)
    monitor.connection_closed(closed(1, Outcome.COMPLETED), 1.0)
    report(monitor, B, HealthInput.CONNECTION_FINISHED)
    assert invariants(monitor) == ["conservation", "conservation"]
    monitor.end_run()
    assert invariants(monitor).count("conservation") > 2


def test_graceful_shutdown(monitor: Monitor) -> None:
    monitor.connection_closed(closed(5, Outcome.CUT), 1.0)
    monitor.connection_closed(closed(6, Outcome.REFUSED_SHUTTING_DOWN), 1.0)
    monitor.finished_shutdown(ShutdownFinished(at=1.0, cut=0), 1.0)
    monitor.shutdown_started(ShutdownStarted(at=2.0, in_flight=1, deadline=4.0), 2.0)
    monitor.shutdown_started(ShutdownStarted(at=2.0, in_flight=1, deadline=4.0), 2.0)
    monitor.accepted_connection(7, [CloseConnection(connection_id=7, outcome=Outcome.COMPLETED)])
    monitor.connection_closed(closed(8, Outcome.CUT, at=3.0), 3.0)
    monitor.finished_shutdown(ShutdownFinished(at=5.0, cut=1), 5.0)
    assert set(invariants(monitor)) == {"graceful shutdown", "conservation"}
    assert invariants(monitor).count("graceful shutdown") == 5  # kept: the first five
    assert monitor.violation_counts["graceful shutdown"] == 8


def test_a_core_exception_fails_the_run_instead_of_crashing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: ProxyCore, connection_id: int, now: float) -> list[object]:
        raise StateMachineError("can't handle CLIENT_EOF when state=CLOSED")

    monkeypatch.setattr(ProxyCore, "client_eof", broken)
    result = build_report(Simulation(scenario(sim_clients={"half_close": 1.0}), 1).run())
    assert not result["ok"]
    failed = [row for row in result["invariants"] if not row["held"]]
    assert failed[0]["name"] == "core accepted every input"
    assert "StateMachineError" in failed[0]["first"][0]
    assert "step " in failed[0]["first"][0]
