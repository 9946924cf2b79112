"""What the core tells its driver: actions to carry out and events to record.

The core never does I/O. Every entry point returns a list of outputs:

* **actions** are orders: connect this client to that backend, shut down the
  write side of the client, close the connection, probe a backend, stop
  accepting. The driver carries each out and feeds the result back.
* **events** are facts for logs, metrics and the simulator's invariant
  checks: a backend changed state, a snapshot was published, a connection
  ended with an outcome, shutdown began or ended, an operator changed a
  backend's admin state or weight, a reload was applied, a removed backend
  was forgotten.

All are frozen, slotted, keyword-only dataclasses, one class per kind. The
four made for every connection also have a positional maker
(:func:`connect_backend`, ...): a frozen dataclass's ``__init__`` goes
through ``object.__setattr__`` once per field, which measured 1.2 us for
``ConnectionClosed``; the makers store through the slot descriptors
directly, 0.5 us, and build the very same frozen object. The maker of
``CloseConnection`` lives in ``_connection``, beside the rule that decides
its ``reset``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._admin import AdminState
from ._backend import Backend
from ._health import HealthInput, HealthState
from ._probe import CONNECT_ONLY, ProbeCheck

__all__ = [
    "Action",
    "AdminStateChanged",
    "BackendEjected",
    "BackendForgotten",
    "BackendReturned",
    "BackendStateChanged",
    "CloseConnection",
    "ConnectBackend",
    "ConnectFailed",
    "ConnectRedispatched",
    "ConnectionClosed",
    "ConnectionQueued",
    "Event",
    "FirstByteTimeout",
    "HealthReport",
    "MaxConnectionsChanged",
    "Outcome",
    "Output",
    "ProbeBackend",
    "Reconfigured",
    "ShutdownFinished",
    "ShutdownStarted",
    "ShutdownWrite",
    "Side",
    "SnapshotPublished",
    "StopAccepting",
    "WeightChanged",
]


class Side(enum.Enum):
    CLIENT = "client"
    BACKEND = "backend"


class Outcome(enum.Enum):
    """How a client connection ended; every accepted connection gets exactly one."""

    # Identity hashing in C (see _health.HealthState): every close looks its
    # outcome up in RESET_OUTCOMES, and Enum's own __hash__ is Python code.
    __hash__ = object.__hash__

    COMPLETED = "completed"
    """Both sides sent EOF: the normal end."""
    NO_BACKEND = "no_backend"
    """Refused at once: no backend was eligible."""
    CONNECT_FAILED = "connect_failed"
    """Every attempt (first try plus retries) was refused or timed out."""
    CLIENT_RESET = "client_reset"
    BACKEND_RESET = "backend_reset"
    IDLE_TIMEOUT = "idle_timeout"
    CUT = "cut"
    """Still open at the drain deadline of a shutdown, or at a second shutdown request."""
    REFUSED_SHUTTING_DOWN = "refused_shutting_down"
    """Arrived after shutdown began (a race with closing the listener)."""
    RESOURCE_EXHAUSTED = "resource_exhausted"
    """The proxy ran out of a resource of its own for this connection (file
    descriptors, socket memory): HAProxy's termination code ``R``. No backend
    is blamed."""
    REMOVED = "removed"
    """Its backend was removed by a reload and the connection was still open
    ``[timeouts] removal`` seconds later: cut, with a reset."""
    QUEUE_TIMEOUT = "queue_timeout"
    """Waited ``[balancer] queue_timeout`` in the queue for a backend with room
    (every eligible one at its ``max_connections``) and was refused: HAProxy's
    termination code ``sQ``."""
    QUEUE_FULL = "queue_full"
    """Refused at once: every eligible backend was at its ``max_connections``
    and ``[balancer] queue_size`` clients were waiting already."""


# -- actions -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectBackend:
    """Open a connection to ``backend`` for client connection ``connection_id``.

    ``attempt`` counts from 1. Report the result with the same attempt number.
    A later ``ConnectBackend`` for the same connection, or its
    ``CloseConnection``, abandons this attempt: the driver cancels the connect
    and closes the socket if it still completes; the core ignores a result
    for an abandoned attempt (the call returns no outputs).
    """

    connection_id: int
    attempt: int
    backend: Backend


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownWrite:
    """Send EOF to ``side`` (``shutdown(SHUT_WR)``); the other direction keeps flowing."""

    connection_id: int
    side: Side


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseConnection:
    """Close both sockets of the connection (and any pending connect attempt)."""

    connection_id: int
    outcome: Outcome
    reset: bool
    """Close with RST (``SO_LINGER`` 0) rather than FIN. Which outcomes reset
    is the core's rule: ``RESET_OUTCOMES`` in ``_connection``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeBackend:
    """Check ``backend`` within ``timeout`` seconds and report the result.

    The check is a TCP connect, then, as ``check`` says, a write of its
    ``send`` and a read of the reply until ``judge_reply`` gives a verdict
    (see ``_probe``): all of it within ``timeout``.
    """

    backend: Backend
    timeout: float
    check: ProbeCheck = CONNECT_ONLY


