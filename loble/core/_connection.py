"""The lifecycle of one client connection.

Theory of operation
===================

::

    QUEUED --DEQUEUE--> CONNECTING (a backend has room) or QUEUED (none yet)
    QUEUED --QUEUE_TIMEOUT--> CLOSED (QUEUE_TIMEOUT)
    QUEUED --CLIENT_ERROR, RESOURCE_EXHAUSTED or CUT--> CLOSED
    CONNECTING --CONNECT_OK--> ESTABLISHED
    CONNECTING --CONNECT_FAILED / CONNECT_TIMEOUT--> CONNECTING (next backend)
                                                  or CLOSED (CONNECT_FAILED)
    CONNECTING --REDISPATCH--> CONNECTING (next backend, or the same attempt)
    CONNECTING --CLIENT_ERROR, RESOURCE_EXHAUSTED or CUT--> CLOSED (no verdict on the backend)
    ESTABLISHED --CLIENT_EOF--> CLIENT_DONE   (shut down the backend's write side)
    ESTABLISHED --BACKEND_EOF--> BACKEND_DONE (shut down the client's write side)
    CLIENT_DONE --BACKEND_EOF--> CLOSED (COMPLETED)
    BACKEND_DONE --CLIENT_EOF--> CLOSED (COMPLETED)
    any open state --error, RESOURCE_EXHAUSTED, IDLE_TIMEOUT or CUT--> CLOSED
    any open state --REMOVED--> CLOSED (its backend's removal deadline passed)

A connection starts by picking a backend. No backend eligible: it closes at
once with ``NO_BACKEND``. Eligible backends that are all at their
``max_connections``: the owner's queue hook (:attr:`ConnectionPolicy.queue`)
either takes it (``QUEUED``, until a backend has room, when the owner sends
``DEQUEUE``, or until its ``queue_timeout``) or refuses it (``QUEUE_FULL``).
A queued connection has no backend and no attempt: nothing is reported on
any backend until it leaves the queue. Otherwise each *attempt* goes to one
backend:

* it reports ``CONNECTION_STARTED`` to that backend when it begins and
  ``CONNECTION_FINISHED`` exactly once when it ends, so a backend's active
  count covers connects in progress too;
* it reports exactly one verdict, as HAProxy's ``observe layer4`` does:
  ``PASSIVE_SUCCESS`` when the connect succeeds (the attempt is active), and
  ``PASSIVE_FAILURE`` when it is refused or times out, right *after* that
  attempt's ``CONNECTION_FINISHED``, so the failure is weighed against the
  backend's other connections only. A reset later in the stream ends the connection with
  ``BACKEND_RESET`` but is not a health verdict. An attempt cut by a shutdown
  before the backend answered reports no verdict: there was none;
* a client that resets while its connect is pending ends the attempt with
  no verdict too (the driver reports it only if it noticed: it does not read
  the client before the backend is connected, so a client EOF can only come
  after ``CONNECT_OK``);
* a failed connect is retried on a backend not tried yet, up to
  ``connect_retries`` more attempts (HAProxy's ``retries`` with
  ``redispatch``). When no untried backend is eligible, or the retries are
  spent, the connection closes with ``CONNECT_FAILED``;
* an attempt whose backend is judged bad while it is pending (health took
  it out, or outlier ejection did: ``[outlier] redispatch_pending``) is
  given up with no verdict (``ConnectRedispatched``, then its
  ``CONNECTION_FINISHED``) and the next begins at once on a backend not
  tried, within the same ``connect_retries``, rather than waiting out its
  connect timeout. With no untried backend eligible or no retry left, the
  attempt keeps waiting for its own answer.

Half-close is exact: EOF from one side becomes "shut down the write side of
the other" and the other direction keeps flowing until it ends too.

Time: in ``QUEUED`` the deadline is the queue timeout; in ``CONNECTING`` the
connect timeout of the current attempt; in the open states it is
``idle_timeout`` after the last activity (:meth:`Connection.touch`). The
owner (``ProxyCore``) keeps the timer and sends ``QUEUE_TIMEOUT``,
``CONNECT_TIMEOUT`` or ``IDLE_TIMEOUT`` when :attr:`deadline` passes.

How it ends on the wire: the ``CloseConnection`` of an outcome in
:data:`RESET_OUTCOMES` (every stream cut short, by a peer or by the proxy's
own deadlines) says ``reset``, and the driver closes with RST instead of FIN.

The machine is :data:`TRANSITIONS`, one dict keyed by ``(state, input)``; a
pair missing from it raises :class:`StateMachineError`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection

from ._backend import Backend
from ._errors import StateMachineError
from ._events import (
    CloseConnection,
    ConnectFailed,
    ConnectRedispatched,
    HealthReport,
    Outcome,
    Output,
    Side,
    connect_backend,
    connection_closed,
    setters,
    shutdown_write,
)
from ._health import HealthInput

__all__ = [
    "RESET_OUTCOMES",
    "TOUCH_RESOLUTION",
    "TRANSITIONS",
    "ConnInput",
    "ConnState",
    "Connection",
    "ConnectionPolicy",
    "close_connection",
]


class ConnState(enum.Enum):
    __hash__ = object.__hash__  # identity hashing in C; see _health.HealthState

    QUEUED = "queued"
    """Waiting for a backend with room (every eligible one at its ``max_connections``)."""
    CONNECTING = "connecting"
    ESTABLISHED = "established"
    CLIENT_DONE = "client_done"
    """The client sent EOF; the backend -> client direction still flows."""
    BACKEND_DONE = "backend_done"
    """The backend sent EOF; the client -> backend direction still flows."""
    CLOSED = "closed"


class ConnInput(enum.Enum):
    __hash__ = object.__hash__

    CONNECT_OK = "connect_ok"
    CONNECT_FAILED = "connect_failed"
    CONNECT_TIMEOUT = "connect_timeout"
    CLIENT_EOF = "client_eof"
    BACKEND_EOF = "backend_eof"
    CLIENT_ERROR = "client_error"
    BACKEND_ERROR = "backend_error"
    IDLE_TIMEOUT = "idle_timeout"
    CUT = "cut"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    """The driver ran out of something of its own for this connection (file
    descriptors, socket memory): the connection ends, no backend is blamed."""
    REMOVED = "removed"
    """Its backend was removed by a reload and ``[timeouts] removal`` has
    passed: the connection is cut, no verdict on the backend."""
    REDISPATCH = "redispatch"
    """The backend of the pending attempt was judged bad: try another now."""
    DEQUEUE = "dequeue"
    """A queued connection's turn: pick a backend with room, if one has it now."""
    QUEUE_TIMEOUT = "queue_timeout"
    """A queued connection waited its ``queue_timeout``: refuse it."""


