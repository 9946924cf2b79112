"""The task data path (any anyio backend; the default on trio): raw sockets and waits.

Per client connection one task holds a task group; in it run the connect
attempt and, once connected, one task per direction. The client is reported
to the conductor the moment it is accepted, before its task runs, so the
count of open connections is right within an accept batch and the
conductor's pause at the connection limit stops that batch at once; orders
given before the task runs (the first connect, a close) wait for it. A direction loops:
move what it can (:meth:`~._copy.OneWay.pump`), then wait until its source
is readable or, while bytes are held, until its sink is writable. Closing a
connection cancels its group; the connection's task then closes both
sockets, once no task waits on them any more, so no socket or task outlives
its connection and no wait is left on a descriptor number that a new socket
may take. A client that must send a PROXY protocol header first has it read
by its connection's task before anything else, within the header's timeout;
bytes a backend gets first are written as the connect is agreed, and what
the socket does not take at once is the first thing its direction writes.

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
    TIMEOUT,
    AddressBook,
    Attempt,
    Dialed,
    HeaderRead,
    Link,
    ProxyState,
    Reports,
    accept_batch,
    dial,
    dial_finished,
    hand_over,
    listener_label,
    read_header,
    send_preface,
    set_reset,
    shut_write,
)

__all__ = ["TaskLink", "TaskPath"]

_READ = Pumped.READ
_WRITE = Pumped.WRITE

Wait = Callable[[socket.socket], Awaitable[None]]


class TaskLink(Link):
    """A :class:`~._datapath.Link` of this path: its task group and connect attempt."""

    __slots__ = ("attempt", "scope", "tasks", "waiting_connect")

    def __init__(self, client: socket.socket, address: object, listener: str) -> None:
        super().__init__(client, address, listener)
        self.scope = anyio.CancelScope()
        """The connection's own scope: cancelling it (a close) ends all its tasks,
        or, before its task has started, has the task end at once."""
        self.tasks: TaskGroup | None = None
        """The connection's task group, once its task runs."""
        self.waiting_connect: ConnectBackend | None = None
        """A connect ordered before the task group existed."""
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
        self._accepting = True
        """False while the conductor has paused accepting (:meth:`pause_accepting`)."""
        self._resumed: anyio.Event | None = None
        """Set when accepting resumes; made by the first accept loop that waits for it."""
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

    def pause_accepting(self) -> None:
        self._accepting = False

    def resume_accepting(self) -> None:
        self._accepting = True
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.set()

    async def _accept_loop(self, listener: socket.socket) -> None:
        wait_readable = self._wait_readable
        start_soon = self._tasks.start_soon
        serve_client = self._serve_client
        reports = self._reports

        label = listener_label(listener)

        def on_client(client: socket.socket, address: object) -> bool:
            link = TaskLink(client, address, label)
            try:
                reports.accepted(link)  # counted now, not when its task starts
            except Exception:  # a bug: this client only, the batch goes on
                reports.driver_failed(link)
            start_soon(serve_client, link)  # closes the sockets, whatever happened
            return self._accepting  # paused by that client: the rest wait in the backlog

        while True:
            while not self._accepting:
                resumed = self._resumed
                if resumed is None:
                    resumed = self._resumed = anyio.Event()
                await resumed.wait()
            await wait_readable(listener)
            if not self._accepting:
                continue  # paused while waiting: leave the clients in the backlog
            error = accept_batch(listener, on_client)
            if error is not None:
                reports.accept_failed(error)
                await anyio.sleep(ACCEPT_BACKOFF)

    async def _serve_client(self, link: TaskLink) -> None:
        try:
            with link.scope:  # a close before this task ran has cancelled it already
                async with anyio.create_task_group() as tasks:
                    link.tasks = tasks
                    state = link.proxy_protocol
                    if state is not None and state.parser is not None:
                        await self._read_header(link, state)
                    action, link.waiting_connect = link.waiting_connect, None
                    if action is not None:
                        self.connect(link, action)
                    # Only the core ends a connection: its CloseConnection cancels the scope.
                    await anyio.sleep_forever()
        except Exception:
            self._reports.driver_failed(link)
        finally:
            # No task of this connection waits on its sockets any more.
            for way in (link.to_backend, link.to_client):
                if way is not None:
                    way.release()
            link.client.close()
            if link.backend is not None:
                link.backend.close()
            self._reports.released(link)

    # -- a client's PROXY protocol header ------------------------------------------

    def read_header(self, link: TaskLink) -> None:
        pass  # the connection's task reads it first, once it runs (_serve_client)

    async def _read_header(self, link: TaskLink, state: ProxyState) -> None:
        reports = self._reports
        wait_readable = self._wait_readable
        with anyio.move_on_after(state.timeout) as deadline:
            while True:
                read = read_header(link)
                if read is HeaderRead.MORE:
                    await wait_readable(link.client)
                    continue
                if read is HeaderRead.DONE:
                    reports.header_read(link)
                else:
                    reports.header_failed(link, state.reason, state.problem)
                return
        if deadline.cancelled_caught:
            reports.header_failed(
                link, TIMEOUT, f"no complete header within {state.timeout} s ([timeouts] idle)"
            )

    # -- connecting ----------------------------------------------------------------

    def connect(self, link: TaskLink, action: ConnectBackend) -> None:
        tasks = link.tasks
        if tasks is None:
            link.waiting_connect = action  # the first connect, ordered at accept
            return
        previous = link.attempt
        if previous is not None:
            previous.cancel()  # the core gave up on the previous attempt
        scope = link.attempt = anyio.CancelScope()
        tasks.start_soon(self._connect, link, Attempt(action, self._now()), scope)

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
        state = link.proxy_protocol
        if state is not None and state.preface:
            send_preface(link)  # what it holds back, the direction's first pump writes
        tasks = link.tasks
        assert tasks is not None  # a connect ran in it
        for way in (link.to_backend, link.to_client):
            assert way is not None
            tasks.start_soon(self._copy, link, way)

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
        if link.scope.cancel_called:
            return  # already closing: the first close decided RST or FIN
        if reset:
            set_reset(link.client, link.backend)
        link.waiting_connect = None
        link.scope.cancel()