@dataclass(frozen=True, slots=True, kw_only=True)
class StopAccepting:
    """Close the listening socket: shutdown has begun."""


Action = ConnectBackend | ShutdownWrite | CloseConnection | ProbeBackend | StopAccepting


# -- events ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthReport:
    """A connection attempt's report on its backend: started, finished, or a verdict.

    The core applies it to the control plane itself, then passes it on, so a
    driver can count active connections per backend without asking.
    """

    address: str
    input: HealthInput

    @staticmethod
    def of(address: str, health_input: HealthInput) -> HealthReport:
        """The shared instance for this pair: reports are values, so the hot
        path reuses them instead of allocating three per connection."""
        key = (address, health_input)
        report = _REPORTS.get(key)
        if report is None:
            report = _REPORTS[key] = HealthReport(address=address, input=health_input)
        return report


_REPORTS: dict[tuple[str, HealthInput], HealthReport] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendStateChanged:
    at: float
    address: str
    old: HealthState
    new: HealthState
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotPublished:
    at: float
    version: int
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PanicChanged:
    """Panic mode began or ended (``[balancer] panic_threshold``).

    In panic, too few primary backends are healthy (``healthy`` of ``total``,
    below the threshold), so new connections are spread over all ``total``,
    healthy or not, rather than piling onto the few left (Envoy's panic).
    """

    at: float
    panic: bool
    healthy: int
    total: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendEjected:
    """Outlier ejection took a backend out of rotation until ``until`` (``[outlier]``).

    Its health state is untouched (it is not unhealthy, and probes do not
    bring it back): it leaves the snapshot, which follows this event, and
    its connections already running are left alone. ``ejections`` counts
    its ejections in a row (this one included): this one lasts that many
    times ``base_ejection_time``, at most ``max_ejection_time``.
    """

    at: float
    address: str
    until: float
    reason: str
    ejections: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendReturned:
    """An ejected backend's time is up: it is back in rotation if its health
    and admin state allow (the snapshot follows if that changed it)."""

    at: float
    address: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminStateChanged:
    """An operator changed a backend's admin state (see ``_admin``)."""

    at: float
    address: str
    old: AdminState
    new: AdminState


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightChanged:
    """A backend's weight changed, by an operator or a reload."""

    at: float
    address: str
    old: int
    new: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MaxConnectionsChanged:
    """An operator gave a backend a new ``max_connections`` (0: no limit), for the
    next picks; a reload's is in its ``Reconfigured``. Connections open stay."""

    at: float
    address: str
    old: int
    new: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Reconfigured:
    """A reload was applied: always the first output of ``ProxyCore.reconfigure``.

    Addresses are in config order (``removed`` in the old config's).
    ``changed`` names every configuration key whose value changed, as a
    dotted path (``"balancer.algorithm"``), then each changed key of a backend
    kept, but its weight (``"backends[10.0.0.1:80].max_connections"``); the
    other three fields describe the backends list. A reload that changes
    nothing still says so, with every tuple empty.
    """

    at: float
    added: tuple[str, ...]
    removed: tuple[str, ...]
    reweighted: tuple[str, ...]
    changed: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendForgotten:
    """A backend a reload removed carries nothing any more and is gone.

    It left the snapshot at the reload; this comes when its last connection
    ended (or was cut with ``Outcome.REMOVED``), at once if it had none. From
    now on the core knows nothing of it: it is gone from ``statistics()``,
    and a driver may drop its per-backend series.
    """

    at: float
    address: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed:
    """One client connection's end, for the access log and the outcome counters."""

    at: float
    connection_id: int
    backend: str | None
    """The backend of the last attempt, or None if none was tried."""
    outcome: Outcome
    attempts: int
    opened_at: float
    connected_at: float | None
    tried: tuple[str, ...] = ()
    """The backends of the attempts before the last, in order (retries)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectFailed:
    """One connect attempt failed: refused (or unreachable), or timed out.

    Its ``PASSIVE_FAILURE`` health report follows; this says why, for the
    operator (Envoy's ``upstream_cx_connect_fail`` and ``_timeout``).
    """

    at: float
    connection_id: int
    attempt: int
    backend: str
    timed_out: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectRedispatched:
    """Connect ``attempt`` on ``backend`` was given up with no verdict: the
    backend was judged bad while it was pending (``[outlier] redispatch_pending``).

    The connection's next attempt, on another backend, is the ``ConnectBackend``
    that follows (which abandons this one for the driver); the backend's
    ``CONNECTION_FINISHED`` report comes between, and no failure verdict.
    """

    at: float
    connection_id: int
    attempt: int
    backend: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FirstByteTimeout:
    """``backend`` sent nothing within ``[outlier] first_byte_timeout`` of the
    client's first bytes on ``connection_id``: a failure verdict on it for
    outlier ejection, as a reset is. The connection runs on, and its end is
    no second verdict."""

    at: float
    connection_id: int
    backend: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionQueued:
    """A new client waits: every eligible backend is at its ``max_connections``.

    It is the ``queued``-th waiting (this one included), and is refused with
    ``Outcome.QUEUE_TIMEOUT`` at ``deadline`` unless a backend has room
    before. Its first ``ConnectBackend`` is its way out of the queue; clients
    leave it in the order they came.
    """

    at: float
    connection_id: int
    queued: int
    deadline: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownStarted:
    at: float
    in_flight: int
    deadline: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownFinished:
    at: float
    cut: int
    """Connections still open at the drain deadline, closed by force."""


Event = (
    HealthReport
    | BackendStateChanged
    | SnapshotPublished
    | PanicChanged
    | ConnectionClosed
    | ConnectFailed
    | ConnectRedispatched
    | ConnectionQueued
    | FirstByteTimeout
    | ShutdownStarted
    | ShutdownFinished
    | AdminStateChanged
    | WeightChanged
    | MaxConnectionsChanged
    | Reconfigured
    | BackendForgotten
    | BackendEjected
    | BackendReturned
)
Output = Action | Event


# -- makers for the per-connection outputs (see the module docstring) ---------------

_new = object.__new__


def setters(cls: type, *names: str) -> tuple[Callable[[object, Any], None], ...]:
    """The slot setters of ``cls``'s fields ``names``, for a maker (see the module docstring)."""
    return tuple(cls.__dict__[name].__set__ for name in names)


_CB_ID, _CB_ATTEMPT, _CB_BACKEND = setters(ConnectBackend, "connection_id", "attempt", "backend")
_SW_ID, _SW_SIDE = setters(ShutdownWrite, "connection_id", "side")
_CL_AT, _CL_ID, _CL_BACKEND, _CL_OUTCOME, _CL_ATTEMPTS, _CL_OPENED, _CL_CONNECTED, _CL_TRIED = (
    setters(
        ConnectionClosed,
        "at",
        "connection_id",
        "backend",
        "outcome",
        "attempts",
        "opened_at",
        "connected_at",
        "tried",
    )
)


def connect_backend(connection_id: int, attempt: int, backend: Backend) -> ConnectBackend:
    action: ConnectBackend = _new(ConnectBackend)
    _CB_ID(action, connection_id)
    _CB_ATTEMPT(action, attempt)
    _CB_BACKEND(action, backend)
    return action


def shutdown_write(connection_id: int, side: Side) -> ShutdownWrite:
    action: ShutdownWrite = _new(ShutdownWrite)
    _SW_ID(action, connection_id)
    _SW_SIDE(action, side)
    return action


def connection_closed(
    at: float,
    connection_id: int,
    backend: str | None,
    outcome: Outcome,
    attempts: int,
    opened_at: float,
    connected_at: float | None,
    tried: tuple[str, ...],
) -> ConnectionClosed:
    event: ConnectionClosed = _new(ConnectionClosed)
    _CL_AT(event, at)
    _CL_ID(event, connection_id)
    _CL_BACKEND(event, backend)
    _CL_OUTCOME(event, outcome)
    _CL_ATTEMPTS(event, attempts)
    _CL_OPENED(event, opened_at)
    _CL_CONNECTED(event, connected_at)
    _CL_TRIED(event, tried)
    return event