Picker = Callable[[Collection[str], "int | None", float], "Backend | None"]
"""Returns an eligible backend whose address is not in the given collection
(then: the connection's key, for a hashing balancer, and the time, for slow start)."""

Reporter = Callable[[list[Output], str, HealthInput, float], None]
"""Appends a health report on a backend to the outputs, and whatever it caused."""

Queuer = Callable[["Connection", float, list[Output]], "Outcome | None"]
"""Takes a connection no backend was picked for into the queue (None; it may
append what that caused to the outputs), or says why it is refused
(``NO_BACKEND``: none eligible; ``QUEUE_FULL``). The connection's
:attr:`~Connection.deadline_at` is its queue deadline already."""


def _append_report(out: list[Output], address: str, health_input: HealthInput, now: float) -> None:
    out.append(HealthReport.of(address, health_input))


TOUCH_RESOLUTION = 0.001
"""Seconds: the coarsest a driver may tell the core of a connection's activity.

Bytes moving push the connection's idle deadline back (``touch``). Telling
the core on every wakeup costs a core call per wakeup, two per proxied
request; once per millisecond per connection is as fine as HAProxy's clock,
read once per loop turn in milliseconds. A connection's own bound is the
smaller of this and 1% of its idle timeout
(:attr:`ConnectionPolicy.touch_resolution`): with the shortest idle
timeouts every wakeup counts."""


class ConnectionPolicy:
    """What all the connections of one core share: timeouts, retries, two hooks.

    ``pick`` chooses the backend of each attempt; ``report`` receives each
    health report in order. Alone, a report is appended to the outputs;
    :class:`ProxyCore` applies it to the control plane as it goes, so what
    the report changed follows it in the outputs.
    """

    __slots__ = (
        "connect_retries",
        "connect_timeout",
        "idle_timeout",
        "pick",
        "queue",
        "queue_timeout",
        "report",
        "touch_resolution",
    )

    def __init__(
        self,
        *,
        pick: Picker,
        connect_timeout: float,
        idle_timeout: float,
        connect_retries: int,
        report: Reporter = _append_report,
        queue: Queuer | None = None,
        queue_timeout: float = 0.0,
    ) -> None:
        self.pick = pick
        self.queue = queue
        """None: no backend has a connection limit, so no pick fails for want of room."""
        self.queue_timeout = queue_timeout
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.connect_retries = connect_retries
        self.report = report
        self.touch_resolution = min(TOUCH_RESOLUTION, idle_timeout / 100)
        """Seconds: a driver tells the core of a connection's activity
        (``touch``) at most once per this many seconds. An idle timeout can
        so end a connection at most this much before a full idle timeout has
        passed since its last byte: at most 1% of it (:data:`TOUCH_RESOLUTION`)."""


