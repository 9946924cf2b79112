"""The daemon: Loble's core on real sockets.

:class:`Daemon` is a thin driver. It accepts clients, asks the core what to
do, carries out the core's actions (connect, half-close, close, probe, stop
accepting) and reports back what the network did. It decides nothing: which
backend, when to retry, when a connection is idle and when draining ends all
come out of :class:`loble.core.ProxyCore`, through one method,
:meth:`Daemon._carry_out`, that every core call's outputs go through.

The per-connection work (accept, connect, move bytes, close) is done by a
*data path*, one of two, both behind the same small interface
(:class:`DataPath`) and both reporting through the ``Daemon`` methods in the
"reports from the data path" section:

* ``callbacks`` (:mod:`._callbacks`, asyncio and uvloop): readiness callbacks
  that stay registered (``loop.add_reader``) drive accepts, connects and
  copies; a connection costs no task and no future, and a wakeup no
  registration;
* ``tasks`` (:mod:`._tasks`, any anyio backend; the default on trio): one
  task group per connection, raw sockets and ``wait_readable``.

Bytes move in :mod:`._copy` (``auto``, ``splice`` or ``recv_into``). The rest runs in
one anyio task group: the timer (sleeps until ``core.next_deadline()``), the
signal watcher, the metrics endpoint and health probes.

The core is single-threaded and so is this driver: everything runs on the
event loop's thread, including the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import math
import os
import random
import signal
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import anyio
from anyio.abc import SocketListener, TaskGroup, TaskStatus

from loble.core import (
    Backend,
    BackendStateChanged,
    CloseConnection,
    Config,
    ConnectBackend,
    ConnectionClosed,
    HealthState,
    LobleError,
    Outcome,
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

from ._copy import SPLICE_AVAILABLE, BufferPool, CopyMethod, OneWay, Pumped
from ._logging import log
from ._metrics import TO_BACKEND, TO_CLIENT, Metrics, serve_metrics

__all__ = ["COPY_ENV", "DATA_PATH_ENV", "Daemon", "DataPath", "format_address"]

COPY_ENV = "LOBLE_COPY"
"""Environment variable: ``auto`` (default on Linux), ``splice`` or ``recv_into``."""

DATA_PATH_ENV = "LOBLE_DATA_PATH"
"""Environment variable: ``callbacks`` (default on asyncio/uvloop) or ``tasks``."""

DATA_PATHS = ("callbacks", "tasks")

ACCEPT_BACKOFF = 0.1
"""Seconds to pause accepting after an accept error such as EMFILE."""

ACCEPT_BATCH = 64
"""Connections accepted per wakeup of a listening socket at most."""

TOUCH_RESOLUTION = 0.001
"""Seconds: the core hears of a connection's activity at most this often.

Bytes moving push the connection's idle deadline back (``core.touch``).
Telling the core on every wakeup cost a core call per wakeup, two per
proxied request; once per millisecond per connection is as fine as HAProxy's
clock, read once per loop turn in milliseconds. An idle timeout can so end
a connection at most this much before a full ``idle`` has passed since its
last byte, and at most 1% of ``idle`` (the daemon's resolution is the
smaller of the two: with the shortest idle timeouts every wakeup counts).
"""


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def established(sock: socket.socket) -> bool:
    """Whether a connect that answered EINPROGRESS has in fact completed.

    On loopback (and for very near backends) the handshake usually finishes
    inside ``connect`` itself: the backend's SYN-ACK is processed as the
    call releases the socket. Asking costs one system call and saves a
    writer registration, its removal and a wakeup; ``getpeername`` fails
    with ENOTCONN while the handshake is still under way or has failed.
    """
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


Addresses = list[tuple[int, Any]]
"""``(family, sockaddr)`` pairs to try in order for one backend."""


SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""Errors making a socket that are this process's shortage, not a backend's fault.
(``EADDRNOTAVAIL`` from a connect is not among them: it also means an address
family switched off on this host, a real failure to reach that address.)"""

