"""The control plane: snapshots only on membership change, probes for recovery."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loble.core import (
    AdminInput,
    Backend,
    BackendStateChanged,
    HealthConfig,
    HealthInput,
    HealthState,
    LobleError,
    ProbeBackend,
    SnapshotPublished,
)
from loble.core._control import ControlPlane

A, B, C = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"
In = HealthInput


def plane(**health: object) -> ControlPlane:
    return ControlPlane(
        [Backend(address=A), Backend(address=B, weight=2), Backend(address=C)],
        HealthConfig(**health),  # type: ignore[arg-type]
    )


def fail(control: ControlPlane, address: str, times: int, now: float = 0.0) -> list[object]:
    events: list[object] = []
    for _ in range(times):
        events += control.apply(address, In.PROBE_FAILURE, now)
    return events


def test_start_publishes_the_first_snapshot_with_every_backend() -> None:
    control = plane()
    (event,) = control.start(0.0)
    assert event == SnapshotPublished(at=0.0, version=1, addresses=(A, B, C))
    assert control.snapshot.addresses == (A, B, C)
    assert B in control.snapshot and "nowhere:1" not in control.snapshot
    assert len(control.snapshot) == 3


def test_duplicate_backends_are_refused() -> None:
    with pytest.raises(LobleError, match="listed twice"):
        ControlPlane([Backend(address=A), Backend(address=A)])


def test_unknown_backend_is_an_error() -> None:
    with pytest.raises(LobleError, match="unknown backend"):
        plane().apply("nowhere:1", In.PROBE_SUCCESS, 0.0)


def test_failure_threshold_removes_a_backend_and_publishes_once() -> None:
    control = plane(failure_threshold=2)
    control.start(0.0)
    assert fail(control, A, 1) == []
    events = fail(control, A, 1, now=5.0)
    assert events == [
        BackendStateChanged(
            at=5.0,
            address=A,
            old=HealthState.HEALTHY,
            new=HealthState.UNHEALTHY,
            reason="2 consecutive failures, no active connections",
        ),
        SnapshotPublished(at=5.0, version=2, addresses=(B, C)),
    ]
    assert control.state(A) is HealthState.UNHEALTHY


def test_draining_to_unhealthy_does_not_churn_the_snapshot() -> None:
    control = plane(failure_threshold=1)
    control.apply(A, In.CONNECTION_STARTED, 0.0)
    events = control.apply(A, In.PASSIVE_FAILURE, 1.0)
    assert [type(e) for e in events] == [BackendStateChanged, SnapshotPublished]
    assert control.snapshot.version == 2
    assert control.active_connections(A) == 1
    events = control.apply(A, In.CONNECTION_FINISHED, 2.0)
    # Membership is the same (A was already out): no new version.
    assert [type(e) for e in events] == [BackendStateChanged]
    assert control.snapshot.version == 2
    assert control.states() == {
        A: HealthState.UNHEALTHY,
        B: HealthState.HEALTHY,
        C: HealthState.HEALTHY,
    }


def test_unhealthy_backends_are_probed_and_come_back() -> None:
    control = plane(failure_threshold=1, success_threshold=2, probe_interval=2.0)
    control.start(0.0)
    assert control.next_deadline() is None  # passive only: nothing to probe yet
    fail(control, A, 1, now=10.0)
    assert control.next_deadline() == 12.0
    assert control.handle_timer(11.9) == []
    (probe,) = control.handle_timer(12.0)
    assert probe == ProbeBackend(backend=Backend(address=A), timeout=1.0)
    # One probe in flight per backend: the next slot passes without a second one.
    assert control.next_deadline() == 14.0
    assert control.handle_timer(14.0) == []
    assert control.probe_result(A, True, 14.5) == []
    assert control.handle_timer(16.0) == [probe]
    events = control.probe_result(A, True, 16.1)
    assert [type(e) for e in events] == [BackendStateChanged, SnapshotPublished]
    assert control.snapshot.addresses == (A, B, C)
    assert control.snapshot.version == 3
    # Healthy again with passive checks only: the probe schedule stops.
    assert control.next_deadline() is None
    assert control.handle_timer(100.0) == []


def test_active_checks_probe_every_backend() -> None:
    control = plane(active=True, probe_interval=1.0, probe_timeout=0.5)
    control.start(0.0)
    assert control.next_deadline() == 1.0
    probes = control.handle_timer(1.0)
    assert [p.backend.address for p in probes] == [A, B, C]
    assert all(p.timeout == 0.5 for p in probes)
    for address in (A, B, C):
        control.probe_result(address, True, 1.1)
    # Starting twice does not double the schedule.
    control.start(1.2)
    assert len(control.handle_timer(2.0)) == 3


def test_a_probe_sent_before_a_state_change_does_not_count_after_it() -> None:
    control = plane(active=True, failure_threshold=1, success_threshold=1, probe_interval=2.0)
    control.start(0.0)
    assert len(control.handle_timer(2.0)) == 3  # A is probed while healthy
    control.apply(A, In.CONNECTION_STARTED, 2.01)
    control.apply(A, In.CONNECTION_FINISHED, 2.02)
    control.apply(A, In.PASSIVE_FAILURE, 2.02)
    assert control.state(A) is HealthState.UNHEALTHY
    # The answer to the probe sent while healthy arrives: it proves nothing
    # about the backend since it failed, so it must not bring it back.
    assert control.probe_result(A, True, 2.03) == []
    assert control.state(A) is HealthState.UNHEALTHY
    # Becoming unhealthy re-armed A's schedule one interval later.
    assert [p.backend.address for p in control.handle_timer(4.02)] == [A]
    assert [type(e) for e in control.probe_result(A, True, 4.1)] == [
        BackendStateChanged,
        SnapshotPublished,
    ]


def test_a_draining_backend_is_probed_and_comes_back_with_its_connections() -> None:
    # Passive checks only: going DRAINING is what starts A's probes.
    control = plane(failure_threshold=1, success_threshold=2, probe_interval=2.0)
    control.start(0.0)
    for _ in range(2):
        control.apply(A, In.CONNECTION_STARTED, 1.0)  # two long-lived sessions
    control.apply(A, In.PASSIVE_FAILURE, 10.0)
    assert control.state(A) is HealthState.DRAINING
    assert control.snapshot.addresses == (B, C)
    assert control.next_deadline() == 12.0
    (probe,) = control.handle_timer(12.0)
    assert probe.backend.address == A
    assert control.probe_result(A, True, 12.1) == []
    assert control.handle_timer(14.0) == [probe]
    events = control.probe_result(A, True, 14.1)
    assert events == [
        BackendStateChanged(
            at=14.1,
            address=A,
            old=HealthState.DRAINING,
            new=HealthState.HEALTHY,
            reason="2 consecutive probe successes while draining, 2 active kept",
        ),
        SnapshotPublished(at=14.1, version=3, addresses=(A, B, C)),
    ]
    assert control.active_connections(A) == 2
    assert control.since[A] == (14.1, events[0].reason)  # type: ignore[union-attr]
    # Healthy again with passive checks only: the probe schedule stops.
    assert control.next_deadline() is None
    # Its sessions end in HEALTHY, as any others.
    for _ in range(2):
        assert control.apply(A, In.CONNECTION_FINISHED, 20.0) == []
    assert control.state(A) is HealthState.HEALTHY


def test_draining_then_drained_keeps_its_probe_schedule() -> None:
    control = plane(failure_threshold=1, success_threshold=2, probe_interval=2.0)
    control.apply(A, In.CONNECTION_STARTED, 0.0)
    control.apply(A, In.PASSIVE_FAILURE, 10.0)
    (probe,) = control.handle_timer(12.0)
    assert control.probe_result(A, True, 12.1) == []
    # Drained a moment later: UNHEALTHY, probed on the same schedule, and the
    # success earned while draining does not carry over (recovery starts afresh).
    control.apply(A, In.CONNECTION_FINISHED, 12.5)
    assert control.state(A) is HealthState.UNHEALTHY
    assert control.health(A).consecutive_successes == 0
    assert control.next_deadline() == 14.0
    assert control.handle_timer(14.0) == [probe]
    assert control.probe_result(A, True, 14.1) == []
    assert control.state(A) is HealthState.UNHEALTHY


def test_a_probe_sent_while_healthy_does_not_count_once_draining() -> None:
    control = plane(active=True, failure_threshold=1, success_threshold=1, probe_interval=2.0)
    control.start(0.0)
    assert len(control.handle_timer(2.0)) == 3
    control.apply(A, In.CONNECTION_STARTED, 2.01)
    control.apply(A, In.PASSIVE_FAILURE, 2.02)
    assert control.state(A) is HealthState.DRAINING
    assert control.probe_result(A, True, 2.03) == []  # sent while healthy
    assert control.state(A) is HealthState.DRAINING
    assert [p.backend.address for p in control.handle_timer(4.02)] == [A]
    assert [type(e) for e in control.probe_result(A, True, 4.1)] == [
        BackendStateChanged,
        SnapshotPublished,
    ]
    assert (control.state(A), control.active_connections(A)) == (HealthState.HEALTHY, 1)


def test_a_draining_backend_in_maintenance_is_not_probed() -> None:
    control = plane(failure_threshold=1, probe_interval=2.0)
    control.apply(A, In.CONNECTION_STARTED, 0.0)
    control.apply(A, In.PASSIVE_FAILURE, 1.0)
    control.set_admin(A, AdminInput.MAINTENANCE, 1.5)
    assert control.handle_timer(3.0) == []
    control.set_admin(A, AdminInput.READY, 4.0)  # probing again, an interval on
    assert [p.backend.address for p in control.handle_timer(6.0)] == [A]


def test_a_failing_probe_keeps_the_backend_out() -> None:
    control = plane(failure_threshold=1, success_threshold=2, probe_interval=1.0)
    fail(control, A, 1)
    control.handle_timer(1.0)
    control.probe_result(A, True, 1.1)
    control.handle_timer(2.0)
    control.probe_result(A, False, 2.1)  # resets the success run
    control.handle_timer(3.0)
    assert control.probe_result(A, True, 3.1) == []
    assert control.state(A) is HealthState.UNHEALTHY
    assert control.health(A).consecutive_successes == 1


OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from([A, B, C]),
        st.sampled_from(list(HealthInput)),
    ),
    max_size=150,
)


@given(OPERATIONS)
def test_snapshot_version_changes_exactly_when_membership_changes(
    operations: list[tuple[str, HealthInput]],
) -> None:
    control = plane(failure_threshold=2, success_threshold=2)
    control.start(0.0)
    for step, (address, health_input) in enumerate(operations):
        health = control.health(address)
        if health_input is In.CONNECTION_FINISHED and health.active_connections == 0:
            continue
        if (
            health_input is In.CONNECTION_STARTED
            and control.state(address) is not HealthState.HEALTHY
        ):
            continue  # not in the snapshot: a driver could not pick it
        if control.state(address) is HealthState.UNHEALTHY and health_input in (
            In.PASSIVE_SUCCESS,
            In.PASSIVE_FAILURE,
        ):
            continue  # no attempt in flight, so no verdict
        before = control.snapshot
        events = control.apply(address, health_input, float(step))
        after = control.snapshot
        eligible = tuple(a for a, state in control.states().items() if state is HealthState.HEALTHY)
        assert after.addresses == eligible
        published = [e for e in events if isinstance(e, SnapshotPublished)]
        if before.addresses == after.addresses:
            assert after is before
            assert published == []
        else:
            assert after.version == before.version + 1
            assert published == [
                SnapshotPublished(at=float(step), version=after.version, addresses=eligible)
            ]


def test_an_interval_lost_in_rounding_still_lets_time_move_on() -> None:
    # Config refuses intervals under a millisecond; the schedule itself must
    # not re-arm at `now` anyway, or handle_timer would never return.
    control = ControlPlane([Backend(address=A)], HealthConfig(active=True, probe_interval=1e-300))
    control.start(1.0)
    first = control.next_deadline()
    assert first is not None and first > 1.0
    assert len(control.handle_timer(first)) == 1  # returns: it did not re-arm at `first`
    second = control.next_deadline()
    assert second is not None and second > first
