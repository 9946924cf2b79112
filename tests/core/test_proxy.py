"""ProxyCore, the facade both drivers use: timers, stale reports, process draining."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loble.core import (
    BackendStateChanged,
    BackendStatistics,
    CloseConnection,
    ConnectBackend,
    ConnectionClosed,
    CoreStatistics,
    HealthInput,
    HealthReport,
    HealthState,
    Outcome,
    Output,
    ProbeBackend,
    ProcessState,
    ProxyCore,
    ShutdownFinished,
    ShutdownStarted,
    ShutdownWrite,
    Side,
    StateMachineError,
    StopAccepting,
    parse_config,
)
from loble.core._process import TRANSITIONS as PROCESS_TRANSITIONS
from loble.core._process import ProcessInput, ProcessLifecycle, ProcessStep

A, B = "127.0.0.1:7001", "127.0.0.1:7002"
RESETTING = {
    Outcome.CLIENT_RESET,
    Outcome.BACKEND_RESET,
    Outcome.RESOURCE_EXHAUSTED,
    Outcome.REMOVED,
    Outcome.CUT,
    Outcome.IDLE_TIMEOUT,
}
"""Every stream cut short closes with RST (``RESET_OUTCOMES``), written out here."""


def core(**sections: dict[str, object]) -> ProxyCore:
    data: dict[str, object] = {"backends": [{"address": A}, {"address": B}]}
    data.update(sections)
    proxy = ProxyCore(parse_config(data), random.Random(1))
    proxy.start(0.0)
    return proxy


def connect_of(outputs: list[Output]) -> ConnectBackend:
    (connect,) = [o for o in outputs if isinstance(o, ConnectBackend)]
    return connect


def closed_of(outputs: list[Output]) -> ConnectionClosed:
    (closed,) = [o for o in outputs if isinstance(o, ConnectionClosed)]
    return closed


def open_connection(proxy: ProxyCore, now: float = 0.0) -> int:
    cid, outputs = proxy.accept(now)
    proxy.connected(cid, connect_of(outputs).attempt, now)
    return cid


def test_a_whole_connection() -> None:
    proxy = core()
    cid, outputs = proxy.accept(1.0)
    connect = connect_of(outputs)
    assert connect.backend.address == A
    assert proxy.control.active_connections(A) == 1
    assert proxy.connected(cid, connect.attempt, 1.1) == [
        HealthReport(address=A, input=HealthInput.PASSIVE_SUCCESS)
    ]
    proxy.touch(cid, 2.0)
    assert proxy.client_eof(cid, 3.0) == [ShutdownWrite(connection_id=cid, side=Side.BACKEND)]
    outputs = proxy.backend_eof(cid, 4.0)
    assert closed_of(outputs).outcome is Outcome.COMPLETED
    assert proxy.in_flight == 0
    assert proxy.control.active_connections(A) == 0
    # Reports for a connection that is gone are stale and ignored.
    assert proxy.backend_eof(cid, 5.0) == []
    assert proxy.connected(cid, 1, 5.0) is None  # stale: the driver hangs up
    proxy.touch(cid, 5.0)


@pytest.mark.parametrize(
    ("report", "outcome"),
    [
        ("client_error", Outcome.CLIENT_RESET),
        # Out of descriptors for the backend socket, or of local ports.
        ("resource_exhausted", Outcome.RESOURCE_EXHAUSTED),
    ],
)
def test_an_end_while_connecting_abandons_the_attempt_without_a_verdict(
    report: str, outcome: Outcome
) -> None:
    proxy = core(health={"failure_threshold": 1})
    cid, outputs = proxy.accept(0.0)
    attempt = connect_of(outputs).attempt
    outputs = getattr(proxy, report)(cid, 0.5)
    assert closed_of(outputs).outcome is outcome
    assert [o.input for o in outputs if isinstance(o, HealthReport)] == [
        HealthInput.CONNECTION_FINISHED
    ]
    assert proxy.control.health(A).consecutive_failures == 0
    assert proxy.control.state(A) is HealthState.HEALTHY
    assert proxy.connected(cid, attempt, 0.6) is None  # the abandoned attempt


def test_resource_exhaustion_on_an_open_connection_blames_no_backend() -> None:
    proxy = core(health={"failure_threshold": 1})
    established = open_connection(proxy, 1.0)
    outputs = proxy.resource_exhausted(established, 1.5)
    assert closed_of(outputs).outcome is Outcome.RESOURCE_EXHAUSTED
    assert proxy.control.state(A) is HealthState.HEALTHY
    assert proxy.control.health(A).consecutive_failures == 0
    assert proxy.control.active_connections(A) == 0
    assert proxy.in_flight == 0


@pytest.mark.parametrize(
    ("report", "outcome"),
    [("client_error", Outcome.CLIENT_RESET), ("backend_error", Outcome.BACKEND_RESET)],
)
def test_resets_end_the_connection(report: str, outcome: Outcome) -> None:
    proxy = core()
    cid = open_connection(proxy)
    assert closed_of(getattr(proxy, report)(cid, 1.0)).outcome is outcome


def test_connect_timeout_retries_elsewhere_and_ignores_the_late_result() -> None:
    proxy = core(timeouts={"connect": 2.0})
    cid, outputs = proxy.accept(0.0)
    first = connect_of(outputs)
    assert proxy.next_deadline() == 2.0
    assert proxy.handle_timer(1.9) == []
    outputs = proxy.handle_timer(2.0)
    second = connect_of(outputs)
    assert (second.attempt, second.backend.address) == (2, B)
    assert proxy.control.active_connections(A) == 0
    # The first attempt's connect completes late: stale, nothing happens.
    assert proxy.connected(cid, first.attempt, 2.5) is None
    assert proxy.connect_failed(cid, first.attempt, 2.5) == []
    assert proxy.connected(cid, second.attempt, 2.6) == [
        HealthReport(address=B, input=HealthInput.PASSIVE_SUCCESS)
    ]


def test_a_refused_connect_is_retried_on_the_other_backend() -> None:
    proxy = core()
    cid, outputs = proxy.accept(0.0)
    retry = connect_of(proxy.connect_failed(cid, connect_of(outputs).attempt, 0.1))
    assert retry.backend.address == B
    outputs = proxy.connect_failed(cid, retry.attempt, 0.2)
    assert closed_of(outputs).outcome is Outcome.CONNECT_FAILED
    assert closed_of(outputs).attempts == 2


def test_idle_timeout_follows_activity() -> None:
    proxy = core(timeouts={"idle": 10.0})
    cid = open_connection(proxy, 0.0)
    assert proxy.next_deadline() == 10.0
    proxy.touch(cid, 8.0)
    # The heap entry is early; firing it re-files the real deadline.
    assert proxy.handle_timer(10.0) == []
    assert proxy.next_deadline() == 18.0
    outputs = proxy.handle_timer(18.0)
    assert closed_of(outputs).outcome is Outcome.IDLE_TIMEOUT
    assert proxy.next_deadline() is None


def test_timers_of_closed_connections_are_dropped() -> None:
    proxy = core(timeouts={"idle": 10.0})
    cid = open_connection(proxy)
    proxy.client_error(cid, 1.0)
    assert proxy.next_deadline() is None
    assert proxy.handle_timer(50.0) == []


def test_no_backend_refuses_at_once() -> None:
    proxy = core(health={"failure_threshold": 1})
    for address in (A, B):
        proxy.control.apply(address, HealthInput.PROBE_FAILURE, 0.0)
    assert proxy.snapshot.addresses == ()
    _, outputs = proxy.accept(1.0)
    assert [type(o) for o in outputs] == [CloseConnection, ConnectionClosed]
    assert closed_of(outputs).outcome is Outcome.NO_BACKEND


def test_probes_bring_an_unhealthy_backend_back() -> None:
    proxy = core(health={"failure_threshold": 1, "success_threshold": 2, "probe_interval": 1.0})
    assert proxy.probe_result(A, False, 0.0) == []  # never probed: ignored
    proxy.control.apply(A, HealthInput.PROBE_FAILURE, 0.0)
    assert proxy.control.state(A) is HealthState.UNHEALTHY
    for second in (1.0, 2.0):
        assert proxy.next_deadline() == second
        (probe,) = proxy.handle_timer(second)
        assert isinstance(probe, ProbeBackend)
        outputs = proxy.probe_result(probe.backend.address, True, second + 0.1)
    assert any(isinstance(o, BackendStateChanged) for o in outputs)
    assert proxy.snapshot.addresses == (A, B)


# -- process draining -------------------------------------------------------------------


def test_shutdown_with_nothing_in_flight_stops_at_once() -> None:
    proxy = core()
    outputs = proxy.shutdown(5.0)
    assert outputs == [
        StopAccepting(),
        ShutdownStarted(at=5.0, in_flight=0, deadline=5.0),
        ShutdownFinished(at=5.0, cut=0),
    ]
    assert proxy.stopped
    assert proxy.shutdown(6.0) == []  # a late second signal changes nothing


def test_shutdown_drains_then_stops_when_the_last_connection_ends() -> None:
    proxy = core(timeouts={"drain": 30.0})
    cid = open_connection(proxy)
    outputs = proxy.shutdown(1.0)
    assert outputs == [StopAccepting(), ShutdownStarted(at=1.0, in_flight=1, deadline=31.0)]
    assert not proxy.accepting and not proxy.stopped
    # A client racing the closed listener is refused and counted.
    late, refused = proxy.accept(2.0)
    assert closed_of(refused).outcome is Outcome.REFUSED_SHUTTING_DOWN
    assert refused[0] == CloseConnection(
        connection_id=late, outcome=Outcome.REFUSED_SHUTTING_DOWN, reset=False
    )
    assert late not in proxy.connections
    proxy.client_eof(cid, 3.0)
    outputs = proxy.backend_eof(cid, 4.0)
    assert outputs[-1] == ShutdownFinished(at=4.0, cut=0)
    assert proxy.stopped
    assert proxy.cut_count == 0


def test_the_drain_deadline_cuts_what_remains() -> None:
    proxy = core(timeouts={"drain": 10.0, "idle": 1000.0})
    cid = open_connection(proxy)
    cid2, connecting = proxy.accept(0.5)
    proxy.shutdown(1.0)
    assert proxy.next_deadline() == 5.5  # the connect timeout of cid2 comes first
    proxy.connected(cid2, connect_of(connecting).attempt, 2.0)
    assert proxy.next_deadline() == 11.0
    outputs = proxy.handle_timer(11.0)
    cuts = [o for o in outputs if isinstance(o, ConnectionClosed)]
    assert {c.connection_id for c in cuts} == {cid, cid2}
    assert all(c.outcome is Outcome.CUT for c in cuts)
    assert outputs[-1] == ShutdownFinished(at=11.0, cut=2)
    assert proxy.stopped and proxy.cut_count == 2
    assert proxy.control.active_connections(A) + proxy.control.active_connections(B) == 0


def test_a_second_shutdown_cuts_at_once() -> None:
    proxy = core()
    open_connection(proxy)
    proxy.shutdown(1.0)
    outputs = proxy.shutdown(2.0)
    assert closed_of(outputs).outcome is Outcome.CUT
    assert outputs[-1] == ShutdownFinished(at=2.0, cut=1)


def test_process_table_rows_and_missing_pairs() -> None:
    assert set(PROCESS_TRANSITIONS) == {
        (ProcessState.RUNNING, ProcessInput.SHUTDOWN),
        (ProcessState.DRAINING, ProcessInput.IDLE),
        (ProcessState.DRAINING, ProcessInput.DEADLINE),
        (ProcessState.DRAINING, ProcessInput.SHUTDOWN),
        (ProcessState.STOPPED, ProcessInput.SHUTDOWN),
    }
    process = ProcessLifecycle(drain_timeout=5.0)
    with pytest.raises(StateMachineError, match="can't handle IDLE when state=RUNNING"):
        process.handle(ProcessInput.IDLE, 0.0, 0)
    assert process.handle(ProcessInput.SHUTDOWN, 1.0, 3) == ProcessStep(
        cut=False,
        outputs=(StopAccepting(), ShutdownStarted(at=1.0, in_flight=3, deadline=6.0)),
    )
    assert (process.state, process.deadline) == (ProcessState.DRAINING, 6.0)
    assert process.handle(ProcessInput.DEADLINE, 6.0, 3) == ProcessStep(
        cut=True, outputs=(ShutdownFinished(at=6.0, cut=3),)
    )
    assert (process.state, process.deadline) == (ProcessState.STOPPED, None)
    with pytest.raises(StateMachineError, match="can't handle DEADLINE when state=STOPPED"):
        process.handle(ProcessInput.DEADLINE, 7.0, 0)
    assert process.handle(ProcessInput.SHUTDOWN, 8.0, 0) == ProcessStep(cut=False, outputs=())


@pytest.mark.parametrize(
    ("before", "process_input", "in_flight", "step"),
    [
        (
            "running",
            ProcessInput.SHUTDOWN,
            0,
            ProcessStep(
                cut=False,
                outputs=(
                    StopAccepting(),
                    ShutdownStarted(at=2.0, in_flight=0, deadline=2.0),
                    ShutdownFinished(at=2.0, cut=0),
                ),
            ),
        ),
        (
            "draining",
            ProcessInput.IDLE,
            0,
            ProcessStep(cut=False, outputs=(ShutdownFinished(at=2.0, cut=0),)),
        ),
        (
            "draining",
            ProcessInput.SHUTDOWN,
            4,
            ProcessStep(cut=True, outputs=(ShutdownFinished(at=2.0, cut=4),)),
        ),
    ],
)
def test_each_process_rule_returns_what_it_emits(
    before: str, process_input: ProcessInput, in_flight: int, step: ProcessStep
) -> None:
    process = ProcessLifecycle(drain_timeout=5.0)
    if before == "draining":
        process.handle(ProcessInput.SHUTDOWN, 1.0, 1)
    assert process.handle(process_input, 2.0, in_flight) == step
    assert process.state is ProcessState.STOPPED


# -- properties: a random driver --------------------------------------------------------

STEPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "accept",
                "connected",
                "connect_failed",
                "client_eof",
                "backend_eof",
                "client_error",
                "backend_error",
                "probe_ok",
                "probe_fail",
                "timer",
                "shutdown",
            ]
        ),
        st.integers(min_value=0, max_value=20),
    ),
    max_size=120,
)


@given(STEPS, st.sampled_from(["round_robin", "random", "least_connections", "p2c"]))
def test_random_drivers_keep_every_guarantee(steps: list[tuple[str, int]], algorithm: str) -> None:
    proxy = core(
        balancer={"algorithm": algorithm, "connect_retries": 1},
        health={"failure_threshold": 2, "success_threshold": 2, "probe_interval": 1.0},
        timeouts={"connect": 2.0, "idle": 5.0, "drain": 4.0},
    )
    now = 0.0
    accepted: set[int] = set()
    attempts: dict[int, int] = {}
    outputs: list[Output] = []
    probes: list[str] = []
    for operation, pick in steps:
        now += 0.25
        live = sorted(proxy.connections)
        target = live[pick % len(live)] if live else None
        if operation == "accept":
            cid, new = proxy.accept(now)
            accepted.add(cid)
        elif operation in ("connected", "connect_failed") and target is not None:
            result = getattr(proxy, operation)(target, attempts.get(target, 0), now)
            new = [] if result is None else result  # None: a stale connect
        elif operation in ("client_eof", "backend_eof", "client_error", "backend_error"):
            if target is None or proxy.connections[target].connected_at is None:
                continue  # the driver reads neither side before the connect succeeds
            conn = proxy.connections[target]
            done = {"client_eof": "client_done", "backend_eof": "backend_done"}
            if conn.state.value == done.get(operation):
                continue  # EOF arrives once per side
            new = getattr(proxy, operation)(target, now)
        elif operation in ("probe_ok", "probe_fail") and probes:
            new = proxy.probe_result(probes.pop(0), operation == "probe_ok", now)
        elif operation == "timer":
            deadline = proxy.next_deadline()
            if deadline is None:
                continue
            now = max(now, deadline)
            new = proxy.handle_timer(now)
        elif operation == "shutdown":
            new = proxy.shutdown(now)
        else:
            continue
        for output in new:
            if isinstance(output, ConnectBackend):
                # Safe draining needs no check here: CONNECTION_STARTED on a
                # backend that is not HEALTHY raises inside the core.
                attempts[output.connection_id] = output.attempt
            elif isinstance(output, ProbeBackend):
                probes.append(output.backend.address)
            elif isinstance(output, CloseConnection):
                assert output.reset is (output.outcome in RESETTING)
        outputs += new
        # Active counts equal the attempts in flight, per backend.
        in_flight = Counter(
            c.backend.address for c in proxy.connections.values() if c.backend is not None
        )
        for address in (A, B):
            assert proxy.control.active_connections(address) == in_flight[address]
        statistics = proxy.statistics()
        assert statistics.open_connection_ids == tuple(sorted(proxy.connections))
        assert statistics.in_flight == proxy.in_flight
        assert {b.address: b.active_connections for b in statistics.backends} == {
            address: in_flight[address] for address in (A, B)
        }
        assert statistics.eligible == proxy.snapshot.addresses

    # Finish: shut down and let the deadline cut the rest.
    outputs += proxy.shutdown(now)
    while not proxy.stopped:
        deadline = proxy.next_deadline()
        assert deadline is not None
        now = max(now, deadline)
        outputs += proxy.handle_timer(now)
    closed = Counter(o.connection_id for o in outputs if isinstance(o, ConnectionClosed))
    assert set(closed) == accepted
    assert all(count == 1 for count in closed.values())
    assert proxy.in_flight == 0
    assert proxy.control.active_connections(A) == proxy.control.active_connections(B) == 0
    started = Counter(
        o.address
        for o in outputs
        if isinstance(o, HealthReport) and o.input is HealthInput.CONNECTION_STARTED
    )
    finished = Counter(
        o.address
        for o in outputs
        if isinstance(o, HealthReport) and o.input is HealthInput.CONNECTION_FINISHED
    )
    assert started == finished


def test_timer_lead_is_the_shortest_delay_a_call_can_file() -> None:
    proxy = core(
        timeouts={"connect": 3.0, "idle": 60.0, "drain": 1.5},
        health={"probe_interval": 2.0},
    )
    assert proxy.timer_lead() == 1.5
    assert proxy.timer_lead(shutdown_possible=False) == 2.0
    # The promise itself: after a call at `now`, nothing it filed is due
    # sooner than now + lead.
    proxy.accept(10.0)
    assert proxy.next_deadline() == 13.0
    proxy.shutdown(11.0)
    assert proxy.next_deadline() == 11.0 + proxy.timer_lead()


def test_wake_bound_is_the_sooner_of_the_wake_up_and_the_lead() -> None:
    proxy = core(
        timeouts={"connect": 3.0, "idle": 60.0, "drain": 1.5},
        health={"probe_interval": 2.0},
    )
    # The lead defaults to timer_lead() with shutdown possible: 1.5.
    assert proxy.wake_bound(10.0, None) == 11.5
    assert proxy.wake_bound(10.0, 20.0) == 11.5
    assert proxy.wake_bound(10.0, 10.25) == 10.25
    assert proxy.wake_bound(10.0, 11.5) == 11.5
    # A driver that never shuts down passes its own lead.
    assert proxy.wake_bound(10.0, None, lead=proxy.timer_lead(shutdown_possible=False)) == 12.0
    assert proxy.wake_bound(10.0, 30.0, lead=0.0) == 10.0


def test_wake_bound_keeps_its_promise() -> None:
    # Calls made before the bound file nothing due before it: asking
    # next_deadline() again would not bring the wake-up closer.
    proxy = core(timeouts={"connect": 2.0, "idle": 5.0, "drain": 4.0})
    cid, outputs = proxy.accept(0.0)
    wake = proxy.next_deadline()
    bound = proxy.wake_bound(0.0, wake)
    assert bound == 2.0
    proxy.connected(cid, connect_of(outputs).attempt, 0.5)
    proxy.accept(1.0)
    proxy.shutdown(1.5)
    deadline = proxy.next_deadline()
    assert deadline is not None and deadline >= bound


@pytest.mark.parametrize(("idle", "resolution"), [(300.0, 0.001), (0.1, 0.001), (0.02, 0.0002)])
def test_the_touch_resolution_is_at_most_a_millisecond_and_one_percent_of_idle(
    idle: float, resolution: float
) -> None:
    proxy = core(timeouts={"idle": idle})
    assert proxy.touch_resolution == pytest.approx(resolution)
    assert proxy.touch_resolution <= min(0.001, idle / 100)


# -- statistics ---------------------------------------------------------------------------


def test_statistics_describe_the_core_now() -> None:
    proxy = core(
        backends=[{"address": A, "weight": 3}, {"address": B}],  # type: ignore[dict-item]
        health={"failure_threshold": 1},
    )
    statistics = proxy.statistics()
    assert statistics == CoreStatistics(
        process=ProcessState.RUNNING,
        accepting=True,
        in_flight=0,
        open_connection_ids=(),
        snapshot_version=1,
        eligible=(A, B),
        backends=(
            BackendStatistics(address=A, weight=3, state=HealthState.HEALTHY, active_connections=0),
            BackendStatistics(address=B, weight=1, state=HealthState.HEALTHY, active_connections=0),
        ),
        cut=0,
    )
    first = open_connection(proxy)
    second, _ = proxy.accept(0.0)
    third, refused = proxy.accept(0.0)
    proxy.connect_failed(third, connect_of(refused).attempt, 0.1)  # B fails, out at once
    later = proxy.statistics()
    assert later.in_flight == 3
    assert later.open_connection_ids == (first, second, third)
    assert later.snapshot_version == 2
    assert later.eligible == (A,)
    assert [(b.address, b.state, b.active_connections) for b in later.backends] == [
        (A, HealthState.HEALTHY, 3),
        (B, HealthState.UNHEALTHY, 0),
    ]
    assert statistics.in_flight == 0  # a value: the first read did not change
    with pytest.raises(AttributeError):
        later.in_flight = 0  # type: ignore[misc]

    proxy.shutdown(1.0)
    draining = proxy.statistics()
    assert (draining.process, draining.accepting, draining.cut) == (
        ProcessState.DRAINING,
        False,
        0,
    )
    proxy.shutdown(2.0)  # a second request cuts at once
    stopped = proxy.statistics()
    assert (stopped.process, stopped.in_flight, stopped.open_connection_ids, stopped.cut) == (
        ProcessState.STOPPED,
        0,
        (),
        3,
    )


# -- several deadlines passed at one wake-up ---------------------------------------------


def four_backends() -> ProxyCore:
    return core(
        backends=[{"address": f"10.0.9.{i}:80"} for i in (1, 2, 3, 4)],  # type: ignore[dict-item]
        balancer={"connect_retries": 2},
        health={"failure_threshold": 10},
        timeouts={"connect": 1.0, "idle": 1.0},
    )


def ids(outputs: list[Output], kind: type) -> list[int]:
    return [o.connection_id for o in outputs if isinstance(o, kind)]  # type: ignore[attr-defined]


def test_a_late_wake_up_times_out_connects_in_deadline_order() -> None:
    # A retry moves a's connect deadline to 1.5 but its timer entry stays at
    # 1.0; b's deadline is 1.4. A driver that wakes late (a busy loop) finds
    # both passed: b's, the earlier, must be handled first.
    proxy = four_backends()
    a, _ = proxy.accept(0.0)
    b, _ = proxy.accept(0.4)
    proxy.connect_failed(a, 1, 0.5)
    assert ids(proxy.handle_timer(1.6), ConnectBackend) == [b, a]


def test_a_late_wake_up_times_out_idle_connections_in_deadline_order() -> None:
    proxy = four_backends()
    a, _ = proxy.accept(0.0)
    b, _ = proxy.accept(0.0)
    proxy.connected(a, 1, 0.1)  # idle deadline 1.1
    proxy.connected(b, 1, 0.2)  # idle deadline 1.2
    proxy.client_eof(a, 0.5)  # a's idle deadline moves to 1.5, its entry stays at 1.1
    assert ids(proxy.handle_timer(2.0), ConnectionClosed) == [b, a]


def test_equal_deadlines_go_by_connection_id() -> None:
    proxy = four_backends()
    a, _ = proxy.accept(0.0)
    b, _ = proxy.accept(0.5)  # deadline 1.5
    proxy.connect_failed(a, 1, 0.5)  # a's deadline is 1.5 too; its entry says 1.0
    proxy.handle_timer(1.0)  # a's early entry fires and is re-filed behind b's
    assert ids(proxy.handle_timer(1.5), ConnectBackend) == [a, b]


def test_a_deadline_that_comes_earlier_is_filed() -> None:
    # A driver clock that steps back: the half-close's idle deadline (10.5)
    # is earlier than the live entry (11.0), so it must be filed.
    proxy = core(timeouts={"idle": 1.0})
    cid, _ = proxy.accept(9.9)
    proxy.connected(cid, 1, 10.0)
    proxy.client_eof(cid, 9.5)
    assert proxy.next_deadline() == 10.5