class Connection:
    """One client connection, from accept to close."""

    __slots__ = (
        "attempt",
        "backend",
        "connected_at",
        "connection_id",
        "deadline_at",
        "key",
        "last_activity",
        "opened_at",
        "outcome",
        "policy",
        "state",
        "timer_due",
        "tried",
    )

    def __init__(self, connection_id: int, policy: ConnectionPolicy) -> None:
        self.connection_id = connection_id
        self.policy = policy
        self.state = _C
        self.backend: Backend | None = None
        self.attempt = 0
        self.tried: tuple[str, ...] = ()
        """Backends of the attempts before the current one."""
        self.opened_at = 0.0
        self.connected_at: float | None = None
        self.last_activity = 0.0
        self.deadline_at = 0.0
        self.outcome: Outcome | None = None
        self.timer_due: float | None = None
        """Due time of this connection's live entry in its owner's timer queue."""
        self.key: int | None = None
        """The hash of its client, for a hashing balancer (None: no client given)."""

    def __repr__(self) -> str:
        backend = self.backend.address if self.backend else None
        return (
            f"Connection({self.connection_id}, state={self.state.name}, "
            f"backend={backend}, attempt={self.attempt})"
        )

    # -- entry points ----------------------------------------------------------

    def open(self, now: float) -> list[Output]:
        """Pick the first backend; called once, right after accept."""
        out: list[Output] = []
        self.open_into(now, out)
        return out

    def handle(self, conn_input: ConnInput, now: float) -> list[Output]:
        out: list[Output] = []
        self.handle_into(conn_input, now, out)
        return out

    def open_into(self, now: float, out: list[Output]) -> None:
        """:meth:`open`, appending to ``out`` (the owner's hot path)."""
        if self.attempt:
            raise StateMachineError(f"connection {self.connection_id}: opened twice")
        self.opened_at = now
        policy = self.policy
        backend = policy.pick((), self.key, now)
        if backend is not None:
            self._begin_attempt(backend, now, out)
        elif policy.queue is None:
            self._close(Outcome.NO_BACKEND, now, out)
        else:
            self.deadline_at = now + policy.queue_timeout
            refused = policy.queue(self, now, out)
            if refused is not None:
                self._close(refused, now, out)
            else:
                self.state = _Q

    def handle_into(self, conn_input: ConnInput, now: float, out: list[Output]) -> None:
        """:meth:`handle`, appending to ``out`` (the owner's hot path)."""
        rule = TRANSITIONS.get((self.state, conn_input))
        if rule is None:
            raise StateMachineError(
                f"connection {self.connection_id}: can't handle {conn_input.name} "
                f"when state={self.state.name}"
            )
        rule(self, now, out)

    def touch(self, now: float) -> None:
        """Bytes moved: push the idle deadline back."""
        self.last_activity = now

    @property
    def deadline(self) -> float | None:
        """When this connection times out, if nothing happens before."""
        state = self.state
        if state is _C or state is _Q:
            return self.deadline_at
        if state is _CLOSED:
            return None
        return self.last_activity + self.policy.idle_timeout

    @property
    def timeout_input(self) -> ConnInput:
        """The input to send when :attr:`deadline` has passed."""
        if self.state is _C:
            return ConnInput.CONNECT_TIMEOUT
        if self.state is _Q:
            return ConnInput.QUEUE_TIMEOUT
        return ConnInput.IDLE_TIMEOUT

    # -- internals ---------------------------------------------------------------

    def _begin_attempt(self, backend: Backend, now: float, out: list[Output]) -> None:
        self.backend = backend
        self.attempt = attempt = self.attempt + 1
        self.state = _C
        policy = self.policy
        self.deadline_at = now + policy.connect_timeout
        policy.report(out, backend.address, _STARTED, now)
        out.append(connect_backend(self.connection_id, attempt, backend))

    def _end_attempt(self, now: float, out: list[Output], failure: bool = False) -> None:
        assert self.backend is not None
        address = self.backend.address
        report = self.policy.report
        report(out, address, _FINISHED, now)
        if failure:
            # The failure verdict follows "finished": it is judged against the
            # backend's *other* connections, so a backend that carries nothing
            # else goes straight to UNHEALTHY instead of draining an attempt
            # that has already ended.
            report(out, address, _FAILURE, now)

    def _close(self, outcome: Outcome, now: float, out: list[Output]) -> None:
        self.state = _CLOSED
        self.outcome = outcome
        connection_id = self.connection_id
        backend = self.backend
        out.append(close_connection(connection_id, outcome))
        out.append(
            connection_closed(
                now,
                connection_id,
                backend.address if backend is not None else None,
                outcome,
                self.attempt,
                self.opened_at,
                self.connected_at,
                self.tried,
            )
        )


