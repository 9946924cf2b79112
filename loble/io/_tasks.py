"""The task data path (any anyio backend; the default on trio): raw sockets and waits.

Per client connection one task holds a task group; in it run the connect
attempt and, once connected, one task per direction. A direction loops:
move what it can (:meth:`~._copy.OneWay.pump`), then wait until its source
is readable or, while bytes are held, until its sink is writable. Closing a
connection cancels its group; the connection's task then closes both
sockets, once no task waits on them any more, so no socket or task outlives
its connection and no wait is left on a descriptor number that a new socket
may take.

On trio the waits are ``trio.lowlevel.wait_readable``/``wait_writable``,
which are cheap. On asyncio this path works too (the end-to-end tests run it
there), but each wait registers a reader and a future and removes them
again; the ``callbacks`` path avoids that and is asyncio's default.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Awaitable, Callable, Sequence

import anyio
from anyio.abc import TaskGroup

from loble.core import ConnectBackend, Side

from ._copy import BufferPool, OneWay, Pumped
from ._datapath import (
    ACCEPT_BACKOFF,
    AddressBook,
    Attempt,
    Dialed,
    Link,
    Reports,
    accept_batch,
    dial,
    dial_finished,
    hand_over,
    listener_label,
    set_reset,
    shut_write,
)

__all__ = ["TaskLink", "TaskPath"]

_READ = Pumped.READ
_WRITE = Pumped.WRITE

Wait = Callable[[socket.socket], Awaitable[None]]


class TaskLink(Link):
    """A :class:`~._datapath.Link` of this path: its task group and connect attempt."""

    __slots__ = ("attempt", "tasks")

    def __init__(
        self, client: socket.socket, address: object, listener: str, tasks: TaskGroup
    ) -> None:
        super().__init__(client, address, listener)
        self.tasks = tasks
        self.attempt: anyio.CancelScope | None = None
        """The scope of the connect attempt in progress, if any."""


class TaskPath:
    """The data path built on tasks and ``wait_readable`` (a :class:`~._datapath.DataPath`)."""

    def __init__(
        self,
        reports: Reports[TaskLink],
        pool: BufferPool,
        now: Callable[[], float],
        tasks: TaskGroup,
        library: str,
    ) -> None:
        self._reports = reports
        self._pool = pool
        self._now = now
        self._tasks = tasks
        self._addresses = AddressBook()
        self._wait_readable: Wait = anyio.wait_readable
        self._wait_writable: Wait = anyio.wait_writable
        if library == "trio":
            # anyio's wrappers only translate exceptions these never raise
            # here, at a lookup per wait; trio runs this loop, so it is imported.
            lowlevel = sys.modules["trio"].lowlevel
            self._wait_readable = lowlevel.wait_readable
            self._wait_writable = lowlevel.wait_writable

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
        serve_client = self._serve_client

        label = listener_label(listener)

        def on_client(client: socket.socket, address: object) -> None:
            start_soon(serve_client, client, address, label)

        while True:
            await wait_readable(listener)
            error = accept_batch(listener, on_client)
            if error is not None:
                self._reports.accept_failed(error)
                await anyio.sleep(ACCEPT_BACKOFF)

    async def _serve_client(self, client: socket.socket, address: object, label: str) -> None:
        link: TaskLink | None = None
        try:
            async with anyio.create_task_group() as tasks:
                link = TaskLink(client, address, label, tasks)
                self._reports.accepted(link)
                # Only the core ends a connection: its CloseConnection cancels this group.
                await anyio.sleep_forever()
        except Exception:
            if link is None:
                raise
            self._reports.driver_failed(link)
        finally:
            # No task of this connection waits on its sockets any more.
            for way in (link.to_backend, link.to_client) if link is not None else ():
                if way is not None:
                    way.release()
            client.close()
            if link is not None:
                if link.backend is not None:
                    link.backend.close()
                self._reports.released(link)

    # -- connecting ----------------------------------------------------------------

    def connect(self, link: TaskLink, action: ConnectBackend) -> None:
        previous = link.attempt
        if previous is not None:
            previous.cancel()  # the core gave up on the previous attempt
        scope = link.attempt = anyio.CancelScope()
        link.tasks.start_soon(self._connect, link, Attempt(action, self._now()), scope)

    async def _connect(self, link: TaskLink, attempt: Attempt, scope: anyio.CancelScope) -> None:
        reports = self._reports
        with scope:
            addresses = self._addresses.known(attempt.backend)
            if addresses is None:
                backend = attempt.backend
                try:
                    found = await anyio.getaddrinfo(
                        backend.host, backend.port, type=socket.SOCK_STREAM
                    )
                except OSError:
                    found = []
                addresses = [(info[0], info[4]) for info in found]
            attempt.remaining = list(addresses)
            while True:
                dialed = dial(attempt)
                if dialed is Dialed.IN_PROGRESS:
                    sock = attempt.sock
                    assert sock is not None
                    try:
                        await self._wait_writable(sock)
                    except BaseException:
                        sock.close()
                        raise
                    if not dial_finished(sock):
                        attempt.sock = None
                        sock.close()
                        continue
                    dialed = Dialed.CONNECTED
                link.attempt = None
                if dialed is Dialed.CONNECTED:
                    hand_over(self._reports, link, attempt)
                elif dialed is Dialed.REFUSED:
                    reports.connect_failed(link, attempt)
                else:
                    assert attempt.error is not None
                    reports.out_of_resources(link, attempt.error)
                return

    def forward(self, link: TaskLink, attempt: Attempt) -> None:
        sock = attempt.sock
        assert sock is not None
        attempt.sock = None
        link.join(sock, attempt.backend.address, self._pool)
        for way in (link.to_backend, link.to_client):
            assert way is not None
            link.tasks.start_soon(self._copy, link, way)

    # -- forwarding ----------------------------------------------------------------

    async def _copy(self, link: TaskLink, way: OneWay) -> None:
        reports = self._reports
        active = reports.active
        wait_readable, wait_writable = self._wait_readable, self._wait_writable
        source, sink = way.source, way.sink
        while True:
            end = way.pump()
            if way.moved:
                active(link)
            if end is _READ:
                await wait_readable(source)
            elif end is _WRITE:
                await wait_writable(sink)
            else:
                reports.copy_ended(link, way, end)
                return

    def shutdown_write(self, link: TaskLink, side: Side) -> None:
        shut_write(self._reports, link, side)

    # -- closing -------------------------------------------------------------------

    def close(self, link: TaskLink, reset: bool) -> None:
        """Cancel the connection's tasks; its own task closes the sockets (see the module doc)."""
        if link.tasks.cancel_scope.cancel_called:
            return  # already closing: the first close decided RST or FIN
        if reset:
            set_reset(link.client, link.backend)
        link.tasks.cancel_scope.cancel()
