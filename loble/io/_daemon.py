"""The daemon's lifecycle: bind, start the layers, serve until shutdown, stop.

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
  accept loop, the metrics endpoint and health probes, until the core says
  it has stopped.

It decides nothing: which backend, when to retry, when a connection is
idle and when draining ends all come out of the core. Everything runs on
the event loop's thread, including the metrics endpoint.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import socket
from functools import partial
from typing import TypeAlias

import anyio
from anyio.abc import SocketListener, TaskGroup, TaskStatus

from loble.core import Backend, Config, LobleError, ProxyCore, parse_address

from ._callbacks import CallbackLink, CallbackPath
from ._conductor import Conductor
from ._copy import BufferPool
from ._datapath import format_address, probe
from ._journal import Journal
from ._logging import log
from ._metrics import Metrics, serve_metrics
from ._runtime import (
    choose_copy_method,
    choose_data_path,
    current_library,
    data_path_for,
    loop_clock,
)
from ._tasks import TaskLink, TaskPath

__all__ = ["Daemon"]

AnyConductor: TypeAlias = "Conductor[CallbackLink] | Conductor[TaskLink]"


class Daemon:
    """One load balancer on real sockets; :meth:`run` serves until shutdown.

    ``copy`` and ``data_path`` choose how bytes move (see :mod:`._runtime`);
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
        self.logger = logger or logging.getLogger("loble")
        self.metrics = Metrics(self.core)
        self.journal = Journal(self.logger, config.logging, config.timeouts.drain)
        self.copy_method = choose_copy_method(copy)
        self.pool = BufferPool(self.copy_method)
        self._data_path = choose_data_path(data_path)
        self.data_path_name = ""
        """The data path in use, once running: ``callbacks`` or ``tasks``."""
        self.reuse_port = reuse_port
        self.worker = worker
        self.listen_addresses: list[tuple[str, int]] = []
        """Where clients connect (the OS-chosen port when configured as 0)."""
        self.metrics_address: tuple[str, int] | None = None
        self.conductor: AnyConductor | None = None
        """The core's driver, while running."""
        self._accepting: anyio.CancelScope | None = None
        self._started = False
        self._listeners: list[SocketListener] = []
        self._metrics_listeners: list[SocketListener] = []

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
        self.data_path_name = data_path_for(self._data_path, current_library())
        await self.bind()
        self._started = True
        self._accepting = anyio.CancelScope()
        try:
            async with anyio.create_task_group() as tasks:
                conductor = self.conductor = self._conduct(tasks)
                self.metrics.before_render = self._count_bytes_in_flight
                if handle_signals:
                    await tasks.start(self._watch_signals, conductor)
                tasks.start_soon(self._run_timer, conductor)
                tasks.start_soon(self._accept_all, conductor)
                for listener in self._metrics_listeners:
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
                conductor.start()
                task_status.started()
        finally:
            if self.conductor is not None:
                self.conductor.path.dispose()
            self.pool.close()
        log(self.logger, logging.INFO, "stopped")

    def shutdown(self) -> None:
        """Begin a graceful shutdown, as SIGTERM does; a second call cuts what remains."""
        if self.conductor is None:
            raise LobleError("the daemon is not running: nothing to shut down")
        self.conductor.shutdown()

    def _conduct(self, tasks: TaskGroup) -> AnyConductor:
        """The conductor and its data path, on the loop running now."""
        assert self._accepting is not None
        now = loop_clock()
        listeners = (self.metrics, self.journal)

        def start_probe(backend: Backend, timeout: float) -> None:
            tasks.start_soon(self._probe, backend, timeout)

        if self.data_path_name == "callbacks":
            return Conductor[CallbackLink](
                self.core,
                partial(CallbackPath, pool=self.pool, now=now),
                now=now,
                logger=self.logger,
                listeners=listeners,
                probe=start_probe,
                stop_accepting=self._accepting.cancel,
                stopped=tasks.cancel_scope.cancel,
            )
        return Conductor[TaskLink](
            self.core,
            partial(TaskPath, pool=self.pool, now=now, tasks=tasks, library=current_library()),
            now=now,
            logger=self.logger,
            listeners=listeners,
            probe=start_probe,
            stop_accepting=self._accepting.cancel,
            stopped=tasks.cancel_scope.cancel,
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
                conductor.shutdown()

    async def _run_timer(self, conductor: AnyConductor) -> None:
        while True:
            deadline = conductor.next_deadline()
            with anyio.CancelScope(deadline=math.inf if deadline is None else deadline) as timer:
                conductor.timer = timer
                await anyio.sleep_forever()
            conductor.handle_timer()

    async def _accept_all(self, conductor: AnyConductor) -> None:
        listeners = self._listeners
        raw: list[socket.socket] = []
        for listener in listeners:
            sock = listener.extra(anyio.abc.SocketAttribute.raw_socket)
            sock.setblocking(False)
            raw.append(sock)
        assert self._accepting is not None
        try:
            with self._accepting:
                await conductor.path.serve(raw)
        finally:
            # Closing the listening sockets is what makes new connects fail fast.
            with anyio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    async def _probe(self, backend: Backend, timeout: float) -> None:
        ok = await probe(backend, timeout)
        self.metrics.probe(backend.address, ok)
        log(self.logger, logging.DEBUG, "probe", backend=backend.address, ok=ok)
        if self.conductor is not None:
            self.conductor.probe_result(backend.address, ok)

    def _count_bytes_in_flight(self) -> None:
        if self.conductor is not None:
            for link in self.conductor.links.values():
                self.metrics.count_bytes(link)


def _local(listener: SocketListener) -> tuple[str, int]:
    address = listener.extra(anyio.abc.SocketAttribute.local_address)
    assert isinstance(address, tuple)
    return str(address[0]), int(address[1])
