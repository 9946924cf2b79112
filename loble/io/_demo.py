"""``loble demo``: three small backends, the balancer, clients, and a backend failing on schedule.

Everything a newcomer needs to watch Loble work, in one process on loopback:

* a backend on each ``[[backends]]`` address of the configuration
  (:class:`DemoBackend`). It answers an HTTP request (``curl``) with one line
  naming itself, and echoes anything else (``nc``) until the client sends
  EOF. The demo can stop its server (listener closed, connections reset, as
  a crash does) and start it again;
* the real daemon (:class:`Daemon`) with the same configuration;
* a client load (:class:`Clients`): a few HTTP requests a second through the
  balancer, each counted as answered (by which backend) or failed;
* a schedule (:func:`plan`): every ``break_every`` seconds, starting
  ``first_break`` seconds in, it stops one backend's server and starts it
  again (health checks and passive failures take it out and bring it back),
  then drains another through the operator's path, the one ``loble ctl
  drain`` reaches through the admin API (:meth:`Daemon.admin`), and sets it
  ready again.

On a terminal all of it is drawn live (:mod:`._demo_view`), from the core's
statistics and a listener on its events (:class:`Watch`); with ``--plain``
(or when stdout is not a terminal) the daemon's log lines tell it instead,
with a ``demo load`` summary every few seconds. ``--duration`` starts the
graceful shutdown on its own, as Ctrl-C does.

With ``--backends-only`` only the backends run, for ``loble run`` in another
terminal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import socket
import struct
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import SocketListener, SocketStream, TaskGroup
from rich.console import Console
from rich.live import Live

from loble.core import (
    AdminInput,
    AdminState,
    AdminStateChanged,
    BackendStateChanged,
    Config,
    ConnectionClosed,
    LobleError,
    Output,
    ProbeFailure,
    ShutdownFinished,
    ShutdownStarted,
    SnapshotPublished,
    WeightChanged,
    parse_address,
)

from ._daemon import Daemon
from ._datapath import Link, format_address
from ._demo_defaults import BREAK_EVERY, FIRST_BREAK, LIVE_RATE
from ._demo_view import (
    HISTORY_SECONDS,
    BackendView,
    ClientView,
    DemoState,
    Happening,
    describe,
    render,
)
from ._logging import LIBRARY_LOGGERS, log

__all__ = [
    "Clients",
    "DemoBackend",
    "DemoOptions",
    "PerSecond",
    "Step",
    "Watch",
    "open_backend",
    "plan",
    "run_backends",
    "run_demo",
]

_HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")
_REQUEST_LIMIT = 65_536
_CLIENT_TIMEOUT = 5.0
_SUMMARY_EVERY = 5.0
_REFRESH_EVERY = 0.25
"""Seconds between two frames of the live view."""
_MAX_CLIENTS = 256
"""Requests the client load keeps in flight at most (a stalled balancer stops it there)."""
_RETRY_LISTEN = 1.0
"""Seconds between two attempts to start a stopped server whose port is taken."""
_LINGER_NOW = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 s: a close sends RST."""


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """How ``loble demo`` runs (its command-line options)."""

    rate: float = LIVE_RATE
    """Client requests a second; 0 for none."""
    live: bool = True
    """Draw the live view on stdout; False: log lines (``--plain``)."""
    duration: float | None = None
    """Seconds before the demo drains and exits on its own; None: until a signal."""
    break_every: float = BREAK_EVERY
    """Seconds between two rounds of the schedule; 0: no schedule."""
    first_break: float = FIRST_BREAK
    """Seconds from the start to the first round."""


# -- the backends ----------------------------------------------------------------------


async def open_backend(address: str, name: str) -> list[SocketListener]:
    """Bind a demo backend's address; a busy or foreign address is a one-line error."""
    host, port = parse_address(address)
    try:
        multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as error:
        reason = error.strerror or str(error)
        raise LobleError(f"demo backend {name}: cannot listen on {address}: {reason}") from None
    return [listener for listener in multi.listeners if isinstance(listener, SocketListener)]


