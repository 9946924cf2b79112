"""The conductor: the core's one driver in the daemon, between the data path and the lifecycle.

A :class:`Conductor` owns the :class:`~loble.core.ProxyCore`, the clock it
reads and the table of connections (:class:`~._datapath.Link` by the core's
connection id). Reports from the data path (:class:`~._datapath.Reports`)
become core calls; the core's outputs are carried out in order, first come
first served:

* actions go to whoever can do them: connects, half-closes and closes to
  the data path, probes and "stop accepting" to the lifecycle's hooks;
* every output, action or event, goes first to the *listeners* that asked
  for its kind (metrics, log lines: :mod:`._metrics`, :mod:`._journal`);
* a connection's record leaves the table when the core says it closed
  (``ConnectionClosed``); the listeners read its final figures once the
  data path has also released it (its sockets closed, no copy running).

Carrying out an order can make the network answer at once (a half-close
that fails reports the broken side): that report's outputs join the back of
the queue and run after the ones before them, in the order the core made
them. A call made while outputs are being carried out is never run inside
another: a flag that says so is the whole of that rule, and a call's own
outputs go straight from its list, only those of calls made meanwhile
through the queue.

The conductor also keeps the process inside its descriptors. It counts the
connections that hold sockets (from the path's ``accepted`` to its
``released``) against a limit, the smaller of the
:class:`~._datapath.ConnectionBudget`'s ``connections`` and ``[listener]
max_connections`` (when set; a reload changes it at once): at the limit it
asks the path to pause accepting, so clients wait in the kernel's backlog
instead of being accepted (and, out of descriptors, reset for want of a
backend socket); below it again, the path resumes. An accept that fails
anyway (EMFILE: the limit lowered from outside, descriptors taken by
something else) has the path back off and retry. Either shortage is logged
once as it begins and once as it ends (:class:`Shortage`), never per client.

The PROXY protocol is the conductor's to decide (the data path reads and
writes the bytes). A client from ``[listener] accept_proxy_from`` is not
the core's yet when accepted: the path reads its header first (within
``[timeouts] idle``), and only then is it filed with the core, under the
client's address the header gave, so that every decision, log line and
header sent on carries that address. A header refused, or not complete in
time, closes that client alone, with one log line and a count by reason
(:attr:`Conductor.proxy_header_errors`). A backend with ``send_proxy`` gets
its header (:func:`loble.core.encode`) the moment its connect is agreed,
before the path moves any byte of the client's. A reload applies both to
what comes after it: clients accepted, backend connections made.

Nothing here touches a socket or an event loop: the unit tests drive a
conductor with a fake data path and a fake clock.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from loble.core import (
    AdminInput,
    CloseConnection,
    Config,
    ConnectBackend,
    ConnectionClosed,
    HeaderParser,
    Output,
    ProbeBackend,
    ProbeFailure,
    ProxyCore,
    ProxyProtocolError,
    ShutdownFinished,
    ShutdownWrite,
    Side,
    StopAccepting,
    TrustedSources,
    encode,
    send_proxy_versions,
)

from ._copy import OneWay, Pumped
from ._datapath import (
    HEADER_ERROR_REASONS,
    Attempt,
    ConnectionBudget,
    DataPath,
    Link,
    ProxyState,
    Reports,
)
from ._logging import log

__all__ = ["Conductor", "Listener", "Shortage", "Timer"]

LinkT = TypeVar("LinkT", bound=Link)

Handler = Callable[[Any], object]
"""A function of one kind of output (the kind is its key in a handler table)."""

_EOF = Pumped.EOF
_SOURCE_ERROR = Pumped.SOURCE_ERROR
_CLIENT, _BACKEND = Side.CLIENT, Side.BACKEND
_CLIENT_SPOKE, _BACKEND_SPOKE = 1, 2
"""Bits of :attr:`Link.first_bytes`: whose first bytes the core was told of."""
_BOTH_SPOKE = _CLIENT_SPOKE | _BACKEND_SPOKE

RESOURCE_WARNING_INTERVAL = 1.0
"""Seconds between two warnings that connects found no socket (one per second at most)."""


RECOVERED_SHARE = 0.75
"""A stretch at the connection limit ends (its line is logged) once the connections
open fall to this share of the limit. Accepting itself resumes below the limit:
while clients wait, it pauses again with the next accept and resumes with the
next close, and all of that is one stretch, not a line per close."""


def _recovery_point(limit: float) -> int:
    """Where a stretch at ``limit`` ends: see :data:`RECOVERED_SHARE`."""
    if limit == math.inf:
        return 0
    return max(0, min(int(limit) - 2, int(limit * RECOVERED_SHARE)))


class Shortage:
    """One stretch of time out of connections or descriptors: what its closing line says."""

    __slots__ = ("accepted", "began", "failures", "pauses")

    def __init__(self, began: float) -> None:
        self.began = began
        self.pauses = 1
        """Times accepting paused for the connection limit in this stretch."""
        self.accepted = 0
        """Clients accepted during it: they came while the proxy was full or nearly."""
        self.failures = 1
        """Accepts that failed in it (the path retries every ``ACCEPT_BACKOFF``)."""


class Timer(Protocol):
    """When the lifecycle's timer task wakes next (an ``anyio.CancelScope`` is one)."""

    deadline: float


