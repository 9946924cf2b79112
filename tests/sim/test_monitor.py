"""The monitor catches each kind of violation: feed it outputs a broken core would give."""

from __future__ import annotations

import random
from typing import Any

import pytest

from loble.core import (
    Backend,
    BackendStateChanged,
    CloseConnection,
    ConnectBackend,
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
    _connection,
    _health,
    _timers,
)
from loble.core._control import ControlPlane
from loble.sim import INVARIANTS, Monitor, Scenario, Simulation, build_report, load_scenario

from .conftest import REPO, scenario

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


def drain(monitor: Monitor, address: str) -> None:
    """One connection on ``address``, then the failures that take it to DRAINING."""
    report(monitor, address, HealthInput.CONNECTION_STARTED)
    for _ in range(2):
        report(monitor, address, HealthInput.PASSIVE_FAILURE)
    change(monitor, address, H, D)


def probe(monitor: Monitor, address: str, ok: bool) -> None:
    monitor.probe_sent(address)
    monitor.probe_result(address, ok)


def test_back_from_draining_after_its_run_of_probe_successes_is_no_flapping(
    monitor: Monitor,
) -> None:
    drain(monitor, A)
    probe(monitor, A, True)
    report(monitor, A, HealthInput.PASSIVE_SUCCESS)  # no evidence: neither counts nor breaks
    probe(monitor, A, True)
    change(monitor, A, D, H)
    assert monitor.violations == []
    assert monitor.active[A] == 1  # its connection kept


@pytest.mark.parametrize(
    "before",
    [
        ["probe ok"],
        ["probe ok", "probe failed", "probe ok"],
        ["probe ok", "passive failure", "probe ok"],
        ["probe ok", "passive success"],
        ["stale probe ok", "probe ok"],
    ],
)
def test_back_from_draining_without_its_run_of_probe_successes_is_flapping(
    monitor: Monitor, before: list[str]
) -> None:
    for step in before:
        if step == "stale probe ok":
            # Sent while A was still healthy: it proves nothing once A drains.
            monitor.probe_sent(A)
            report(monitor, A, HealthInput.CONNECTION_STARTED)
            for _ in range(2):
                report(monitor, A, HealthInput.PASSIVE_FAILURE)
            change(monitor, A, H, D)
            monitor.probe_result(A, True)
            continue
        if monitor.state[A] is H:
            drain(monitor, A)
        if step.startswith("probe"):
            probe(monitor, A, step == "probe ok")
        else:
            report(monitor, A, HealthInput[step.upper().replace(" ", "_")])
    change(monitor, A, D, H)
    assert invariants(monitor) == ["no flapping"]
    assert "while draining (threshold 2)" in str(monitor.violations[0])


def test_a_draining_backend_that_ignores_its_probes_is_caught(monitor: Monitor) -> None:
    drain(monitor, A)
    for _ in range(2):
        probe(monitor, A, True)
    monitor.end_step()
    (stuck,) = [str(v) for v in monitor.violations if v.invariant == "draining ends"]
    assert "still DRAINING at the end of the step after 2 consecutive probe successes" in stuck


def test_a_probe_out_when_its_backend_is_removed_proves_nothing(monitor: Monitor) -> None:
    drain(monitor, A)
    probe(monitor, A, True)
    monitor.probe_sent(A)
    monitor.probe_sent_in.pop(A)  # as reconfigured() does for a removed backend
    monitor.probe_result(A, True)
    change(monitor, A, D, H)
    assert invariants(monitor) == ["no flapping"]


def test_impossible_transitions(monitor: Monitor) -> None:
    change(monitor, A, U, D)  # A was healthy, and U -> D is no transition
    assert invariants(monitor) == ["no flapping", "no flapping", "safe draining"]


def test_unhealthy_while_active_breaks_safe_draining(monitor: Monitor) -> None:
    report(monitor, A, HealthInput.CONNECTION_STARTED)
    for _ in range(2):
        report(monitor, A, HealthInput.PASSIVE_FAILURE)
    change(monitor, A, H, U)
    # A connect to it now: the attempt starts with its ConnectBackend.
    monitor.connect_started(
        ConnectBackend(connection_id=1, attempt=1, backend=Backend(address=A)), 0.0
    )
    assert invariants(monitor) == ["safe draining", "safe draining"]
    assert "started on 10.9.0.1:80 while UNHEALTHY" in str(monitor.violations[1])


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
    monitor.accepted_connection(
        7, [CloseConnection(connection_id=7, outcome=Outcome.COMPLETED, reset=False)]
    )
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
    # The run stopped at the step that raised: the report says when, not 0 s.
    at = float(failed[0]["first"][0].split(" at t=")[1].split(":")[0])
    assert result["simulated_seconds"] == pytest.approx(at) and at > 0


# -- liveness and timing: a core that does nothing (or does it late) must fail ------------


def failed(result: dict[str, Any]) -> list[str]:
    return [row["name"] for row in result["invariants"] if not row["held"]]


def first_violations(result: dict[str, Any], invariant: str) -> list[str]:
    return list(result["invariants"][INVARIANTS.index(invariant)]["first"])


