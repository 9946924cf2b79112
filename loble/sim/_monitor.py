"""The invariant checker: watches the core from the outside, at every step.

The monitor sees only what any driver sees: the outputs of each core call,
the probe results the simulator feeds in, and the core's public reading:
``snapshot.version`` at each step, and ``statistics()`` (backend states and
active counts, the open connections) at the end of the run. It never calls a
core decision function and holds no copy
of the health or connection machines. It keeps its own tally of what it
observed and checks, at each output and at the end of each step, that the
tally satisfies Loble's guarantees:

* **safe draining**: a connection never starts on a backend the monitor last
  saw ``DRAINING`` or ``UNHEALTHY``, drained or in maintenance by an
  operator, or removed by a reload; a backend never becomes ``UNHEALTHY``
  while the monitor counts attempts active on it; a removed backend's
  connections are cut (``REMOVED``) no earlier than its removal deadline.
* **no flapping**: every transition is one of the five in the design and is
  backed by its full run of consecutive outcomes, counted from the verdicts
  and probe results the monitor saw; so is every outlier ejection by
  ``consecutive_resets``, counted from the connections' ends (a reset fails,
  a completion succeeds) and the ``FirstByteTimeout`` verdicts. A ``DRAINING`` backend comes back to
  ``HEALTHY`` only after ``success_threshold`` probe successes in a row, each
  of a probe sent while it was draining, with no failure between them (a
  passive success there is no evidence either way).
* **no churn**: a snapshot is published exactly when the set of eligible
  backends (``HEALTHY``, admin ``READY``, not removed) changes, or the
  weight of one of them does, with the next version and that set. So an
  operator's admin change or reweight publishes exactly when it changes
  what new connections see.
* **conservation**: every accepted connection ends exactly once; attempts
  started and finished balance per backend, against the core's own counts;
  a reload adds and removes exactly the backends its config does, and a
  removed backend is forgotten only once nothing is active on it.
* **graceful shutdown**: nothing is cut before the drain deadline, nothing is
  accepted after shutdown begins, and the drain never overruns its deadline.
* **connection limits**: no attempt starts on a backend already carrying its
  ``max_connections``; a client is queued only while every eligible backend
  is at its limit, and refused ``queue_full`` only with ``queue_size``
  waiting; the queue never holds a client while a backend has room (checked
  at the end of every step), clients leave it in the order they came (no new
  client goes ahead of them), and none waits past its ``queue_timeout``,
  which refuses it exactly then.

Safety alone lets a core that does nothing pass, so three checks watch that
things *happen*, and on time:

* **draining ends**, one of two ways: a backend the monitor counts
  ``DRAINING`` with no attempt active at the end of a step should have become
  ``UNHEALTHY``; one whose probes answered ``success_threshold`` times in a
  row while it drained should be ``HEALTHY`` again by the end of that step,
  connections and all. A removed backend with none active should have been
  forgotten.
* **bounded retries**: per connection, attempts are numbered 1, 2, ... and
  never exceed ``1 + connect_retries``; a retry never goes to a backend that
  connection already tried. Per client that retries (``[sim.clients]
  retries``), tries are numbered 1, 2, ... and never exceed ``1 + retries``,
  and a client ends (through, or failed for good) once.
* **timeouts on time**: a connect the core gives up on from its timer is
  abandoned no earlier than the attempt's start plus ``timeouts.connect``,
  and no attempt is still connecting after that (checked at every step, as
  connect deadlines come in order); an ``IDLE_TIMEOUT`` close comes exactly
  at the last activity the driver reported plus ``timeouts.idle``; no
  connection gets activity after its idle deadline passed, and none is left
  connecting or idle past a deadline when the run ends. A client that gave
  up at its own connect timeout did so exactly then, was not connected, and
  its connection ended then as a client reset; no client's connection is
  connected, or still waiting, past that timeout. With timer jitter the
  driver tells the monitor each late wake-up (:attr:`Monitor.late_wake`):
  a core deadline from the one it is for may pass unhandled until it comes,
  and no longer; every other check is as strict as without jitter.
  Probes are on time too (when the driver says when each is sent): a
  backend's next probe comes no sooner than ``probe_interval * (1 -
  probe_jitter)`` after the last one was due, and, unless something since
  may have moved or skipped it (a probe still out when the next was due, a
  reload), no later than ``probe_interval * (1 + probe_jitter)`` after it
  was sent, or after a change of its state or admin state re-filed it.

It also keeps what the report shows (outcomes, latencies, the timeline), since
those are the same observations.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from loble.core import (
    HASHING_ALGORITHMS,
    AdminState,
    AdminStateChanged,
    BackendEjected,
    BackendForgotten,
    BackendReturned,
    BackendStateChanged,
    CloseConnection,
    Config,
    ConnectBackend,
    ConnectFailed,
    ConnectionClosed,
    ConnectionQueued,
    ConnectRedispatched,
    FirstByteTimeout,
    HealthInput,
    HealthReport,
    HealthState,
    MaxConnectionsChanged,
    Outcome,
    Output,
    PanicChanged,
    ProcessState,
    ProxyCore,
    Reconfigured,
    ShutdownFinished,
    ShutdownStarted,
    SnapshotPublished,
    WeightChanged,
)

__all__ = ["INVARIANTS", "Monitor", "Violation"]

SAFE_DRAINING = "safe draining"
NO_FLAPPING = "no flapping"
NO_CHURN = "no churn"
CONSERVATION = "conservation"
GRACEFUL_SHUTDOWN = "graceful shutdown"
DRAINING_ENDS = "draining ends"
BOUNDED_RETRIES = "bounded retries"
TIMEOUTS_ON_TIME = "timeouts on time"
CONNECTION_LIMITS = "connection limits"
CORE_INPUTS = "core accepted every input"
INVARIANTS = (
    SAFE_DRAINING,
    NO_FLAPPING,
    NO_CHURN,
    CONSERVATION,
    GRACEFUL_SHUTDOWN,
    DRAINING_ENDS,
    BOUNDED_RETRIES,
    TIMEOUTS_ON_TIME,
    CONNECTION_LIMITS,
    CORE_INPUTS,
)

_LATE = 1e-9
"""Slack for "not later than": the core's deadline and the monitor's are the
same float sums, so this only absorbs a driver that rounds differently."""

_KEPT_VIOLATIONS = 5
_H, _D, _U = HealthState.HEALTHY, HealthState.DRAINING, HealthState.UNHEALTHY
_STARTED = HealthInput.CONNECTION_STARTED
_FINISHED = HealthInput.CONNECTION_FINISHED
_SUCCESS = HealthInput.PASSIVE_SUCCESS
_FAILURE = HealthInput.PASSIVE_FAILURE
# Module aliases: an enum member read through its class costs ~80 ns.
_COMPLETED, _IDLE_TIMEOUT, _CONNECT_FAILED = (
    Outcome.COMPLETED,
    Outcome.IDLE_TIMEOUT,
    Outcome.CONNECT_FAILED,
)
_BACKEND_RESET, _CUT, _REFUSED = Outcome.BACKEND_RESET, Outcome.CUT, Outcome.REFUSED_SHUTTING_DOWN
_REMOVED = Outcome.REMOVED
_CLIENT_RESET = Outcome.CLIENT_RESET
_QUEUE_TIMEOUT, _QUEUE_FULL = Outcome.QUEUE_TIMEOUT, Outcome.QUEUE_FULL
_QUEUED_ENDS = (_QUEUE_TIMEOUT, _CLIENT_RESET, _CUT, Outcome.RESOURCE_EXHAUSTED)
"""How a queued connection may end without leaving the queue for a backend."""
_READY = AdminState.READY


@dataclass(frozen=True, slots=True, kw_only=True)
class Violation:
    invariant: str
    step: int
    at: float
    message: str

    def __str__(self) -> str:
        return f"{self.invariant}: step {self.step} at t={self.at:.6f}: {self.message}"


class Monitor:
    """Observes one run; :attr:`violations` is empty when every invariant held."""

    def __init__(self, config: Config, core: ProxyCore) -> None:
        self.core = core
        self.addresses = tuple(backend.address for backend in config.backends)
        """The backends the core knows now: config order, then those leaving."""
        self.known: dict[str, None] = dict.fromkeys(self.addresses)
        """Every backend ever known, in the order first seen (for the report)."""
        self.failure_threshold = config.health.failure_threshold
        self.success_threshold = config.health.success_threshold
        self.connect_retries = config.balancer.connect_retries
        self.connect_timeout = config.timeouts.connect
        self.idle_timeout = config.timeouts.idle
        self._current_from = 0
        """Connections from this id on run on the current timeouts and retries;
        older ones on a generation in :attr:`_generations` (a reload changed them)."""
        self._generations: list[tuple[int, float, float, int]] = []
        """(first connection id, connect, idle, retries) of earlier configs."""
        self.last_accepted = 0
        self.timer_step = False
        """Set by the driver while it applies the outputs of ``handle_timer``."""
        self.step = 0
        self.now = 0.0
        self.state = dict.fromkeys(self.addresses, _H)
        self.active = dict.fromkeys(self.addresses, 0)
        self.started = dict.fromkeys(self.addresses, 0)
        self.finished = dict.fromkeys(self.addresses, 0)
        self.passive_failures = dict.fromkeys(self.addresses, 0)
        self.probe_failures = dict.fromkeys(self.addresses, 0)
        self.probes = dict.fromkeys(self.addresses, 0)
        self.resets = dict.fromkeys(self.addresses, 0)
        self.consecutive_failures = dict.fromkeys(self.addresses, 0)
        self.consecutive_successes = dict.fromkeys(self.addresses, 0)
        self.probe_run = dict.fromkeys(self.addresses, 0)
        """Probe successes in a row since the last state change or failure,
        counting only probes sent in the current state (what recovery from
        DRAINING needs)."""
        self.probe_sent_in: dict[str, HealthState] = {}
        """Backends with a probe out, and the state the monitor saw when it was sent."""
        self.probe_interval = config.health.probe_interval
        self.probe_jitter = config.health.probe_jitter
        self.probe_window: dict[str, list[float]] = {}
        """Each probed backend's window for its next probe: [not before, not
        after]; "not after" is inf once something may have moved or skipped it."""
        self.recovering: list[str] = []
        """DRAINING backends whose probe run reached the threshold in this step."""
        self.admin = dict.fromkeys(self.addresses, _READY)
        self.weight = {backend.address: backend.weight for backend in config.backends}
        self.removing: dict[str, float] = {}
        """Backends a reload removed, not yet forgotten, and when their
        connections may be cut (inf: never)."""
        self.cut_after: dict[str, float] = {}
        """The removal deadline of each removed backend, kept after it is
        forgotten: its last cut connection's close follows the forgetting."""
        self.barred: set[str] = set()
        """Backends no connection may start on whatever their health: drained
        or in maintenance by the operator, or removed by a reload."""
        self.leaving_idle: list[str] = []
        """Removed backends seen with nothing active in this step: they must
        be forgotten by its end."""
        self.reweighted = False
        """An eligible backend's weight changed: a snapshot must follow."""
        self.version: int | None = None
        self.published: tuple[str, ...] = ()
        self.membership_changed = False
        self.open: dict[int, None] = {}
        """Accepted connections not yet seen to end (a dict: ordered, unlike a set)."""
        self.accepted = 0
        self.outcomes = dict.fromkeys(Outcome, 0)
        self.outcome_times: dict[Outcome, list[float]] = {}
        """For each outcome but ``COMPLETED``: when the first and the last of
        them ended (``[first, last]``), for the report's impact lines."""
        self.connect_latencies: list[float] = []
        self.timeline: list[BackendStateChanged] = []
        self.shutdown: ShutdownStarted | None = None
        self.shutdown_finished: ShutdownFinished | None = None
        self.holding: dict[int, str] = {}
        """Connections with an attempt started and not yet ended: its backend."""
        self.connecting: dict[int, tuple[int, float, tuple[str, ...]]] = {}
        """Connections with an attempt in progress: (attempt, started at, backends tried)."""
        self.connect_deadlines: deque[tuple[float, int, int]] = deque()
        """(deadline, connection, attempt) for each attempt, in deadline order."""
        self.connect_check_at = math.inf
        """The oldest deadline in connect_deadlines plus slack: end_step's cheap test."""
        self.last_activity: dict[int, float] = {}
        """Connected connections: the last activity the driver reported."""
        self.drained: list[str] = []
        """Backends seen DRAINING with nothing active in this step."""
        self.pending = False
        """Something for :meth:`end_step` to check beyond the clock and the
        snapshot version: a driver may skip the call while this is False,
        ``now`` is not past :attr:`connect_check_at` and the core's snapshot
        version is :attr:`version` (the simulator's loop tests exactly that)."""
        self.late_wake: tuple[float, float] | None = None
        """Set by a driver whose loop wakes late for the core's timers (timer
        jitter): (the earliest core deadline, when the loop will wake for it).
        Until then a deadline from that one on may be past and not yet
        handled, by exactly that lateness; None: timers are handled on time."""
        self.client_timeout: float | None = None
        """The clients' own connect timeout, if they have one (set by the driver)."""
        self.client_retries = 0
        """How many times a client may try again (set by the driver)."""
        self.client_tries: dict[int, int] = {}
        """Clients not yet through or failed for good: their last try."""
        self.given_up: dict[int, float] = {}
        """Connections whose client gave up, and when, until their close."""
        # Traffic policy: backups, panic, outlier ejection, consistent hashing.
        self.backup = {backend.address: backend.backup for backend in config.backends}
        """Each backend's ``backup`` flag (used only with no primary eligible)."""
        self.panic_threshold = config.balancer.panic_threshold
        self.outlier = config.outlier
        self.panic = False
        """Panic as the core announced it (``PanicChanged``), begun and not ended."""
        self.panic_periods: list[tuple[float, float | None]] = []
        """[began, ended or None] of each panic, for the report."""
        self.ejected: dict[str, float] = {}
        """Backends the core announced ejected, and until when."""
        self.ejections: list[tuple[float, str, float, str, int]] = []
        """Every ejection: (at, backend, until, reason, ejections in a row)."""
        self.returned: list[tuple[float, str]] = []
        """Every return from an ejection: (at, backend)."""
        self.redispatched: dict[int, int] = {}
        """Connections whose attempt the core moved on (``ConnectRedispatched``):
        the attempt it gave up, before the next one starts."""
        self.redispatches = 0
        self.failure_run: dict[str, int] = {}
        """Outlier verdicts: each backend's failures in a row since its last
        success, ejection or return (what ``consecutive_resets`` counts)."""
        self.silent_judged: set[int] = set()
        """Connections judged by a ``FirstByteTimeout``: their end is no verdict."""
        self.client_address: dict[int, str] = {}
        """Connections a driver told the client address of (``[sim.clients]
        population``), until their first attempt starts."""
        self.hashing = _hashing(config)
        """Whether a client address must map to one backend per snapshot."""
        self.payload_probed = _payload_probed(config)
        """Backends whose probes expect a reply: a connect that succeeds does not
        break their run of failures (a frozen backend still accepts)."""
        self.picks: dict[int, dict[str, str]] = {}
        """Per snapshot version: each client address's first-attempt backend."""
        self._limits(config)
        self.queued: dict[int, float] = {}
        """Connections seen queued (``ConnectionQueued``), in arrival order, and
        their queue deadlines, until they leave the queue or end."""
        self.queued_total = 0
        self.queue_waits: list[float] = []
        """Seconds each client that left the queue for a backend waited in it."""
        self._queued_at: dict[int, float] = {}
        self.violation_counts = dict.fromkeys(INVARIANTS, 0)
        self.violations: list[Violation] = []

    def _limits(self, config: Config) -> None:
        self.max_connections = {b.address: b.max_connections for b in config.backends}
        """Each backend's ``max_connections`` (0: none)."""
        self.queue_size = config.balancer.queue_size
        self.queue_timeout = config.balancer.queue_timeout

    def violate(self, invariant: str, message: str) -> None:
        self.violation_counts[invariant] += 1
        if self.violation_counts[invariant] <= _KEPT_VIOLATIONS:
            self.violations.append(
                Violation(invariant=invariant, step=self.step, at=self.now, message=message)
            )

    # -- inputs the driver fed the core ----------------------------------------------

    def accepted_connection(self, connection_id: int, outputs: Sequence[Output]) -> None:
        self.accepted += 1
        self.last_accepted = connection_id
        self.open[connection_id] = None
        if self.shutdown is not None and not (
            len(outputs) == 2
            and type(outputs[0]) is CloseConnection
            and outputs[0].outcome is _REFUSED
        ):
            self.violate(
                GRACEFUL_SHUTDOWN,
                f"connection {connection_id} accepted after shutdown began: {outputs!r}",
            )

    def connected(self, connection_id: int, now: float) -> None:
        """The driver reported a connect the core took (it did not return None).

        That is the attempt's verdict, a passive success (the core's
        ``PASSIVE_SUCCESS``), before any output the call made.
        """
        self.connecting.pop(connection_id, None)
        self.last_activity[connection_id] = now
        address = self.holding.get(connection_id)
        if address is not None:
            if address not in self.payload_probed:
                self.consecutive_failures[address] = 0
            self.consecutive_successes[address] += 1

    def activity(self, connection_id: int, now: float) -> None:
        """Bytes moved or EOF on a connection, about to be reported to the core."""
        last = self.last_activity.get(connection_id)
        if last is None:
            return  # not connected, or already closed: the report is stale
        idle = self.idle_timeout
        if connection_id < self._current_from:
            idle = self._policy(connection_id)[1]
        if now > last + idle + _LATE and not self._late_covers(last + idle, now):
            self.violate(
                TIMEOUTS_ON_TIME,
                f"connection {connection_id} still open at its first activity in "
                f"{now - last:.6f} s, past its idle timeout at t={last + idle:.6f}",
            )
        self.last_activity[connection_id] = now

    def probe_sent(self, address: str, now: float | None = None) -> None:
        """The driver carries out a ``ProbeBackend`` for ``address``; with ``now``,
        when, and its spacing from the last one is checked."""
        self.probe_sent_in[address] = self.state[address]
        if now is None:
            return
        # Sent at a late wake-up, it was due no sooner than the deadline woken for.
        late = self.late_wake
        due = late[0] if self.timer_step and late is not None and late[0] <= now else now
        window = self.probe_window.get(address)
        if window is not None:
            earliest, latest = window
            if now < earliest - _LATE:
                self.violate(
                    TIMEOUTS_ON_TIME,
                    f"{address} probed at t={now:.6f}, before t={earliest:.6f}: sooner than "
                    f"probe_interval * (1 - probe_jitter) after its last probe was due",
                )
            if due > latest + _LATE:
                self.violate(
                    TIMEOUTS_ON_TIME,
                    f"{address} probed at t={now:.6f} (due by t={due:.6f}), after "
                    f"t={latest:.6f}: later than probe_interval * (1 + probe_jitter)",
                )
        interval, jitter = self.probe_interval, self.probe_jitter
        self.probe_window[address] = [due + interval * (1 - jitter), now + interval * (1 + jitter)]

    def _probe_refiled(self, address: str, now: float) -> None:
        """The core may have filed ``address``'s next probe afresh at ``now`` (a
        change of its state or admin state): due by an interval from now at the
        latest, unless a probe still out may make it skip that one."""
        window = self.probe_window.get(address)
        if window is None:
            return
        if address in self.probe_sent_in:
            window[1] = math.inf
        else:
            window[1] = max(window[1], now + self.probe_interval * (1 + self.probe_jitter))

    def probe_result(self, address: str, ok: bool) -> None:
        self.probes[address] += 1
        window = self.probe_window.get(address)
        if window is not None and self.now > window[0] + _LATE:
            window[1] = math.inf  # out when the next may have been due: that one is skipped
        if ok:
            self._success(address)
        else:
            self.probe_failures[address] += 1
            self._failure(address)
        state = self.state.get(address)
        if self.probe_sent_in.pop(address, None) is not state:
            return  # sent before the backend last changed state: no evidence now
        if not ok:
            self.probe_run[address] = 0
        elif state is _D:
            run = self.probe_run[address] = self.probe_run[address] + 1
            if run >= self.success_threshold:
                self.recovering.append(address)  # must be HEALTHY by the end of the step
                self.pending = True

    # -- clients that time out and retry (reported by the driver) -----------------------

    def client_attempt(self, client: int, attempt: int) -> None:
        """``client`` makes try ``attempt``: 1, then each retry, at most ``1 + retries``."""
        previous = self.client_tries.get(client, 0)
        if attempt != previous + 1:
            self.violate(BOUNDED_RETRIES, f"client {client}: try {attempt} follows try {previous}")
        if attempt > 1 + self.client_retries:
            self.violate(
                BOUNDED_RETRIES,
                f"client {client}: try {attempt} exceeds 1 + retries ({self.client_retries})",
            )
        self.client_tries[client] = attempt

    def client_gave_up(self, connection_id: int, now: float) -> None:
        """The client of ``connection_id`` gave up waiting: it must not have been connected."""
        if self.client_timeout is None:
            self.violate(
                TIMEOUTS_ON_TIME, f"connection {connection_id}: a client without a timeout gave up"
            )
        if connection_id in self.last_activity:
            self.violate(
                TIMEOUTS_ON_TIME,
                f"connection {connection_id}: its client gave up at t={now:.6f}, "
                "but it was connected",
            )
        self.given_up[connection_id] = now

    def client_closed(self, event: ConnectionClosed, gave_up: bool) -> None:
        """A followed client's connection closed (after :meth:`connection_closed`).

        One its client gave up on ends then, as a client reset, never
        connected, exactly its connect timeout after it opened. Any other
        never connected that ended later than that timeout is a client that
        should have given up, and one connected after it a client reported
        connected after it gave up.
        """
        connection_id, timeout = event.connection_id, self.client_timeout
        given_up = self.given_up.pop(connection_id, None)
        if gave_up != (given_up is not None):
            self.violate(CONSERVATION, f"connection {connection_id}: a give-up was not reported")
        if timeout is None:
            return
        due = event.opened_at + timeout
        if given_up is not None:
            if (
                event.outcome is not _CLIENT_RESET
                or event.connected_at is not None
                or not event.at == given_up == due
            ):
                self.violate(
                    TIMEOUTS_ON_TIME,
                    f"connection {connection_id}: its client gave up at t={given_up:.6f} "
                    f"(due t={due:.6f}), yet it ended {event.outcome.value} at t={event.at:.6f}"
                    f"{'' if event.connected_at is None else ', connected'}",
                )
        elif (event.connected_at if event.connected_at is not None else event.at) > due + _LATE:
            self.violate(
                TIMEOUTS_ON_TIME,
                f"connection {connection_id}: still waiting for a backend past its client's "
                f"connect timeout at t={due:.6f}",
            )

    def client_finished(self, client: int) -> None:
        """``client`` is through, or failed with no retry left: it makes no more tries."""
        if self.client_tries.pop(client, None) is None:
            self.violate(CONSERVATION, f"client {client} finished twice, or never started")

    # -- outputs, in order ---------------------------------------------------------------

    def connect_started(self, action: ConnectBackend, now: float) -> None:
        connection_id, attempt = action.connection_id, action.attempt
        address = action.backend.address
        connect_timeout, connect_retries = self.connect_timeout, self.connect_retries
        if connection_id < self._current_from:
            connect_timeout, _, connect_retries = self._policy(connection_id)
        previous = self.connecting.get(connection_id)
        if previous is None:
            tried: tuple[str, ...] = (address,)
            if attempt != 1:
                self.violate(
                    BOUNDED_RETRIES,
                    f"connection {connection_id}: attempt {attempt} with none in progress",
                )
        else:
            number, started, tried = previous
            if self.redispatched:
                redispatched = self.redispatched.pop(connection_id, None)
                if redispatched is not None and redispatched != number:
                    self.violate(
                        BOUNDED_RETRIES,
                        f"connection {connection_id}: attempt {redispatched} redispatched, "
                        f"attempt {number} was in progress",
                    )
            else:
                redispatched = None
            if self.timer_step and redispatched is None:
                self._abandoned(connection_id, number, started, now, connect_timeout)
            if attempt != number + 1:
                self.violate(
                    BOUNDED_RETRIES,
                    f"connection {connection_id}: attempt {attempt} follows attempt {number}",
                )
            if address in tried:
                self.violate(
                    BOUNDED_RETRIES,
                    f"connection {connection_id}: attempt {attempt} retries {address}, "
                    f"already tried ({', '.join(tried)})",
                )
            tried = (*tried, address)
        if attempt > 1 + connect_retries:
            self.violate(
                BOUNDED_RETRIES,
                f"connection {connection_id}: attempt {attempt} exceeds 1 + connect_retries "
                f"({connect_retries})",
            )
        self.connecting[connection_id] = (attempt, now, tried)
        # The attempt starts on the backend (the core's CONNECTION_STARTED):
        # it must be one a new connection may start on.
        self.holding[connection_id] = address
        if self.state[address] is not _H and not self.panic:
            self.violate(
                SAFE_DRAINING,
                f"a connection started on {address} while {self.state[address].name}",
            )
        if self.ejected and address in self.ejected and not self.panic:
            self.violate(
                SAFE_DRAINING,
                f"a connection started on {address} while ejected "
                f"(until t={self.ejected[address]:.6f}), outside panic",
            )
        if self.backup[address] and any(not self.backup[a] for a in self._eligible()):
            self.violate(
                SAFE_DRAINING,
                f"a connection started on backup {address} while a primary is eligible",
            )
        if self.client_address and attempt == 1:
            self._hashed(connection_id, address)
        if address in self.barred:
            self.violate(
                SAFE_DRAINING,
                f"a connection started on {address} while admin={self.admin[address].name}"
                f"{', removed by a reload' if address in self.removing else ''}",
            )
        limit = self.max_connections.get(address, 0)
        if limit and self.active[address] >= limit:
            self.violate(
                CONNECTION_LIMITS,
                f"a connection started on {address} carrying {self.active[address]}, "
                f"its max_connections {limit}",
            )
        if self.queued and attempt == 1:
            self._left_queue(connection_id, now)
        self.started[address] += 1
        self.active[address] += 1
        due = now + connect_timeout
        deadlines = self.connect_deadlines
        if not deadlines:
            self.connect_check_at = due + _LATE
            deadlines.append((due, connection_id, attempt))
        elif due >= deadlines[-1][0]:
            deadlines.append((due, connection_id, attempt))
        else:
            # Only after a reload shortened the connect timeout: keep the order.
            bisect.insort(deadlines, (due, connection_id, attempt))
            self.connect_check_at = deadlines[0][0] + _LATE

    def connect_failed(self, event: ConnectFailed, now: float) -> None:
        """An attempt failed: it ends (``CONNECTION_FINISHED``), with a failure verdict."""
        address = event.backend
        self.holding.pop(event.connection_id, None)
        self._finished(address)
        self.passive_failures[address] += 1
        self._failure(address)
        self.probe_run[address] = 0
        if self.queued:
            self.pending = True  # room freed: end_step checks the queue moved

    def health_report(self, report: HealthReport, now: float) -> None:
        """A health report from a driver of the control plane alone, with no connections.

        The simulator's core makes none (``ProxyCore(health_reports=False)``):
        the monitor reads each from the action or event it stands beside
        (:meth:`connect_started`, :meth:`connected`, :meth:`connect_failed`,
        :meth:`connection_closed`), which checks the core's bookkeeping
        against what it did, not against what it says it did.
        """
        address, health_input = report.address, report.input
        if health_input is _STARTED:
            self.started[address] += 1
            self.active[address] += 1
        elif health_input is _FINISHED:
            self._finished(address)
        elif health_input is _SUCCESS:
            self._success(address)
        else:
            self.passive_failures[address] += 1
            self._failure(address)
            self.probe_run[address] = 0

    def _finished(self, address: str) -> None:
        self.finished[address] += 1
        active = self.active[address] = self.active[address] - 1
        if active <= 0:
            if active < 0:
                self.violate(CONSERVATION, f"{address}: more attempts finished than started")
            else:
                if self.state[address] is _D:
                    self.drained.append(address)  # must be UNHEALTHY by the end of the step
                    self.pending = True
                if address in self.removing:
                    self.leaving_idle.append(address)  # must be forgotten by then
                    self.pending = True

    def state_changed(self, event: BackendStateChanged, now: float) -> None:
        address, old, new = event.address, event.old, event.new
        self.timeline.append(event)
        seen = self.state[address]
        if old is not seen:
            self.violate(NO_FLAPPING, f"{address} left {old.name} but was {seen.name}")
        if old is _H and new in (_D, _U):
            failures = self.consecutive_failures[address]
            if failures < self.failure_threshold:
                self.violate(
                    NO_FLAPPING,
                    f"{address} {old.name}->{new.name} after {failures} consecutive failures "
                    f"(threshold {self.failure_threshold})",
                )
        elif old is _U and new is _H:
            successes = self.consecutive_successes[address]
            if successes < self.success_threshold:
                self.violate(
                    NO_FLAPPING,
                    f"{address} {old.name}->{new.name} after {successes} consecutive successes "
                    f"(threshold {self.success_threshold})",
                )
        elif old is _D and new is _H:
            run = self.probe_run[address]
            if run < self.success_threshold:
                self.violate(
                    NO_FLAPPING,
                    f"{address} {old.name}->{new.name} after {run} consecutive probe successes "
                    f"while draining (threshold {self.success_threshold})",
                )
        elif not (old is _D and new is _U):
            self.violate(NO_FLAPPING, f"{address} {old.name}->{new.name} is not a transition")
        self.probe_run[address] = 0
        if old is _H:
            self._probe_refiled(address, now)
        if new is _U:
            if self.active[address]:
                self.violate(
                    SAFE_DRAINING,
                    f"{address} became UNHEALTHY with {self.active[address]} active",
                )
            self.consecutive_failures[address] = 0
            self.consecutive_successes[address] = 0
        elif new is _D and not self.active[address]:
            self.violate(SAFE_DRAINING, f"{address} DRAINING with nothing active")
        self.state[address] = new
        self.membership_changed = self.pending = True

    def snapshot_published(self, event: SnapshotPublished, now: float) -> None:
        if self.version is not None:
            if event.version != self.version + 1:
                self.violate(NO_CHURN, f"version {event.version} published after {self.version}")
            if event.addresses == self.published and not self.reweighted:
                self.violate(NO_CHURN, f"version {event.version} has unchanged membership")
        expected = self._eligible()
        if event.addresses != expected:
            self.violate(
                NO_CHURN,
                f"version {event.version} lists {list(event.addresses)}, eligible are "
                f"{list(expected)}",
            )
        self.version = event.version
        self.published = event.addresses
        self.membership_changed = False
        self.reweighted = False

    def admin_changed(self, event: AdminStateChanged, now: float) -> None:
        address = event.address
        if event.old is not self.admin[address]:
            self.violate(
                NO_CHURN,
                f"{address} left admin {event.old.name} but was {self.admin[address].name}",
            )
        if event.new is event.old:
            self.violate(NO_CHURN, f"{address}: an admin change to the same state was announced")
        self.admin[address] = event.new
        self._bar(address)
        self._probe_refiled(address, now)
        self.membership_changed = self.pending = True

    def weight_changed(self, event: WeightChanged, now: float) -> None:
        address = event.address
        if event.old != self.weight[address] or event.new == event.old:
            self.violate(
                NO_CHURN,
                f"{address}: weight {event.old}->{event.new} announced, it was "
                f"{self.weight[address]}",
            )
        self.weight[address] = event.new
        if self.state[address] is _H and address not in self.barred:
            self.reweighted = self.pending = True

    def reconfigured(self, event: Reconfigured, now: float) -> None:
        """A reload: check its diff against the new config, and follow it."""
        config = self.core.config
        wanted = tuple(backend.address for backend in config.backends)
        live = [address for address in self.addresses if address not in self.removing]
        added = tuple(a for a in wanted if a not in live)
        removed = tuple(a for a in live if a not in wanted)
        if (event.added, event.removed) != (added, removed):
            self.violate(
                CONSERVATION,
                f"reload announced added {list(event.added)}, removed {list(event.removed)}; "
                f"the config adds {list(added)}, removes {list(removed)}",
            )
        reweighted = tuple(
            b.address
            for b in config.backends
            if b.address in self.addresses and b.weight != self.weight[b.address]
        )
        if event.reweighted != reweighted:
            self.violate(
                CONSERVATION,
                f"reload announced reweighted {list(event.reweighted)}, "
                f"the config {list(reweighted)}",
            )
        for backend in config.backends:
            address = backend.address
            if address in self.removing:
                del self.removing[address]  # re-added before it was forgotten: as it was
                del self.cut_after[address]
                self._bar(address)
            elif address not in live:
                self._new_backend(address, backend.weight, config.health.active)
        removal = config.timeouts.removal
        for backend in config.backends:
            self.backup[backend.address] = backend.backup
        self.panic_threshold = config.balancer.panic_threshold
        self.outlier = config.outlier
        self.hashing = _hashing(config)
        self.payload_probed = _payload_probed(config)
        self._limits(config)
        if not config.outlier.first_byte_timeout:
            self.silent_judged.clear()  # the core forgets which it judged
        for address in removed:
            self.failure_run.pop(address, None)
            self.ejected.pop(address, None)  # the core forgets the ejection: no return
            self.probe_sent_in.pop(address, None)  # the core forgets its probe too
            self.removing[address] = self.cut_after[address] = (
                now + removal if removal > 0 else math.inf
            )
            self.barred.add(address)
            if not self.active[address]:
                self.leaving_idle.append(address)
        self.addresses = (*wanted, *self.removing)
        # The next probes go on the new interval, the one filed may come sooner.
        self.probe_interval = interval = config.health.probe_interval
        self.probe_jitter = jitter = config.health.probe_jitter
        for address, window in list(self.probe_window.items()):
            if address in self.removing or address not in self.addresses:
                del self.probe_window[address]
            else:
                window[:] = [min(window[0], now + interval * (1 - jitter)), math.inf]
        self.failure_threshold = config.health.failure_threshold
        self.success_threshold = config.health.success_threshold
        policy = (config.timeouts.connect, config.timeouts.idle, config.balancer.connect_retries)
        if policy != (self.connect_timeout, self.idle_timeout, self.connect_retries):
            self._generations.append(
                (self._current_from, self.connect_timeout, self.idle_timeout, self.connect_retries)
            )
            self._current_from = self.last_accepted + 1
            self.connect_timeout, self.idle_timeout, self.connect_retries = policy
        self.membership_changed = self.pending = True

    def forgotten(self, event: BackendForgotten, now: float) -> None:
        address = event.address
        if address not in self.removing:
            self.violate(CONSERVATION, f"{address} forgotten, but no reload removed it")
        elif self.active[address]:
            self.violate(
                CONSERVATION, f"{address} forgotten with {self.active[address]} attempts active"
            )
        self.removing.pop(address, None)
        self.probe_sent_in.pop(address, None)
        self.probe_window.pop(address, None)
        self.barred.discard(address)
        self.addresses = tuple(a for a in self.addresses if a != address)

    def max_connections_changed(self, event: MaxConnectionsChanged, now: float) -> None:
        """An operator's new limit: what the next starts are checked against."""
        self.max_connections[event.address] = event.new
        self.pending = True  # a raised limit must serve the queue in this step

    def connection_queued(self, event: ConnectionQueued, now: float) -> None:
        """A new client waits: only with no room, a queue not full, for its timeout."""
        connection_id, queued = event.connection_id, self.queued
        if len(queued) >= self.queue_size:
            self.violate(
                CONNECTION_LIMITS,
                f"connection {connection_id} queued with {len(queued)} waiting, "
                f"queue_size {self.queue_size}",
            )
        if event.queued != len(queued) + 1:
            self.violate(
                CONNECTION_LIMITS,
                f"connection {connection_id} queued as number {event.queued}, "
                f"the monitor counts {len(queued) + 1}",
            )
        if event.deadline != now + self.queue_timeout:
            self.violate(
                CONNECTION_LIMITS,
                f"connection {connection_id} queued until t={event.deadline:.6f}, "
                f"not its queue_timeout {self.queue_timeout} s on",
            )
        self._no_room(f"connection {connection_id} queued")
        if not self._eligible():
            self.violate(
                CONNECTION_LIMITS,
                f"connection {connection_id} queued with no backend eligible (no_backend)",
            )
        queued[connection_id] = event.deadline
        self._queued_at[connection_id] = now
        self.queued_total += 1
        self.pending = True
        if event.deadline + _LATE < self.connect_check_at:
            self.connect_check_at = event.deadline + _LATE

    def _left_queue(self, connection_id: int, now: float) -> None:
        """A first attempt starts: the oldest queued client's, or a new one's with none waiting."""
        queued = self.queued
        head = next(iter(queued))
        if connection_id not in queued:
            self.violate(
                CONNECTION_LIMITS,
                f"new connection {connection_id} went to a backend ahead of "
                f"{len(queued)} queued (the first, {head})",
            )
            return
        if connection_id != head:
            self.violate(
                CONNECTION_LIMITS,
                f"connection {connection_id} left the queue ahead of connection {head}",
            )
        deadline = queued.pop(connection_id)
        if now > deadline + _LATE and not self._late_covers(deadline, now):
            self.violate(
                CONNECTION_LIMITS,
                f"connection {connection_id} left the queue at t={now:.6f}, "
                f"past its queue timeout at t={deadline:.6f}",
            )
        self.queue_waits.append(now - self._queued_at.pop(connection_id))

    def _no_room(self, what: str) -> None:
        """Every eligible backend must be at its limit for ``what`` to be right."""
        limits, active = self.max_connections, self.active
        room = [a for a in self._eligible() if not limits.get(a) or active[a] < limits[a]]
        if room:
            self.violate(
                CONNECTION_LIMITS,
                f"{what} while {', '.join(room)} had room "
                f"({', '.join(f'{active[a]}/{limits.get(a) or 0}' for a in room)})",
            )

    def _overdue_queue(self, now: float) -> None:
        """No client waits in the queue past its deadline (but for a late wake-up)."""
        for connection_id, deadline in self.queued.items():
            if now <= deadline + _LATE or self._late_covers(deadline, now):
                return  # in arrival order: the later ones are due later still
            self.violate(
                CONNECTION_LIMITS,
                f"connection {connection_id} still queued past its queue timeout "
                f"at t={deadline:.6f}",
            )
            return

    def connection_closed(self, event: ConnectionClosed, now: float) -> None:
        connection_id, outcome = event.connection_id, event.outcome
        if self.queued or outcome is _QUEUE_TIMEOUT or outcome is _QUEUE_FULL:
            self._queue_closed(event, now)
        if self.outlier.detecting and event.backend is not None:
            if self.silent_judged and connection_id in self.silent_judged:
                self.silent_judged.discard(connection_id)
            elif outcome is _BACKEND_RESET:
                self._verdict(event.backend, True)
            elif outcome is _COMPLETED:
                self._verdict(event.backend, False)
        address = self.holding.pop(connection_id, None)
        if address is not None:
            self._finished(address)  # the attempt still open ends with it
        if self.open.pop(connection_id, 0) is not None:
            self.violate(CONSERVATION, f"connection {connection_id} ended twice or never opened")
        self.outcomes[outcome] += 1
        # (Its attempts were each checked by connect_started.)
        pending = self.connecting.pop(connection_id, None)
        last = self.last_activity.pop(connection_id, None)
        connected_at = event.connected_at
        if connected_at is not None:
            self.connect_latencies.append(connected_at - event.opened_at)
        if outcome is _COMPLETED:
            return  # the common end: nothing more to check
        times = self.outcome_times.get(outcome)
        if times is None:
            self.outcome_times[outcome] = [event.at, event.at]
        else:
            times[1] = event.at
        if outcome is _IDLE_TIMEOUT:
            self._idle_timed_out(connection_id, last, now)
        elif pending is not None and outcome is _CONNECT_FAILED and self.timer_step:
            connect_timeout = self._policy(connection_id)[0]
            self._abandoned(connection_id, pending[0], pending[1], now, connect_timeout)
        if outcome is _BACKEND_RESET and event.backend is not None:
            self.resets[event.backend] += 1
        elif outcome is _REMOVED:
            deadline = self.cut_after.get(event.backend or "")
            if deadline is None or now + _LATE < deadline:
                self.violate(
                    SAFE_DRAINING,
                    f"connection {connection_id} cut as REMOVED from {event.backend} "
                    f"before its removal deadline (or its backend was not removed)",
                )
        elif outcome is _CUT:
            shutdown = self.shutdown
            if shutdown is None or event.at < shutdown.deadline:
                self.violate(GRACEFUL_SHUTDOWN, f"connection {connection_id} cut before deadline")
        elif outcome is _REFUSED and self.shutdown is None:
            self.violate(GRACEFUL_SHUTDOWN, f"connection {connection_id} refused while running")

    def _queue_closed(self, event: ConnectionClosed, now: float) -> None:
        connection_id, outcome = event.connection_id, event.outcome
        self.pending = True  # room freed, perhaps: end_step checks the queue moved
        deadline = self.queued.pop(connection_id, None)
        if deadline is None:
            if outcome is _QUEUE_TIMEOUT:
                self.violate(CONNECTION_LIMITS, f"connection {connection_id} timed out of no queue")
            elif outcome is _QUEUE_FULL:
                if len(self.queued) < self.queue_size:
                    self.violate(
                        CONNECTION_LIMITS,
                        f"connection {connection_id} refused queue_full with "
                        f"{len(self.queued)} waiting, queue_size {self.queue_size}",
                    )
                self._no_room(f"connection {connection_id} refused queue_full")
            return
        self._queued_at.pop(connection_id, None)
        if outcome not in _QUEUED_ENDS:
            self.violate(
                CONNECTION_LIMITS,
                f"connection {connection_id} ended {outcome.value} from the queue",
            )
        elif outcome is _QUEUE_TIMEOUT and now + _LATE < deadline:
            self.violate(
                CONNECTION_LIMITS,
                f"connection {connection_id} timed out of the queue at t={now:.6f}, "
                f"before its deadline at t={deadline:.6f}",
            )

    def panic_changed(self, event: PanicChanged, now: float) -> None:
        """Panic began or ended: it must be a change, and the core's rule's verdict."""
        if event.panic is self.panic:
            self.violate(NO_CHURN, f"panic={event.panic} announced, it was already")
        self.panic = event.panic
        if event.panic:
            self.panic_periods.append((now, None))
        elif self.panic_periods:
            self.panic_periods[-1] = (self.panic_periods[-1][0], now)
        self.membership_changed = self.pending = True

    def first_byte_timeout(self, event: FirstByteTimeout, now: float) -> None:
        """A backend silent past ``first_byte_timeout``: a failure verdict, once."""
        if not self.outlier.first_byte_timeout:
            self.violate(NO_FLAPPING, f"a first-byte timeout on {event.backend} with none set")
        self.silent_judged.add(event.connection_id)
        self._verdict(event.backend, True)

    def _verdict(self, address: str, failed: bool) -> None:
        """One verdict for outlier ejection, as the core weighs it: none on a
        backend ejected (its connections tell of the time before) or removed."""
        if address in self.ejected or address in self.removing:
            return
        self.failure_run[address] = self.failure_run.get(address, 0) + 1 if failed else 0

    def backend_ejected(self, event: BackendEjected, now: float) -> None:
        """An ejection: deserved, within the cap, leaving someone in rotation, for its due time."""
        address, outlier = event.address, self.outlier
        if address in self.ejected:
            self.violate(NO_CHURN, f"{address} ejected while ejected already")
        run = self.failure_run.pop(address, 0)
        words = event.reason.split(" ", 2)
        if len(words) > 1 and words[1] == "consecutive":  # by count (else by rate)
            threshold = outlier.consecutive_resets
            if not threshold or run < threshold or words[0] != str(run):
                self.violate(
                    NO_FLAPPING,
                    f"{address} ejected for {event.reason!r}: the monitor saw {run} failures "
                    f"in a row (consecutive_resets {threshold})",
                )
        self.ejected[address] = event.until
        self.ejections.append((now, address, event.until, event.reason, event.ejections))
        fleet = sum(1 for a in self.addresses if a not in self.removing)
        allowed = max(1, fleet * outlier.max_ejection_percent // 100)
        if len(self.ejected) > allowed:
            self.violate(
                NO_CHURN,
                f"{len(self.ejected)} backends ejected at once, at most {allowed} "
                f"({outlier.max_ejection_percent}% of {fleet})",
            )
        if not self._eligible():
            self.violate(NO_CHURN, f"ejecting {address} left no backend in rotation")
        length = min(outlier.base_ejection_time * event.ejections, outlier.max_ejection_time)
        if event.ejections < 1 or not (
            event.until == now + length or (now + length <= now < event.until)
        ):
            self.violate(
                TIMEOUTS_ON_TIME,
                f"{address} ejected at t={now:.6f} until t={event.until:.6f}, "
                f"the {event.ejections}th ejection lasts {length:g} s",
            )
        self.membership_changed = self.pending = True

    def backend_returned(self, event: BackendReturned, now: float) -> None:
        """An ejected backend's time is up: exactly at ``until`` (or the late wake-up)."""
        address = event.address
        until = self.ejected.pop(address, None)
        self.failure_run.pop(address, None)  # back with clean tallies
        self.returned.append((now, address))
        if until is None:
            self.violate(NO_CHURN, f"{address} returned, but was not ejected")
        elif not (
            until <= now <= until + _LATE or (until <= now and self._late_covers(until, now))
        ):
            self.violate(
                TIMEOUTS_ON_TIME,
                f"{address} returned at t={now:.6f}, its ejection ended at t={until:.6f}",
            )
        self.membership_changed = self.pending = True

    def connect_redispatched(self, event: ConnectRedispatched, now: float) -> None:
        """The core gave up an attempt with no verdict: it ends on its backend now."""
        connection_id = event.connection_id
        self.redispatches += 1
        pending = self.connecting.get(connection_id)
        if pending is None or pending[0] != event.attempt:
            self.violate(
                BOUNDED_RETRIES,
                f"connection {connection_id}: attempt {event.attempt} redispatched, "
                "but it was not connecting",
            )
        address = self.holding.pop(connection_id, None)
        if address != event.backend:
            self.violate(
                CONSERVATION,
                f"connection {connection_id}: redispatched from {event.backend}, "
                f"its attempt was on {address}",
            )
        if address is not None:
            self._finished(address)
        self.redispatched[connection_id] = event.attempt
        self.pending = True

    def _hashed(self, connection_id: int, address: str) -> None:
        """A hashed client's first attempt: the same address, the same backend, per snapshot."""
        client = self.client_address.pop(connection_id, None)
        if client is None or self.version is None:
            return
        picks = self.picks.get(self.version)
        if picks is None:
            picks = self.picks[self.version] = {}
        before = picks.setdefault(client, address)
        if self.hashing and before != address:
            self.violate(
                NO_CHURN,
                f"client {client} sent to {address}, it went to {before} on the same "
                f"snapshot (version {self.version})",
            )

    def shutdown_started(self, event: ShutdownStarted, now: float) -> None:
        if self.shutdown is not None:
            self.violate(GRACEFUL_SHUTDOWN, "shutdown started twice")
        self.shutdown = event

    def finished_shutdown(self, event: ShutdownFinished, now: float) -> None:
        shutdown = self.shutdown
        if shutdown is None:
            self.violate(GRACEFUL_SHUTDOWN, "shutdown finished before it started")
        elif event.at > shutdown.deadline:
            self.violate(GRACEFUL_SHUTDOWN, f"drain overran its deadline {shutdown.deadline}")
        if self.shutdown_finished is not None:
            self.violate(GRACEFUL_SHUTDOWN, "shutdown finished twice")
        self.shutdown_finished = event

    # -- checks at the end of a step and of the run -----------------------------------------

    def end_step(self) -> None:
        self.pending = False
        if self.drained:
            for address in self.drained:
                if self.state[address] is _D and not self.active[address]:
                    self.violate(
                        DRAINING_ENDS,
                        f"{address} still DRAINING at the end of the step with nothing active",
                    )
            self.drained.clear()
        if self.recovering:
            for address in self.recovering:
                if self.state[address] is _D and self.probe_run[address] >= self.success_threshold:
                    self.violate(
                        DRAINING_ENDS,
                        f"{address} still DRAINING at the end of the step after "
                        f"{self.probe_run[address]} consecutive probe successes "
                        f"(threshold {self.success_threshold})",
                    )
            self.recovering.clear()
        if self.leaving_idle:
            for address in self.leaving_idle:
                if address in self.removing and not self.active[address]:
                    self.violate(
                        DRAINING_ENDS,
                        f"{address} was removed and has nothing active, but is not forgotten",
                    )
            self.leaving_idle.clear()
        if self.reweighted:
            self.reweighted = False
            self.violate(NO_CHURN, "an eligible backend's weight changed without a new snapshot")
        if self.now > self.connect_check_at:
            self._overdue_connects(self.now)
            if self.queued:
                self._overdue_queue(self.now)
        if self.queued:
            self._no_room(f"{len(self.queued)} clients queued at the end of the step")
        if self.membership_changed:
            # A state change that kept membership (DRAINING -> UNHEALTHY) publishes nothing.
            self.membership_changed = False
            if self._eligible() != self.published:
                self.violate(NO_CHURN, "membership changed without a new snapshot")
            if self._panic_expected() is not self.panic:
                self.violate(
                    NO_CHURN,
                    f"panic should be {self._panic_expected()}, the core announced {self.panic}",
                )
        if self.ejected:
            self._overdue_returns(self.now)
        version = self.core.snapshot.version
        if version != self.version:
            self.violate(NO_CHURN, f"snapshot version {version} was never published")

    def end_run(self) -> None:
        """Compare the tally with the core's statistics once the run stops."""
        statistics = self.core.statistics()
        if tuple(backend.address for backend in statistics.backends) != self.addresses:
            self.violate(
                CONSERVATION,
                f"the core knows {[b.address for b in statistics.backends]}, "
                f"the monitor {list(self.addresses)}",
            )
        for backend in statistics.backends:
            address = backend.address
            if self.started[address] - self.finished[address] != self.active[address]:
                self.violate(CONSERVATION, f"{address}: started and finished do not balance")
            if backend.active_connections != self.active[address]:
                self.violate(
                    CONSERVATION,
                    f"{address}: core counts {backend.active_connections} "
                    f"active, observed {self.active[address]}",
                )
            if backend.state is not self.state[address]:
                self.violate(NO_FLAPPING, f"{address}: a state change was not reported")
            if backend.admin is not self.admin[address] or backend.weight != self.weight[address]:
                self.violate(NO_CHURN, f"{address}: an admin or weight change was not reported")
            if backend.removing is not (address in self.removing):
                self.violate(CONSERVATION, f"{address}: a removal was not reported")
        if tuple(self.open) != statistics.open_connection_ids:
            self.violate(
                CONSERVATION,
                f"{len(self.open)} connections observed open, the core has {statistics.in_flight}",
            )
        if sum(self.outcomes.values()) + len(self.open) != self.accepted:
            self.violate(CONSERVATION, "outcomes plus open do not add up to accepted")
        if statistics.process is ProcessState.STOPPED and (self.open or any(self.active.values())):
            self.violate(CONSERVATION, "the process stopped with connections open")
        # Left at the end: nothing may wait on a deadline that has passed.
        if self.ejected:
            self._overdue_returns(self.now)
        for connection_id, (attempt, started, _) in self.connecting.items():
            due = started + self._policy(connection_id)[0]
            if self.now > due + _LATE and not self._late_covers(due, self.now):
                self.violate(
                    TIMEOUTS_ON_TIME,
                    f"connection {connection_id}: attempt {attempt} started at t={started:.6f} "
                    f"still connecting when the run ended, past its connect timeout",
                )
        if self.queued:
            self._overdue_queue(self.now)
        for connection_id, last in self.last_activity.items():
            due = last + self._policy(connection_id)[1]
            if self.now > due + _LATE and not self._late_covers(due, self.now):
                self.violate(
                    TIMEOUTS_ON_TIME,
                    f"connection {connection_id} idle since t={last:.6f} still open when "
                    f"the run ended, past its idle timeout",
                )

    # -- internals ---------------------------------------------------------------------

    def _policy(self, connection_id: int) -> tuple[float, float, int]:
        """(connect timeout, idle timeout, retries) the connection runs on."""
        if connection_id >= self._current_from:
            return self.connect_timeout, self.idle_timeout, self.connect_retries
        firsts = [generation[0] for generation in self._generations]
        _, connect, idle, retries = self._generations[
            bisect.bisect_right(firsts, connection_id) - 1
        ]
        return connect, idle, retries

    def _late_covers(self, deadline: float, now: float) -> bool:
        """Is ``deadline``, past at ``now``, one the loop's late wake-up has yet to handle?

        Only with timer jitter: the wake-up for the earliest deadline comes
        at a drawn instant, and a deadline from that one on may wait for it.
        """
        late = self.late_wake
        return late is not None and late[0] - _LATE <= deadline and now <= late[1] + _LATE

    def _abandoned(
        self, connection_id: int, attempt: int, started: float, now: float, connect_timeout: float
    ) -> None:
        """The core's timer gave up on an attempt: not before its connect timeout."""
        if now < started + connect_timeout:
            self.violate(
                TIMEOUTS_ON_TIME,
                f"connection {connection_id}: attempt {attempt} timed out after "
                f"{now - started:.6f} s, before the connect timeout ({connect_timeout} s)",
            )

    def _idle_timed_out(self, connection_id: int, last: float | None, now: float) -> None:
        if last is None:
            self.violate(
                TIMEOUTS_ON_TIME,
                f"connection {connection_id} closed for idleness before it connected",
            )
            return
        due = last + self._policy(connection_id)[1]
        if not due <= now <= due + _LATE and not (due <= now and self._late_covers(due, now)):
            self.violate(
                TIMEOUTS_ON_TIME,
                f"connection {connection_id} closed for idleness at t={now:.6f}, "
                f"its idle deadline was t={due:.6f}",
            )

    def _overdue_connects(self, now: float) -> None:
        """Attempts whose connect deadline has passed must have ended."""
        connecting, deadlines = self.connecting, self.connect_deadlines
        late = self.late_wake
        if late is not None and now <= late[1] + _LATE:
            now = min(now, late[0])  # those from the late wake's deadline on wait for it
        while deadlines and deadlines[0][0] + _LATE < now:
            due, connection_id, attempt = deadlines.popleft()
            pending = connecting.get(connection_id)
            if pending is not None and pending[0] == attempt:
                self.violate(
                    TIMEOUTS_ON_TIME,
                    f"connection {connection_id}: attempt {attempt} still connecting "
                    f"past its connect timeout at t={due:.6f}",
                )
        self.connect_check_at = deadlines[0][0] + _LATE if deadlines else math.inf
        if self.queued:  # and the queue's oldest deadline
            head = next(iter(self.queued.values())) + _LATE
            if head < self.connect_check_at:
                self.connect_check_at = head

    def _overdue_returns(self, now: float) -> None:
        """No ejection outlasts its ``until`` (but for a late wake-up covering it)."""
        for address, until in self.ejected.items():
            if now > until + _LATE and not self._late_covers(until, now):
                self.violate(
                    TIMEOUTS_ON_TIME,
                    f"{address} still ejected at t={now:.6f}, past its return at t={until:.6f}",
                )

    def _success(self, address: str) -> None:
        self.consecutive_failures[address] = 0
        self.consecutive_successes[address] += 1

    def _failure(self, address: str) -> None:
        self.consecutive_successes[address] = 0
        self.consecutive_failures[address] += 1

    def _eligible(self) -> tuple[str, ...]:
        """The core's rule, from what the monitor saw: healthy primaries left ready
        and not ejected; with none, healthy backups; in panic, every ready primary."""
        state, barred = self.state, self.barred
        if not self.ejected and self.panic_threshold == 0 and not any(self.backup.values()):
            return tuple(
                address
                for address in self.addresses
                if state[address] is _H and address not in barred
            )
        ready = [address for address in self.addresses if address not in barred]
        up = [a for a in ready if state[a] is _H and a not in self.ejected]
        primaries = [a for a in ready if not self.backup[a]]
        healthy = [a for a in up if not self.backup[a]]
        threshold = self.panic_threshold
        panic = bool(threshold) and bool(primaries) and len(healthy) < threshold * len(primaries)
        if panic and not healthy:
            panic = not up
        if panic:
            return tuple(primaries)
        if healthy or len(primaries) == len(ready):
            return tuple(healthy)
        return tuple(up)

    def _panic_expected(self) -> bool:
        """Whether the core's rule says panic now (the same reading as :meth:`_eligible`)."""
        threshold = self.panic_threshold
        if not threshold:
            return False
        state, barred = self.state, self.barred
        ready = [address for address in self.addresses if address not in barred]
        up = [a for a in ready if state[a] is _H and a not in self.ejected]
        primaries = [a for a in ready if not self.backup[a]]
        healthy = [a for a in up if not self.backup[a]]
        panic = bool(primaries) and len(healthy) < threshold * len(primaries)
        return panic and (bool(healthy) or not up)

    def _bar(self, address: str) -> None:
        if self.admin[address] is _READY and address not in self.removing:
            self.barred.discard(address)
        else:
            self.barred.add(address)

    def _new_backend(self, address: str, weight: int, probed_first: bool) -> None:
        """A backend a reload added: fresh counts; unproven if probes are active."""
        self.known[address] = None
        self.state[address] = _U if probed_first else _H
        self.admin[address] = _READY
        self.weight[address] = weight
        self.barred.discard(address)
        for tally in (
            self.active,
            self.consecutive_failures,
            self.consecutive_successes,
            self.probe_run,
        ):
            tally[address] = 0
        for total in (
            self.started,
            self.finished,
            self.passive_failures,
            self.probe_failures,
            self.probes,
            self.resets,
        ):
            total.setdefault(address, 0)


def _payload_probed(config: Config) -> frozenset[str]:
    """The backends whose probes expect a reply (their own expect key, else
    [health]'s) while healthy ones are probed (``active``): the core's rule."""
    health = config.health
    if not health.active:
        return frozenset()
    default = bool(health.probe_expect or health.probe_expect_regex)
    return frozenset(
        backend.address
        for backend in config.backends
        if backend.probe_expect or backend.probe_expect_regex or default
    )


def _hashing(config: Config) -> bool:
    """Whether a client address must map to one backend while the snapshot stands:
    a hashing balancer keyed by address alone, no slow start to send it elsewhere."""
    balancer = config.balancer
    return (
        balancer.algorithm in HASHING_ALGORITHMS
        and balancer.hash_key == "address"
        and not balancer.slow_start
    )