class DemoBackend:
    """One demo backend: :meth:`open` binds it, :meth:`serve` serves it until cancelled.

    :meth:`stop` makes it fail as a crashed server does: its listener closes
    (connects are refused) and every open connection is reset. :meth:`start`
    listens again.
    """

    def __init__(self, address: str, name: str, logger: logging.Logger) -> None:
        self.address = address
        self.name = name
        self.logger = logger
        self.up = False
        """Whether it accepts: from :meth:`serve` to a :meth:`stop`, again after a :meth:`start`."""
        self._listeners: list[SocketListener] = []
        self._accepting: anyio.CancelScope | None = None
        self._connections: dict[SocketStream, anyio.CancelScope] = {}
        self._tasks: TaskGroup | None = None

    async def open(self) -> None:
        """Bind its address (:class:`LobleError`, one line, if it cannot)."""
        self._listeners = await open_backend(self.address, self.name)

    async def close(self) -> None:
        """Release what :meth:`open` bound, when :meth:`serve` will not run."""
        for listener in self._listeners:
            await listener.aclose()
        self._listeners = []

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the demo protocol until cancelled (:meth:`open` first)."""
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            self._accept_on(self._listeners)
            log(
                self.logger,
                logging.INFO,
                "demo backend listening",
                backend=self.name,
                address=self.address,
            )
            task_status.started()
            await anyio.sleep_forever()

    async def stop(self) -> int:
        """Close the listener and reset every connection; returns how many it reset."""
        if not self.up or self._accepting is None:
            return 0
        self.up = False
        self._accepting.cancel()
        cut = list(self._connections.items())
        for stream, scope in cut:
            _reset(stream)
            scope.cancel()
        await anyio.lowlevel.checkpoint()
        return len(cut)

    async def start(self) -> None:
        """Listen again after :meth:`stop` (:class:`LobleError` if the port was taken)."""
        if self.up:
            return
        self._accept_on(await open_backend(self.address, self.name))

    def _accept_on(self, listeners: list[SocketListener]) -> None:
        assert self._tasks is not None
        scope = anyio.CancelScope()
        self._accepting = scope
        self.up = True
        self._tasks.start_soon(self._accept_all, listeners, scope)

    async def _accept_all(self, listeners: list[SocketListener], scope: anyio.CancelScope) -> None:
        try:
            with scope:
                async with anyio.create_task_group() as accepts:
                    for listener in listeners:
                        accepts.start_soon(self._accept, listener)
        finally:
            # Closing the listening sockets is what makes new connects fail fast.
            with anyio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    async def _accept(self, listener: SocketListener) -> None:
        assert self._tasks is not None
        while True:
            try:
                stream = await listener.accept()
            except (OSError, anyio.BrokenResourceError):  # trio: EMFILE is BrokenResourceError
                await anyio.sleep(0.1)  # out of file descriptors: let some close
                continue
            self._tasks.start_soon(self._connection, stream)

    async def _connection(self, stream: SocketStream) -> None:
        with anyio.CancelScope() as scope:
            self._connections[stream] = scope
            try:
                await _answer(stream, self.name, self.address)
            finally:
                self._connections.pop(stream, None)


def _reset(stream: SocketStream) -> None:
    """Make the stream's close send RST, as a killed process's sockets do."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    with contextlib.suppress(OSError):
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NOW)


