"""The daemon's lifecycle: bind, start the layers, serve until shutdown, reload, stop.

:class:`Daemon` is the top of the daemon's three layers (``docs/architecture.md``
draws them) and holds the lifecycle alone:

* the *data path* (:mod:`._callbacks` on asyncio and uvloop, :mod:`._tasks`
  on any loop) owns every socket of every connection: it accepts, connects,
  moves bytes (:mod:`._copy`), half-closes and closes;
* the *conductor* (:mod:`._conductor`) owns :class:`loble.core.ProxyCore`,
  its clock and the table of connections: it turns the path's reports into
  core calls and carries out the core's outputs; metrics (:mod:`._metrics`)
  and log lines (:mod:`._journal`) listen to those outputs beside it;
* this module binds the listening sockets, picks the loop's clock and the
  data path (:mod:`._runtime`), and runs, in one anyio task group, the
  timer (sleeps until the core's next deadline), the signal watcher, the
  accept loops, the metrics endpoint, the admin API (:mod:`._admin`) and
  health probes, until the core says it has stopped.

A reload (SIGHUP, ``loble reload``, ``POST /reload``) reads the configuration
file again. An invalid file is rejected with every error logged and nothing
changed. A valid one goes to the core as one input (``reconfigure``), which
applies it as a diff; what only the lifecycle can do it does here: a changed
listener address is bound before the old listener closes, and the old one
then stops accepting as at a shutdown, its connections untouched; a new
backlog is set on the listening sockets and a new ``max_connections`` in the
conductor, both at once; the log level and format take effect at once; a
changed metrics, admin or runtime section waits for a restart, and the
reload's log line says so.

It decides nothing: which backend, when to retry, when a connection is
idle and when draining ends all come out of the core. Everything runs on
the event loop's thread, including the HTTP endpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import socket
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeAlias

import anyio
from anyio.abc import SocketListener, TaskGroup, TaskStatus
from starlette.applications import Starlette

from loble.core import (
    AdminInput,
    Config,
    ConfigError,
    HealthReport,
    LobleError,
    ProbeBackend,
    ProxyCore,
    Reconfigured,
    parse_address,
)

from ._admin import UnknownBackend, admin_app
from ._callbacks import CallbackLink, CallbackPath
from ._conductor import Conductor, Listener
from ._copy import BufferPool
from ._datapath import connection_budget, format_address, prepare_listener, probe
from ._http import GRACEFUL_SECONDS, bind_tcp, serve_asgi
from ._journal import Journal
from ._logging import LEVELS, formatter_for, log
from ._metrics import Metrics, metrics_app
from ._runtime import (
    choose_copy_method,
    choose_data_path,
    current_library,
    data_path_for,
    drop_privileges,
    loop_clock,
    remove_pid_file,
    write_pid_file,
)
from ._status import status_document
from ._tasks import TaskLink, TaskPath

__all__ = ["DRAIN_PROGRESS_SECONDS", "RESTART_SECTIONS", "Daemon"]

AnyConductor: TypeAlias = "Conductor[CallbackLink] | Conductor[TaskLink]"

DRAIN_PROGRESS_SECONDS = 5.0
"""How often a draining daemon logs how many connections it still waits for."""

RESTART_SECTIONS = ("runtime", "metrics", "admin")
"""Configuration sections a reload records but only a restart applies."""


class Daemon:
    """One load balancer on real sockets; :meth:`run` serves until shutdown.

    ``copy`` and ``data_path`` choose how bytes move (see :mod:`._runtime`);
    unset, they come from the ``LOBLE_COPY`` and ``LOBLE_DATA_PATH``
    environment variables, else the fastest the platform and loop allow.
    ``reuse_port`` sets ``SO_REUSEPORT`` on the listening sockets and
    ``worker`` is this process's index, when it is one of several workers.
    ``reload_from`` reads the configuration again for a reload (e.g. the
    file the daemon started from); without it, a reload is refused.
    ``admin_socket``, a listening socket, is where the admin API is served
    (with ``[admin] enabled``) instead of binding ``[admin] address``: a
    worker's private one, which its supervisor binds (see :mod:`._supervisor_admin`).
    ``listeners`` follow the core's outputs after the metrics and the log
    lines (:class:`~._conductor.Listener`), e.g. ``loble demo``'s live view.
    """

    def __init__(
        self,
        config: Config,
        *,
        logger: logging.Logger | None = None,
        rng: random.Random | None = None,
        copy: str | None = None,
        data_path: str | None = None,
        reuse_port: bool = False,
        worker: int | None = None,
        reload_from: Callable[[], Config] | None = None,
        admin_socket: socket.socket | None = None,
        listeners: Sequence[Listener] = (),
    ) -> None:
        self.config = config
        # A connection's health reports are outputs only if some listener
        # follows them (metrics and the journal read the events instead):
        # otherwise the core makes three objects fewer per connection.
        wants_reports = any(HealthReport in listener.handlers() for listener in listeners)
        self.core = ProxyCore(config, rng or random.Random(), health_reports=wants_reports)
        self.logger = logger or logging.getLogger("loble")
        self.metrics = Metrics(self.core)
        self.journal = Journal(self.logger, config.logging, config.timeouts.drain)
        self._listeners_of_core: tuple[Listener, ...] = (self.metrics, self.journal, *listeners)
        self.copy_method = choose_copy_method(copy)
        self.pool = BufferPool(self.copy_method)
        self.metrics.pipes = self.pool
        self._data_path = choose_data_path(data_path)
        self.data_path_name = ""
        """The data path in use, once running: ``callbacks`` or ``tasks``."""
        self.reuse_port = reuse_port
        self.worker = worker
        self.reload_from = reload_from
        self.listen_addresses: list[tuple[str, int]] = []
        """Where clients connect (the OS-chosen port when configured as 0)."""
        self.metrics_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.conductor: AnyConductor | None = None
        """The core's driver, while running."""
        self.reloads = 0
        """Reloads applied since start."""
        self.drain_progress_seconds = DRAIN_PROGRESS_SECONDS
        """How often a draining shutdown logs its progress."""
        self.finished = False
        """True once :meth:`run` has returned (its endpoints closed, its sockets released)."""
        self._started = False
        self._started_at = 0.0
        self._tasks: TaskGroup | None = None
        self._listeners: list[SocketListener] = []
        self._accepting: list[anyio.CancelScope] = []
        """One scope per set of listeners being served; cancelling one closes its set."""
        self._stopped_accepting = False
        self._metrics_socket: socket.socket | None = None
        self._admin_socket: socket.socket | None = None
        self._given_admin_socket = admin_socket
        self._reloading = anyio.Lock()
        self._endpoints = 0
        """HTTP endpoints serving (metrics, admin); they end before the task group."""

    # -- reading -------------------------------------------------------------------

    @property
    def listen_address(self) -> tuple[str, int]:
        return self.listen_addresses[0]

    @property
    def open_connections(self) -> int:
        """Client connections the core has not closed yet."""
        return len(self.conductor.links) if self.conductor is not None else 0

    # -- lifecycle -----------------------------------------------------------------

    async def bind(self) -> None:
        """Open the listening sockets (``run`` does it if not done yet).

        Raises :class:`LobleError` (one line) when an address cannot be bound.
        Callers that start the daemon inside a task group bind first, so this
        error reaches the user as itself rather than inside an exception group.
        """
        if self._listeners:
            return
        config = self.config
        listeners = await self._listen(
            config.listener.address, "listener.address", reuse_port=self.reuse_port
        )
        try:
            if config.metrics.enabled:
                self._metrics_socket = bind_tcp(config.metrics.address, "metrics.address")
                self.metrics_address = _address(self._metrics_socket)
            if config.admin.enabled:
                self._admin_socket = self._given_admin_socket or bind_tcp(
                    config.admin.address, "admin.address"
                )
                self.admin_address = _address(self._admin_socket)
        except LobleError:
            for listener in listeners:
                await listener.aclose()
            if self._metrics_socket is not None:
                self._metrics_socket.close()
            raise
        self._listeners = listeners
        self.listen_addresses = [_local(listener) for listener in listeners]

    async def run(
        self,
        *,
        handle_signals: bool = True,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until shutdown has finished; reports started once listening.

        Raises :class:`LobleError` (one line) when an address cannot be bound.
        """
        if self._started:
            raise LobleError("a Daemon runs once; make a new one")
        self.data_path_name = data_path_for(self._data_path, current_library())
        await self.bind()
        self._started = True
        # With workers, the pid file holds the supervisor's pid: it is the one
        # whose SIGHUP reaches every worker.
        pid_file = write_pid_file(self.config.runtime.pid_file if self.worker is None else "")
        try:
            # Every socket is bound: serve as [runtime] user from here on.
            drop_privileges(self.config.runtime.user)
        except LobleError:
            if pid_file is not None:
                remove_pid_file(pid_file)
            raise
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                self._http_stop = anyio.Event()
                self._endpoints_done = anyio.Event()
                conductor = self.conductor = self._conduct(tasks)
                self._started_at = conductor.now()
                self.metrics.now = conductor.now
                self.metrics.admission = conductor
                self.metrics.proxy_header_errors = conductor.proxy_header_errors
                self.metrics.started = self._started_at
                self.metrics.before_render = self._count_bytes_in_flight
                if handle_signals:
                    await tasks.start(self._watch_signals, conductor)
                tasks.start_soon(self._run_timer, conductor)
                self._serve_listeners(conductor, self._listeners)
                self._start_endpoints(tasks)
                config = self.config
                log(
                    self.logger,
                    logging.INFO,
                    "listening",
                    address=", ".join(format_address(*a) for a in self.listen_addresses),
                    balancer=config.balancer.algorithm,
                    backends=len(config.backends),
                    data_path=self.data_path_name,
                    copy=self.copy_method.value,
                )
                conductor.start()
                task_status.started()
        finally:
            if self.conductor is not None:
                self.conductor.path.dispose()
            self.pool.close()
            if pid_file is not None:
                remove_pid_file(pid_file)
            self.finished = True
        log(self.logger, logging.INFO, "stopped")

    def shutdown(self) -> None:
        """Begin a graceful shutdown, as SIGTERM does; a second call cuts what remains."""
        if self.conductor is None:
            raise LobleError("the daemon is not running: nothing to shut down")
        self.conductor.shutdown()

    def _conduct(self, tasks: TaskGroup) -> AnyConductor:
        """The conductor and its data path, on the loop running now."""
        now = loop_clock()
        listeners = self._listeners_of_core
        endpoints = (self._metrics_socket is not None) + (self._admin_socket is not None)
        budget = connection_budget(
            self.copy_method, endpoints=endpoints, backends=len(self.config.backends)
        )

        def start_probe(action: ProbeBackend) -> None:
            tasks.start_soon(self._probe, action)

        if self.data_path_name == "callbacks":
            return Conductor[CallbackLink](
                self.core,
                partial(CallbackPath, pool=self.pool, now=now),
                now=now,
                logger=self.logger,
                listeners=listeners,
                probe=start_probe,
                stop_accepting=self._stop_accepting,
                stopped=self._finish,
                budget=budget,
            )
        return Conductor[TaskLink](
            self.core,
            partial(TaskPath, pool=self.pool, now=now, tasks=tasks, library=current_library()),
            now=now,
            logger=self.logger,
            listeners=listeners,
            probe=start_probe,
            stop_accepting=self._stop_accepting,
            stopped=self._finish,
            budget=budget,
        )

    def _finish(self) -> None:
        """The core has stopped: end the HTTP endpoints gracefully, then everything else."""
        assert self._tasks is not None
        self._http_stop.set()
        self._tasks.start_soon(self._cancel_after_endpoints)

    async def _cancel_after_endpoints(self) -> None:
        assert self._tasks is not None
        with anyio.move_on_after(GRACEFUL_SECONDS + 1.0):
            while self._endpoints:
                await self._endpoints_done.wait()
        self._tasks.cancel_scope.cancel()

    async def _endpoint(self, app: Starlette, sock: socket.socket) -> None:
        self._endpoints += 1
        try:
            await serve_asgi(app, sock, self.logger, self._http_stop)
        finally:
            self._endpoints -= 1
            self._endpoints_done.set()
            self._endpoints_done = anyio.Event()

    def _start_endpoints(self, tasks: TaskGroup) -> None:
        if self._metrics_socket is not None and self.metrics_address is not None:
            tasks.start_soon(self._endpoint, metrics_app(self.metrics), self._metrics_socket)
            log(
                self.logger,
                logging.INFO,
                "metrics endpoint",
                address=f"http://{format_address(*self.metrics_address)}/metrics",
            )
        if self._admin_socket is not None and self.admin_address is not None:
            admin = admin_app(self, self.config.admin.token, self.logger)
            tasks.start_soon(self._endpoint, admin, self._admin_socket)
            log(
                self.logger,
                logging.INFO,
                "admin API",
                address=f"http://{format_address(*self.admin_address)}/",
                changes="refused: no token" if not self.config.admin.token else "with the token",
            )

    async def _listen(
        self, address: str, key: str, *, reuse_port: bool = False
    ) -> list[SocketListener]:
        host, port = parse_address(address, allow_port_zero=True)
        try:
            multi = await anyio.create_tcp_listener(
                local_host=host,
                local_port=port,
                backlog=self.config.listener.backlog,
                reuse_port=reuse_port,
            )
        except OSError as error:
            reason = error.strerror or str(error)
            raise LobleError(f"{key}: cannot listen on {address}: {reason}") from None
        # create_tcp_listener only makes socket listeners; the type says Listener.
        return [listener for listener in multi.listeners if isinstance(listener, SocketListener)]

    async def _watch_signals(
        self, conductor: AnyConductor, *, task_status: TaskStatus[None]
    ) -> None:
        watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with anyio.open_signal_receiver(*watched) as signals:
            task_status.started()
            async for signum in signals:
                log(
                    self.logger,
                    logging.INFO,
                    "signal received",
                    signal=signal.Signals(signum).name,
                    in_flight=self.core.in_flight,
                )
                if signum == signal.SIGHUP:
                    # A terminal or SSH hang-up sends it too: it reloads, never kills.
                    with contextlib.suppress(LobleError):  # logged by reload()
                        await self.reload()
                else:
                    conductor.shutdown()

    async def _run_timer(self, conductor: AnyConductor) -> None:
        while True:
            deadline = conductor.next_deadline()
            with anyio.CancelScope(deadline=math.inf if deadline is None else deadline) as timer:
                conductor.timer = timer
                await anyio.sleep_forever()
            conductor.handle_timer()

    def _serve_listeners(self, conductor: AnyConductor, listeners: list[SocketListener]) -> None:
        """Accept on ``listeners`` until shutdown, or until a reload replaces them."""
        assert self._tasks is not None
        self.metrics.listening(format_address(*_local(listener)) for listener in listeners)
        scope = anyio.CancelScope()
        self._accepting.append(scope)
        self._tasks.start_soon(self._accept_on, conductor, listeners, scope)

    async def _accept_on(
        self, conductor: AnyConductor, listeners: list[SocketListener], scope: anyio.CancelScope
    ) -> None:
        raw: list[socket.socket] = []
        for listener in listeners:
            sock = listener.extra(anyio.abc.SocketAttribute.raw_socket)
            prepare_listener(sock)
            raw.append(sock)
        try:
            with scope:
                await conductor.path.serve(raw)
        finally:
            # Closing the listening sockets is what makes new connects fail fast.
            with anyio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
            if scope in self._accepting:
                self._accepting.remove(scope)

    def _stop_accepting(self) -> None:
        self._stopped_accepting = True
        for scope in self._accepting:
            scope.cancel()
        if self._tasks is not None:
            self._tasks.start_soon(self._report_draining)

    async def _report_draining(self) -> None:
        """A line every few seconds while a shutdown waits for connections to finish."""
        began = anyio.current_time()
        while True:
            await anyio.sleep(self.drain_progress_seconds)
            log(
                self.logger,
                logging.INFO,
                "draining",
                in_flight=self.core.in_flight,
                waited=round(anyio.current_time() - began, 1),
                drain_timeout=self.config.timeouts.drain,
            )

    async def _probe(self, action: ProbeBackend) -> None:
        failure = await probe(action)
        if self.conductor is not None:
            self.conductor.probe_result(action.backend.address, failure)

    def _count_bytes_in_flight(self) -> None:
        if self.conductor is not None:
            for link in self.conductor.links.values():
                self.metrics.count_bytes(link)

    # -- the operator: reload and the admin API (admin._admin.Control) ------------------

    async def reload(self) -> dict[str, object]:
        """Read the configuration again and apply it; :class:`LobleError` if refused.

        Every error of an invalid file is logged, and the running
        configuration stays. Reloads never overlap: a second waits for the first.
        """
        async with self._reloading:
            return await self._reload()

    async def _reload(self) -> dict[str, object]:
        conductor = self.conductor
        if conductor is None or self._tasks is None:
            raise LobleError("reload: the daemon is not running")
        if self.reload_from is None:
            raise self._refuse(LobleError("reload: this daemon has no configuration file to read"))
        try:
            new = self.reload_from()
        except ConfigError as error:
            raise self._refuse(error) from None
        old = self.config
        if self._listener_moved(new) and not self._stopped_accepting:
            # Bound before the old listener closes: no moment without one.
            try:
                listeners = await self._listen(
                    new.listener.address, "listener.address", reuse_port=self.reuse_port
                )
            except LobleError as error:
                raise self._refuse(error) from None
            replaced = list(self._accepting)
            self._listeners = listeners
            self.listen_addresses = [_local(listener) for listener in listeners]
            self._serve_listeners(conductor, listeners)
            for scope in replaced:
                scope.cancel()  # the old listener closes; its connections run on
        if new.listener.backlog != old.listener.backlog and not self._stopped_accepting:
            # listen() on a listening socket sets its backlog anew: applied at
            # once, to a listener just bound for a new address too.
            for listener in self._listeners:
                with contextlib.suppress(OSError):  # closed meanwhile: nothing to apply
                    listener.extra(anyio.abc.SocketAttribute.raw_socket).listen(
                        new.listener.backlog
                    )
        if new.logging.level != old.logging.level:
            self.logger.setLevel(LEVELS[new.logging.level])
        if new.logging.format != old.logging.format:
            for handler in self.logger.handlers:
                handler.setFormatter(formatter_for(new.logging))
        self.journal.reconfigure(new.logging, new.timeouts.drain)
        self.config = new
        outputs = conductor.reconfigure(new)
        self.reloads += 1
        applied = next(output for output in outputs if isinstance(output, Reconfigured))
        restart = [key for key in applied.changed if key.split(".", 1)[0] in RESTART_SECTIONS]
        if restart:
            log(
                self.logger,
                logging.WARNING,
                "reload: these take effect at the next start",
                keys=",".join(restart),
            )
        return {
            "reloaded": True,
            "added": list(applied.added),
            "removed": list(applied.removed),
            "reweighted": list(applied.reweighted),
            "changed": list(applied.changed),
            "restart_needed": restart,
            "listeners": [format_address(*address) for address in self.listen_addresses],
        }

    def _listener_moved(self, new: Config) -> bool:
        """Whether a reload asks to listen somewhere else than the daemon does now.

        The address as written, or as bound: a file that names the port the
        daemon got for ``:0`` asks for no move.
        """
        old = self.config.listener
        if new.listener.address == old.address:
            return False
        host, port = parse_address(new.listener.address, allow_port_zero=True)
        return not (port and (host, port) in self.listen_addresses)

    def _refuse(self, error: LobleError) -> LobleError:
        problems = str(error).splitlines()
        log(
            self.logger,
            logging.ERROR,
            "reload rejected: the running configuration stays",
            errors=len(problems),
        )
        for problem in problems:
            log(self.logger, logging.ERROR, "reload error", error=problem)
        return error

    async def status(self) -> dict[str, object]:
        if self.conductor is None:
            raise LobleError("the daemon is not running")
        return status_document(
            self.core,
            self.metrics,
            now=self.conductor.now(),
            started=self._started_at,
            listeners=self.listen_addresses,
            worker=self.worker,
        )

    async def admin(self, address: str, admin_input: AdminInput) -> dict[str, object]:
        conductor = self._running(address)
        conductor.admin(address, admin_input)
        return self._backend_status(address)

    async def set_weight(self, address: str, weight: int) -> dict[str, object]:
        conductor = self._running(address)
        conductor.set_weight(address, weight)
        return self._backend_status(address)

    async def set_max_connections(self, address: str, limit: int) -> dict[str, object]:
        conductor = self._running(address)
        conductor.set_max_connections(address, limit)
        return self._backend_status(address)

    def _running(self, address: str) -> AnyConductor:
        if self.conductor is None:
            raise LobleError("the daemon is not running")
        if all(backend.address != address for backend in self.core.statistics().backends):
            raise UnknownBackend(f"no backend {address!r}")
        return self.conductor

    def _backend_status(self, address: str) -> dict[str, object]:
        for backend in self.core.statistics().backends:
            if backend.address == address:
                return {
                    "address": address,
                    "state": backend.state.value,
                    "admin": backend.admin.value,
                    "weight": backend.weight,
                    "max_connections": backend.max_connections,
                }
        raise UnknownBackend(f"no backend {address!r}")


def _address(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


def _local(listener: SocketListener) -> tuple[str, int]:
    address = listener.extra(anyio.abc.SocketAttribute.local_address)
    assert isinstance(address, tuple)
    return str(address[0]), int(address[1])
