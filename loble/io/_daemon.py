"""The daemon: Loble's core on real sockets.

:class:`Daemon` is a thin driver. It accepts clients, asks the core what to
do, carries out the core's actions (connect, half-close, close, probe, stop
accepting) and reports back what the network did. It decides nothing: which
backend, when to retry, when a connection is idle and when draining ends all
come out of :class:`loble.core.ProxyCore`, through one method,
:meth:`Daemon._carry_out`, that every core call's outputs go through.

Structure (anyio, on asyncio or trio):

* one main task group: the accept loop, the core's timer, the signal watcher,
  the metrics endpoint, health probes, and one task per client connection;
* per client connection a task group of its own holding the connect attempt
  and the two one-way copies. The core's ``CloseConnection`` cancels that
  group; the connection's task then closes both sockets in a shielded scope,
  so no socket or task outlives its connection;
* one timer task sleeps until ``core.next_deadline()``; any core call that
  brings the deadline closer moves the timer's deadline.

The core is single-threaded and so is this driver: everything runs on the
event loop's thread, including the metrics endpoint.
"""

from __future__ import annotations

import logging
import math
import random
import signal
from collections.abc import Callable, Sequence

import anyio
from anyio.abc import SocketListener, SocketStream, TaskGroup, TaskStatus

from loble.core import (
    Backend,
    BackendStateChanged,
    CloseConnection,
    Config,
    ConnectBackend,
    ConnectionClosed,
    HealthState,
    LobleError,
    Output,
    ProbeBackend,
    ProxyCore,
    ShutdownFinished,
    ShutdownStarted,
    ShutdownWrite,
    Side,
    SnapshotPublished,
    StopAccepting,
    parse_address,
)

from ._copy import CopyEnd, copy_bytes
from ._logging import log
from ._metrics import TO_BACKEND, TO_CLIENT, Metrics, serve_metrics

__all__ = ["Daemon", "format_address"]

_ACCEPT_BACKOFF = 0.1
"""Seconds to pause accepting after an accept error such as EMFILE."""


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Connection:
    """The driver's side of one client connection: its sockets and its tasks."""

    __slots__ = (
        "attempt_scope",
        "backend",
        "backend_address",
        "bytes_to_backend",
        "bytes_to_client",
        "client",
        "connection_id",
        "peer",
        "task_group",
    )

    def __init__(self, connection_id: int, client: SocketStream, peer: str) -> None:
        self.connection_id = connection_id
        self.client = client
        self.peer = peer
        self.backend: SocketStream | None = None
        self.backend_address = ""
        self.task_group: TaskGroup | None = None
        self.attempt_scope: anyio.CancelScope | None = None
        self.bytes_to_backend = 0
        self.bytes_to_client = 0

    def stream(self, side: Side) -> SocketStream | None:
        return self.client if side is Side.CLIENT else self.backend