def run_shipped(name: str, seed: int = 1) -> dict[str, Any]:
    return build_report(Simulation(load_scenario(REPO / "scenarios" / f"{name}.toml"), seed).run())


def test_a_draining_backend_that_never_drains_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # The reviewer's mutant: DRAINING counts its connections down and never
    # moves on (not back to HEALTHY either, which would hide it in some runs).
    assert run_shipped("slow-drain", seed=2)["ok"]
    monkeypatch.setitem(
        _health.TRANSITIONS, (D, HealthInput.CONNECTION_FINISHED), _health._finished
    )
    monkeypatch.setitem(_health.TRANSITIONS, (D, HealthInput.PROBE_SUCCESS), _health._count_success)
    result = run_shipped("slow-drain", seed=2)
    assert failed(result) == ["draining ends"]
    assert (
        "10.0.2.1:5432 still DRAINING at the end of the step with nothing active"
        in first_violations(result, "draining ends")[0]
    )


def test_a_draining_backend_whose_probes_are_ignored_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The machine before recovery while draining: probe successes only count.
    # In slow-drain's seed 1 backend 1 answers again while it still drains.
    result = run_shipped("slow-drain")
    assert result["ok"]
    assert ("draining", "healthy") in [(c["old"], c["new"]) for c in result["timeline"]]
    monkeypatch.setitem(_health.TRANSITIONS, (D, HealthInput.PROBE_SUCCESS), _health._count_success)
    result = run_shipped("slow-drain")
    assert failed(result) == ["draining ends"]
    assert (
        "10.0.2.1:5432 still DRAINING at the end of the step after 2 consecutive probe "
        "successes (threshold 2)" in first_violations(result, "draining ends")[0]
    )


def test_a_draining_backend_back_at_its_first_probe_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def eager(health: _health.BackendHealth) -> tuple[HealthState, str]:
        return H, "one probe answered"

    monkeypatch.setitem(_health.TRANSITIONS, (D, HealthInput.PROBE_SUCCESS), eager)
    result = run_shipped("slow-drain")
    assert failed(result) == ["no flapping"]
    assert (
        "DRAINING->HEALTHY after 1 consecutive probe successes while draining"
        in (first_violations(result, "no flapping")[0])
    )


def drop_timer_lane(monkeypatch: pytest.MonkeyPatch, dropped: int) -> None:
    """Mutate the core: deadlines of one kind (a lane of its timer) are never filed."""
    file_timer = _timers.TimerQueue.push

    def push(self: _timers.TimerQueue, due: float, key: int, lane: int) -> None:
        if lane != dropped:
            file_timer(self, due, key, lane)

    monkeypatch.setattr(_timers.TimerQueue, "push", push)


def test_connect_timeouts_that_never_fire_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # The reviewer's mutant: connect deadlines (lane 0 of the core's timer) are never filed.
    drop_timer_lane(monkeypatch, 0)
    result = run_shipped("slow-drain")
    assert failed(result) == ["timeouts on time"]
    assert (
        "still connecting past its connect timeout at t=16.200000"
        in first_violations(result, "timeouts on time")[0]
    )


def every_backend_refuses(retries: int) -> Scenario:
    backends = [{"address": f"10.9.0.{i}:80"} for i in range(1, 5)]
    return scenario(
        balancer={"connect_retries": retries},
        health={
            "failure_threshold": 50,
            "success_threshold": 2,
            "probe_interval": 0.5,
            "probe_timeout": 0.5,
        },
        backends=backends,
        sim_duration=3.0,
        sim_faults=[{"at": 1.0, "backend": "*", "behaviour": "crash"}],
    )


def test_ignoring_connect_retries_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # The reviewer's mutant, on a fleet where it shows: four backends all
    # refusing and still in the snapshot, one retry allowed.
    assert build_report(Simulation(every_backend_refuses(1), 1).run())["ok"]
    make = _connection.ConnectionPolicy.__init__

    def init(self: _connection.ConnectionPolicy, *args: Any, **kwargs: Any) -> None:
        kwargs["connect_retries"] = 100
        make(self, *args, **kwargs)

    monkeypatch.setattr(_connection.ConnectionPolicy, "__init__", init)
    result = build_report(Simulation(every_backend_refuses(1), 1).run())
    assert failed(result) == ["bounded retries"]
    assert (
        "attempt 3 exceeds 1 + connect_retries (1)"
        in first_violations(result, "bounded retries")[0]
    )
    # The shipped scenario the reviewer used allows one retry on three backends.
    assert failed(run_shipped("all-down-recover")) == ["bounded retries"]


def test_a_retry_to_a_backend_already_tried_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def pick_any(self: ProxyCore, exclude: object, key: object, now: float) -> Backend | None:
        return self.balancer.pick(self.control.snapshot, self.control.active_connections, ())

    monkeypatch.setattr(ProxyCore, "_pick", pick_any)
    result = build_report(Simulation(every_backend_refuses(3), 1).run())
    assert "bounded retries" in failed(result)
    assert any("already tried" in line for line in first_violations(result, "bounded retries"))