# -- how a connection ends on the wire -------------------------------------------

RESET_OUTCOMES = frozenset(
    {
        Outcome.CLIENT_RESET,
        Outcome.BACKEND_RESET,
        Outcome.RESOURCE_EXHAUSTED,
        Outcome.REMOVED,
        Outcome.CUT,
        Outcome.IDLE_TIMEOUT,
    }
)
"""Outcomes whose close is passed on as a reset (RST, ``SO_LINGER`` 0) to the
sides still open, not an orderly FIN.

Every one of them ends a stream that neither end finished: a peer's reset, a
local failure, a cut at the removal deadline of a backend a reload removed
(``REMOVED``) or at the drain deadline of a shutdown (``CUT``), or the idle
timeout (``IDLE_TIMEOUT``: both ends were still open, each waiting for the
other). An L4 proxy cannot know where a raw stream's messages end, and a FIN
says "that was all of it": a client reading to EOF (a download, a dump, a
``COPY``) would take a truncated transfer for a complete one and exit 0. A
reset says "cut short", which every client library reports as an error. So
the proxy is not gentler than the failure it passes on, even when it cut the
stream itself, on purpose. Every other outcome ends with FIN: the stream
ended (``COMPLETED``), or nothing was carried yet (``NO_BACKEND``,
``CONNECT_FAILED``, ``REFUSED_SHUTTING_DOWN``)."""

_CC_ID, _CC_OUTCOME, _CC_RESET = setters(CloseConnection, "connection_id", "outcome", "reset")
_new = object.__new__


def close_connection(connection_id: int, outcome: Outcome) -> CloseConnection:
    """The ``CloseConnection`` for ``outcome``, ``reset`` by :data:`RESET_OUTCOMES`
    (a fast maker: see ``_events``)."""
    action: CloseConnection = _new(CloseConnection)
    _CC_ID(action, connection_id)
    _CC_OUTCOME(action, outcome)
    _CC_RESET(action, outcome in RESET_OUTCOMES)
    return action


# -- the rules -----------------------------------------------------------------

Rule = Callable[[Connection, float, list[Output]], None]


def _connect_ok(conn: Connection, now: float, out: list[Output]) -> None:
    assert conn.backend is not None
    conn.state = _E
    conn.connected_at = now
    conn.last_activity = now
    conn.policy.report(out, conn.backend.address, _SUCCESS, now)


def _connect_failure(timed_out: bool) -> Rule:
    """A failed attempt: say why (refused or timed out), then retry or give up."""

    def rule(conn: Connection, now: float, out: list[Output]) -> None:
        assert conn.backend is not None
        out.append(
            ConnectFailed(
                at=now,
                connection_id=conn.connection_id,
                attempt=conn.attempt,
                backend=conn.backend.address,
                timed_out=timed_out,
            )
        )
        _connect_failed(conn, now, out)

    return rule


def _connect_failed(conn: Connection, now: float, out: list[Output]) -> None:
    assert conn.backend is not None
    # The retry picks before this attempt's reports are applied: it reads the
    # snapshot as it was when the failure arrived (the failed backend is
    # excluded anyway).
    backend = None
    if conn.attempt <= conn.policy.connect_retries:
        tried = conn.tried = (*conn.tried, conn.backend.address)
        backend = conn.policy.pick(tried, conn.key, now)
    conn._end_attempt(now, out, failure=True)
    if backend is not None:
        conn._begin_attempt(backend, now, out)
    else:
        conn._close(Outcome.CONNECT_FAILED, now, out)


def _redispatch(conn: Connection, now: float, out: list[Output]) -> None:
    assert conn.backend is not None
    if conn.attempt > conn.policy.connect_retries:
        return  # no retry left: the attempt keeps waiting for its answer
    address = conn.backend.address
    tried = (*conn.tried, address)
    backend = conn.policy.pick(tried, conn.key, now)
    if backend is None:
        return  # nowhere else to go: keep waiting
    conn.tried = tried
    out.append(
        ConnectRedispatched(
            at=now, connection_id=conn.connection_id, attempt=conn.attempt, backend=address
        )
    )
    conn._end_attempt(now, out)  # no verdict: the backend never answered
    conn._begin_attempt(backend, now, out)


