"""The task data path (any anyio backend; the default on trio): raw sockets and waits.

Per client connection one task holds a task group; in it run the connect
attempt and, once connected, one task per direction. A direction loops:
move what it can (:meth:`~._copy.OneWay.pump`), then wait until its source
is readable or, while bytes are held, until its sink is writable. The
core's ``CloseConnection`` cancels the group; the connection's task then
closes both sockets, so no socket or task outlives its connection.

On trio the waits are ``trio.lowlevel.wait_readable``/``wait_writable``,
which are cheap. On asyncio this path works too (the end-to-end tests run it
there), but each wait registers a reader and a future and removes them
again; the ``callbacks`` path avoids that and is asyncio's default.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from loble.core import ConnectBackend

from ._copy import OneWay, Pumped
from ._daemon import ACCEPT_BACKOFF, ACCEPT_BATCH, SHORTAGES, established

if TYPE_CHECKING:
    from ._daemon import Daemon, _Connection

__all__ = ["TaskPath"]

_READ = Pumped.READ
_WRITE = Pumped.WRITE
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_ACCEPT_SKIP = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}

Wait = Callable[[Any], Awaitable[None]]


class TaskPath:
    """The data path of :mod:`._daemon` built on tasks and ``wait_readable``."""

    def __init__(self, daemon: Daemon, tasks: TaskGroup, library: str) -> None:
        self._daemon = daemon
        self._tasks = tasks
        self._wait_readable: Wait = anyio.wait_readable
        self._wait_writable: Wait = anyio.wait_writable
        if library == "trio":
            import trio

            # anyio's wrappers only translate exceptions these never raise here.
            self._wait_readable = trio.lowlevel.wait_readable
            self._wait_writable = trio.lowlevel.wait_writable

    def dispose(self) -> None:
        pass  # holds nothing beyond its connections

    # -- accepting -----------------------------------------------------------------

    async def serve(self, listeners: Sequence[socket.socket]) -> None:
        async with anyio.create_task_group() as accepting:
            for listener in listeners:
                accepting.start_soon(self._accept_loop, listener)

    async def _accept_loop(self, listener: socket.socket) -> None:
        wait_readable = self._wait_readable
        start_soon = self._tasks.start_soon
        while True:
            await wait_readable(listener)
            for _ in range(ACCEPT_BATCH):
                try:
                    client, _ = listener.accept()
                except BlockingIOError:
                    break
                except OSError as error:
                    if error.errno in _ACCEPT_SKIP:
                        continue
                    self._daemon.accept_failed(error)
                    await anyio.sleep(ACCEPT_BACKOFF)
                    break
                client.setblocking(False)
                client.setsockopt(*_NODELAY)
                start_soon(self._serve_client, client)

    async def _serve_client(self, client: socket.socket) -> None:
        daemon = self._daemon
        connection = None
        try:
            async with anyio.create_task_group() as tasks:
                connection = daemon.accepted(client, tasks)
                # Only the core ends a connection: its CloseConnection cancels this group.
                await anyio.sleep_forever()
        except Exception:
            if connection is None:
                raise
            daemon.driver_failed(connection)
        finally:
            client.close()
            if connection is not None:
                if connection.backend is not None:
                    connection.backend.close()
                daemon.forget(connection)

    # -- connecting ----------------------------------------------------------------

    def connect(self, connection: _Connection, action: ConnectBackend) -> None:
        previous: anyio.CancelScope | None = connection.attempt
        if previous is not None:
            previous.cancel()  # the core gave up on the previous attempt
        scope = connection.attempt = anyio.CancelScope()
        tasks: TaskGroup = connection.handle
        tasks.start_soon(self._connect, connection, action, scope)

    async def _connect(
        self, connection: _Connection, action: ConnectBackend, scope: anyio.CancelScope
    ) -> None:
        daemon = self._daemon
        backend = action.backend
        with scope:
            started = daemon.now()
            addresses = daemon.addresses(backend)
            if addresses is None:
                try:
                    found = await anyio.getaddrinfo(
                        backend.host, backend.port, type=socket.SOCK_STREAM
                    )
                except OSError:
                    found = []
                addresses = [(info[0], info[4]) for info in found]
            for family, address in addresses:
                try:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                except OSError as failure:
                    if failure.errno not in SHORTAGES:
                        continue  # e.g. EAFNOSUPPORT: this address family is off here
                    connection.attempt = None  # EMFILE and the like: ours, not the backend's
                    daemon.out_of_resources(connection, failure)
                    return
                try:
                    sock.setblocking(False)
                    sock.setsockopt(*_NODELAY)
                    error = sock.connect_ex(address)
                    if error == errno.EINPROGRESS and not established(sock):
                        await self._wait_writable(sock)
                        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    elif error == errno.EINPROGRESS:
                        error = 0
                except BaseException:
                    sock.close()
                    raise
                if error == 0:
                    connection.attempt = None
                    daemon.connected(connection, action.attempt, backend, sock, started)
                    return
                sock.close()
            connection.attempt = None
            daemon.connect_failed(connection, action.attempt)

    # -- forwarding ----------------------------------------------------------------

    def forward(self, connection: _Connection) -> None:
        tasks: TaskGroup = connection.handle
        for way in (connection.to_backend, connection.to_client):
            assert way is not None
            tasks.start_soon(self._copy, connection, way)

    async def _copy(self, connection: _Connection, way: OneWay) -> None:
        daemon = self._daemon
        active = daemon.active
        wait_readable, wait_writable = self._wait_readable, self._wait_writable
        source, sink = way.source, way.sink
        while True:
            end = way.pump()
            if way.moved:
                active(connection)
            if end is _READ:
                await wait_readable(source)
            elif end is _WRITE:
                await wait_writable(sink)
            else:
                daemon.copy_ended(connection, way, end)
                return

    # -- closing -------------------------------------------------------------------

    def close(self, connection: _Connection) -> None:
        tasks: TaskGroup = connection.handle
        tasks.cancel_scope.cancel()