def scaled_timeout(monkeypatch: pytest.MonkeyPatch, name: str, factor: float) -> None:
    make = _connection.ConnectionPolicy.__init__

    def init(self: _connection.ConnectionPolicy, *args: Any, **kwargs: Any) -> None:
        kwargs[name] *= factor
        make(self, *args, **kwargs)

    monkeypatch.setattr(_connection.ConnectionPolicy, "__init__", init)


BLACKHOLE = {"at": 0.0, "backend": "10.9.0.2:80", "behaviour": "blackhole"}


def test_a_connect_timeout_that_fires_early_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    scaled_timeout(monkeypatch, "connect_timeout", 0.5)
    result = build_report(Simulation(scenario(sim_faults=[BLACKHOLE]), 1).run())
    assert failed(result) == ["timeouts on time"]
    assert (
        "timed out after 0.250000 s, before the connect timeout (0.5 s)"
        in first_violations(result, "timeouts on time")[0]
    )


def quiet_backends(idle: float) -> Scenario:
    # Clients connect in the first 0.3 s and send EOF 0.5 s later; by then the
    # backends answer 3 s late: each connection sits idle past its timeout.
    return scenario(
        timeouts={"connect": 0.5, "idle": idle, "drain": 5.0},
        sim_duration=0.3,
        sim_clients={"rate": 20.0, "duration": 0.5, "half_close": 1.0},
        sim_faults=[{"at": 0.3, "backend": "*", "behaviour": "slow", "delay": 3.0}],
    )


def test_idle_timeouts_fire_exactly_on_time() -> None:
    result = build_report(Simulation(quiet_backends(1.0), 1).run())
    assert result["ok"]
    assert result["clients"]["outcomes"]["idle_timeout"] == result["clients"]["arrived"] > 0


def test_an_idle_timeout_that_fires_early_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    scaled_timeout(monkeypatch, "idle_timeout", 0.4)
    result = build_report(Simulation(quiet_backends(1.0), 1).run())
    assert failed(result) == ["timeouts on time"]
    assert "closed for idleness at t=" in first_violations(result, "timeouts on time")[0]


def test_an_idle_timeout_that_never_fires_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    drop_timer_lane(monkeypatch, 1)  # idle deadlines
    result = build_report(Simulation(quiet_backends(1.0), 1).run())
    assert failed(result) == ["timeouts on time"]
    assert "past its idle timeout" in first_violations(result, "timeouts on time")[0]


def test_attempt_bookkeeping_from_outputs(monitor: Monitor) -> None:
    backend = Backend(address=A)
    monitor.connect_started(ConnectBackend(connection_id=1, attempt=2, backend=backend), 0.0)
    monitor.connect_started(ConnectBackend(connection_id=1, attempt=4, backend=backend), 0.0)
    assert [v.message for v in monitor.violations] == [
        "connection 1: attempt 2 with none in progress",
        "connection 1: attempt 4 follows attempt 2",
        f"connection 1: attempt 4 retries {A}, already tried ({A})",
        "connection 1: attempt 4 exceeds 1 + connect_retries (2)",
    ]
    monitor.violations.clear()
    idle = ConnectionClosed(
        at=1.0,
        connection_id=9,
        backend=A,
        outcome=Outcome.IDLE_TIMEOUT,
        attempts=5,
        opened_at=0.0,
        connected_at=None,
    )
    monitor.accepted_connection(9, [])
    monitor.connection_closed(idle, 1.0)
    assert [v.invariant for v in monitor.violations] == ["timeouts on time"]
    assert "closed for idleness before it connected" in str(monitor.violations[0])
    monitor.activity(42, 5.0)  # never connected: a stale report, nothing to check
    assert len(monitor.violations) == 1


def test_nothing_left_waiting_on_a_passed_deadline_at_the_end(monitor: Monitor) -> None:
    backend = Backend(address=A)
    monitor.connect_started(ConnectBackend(connection_id=1, attempt=1, backend=backend), 0.0)
    monitor.connect_started(ConnectBackend(connection_id=2, attempt=1, backend=backend), 0.0)
    monitor.connected(2, 0.001)
    monitor.now = 100.0  # past both the connect (0.5 s) and the idle (30 s) timeouts
    monitor.end_run()
    messages = [str(v) for v in monitor.violations if v.invariant == "timeouts on time"]
    assert len(messages) == 2
    assert "attempt 1 started at t=0.000000 still connecting when the run ended" in messages[0]
    assert "connection 2 idle since t=0.001000 still open when the run ended" in messages[1]


def test_a_snapshot_rebuilt_without_being_published_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A core that swaps its snapshot but keeps the news to itself: caught by
    # the check the simulator's loop runs after each step that needs it.
    assert run_shipped("backend-crash")["ok"]
    republish = ControlPlane._republish

    def silently(self: ControlPlane, now: float) -> None:
        republish(self, now)

    monkeypatch.setattr(ControlPlane, "_republish", silently)
    result = run_shipped("backend-crash")
    assert failed(result) == ["no churn"]
    violations = first_violations(result, "no churn")
    assert "membership changed without a new snapshot" in violations[0]
    assert "was never published" in violations[1]