async def _answer(stream: SocketStream, name: str, address: str) -> None:
    async with stream:
        try:
            data = await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return
        try:
            if data.startswith(_HTTP_METHODS):
                await _answer_http(stream, data, name, address)
            else:
                await _echo(stream, data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return


async def _answer_http(stream: SocketStream, request: bytes, name: str, address: str) -> None:
    while b"\r\n\r\n" not in request and b"\n\n" not in request:
        if len(request) > _REQUEST_LIMIT:
            return
        request += await stream.receive()
    body = f"hello from {name} ({address})\n".encode()
    await stream.send(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        + f"Content-Length: {len(body)}\r\nX-Backend: {name}\r\n".encode()
        + b"Connection: close\r\n\r\n"
        + (b"" if request.startswith(b"HEAD ") else body)
    )
    await stream.send_eof()
    # Let the client close first, so no unread byte turns our close into a reset.
    with anyio.move_on_after(_CLIENT_TIMEOUT):
        while True:
            await stream.receive()


async def _echo(stream: SocketStream, data: bytes) -> None:
    while True:
        await stream.send(data)
        try:
            data = await stream.receive()
        except anyio.EndOfStream:
            await stream.send_eof()
            return


# -- what the demo watches ----------------------------------------------------------------


class PerSecond:
    """Counts in one-second buckets on a clock from ``start``, the last ``keep`` kept."""

    def __init__(self, start: float, keep: int = HISTORY_SECONDS) -> None:
        self._start = start
        self._second = 0
        self._counts: deque[int] = deque([0], maxlen=keep + 1)

    def add(self, now: float, count: int = 1) -> None:
        self._advance(now)
        self._counts[-1] += count

    def series(self, now: float) -> tuple[int, ...]:
        """The counts of the last whole seconds before ``now``, oldest first."""
        self._advance(now)
        return tuple(self._counts)[:-1]

    def _advance(self, now: float) -> None:
        second = max(0, math.floor(now - self._start))
        maxlen = self._counts.maxlen or 1
        for _ in range(min(second - self._second, maxlen)):
            self._counts.append(0)
        self._second = max(self._second, second)


class Watch:
    """The demo's listener on the core's outputs (a :class:`~._conductor.Listener`).

    It keeps the events panel's lines (:func:`~._demo_view.describe`, plus
    the demo's own steps from :meth:`note`) and each backend's connections,
    in all and per second. ``now`` is the core's clock (the event loop's).
    """

    def __init__(
        self,
        names: Mapping[str, str],
        started: float,
        now: Callable[[], float] | None = None,
        *,
        keep: int = 50,
    ) -> None:
        self.names = dict(names)
        self.started = started
        self.now: Callable[[], float] = now if now is not None else anyio.current_time
        self.happenings: deque[Happening] = deque(maxlen=keep)
        self.totals: Counter[str] = Counter()
        self.traffic = {address: PerSecond(started) for address in names}
        self.shutting_down = anyio.Event()
        """Set once the core has begun its shutdown (its listener is closing)."""

    def handlers(self) -> Mapping[type, Any]:
        kinds = (
            BackendStateChanged,
            SnapshotPublished,
            AdminStateChanged,
            WeightChanged,
            ShutdownStarted,
            ShutdownFinished,
        )
        return dict.fromkeys(kinds, self._event)

    def _event(self, output: Output) -> None:
        if isinstance(output, ShutdownStarted):
            self.shutting_down.set()
        happening = describe(output, self.names, self.started)
        if happening is not None:
            self.happenings.append(happening)

    def note(self, text: str, style: str = "bold magenta") -> None:
        """One of the demo's own steps, for the events panel."""
        self.happenings.append(Happening(at=self.now() - self.started, text=text, style=style))

    def link_accepted(self, link: Link) -> None:
        pass

    def backend_connected(self, address: str, seconds: float) -> None:
        self.totals[address] += 1
        counts = self.traffic.get(address)
        if counts is not None:
            counts.add(self.now())

    def link_dropped(self, link: Link, closed: ConnectionClosed) -> None:
        pass

    def probed(self, address: str, failure: ProbeFailure | None) -> None:
        pass


# -- the clients ----------------------------------------------------------------------


class Clients:
    """``rate`` HTTP requests a second through the balancer, each one answered or failed.

    Open loop: a request starts every ``1 / rate`` seconds whether the ones
    before have ended or not (at most :data:`_MAX_CLIENTS` in flight), as
    independent clients would, so a stalled backend shows as failures rather
    than as a slower client.
    """

    def __init__(self, address: tuple[str, int], rate: float, started: float) -> None:
        self.address = address
        self.rate = rate
        self.answered: Counter[str] = Counter()
        """Answers by the name of the backend that gave them."""
        self.failed = 0
        self.answers = PerSecond(started)
        self.failures = PerSecond(started)
        self.stopping = False
        """Set once the balancer drains: no new request starts."""
        self._in_flight = 0

    async def run(self) -> None:
        """Send requests until cancelled or :attr:`stopping`."""
        if self.rate <= 0:
            return
        async with anyio.create_task_group() as requests:
            next_at = anyio.current_time()
            while not self.stopping:
                if self._in_flight < _MAX_CLIENTS:
                    requests.start_soon(self._request)
                next_at += 1 / self.rate
                await anyio.sleep_until(next_at)

    async def _request(self) -> None:
        self._in_flight += 1
        try:
            name = _backend_name(await self._exchange())
        finally:
            self._in_flight -= 1
        now = anyio.current_time()
        if name is None:
            self.failed += 1
            self.failures.add(now)
        else:
            self.answered[name] += 1
            self.answers.add(now)

    async def _exchange(self) -> bytes:
        answer = b""
        with anyio.move_on_after(_CLIENT_TIMEOUT):
            try:
                async with await anyio.connect_tcp(*self.address) as stream:
                    await stream.send(b"GET / HTTP/1.0\r\nHost: loble-demo\r\n\r\n")
                    await stream.send_eof()
                    while True:
                        answer += await stream.receive()
            except anyio.EndOfStream:
                return answer
            except (anyio.BrokenResourceError, OSError):
                pass
        return b""

    def view(self, now: float) -> ClientView:
        return ClientView(
            rate=self.rate,
            answered=sum(self.answered.values()),
            failed=self.failed,
            by_backend=tuple(sorted(self.answered.items())),
            answered_rates=self.answers.series(now),
            failed_rates=self.failures.series(now),
        )


def _backend_name(answer: bytes) -> str | None:
    for line in answer.splitlines():
        if line.startswith(b"X-Backend: "):
            return line[len(b"X-Backend: ") :].decode(errors="replace")
    return None


async def _summarise(clients: Clients, logger: logging.Logger) -> None:
    """``--plain``: a ``demo load`` line every few seconds, who answered how often."""
    answered: Counter[str] = Counter()
    failed = 0
    while True:
        await anyio.sleep(_SUMMARY_EVERY)
        fresh = clients.answered - answered
        log(
            logger,
            logging.INFO,
            "demo load",
            answered=sum(fresh.values()),
            failed=clients.failed - failed,
            **{name: count for name, count in sorted(fresh.items())},
        )
        answered = Counter(clients.answered)
        failed = clients.failed


# -- the schedule ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Step:
    """One step of the demo's schedule."""

    at: float
    """Seconds from the start."""
    action: str
    """``stop`` or ``start`` (a backend's server), ``drain`` or ``ready`` (its admin state)."""
    backend: int
    """Its index in the configuration."""


def plan(every: float, first: float, backends: int) -> Iterator[Step]:
    """The schedule: round ``k``, from ``first + k * every`` on, fails a backend and drains another.

    In a round of ``every`` seconds: the server of backend ``k + 1`` (the
    second, then the third, ...) stops at once and starts again 30% into the
    round, leaving time for health checks to bring it back; backend ``k + 2``
    is drained halfway and set ready at 75%. Nothing with ``every`` 0 or no
    backend.
    """
    if every <= 0 or backends <= 0:
        return
    round_ = 0
    while True:
        began = first + round_ * every
        broken, drained = (round_ + 1) % backends, (round_ + 2) % backends
        yield Step(at=began, action="stop", backend=broken)
        yield Step(at=began + 0.3 * every, action="start", backend=broken)
        yield Step(at=began + 0.5 * every, action="drain", backend=drained)
        yield Step(at=began + 0.75 * every, action="ready", backend=drained)
        round_ += 1


_ACTION_WORDS = {
    "stop": "stop {name}'s server",
    "start": "start {name}'s server",
    "drain": "drain {name}",
    "ready": "set {name} ready",
}


_ADMIN_STEPS = {
    "drain": (AdminInput.DRAIN, AdminState.READY),
    "ready": (AdminInput.READY, AdminState.DRAIN),
}
"""A step's input to the admin state, and the state it expects to find (else it passes)."""


# -- the demo ---------------------------------------------------------------------------


def _names(config: Config) -> list[tuple[str, str]]:
    return [
        (backend.address, f"backend-{index}") for index, backend in enumerate(config.backends, 1)
    ]


async def _open_backends(config: Config, logger: logging.Logger) -> list[DemoBackend]:
    opened: list[DemoBackend] = []
    try:
        for address, name in _names(config):
            backend = DemoBackend(address, name, logger)
            await backend.open()
            opened.append(backend)
    except LobleError:
        for backend in opened:
            await backend.close()
        raise
    return opened


async def run_backends(config: Config, logger: logging.Logger) -> None:
    """``--backends-only``: serve the demo backends until SIGINT or SIGTERM."""
    backends = await _open_backends(config, logger)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tasks:
            for backend in backends:
                await tasks.start(backend.serve)
            async for signum in signals:
                log(logger, logging.INFO, "stopping", signal=signal.Signals(signum).name)
                tasks.cancel_scope.cancel()
                break


class _Demo:
    """One run of the demo: its parts, the schedule, the frames of the live view."""

    def __init__(
        self,
        daemon: Daemon,
        backends: list[DemoBackend],
        watch: Watch,
        options: DemoOptions,
        logger: logging.Logger,
    ) -> None:
        self.daemon = daemon
        self.backends = backends
        self.watch = watch
        self.options = options
        self.logger = logger
        self.started = watch.started
        self.clients: Clients | None = None
        self.next_step: Step | None = None

    async def follow(self, steps: Iterator[Step]) -> None:
        for step in steps:
            self.next_step = step
            await anyio.sleep_until(self.started + step.at)
            if self.watch.shutting_down.is_set():
                self.next_step = None
                return
            await self._carry_out(step)
        self.next_step = None

    async def _carry_out(self, step: Step) -> None:
        backend = self.backends[step.backend]
        log(self.logger, logging.INFO, "demo step", action=step.action, backend=backend.address)
        if step.action == "stop":
            cut = await backend.stop()
            self.watch.note(f"demo stops {backend.name}'s server ({cut} connections reset)")
        elif step.action == "start":
            while True:
                try:
                    await backend.start()
                    break
                except LobleError as error:
                    self.watch.note(f"{error}; retrying", "bold red")
                    log(self.logger, logging.WARNING, "demo step failed", error=str(error))
                    await anyio.sleep(_RETRY_LISTEN)
            self.watch.note(f"demo starts {backend.name}'s server again")
        else:
            admin, expected = _ADMIN_STEPS[step.action]
            if self._admin_state(backend.address) is not expected:
                # Someone else (you, with `loble ctl`) has changed it: theirs stands.
                self.watch.note(f"demo leaves {backend.name} as it is: not {expected.value}")
                return
            self.watch.note(f"demo runs: loble ctl {admin.value} {backend.address}")
            try:
                # What `loble ctl drain ADDRESS` asks the admin API, which asks this.
                await self.daemon.admin(backend.address, admin)
            except LobleError as error:  # e.g. a shutdown began in between
                self.watch.note(str(error), "bold red")

    def _admin_state(self, address: str) -> AdminState | None:
        for backend in self.daemon.core.statistics().backends:
            if backend.address == address:
                return backend.admin
        return None

    async def stop_after(self, seconds: float) -> None:
        await anyio.sleep(seconds)
        if not self.watch.shutting_down.is_set():
            log(self.logger, logging.INFO, "demo duration reached: draining", seconds=seconds)
            self.daemon.shutdown()

    async def watch_shutdown(self) -> None:
        """Stop the clients once the balancer drains (its listener is closing)."""
        await self.watch.shutting_down.wait()
        if self.clients is not None:
            self.clients.stopping = True

    def state(self) -> DemoState:
        daemon = self.daemon
        now = anyio.current_time()
        statistics = daemon.core.statistics()
        by_address = {backend.address: backend for backend in self.backends}
        rows = []
        for backend in statistics.backends:
            demo = by_address.get(backend.address)
            counts = self.watch.traffic.get(backend.address)
            rows.append(
                BackendView(
                    name=demo.name if demo is not None else backend.address,
                    address=backend.address,
                    health=backend.state.value,
                    admin=backend.admin.value,
                    weight=backend.weight,
                    active=backend.active_connections,
                    total=self.watch.totals[backend.address],
                    rates=counts.series(now) if counts is not None else (),
                    server_up=demo.up if demo is not None else True,
                )
            )
        clients = self.clients.view(now) if self.clients is not None else ClientView(rate=0)
        ends_in = None
        if self.options.duration is not None:
            ends_in = self.started + self.options.duration - now
        return DemoState(
            uptime=now - self.started,
            listen=format_address(*daemon.listen_address),
            algorithm=daemon.config.balancer.algorithm,
            process=statistics.process.value,
            snapshot_version=statistics.snapshot_version,
            eligible=tuple(self.watch.names.get(a, a) for a in statistics.eligible),
            in_flight=statistics.in_flight,
            backends=tuple(rows),
            client=clients,
            happenings=tuple(self.watch.happenings),
            next_step=self._next_words(now),
            admin_url=_url(daemon.admin_address, "/"),
            metrics_url=_url(daemon.metrics_address, "/metrics"),
            ends_in=ends_in,
        )

    def _next_words(self, now: float) -> str:
        step = self.next_step
        if step is None or self.watch.shutting_down.is_set():
            return ""
        words = _ACTION_WORDS[step.action].format(name=self.backends[step.backend].name)
        return f"{words} in {max(0.0, self.started + step.at - now):.0f} s"

    async def show(self, live: Live) -> None:
        while True:
            live.update(render(self.state()), refresh=True)
            await anyio.sleep(_REFRESH_EVERY)


def _url(address: tuple[str, int] | None, path: str) -> str:
    return "" if address is None else f"http://{format_address(*address)}{path}"


async def run_demo(
    config: Config, logger: logging.Logger, options: DemoOptions | None = None
) -> None:
    """Backends, the balancer, clients and the schedule; ends when the balancer has shut down."""
    options = options or DemoOptions()
    # Bind everything first: a busy port is then a one-line error, not a task group's.
    demo_logger = logger.getChild("demo")
    backends = await _open_backends(config, demo_logger)
    watch = Watch(dict(_names(config)), anyio.current_time())
    daemon = Daemon(config, logger=logger, listeners=[watch])
    try:
        await daemon.bind()
    except LobleError:
        for backend in backends:
            await backend.close()
        raise
    demo = _Demo(daemon, backends, watch, options, demo_logger)
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(_live_view(logger)) if options.live else None
        async with anyio.create_task_group() as helpers:
            for backend in backends:
                await helpers.start(backend.serve)
            async with anyio.create_task_group() as balancer:
                await balancer.start(daemon.run)
                clients = demo.clients = Clients(daemon.listen_address, options.rate, demo.started)
                helpers.start_soon(clients.run)
                helpers.start_soon(demo.watch_shutdown)
                if live is not None:
                    helpers.start_soon(demo.show, live)
                elif options.rate > 0:
                    helpers.start_soon(_summarise, clients, demo_logger)
                steps = plan(options.break_every, options.first_break, len(backends))
                helpers.start_soon(demo.follow, steps)
                if options.duration is not None:
                    helpers.start_soon(demo.stop_after, options.duration)
            helpers.cancel_scope.cancel()
        if live is not None:
            live.update(render(demo.state()), refresh=True)


@contextlib.contextmanager
def _live_view(logger: logging.Logger) -> Iterator[Live]:
    """The live view on stdout; log lines (errors, in this mode) print above it."""
    live = Live(console=Console(), auto_refresh=False, redirect_stdout=True, redirect_stderr=True)
    with live:
        # The log handlers hold the stderr they were made with: point them at
        # the live view's, so a line goes above the frame instead of through it.
        handlers = {
            handler
            for name in (logger.name, *LIBRARY_LOGGERS)
            for handler in logging.getLogger(name).handlers
            if isinstance(handler, logging.StreamHandler)
        }
        previous = {handler: handler.setStream(sys.stderr) for handler in handlers}
        try:
            yield live
        finally:
            for handler, stream in previous.items():
                if stream is not None:
                    handler.setStream(stream)