class Daemon:
    """One load balancer on real sockets; :meth:`run` serves until shutdown."""

    def __init__(
        self,
        config: Config,
        *,
        logger: logging.Logger | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.core = ProxyCore(config, rng or random.Random())
        self.metrics = Metrics(self.core)
        self.logger = logger or logging.getLogger("loble")
        self.listen_addresses: list[tuple[str, int]] = []
        """Where clients connect (the OS-chosen port when configured as 0)."""
        self.metrics_address: tuple[str, int] | None = None
        self._connections: dict[int, _Connection] = {}
        self._access_log = config.logging.access_log
        self._accepting: anyio.CancelScope | None = None
        self._timer: anyio.CancelScope | None = None
        self._tasks: TaskGroup | None = None
        self._started = False
        self._listeners: list[SocketListener] = []
        self._metrics_listeners: list[SocketListener] = []
        self._shutdown_began = 0.0

    # -- reading -------------------------------------------------------------------

    @property
    def listen_address(self) -> tuple[str, int]:
        return self.listen_addresses[0]

    @property
    def open_connections(self) -> int:
        """Client connections whose task is still running (sockets not yet closed)."""
        return len(self._connections)

    # -- lifecycle -----------------------------------------------------------------

    async def bind(self) -> None:
        """Open the listening sockets (``run`` does it if not done yet).

        Raises :class:`LobleError` (one line) when an address cannot be bound.
        Callers that start the daemon inside a task group bind first, so this
        error reaches the user as itself rather than inside an exception group.
        """
        if self._listeners:
            return
        listeners = await self._listen(self.config.listener.address, "listener.address")
        if self.config.metrics.enabled:
            try:
                self._metrics_listeners = await self._listen(
                    self.config.metrics.address, "metrics.address"
                )
            except LobleError:
                for listener in listeners:
                    await listener.aclose()
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
        await self.bind()
        self._started = True
        self._accepting = anyio.CancelScope()
        listeners, metrics_listeners = self._listeners, self._metrics_listeners
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            if handle_signals:
                await tasks.start(self._watch_signals)
            tasks.start_soon(self._run_timer)
            tasks.start_soon(self._accept_all, listeners)
            for listener in metrics_listeners:
                self.metrics_address = _local(listener)
                tasks.start_soon(serve_metrics, listener, self.metrics, self.logger)
                log(
                    self.logger,
                    logging.INFO,
                    "metrics endpoint",
                    address=f"http://{format_address(*self.metrics_address)}/metrics",
                )
            config = self.config
            log(
                self.logger,
                logging.INFO,
                "listening",
                address=", ".join(format_address(*a) for a in self.listen_addresses),
                balancer=config.balancer.algorithm,
                backends=len(config.backends),
            )
            self._carry_out(self.core.start(anyio.current_time()))
            task_status.started()
        log(self.logger, logging.INFO, "stopped")

    def shutdown(self) -> None:
        """Begin a graceful shutdown, as SIGTERM does; a second call cuts what remains."""
        self._carry_out(self.core.shutdown(anyio.current_time()))

    async def _listen(self, address: str, key: str) -> list[SocketListener]:
        host, port = parse_address(address, allow_port_zero=True)
        try:
            multi = await anyio.create_tcp_listener(
                local_host=host, local_port=port, backlog=self.config.listener.backlog
            )
        except OSError as error:
            reason = error.strerror or str(error)
            raise LobleError(f"{key}: cannot listen on {address}: {reason}") from None
        # create_tcp_listener only makes socket listeners; the type says Listener.
        return [listener for listener in multi.listeners if isinstance(listener, SocketListener)]

    async def _watch_signals(self, *, task_status: TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                log(
                    self.logger,
                    logging.INFO,
                    "signal received",
                    signal=signal.Signals(signum).name,
                    in_flight=self.core.in_flight,
                )
                self.shutdown()

    async def _run_timer(self) -> None:
        core = self.core
        while True:
            deadline = core.next_deadline()
            with anyio.CancelScope(deadline=math.inf if deadline is None else deadline) as timer:
                self._timer = timer
                await anyio.sleep_forever()
            self._carry_out(core.handle_timer(anyio.current_time()))

    # -- accepting -----------------------------------------------------------------

    async def _accept_all(self, listeners: Sequence[SocketListener]) -> None:
        assert self._accepting is not None
        try:
            with self._accepting:
                async with anyio.create_task_group() as accepting:
                    for listener in listeners:
                        accepting.start_soon(self._accept_loop, listener)
        finally:
            # Closing the listening sockets is what makes new connects fail fast.
            with anyio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    async def _accept_loop(self, listener: SocketListener) -> None:
        assert self._tasks is not None
        while True:
            try:
                client = await listener.accept()
            except OSError as error:
                log(self.logger, logging.WARNING, "accept failed", error=str(error))
                await anyio.sleep(_ACCEPT_BACKOFF)
                continue
            self._tasks.start_soon(self._serve_client, client)

    async def _serve_client(self, client: SocketStream) -> None:
        connection_id, outputs = self.core.accept(anyio.current_time())
        connection = _Connection(connection_id, client, _peer(client) if self._access_log else "")
        self._connections[connection_id] = connection
        try:
            async with anyio.create_task_group() as tasks:
                connection.task_group = tasks
                self._carry_out(outputs)
                # Only the core ends a connection: its CloseConnection cancels this group.
                await anyio.sleep_forever()
        except Exception:
            # A bug in this driver, not a network event: keep serving the others,
            # and tell the core this connection is gone so its accounting stays right.
            self.logger.exception("connection %d failed", connection_id)
            self._carry_out(self.core.client_error(connection_id, anyio.current_time()))
        finally:
            del self._connections[connection_id]
            with anyio.CancelScope(shield=True):
                await client.aclose()
                if connection.backend is not None:
                    await connection.backend.aclose()

    # -- carrying out the core's orders ---------------------------------------------

    def _carry_out(self, outputs: list[Output]) -> None:
        """Do what the core asked, in order; record its events. Never blocks."""
        for output in outputs:
            self.metrics.record(output)
            match output:
                case ConnectBackend():
                    self._start_attempt(output)
                case ShutdownWrite():
                    connection = self._connections.get(output.connection_id)
                    if connection is not None and connection.task_group is not None:
                        connection.task_group.start_soon(self._send_eof, connection, output.side)
                case CloseConnection():
                    connection = self._connections.get(output.connection_id)
                    if connection is not None and connection.task_group is not None:
                        connection.task_group.cancel_scope.cancel()
                case ProbeBackend():
                    assert self._tasks is not None
                    self._tasks.start_soon(self._probe, output.backend, output.timeout)
                case StopAccepting():
                    assert self._accepting is not None
                    self._accepting.cancel()
                case ConnectionClosed():
                    if self._access_log:
                        self._log_access(output)
                case BackendStateChanged():
                    log(
                        self.logger,
                        logging.INFO if output.new is HealthState.HEALTHY else logging.WARNING,
                        "backend state changed",
                        backend=output.address,
                        old=output.old.value,
                        new=output.new.value,
                        reason=output.reason,
                    )
                case SnapshotPublished():
                    log(
                        self.logger,
                        logging.INFO,
                        "snapshot published",
                        version=output.version,
                        eligible=len(output.addresses),
                        backends=",".join(output.addresses),
                    )
                case ShutdownStarted():
                    self._shutdown_began = output.at
                    log(
                        self.logger,
                        logging.INFO,
                        "shutdown started: not accepting, draining",
                        in_flight=output.in_flight,
                        drain_timeout=self.config.timeouts.drain,
                    )
                case ShutdownFinished():
                    log(
                        self.logger,
                        logging.WARNING if output.cut else logging.INFO,
                        "shutdown finished",
                        cut=output.cut,
                        took=round(output.at - self._shutdown_began, 3),
                    )
        if self.core.stopped:
            assert self._tasks is not None
            self._tasks.cancel_scope.cancel()
            return
        timer = self._timer
        if timer is not None:
            deadline = self.core.next_deadline()
            if deadline is not None and deadline < timer.deadline:
                timer.deadline = deadline

    def _start_attempt(self, action: ConnectBackend) -> None:
        connection = self._connections.get(action.connection_id)
        if connection is None or connection.task_group is None:
            return
        if connection.attempt_scope is not None:
            connection.attempt_scope.cancel()  # the core gave up on the previous attempt
        attempt_scope = anyio.CancelScope()
        connection.attempt_scope = attempt_scope
        connection.task_group.start_soon(
            self._connect, connection, action.attempt, action.backend, attempt_scope
        )

    async def _connect(
        self,
        connection: _Connection,
        attempt: int,
        backend: Backend,
        attempt_scope: anyio.CancelScope,
    ) -> None:
        core = self.core
        connection_id = connection.connection_id
        with attempt_scope:
            started = anyio.current_time()
            try:
                stream = await anyio.connect_tcp(backend.host, backend.port)
            except OSError:
                self._carry_out(core.connect_failed(connection_id, attempt, anyio.current_time()))
                return
            now = anyio.current_time()
            outputs = core.connected(connection_id, attempt, now)
            if not outputs:  # stale: the core already gave up on this attempt
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                return
            connection.backend = stream
            connection.backend_address = backend.address
            connection.attempt_scope = None
            self.metrics.connect_time.labels(backend.address).observe(now - started)
            assert connection.task_group is not None
            connection.task_group.start_soon(self._copy, connection, Side.CLIENT)
            connection.task_group.start_soon(self._copy, connection, Side.BACKEND)
            self._carry_out(outputs)

    async def _copy(self, connection: _Connection, source_side: Side) -> None:
        """Copy one direction until it ends, then report how it ended."""
        core = self.core
        connection_id = connection.connection_id
        client, backend = connection.client, connection.backend
        assert backend is not None
        counter = self.metrics.bytes.labels(
            connection.backend_address, TO_BACKEND if source_side is Side.CLIENT else TO_CLIENT
        )
        moved: Callable[[int], None]
        if source_side is Side.CLIENT:
            source, sink, sink_side = client, backend, Side.BACKEND

            def moved(count: int) -> None:
                connection.bytes_to_backend += count
                counter.inc(count)
                core.touch(connection_id, anyio.current_time())

        else:
            source, sink, sink_side = backend, client, Side.CLIENT

            def moved(count: int) -> None:
                connection.bytes_to_client += count
                counter.inc(count)
                core.touch(connection_id, anyio.current_time())

        end = await copy_bytes(source, sink, moved)
        now = anyio.current_time()
        if end is CopyEnd.EOF:
            if source_side is Side.CLIENT:
                self._carry_out(core.client_eof(connection_id, now))
            else:
                self._carry_out(core.backend_eof(connection_id, now))
        else:
            failed = source_side if end is CopyEnd.SOURCE_ERROR else sink_side
            self._carry_out(self._report_error(connection_id, failed, now))

    def _report_error(self, connection_id: int, side: Side, now: float) -> list[Output]:
        if side is Side.CLIENT:
            return self.core.client_error(connection_id, now)
        return self.core.backend_error(connection_id, now)

    async def _send_eof(self, connection: _Connection, side: Side) -> None:
        stream = connection.stream(side)
        assert stream is not None
        try:
            await stream.send_eof()
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            # The peer is gone (e.g. it reset): that ends the connection.
            self._carry_out(
                self._report_error(connection.connection_id, side, anyio.current_time())
            )

    async def _probe(self, backend: Backend, timeout: float) -> None:
        ok = False
        with anyio.move_on_after(timeout):
            try:
                stream = await anyio.connect_tcp(backend.host, backend.port)
            except OSError:
                pass
            else:
                ok = True
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
        self.metrics.probe(backend.address, ok)
        log(self.logger, logging.DEBUG, "probe", backend=backend.address, ok=ok)
        self._carry_out(self.core.probe_result(backend.address, ok, anyio.current_time()))

    def _log_access(self, closed: ConnectionClosed) -> None:
        connection = self._connections.get(closed.connection_id)
        connected_at = closed.connected_at
        connect_time = None if connected_at is None else round(connected_at - closed.opened_at, 6)
        log(
            self.logger,
            logging.INFO,
            "connection",
            client=connection.peer if connection is not None else "",
            backend=closed.backend or "",
            outcome=closed.outcome.value,
            bytes_to_backend=connection.bytes_to_backend if connection is not None else 0,
            bytes_to_client=connection.bytes_to_client if connection is not None else 0,
            duration=round(closed.at - closed.opened_at, 6),
            connect_time=connect_time,
            attempts=closed.attempts,
        )


def _local(listener: SocketListener) -> tuple[str, int]:
    address = listener.extra(anyio.abc.SocketAttribute.local_address)
    assert isinstance(address, tuple)
    return str(address[0]), int(address[1])


def _peer(stream: SocketStream) -> str:
    try:
        address = stream.extra(anyio.abc.SocketAttribute.remote_address)
    except OSError:
        return ""  # already reset by the peer
    if isinstance(address, tuple):
        return format_address(str(address[0]), int(address[1]))
    return str(address)
