"""The simulated world and the event loop that drives ``loble.core`` through it.

Theory of operation
===================

One run is one seed. A single ``random.Random(seed)`` feeds everything that
varies: client arrivals, durations, bytes, network latency, which connects a
``reset`` backend cuts, and the core's own balancer. Nothing reads a clock,
and nothing iterates a set or depends on hash order, so a seed fixes the
whole run: the trace and the report are byte-identical on every replay.

Time is a float of simulated seconds. Two sources of work interleave:

* the simulator's heap of ``(time, sequence, kind, ...)`` entries, as in
  SimPy: the sequence number makes ties FIFO, so two events at one instant
  always run in the order they were scheduled;
* the core's own timer, ``core.next_deadline()`` / ``core.handle_timer(now)``
  (connect and idle timeouts, probes, the drain deadline). At a tie the
  simulator's event runs first.

Each event popped, and each core timer handled, is one *step*. After a step
the :class:`~loble.sim._monitor.Monitor` checks the invariants, so a
violation names the step it happened at.

The world is a set of clients and backends around one :class:`ProxyCore`.
The core's actions are carried out here: ``ConnectBackend`` becomes a connect
that succeeds, is refused or hangs according to the backend's behaviour at
that moment; ``ShutdownWrite`` makes the other side finish and close after a
network delay; ``ProbeBackend`` becomes a probe result; ``CloseConnection``
frees the backend's socket. The outcome goes back into the core as its next
input. Reports the core finds stale (an attempt it has already timed out, a
connection it has closed) come back empty; a stale connect comes back as
``None``, and the world then closes the socket it opened, as a real driver
would.

An answer is decided when its request is sent, and lands a round trip later.
If the backend died in between (a crash or a kill, or a flapping backend's
down half: :meth:`SimBackend.epoch` changed), the connect fails and the
probe fails when they land, as they would against a real process that went
away. A silent host (``host_down``) kills nothing: an answer on its way
still lands, and a connection established on a ``host_down`` or
``accept_hang`` backend hangs (it gets no end and no touch: the core's idle
timeout closes it). A probe that expects a reply (``[health] probe_expect``
or ``probe_expect_regex``) takes one more round trip, and fails at its
timeout on an ``accept_hang`` backend, which a connect-only probe passes;
every reply a backend gives matches (the simulator models no wrong answer).

A fault that changes what open connections see edits the heap: a ``kill``
replaces a connection's own end with the FIN or the RST it gets, a
``host_down`` drops every event still to come from the backend's side
(:meth:`Simulation._kill`, :meth:`Simulation._hang`; rare, and O(heap)).
``crash`` and ``reset`` only add a RST a round trip later, as before.

Faults: each backend has at most one fault in force, the last one started;
a fault's ``until`` puts the backend back ``up`` only if that fault is still
the one in force. At one instant the fault schedule changes before anything
else happens then (its events are scheduled first): every start, in file
order, then every end.

Operations: ``[[sim.operations]]`` are an operator's requests at set
instants (drain, undrain, maintenance, ready, a weight, a reload), fed to
the core as the daemon's admin API would. A request the core refuses (a
backend a reload removed, ``undrain`` in maintenance) is the operator's
mistake, not a bug: it is recorded in :attr:`Simulation.refused` and the run
goes on. At one instant operations run after the fault schedule's changes
and before anything else, in file order.

The world closer to production (each key unset leaves the run exactly as
before, draw for draw, and costs not a call per connection: the variant
handlers are chosen once, in ``__init__``):

* **Drawn faults.** ``[[sim.fault_processes]]`` are drawn once, when the run
  is built (:func:`~loble.sim._world.with_drawn_faults`, after a swarm's
  draw if any), into faults that follow the file's own: they run exactly as
  fixed ones (the last started on a backend is in force). A drawn fault's
  trace event names it by what it does (``[index, "drawn", backend,
  behaviour]``), as no line of the file has it, and so does a warning.
* **Latency per backend.** Each :class:`SimBackend` draws its own round
  trip (:attr:`SimBackend.latency`): its ``[[sim.backends]] latency``, or the
  network's very sampler, so a run without one draws as before. It applies
  to whatever crosses between Loble and that backend: connects, probes, the
  backend's EOF, the RST or FIN a fault sends. The client's side keeps the
  network's latency.
* **Requests.** With ``requests``, a connection established on a backend
  draws its schedule there and then (:meth:`RequestModel.times
  <loble.sim._world.RequestModel.times>`: the backend's service time and
  latency); its last response is its end, as a ``duration`` is without
  requests (a ``slow`` backend delays each response by its ``delay``).
  Bytes cross Loble at each request and each response, and only then: each
  crossing is told to the core as activity (a ``_TOUCH``), so a think or a
  service time past the idle timeout ends the connection with
  ``IDLE_TIMEOUT``, a timeout after its last crossing. A response counts as
  completed if it was in when the stream stopped: at the close, or at the
  fault that stopped the stream first (``crash``, ``reset``, ``kill``,
  ``host_down`` at its start; ``accept_hang`` at the connect: it answers
  nothing), so a connection cut early (reset, a kill's FIN, a silent host
  and then the idle timeout, the drain deadline, a removal) completed
  ``completed_requests(ends, elapsed)`` and lost the rest
  (:meth:`Simulation._close_requests`). A connection that never reached a
  backend sent no request: it counts in the client's view, not here.
* **Client timeouts and retries.** With ``connect_timeout`` or ``retries``
  a client is followed across its connections. Its give-up is its own
  timer (a ``_GIVE_UP`` event at its arrival plus ``connect_timeout``, no
  jitter: it is not the daemon's loop): still not through to a backend
  then, it resets, which the core hears as ``client_error`` (no verdict
  on the backend: a client timeout shorter than Loble's connect timeout
  hides a dead backend from the passive checks). A connection that failed
  before carrying anything (no backend, connect failed, the client's own
  give-up, refused by the kernel during the drain or after the stop) is
  retried after a draw of ``retry_backoff``, as a new connection of the
  same client, up to ``retries`` times; any other end (completed, reset,
  cut, idle) is a client that got through. The client learns of a refusal
  at once (Loble is next to it). ``arrived`` counts every connection, so
  outcomes still add up to it; :attr:`clients` counts first attempts. The
  run does not end while a retry is due; after the stop, retries meet the
  kernel like new arrivals (:meth:`_after_stop_clients`).
* **Timer jitter.** The loop wakes for the core's earliest deadline a draw
  of ``timer_jitter`` late (:meth:`_late`: a function of the seed and the
  deadline, so asking again, or asking at every step, finds the same
  wake-up), and handles every timer due by
  then; the simulator's events due before that wake-up run first, as a busy
  daemon's I/O callbacks do. The monitor is told (the deadline, the
  wake-up) and allows exactly that lateness, only until then.

Recording: a :class:`~loble.sim._timeline.Recorder` passed as ``recorder``
keeps what a plot needs and nothing else does (outcomes, active connections
and connect latency per time bin). Like the trace, it wraps the handlers of
the outputs it reads; without one, not a call is added to the run.

A run ends when the process has stopped after a shutdown, when clients have
stopped arriving (``sim.duration``), no connection is open and no retry is
due, or at
``duration + settle`` at the latest. After the process stopped, clients
still arrive until ``sim.duration``: each is counted, refused by the kernel
(:attr:`Simulation.refused_after_stop`), and takes no step.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from typing import Any, Protocol

from loble.core import (
    AdminInput,
    AdminStateChanged,
    BackendEjected,
    BackendForgotten,
    BackendReturned,
    BackendStateChanged,
    Balancer,
    CloseConnection,
    ConnectBackend,
    ConnectFailed,
    ConnectionClosed,
    ConnectionQueued,
    ConnectRedispatched,
    FirstByteTimeout,
    HealthReport,
    LobleError,
    MaxConnectionsChanged,
    Outcome,
    Output,
    PanicChanged,
    ProbeBackend,
    ProbeCheck,
    ProxyCore,
    Reconfigured,
    ShutdownFinished,
    ShutdownStarted,
    ShutdownWrite,
    Side,
    SnapshotPublished,
    StopAccepting,
    WeightChanged,
)

from ._monitor import CORE_INPUTS, Monitor
from ._scenario import ALL_BACKENDS, Fault, Operation, Scenario
from ._world import RequestModel, completed_requests, latency_samplers, with_drawn_faults

__all__ = ["Recording", "SimBackend", "Simulation", "SimulationError"]


class Recording(Protocol):
    """What the engine tells a recorder as outputs pass (``_timeline.Recorder`` is one).

    The engine names only this, so the recorder, which reads the finished
    :class:`Simulation`, sits above the engine rather than beside it.
    """

    def closed(self, event: ConnectionClosed) -> None: ...

    def active(self, address: str, now: float, count: int) -> None: ...

    def admin_changed(self, now: float, address: str, state: str) -> None: ...

    def member(self, now: float, address: str, what: str) -> None: ...


# Event kinds, indexes into the handler table.
_ARRIVAL = 0
_CONNECT_OK = 1
_CONNECT_REFUSED = 2
_CLIENT_EOF = 3
_BACKEND_EOF = 4
_BACKEND_RESET = 5
_TOUCH = 6
_PROBE_RESULT = 7
_FAULT = 8
_FAULT_END = 9
_SHUTDOWN = 10
_ARRIVALS_END = 11
_OPERATION = 12
_GIVE_UP = 13
_RETRY = 14
_FIRST_BYTE = 15
EVENT_NAMES = (
    "arrival",
    "connect_ok",
    "connect_refused",
    "client_eof",
    "backend_eof",
    "backend_reset",
    "touch",
    "probe_result",
    "fault",
    "fault_end",
    "shutdown",
    "arrivals_end",
    "operation",
    "give_up",
    "retry",
    "first_byte",
)
_ADMIN_INPUTS = {
    "drain": AdminInput.DRAIN,
    "undrain": AdminInput.UNDRAIN,
    "maintenance": AdminInput.MAINTENANCE,
    "ready": AdminInput.READY,
}

# Behaviours as small ints: the connect decision is on the hot path. The
# last two leave a connection that lands on them hanging (see _HANGS).
_UP, _CRASH, _BLACKHOLE, _RESET, _SLOW, _CAPACITY, _FLAPPING, _KILL, _HOST_DOWN, _ACCEPT_HANG = (
    range(10)
)
_HANGS = _HOST_DOWN
"""Behaviours from this code on never answer a connection once it is established."""
_BEHAVIOUR_CODES = {
    "up": _UP,
    "recover": _UP,
    "crash": _CRASH,
    "blackhole": _BLACKHOLE,
    "reset": _RESET,
    "slow": _SLOW,
    "capacity": _CAPACITY,
    "flapping": _FLAPPING,
    "kill": _KILL,
    "host_down": _HOST_DOWN,
    "accept_hang": _ACCEPT_HANG,
}
_FIRST_NAME = {code: name for name, code in reversed(_BEHAVIOUR_CODES.items())}
BEHAVIOUR_NAMES = tuple(_FIRST_NAME[code] for code in range(len(_FIRST_NAME)))
"""Each code's name, for a backend's timeline ("up", not its alias "recover")."""
_SIDE_BACKEND = Side.BACKEND  # an enum member read through its class costs ~80 ns
_COMPLETED = Outcome.COMPLETED
_RETRYABLE = (
    Outcome.NO_BACKEND,
    Outcome.CONNECT_FAILED,
    Outcome.REFUSED_SHUTTING_DOWN,
    Outcome.QUEUE_FULL,
    Outcome.QUEUE_TIMEOUT,
)
"""Outcomes after which a client tries again: refused by Loble or by the
kernel, or every attempt failed; nothing was carried (see _client_closed)."""
_CUTS = (_CRASH, _RESET, _KILL, _HOST_DOWN)
"""Behaviours that stop the streams open when they start: no response comes after."""


class SimulationError(LobleError):
    """A run could not go on (arithmetic overflow on an extreme scenario value)."""


class SimBackend:
    """One simulated upstream server: its current behaviour and its open sockets."""

    __slots__ = (
        "address",
        "behaviour",
        "bytes",
        "delay",
        "fault",
        "flap_since",
        "half_period",
        "incarnation",
        "latency",
        "limit",
        "open",
        "probability",
        "sockets",
        "timeline",
    )

    def __init__(self, address: str, latency: Callable[[], float] | None = None) -> None:
        self.address = address
        self.latency: Callable[[], float] = _no_time if latency is None else latency
        """Draws a round trip between Loble and it: its own ``[[sim.backends]]
        latency``, or the network's (the very sampler the run shares)."""
        self.behaviour = _UP
        self.delay = 0.0
        self.limit = 0
        self.probability = 0.0
        self.half_period = 1.0
        self.flap_since = 0.0
        self.fault: int | None = None
        """Index of the fault in force (the last one applied), or None."""
        self.incarnation = 0
        """Bumped when the server process dies (a crash), so an answer already
        on its way from the old process is known to be void when it lands."""
        self.open = 0
        """Connections the server has accepted and not yet closed."""
        self.sockets: dict[int, None] = {}
        """Established client connections on it, by connection id, in order."""
        self.bytes = 0.0
        self.timeline: list[tuple[float, str]] = [(0.0, "up")]

    def refuses(self, now: float) -> bool:
        """Would a connect (or probe) arriving now be refused?"""
        behaviour = self.behaviour
        if behaviour in (_CRASH, _KILL):
            return True
        if behaviour == _CAPACITY:
            return self.open >= self.limit
        if behaviour == _FLAPPING:
            return int((now - self.flap_since) / self.half_period) % 2 == 1
        return False

    def epoch(self, now: float) -> int:
        """Which life of the server answers at ``now``.

        A crash starts a new life, and so does each down half of a flapping
        period: a connect accepted by one life and delivered in another failed.
        """
        if self.behaviour == _FLAPPING:
            return self.incarnation + (int((now - self.flap_since) / self.half_period) + 1) // 2
        return self.incarnation


