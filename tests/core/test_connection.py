"""The connection lifecycle machine: every row, retries, exactly-once reports."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Collection

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loble.core import (
    Backend,
    CloseConnection,
    ConnectBackend,
    ConnectFailed,
    ConnectionClosed,
    HealthInput,
    HealthReport,
    Outcome,
    Output,
    ShutdownWrite,
    Side,
    StateMachineError,
)
from loble.core._connection import (
    RESET_OUTCOMES,
    TOUCH_RESOLUTION,
    TRANSITIONS,
    Connection,
    ConnectionPolicy,
    ConnInput,
    ConnState,
    close_connection,
)

BACKENDS = [Backend(address=f"10.0.0.{n}:80") for n in (1, 2, 3)]
RESETTING = {
    Outcome.CLIENT_RESET,
    Outcome.BACKEND_RESET,
    Outcome.RESOURCE_EXHAUSTED,
    Outcome.REMOVED,
    Outcome.CUT,
    Outcome.IDLE_TIMEOUT,
}
"""The outcomes that must close with RST: written out here, not read from the core."""
FIN = {
    Outcome.COMPLETED,
    Outcome.NO_BACKEND,
    Outcome.CONNECT_FAILED,
    Outcome.REFUSED_SHUTTING_DOWN,
    Outcome.QUEUE_TIMEOUT,
    Outcome.QUEUE_FULL,
}
"""The outcomes that close with FIN: the stream ended, or nothing was carried yet."""
In = ConnInput
S = ConnState


def picker(backends: list[Backend]) -> object:
    def pick(exclude: Collection[str], key: int | None = None, now: float = 0.0) -> Backend | None:
        for backend in backends:
            if backend.address not in exclude:
                return backend
        return None

    return pick


def make(retries: int = 2, backends: list[Backend] | None = None) -> Connection:
    policy = ConnectionPolicy(
        pick=picker(BACKENDS if backends is None else backends),  # type: ignore[arg-type]
        connect_timeout=5.0,
        idle_timeout=60.0,
        connect_retries=retries,
    )
    return Connection(7, policy)


def reports(outputs: list[Output]) -> list[tuple[str, HealthInput]]:
    return [(o.address, o.input) for o in outputs if isinstance(o, HealthReport)]


def actions(outputs: list[Output]) -> list[Output]:
    return [
        o for o in outputs if not isinstance(o, (HealthReport, ConnectionClosed, ConnectFailed))
    ]


def established() -> Connection:
    conn = make()
    conn.open(0.0)
    conn.handle(In.CONNECT_OK, 1.0)
    return conn


def queued(refusal: Outcome | None = None) -> tuple[Connection, list[Backend]]:
    """A connection opened while no backend had room; put one in the list to make room."""
    room: list[Backend] = []
    policy = ConnectionPolicy(
        pick=picker(room),  # type: ignore[arg-type]
        connect_timeout=5.0,
        idle_timeout=60.0,
        connect_retries=2,
        queue=lambda connection, now, out: refusal,
        queue_timeout=3.0,
    )
    return Connection(7, policy), room


def in_state(state: ConnState) -> Connection:
    if state is S.QUEUED:
        conn, _ = queued()
        conn.open(0.0)
        return conn
    conn = established()
    if state is S.CLIENT_DONE:
        conn.handle(In.CLIENT_EOF, 2.0)
    elif state is S.BACKEND_DONE:
        conn.handle(In.BACKEND_EOF, 2.0)
    elif state is S.CONNECTING:
        conn = make()
        conn.open(0.0)
    return conn


A1 = "10.0.0.1:80"


def test_open_picks_and_connects() -> None:
    conn = make()
    outputs = conn.open(0.0)
    assert outputs == [
        HealthReport(address=A1, input=HealthInput.CONNECTION_STARTED),
        ConnectBackend(connection_id=7, attempt=1, backend=BACKENDS[0]),
    ]
    assert conn.state is S.CONNECTING
    assert conn.deadline == 5.0
    assert conn.timeout_input is In.CONNECT_TIMEOUT
    with pytest.raises(StateMachineError, match="opened twice"):
        conn.open(0.0)


def test_with_no_room_the_queue_takes_it_with_no_report_on_any_backend() -> None:
    conn, room = queued()
    assert conn.open(1.0) == []
    assert (conn.state, conn.deadline, conn.timeout_input) == (S.QUEUED, 4.0, In.QUEUE_TIMEOUT)
    assert conn.handle(In.DEQUEUE, 2.0) == []  # still no room: it waits on
    assert conn.state is S.QUEUED
    room.append(BACKENDS[1])
    assert conn.handle(In.DEQUEUE, 2.5) == [
        HealthReport(address=BACKENDS[1].address, input=HealthInput.CONNECTION_STARTED),
        ConnectBackend(connection_id=7, attempt=1, backend=BACKENDS[1]),
    ]
    assert (conn.state, conn.deadline) == (S.CONNECTING, 7.5)  # its connect timeout now


@pytest.mark.parametrize(
    ("conn_input", "outcome"),
    [
        (In.QUEUE_TIMEOUT, Outcome.QUEUE_TIMEOUT),
        (In.CLIENT_ERROR, Outcome.CLIENT_RESET),
        (In.CUT, Outcome.CUT),
        (In.RESOURCE_EXHAUSTED, Outcome.RESOURCE_EXHAUSTED),
    ],
)
def test_a_queued_connection_ends_without_an_attempt(
    conn_input: ConnInput, outcome: Outcome
) -> None:
    conn, _ = queued()
    conn.open(1.0)
    outputs = conn.handle(conn_input, 4.0)
    assert reports(outputs) == []  # it never had a backend
    assert outputs[0] == close_connection(7, outcome)
    closed = outputs[1]
    assert isinstance(closed, ConnectionClosed)
    assert (closed.backend, closed.attempts, closed.outcome, closed.opened_at) == (
        None,
        0,
        outcome,
        1.0,
    )


@pytest.mark.parametrize("refusal", [Outcome.QUEUE_FULL, Outcome.NO_BACKEND])
def test_the_queue_may_refuse_it(refusal: Outcome) -> None:
    conn, _ = queued(refusal)
    outputs = conn.open(1.0)
    assert outputs[0] == CloseConnection(connection_id=7, outcome=refusal, reset=False)
    assert conn.state is S.CLOSED


def test_no_backend_closes_at_once() -> None:
    conn = make(backends=[])
    outputs = conn.open(3.0)
    assert actions(outputs) == [
        CloseConnection(connection_id=7, outcome=Outcome.NO_BACKEND, reset=False)
    ]
    closed = outputs[-1]
    assert isinstance(closed, ConnectionClosed)
    assert (closed.backend, closed.attempts, closed.outcome) == (None, 0, Outcome.NO_BACKEND)
    assert conn.state is S.CLOSED
    assert conn.deadline is None


def test_connect_ok_reports_success_and_arms_idle_timeout() -> None:
    conn = make()
    conn.open(0.0)
    assert conn.handle(In.CONNECT_OK, 1.5) == [
        HealthReport(address=A1, input=HealthInput.PASSIVE_SUCCESS)
    ]
    assert conn.state is S.ESTABLISHED
    assert conn.deadline == 61.5
    assert conn.timeout_input is In.IDLE_TIMEOUT
    conn.touch(30.0)
    assert conn.deadline == 90.0


@pytest.mark.parametrize("failure", [In.CONNECT_FAILED, In.CONNECT_TIMEOUT])
def test_failed_connect_retries_on_a_different_backend(failure: ConnInput) -> None:
    conn = make()
    conn.open(0.0)
    outputs = conn.handle(failure, 5.0)
    assert outputs == [
        # Why it failed comes first, for the operator: refused, or timed out.
        ConnectFailed(
            at=5.0,
            connection_id=7,
            attempt=1,
            backend=A1,
            timed_out=failure is In.CONNECT_TIMEOUT,
        ),
        HealthReport(address=A1, input=HealthInput.CONNECTION_FINISHED),
        HealthReport(address=A1, input=HealthInput.PASSIVE_FAILURE),
        HealthReport(address="10.0.0.2:80", input=HealthInput.CONNECTION_STARTED),
        ConnectBackend(connection_id=7, attempt=2, backend=BACKENDS[1]),
    ]
    assert conn.deadline == 10.0
    assert conn.tried == (A1,)  # the attempts before the current one
    assert conn.backend == BACKENDS[1]


def test_retries_are_bounded() -> None:
    conn = make(retries=1)
    conn.open(0.0)
    conn.handle(In.CONNECT_FAILED, 1.0)
    outputs = conn.handle(In.CONNECT_FAILED, 2.0)
    assert actions(outputs) == [
        CloseConnection(connection_id=7, outcome=Outcome.CONNECT_FAILED, reset=False)
    ]
    assert conn.attempt == 2


def test_no_untried_backend_left_fails_the_connection() -> None:
    conn = make(retries=5, backends=BACKENDS[:1])
    conn.open(0.0)
    outputs = conn.handle(In.CONNECT_FAILED, 1.0)
    assert actions(outputs) == [
        CloseConnection(connection_id=7, outcome=Outcome.CONNECT_FAILED, reset=False)
    ]


def test_half_close_from_the_client_then_the_backend() -> None:
    conn = established()
    assert conn.handle(In.CLIENT_EOF, 2.0) == [ShutdownWrite(connection_id=7, side=Side.BACKEND)]
    assert conn.state is S.CLIENT_DONE
    outputs = conn.handle(In.BACKEND_EOF, 3.0)
    assert actions(outputs) == [
        CloseConnection(connection_id=7, outcome=Outcome.COMPLETED, reset=False)
    ]
    assert reports(outputs) == [(A1, HealthInput.CONNECTION_FINISHED)]
    # The close, then the attempt's end: what that end changes follows its cause.
    assert [type(output) for output in outputs] == [
        CloseConnection,
        ConnectionClosed,
        HealthReport,
    ]
    closed = outputs[1]
    assert isinstance(closed, ConnectionClosed)
    assert (closed.opened_at, closed.connected_at, closed.at) == (0.0, 1.0, 3.0)


def test_half_close_from_the_backend_then_the_client() -> None:
    conn = established()
    assert conn.handle(In.BACKEND_EOF, 2.0) == [ShutdownWrite(connection_id=7, side=Side.CLIENT)]
    assert conn.state is S.BACKEND_DONE
    outputs = conn.handle(In.CLIENT_EOF, 3.0)
    assert actions(outputs) == [
        CloseConnection(connection_id=7, outcome=Outcome.COMPLETED, reset=False)
    ]


ENDINGS = [
    (In.CLIENT_ERROR, Outcome.CLIENT_RESET),
    (In.BACKEND_ERROR, Outcome.BACKEND_RESET),
    (In.IDLE_TIMEOUT, Outcome.IDLE_TIMEOUT),
    (In.CUT, Outcome.CUT),
    (In.RESOURCE_EXHAUSTED, Outcome.RESOURCE_EXHAUSTED),
    (In.REMOVED, Outcome.REMOVED),
]


@pytest.mark.parametrize("state", [S.ESTABLISHED, S.CLIENT_DONE, S.BACKEND_DONE])
@pytest.mark.parametrize(("conn_input", "outcome"), ENDINGS)
def test_open_states_end_on_errors_timeouts_and_cuts(
    state: ConnState, conn_input: ConnInput, outcome: Outcome
) -> None:
    conn = in_state(state)
    outputs = conn.handle(conn_input, 9.0)
    assert actions(outputs) == [
        CloseConnection(connection_id=7, outcome=outcome, reset=outcome in RESETTING)
    ]
    assert reports(outputs) == [(A1, HealthInput.CONNECTION_FINISHED)]
    assert conn.outcome is outcome


@pytest.mark.parametrize(
    ("conn_input", "outcome"),
    [
        (In.CUT, Outcome.CUT),
        (In.CLIENT_ERROR, Outcome.CLIENT_RESET),
        (In.RESOURCE_EXHAUSTED, Outcome.RESOURCE_EXHAUSTED),
        (In.REMOVED, Outcome.REMOVED),
    ],
)
def test_aborts_while_connecting_report_no_verdict(conn_input: ConnInput, outcome: Outcome) -> None:
    conn = in_state(S.CONNECTING)
    outputs = conn.handle(conn_input, 1.0)
    assert reports(outputs) == [(A1, HealthInput.CONNECTION_FINISHED)]
    assert actions(outputs) == [
        CloseConnection(connection_id=7, outcome=outcome, reset=outcome in RESETTING)
    ]


MISSING = sorted(
    set(itertools.product(ConnState, ConnInput)) - set(TRANSITIONS),
    key=lambda pair: (pair[0].value, pair[1].value),
)


@pytest.mark.parametrize(("state", "conn_input"), MISSING)
def test_missing_pairs_raise(state: ConnState, conn_input: ConnInput) -> None:
    if state is S.CLOSED:
        conn = established()
        conn.handle(In.CUT, 5.0)
    else:
        conn = in_state(state)
    with pytest.raises(StateMachineError) as error:
        conn.handle(conn_input, 10.0)
    assert f"can't handle {conn_input.name} when state={state.name}" in str(error.value)


def test_repr_names_state_and_backend() -> None:
    assert "state=ESTABLISHED, backend=10.0.0.1:80, attempt=1" in repr(established())


# -- exactly-once reports over random runs ---------------------------------------------


@given(
    st.lists(st.sampled_from(list(ConnInput)), max_size=30),
    st.integers(min_value=0, max_value=3),
    st.integers(min_value=0, max_value=3),
)
def test_each_attempt_starts_and_finishes_exactly_once(
    inputs: list[ConnInput], retries: int, fleet: int
) -> None:
    conn = make(retries=retries, backends=BACKENDS[:fleet])
    outputs = conn.open(0.0)
    for step, conn_input in enumerate(inputs, start=1):
        if conn.state is S.CLOSED:
            break
        if (conn.state, conn_input) in TRANSITIONS:
            outputs += conn.handle(conn_input, float(step))
    if conn.state is not S.CLOSED:
        outputs += conn.handle(In.CUT, 1000.0)

    started = Counter(a for a, i in reports(outputs) if i is HealthInput.CONNECTION_STARTED)
    finished = Counter(a for a, i in reports(outputs) if i is HealthInput.CONNECTION_FINISHED)
    assert started == finished
    assert sum(started.values()) == conn.attempt
    assert all(count == 1 for count in started.values())  # every retry is elsewhere
    verdicts = [
        i
        for _, i in reports(outputs)
        if i in (HealthInput.PASSIVE_SUCCESS, HealthInput.PASSIVE_FAILURE)
    ]
    assert len(verdicts) <= conn.attempt
    assert verdicts.count(HealthInput.PASSIVE_SUCCESS) <= 1
    # A success comes while its attempt is open; a failure right after its
    # attempt's CONNECTION_FINISHED, on the same backend.
    open_attempt: str | None = None
    last_finished: str | None = None
    for address, health_input in reports(outputs):
        if health_input is HealthInput.CONNECTION_STARTED:
            assert open_attempt is None
            open_attempt, last_finished = address, None
        elif health_input is HealthInput.CONNECTION_FINISHED:
            assert open_attempt == address
            open_attempt, last_finished = None, address
        elif health_input is HealthInput.PASSIVE_SUCCESS:
            assert open_attempt == address
        else:
            assert (open_attempt, last_finished) == (None, address)
            last_finished = None
    assert open_attempt is None
    closes = [o for o in outputs if isinstance(o, CloseConnection)]
    assert len(closes) == 1
    assert sum(isinstance(o, ConnectionClosed) for o in outputs) == 1


# -- how a connection ends on the wire ------------------------------------------------


def test_resets_are_exactly_the_truncated_streams() -> None:
    # A reset, a local failure, a cut (at a removed backend's deadline or at
    # the drain deadline) or the idle timeout cut the stream short: RST, so the
    # other side cannot take a truncated stream for a complete one. FIN only
    # where the stream ended or nothing was carried yet.
    assert RESET_OUTCOMES == RESETTING
    assert set(Outcome) == RESETTING | FIN and not RESETTING & FIN


@pytest.mark.parametrize("state", [S.ESTABLISHED, S.CLIENT_DONE, S.BACKEND_DONE])
@pytest.mark.parametrize(
    ("conn_input", "outcome"), [(In.CUT, Outcome.CUT), (In.IDLE_TIMEOUT, Outcome.IDLE_TIMEOUT)]
)
def test_the_proxys_own_cuts_close_with_rst(
    state: ConnState, conn_input: ConnInput, outcome: Outcome
) -> None:
    # Ended on purpose by the proxy, mid-stream: still a truncation to the peers.
    (close,) = [
        o for o in in_state(state).handle(conn_input, 9.0) if isinstance(o, CloseConnection)
    ]
    assert (close.outcome, close.reset) == (outcome, True)


@pytest.mark.parametrize("outcome", list(Outcome))
def test_every_close_says_whether_to_reset(outcome: Outcome) -> None:
    close = close_connection(3, outcome)
    assert (close.connection_id, close.outcome) == (3, outcome)
    assert close.reset is (outcome in RESETTING)


def test_a_reset_mid_stream_closes_with_rst_and_a_completed_one_with_fin() -> None:
    conn = in_state(S.ESTABLISHED)
    (close,) = [o for o in conn.handle(In.BACKEND_ERROR, 9.0) if isinstance(o, CloseConnection)]
    assert close.reset is True
    conn = in_state(S.CLIENT_DONE)
    (close,) = [o for o in conn.handle(In.BACKEND_EOF, 9.0) if isinstance(o, CloseConnection)]
    assert close.reset is False


# -- the touch bound -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("idle", "resolution"),
    [(300.0, TOUCH_RESOLUTION), (0.1, 0.001), (0.05, 0.0005), (0.001, 1e-05)],
)
def test_the_touch_resolution_is_a_millisecond_or_one_percent_of_idle(
    idle: float, resolution: float
) -> None:
    policy = ConnectionPolicy(
        pick=picker(BACKENDS),  # type: ignore[arg-type]
        connect_timeout=5.0,
        idle_timeout=idle,
        connect_retries=0,
    )
    assert policy.touch_resolution == pytest.approx(resolution)
    assert policy.touch_resolution <= idle / 100
    assert TOUCH_RESOLUTION == 0.001
