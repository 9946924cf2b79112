"""The whole load balancer as one sans-I/O object, for both drivers.

:class:`ProxyCore` wires the pieces together: the control plane (health and
snapshots), the configured balancer, one :class:`Connection` machine per
client connection, the process lifecycle, and a single timer for connect
timeouts, idle timeouts, probes and the drain deadline. The real daemon
(``loble.io``) and the simulator (``loble.sim``) drive this same object, so
every decision they make is made here:

* call :meth:`start` once, then :meth:`accept` for each client;
* report what the network did with :meth:`connected`,
  :meth:`connect_failed`, :meth:`client_eof`, :meth:`backend_eof`,
  :meth:`client_error`, :meth:`backend_error`, :meth:`resource_exhausted`,
  :meth:`touch` (bytes moved)
  and :meth:`probe_result`;
* ask :meth:`next_deadline` and call :meth:`handle_timer` when it passes
  (:meth:`wake_bound` says when asking can be skipped);
* call :meth:`shutdown` on SIGTERM/SIGINT; stop when :attr:`stopped`;
* pass on an operator's requests with :meth:`admin`, :meth:`set_weight` and
  :meth:`set_max_connections`,
  and a reload's new, already validated configuration with
  :meth:`reconfigure` (ask :meth:`next_deadline` and :meth:`timer_lead`
  again after it: the timings may have changed);
* read :meth:`statistics` for metrics and checks;
* with ``[outlier] first_byte_timeout`` set (:attr:`watches_first_byte`),
  report each connection's first bytes each way with :meth:`client_sent`
  and :meth:`backend_sent`.

With a ``[[backends]] max_connections`` set, a backend at its limit is
skipped, and a client for whom every eligible backend is at its limit waits
in one bounded FIFO queue (``[balancer] queue_size``) until one has room or
its ``queue_timeout`` passes (HAProxy's server ``maxconn`` and ``timeout
queue``): :meth:`accept` then returns a ``ConnectionQueued`` and no action,
and the client's ``ConnectBackend`` comes later, from whichever call freed
the room (a connection's end, a backend's return, a reload). The driver holds
the client's socket meanwhile and reads nothing from it.

Each call returns a list of outputs: actions to carry out and events to log,
in order. Reports for a connection the core has already closed, or for an
attempt it has given up on, are stale and return nothing: an empty list,
except :meth:`connected`, which returns ``None`` so the driver knows to close
the socket it just connected.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Collection
from dataclasses import fields
from typing import cast

from ._admin import AdminInput
from ._backend import Backend, Snapshot
from ._balancers import Balancer, KeyedBalancer, make_balancer
from ._config import MAX_CONNECTIONS, WEIGHT, Config, probe_checks
from ._connection import Connection, ConnectionPolicy, ConnInput, ConnState, close_connection
from ._control import ControlPlane
from ._errors import LobleError
from ._events import (
    ConnectionClosed,
    ConnectionQueued,
    FirstByteTimeout,
    MaxConnectionsChanged,
    Outcome,
    Output,
    Reconfigured,
)
from ._hashing import hash_key
from ._outlier import Ejection, OutlierDetector
from ._process import ProcessInput, ProcessLifecycle, ProcessState, ProcessStep
from ._statistics import BackendStatistics, CoreStatistics
from ._timers import TimerQueue

__all__ = ["ProxyCore"]

# Module aliases for the enum members the hot paths test (a class attribute
# read of an enum member costs ~80 ns in CPython 3.11, a global ~8 ns).
_CONNECTING, _CLOSED, _QUEUED = ConnState.CONNECTING, ConnState.CLOSED, ConnState.QUEUED
_RUNNING, _DRAINING = ProcessState.RUNNING, ProcessState.DRAINING
_CONNECT_OK, _CONNECT_FAILED = ConnInput.CONNECT_OK, ConnInput.CONNECT_FAILED
_CLIENT_EOF, _BACKEND_EOF = ConnInput.CLIENT_EOF, ConnInput.BACKEND_EOF
_CLIENT_ERROR, _BACKEND_ERROR = ConnInput.CLIENT_ERROR, ConnInput.BACKEND_ERROR
_REDISPATCH, _DEQUEUE = ConnInput.REDISPATCH, ConnInput.DEQUEUE
_ESTABLISHED, _CLIENT_DONE = ConnState.ESTABLISHED, ConnState.CLIENT_DONE
_VERDICTS: dict[Outcome | None, bool] = {Outcome.BACKEND_RESET: True, Outcome.COMPLETED: False}
"""The outcomes that are a verdict on the backend for outlier ejection: failed or not."""


def _deadline_order(entry: tuple[float, int, Connection]) -> tuple[float, int]:
    return entry[0], entry[1]


class ProxyCore:
    def __init__(
        self,
        config: Config,
        rng: random.Random,
        *,
        balancer: Balancer | None = None,
        health_reports: bool = True,
    ) -> None:
        self.config = config
        self._rng = rng
        self.health_reports = health_reports
        """Whether connections' health reports are outputs (``HealthReport``).

        Each connection makes three or four (its attempt's start and end, the
        verdict) and the core applies each as it is made. They are facts a
        driver can read from the actions and events around them: a
        ``ConnectBackend`` starts an attempt, a ``connected`` call that is not
        stale is a success, a ``ConnectFailed`` ends its attempt with a
        failure, a ``ConnectionClosed`` ends the attempt still open. A driver
        that reads them so (the daemon, the simulator's monitor) passes False
        and the core makes three output objects fewer per connection;
        everything else, order included, is the same."""
        self.control = ControlPlane(
            (Backend(address=b.address, weight=b.weight, backup=b.backup) for b in config.backends),
            config.health,
            rng=rng,
            checks=probe_checks(config),
        )
        self.control.panic_threshold = config.balancer.panic_threshold
        self.control.redispatch = config.outlier.redispatch_pending
        self.outlier = OutlierDetector(config.outlier, may_eject=self.control.may_eject)
        """Outlier ejection's tallies and decisions (``_outlier``)."""
        self._judging = config.outlier.detecting
        """Whether connections' ends are verdicts (``[outlier]`` on): the one
        test the hot path pays for the feature when it is off."""
        self._first_byte_due: dict[int, float] = {}
        """Connections whose backend has not answered their client's first bytes, and by when."""
        self._first_byte_heap: list[tuple[float, int]] = []
        self._outlier_due: float | None = None
        """The earliest of the detector's deadline and the first-byte watches'
        (perhaps early: a stale watch), kept in one field for next_deadline."""
        self._first_byte_seen: set[int] = set()
        """Connections whose backend sent a byte, or that were judged by its absence."""
        self._first_byte_judged: set[int] = set()
        """Connections judged by their backend's silence (their end is no verdict)."""
        self.balancer = balancer or _balancer_for(config, rng)
        self._keyed = getattr(self.balancer, "keyed", False)
        """Whether the balancer picks by the client's key (``KeyedBalancer``)."""
        self.process = ProcessLifecycle(config.timeouts.drain)
        self.connections: dict[int, Connection] = {}
        self._hash_port = config.balancer.hash_key == "address_port"
        self._slow_start = config.balancer.slow_start
        self._slow_start_floor = config.balancer.slow_start_floor
        self._limits = _limits_of(config)
        """Backends with a ``max_connections``, and it (none: nothing is ever full)."""
        self._waiting: dict[int, Connection] = {}
        """Queued connections (state ``QUEUED``), by id."""
        self._queue: deque[int] = deque()
        """Their ids in arrival order; ids no longer in :attr:`_waiting` are stale."""
        self._policy = self._make_policy(config)
        self._removal_deadlines: dict[str, float] = {}
        """Removed backends whose connections are cut at a deadline, and when."""
        # Connection deadlines, one lane per kind (see _timers): connect, idle, queue.
        self._timers = TimerQueue(lanes=3)
        self._next_connection_id = 1
        self.cut_count = 0
        self.touch_resolution = self._policy.touch_resolution
        """Seconds: drivers tell the core of a connection's activity
        (:meth:`touch`) at most once per this many seconds, the smaller of a
        millisecond and 1% of the idle timeout. An idle timeout can so end a
        connection at most this much before a full idle timeout has passed
        since its last byte (see ``_connection.TOUCH_RESOLUTION``)."""
        self._lead = self.timer_lead()
        """:meth:`timer_lead` with shutdown possible, for :meth:`wake_bound`."""

    # -- reading -------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self.control.snapshot

    @property
    def keyed(self) -> bool:
        """Whether the balancer picks by the client: then :meth:`accept` wants its address."""
        return self._keyed

    @property
    def in_flight(self) -> int:
        return len(self.connections)

    @property
    def queued(self) -> int:
        """Clients waiting for a backend with room (part of :attr:`in_flight`)."""
        return len(self._waiting)

    @property
    def accepting(self) -> bool:
        return self.process.accepting

    @property
    def stopped(self) -> bool:
        return self.process.state is ProcessState.STOPPED

    def statistics(self) -> CoreStatistics:
        """The core now, as an immutable value (built on demand: not for a hot loop)."""
        control = self.control
        snapshot = control.snapshot
        admin, since, probed = control.admin, control.since, control.probed
        removing, ejected = control.removing, control.ejected
        backends = []
        for address, backend in control.backends.items():
            health = control.health(address)
            changed = since.get(address)
            probe = probed.get(address)
            backends.append(
                BackendStatistics(
                    address=address,
                    weight=backend.weight,
                    state=health.state,
                    active_connections=health.active_connections,
                    admin=admin[address],
                    since=None if changed is None else changed[0],
                    reason="" if changed is None else changed[1],
                    last_probe_at=None if probe is None else probe.at,
                    last_probe_ok=None if probe is None else probe.ok,
                    peak_connections=health.peak_connections,
                    removing=address in removing,
                    ejected_until=ejected.get(address),
                    max_connections=self._limits.get(address, 0),
                )
            )
        return CoreStatistics(
            process=self.process.state,
            accepting=self.process.accepting,
            in_flight=len(self.connections),
            open_connection_ids=tuple(sorted(self.connections)),
            snapshot_version=snapshot.version,
            eligible=snapshot.addresses,
            backends=tuple(backends),
            cut=self.cut_count,
            queued=len(self._waiting),
        )

    def timer_lead(self, *, shutdown_possible: bool = True) -> float:
        """The soonest after any call that a timer the call files can fall due.

        A connect attempt files its connect timeout, activity the idle
        timeout, a probe its interval, a shutdown the drain deadline. While
        a driver's next wake-up is already sooner than ``now`` plus this lead,
        no call can bring it closer, so :meth:`next_deadline` need not be
        asked after every call (both drivers use this on their hot paths). A
        driver that will never call :meth:`shutdown` may leave the drain out.
        """
        timeouts, health = self.config.timeouts, self.config.health
        # A probe's interval is at its shortest by the jitter's share.
        leads = [timeouts.connect, timeouts.idle, health.probe_interval * (1 - health.probe_jitter)]
        if shutdown_possible:
            leads.append(timeouts.drain)
        outlier = self.config.outlier
        if outlier.detecting:
            # A verdict may eject: its return is due base_ejection_time on at
            # the soonest. (The interval's tick is filed by start, reconfigure
            # and handle_timer only, after which a driver asks again anyway.)
            leads.append(outlier.base_ejection_time)
        if outlier.first_byte_timeout:
            leads.append(outlier.first_byte_timeout)  # client_sent files one
        if self._limits:
            leads.append(self.config.balancer.queue_timeout)  # accept may queue
        return min(leads)

    def wake_bound(self, now: float, wake: float | None, *, lead: float | None = None) -> float:
        """Until when a driver whose next wake-up is ``wake`` need not ask again.

        After any core call at ``now``, no timer it filed is due before
        ``now + lead`` (``lead`` is :meth:`timer_lead`, with shutdown
        possible, unless given). So a driver that asked :meth:`next_deadline`
        and got ``wake`` (None: nothing due) need not ask again after calls
        made before the returned time, ``min(wake, now + lead)``: none of
        them can bring its wake-up closer. After :meth:`handle_timer` it must
        ask again (that call re-files timers anywhere after ``now``).
        """
        bound = now + (self._lead if lead is None else lead)
        return wake if wake is not None and wake < bound else bound

    # -- lifecycle -------------------------------------------------------------------

    def start(self, now: float) -> list[Output]:
        self.outlier.fleet = len(self.control.backends)
        self.outlier.start(now)
        self._refresh_outlier_due()
        return list(self.control.start(now))

    def accept(self, now: float, client: tuple[str, int] | None = None) -> tuple[int, list[Output]]:
        """A client connected: open its connection and pick a backend.

        ``client`` is its ``(address, port)``, the key of the hashing
        balancers (``[balancer] hash_key``); the others never read it.
        """
        connection_id = self._next_connection_id
        self._next_connection_id = connection_id + 1
        if self.process.state is not _RUNNING:
            closed = ConnectionClosed(
                at=now,
                connection_id=connection_id,
                backend=None,
                outcome=Outcome.REFUSED_SHUTTING_DOWN,
                attempts=0,
                opened_at=now,
                connected_at=None,
            )
            # Nothing was carried: an orderly close (see RESET_OUTCOMES).
            return connection_id, [close_connection(connection_id, closed.outcome), closed]
        connection = Connection(connection_id, self._policy)
        if client is not None and self._keyed:
            host, port = client
            connection.key = hash_key(f"{host}:{port}" if self._hash_port else host)
        out: list[Output] = []
        connection.open_into(now, out)
        state = connection.state
        if state is _CONNECTING:
            self.connections[connection_id] = connection
            self._file_timer(connection, connection.deadline_at, 0)  # it has no entry yet
        elif state is _QUEUED:
            self.connections[connection_id] = connection
            self._file_timer(connection, connection.deadline_at, 2)
        # else: refused, closed at once; never in flight (the process is running)
        return connection_id, out

    def shutdown(self, now: float) -> list[Output]:
        """SIGTERM/SIGINT: stop accepting and drain (a second call cuts at once)."""
        return self._carry_out(self.process.handle(ProcessInput.SHUTDOWN, now, self.in_flight), now)

    # -- connection reports ------------------------------------------------------------

    def connected(self, connection_id: int, attempt: int, now: float) -> list[Output] | None:
        """The backend accepted ``attempt``: the connection is established.

        Returns None when the report is stale (the attempt was abandoned, or
        the connection is gone): the driver then closes the socket it got.
        A live report returns its outputs, possibly none.
        """
        connection = self._live_attempt(connection_id, attempt)
        if connection is None:
            return None
        out: list[Output] = []
        connection.handle_into(_CONNECT_OK, now, out)
        # The live timer entry is the connect deadline, long before the idle
        # deadline it would only be re-filed to: replace it now.
        self._file_timer(connection, now + self._policy.idle_timeout, 1)
        return out

    def connect_failed(self, connection_id: int, attempt: int, now: float) -> list[Output]:
        out = self._attempt_input(connection_id, attempt, _CONNECT_FAILED, now)
        if self.control.judged_bad:
            self._redispatch(now, out)
        return out

    def client_eof(self, connection_id: int, now: float) -> list[Output]:
        return self._input(connection_id, _CLIENT_EOF, now)

    def backend_eof(self, connection_id: int, now: float) -> list[Output]:
        return self._input(connection_id, _BACKEND_EOF, now)

    def client_error(self, connection_id: int, now: float) -> list[Output]:
        return self._input(connection_id, _CLIENT_ERROR, now)

    def backend_error(self, connection_id: int, now: float) -> list[Output]:
        return self._input(connection_id, _BACKEND_ERROR, now)

    def resource_exhausted(self, connection_id: int, now: float) -> list[Output]:
        """The driver could not go on with this connection for lack of a local
        resource (``EMFILE``/``ENFILE``, ``ENOBUFS``/``ENOMEM`` making a
        socket): end it with outcome
        ``RESOURCE_EXHAUSTED`` and no verdict on the backend, which did
        nothing wrong. A pending connect attempt is abandoned."""
        return self._input(connection_id, ConnInput.RESOURCE_EXHAUSTED, now)

    def touch(self, connection_id: int, now: float) -> None:
        connection = self.connections.get(connection_id)
        if connection is not None:
            connection.touch(now)

    def probe_result(self, address: str, ok: bool, now: float) -> list[Output]:
        out: list[Output] = list(self.control.probe_result(address, ok, now))
        if self.control.judged_bad:
            self._redispatch(now, out)
        if self._waiting:
            self._serve_queue(now, out)  # a backend back in rotation has room
        return out

    # -- the first-byte timeout ([outlier] first_byte_timeout) ---------------------

    @property
    def watches_first_byte(self) -> bool:
        """Whether :meth:`client_sent` and :meth:`backend_sent` matter (else a
        driver need not call them: they do nothing)."""
        return bool(self.config.outlier.first_byte_timeout)

    def client_sent(self, connection_id: int, now: float) -> None:
        """The client's first bytes were passed to the backend (later calls count nothing).

        Unless the backend has sent a byte already (a protocol where the
        server speaks first), it must send one within ``[outlier]
        first_byte_timeout`` or that counts as a failure of the backend: a
        verdict for outlier ejection, as a reset is. The connection is left
        alone; its end is then no second verdict.
        """
        timeout = self.config.outlier.first_byte_timeout
        if not timeout or connection_id in self._first_byte_due:
            return
        connection = self.connections.get(connection_id)
        if (
            connection is None
            or connection.connected_at is None
            or connection_id in self._first_byte_seen
        ):
            return
        due = now + timeout
        self._first_byte_due[connection_id] = due
        heapq.heappush(self._first_byte_heap, (due, connection_id))
        self._refresh_outlier_due()

    def backend_sent(self, connection_id: int, now: float) -> None:
        """The backend's first bytes for this connection arrived (later calls count nothing)."""
        if not self.config.outlier.first_byte_timeout or connection_id not in self.connections:
            return
        self._first_byte_due.pop(connection_id, None)
        self._first_byte_seen.add(connection_id)

    # -- the operator and reloads ----------------------------------------------------------

    def admin(self, address: str, admin_input: AdminInput, now: float) -> list[Output]:
        """An operator's request on one backend (drain, undrain, maintenance, ready).

        Returns an ``AdminStateChanged`` if it changed the admin state, then a
        ``SnapshotPublished`` if that changed who takes new connections. An
        unknown backend, one a reload removed, or a request the admin table
        has no row for (``UNDRAIN`` in ``MAINT``) raises :class:`LobleError`
        with one line for the operator.
        """
        out: list[Output] = list(self.control.set_admin(address, admin_input, now))
        if self._waiting:
            self._serve_queue(now, out)
        return out

    def set_weight(self, address: str, weight: int, now: float) -> list[Output]:
        """An operator's new weight for one backend, for new connections.

        The bounds are a ``[[backends]] weight``'s; out of them, or for an
        unknown backend, :class:`LobleError` with one line. Returns a
        ``WeightChanged`` if it changed, then a ``SnapshotPublished`` if the
        backend is in the snapshot (the balancers read weights from it).
        """
        problem = WEIGHT(weight)
        if problem is not None:
            raise LobleError(f"backend {address}: weight {weight!r} {problem}")
        return list(self.control.set_weight(address, weight, now))

    def set_max_connections(self, address: str, limit: int, now: float) -> list[Output]:
        """An operator's new ``max_connections`` for one backend (0: none), for
        the next picks (HAProxy's ``set maxconn server``); a reload sets the
        configured one again, as it does a weight.

        The bounds are a ``[[backends]] max_connections``'s; out of them, or
        for an unknown backend, :class:`LobleError` with one line. Returns a
        ``MaxConnectionsChanged`` if it changed, then whatever the room it
        made started (the queue's clients' ``ConnectBackend``).
        """
        problem = MAX_CONNECTIONS(limit)
        if problem is not None:
            raise LobleError(f"backend {address}: max_connections {limit!r} {problem}")
        self.control.require(address)
        limits = self._limits
        old = limits.get(address, 0)
        if limit == old:
            return []
        if limit:
            limits[address] = limit
        else:
            del limits[address]
        if bool(limits) != bool(self._policy.queue):  # the first limit, or the last gone
            self._policy = self._make_policy(self.config)
            self._lead = self.timer_lead()
        out: list[Output] = [MaxConnectionsChanged(at=now, address=address, old=old, new=limit)]
        if self._waiting:
            self._serve_queue(now, out)
        return out

    def reconfigure(self, config: Config, now: float) -> list[Output]:
        """Apply a reload: a new, already validated configuration, as a diff.

        Added backends join (with ``[health] active``, after their probes);
        removed ones leave the snapshot at once, their connections run on (cut
        with ``Outcome.REMOVED`` after ``[timeouts] removal`` seconds, if set)
        and they are forgotten when the last one ends. Weights, the algorithm,
        thresholds, timeouts, retries and probe settings apply to new
        connections and the next probes; connections open now keep the
        timeouts and retries they started with. Admin states survive. The
        listener address and the runtime, metrics, logging and admin sections
        are the driver's to apply: the core records them in :attr:`config`.

        The first output is always a ``Reconfigured`` saying what changed;
        then weight changes, backends forgotten at once, the new snapshot.
        """
        old = self.config
        changed = _changed_keys(old, config)
        self.control.panic_threshold = config.balancer.panic_threshold
        self.control.redispatch = config.outlier.redispatch_pending
        added, removed, reweighted, events = self.control.reconfigure(
            (Backend(address=b.address, weight=b.weight, backup=b.backup) for b in config.backends),
            config.health,
            now,
            probe_checks(config),
        )
        self.config = config
        if _table_of(config) != _table_of(old):
            self.balancer = _balancer_for(config, self._rng)
            self._keyed = getattr(self.balancer, "keyed", False)
        self._hash_port = config.balancer.hash_key == "address_port"
        self._slow_start = config.balancer.slow_start
        self._slow_start_floor = config.balancer.slow_start_floor
        limits = _limits_of(config)
        limited = bool(limits) != bool(self._limits)
        kept = {b.address for b in old.backends}
        for backend in config.backends:
            address, key = backend.address, f"backends[{backend.address}].max_connections"
            # An operator's limit (set_max_connections) that the file's replaces.
            replaced = limits.get(address, 0) != self._limits.get(address, 0)
            if address in kept and replaced and key not in changed:
                changed = (*changed, key)
        self._limits = limits
        if (
            limited
            or config.timeouts.connect != old.timeouts.connect
            or config.timeouts.idle != old.timeouts.idle
            or config.balancer.connect_retries != old.balancer.connect_retries
            or config.balancer.queue_timeout != old.balancer.queue_timeout
        ):
            # A new policy for new connections; open ones keep theirs.
            self._policy = self._make_policy(config)
            self.touch_resolution = self._policy.touch_resolution
        self.process.drain_timeout = config.timeouts.drain
        outlier = self.outlier
        for address in removed:
            outlier.forget(address)
        outlier.fleet = len(self.control.backends) - len(self.control.removing)
        outlier.configure(config.outlier, now)
        self._judging = config.outlier.detecting
        if not config.outlier.first_byte_timeout:
            self._first_byte_due.clear()
            self._first_byte_heap.clear()
            self._first_byte_seen.clear()
            self._first_byte_judged.clear()
        self._refresh_outlier_due()
        self._lead = self.timer_lead()
        for address in added:
            self._removal_deadlines.pop(address, None)
        if config.timeouts.removal > 0:
            for address in removed:
                if address in self.control.removing:
                    self._removal_deadlines[address] = now + config.timeouts.removal
        out: list[Output] = [
            Reconfigured(
                at=now, added=added, removed=removed, reweighted=reweighted, changed=changed
            )
        ]
        out.extend(events)
        if self._waiting:
            self._serve_queue(now, out)  # limits raised, or removed, or backends added
        return out

    # -- time ------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`handle_timer` has something to do."""
        candidates: list[float] = []
        timers = self._timers
        while (head := timers.peek()) is not None:
            due, connection_id = head
            connection = self.connections.get(connection_id)
            if connection is None or connection.timer_due != due:
                timers.pop()  # stale: the connection is gone or re-filed
                continue
            # The entry may be early (activity pushed the idle deadline back);
            # handle_timer re-files it then, so reporting it early is harmless.
            candidates.append(due)
            break
        probe = self.control.next_deadline()
        if probe is not None:
            candidates.append(probe)
        if self._removal_deadlines:
            candidates.append(min(self._removal_deadlines.values()))
        if self.process.deadline is not None:
            candidates.append(self.process.deadline)
        outlier = self._outlier_due
        if outlier is not None:
            candidates.append(outlier)
        return min(candidates) if candidates else None

    def handle_timer(self, now: float) -> list[Output]:
        out: list[Output] = []
        timers = self._timers
        connections = self.connections
        # First collect what has expired, then act in deadline order. An entry
        # may surface early (its deadline moved later and nothing was filed
        # then), so the order entries surface in is not the deadlines' order
        # when a late wake-up finds several passed: sort. Ties go by
        # connection id, so the order never depends on filing history.
        expired: list[tuple[float, int, Connection]] = []
        while (head := timers.peek()) is not None and head[0] <= now:
            due, connection_id = timers.pop()
            connection = connections.get(connection_id)
            if connection is None or connection.timer_due != due:
                continue
            connection.timer_due = None
            deadline = connection.deadline
            assert deadline is not None  # the table holds open connections only
            if deadline > now:
                self._file_timer(connection, deadline, self._lane(connection))
                continue
            expired.append((deadline, connection_id, connection))
        if len(expired) > 1:
            expired.sort(key=_deadline_order)
        for _, _, connection in expired:
            if connection.timer_due is not None:
                # Re-filed since it was found due: an earlier one's end made
                # room and it left the queue for a backend (a fresh deadline).
                continue
            connection.handle_into(connection.timeout_input, now, out)
            self._settle(connection, now, out)
        if self._removal_deadlines:
            self._cut_removed(now, out)
        outlier = self._outlier_due
        if outlier is not None and outlier <= now:
            self._outlier_timer(now, out)
        if self.control.judged_bad:
            self._redispatch(now, out)
        if self._waiting:
            self._serve_queue(now, out)  # an ejected backend's return
        out.extend(self.control.handle_timer(now))
        deadline = self.process.deadline
        if deadline is not None and deadline <= now:
            step = self.process.handle(ProcessInput.DEADLINE, now, self.in_flight)
            out.extend(self._carry_out(step, now))
        return out

    # -- internals ----------------------------------------------------------------------

    def _make_policy(self, config: Config) -> ConnectionPolicy:
        return ConnectionPolicy(
            pick=self._pick,
            connect_timeout=config.timeouts.connect,
            idle_timeout=config.timeouts.idle,
            connect_retries=config.balancer.connect_retries,
            report=self.control.report if self.health_reports else self.control.judge,
            queue=self._enqueue if self._limits else None,
            queue_timeout=config.balancer.queue_timeout,
        )

    def _enqueue(self, connection: Connection, now: float, out: list[Output]) -> Outcome | None:
        """No backend was picked for a new connection: queue it, or say why not.

        With no backend eligible at all it is ``NO_BACKEND`` as without limits
        (a queue for backends that are down would only hold clients longer);
        the eligible ones all full, it waits if the queue has room.
        """
        if not self.control.snapshot.backends:
            return Outcome.NO_BACKEND
        waiting = self._waiting
        if len(waiting) >= self.config.balancer.queue_size:
            return Outcome.QUEUE_FULL
        connection_id = connection.connection_id
        waiting[connection_id] = connection
        self._queue.append(connection_id)
        out.append(
            ConnectionQueued(
                at=now,
                connection_id=connection_id,
                queued=len(waiting),
                deadline=connection.deadline_at,
            )
        )
        return None

    def _serve_queue(self, now: float, out: list[Output]) -> None:
        """Give the queued connections, oldest first, the room there is now.

        The head picks; when it finds none, nobody behind it can (they pick
        from the same backends), so the queue waits for the next change.
        """
        waiting, queue = self._waiting, self._queue
        while queue:
            connection = waiting.get(queue[0])
            if connection is None:
                queue.popleft()  # closed while queued (timeout, reset, cut)
                continue
            connection.handle_into(_DEQUEUE, now, out)
            if connection.state is _QUEUED:
                return
            queue.popleft()
            del waiting[connection.connection_id]
            self._file_timer(connection, connection.deadline_at, 0)

    def _judge(self, connection: Connection, now: float, out: list[Output]) -> None:
        """A closed connection's verdict on its backend, for outlier ejection."""
        if self._first_byte_seen or self._first_byte_due:  # watching first bytes
            connection_id = connection.connection_id
            self._first_byte_due.pop(connection_id, None)
            self._first_byte_seen.discard(connection_id)
            if connection_id in self._first_byte_judged:
                self._first_byte_judged.discard(connection_id)
                return  # judged by its backend's silence already: one verdict each
        failed = _VERDICTS.get(connection.outcome)
        backend = connection.backend
        if failed is None or backend is None:
            return
        self._verdict(backend.address, failed, now, out)

    def _verdict(
        self, address: str, failed: bool, now: float, out: list[Output], silent: bool = False
    ) -> None:
        control = self.control
        if address in control.removing or address not in control.backends:
            return  # removed by a reload (or forgotten since): nothing to take out
        ejection = self.outlier.record(address, failed, now, silent=silent)
        if ejection is not None:
            self._eject(ejection, now, out)

    def _eject(self, ejection: Ejection, now: float, out: list[Output]) -> None:
        self._refresh_outlier_due()  # its return is due
        out.extend(
            self.control.eject(
                ejection.address, ejection.until, ejection.reason, ejection.ejections, now
            )
        )
        if self.control.judged_bad:
            self._redispatch(now, out)

    def _outlier_timer(self, now: float, out: list[Output]) -> None:
        """First bytes overdue, returns whose time is up, then the interval's
        verdicts if it is over."""
        if self._first_byte_heap and self._first_byte_heap[0][0] <= now:
            self._first_byte_timeouts(now, out)
        outlier = self.outlier
        control = self.control
        for address in outlier.due(now):
            out.extend(control.restore(address, now))
        tick = outlier.next_tick
        if tick is not None and tick <= now:
            order = [a for a in control.backends if a not in control.removing]
            for ejection in outlier.tick(now, order):
                self._eject(ejection, now, out)
        self._refresh_outlier_due()

    def _refresh_outlier_due(self) -> None:
        due = self.outlier.deadline
        heap = self._first_byte_heap
        if heap and (due is None or heap[0][0] < due):
            due = heap[0][0]
        self._outlier_due = due

    def _first_byte_timeouts(self, now: float, out: list[Output]) -> None:
        """Connections whose backend stayed silent too long after their client spoke."""
        heap, due_at = self._first_byte_heap, self._first_byte_due
        while heap and heap[0][0] <= now:
            due, connection_id = heapq.heappop(heap)
            if due_at.get(connection_id) != due:
                continue  # answered, closed, or re-filed
            del due_at[connection_id]
            connection = self.connections.get(connection_id)
            if connection is None or connection.backend is None:
                continue
            self._first_byte_seen.add(connection_id)
            if connection.state is not _ESTABLISHED and connection.state is not _CLIENT_DONE:
                continue  # the backend sent its EOF: an answer, not silence
            self._first_byte_judged.add(connection_id)
            address = connection.backend.address
            out.append(FirstByteTimeout(at=now, connection_id=connection_id, backend=address))
            self._verdict(address, True, now, out, silent=True)

    def _redispatch(self, now: float, out: list[Output]) -> None:
        """Move the connects pending on backends judged bad to other backends."""
        control = self.control
        judged = control.judged_bad
        while judged:
            address = judged.pop(0)
            if any(backend.address == address for backend in control.snapshot.backends):
                continue  # still in rotation (panic): the connect may as well wait
            pending = [
                connection
                for connection in self.connections.values()
                if connection.state is _CONNECTING
                and connection.backend is not None
                and connection.backend.address == address
            ]
            for connection in pending:
                connection.handle_into(_REDISPATCH, now, out)
                self._settle(connection, now, out)

    def _cut_removed(self, now: float, out: list[Output]) -> None:
        """Cut what still runs on removed backends whose removal deadline passed."""
        due = [address for address, at in self._removal_deadlines.items() if at <= now]
        if not due:
            return
        for address in due:
            del self._removal_deadlines[address]
        gone = set(due)
        # Connection ids ascend in the table, so the cut order is fixed.
        for connection in list(self.connections.values()):
            backend = connection.backend
            if backend is not None and backend.address in gone:
                connection.handle_into(ConnInput.REMOVED, now, out)
                self._settle(connection, now, out)

    def _pick(self, exclude: Collection[str], key: int | None, now: float) -> Backend | None:
        # Each attempt reads the snapshot once, when it picks: for the first
        # attempt that is the instant of accept. A retry reads the snapshot
        # current when the failure arrives (before that failure's own report
        # is applied; the failed backend is excluded anyway).
        control = self.control
        balancer = self.balancer
        limits = self._limits
        if limits:
            active = control.active_connections
            full = [address for address, most in limits.items() if active(address) >= most]
            if full:
                exclude = (*exclude, *full)
        if self._keyed:
            keyed = cast("KeyedBalancer", balancer)
            backend = keyed.pick_for(key, control.snapshot, control.active_connections, exclude)
        else:
            backend = balancer.pick(control.snapshot, control.active_connections, exclude)
        if backend is not None and self._slow_start and control.joined:
            backend = self._ramp(backend, exclude, key, now)
        return backend

    def _ramp(
        self, backend: Backend, exclude: Collection[str], key: int | None, now: float
    ) -> Backend:
        """Slow start: a backend that joined ``elapsed`` seconds ago keeps a pick
        with probability ``floor + (1 - floor) * elapsed / slow_start``; else
        the balancer picks again without it (HAProxy's ``slowstart``, Envoy's
        ``slow_start_config``). So its share of new connections grows from the
        floor to its whole share over the window, whatever the algorithm: a
        recovered backend that ``least_connections`` would flood (it has none
        active) takes only a part at first. A hashing balancer's draw is the
        client's own key, so the clients it sends back grow as a stable set.
        """
        joined = self.control.joined
        since = joined.get(backend.address)
        if since is None:
            return backend
        elapsed = now - since
        if elapsed >= self._slow_start:
            del joined[backend.address]  # ramped up: full weight from now on
            return backend
        floor = self._slow_start_floor
        share = floor + (1.0 - floor) * max(elapsed, 0.0) / self._slow_start
        draw = (key % 1_000_003) / 1_000_003 if key is not None else self._rng.random()
        if draw < share:
            return backend
        again = self._pick((*exclude, backend.address), key, now)
        return backend if again is None else again

    def _input(self, connection_id: int, conn_input: ConnInput, now: float) -> list[Output]:
        connection = self.connections.get(connection_id)
        if connection is None:
            return []
        out: list[Output] = []  # _step, inlined: two calls a connection on the hot path
        connection.handle_into(conn_input, now, out)
        self._settle(connection, now, out)
        return out

    def _attempt_input(
        self, connection_id: int, attempt: int, conn_input: ConnInput, now: float
    ) -> list[Output]:
        connection = self._live_attempt(connection_id, attempt)
        if connection is None:
            return []
        return self._step(connection, conn_input, now)

    def _step(self, connection: Connection, conn_input: ConnInput, now: float) -> list[Output]:
        out: list[Output] = []
        connection.handle_into(conn_input, now, out)
        self._settle(connection, now, out)
        return out

    def _live_attempt(self, connection_id: int, attempt: int) -> Connection | None:
        """The connection, if ``attempt`` is its connect in progress; else None
        (stale: that attempt timed out or the connection closed)."""
        connection = self.connections.get(connection_id)
        if (
            connection is None
            or connection.attempt != attempt
            or connection.state is not _CONNECTING
        ):
            return None
        return connection

    def _settle(self, connection: Connection, now: float, out: list[Output]) -> None:
        """Forget a closed connection, or make sure a timer entry watches it.

        (Its health reports were applied as they were made: see
        ``ControlPlane.report``.)
        """
        if connection.state is _CLOSED:
            del self.connections[connection.connection_id]
            if self._judging:
                self._judge(connection, now, out)
            waiting = self._waiting
            if waiting:
                waiting.pop(connection.connection_id, None)
                self._serve_queue(now, out)  # its backend, if it had one, has room
            if self.process.state is _DRAINING and not self.connections:
                out.extend(self._carry_out(self.process.handle(ProcessInput.IDLE, now, 0), now))
        else:
            # A deadline that moved later (activity, a half-close, a retry's
            # new connect timeout) keeps the old entry, which fires early and
            # is re-filed by handle_timer: one entry per connection, not one
            # per input. Only a connection without a live entry, or whose
            # deadline came *earlier* (a driver clock that stepped back), files.
            deadline = connection.deadline
            assert deadline is not None  # open
            timer_due = connection.timer_due
            if timer_due is None or deadline < timer_due:
                self._file_timer(connection, deadline, self._lane(connection))
            if self._waiting:
                self._serve_queue(now, out)  # a retry left a backend, which has room

    @staticmethod
    def _lane(connection: Connection) -> int:
        state = connection.state
        return 0 if state is _CONNECTING else 2 if state is _QUEUED else 1

    def _file_timer(self, connection: Connection, due: float, lane: int) -> None:
        # One live entry per connection: filing a new due time makes the old
        # entry stale (skipped when it surfaces). Activity (touch) files
        # nothing: the entry fires early and handle_timer re-files the real
        # idle deadline, so the per-read cost is one float store.
        connection.timer_due = due
        self._timers.push(due, connection.connection_id, lane)

    def _carry_out(self, step: ProcessStep, now: float) -> list[Output]:
        """A process rule's result: the cut connections' closes first, then
        what the rule emits (the ``ShutdownFinished`` that counts them)."""
        out: list[Output] = []
        if step.cut:
            connections = list(self.connections.values())
            self.connections.clear()
            for connection in connections:
                connection.handle_into(ConnInput.CUT, now, out)
            self.cut_count += len(connections)
            self._waiting.clear()
            self._queue.clear()
            self._first_byte_due.clear()
            self._first_byte_seen.clear()
            self._first_byte_judged.clear()
        out.extend(step.outputs)
        return out


def _limits_of(config: Config) -> dict[str, int]:
    """Each backend's ``max_connections``, for those that have one."""
    return {b.address: b.max_connections for b in config.backends if b.max_connections}


def _table_of(config: Config) -> tuple[str, int, int]:
    """What a balancer is built from: a change of any of it builds a new one."""
    balancer = config.balancer
    return balancer.algorithm, balancer.maglev_table_size, balancer.ring_points


def _balancer_for(config: Config, rng: random.Random) -> Balancer:
    balancer = config.balancer
    return make_balancer(
        balancer.algorithm,
        rng,
        table_size=balancer.maglev_table_size,
        ring_points=balancer.ring_points,
    )


def _changed_keys(old: Config, new: Config) -> tuple[str, ...]:
    """Dotted paths of every key whose value differs, in schema order, then each
    changed key of a backend kept (``backends[ADDRESS].max_connections``; its
    weight is in ``reweighted``, the rest of a change in ``added``, ``removed``)."""
    changed: list[str] = []
    for section in fields(Config):
        if section.name == "backends":
            continue
        before, after = getattr(old, section.name), getattr(new, section.name)
        if before == after:
            continue
        for key in fields(before):
            if getattr(before, key.name) != getattr(after, key.name):
                changed.append(f"{section.name}.{key.name}")
    before = {backend.address: backend for backend in old.backends}
    for backend in new.backends:
        was = before.get(backend.address)
        if was is None or was == backend:
            continue
        for key in fields(backend):
            if key.name not in ("address", "weight") and (
                getattr(was, key.name) != getattr(backend, key.name)
            ):
                changed.append(f"backends[{backend.address}].{key.name}")
    return tuple(changed)