_RESETS = frozenset({Outcome.CLIENT_RESET, Outcome.BACKEND_RESET, Outcome.RESOURCE_EXHAUSTED})
"""Outcomes passed on as a reset: an orderly FIN would make a truncated stream look complete."""

_LINGER_ABORT = struct.pack("ii", 1, 0)


def _reset_on_close(connection: _Connection) -> None:
    """Make closing the connection's sockets send RST instead of FIN."""
    for sock in (connection.client, connection.backend):
        if sock is not None and sock.fileno() >= 0:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)


class _Connection:
    """The driver's side of one client connection: its sockets and directions."""

    __slots__ = (
        "attempt",
        "backend",
        "backend_address",
        "client",
        "connection_id",
        "counters",
        "handle",
        "peer",
        "to_backend",
        "to_client",
        "touch_due",
    )

    def __init__(self, connection_id: int, client: socket.socket, peer: str, handle: Any) -> None:
        self.connection_id = connection_id
        self.client = client
        self.peer = peer
        self.handle = handle
        """The data path's own state for this connection (e.g. its task group)."""
        self.attempt: Any = None
        """The data path's connect attempt in progress, if any."""
        self.backend: socket.socket | None = None
        self.backend_address = ""
        self.to_backend: OneWay | None = None
        self.to_client: OneWay | None = None
        self.counters: tuple[Any, Any] | None = None
        self.touch_due = 0.0
        """When activity is next worth telling the core (:data:`TOUCH_RESOLUTION`)."""

    def socket(self, side: Side) -> socket.socket | None:
        return self.client if side is Side.CLIENT else self.backend

    @property
    def bytes_to_backend(self) -> int:
        return self.to_backend.total if self.to_backend is not None else 0

    @property
    def bytes_to_client(self) -> int:
        return self.to_client.total if self.to_client is not None else 0


class DataPath(Protocol):
    """What the daemon asks of a data path; see :mod:`._callbacks` and :mod:`._tasks`."""

    async def serve(self, listeners: Sequence[socket.socket]) -> None:
        """Accept on ``listeners`` until cancelled (the caller closes them)."""

    def connect(self, connection: _Connection, action: ConnectBackend) -> None:
        """Start the attempt (abandoning any earlier one); report through the daemon."""

    def forward(self, connection: _Connection) -> None:
        """The backend is connected: start both directions."""

    def close(self, connection: _Connection) -> None:
        """Close the connection's sockets and stop its work (the core ended it)."""

    def dispose(self) -> None:
        """The daemon has stopped, every connection is closed: release the rest."""