def _dequeue(conn: Connection, now: float, out: list[Output]) -> None:
    backend = conn.policy.pick((), conn.key, now)
    if backend is not None:
        conn._begin_attempt(backend, now, out)


def _refuse(outcome: Outcome) -> Rule:
    """A queued connection's end: it never had a backend, so no attempt ends."""

    def rule(conn: Connection, now: float, out: list[Output]) -> None:
        conn._close(outcome, now, out)

    return rule


def _abort(outcome: Outcome) -> Rule:
    def rule(conn: Connection, now: float, out: list[Output]) -> None:
        # The close first, then what the attempt's end changed (a draining
        # backend's last connection making it UNHEALTHY): the change follows
        # its cause, the connection's end, in the outputs too.
        conn._close(outcome, now, out)
        conn._end_attempt(now, out)

    return rule


def _half_close(side_done: ConnState, shut: Side) -> Rule:
    def rule(conn: Connection, now: float, out: list[Output]) -> None:
        conn.state = side_done
        conn.last_activity = now
        out.append(shutdown_write(conn.connection_id, shut))

    return rule


_Q, _C, _E = ConnState.QUEUED, ConnState.CONNECTING, ConnState.ESTABLISHED
_CD, _BD = ConnState.CLIENT_DONE, ConnState.BACKEND_DONE
_I = ConnInput
# Enum members read through the class cost ~80 ns each (EnumType lookup);
# the hot paths read these module aliases instead.
_CLOSED = ConnState.CLOSED
_STARTED, _FINISHED = HealthInput.CONNECTION_STARTED, HealthInput.CONNECTION_FINISHED
_SUCCESS, _FAILURE = HealthInput.PASSIVE_SUCCESS, HealthInput.PASSIVE_FAILURE

TRANSITIONS: dict[tuple[ConnState, ConnInput], Rule] = {
    (_Q, _I.DEQUEUE): _dequeue,
    (_Q, _I.QUEUE_TIMEOUT): _refuse(Outcome.QUEUE_TIMEOUT),
    (_Q, _I.CLIENT_ERROR): _refuse(Outcome.CLIENT_RESET),
    (_Q, _I.CUT): _refuse(Outcome.CUT),
    (_Q, _I.RESOURCE_EXHAUSTED): _refuse(Outcome.RESOURCE_EXHAUSTED),
    (_C, _I.CONNECT_OK): _connect_ok,
    (_C, _I.CONNECT_FAILED): _connect_failure(timed_out=False),
    (_C, _I.CONNECT_TIMEOUT): _connect_failure(timed_out=True),
    (_C, _I.CLIENT_ERROR): _abort(Outcome.CLIENT_RESET),
    (_C, _I.CUT): _abort(Outcome.CUT),
    (_C, _I.RESOURCE_EXHAUSTED): _abort(Outcome.RESOURCE_EXHAUSTED),
    (_C, _I.REMOVED): _abort(Outcome.REMOVED),
    (_C, _I.REDISPATCH): _redispatch,
    (_E, _I.CLIENT_EOF): _half_close(_CD, Side.BACKEND),
    (_E, _I.BACKEND_EOF): _half_close(_BD, Side.CLIENT),
    (_CD, _I.BACKEND_EOF): _abort(Outcome.COMPLETED),
    (_BD, _I.CLIENT_EOF): _abort(Outcome.COMPLETED),
}
"""Every legal ``(state, input)`` pair and the rule it runs."""

for _state in (_E, _CD, _BD):
    TRANSITIONS[(_state, _I.CLIENT_ERROR)] = _abort(Outcome.CLIENT_RESET)
    TRANSITIONS[(_state, _I.BACKEND_ERROR)] = _abort(Outcome.BACKEND_RESET)
    TRANSITIONS[(_state, _I.IDLE_TIMEOUT)] = _abort(Outcome.IDLE_TIMEOUT)
    TRANSITIONS[(_state, _I.CUT)] = _abort(Outcome.CUT)
    TRANSITIONS[(_state, _I.RESOURCE_EXHAUSTED)] = _abort(Outcome.RESOURCE_EXHAUSTED)
    TRANSITIONS[(_state, _I.REMOVED)] = _abort(Outcome.REMOVED)