class Simulation:
    """One run of a scenario with one seed.

    ``trace`` is called with one JSON-ready dict per event and per output of
    the core; ``recorder`` bins what a plot needs. ``balancer`` replaces the
    scenario's ``[balancer] algorithm`` with one of your own: a factory that
    takes the run's ``random.Random`` and returns a
    :class:`~loble.core.Balancer`, as the values of
    :data:`loble.core.BALANCERS` do (a class whose ``__init__`` takes the rng
    will do). A reload that changes the algorithm puts a built-in one in its
    place, as it would in the daemon.
    """

    def __init__(
        self,
        scenario: Scenario,
        seed: int,
        *,
        trace: Callable[[dict[str, Any]], None] | None = None,
        recorder: Recording | None = None,
        peek_every_step: bool = False,
        balancer: Callable[[random.Random], Balancer] | None = None,
    ) -> None:
        # The failures its fault processes draw for this seed join the fixed
        # faults (after them, so those keep their indexes); without processes
        # this is the very scenario.
        scenario = with_drawn_faults(scenario, seed)
        self.scenario = scenario
        self.seed = seed
        sim = scenario.sim
        self.rng = random.Random(seed)
        self.balancer_name: str = (
            scenario.config.balancer.algorithm
            if balancer is None
            else getattr(balancer, "__name__", type(balancer).__name__)
        )
        """The balancer, as the report names it: the configured algorithm, or the factory's name."""
        # The monitor reads each connection's health reports from the actions
        # and events around them, so the core makes none, but for a trace:
        # they are there for a reader of it (and change no decision).
        self.core = ProxyCore(
            scenario.config,
            self.rng,
            balancer=None if balancer is None else balancer(self.rng),
            health_reports=trace is not None,
        )
        self.monitor = Monitor(scenario.config, self.core)
        self.monitor.client_retries = sim.clients.retries
        self.monitor.client_timeout = sim.clients.connect_timeout
        self._latency = sim.network.latency.sampler(self.rng)
        self._own_latency = latency_samplers(sim, self.rng)
        """The round trip of each backend with a latency of its own."""
        self.backends = {b.address: self._sim_backend(b.address) for b in scenario.config.backends}
        self.trace = trace
        self.now = 0.0
        self.ended_at = 0.0
        self.arrived = 0
        self.arrivals_done = False
        self.shutting_down = False
        self._heap: list[tuple[Any, ...]] = []
        self._arrival: tuple[Any, ...] | None = None
        """The next client's arrival (or wake-up at a change of rate), kept
        out of the heap: there is one at a time, and every connection has one."""
        self._next_sequence = itertools.count(1).__next__
        self._duration = sim.clients.duration.sampler(self.rng)
        self._bytes = sim.clients.bytes.sampler(self.rng)
        self._half_close = sim.clients.half_close
        self._poisson = sim.clients.arrival == "poisson"
        self._phases = [(0.0, sim.clients.rate)] + [
            (phase.at, phase.rate) for phase in sim.clients.schedule
        ]
        self._scheduled_in_phase = 0
        self._arrivals_until = sim.duration
        self._expovariate = self.rng.expovariate
        self.truncated: dict[int, None] = {}
        """Open connections a killed backend ended with a FIN: a stream cut short."""
        self.truncated_completed = 0
        """Connections the core saw complete whose backend had been killed mid-stream."""
        self.refused_after_stop = 0
        """Clients that arrived after the process stopped: the kernel refused them."""
        self.refused_after_stop_times: list[float] = []
        """The first and the last of those arrivals."""
        self.refused: list[tuple[float, str, str]] = []
        """Operations the core refused: (at, action, the one-line reason)."""
        self.may_end = False
        """Set once arrivals end or shutdown begins: only then can the run stop early."""
        clients = sim.clients
        # Requests on keep-alive connections (see the module docstring).
        self._requests = None if clients.requests is None else RequestModel(sim, self.rng)
        self._schedules: dict[int, tuple[float, list[float], str, list[float]]] = {}
        """Established connections with requests: when, the end of each
        request (after that), the backend, and the instants bytes cross Loble."""
        self._cut_at: dict[int, float] = {}
        """Connections whose stream a fault stopped, and when: no response after it."""
        self.requests_connections = 0
        """Connections with requests that reached a backend."""
        self.requests_completed = 0
        self.requests_lost = 0
        self.request_counts: dict[str, list[int]] = {}
        """Per backend: [requests completed, requests lost] on its connections."""
        # Clients that give up and try again.
        self._give_up_after = clients.connect_timeout
        self._retry_limit = clients.retries
        self.clients_model = clients.connect_timeout is not None or clients.retries > 0
        """Clients are followed across connections (a timeout or retries are set)."""
        self._backoff = clients.retry_backoff.sampler(self.rng)
        self.clients = 0
        """Clients that arrived (first connections; with retries, ``arrived`` counts every one)."""
        self.retried = 0
        """Connections that were a client's retry."""
        self.gave_up = 0
        """Connections whose client gave up at its connect timeout."""
        self.clients_rescued = 0
        """Clients a retry got through after a failed connection."""
        self.clients_failed = 0
        """Clients whose last try failed with no retry left."""
        self.retrying = 0
        """Retries scheduled and not yet made (the run waits for them)."""
        self._client_of: dict[int, tuple[int, int]] = {}
        """Open connections of followed clients: (client, its try)."""
        self._gave_up: dict[int, None] = {}
        """Connections whose client gave up, until their close."""
        # Timer jitter: how late the loop wakes for the core's timers.
        jitter = sim.timer_jitter
        # A generator of its own, seeded afresh for each wake-up (see _late).
        self._jitter_rng = random.Random()
        self._jitter = None if jitter is None else jitter.sampler(self._jitter_rng)
        self._late_for: float | None = None
        """The core deadline the loop's next wake-up is for, or None."""
        self._late_at = 0.0
        """When that wake-up comes: the deadline plus one draw of the jitter."""
        # The soonest any core call can file a timer for (ProxyCore.timer_lead);
        # the loop relies on it to skip next_deadline().
        self._peek_every_step = peek_every_step
        lead = self.core.timer_lead(shutdown_possible=sim.shutdown_at is not None)
        self._timer_lead = 0.0 if peek_every_step else lead
        idle = scenario.config.timeouts.idle
        self._touch_every = idle / 2
        self._sockets: dict[int, tuple[SimBackend, float, int, int]] = {}
        """Established connections: the backend holding each, its bytes, and
        the sequence number and kind of the event that ends it (0 and
        ``_TOUCH`` once it hangs: nothing will)."""
        monitor = self.monitor
        self._dispatch: dict[type, Callable[[Any, float], None]] = {
            HealthReport: _ignore,  # made only for a trace: the monitor has read it already
            ConnectBackend: self._connect,
            ConnectionClosed: (
                self._client_closed if self.clients_model else monitor.connection_closed
            ),
            ConnectFailed: monitor.connect_failed,
            CloseConnection: self._close if self._requests is None else self._close_requests,
            ShutdownWrite: self._shutdown_write,
            BackendStateChanged: monitor.state_changed,
            SnapshotPublished: monitor.snapshot_published,
            ProbeBackend: self._probe,
            StopAccepting: self._stop_accepting,
            ShutdownStarted: monitor.shutdown_started,
            ShutdownFinished: monitor.finished_shutdown,
            AdminStateChanged: monitor.admin_changed,
            WeightChanged: monitor.weight_changed,
            Reconfigured: self._reconfigured,
            BackendForgotten: monitor.forgotten,
            PanicChanged: monitor.panic_changed,
            BackendEjected: monitor.backend_ejected,
            BackendReturned: monitor.backend_returned,
            ConnectRedispatched: monitor.connect_redispatched,
            ConnectionQueued: monitor.connection_queued,
            FirstByteTimeout: monitor.first_byte_timeout,
            MaxConnectionsChanged: monitor.max_connections_changed,
        }
        self.recorder = recorder
        if recorder is not None:
            self._record(recorder)
        if trace is not None:
            self._dispatch = {
                kind: self._traced(handler) for kind, handler in self._dispatch.items()
            }
        # A key left unset keeps the handler it always had: not a branch more
        # per connection (the variants are chosen here, once).
        requests = self._requests is not None
        # Client addresses, for hashing: a generator of their own, so the
        # run's own draws stay as they were.
        self.population = clients.population
        self._address_rng = random.Random(f"loble-clients:{seed}")
        self._address_of: dict[int, str] = {}
        """Followed clients still trying: the address their retries reuse."""
        self._watches = self.core.watches_first_byte
        on_arrival = self._on_arrival if not self.population else self._on_hashed_arrival
        on_connect_ok = self._on_connect_ok_requests if requests else self._on_connect_ok
        on_touch = self._on_request_touch if requests else self._on_touch
        if self._watches:
            self._plain_connect_ok = on_connect_ok
            on_connect_ok = self._on_connect_ok_watched
        self._handlers: tuple[Callable[[tuple[Any, ...], float], None], ...] = (
            self._on_client_arrival if self.clients_model else on_arrival,
            on_connect_ok,
            self._on_connect_refused,
            self._on_client_eof,
            self._on_backend_eof,
            self._on_backend_reset,
            on_touch,
            self._on_probe_result,
            self._on_fault,
            self._on_fault_end,
            self._on_shutdown,
            self._on_arrivals_end,
            self._on_operation,
            self._on_give_up,
            self._on_retry,
            self._on_first_byte,
        )

    @property
    def requests_open(self) -> int:
        """Requests on connections still open: neither completed nor lost (yet)."""
        return sum(len(schedule[1]) for schedule in self._schedules.values())

    # -- running ---------------------------------------------------------------------------

    def run(self) -> Simulation:
        """Run to the end; read :attr:`monitor` (or build a report) afterwards."""
        sim = self.scenario.sim
        # Scheduled first, so at any instant the fault schedule changes before
        # anything else happens then: every start in file order, then every
        # end (an end that finds a later fault in force does nothing).
        drawn_from = len(sim.faults) - sim.drawn_faults
        for index, fault in enumerate(sim.faults):
            if index < drawn_from:
                self._schedule(fault.at, _FAULT, index)
            else:  # the trace names a drawn fault by what it does: no file line has it
                self._schedule(fault.at, _FAULT, index, "drawn", fault.backend, fault.behaviour)
        for index, fault in enumerate(sim.faults):
            if fault.until is not None:
                self._schedule(fault.until, _FAULT_END, index)
        for index, operation in enumerate(sim.operations):
            self._schedule(operation.at, _OPERATION, index)
        self._arrival = (0.0, self._next_sequence(), _ARRIVAL, False)
        self._schedule(sim.duration, _ARRIVALS_END)
        if sim.shutdown_at is not None:
            self._schedule(sim.shutdown_at, _SHUTDOWN)
        try:
            self._apply(self.core.start(0.0), 0.0)
            self.monitor.end_step()
            self._loop(sim.duration + sim.settle)
            if self.core.stopped:
                if self.clients_model:
                    self._after_stop_clients(sim.duration + sim.settle)
                else:
                    self._after_stop()
        except LobleError as error:
            # The core raises only on an input its tables have no row for: a
            # driver or core bug, reported as a failed invariant, not a crash.
            self.monitor.violate(CORE_INPUTS, f"{type(error).__name__}: {error}")
            self.ended_at = self.now  # the run stops here
        except ArithmeticError as error:
            # A value so extreme that float arithmetic gave up (the scenario
            # check bounds every parameter; this is the backstop): one line
            # that names the run, never a traceback.
            raise SimulationError(
                f"scenario {self.scenario.name!r}, seed {self.seed}: "
                f"{type(error).__name__} at step {self.monitor.step}, t={self.now:.6f}: {error}"
            ) from None
        self.monitor.end_run()
        return self

    def _loop(self, horizon: float) -> None:
        heap = self._heap
        core = self.core
        control = core.control
        monitor = self.monitor
        handlers = self._handlers
        next_deadline = core.next_deadline
        wake_bound = core.wake_bound
        handle_timer = core.handle_timer
        apply = self._apply
        end_step = monitor.end_step
        pop = heapq.heappop
        trace = self.trace
        lead = self._timer_lead
        jitter = self._jitter
        infinity = math.inf
        due: float | None = None
        floor = -infinity
        step = 0
        while True:
            # The next event: the heap's first, or the next client's arrival,
            # which waits outside the heap (one a step, its sequence number
            # drawn when it was scheduled, so ties fall as if it were inside).
            arrival = self._arrival
            event: tuple[Any, ...] | None
            if heap:
                event = heap[0]
                if arrival is not None and arrival < event:
                    event = arrival
            else:
                event = arrival
            # Asking the core for its deadline at every step costs a tenth of
            # the run. Every timer the core files is at least `lead` after the
            # call that files it (ProxyCore.wake_bound), so after asking once,
            # an event earlier than `floor` must still come first: skip the
            # question.
            if event is None or event[0] >= floor:
                due = next_deadline()
                floor = wake_bound(self.now, due, lead=lead)
                if jitter is not None and due is not None:
                    due = self._late(due)  # the loop wakes late for it
            if event is not None and (due is None or event[0] <= due):
                now = event[0]
                if now > horizon:
                    break
                if event is arrival:
                    self._arrival = None
                else:
                    pop(heap)
                step += 1
                monitor.step = step
                monitor.now = self.now = now
                if trace is not None:
                    trace(_event_record(step, now, event))
                kind = event[2]
                handlers[kind](event, now)
                if kind == _OPERATION:
                    # A reload may change every timing: ask again, on the new lead.
                    lead = self._timer_lead
                    floor = -infinity
            elif due is not None:
                now = due
                if now > horizon:
                    break
                step += 1
                monitor.step = step
                monitor.now = self.now = now
                if trace is not None:
                    trace({"step": step, "t": now, "event": "core_timer"})
                monitor.timer_step = True
                apply(handle_timer(now), now)
                monitor.timer_step = False
                if jitter is not None:
                    self._late_for = monitor.late_wake = None  # that wake-up came
                floor = -infinity  # handle_timer re-files timers anywhere after now
            else:
                break
            # Most steps leave end_step nothing to check (see Monitor.pending).
            if (
                monitor.pending
                or now > monitor.connect_check_at
                or control.snapshot.version != monitor.version
            ):
                end_step()
            if self.may_end and (
                core.stopped or (self.arrivals_done and not core.in_flight and not self.retrying)
            ):
                break
        self.ended_at = self.now

    def _late(self, due: float) -> float:
        """When the loop wakes for the core's earliest deadline ``due``.

        The lateness is a draw from a generator seeded by the run's seed and
        the deadline itself, so it is a function of the two: it does not
        depend on when (or how often) the loop asks for the deadline, which
        the loop skips when it can (``peek_every_step`` gives the same run),
        and the run's own generator draws nothing for it. The monitor is
        told the deadline and the wake-up, so its checks of timeouts on time
        allow exactly that lateness, and only until then.
        """
        if due != self._late_for:
            jitter = self._jitter
            assert jitter is not None  # called only with timer jitter
            self._jitter_rng.seed(
                f"loble-jitter:{self.seed}:{due!r}"
            )  # a str seeds alike everywhere
            self._late_for = due
            self._late_at = due + jitter()
            self.monitor.late_wake = (due, self._late_at)
        return self._late_at

    def _after_stop(self) -> None:
        """The process has stopped and nothing listens: clients go on arriving.

        Each one that arrives before ``sim.duration`` is refused by the kernel
        (a RST to its SYN) and counted, not lost. No core call and no step:
        only the arrivals' own draws, so nothing before the stop changes.
        Every other event left is dropped: its process is gone.
        """
        trace = self.trace
        times = self.refused_after_stop_times
        while self._arrival is not None:
            event, self._arrival = self._arrival, None
            now = event[0]
            if event[3]:
                self.arrived += 1
                self.refused_after_stop += 1
                if times:
                    times[1:] = [now]
                else:
                    times.append(now)
                if trace is not None:
                    trace({"step": self.monitor.step, "t": now, "event": "arrival",
                           "args": [True], "refused": "kernel: the process stopped"})  # fmt: skip
            self._next_arrival(now)

    def _schedule(self, at: float, kind: int, *payload: Any) -> None:
        # The hot handlers inline this push (same tuple shape) to save a call.
        heapq.heappush(self._heap, (at, self._next_sequence(), kind, *payload))

    def _apply(self, outputs: list[Output], now: float) -> None:
        dispatch = self._dispatch
        for output in outputs:
            dispatch[type(output)](output, now)

    def _traced(self, handler: Callable[[Any, float], None]) -> Callable[[Any, float], None]:
        trace = self.trace
        assert trace is not None

        def traced(output: Any, now: float) -> None:
            trace({"step": self.monitor.step, "t": now, "output": type(output).__name__,
                   **_fields(output)})  # fmt: skip
            handler(output, now)

        return traced

    def _record(self, recorder: Recording) -> None:
        """Feed ``recorder`` the outputs it bins (for ``--plot``).

        Like the trace, it wraps the handlers of the outputs it reads, so a
        run without a recorder runs the very same code as before.
        """
        dispatch = self._dispatch
        monitor = self.monitor
        active = monitor.active
        connect = dispatch[ConnectBackend]
        failed = dispatch[ConnectFailed]
        closed = dispatch[ConnectionClosed]
        admin = dispatch[AdminStateChanged]
        reconfigured = dispatch[Reconfigured]
        forgotten = dispatch[BackendForgotten]

        # An attempt starts with its ConnectBackend and ends with its
        # ConnectFailed or its connection's close: the active count moves then.
        def on_connect(output: ConnectBackend, now: float) -> None:
            connect(output, now)
            address = output.backend.address
            recorder.active(address, now, active[address])

        def on_failed(output: ConnectFailed, now: float) -> None:
            failed(output, now)
            recorder.active(output.backend, now, active[output.backend])

        def on_closed(output: ConnectionClosed, now: float) -> None:
            holding = output.connection_id in monitor.holding
            closed(output, now)
            recorder.closed(output)
            if holding and output.backend is not None:
                recorder.active(output.backend, now, active[output.backend])

        def on_admin(output: AdminStateChanged, now: float) -> None:
            admin(output, now)
            recorder.admin_changed(now, output.address, output.new.value)

        def on_reconfigured(output: Reconfigured, now: float) -> None:
            reconfigured(output, now)
            for address in output.added:
                recorder.member(now, address, monitor.state[address].value)
            for address in output.removed:
                recorder.member(now, address, "removed")

        def on_forgotten(output: BackendForgotten, now: float) -> None:
            forgotten(output, now)
            recorder.member(now, output.address, "gone")

        dispatch[ConnectBackend] = on_connect
        dispatch[ConnectFailed] = on_failed
        dispatch[ConnectionClosed] = on_closed
        dispatch[AdminStateChanged] = on_admin
        dispatch[Reconfigured] = on_reconfigured
        dispatch[BackendForgotten] = on_forgotten

    # -- clients -----------------------------------------------------------------------------

    def _on_arrival(self, event: tuple[Any, ...], now: float) -> None:
        if event[3]:
            self.arrived += 1
            connection_id, outputs = self.core.accept(now)
            self.monitor.accepted_connection(connection_id, outputs)
            dispatch = self._dispatch
            for output in outputs:
                dispatch[type(output)](output, now)
        self._next_arrival(now)

    def _client(self, address: str | None = None) -> tuple[str, int]:
        """A client's address and a fresh source port (``[sim.clients] population``)."""
        rng = self._address_rng
        if address is None:
            index = rng.randrange(self.population)
            address = f"198.18.{index >> 8}.{index & 255}"
        return address, rng.randrange(32768, 61000)

    def _on_hashed_arrival(self, event: tuple[Any, ...], now: float) -> None:
        """:meth:`_on_arrival` with a population: the core is told who the client is."""
        if event[3]:
            self.arrived += 1
            client = self._client()
            connection_id, outputs = self.core.accept(now, client=client)
            self.monitor.client_address[connection_id] = client[0]
            self.monitor.accepted_connection(connection_id, outputs)
            self._apply(outputs, now)
        self._next_arrival(now)

    def _next_arrival(self, now: float) -> None:
        """Schedule the next client, or a wake-up at the next change of rate.

        Constant arrivals are spaced exactly ``1 / rate`` from the start of their
        phase (computed, not accumulated, so no rounding drift); Poisson gaps
        are exponential, and a Poisson process is memoryless, so restarting it
        at a change of rate is exact.
        """
        phases = self._phases
        while len(phases) > 1 and phases[1][0] <= now:
            phases.pop(0)
            self._scheduled_in_phase = 0
        start, rate = phases[0]
        change = phases[1][0] if len(phases) > 1 else math.inf
        until = self._arrivals_until
        if rate > 0:
            if self._poisson:
                at = now + self._expovariate(rate)
            else:
                at = start + self._scheduled_in_phase / rate
                self._scheduled_in_phase += 1
            if at < change:
                if at < until:
                    self._arrival = (at, self._next_sequence(), _ARRIVAL, True)
                return
        if change < until:
            self._arrival = (change, self._next_sequence(), _ARRIVAL, False)

    def _on_arrivals_end(self, event: tuple[Any, ...], now: float) -> None:
        self.arrivals_done = self.may_end = True

    # -- clients that give up and try again -----------------------------------------------------

    def _on_client_arrival(self, event: tuple[Any, ...], now: float) -> None:
        """:meth:`_on_arrival` for a scenario whose clients time out or retry."""
        if event[3]:
            self.clients += 1
            self._client_connects(self.clients, 1, now)
        self._next_arrival(now)

    def _client_connects(self, client: int, attempt: int, now: float) -> None:
        """Try ``attempt`` (1 for the first) of ``client``: a new connection to Loble."""
        self.arrived += 1
        monitor = self.monitor
        monitor.client_attempt(client, attempt)
        if self.population:
            # A returning client comes back from the address it had.
            address, port = self._client(self._address_of.get(client))
            self._address_of[client] = address
            connection_id, outputs = self.core.accept(now, client=(address, port))
            monitor.client_address[connection_id] = address
        else:
            connection_id, outputs = self.core.accept(now)
        # Known before its outputs run: a refusal closes it among them.
        self._client_of[connection_id] = (client, attempt)
        monitor.accepted_connection(connection_id, outputs)
        self._apply(outputs, now)
        timeout = self._give_up_after
        if timeout is not None and connection_id in self._client_of:
            self._schedule(now + timeout, _GIVE_UP, connection_id)

    def _on_give_up(self, event: tuple[Any, ...], now: float) -> None:
        """The client's connect timeout: still not through to a backend, it resets."""
        connection_id = event[3]
        if connection_id not in self._client_of or connection_id in self._sockets:
            return  # closed already, or established: the client has its backend
        self.gave_up += 1
        self._gave_up[connection_id] = None
        self.monitor.client_gave_up(connection_id, now)
        self._apply(self.core.client_error(connection_id, now), now)

    def _client_closed(self, event: ConnectionClosed, now: float) -> None:
        """A followed client's connection ended: through, or failed (then maybe a retry).

        Failed means closed before a byte was carried: refused by Loble (no
        backend, or every attempt failed), refused by the kernel during the
        drain, or given up by the client at its connect timeout. Anything
        else (completed, reset, cut, idle) is a client that got through.
        """
        monitor = self.monitor
        monitor.connection_closed(event, now)
        connection_id = event.connection_id
        entry = self._client_of.pop(connection_id)  # every connection is a client's here
        gave_up = connection_id in self._gave_up
        if gave_up:
            del self._gave_up[connection_id]
        monitor.client_closed(event, gave_up)
        self._client_ended(entry[0], entry[1], gave_up or event.outcome in _RETRYABLE, now)

    def _client_ended(self, client: int, attempt: int, failed: bool, now: float) -> None:
        if self._address_of and (not failed or attempt > self._retry_limit):
            self._address_of.pop(client, None)
        if not failed:
            if attempt > 1:
                self.clients_rescued += 1
            self.monitor.client_finished(client)
        elif attempt <= self._retry_limit:
            self.retrying += 1
            self._schedule(now + self._backoff(), _RETRY, client, attempt + 1)
        else:
            self.clients_failed += 1
            self.monitor.client_finished(client)

    def _on_retry(self, event: tuple[Any, ...], now: float) -> None:
        self.retrying -= 1
        self.retried += 1
        self._client_connects(event[3], event[4], now)

    def _after_stop_clients(self, horizon: float) -> None:
        """:meth:`_after_stop` for clients that retry: their retries meet the kernel too.

        New clients arrive until ``sim.duration`` and retries come when they
        are due (until the run's horizon), in time order: each is refused by
        the kernel, counted, and, with a retry left, tries again after its
        backoff. Every other event left is dropped.
        """
        heap = self._heap
        heap[:] = [event for event in heap if event[2] == _RETRY]
        heapq.heapify(heap)
        trace = self.trace
        times = self.refused_after_stop_times
        while True:
            arrival = self._arrival
            if arrival is not None and (not heap or arrival < heap[0]):
                event, self._arrival = arrival, None
                self._next_arrival(event[0])
                if not event[3]:
                    continue  # a change of rate
                self.clients += 1
                client, attempt = self.clients, 1
            elif heap and heap[0][0] <= horizon:  # later ones are still due at the end
                event = heapq.heappop(heap)
                self.retrying -= 1
                self.retried += 1
                client, attempt = event[3], event[4]
            else:
                break
            now = event[0]
            self.arrived += 1
            self.refused_after_stop += 1
            if times:
                times[1:] = [now]
            else:
                times.append(now)
            if trace is not None:
                record = _event_record(self.monitor.step, now, event)
                record["refused"] = "kernel: the process stopped"
                trace(record)
            self.monitor.client_attempt(client, attempt)
            self._client_ended(client, attempt, True, now)

    def _on_client_eof(self, event: tuple[Any, ...], now: float) -> None:
        connection_id = event[3]
        self.monitor.activity(connection_id, now)
        dispatch = self._dispatch
        for output in self.core.client_eof(connection_id, now):
            dispatch[type(output)](output, now)

    def _on_backend_eof(self, event: tuple[Any, ...], now: float) -> None:
        connection_id = event[3]
        self.monitor.activity(connection_id, now)
        dispatch = self._dispatch
        for output in self.core.backend_eof(connection_id, now):
            dispatch[type(output)](output, now)

    def _on_backend_reset(self, event: tuple[Any, ...], now: float) -> None:
        self._apply(self.core.backend_error(event[3], now), now)

    def _on_touch(self, event: tuple[Any, ...], now: float) -> None:
        connection_id, until = event[3], event[4]
        if connection_id in self._sockets:
            self.monitor.activity(connection_id, now)
            self.core.touch(connection_id, now)
            # Never at or before now: with an idle timeout below the clock's
            # resolution, now + idle/2 == now and the run would stand still.
            at = now + self._touch_every
            if now < at < until:
                self._schedule(at, _TOUCH, connection_id, until)

    def _shutdown_write(self, action: ShutdownWrite, now: float) -> None:
        # One side sent EOF; the other finishes what it was sending and closes.
        if action.side is _SIDE_BACKEND:
            backend = self._sockets[action.connection_id][0]  # established, or no EOF to shut
            delay = backend.delay if backend.behaviour == _SLOW else 0.0
            at = now + backend.latency() + delay
            kind = _BACKEND_EOF
        else:
            at, kind = now + self._latency(), _CLIENT_EOF
        heapq.heappush(self._heap, (at, self._next_sequence(), kind, action.connection_id))

    def _close(self, action: CloseConnection, now: float) -> None:
        socket = self._sockets.pop(action.connection_id, None)
        if socket is not None:
            backend, moved = socket[0], socket[1]
            backend.open -= 1
            del backend.sockets[action.connection_id]
            backend.bytes += moved
        # A stream a killed backend's FIN ended early, which the core saw end normally.
        truncated = self.truncated
        if truncated and truncated.pop(action.connection_id, 1) is None and not action.reset:
            self.truncated_completed += 1

    # -- backends ------------------------------------------------------------------------------

    def _connect(self, action: ConnectBackend, now: float) -> None:
        self.monitor.connect_started(action, now)
        backend = self.backends[action.backend.address]
        behaviour = backend.behaviour
        if behaviour in (_BLACKHOLE, _HOST_DOWN):
            return  # the SYN goes nowhere: the core's connect timeout decides
        at = now + backend.latency()
        if behaviour == _UP:  # the common case: none of the checks below apply
            epoch = backend.incarnation
        else:
            if backend.refuses(now):
                self._schedule(at, _CONNECT_REFUSED, action.connection_id, action.attempt)
                return
            if behaviour == _SLOW:
                at += backend.delay
            epoch = backend.epoch(now)
        backend.open += 1
        event = (
            at,
            self._next_sequence(),
            _CONNECT_OK,
            action.connection_id,
            action.attempt,
            backend,
            epoch,
        )
        heapq.heappush(self._heap, event)

    def _on_connect_ok(self, event: tuple[Any, ...], now: float) -> None:
        connection_id, attempt, backend = event[3], event[4], event[5]
        behaviour = backend.behaviour
        epoch = backend.epoch(now) if behaviour == _FLAPPING else backend.incarnation
        if epoch != event[6]:
            # The process that accepted this connect died (or flapped down)
            # while the answer was on its way: the client sees the connect fail.
            backend.open -= 1
            self._apply(self.core.connect_failed(connection_id, attempt, now), now)
            return
        outputs = self.core.connected(connection_id, attempt, now)
        if outputs is None:
            backend.open -= 1  # stale: the core gave up on this attempt; hang up
            return
        self.monitor.connected(connection_id, now)
        moved = self._bytes()
        backend.sockets[connection_id] = None
        dispatch = self._dispatch
        for output in outputs:
            dispatch[type(output)](output, now)
        if behaviour >= _HANGS:
            # Silent host, or a process that never reads what it accepted:
            # nothing more happens on this connection until a timeout.
            self._sockets[connection_id] = (backend, moved, 0, _TOUCH)
            return
        duration = self._duration()
        end = now + duration
        rng = self.rng
        sequence = self._next_sequence()
        if behaviour == _RESET and rng.random() < backend.probability:
            at, kind = now + duration * rng.random(), _BACKEND_RESET
        else:
            at = end
            kind = _CLIENT_EOF if rng.random() < self._half_close else _BACKEND_EOF
        heapq.heappush(self._heap, (at, sequence, kind, connection_id))
        # The sequence number and kind of its end, so a fault can find it.
        self._sockets[connection_id] = (backend, moved, sequence, kind)
        touch_every = self._touch_every
        if duration > touch_every and now + touch_every > now:
            self._schedule(now + touch_every, _TOUCH, connection_id, end)

    def _on_connect_ok_requests(self, event: tuple[Any, ...], now: float) -> None:
        """:meth:`_on_connect_ok` with requests: the connection lasts its schedule.

        (Its first half is :meth:`_on_connect_ok`'s, kept in step by hand: the
        plain one is the hot path and calls nothing it need not.)
        """
        connection_id, attempt, backend = event[3], event[4], event[5]
        behaviour = backend.behaviour
        epoch = backend.epoch(now) if behaviour == _FLAPPING else backend.incarnation
        if epoch != event[6]:
            backend.open -= 1
            self._apply(self.core.connect_failed(connection_id, attempt, now), now)
            return
        outputs = self.core.connected(connection_id, attempt, now)
        if outputs is None:
            backend.open -= 1
            return
        self.monitor.connected(connection_id, now)
        moved = self._bytes()
        backend.sockets[connection_id] = None
        self._apply(outputs, now)
        assert self._requests is not None
        ends, sends = self._requests.times(backend.address)
        if behaviour == _SLOW:
            # Each response comes `delay` late, and the requests after it with it.
            delay = backend.delay
            ends = [end + delay * (index + 1) for index, end in enumerate(ends)]
            sends = [sent + delay * index for index, sent in enumerate(sends)]
        # Bytes cross Loble when a request goes and when its response comes.
        crossings = [instant for pair in zip(sends, ends, strict=True) for instant in pair]
        crossings.pop()  # the last response's end is the connection's own end event
        self._schedules[connection_id] = (now, ends, backend.address, crossings)
        self.requests_connections += 1
        if behaviour >= _HANGS:
            # It accepted and will answer nothing: every request is lost.
            self._cut_at[connection_id] = now
            self._sockets[connection_id] = (backend, moved, 0, _TOUCH)
            return
        duration = ends[-1]
        rng = self.rng
        sequence = self._next_sequence()
        if behaviour == _RESET and rng.random() < backend.probability:
            at, kind = now + duration * rng.random(), _BACKEND_RESET
        else:
            at = now + duration
            kind = _CLIENT_EOF if rng.random() < self._half_close else _BACKEND_EOF
        heapq.heappush(self._heap, (at, sequence, kind, connection_id))
        self._sockets[connection_id] = (backend, moved, sequence, kind)
        self._plan_touch(connection_id, 0, now)

    def _on_connect_ok_watched(self, event: tuple[Any, ...], now: float) -> None:
        """A connect's answer with ``first_byte_timeout``: the first bytes each way.

        The client speaks first, as it connects; without requests the
        backend's first bytes cross a round trip later (a slow backend's
        ``delay`` on top), and never from a backend that answers nothing once
        connected. With requests they are the first request and response
        (the response's end, as the request's schedule has it).
        """
        self._plain_connect_ok(event, now)
        connection_id = event[3]
        socket = self._sockets.get(connection_id)
        if socket is None or connection_id not in self.core.connections:
            return  # failed, stale, or closed at once
        self.core.client_sent(connection_id, now)
        backend = socket[0]
        if backend.behaviour >= _HANGS:
            return  # it answers nothing: the first-byte timeout will tell
        schedule = self._schedules.get(connection_id)
        if schedule is not None:
            at = now + schedule[1][0]  # the first response
        else:
            at = now + backend.latency() + (backend.delay if backend.behaviour == _SLOW else 0.0)
        self._schedule(at, _FIRST_BYTE, connection_id)

    def _on_first_byte(self, event: tuple[Any, ...], now: float) -> None:
        connection_id = event[3]
        if connection_id in self._sockets and self._cut_at.get(connection_id, now) >= now:
            self.core.backend_sent(connection_id, now)

    def _plan_touch(self, connection_id: int, index: int, last: float) -> None:
        """Schedule the connection's next activity: its next crossing after ``last``.

        Every crossing (a request sent, a response in) is told to the core,
        so its idle deadline is always the daemon's: a think or a service
        time longer than the idle timeout is cut by it, exactly a timeout
        after the last crossing, and a host that goes silent leaves the last
        crossing before it as the connection's last activity.
        """
        t0, _, _, crossings = self._schedules[connection_id]
        count = len(crossings)
        while index < count and t0 + crossings[index] <= last:
            index += 1
        if index < count:
            self._schedule(t0 + crossings[index], _TOUCH, connection_id, index + 1)

    def _on_request_touch(self, event: tuple[Any, ...], now: float) -> None:
        connection_id = event[3]
        if connection_id in self._sockets:
            self.monitor.activity(connection_id, now)
            self.core.touch(connection_id, now)
            self._plan_touch(connection_id, event[4], now)

    def _close_requests(self, action: CloseConnection, now: float) -> None:
        """:meth:`_close`, then count the connection's requests completed and lost.

        A response counts if it was in when the stream stopped: at the close
        (the last response is in before a completed close), or at the fault
        that stopped it earlier (a kill, a reset, a silent host, an accept
        that never answers), whichever came first.
        """
        self._close(action, now)
        connection_id = action.connection_id
        schedule = self._schedules.pop(connection_id, None)
        if schedule is None:
            return  # never established: no request was sent
        t0, ends, address, _ = schedule
        cut = self._cut_at.pop(connection_id, None)
        if cut is None and action.outcome is _COMPLETED:
            done = len(ends)
        else:
            done = completed_requests(ends, (now if cut is None else min(cut, now)) - t0)
        lost = len(ends) - done
        self.requests_completed += done
        self.requests_lost += lost
        counts = self.request_counts.setdefault(address, [0, 0])
        counts[0] += done
        counts[1] += lost

    def _on_connect_refused(self, event: tuple[Any, ...], now: float) -> None:
        self._apply(self.core.connect_failed(event[3], event[4], now), now)

    def _probe(self, action: ProbeBackend, now: float) -> None:
        backend = self.backends[action.backend.address]
        self.monitor.probe_sent(backend.address, now)
        timeout = action.timeout
        rtt = backend.latency()
        awaits_reply = action.check.awaits_reply
        if backend.behaviour == _BLACKHOLE or backend.behaviour == _HOST_DOWN:
            at, ok = now + timeout, False
        elif backend.refuses(now):
            at, ok = now + min(rtt, timeout), False
        elif awaits_reply and backend.behaviour == _ACCEPT_HANG:
            # The kernel accepts, nothing reads: a payload probe gets no reply.
            at, ok = now + timeout, False
        else:
            if awaits_reply:
                rtt += backend.latency()  # the request and its reply: one more round trip
            if backend.behaviour == _SLOW:
                rtt += backend.delay
            at, ok = (now + rtt, True) if rtt < timeout else (now + timeout, False)
        self._schedule(at, _PROBE_RESULT, backend.address, ok, backend.epoch(now))

    def _on_probe_result(self, event: tuple[Any, ...], now: float) -> None:
        address, ok = event[3], event[4]
        if ok and self.backends[address].epoch(now) != event[5]:
            ok = False  # the server that answered died before the answer landed
        self.monitor.probe_result(address, ok)
        self._apply(self.core.probe_result(address, ok, now), now)

    def _on_fault(self, event: tuple[Any, ...], now: float) -> None:
        index = event[3]
        fault = self.scenario.sim.faults[index]
        for backend in self._targets(fault):
            backend.fault = index
            self._set_behaviour(backend, fault, fault.behaviour, now)

    def _on_fault_end(self, event: tuple[Any, ...], now: float) -> None:
        # A fault lasts until the next fault on its backend or its own `until`,
        # whichever comes first: a later fault has replaced it, so its end
        # must not cancel that one.
        index = event[3]
        fault = self.scenario.sim.faults[index]
        for backend in self._targets(fault):
            if backend.fault == index:
                backend.fault = None
                self._set_behaviour(backend, fault, "up", now)

    def _targets(self, fault: Fault) -> list[SimBackend]:
        if fault.backend == ALL_BACKENDS:
            return list(self.backends.values())
        return [self.backends[fault.backend]]

    def _set_behaviour(self, backend: SimBackend, fault: Fault, name: str, now: float) -> None:
        code = _BEHAVIOUR_CODES[name]
        # Fold the lives a flapping server went through into its incarnation
        # before the behaviour (and so epoch()) changes.
        dies = code in (_CRASH, _KILL)
        backend.incarnation = backend.epoch(now) + (1 if dies else 0)
        backend.behaviour = code
        backend.delay = fault.delay
        backend.limit = fault.limit
        backend.probability = fault.probability
        backend.half_period = fault.period / 2
        backend.flap_since = now
        backend.timeline.append((now, BEHAVIOUR_NAMES[code]))
        if code == _UP or not backend.sockets:
            return
        if self._schedules and code in _CUTS:
            # The streams stop now: a response not in by now never comes.
            cut_at, schedules = self._cut_at, self._schedules
            for connection_id in backend.sockets:
                if connection_id in schedules:
                    cut_at.setdefault(connection_id, now)
        if code in (_CRASH, _RESET) or (code == _KILL and fault.unread == "all"):
            # Every open connection is reset: each client sees a RST a round trip on.
            for connection_id in backend.sockets:
                self._schedule(now + backend.latency(), _BACKEND_RESET, connection_id)
        elif code == _KILL:
            self._kill(backend, fault.unread, now)
        elif code == _HOST_DOWN:
            self._hang(backend)

    def _sim_backend(self, address: str) -> SimBackend:
        return SimBackend(address, self._own_latency.get(address, self._latency))

    def _pending_ends(self, backend: SimBackend) -> dict[int, int]:
        """The connections on ``backend`` whose own end is still to come: seq -> id."""
        sockets = self._sockets
        ends = {sockets[connection_id][2]: connection_id for connection_id in backend.sockets}
        ends.pop(0, None)  # hung already: no end of their own
        return {event[1]: ends[event[1]] for event in self._heap if event[1] in ends}

    def _drop(self, doomed: Callable[[tuple[Any, ...]], bool]) -> None:
        """Take every event ``doomed(event)`` says out of the heap (rare: O(heap))."""
        heap = self._heap
        heap[:] = [event for event in heap if not doomed(event)]
        heapq.heapify(heap)

    def _kill(self, backend: SimBackend, unread: str, now: float) -> None:
        """The process died: the kernel closes each of its sockets.

        A socket with unread bytes is closed with RST: with ``unread =
        "senders"``, a connection whose client sends first (its EOF is its
        end) and has not sent it yet. Every other one whose stream was still
        running gets a FIN: the client reads a stream cut short that looks
        complete. One that had already half-closed ends as it would.
        """
        pending = self._pending_ends(backend)
        sockets = self._sockets
        finned: dict[int, None] = {}
        for connection_id in backend.sockets:
            kind = sockets[connection_id][3]
            if sockets[connection_id][2] not in pending:
                continue
            if unread == "senders" and kind == _CLIENT_EOF:
                self._schedule(now + backend.latency(), _BACKEND_RESET, connection_id)
            else:
                finned[connection_id] = None
        if not finned:
            return
        self._drop(lambda event: event[1] in pending and pending[event[1]] in finned)
        for connection_id in finned:
            self.truncated[connection_id] = None
            self._schedule(now + backend.latency(), _BACKEND_EOF, connection_id)

    def _hang(self, backend: SimBackend) -> None:
        """The host went silent: its connections see nothing more, not even a touch.

        The connection's own end, its touches and any answer from the backend
        side still on its way are dropped; the idle timeout will close it.
        An EOF the client was sending back stays: the client is alive.
        """
        pending = self._pending_ends(backend)
        hung = dict.fromkeys(backend.sockets)
        from_backend = (_TOUCH, _BACKEND_EOF, _BACKEND_RESET)
        self._drop(
            lambda event: event[1] in pending or (event[2] in from_backend and event[3] in hung)
        )
        sockets = self._sockets
        for connection_id in hung:
            backend_, moved, _, _ = sockets[connection_id]
            sockets[connection_id] = (backend_, moved, 0, _TOUCH)

    # -- the operator ---------------------------------------------------------------------------

    def _on_operation(self, event: tuple[Any, ...], now: float) -> None:
        operation: Operation = self.scenario.sim.operations[event[3]]
        core = self.core
        try:
            if operation.action == "reload":
                assert operation.config is not None
                outputs = core.reconfigure(operation.config, now)
            elif operation.action == "weight":
                outputs = core.set_weight(operation.backend, operation.weight, now)
            else:
                outputs = core.admin(operation.backend, _ADMIN_INPUTS[operation.action], now)
        except LobleError as refusal:
            self.refused.append((now, operation.action, str(refusal)))
            if self.trace is not None:
                self.trace({"step": self.monitor.step, "t": now, "refused": str(refusal)})
            return
        self._apply(outputs, now)

    def _reconfigured(self, event: Reconfigured, now: float) -> None:
        config = self.core.config
        for backend in config.backends:
            if backend.address not in self.backends:
                self.backends[backend.address] = self._sim_backend(backend.address)
        # Clients keep their pace: bytes flow often enough for the shortest
        # idle timeout any open connection may be on.
        self._touch_every = min(self._touch_every, config.timeouts.idle / 2)
        if not self._peek_every_step:
            shutdown_possible = self.scenario.sim.shutdown_at is not None
            self._timer_lead = self.core.timer_lead(shutdown_possible=shutdown_possible)
        self.monitor.reconfigured(event, now)

    # -- the process ---------------------------------------------------------------------------

    def _on_shutdown(self, event: tuple[Any, ...], now: float) -> None:
        self._apply(self.core.shutdown(now), now)

    def _stop_accepting(self, action: StopAccepting, now: float) -> None:
        # The listener closes. Clients still arriving race with it and reach
        # accept(), which must refuse them: the monitor checks it does.
        self.shutting_down = self.may_end = True


def _event_record(step: int, now: float, event: tuple[Any, ...]) -> dict[str, Any]:
    arguments = [item.address if isinstance(item, SimBackend) else item for item in event[3:]]
    return {"step": step, "t": now, "event": EVENT_NAMES[event[2]], "args": arguments}


def _fields(output: Any) -> dict[str, Any]:
    """An output as JSON-ready data: enums by value, a backend by its address, a
    probe's check as text (left out when it only connects, as before payloads)."""
    data: dict[str, Any] = {}
    for name in output.__slots__:
        value = getattr(output, name)
        if isinstance(value, ProbeCheck):
            if value.connect_only:
                continue
            pattern = value.expect_regex
            value = {
                "send": value.send.decode(errors="backslashreplace"),
                "expect": value.expect.decode(errors="backslashreplace"),
                "expect_regex": "" if pattern is None else pattern.pattern.decode(),
            }
        elif hasattr(value, "address"):
            value = value.address
        elif hasattr(value, "value") and not isinstance(value, (int, float)):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        data[name] = value
    return data


def _ignore(output: object, now: float) -> None:
    """An output the simulator has nothing to do for."""


def _no_time() -> float:
    return 0.0