class Daemon:
    """One load balancer on real sockets; :meth:`run` serves until shutdown.

    ``copy`` and ``data_path`` choose how bytes move (see the module doc);
    unset, they come from the ``LOBLE_COPY`` and ``LOBLE_DATA_PATH``
    environment variables, else the fastest the platform and loop allow.
    ``reuse_port`` sets ``SO_REUSEPORT`` on the listening sockets and
    ``worker`` is this process's index, when it is one of several workers.
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
    ) -> None:
        self.config = config
        self.core = ProxyCore(config, rng or random.Random())
        self.metrics = Metrics(self.core)
        self.metrics.before_render = self._count_bytes_in_flight
        self.logger = logger or logging.getLogger("loble")
        self.copy_method = _copy_method(copy)
        self.pool = BufferPool(self.copy_method)
        self._data_path_name = _data_path_name(data_path)
        self.data_path_name = ""
        """The data path in use, once running: ``callbacks`` or ``tasks``."""
        self.reuse_port = reuse_port
        self.worker = worker
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
        self._path: DataPath | None = None
        self._carrying = False
        self._backlog: list[Output] = []
        self._resource_warned = -math.inf
        self._resource_failures = 0
        self._closing: dict[int, _Connection] = {}
        self._counters: dict[str, tuple[Any, Any]] = {}
        self._addresses: dict[str, Addresses | None] = {}
        self._actions: dict[type, Callable[[Any], None]] = {
            ConnectBackend: self._do_connect,
            ShutdownWrite: self._do_shutdown_write,
            CloseConnection: self._do_close,
            ProbeBackend: self._do_probe,
            StopAccepting: self._do_stop_accepting,
            ConnectionClosed: self._do_closed,
            BackendStateChanged: self._do_state_changed,
            SnapshotPublished: self._do_snapshot,
            ShutdownStarted: self._do_shutdown_started,
            ShutdownFinished: self._do_shutdown_finished,
        }
        # While the timer is already due sooner than now + this lead, no core
        # call can bring it closer: next_deadline() need not be asked.
        self._timer_lead = self.core.timer_lead()
        self._touch_resolution = min(TOUCH_RESOLUTION, config.timeouts.idle / 100)
        self.now: Callable[[], float] = anyio.current_time
        """The core's clock: the event loop's monotonic time."""

    # -- reading -------------------------------------------------------------------

    @property
    def listen_address(self) -> tuple[str, int]:
        return self.listen_addresses[0]

    @property
    def open_connections(self) -> int:
        """Client connections whose sockets are not yet closed."""
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
        listeners = await self._listen(
            self.config.listener.address, "listener.address", reuse_port=self.reuse_port
        )
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
        if self._data_path_name == "callbacks" and _current_library() != "asyncio":
            raise LobleError(f"{DATA_PATH_ENV}: 'callbacks' needs asyncio or uvloop")
        await self.bind()
        self._started = True
        self._accepting = anyio.CancelScope()
        listeners, metrics_listeners = self._listeners, self._metrics_listeners
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                self._path = self._make_path(tasks)
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
                worker = {} if self.worker is None else {"worker": self.worker}
                log(
                    self.logger,
                    logging.INFO,
                    "listening",
                    address=", ".join(format_address(*a) for a in self.listen_addresses),
                    balancer=config.balancer.algorithm,
                    backends=len(config.backends),
                    data_path=self.data_path_name,
                    copy=self.copy_method.value,
                    **worker,
                )
                self._carry_out(self.core.start(self.now()))
                task_status.started()
        finally:
            if self._path is not None:
                self._path.dispose()
            self.pool.close()
        log(self.logger, logging.INFO, "stopped")

    def shutdown(self) -> None:
        """Begin a graceful shutdown, as SIGTERM does; a second call cuts what remains."""
        self._carry_out(self.core.shutdown(self.now()))

    def _make_path(self, tasks: TaskGroup) -> DataPath:
        library = _current_library()
        name = self._data_path_name or ("callbacks" if library == "asyncio" else "tasks")
        if name == "callbacks":
            from ._callbacks import CallbackPath

            path: DataPath = CallbackPath(self)
        else:
            from ._tasks import TaskPath

            path = TaskPath(self, tasks, library)
        if library == "trio":
            import trio

            self.now = trio.current_time
        else:
            loop = asyncio.get_running_loop()
            # asyncio's loop.time() is time.monotonic() behind a Python call;
            # read the same clock directly (it is read several times per
            # connection). Other loops (uvloop) keep their own time().
            plain = type(loop).time is asyncio.BaseEventLoop.time
            self.now = time.monotonic if plain else loop.time
        self.data_path_name = name
        return path

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
            self._carry_out(core.handle_timer(self.now()))

    async def _accept_all(self, listeners: Sequence[SocketListener]) -> None:
        assert self._accepting is not None and self._path is not None
        raw = []
        for listener in listeners:
            sock = listener.extra(anyio.abc.SocketAttribute.raw_socket)
            sock.setblocking(False)
            raw.append(sock)
        try:
            with self._accepting:
                await self._path.serve(raw)
        finally:
            # Closing the listening sockets is what makes new connects fail fast.
            with anyio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    # -- reports from the data path ---------------------------------------------------

    def accepted(self, client: socket.socket, handle: Any = None) -> _Connection:
        """A client connected: register it and carry out the core's first orders."""
        connection_id, outputs = self.core.accept(self.now())
        connection = _Connection(
            connection_id, client, _peer(client) if self._access_log else "", handle
        )
        self._connections[connection_id] = connection
        try:
            self._carry_out(outputs)
        except Exception:
            self.driver_failed(connection)
        return connection

    def accept_failed(self, error: OSError) -> None:
        log(self.logger, logging.WARNING, "accept failed", error=str(error))

    def addresses(self, backend: Backend) -> Addresses | None:
        """Where to connect for ``backend`` if known without a lookup (an IP literal)."""
        address = backend.address
        try:
            return self._addresses[address]
        except KeyError:
            pass
        try:
            ip = ipaddress.ip_address(backend.host)
        except ValueError:
            found: Addresses | None = None  # a host name: looked up for each attempt
        else:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            found = [(int(family), (str(ip), backend.port))]
        self._addresses[address] = found
        return found

    def connected(
        self,
        connection: _Connection,
        attempt: int,
        backend: Backend,
        sock: socket.socket,
        started: float,
    ) -> None:
        """The attempt connected; forward both ways unless the core gave up on it."""
        now = self.now()
        outputs = self.core.connected(connection.connection_id, attempt, now)
        if not outputs:  # stale: the core already gave up on this attempt
            sock.close()
            return
        connection.attempt = None
        connection.backend = sock
        address = connection.backend_address = backend.address
        counters = self._counters.get(address)
        if counters is None:
            labels = self.metrics.bytes.labels
            counters = self._counters[address] = (
                labels(address, TO_BACKEND),
                labels(address, TO_CLIENT),
            )
        connection.counters = counters
        pool = self.pool
        connection.to_backend = OneWay(connection.client, sock, pool)
        connection.to_client = OneWay(sock, connection.client, pool)
        self.metrics.connect_duration(address).observe(now - started)
        assert self._path is not None
        self._path.forward(connection)
        self._carry_out(outputs)

    def out_of_resources(self, connection: _Connection, error: OSError) -> None:
        """No socket for a backend connect (e.g. EMFILE): end this client's connection.

        The shortage is this process's, not the backend's: reported as
        ``RESOURCE_EXHAUSTED``, which gives no verdict on the backend, so fd
        pressure never marks healthy backends unhealthy, and counts apart
        from the peers' resets. Warned about once per second at
        most.
        """
        self._resource_failures += 1
        now = self.now()
        if now - self._resource_warned >= 1.0:
            log(
                self.logger,
                logging.WARNING,
                "no socket for a backend connect: closing the client",
                error=str(error),
                connections=self._resource_failures,
            )
            self._resource_warned = now
            self._resource_failures = 0
        self._carry_out(self.core.resource_exhausted(connection.connection_id, now))

    def connect_failed(self, connection: _Connection, attempt: int) -> None:
        self._carry_out(self.core.connect_failed(connection.connection_id, attempt, self.now()))

    def copy_ended(self, connection: _Connection, way: OneWay, end: Pumped) -> None:
        """One direction stopped: tell the core how."""
        core = self.core
        connection_id = connection.connection_id
        from_client = way is connection.to_backend
        now = self.now()
        if end is Pumped.EOF:
            if from_client:
                self._carry_out(core.client_eof(connection_id, now))
            else:
                self._carry_out(core.backend_eof(connection_id, now))
            return
        source, sink = (Side.CLIENT, Side.BACKEND) if from_client else (Side.BACKEND, Side.CLIENT)
        failed = source if end is Pumped.SOURCE_ERROR else sink
        self._carry_out(self._report_error(connection_id, failed, now))

    def active(self, connection: _Connection) -> None:
        """Bytes moved on ``connection``: push its idle deadline back (coarsely)."""
        now = self.now()
        if now >= connection.touch_due:
            connection.touch_due = now + self._touch_resolution
            self.core.touch(connection.connection_id, now)

    def driver_failed(self, connection: _Connection) -> None:
        """A bug in this driver, not a network event: keep serving the others,
        and tell the core this connection is gone so its accounting stays right."""
        self.logger.exception("connection %d failed", connection.connection_id)
        self._carry_out(self.core.client_error(connection.connection_id, self.now()))

    def forget(self, connection: _Connection) -> None:
        """The connection's sockets are closed: count its last bytes, drop it."""
        self._connections.pop(connection.connection_id, None)
        counters = connection.counters
        if counters is not None:
            for way, counter in (
                (connection.to_backend, counters[0]),
                (connection.to_client, counters[1]),
            ):
                if way is not None:
                    way.release()
                    if way.total != way.reported:
                        counter.inc(way.total - way.reported)
                        way.reported = way.total

    def _count_bytes_in_flight(self) -> None:
        # Bytes are counted into the metric when a connection closes and,
        # for the open ones, here, just before a scrape: one counter update
        # per scrape instead of one per read.
        for connection in self._connections.values():
            counters = connection.counters
            if counters is None:
                continue
            for way, counter in (
                (connection.to_backend, counters[0]),
                (connection.to_client, counters[1]),
            ):
                if way is not None and way.total != way.reported:
                    counter.inc(way.total - way.reported)
                    way.reported = way.total

    # -- carrying out the core's orders ---------------------------------------------

    def _carry_out(self, outputs: list[Output]) -> None:
        """Do what the core asked, in order; record its events. Never blocks.

        A report made while carrying out (e.g. a half-close that fails at once)
        queues its outputs behind the current ones instead of interleaving.
        """
        if self._carrying:
            self._backlog.extend(outputs)
            return
        self._carrying = True
        try:
            self._carry_out_list(outputs)
            while self._backlog:
                outputs, self._backlog = self._backlog, []
                self._carry_out_list(outputs)
        finally:
            self._carrying = False
            self._closing.clear()
            self._backlog.clear()  # after a failure, never replay stale orders later
        if self.core.stopped:
            assert self._tasks is not None
            self._tasks.cancel_scope.cancel()
            return
        # Any timer these outputs' call filed is due no sooner than now + lead
        # (ProxyCore.timer_lead): wake by then at the latest. Cheaper than
        # asking next_deadline() after every call, which on a busy daemon is
        # most calls, and it moves the timer once per lead, not per connection;
        # the timer task asks next_deadline() itself when it wakes.
        timer = self._timer
        if timer is not None:
            bound = self.now() + self._timer_lead
            if timer.deadline > bound:
                timer.deadline = bound

    def _carry_out_list(self, outputs: list[Output]) -> None:
        record = self.metrics.record
        actions = self._actions
        for output in outputs:
            record(output)
            action = actions.get(type(output))
            if action is not None:
                action(output)

    # One method per kind of output, found by type (most outputs, e.g. health
    # reports, need nothing here): a dict lookup instead of a chain of
    # isinstance checks, several times per connection.

    def _do_connect(self, output: ConnectBackend) -> None:
        connection = self._connections.get(output.connection_id)
        if connection is not None:
            assert self._path is not None
            self._path.connect(connection, output)

    def _do_shutdown_write(self, output: ShutdownWrite) -> None:
        connection = self._connections.get(output.connection_id)
        if connection is not None:
            self._send_eof(connection, output.side)

    def _do_close(self, output: CloseConnection) -> None:
        connection = self._connections.get(output.connection_id)
        if connection is not None:
            assert self._path is not None
            self._closing[output.connection_id] = connection
            if output.outcome in _RESETS:
                _reset_on_close(connection)
            self._path.close(connection)

    def _do_probe(self, output: ProbeBackend) -> None:
        assert self._tasks is not None
        self._tasks.start_soon(self._probe, output.backend, output.timeout)

    def _do_stop_accepting(self, output: StopAccepting) -> None:
        assert self._accepting is not None
        self._accepting.cancel()

    def _do_closed(self, output: ConnectionClosed) -> None:
        if self._access_log:
            self._log_access(output)

    def _do_state_changed(self, output: BackendStateChanged) -> None:
        log(
            self.logger,
            logging.INFO if output.new is HealthState.HEALTHY else logging.WARNING,
            "backend state changed",
            backend=output.address,
            old=output.old.value,
            new=output.new.value,
            reason=output.reason,
        )

    def _do_snapshot(self, output: SnapshotPublished) -> None:
        log(
            self.logger,
            logging.INFO,
            "snapshot published",
            version=output.version,
            eligible=len(output.addresses),
            backends=",".join(output.addresses),
        )

    def _do_shutdown_started(self, output: ShutdownStarted) -> None:
        self._shutdown_began = output.at
        log(
            self.logger,
            logging.INFO,
            "shutdown started: not accepting, draining",
            in_flight=output.in_flight,
            drain_timeout=self.config.timeouts.drain,
        )

    def _do_shutdown_finished(self, output: ShutdownFinished) -> None:
        log(
            self.logger,
            logging.WARNING if output.cut else logging.INFO,
            "shutdown finished",
            cut=output.cut,
            took=round(output.at - self._shutdown_began, 3),
        )

    def _report_error(self, connection_id: int, side: Side, now: float) -> list[Output]:
        if side is Side.CLIENT:
            return self.core.client_error(connection_id, now)
        return self.core.backend_error(connection_id, now)

    def _send_eof(self, connection: _Connection, side: Side) -> None:
        # The direction into this socket has ended with nothing held (a copy
        # reads EOF only once its buffer is empty), so EOF follows every byte.
        sock = connection.socket(side)
        assert sock is not None
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            # The peer is gone (e.g. it reset): that ends the connection.
            self._carry_out(self._report_error(connection.connection_id, side, self.now()))

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
        self._carry_out(self.core.probe_result(backend.address, ok, self.now()))

    def _log_access(self, closed: ConnectionClosed) -> None:
        connection = self._connections.get(closed.connection_id) or self._closing.get(
            closed.connection_id
        )
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