class Listener(Protocol):
    """Something that follows the core's outputs: metrics, log lines."""

    def handlers(self) -> Mapping[type, Handler]:
        """Its function for each kind of output it wants, called in the core's order."""

    def link_accepted(self, link: Link) -> None:
        """A client connection was accepted (on ``link.listener``) and filed."""

    def backend_connected(self, address: str, seconds: float) -> None:
        """A connect to the backend at ``address`` succeeded after ``seconds``."""

    def link_dropped(self, link: Link, closed: ConnectionClosed) -> None:
        """The connection ended (``closed``) and the path released it: its final figures."""

    def probed(self, address: str, failure: ProbeFailure | None) -> None:
        """A health probe of the backend at ``address`` finished: passed (None), or why not."""


class Conductor(Generic[LinkT]):
    """Drives one :class:`~loble.core.ProxyCore` for the daemon (see the module doc).

    ``make_path`` builds the data path, given this conductor to report to.
    ``probe(action)`` starts the health probe a ``ProbeBackend`` orders, whose
    result comes back through :meth:`probe_result`; ``stop_accepting()`` closes the
    listeners; ``stopped()`` is called once the core has stopped.
    ``budget`` is how many connections the descriptors carry (None: no limit).
    """

    def __init__(
        self,
        core: ProxyCore,
        make_path: Callable[[Reports[LinkT]], DataPath[LinkT]],
        *,
        now: Callable[[], float],
        logger: logging.Logger,
        listeners: tuple[Listener, ...] = (),
        probe: Callable[[ProbeBackend], object],
        stop_accepting: Callable[[], object],
        stopped: Callable[[], object],
        budget: ConnectionBudget | None = None,
    ) -> None:
        self.core = core
        self.now = now
        """The core's clock."""
        self.logger = logger
        self.links: dict[int, LinkT] = {}
        """Open connections by the core's id: the conductor files and drops them."""
        self._timer: Timer | None = None
        self._timer_near = False
        """Whether the timer's deadline is at most the core's timer lead from the last
        call: then it stays so as time goes on, and no call need look at it again
        until the timer is replaced (:attr:`timer`)."""
        self._stop_announced = False
        """Whether the core announced its stop (``ShutdownFinished``)."""
        self._probe = probe
        self._stop_accepting = stop_accepting
        self._stopped = stopped
        self._queue: deque[Output] = deque()
        """Outputs of calls made while others are being carried out, to run after them."""
        self._carrying = False
        """Whether outputs are being carried out further up the stack."""
        self._touch_resolution = core.touch_resolution
        self._resource_warned = -math.inf
        self._resource_failures = 0
        self.budget = budget
        self.holding = 0
        """Connections holding sockets: accepted and not yet released by the path."""
        self.max_connections = core.config.listener.max_connections
        """``[listener] max_connections`` (0: none), as configured now."""
        self.connection_limit, self.limited_by = self._limit_of(self.max_connections)
        """At this many connections holding sockets, accepting pauses; and which
        limit that is: ``max_connections``, ``descriptors`` (the budget), or ``""``."""
        self._paused_at_limit = False
        """Whether the path is paused at :attr:`connection_limit`."""
        self._recovered_at = _recovery_point(self.connection_limit)
        """At this many connections or fewer, the stretch at the limit has ended: below
        ``limit - 1``, which every close reaches for a moment before the next client
        waiting in the backlog is accepted."""
        self._full: Shortage | None = None
        """The stretch at the connection limit under way, if any."""
        self._short: Shortage | None = None
        """The stretch of failing accepts under way, if any."""
        self._trusted: TrustedSources | None = None
        self._keyed = False
        """Whether the balancer hashes the client (see :meth:`_proxy_config`)."""
        """``[listener] accept_proxy_from``, or None when empty (no client is read)."""
        self._send_proxy: dict[str, int] = {}
        """The PROXY protocol version each backend is sent, by address (``send_proxy``)."""
        self._proxy_config(core.config)
        self.awaiting_header: set[LinkT] = set()
        """Clients accepted whose PROXY protocol header is not complete yet: not the core's."""
        self.proxy_header_errors: dict[str, int] = dict.fromkeys(HEADER_ERROR_REASONS, 0)
        """Clients closed for their PROXY protocol header, by reason (the metric reads it)."""
        own: dict[type, Handler] = {
            ConnectBackend: self._connect,
            ShutdownWrite: self._shutdown_write,
            CloseConnection: self._close,
            ProbeBackend: self._start_probe,
            StopAccepting: self._stop,
            ConnectionClosed: self._drop,
            ShutdownFinished: self._stop_seen,
        }
        # One table: for each kind of output, the listeners' functions first
        # (so they see a connection before its record is dropped), then the
        # conductor's own. Kinds nobody handles are simply absent.
        dispatch: dict[type, list[Handler]] = {}
        for listener in listeners:
            for kind, handler in listener.handlers().items():
                dispatch.setdefault(kind, []).append(handler)
        for kind, handler in own.items():
            dispatch.setdefault(kind, []).append(handler)
        self._dispatch = {kind: tuple(handlers) for kind, handlers in dispatch.items()}
        self._accepted_hooks = tuple(listener.link_accepted for listener in listeners)
        self._connected_hooks = tuple(listener.backend_connected for listener in listeners)
        self._dropped_hooks = tuple(listener.link_dropped for listener in listeners)
        self._probed_hooks = tuple(listener.probed for listener in listeners)
        self.active: Callable[[LinkT], None] = self._active
        """Bytes moved on a link (:class:`Reports`): :meth:`_active`, or with the
        first-byte timeout on, :meth:`_active_watching`."""
        self._watch_first_bytes(core.watches_first_byte)
        self.path = make_path(self)

    @property
    def timer(self) -> Timer | None:
        """The lifecycle's timer, moved earlier when a call may have filed a sooner deadline."""
        return self._timer

    @timer.setter
    def timer(self, timer: Timer | None) -> None:
        self._timer = timer
        self._timer_near = False  # a new deadline, perhaps far: look at it again

    # -- from the lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._log_limit()
        self._carry_out(self.core.start(self.now()))

    def _log_limit(self) -> None:
        """The ``connection limit`` line: the limit, which one it is, and its arithmetic."""
        if self.connection_limit == math.inf:
            return
        budget = self.budget
        figures: dict[str, object] = {
            "connections": int(self.connection_limit),
            "limited_by": self.limited_by,
            "max_connections": self.max_connections,
        }
        if budget is None:
            figures["descriptor_limit"] = "unlimited"
        else:
            figures.update(
                descriptor_connections=budget.connections,
                descriptor_limit=budget.descriptor_limit,
                reserved=budget.reserved,
                per_connection=budget.per_connection,
            )
        log(self.logger, logging.INFO, "connection limit", **figures)

    def shutdown(self) -> None:
        """Begin a graceful shutdown, as SIGTERM does; a second call cuts what remains."""
        self._carry_out(self.core.shutdown(self.now()))

    def next_deadline(self) -> float | None:
        return self.core.next_deadline()

    def handle_timer(self) -> None:
        self._carry_out(self.core.handle_timer(self.now()))

    def probe_result(self, address: str, failure: ProbeFailure | None) -> None:
        """A probe of ``address`` finished: passed (None), or why it failed."""
        for hook in self._probed_hooks:
            hook(address, failure)
        self._carry_out(self.core.probe_result(address, failure is None, self.now()))

    # -- from the operator (reload, the admin API) ------------------------------------------

    def reconfigure(self, config: Config) -> list[Output]:
        """Apply a reloaded configuration; returns the outputs, carried out."""
        outputs = self.core.reconfigure(config, self.now())
        self._touch_resolution = self.core.touch_resolution
        self._proxy_config(config)
        self._watch_first_bytes(self.core.watches_first_byte)
        self._carry_out(outputs)
        self._wake()
        self._set_max_connections(config.listener.max_connections)
        return outputs

    def admin(self, address: str, admin_input: AdminInput) -> list[Output]:
        """An operator's change of one backend's admin state (LobleError if refused)."""
        outputs = self.core.admin(address, admin_input, self.now())
        self._carry_out(outputs)
        self._wake()
        return outputs

    def set_weight(self, address: str, weight: int) -> list[Output]:
        """An operator's new weight for one backend (LobleError if refused)."""
        outputs = self.core.set_weight(address, weight, self.now())
        self._carry_out(outputs)
        return outputs

    def set_max_connections(self, address: str, limit: int) -> list[Output]:
        """An operator's new ``max_connections`` for one backend (LobleError if refused)."""
        outputs = self.core.set_max_connections(address, limit, self.now())
        self._carry_out(outputs)
        self._wake()  # the first limit makes a queue timeout possible, sooner than the lead
        return outputs

    def _wake(self) -> None:
        # An operator's input may file a deadline sooner than the timer lead
        # promises for connection inputs (a removal cut-off, probing that
        # starts again): the timer asks next_deadline() again now.
        if self.timer is not None:
            self.timer.deadline = self.now()

    # -- reports from the data path (Reports) --------------------------------------------

    def accepted(self, link: LinkT) -> None:
        # Counted first: whatever happens next, the path releases this link.
        holding = self.holding = self.holding + 1
        if self._short is not None:
            self._accepts_again()
        if self._full is not None:
            self._full.accepted += 1
        if holding >= self.connection_limit:
            self._pause()
        trusted = self._trusted
        if trusted is not None and self._read_header(link, trusted):
            return  # filed with the core once its header is complete (header_read)
        # _admit, inlined: a call less for every connection that sends no header.
        connection_id, outputs = self.core.accept(
            self.now(), _client_of(link) if self._keyed else None
        )
        link.connection_id = connection_id
        self.links[connection_id] = link
        for hook in self._accepted_hooks:
            hook(link)
        self._carry_out(outputs)

    def _admit(self, link: LinkT) -> None:
        """File the client with the core and carry out its first orders."""
        connection_id, outputs = self.core.accept(
            self.now(), _client_of(link) if self._keyed else None
        )
        link.connection_id = connection_id
        self.links[connection_id] = link
        for hook in self._accepted_hooks:
            hook(link)
        self._carry_out(outputs)

    def accept_failed(self, error: OSError) -> None:
        """An accept failed (the path backs off and retries): one line per stretch."""
        short = self._short
        if short is not None:
            short.failures += 1
            return
        self._short = Shortage(self.now())
        log(
            self.logger,
            logging.WARNING,
            "accepting paused: accept failed",
            error=str(error),
            open=self.holding,
            limit=self._limit_label(),
        )

    def connected(self, link: LinkT, attempt: Attempt) -> bool:
        now = self.now()
        outputs = self.core.connected(link.connection_id, attempt.number, now)
        if outputs is None:
            return False
        seconds = now - attempt.started
        address = attempt.backend.address
        for hook in self._connected_hooks:
            hook(address, seconds)
        if self._send_proxy or link.proxy_protocol is not None:
            self._preface(link, address)
        # Both directions exist before anything the core said runs, so every
        # order it gives for this connection finds it forwarding.
        self.path.forward(link, attempt)
        self._carry_out(outputs)
        return True

    def connect_failed(self, link: LinkT, attempt: Attempt) -> None:
        self._carry_out(self.core.connect_failed(link.connection_id, attempt.number, self.now()))

    def out_of_resources(self, link: LinkT, error: OSError) -> None:
        """No socket for a backend connect (e.g. EMFILE): end this client's connection.

        The shortage is this process's, not the backend's: reported as
        ``RESOURCE_EXHAUSTED``, which gives no verdict on the backend, so fd
        pressure never marks healthy backends unhealthy, and counts apart
        from the peers' resets. Warned about once per second at most.
        """
        self._resource_failures += 1
        now = self.now()
        if now - self._resource_warned >= RESOURCE_WARNING_INTERVAL:
            log(
                self.logger,
                logging.WARNING,
                "no socket for a backend connect: closing the client",
                error=str(error),
                connections=self._resource_failures,
            )
            self._resource_warned = now
            self._resource_failures = 0
        self._carry_out(self.core.resource_exhausted(link.connection_id, now))

    def copy_ended(self, link: LinkT, way: OneWay, end: Pumped) -> None:
        from_client = way is link.to_backend
        if end is _EOF:
            if from_client:
                self._carry_out(self.core.client_eof(link.connection_id, self.now()))
            else:
                self._carry_out(self.core.backend_eof(link.connection_id, self.now()))
            return
        source, sink = (_CLIENT, _BACKEND) if from_client else (_BACKEND, _CLIENT)
        self.socket_failed(link, source if end is _SOURCE_ERROR else sink)

    def socket_failed(self, link: LinkT, side: Side) -> None:
        core = self.core
        if side is _CLIENT:
            self._carry_out(core.client_error(link.connection_id, self.now()))
        else:
            self._carry_out(core.backend_error(link.connection_id, self.now()))

    def _active(self, link: LinkT) -> None:
        """Bytes moved: push the idle deadline back, at most once per touch resolution."""
        now = self.now()
        if now >= link.touch_due:
            link.touch_due = now + self._touch_resolution
            self.core.touch(link.connection_id, now)

    def _active_watching(self, link: LinkT) -> None:
        """:meth:`_active`, and the first bytes each way told to the core
        (``[outlier] first_byte_timeout``: ``client_sent``, ``backend_sent``).

        The data paths call :attr:`active` whenever a copy wrote bytes, with
        any copy method, so this sees the first write each way. It is
        :attr:`active` only while the core watches first bytes: with the
        timeout off, connections pay nothing for it.
        """
        seen = link.first_bytes
        if seen != _BOTH_SPOKE:
            now = self.now()
            core = self.core
            if not seen & _CLIENT_SPOKE and link.to_backend is not None and link.to_backend.total:
                seen |= _CLIENT_SPOKE
                core.client_sent(link.connection_id, now)  # files a deadline
                timer = self.timer
                if timer is not None:
                    bound = core.wake_bound(now, timer.deadline)
                    if bound < timer.deadline:
                        timer.deadline = bound
            if not seen & _BACKEND_SPOKE and link.to_client is not None and link.to_client.total:
                seen |= _BACKEND_SPOKE
                core.backend_sent(link.connection_id, now)
            link.first_bytes = seen
        self._active(link)

    def _watch_first_bytes(self, watching: bool) -> None:
        """Make :attr:`active` tell the core of first bytes, or not (start, reload)."""
        if watching and getattr(self, "active", None) != self._active_watching:
            # Connections already running were not watched from their start:
            # they never will be (their backend may have spoken long ago).
            for link in self.links.values():
                link.first_bytes = _BOTH_SPOKE
        self.active = self._active_watching if watching else self._active

    def released(self, link: LinkT) -> None:
        if link.released:
            return  # closed twice (after a bug): counted once
        link.released = True
        holding = self.holding = self.holding - 1
        if self._paused_at_limit and holding < self.connection_limit:
            self._paused_at_limit = False
            self.path.resume_accepting()
        if self._full is not None and holding <= self._recovered_at:
            self._below_limit()
        closed = link.ended
        if closed is not None:
            for hook in self._dropped_hooks:
                hook(link, closed)

    def driver_failed(self, link: LinkT) -> None:
        """A bug in the daemon, not a network event: keep serving the others, and
        tell the core this connection is gone so its accounting stays right."""
        self.logger.exception("connection %d failed", link.connection_id)
        self.awaiting_header.discard(link)
        try:
            if self.links.get(link.connection_id) is link:
                self._carry_out(self.core.client_error(link.connection_id, self.now()))
        finally:
            # However that went, the path lets go of the sockets and the record goes.
            self.path.close(link, True)
            if self.links.get(link.connection_id) is link:
                del self.links[link.connection_id]

    # -- the PROXY protocol --------------------------------------------------------------------

    def _proxy_config(self, config: Config) -> None:
        """Who may send a header and which backends get one: for what comes next.

        And whether the core is told who each client is: only a hashing
        balancer (``maglev``, ``ring_hash``) picks by it, so only then does
        accept pass the client's address (the header's, when one was read).
        """
        trusted = TrustedSources(config.listener.accept_proxy_from)
        self._trusted = trusted if trusted else None
        self._send_proxy = send_proxy_versions(config)
        self._keyed = self.core.keyed

    def _read_header(self, link: LinkT, trusted: TrustedSources) -> bool:
        """Whether ``link``'s client must send a header first: then the path reads it."""
        address = link.peer_address
        if not (isinstance(address, tuple) and trusted.trusts(str(address[0]))):
            return False
        link.proxy_protocol = ProxyState(HeaderParser(), self.core.config.timeouts.idle)
        self.awaiting_header.add(link)
        self.path.read_header(link)
        return True

    def header_read(self, link: LinkT) -> None:
        """The client's header is complete: it names the client, the core takes it."""
        self.awaiting_header.discard(link)
        state = link.proxy_protocol
        assert state is not None and state.header is not None
        header = state.header
        if header.source is not None:  # LOCAL, UNKNOWN: the connection's own addresses stand
            state.proxy = link.peer_address
            link.peer_address = header.source
            state.destination = header.destination
        self._admit(link)

    def header_failed(self, link: LinkT, reason: str, problem: str) -> None:
        """The client's header was refused or late: that client alone is closed."""
        self.awaiting_header.discard(link)
        self.proxy_header_errors[reason] = self.proxy_header_errors.get(reason, 0) + 1
        log(
            self.logger,
            logging.WARNING,
            "PROXY protocol header refused: closing the client",
            client=link.peer,
            listener=link.listener,
            reason=reason,
            error=problem,
        )
        self.path.close(link, True)

    def _preface(self, link: LinkT, address: str) -> None:
        """What the backend at ``address`` gets before the client's bytes: the header
        its ``send_proxy`` asks for, then the client's bytes read with its own header."""
        state = link.proxy_protocol
        version = self._send_proxy.get(address)
        if version is None:
            if state is not None and state.early:
                state.preface = state.early
            return
        if state is None:
            state = link.proxy_protocol = ProxyState()
        source = _ip_address(link.peer_address)
        destination = state.destination or _local_address(link)
        try:
            header = encode(version, source, destination)
        except ProxyProtocolError:  # addresses no header can carry: say so
            header = encode(version, None, None)
        state.preface = header + state.early
        state.uncounted = len(header)

    def _drop_awaiting(self) -> None:
        """Shutdown: the clients still sending a header were never the core's; they
        go as the clients still in the backlog do (closed, not served)."""
        if not self.awaiting_header:
            return
        links = list(self.awaiting_header)
        self.awaiting_header.clear()
        log(
            self.logger,
            logging.INFO,
            "shutdown: closing the clients whose PROXY protocol header is not complete",
            clients=len(links),
        )
        for link in links:
            self.path.close(link, False)

    # -- the connection limit ---------------------------------------------------------------

    def _limit_of(self, max_connections: int) -> tuple[float, str]:
        """The connection limit ``max_connections`` (0: none) makes with the budget."""
        budget = self.budget
        descriptors = budget.connections if budget is not None else math.inf
        if max_connections and max_connections <= descriptors:
            return max_connections, "max_connections"
        return descriptors, ("descriptors" if budget is not None else "")

    def _set_max_connections(self, max_connections: int) -> None:
        """A reload's ``max_connections``, applied at once: accepting pauses if the
        connections open already reach the new limit and resumes if they are below
        it; the connections open are never cut (as HAProxy's ``set maxconn``)."""
        if max_connections == self.max_connections:
            return
        self.max_connections = max_connections
        limit, self.limited_by = self._limit_of(max_connections)
        self.connection_limit = limit
        self._recovered_at = _recovery_point(limit)
        self._log_limit()
        if self.holding >= limit:
            self._pause()
        elif self._paused_at_limit:
            self._paused_at_limit = False
            self.path.resume_accepting()
        if self._full is not None and self.holding <= self._recovered_at:
            self._below_limit()

    @property
    def accepting_paused(self) -> bool:
        """Whether accepting is paused: at the connection limit, or accepts are failing."""
        return self._paused_at_limit or self._short is not None

    def _pause(self) -> None:
        if self._paused_at_limit:
            return
        self._paused_at_limit = True
        self.path.pause_accepting()
        full = self._full
        if full is not None:
            full.pauses += 1  # still the same stretch: no line
            return
        self._full = Shortage(self.now())
        budget = self.budget
        log(
            self.logger,
            logging.WARNING,
            "accepting paused: connection limit reached",
            open=self.holding,
            limit=self._limit_label(),
            limited_by=self.limited_by,
            max_connections=self.max_connections,
            descriptor_limit=budget.descriptor_limit if budget is not None else "",
        )

    def _below_limit(self) -> None:
        full = self._full
        assert full is not None
        self._full = None
        log(
            self.logger,
            logging.INFO,
            "accepting resumed: below the connection limit",
            seconds=round(self.now() - full.began, 3),
            pauses=full.pauses,
            accepted=full.accepted,
            open=self.holding,
            limit=self._limit_label(),
            limited_by=self.limited_by,
        )

    def _accepts_again(self) -> None:
        short = self._short
        assert short is not None
        self._short = None
        log(
            self.logger,
            logging.INFO,
            "accepting resumed: accepts work again",
            seconds=round(self.now() - short.began, 3),
            failures=short.failures,
            open=self.holding,
        )

    def _limit_label(self) -> int | str:
        limit = self.connection_limit
        return "none" if limit == math.inf else int(limit)

    # -- carrying out the core's outputs ---------------------------------------------------

    def _carry_out(self, outputs: list[Output]) -> None:
        """Do what the core asked, in order, each output's handlers in turn. Never blocks."""
        if self._carrying:
            # Under way further up the stack: these run after what it is
            # carrying out and what is queued (see the module doc).
            self._queue.extend(outputs)
            return
        if outputs:
            dispatch = self._dispatch
            queue = self._queue
            self._carrying = True
            try:
                # This call's outputs in order, then what calls made meanwhile
                # queued: the common case (nothing queued) touches no queue.
                for output in outputs:
                    for handler in dispatch.get(type(output), ()):
                        handler(output)
                while queue:
                    output = queue.popleft()
                    for handler in dispatch.get(type(output), ()):
                        handler(output)
            except BaseException:
                queue.clear()  # after a failure, never replay stale orders later
                raise
            finally:
                self._carrying = False
        if self._stop_announced:
            self._stopped()
            return
        # No timer the call filed is due before now + the core's timer lead
        # (ProxyCore.wake_bound): wake by then at the latest. Cheaper than
        # asking next_deadline() after every call, and it moves the timer once
        # per lead, not per connection; the timer task asks next_deadline()
        # itself when it wakes. Once the deadline is within the lead it stays
        # so until the timer is replaced: most calls look at nothing.
        timer = self._timer
        if timer is not None and not self._timer_near:
            wake = timer.deadline
            bound = self.core.wake_bound(self.now(), wake)
            if bound < wake:
                timer.deadline = bound
            self._timer_near = True

    # One method per kind of action, found by type (most outputs, e.g. health
    # reports, need nothing here): a dict lookup instead of a chain of
    # isinstance checks, several times per connection.

    def _connect(self, output: ConnectBackend) -> None:
        link = self.links.get(output.connection_id)
        if link is not None:
            self.path.connect(link, output)

    def _shutdown_write(self, output: ShutdownWrite) -> None:
        link = self.links.get(output.connection_id)
        if link is not None:
            self.path.shutdown_write(link, output.side)

    def _close(self, output: CloseConnection) -> None:
        link = self.links.get(output.connection_id)
        if link is not None:
            self.path.close(link, output.reset)

    def _stop_seen(self, output: ShutdownFinished) -> None:
        self._stop_announced = True  # the process stopped: every later call says so

    def _drop(self, output: ConnectionClosed) -> None:
        # The core has closed it: out of the table. Its figures are final once
        # the path has released it too, which on one path comes first (a
        # close there is immediate) and on the other a moment later.
        link = self.links.pop(output.connection_id, None)
        if link is not None:
            link.ended = output
            if link.released:
                for hook in self._dropped_hooks:
                    hook(link, output)

    def _start_probe(self, output: ProbeBackend) -> None:
        self._probe(output)

    def _stop(self, output: StopAccepting) -> None:
        self._stop_accepting()
        self._drop_awaiting()


def _ip_address(address: object) -> tuple[str, int] | None:
    """``(host, port)`` of a socket address (IPv6's has four fields), or None."""
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


def _local_address(link: Link) -> tuple[str, int] | None:
    """The address the client connected to: its socket's own."""
    try:
        return _ip_address(link.client.getsockname())
    except OSError:
        return None


def _client_of(link: Link) -> tuple[str, int] | None:
    """The client's ``(host, port)``, from its socket address (or the PROXY header's)."""
    address = link.peer_address
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None