def _copy_method(chosen: str | None) -> CopyMethod:
    value = chosen if chosen is not None else os.environ.get(COPY_ENV, "")
    if not value:
        return CopyMethod.default()
    try:
        method = CopyMethod(value)
    except ValueError:
        options = ", ".join(m.value for m in CopyMethod)
        raise LobleError(f"{COPY_ENV}: {value!r} is not one of {options}") from None
    if method.needs_splice and not SPLICE_AVAILABLE:
        raise LobleError(f"{COPY_ENV}: {value!r} needs Linux; use 'recv_into'")
    return method


def _data_path_name(chosen: str | None) -> str:
    value = chosen if chosen is not None else os.environ.get(DATA_PATH_ENV, "")
    if value and value not in DATA_PATHS:
        raise LobleError(f"{DATA_PATH_ENV}: {value!r} is not one of {', '.join(DATA_PATHS)}")
    return value


def _current_library() -> str:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return "trio"  # anyio runs on asyncio or trio
    return "asyncio"


def _local(listener: SocketListener) -> tuple[str, int]:
    address = listener.extra(anyio.abc.SocketAttribute.local_address)
    assert isinstance(address, tuple)
    return str(address[0]), int(address[1])


def _peer(sock: socket.socket) -> str:
    try:
        address = sock.getpeername()
    except OSError:
        return ""  # already reset by the peer
    if isinstance(address, tuple):
        return format_address(str(address[0]), int(address[1]))
    return str(address)
