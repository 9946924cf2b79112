"""The callback data path (asyncio, uvloop): readiness callbacks that stay registered.

Every piece of per-connection work is a plain function the event loop calls
when a socket is ready; no task, future or coroutine is created per
connection, and none per wakeup:

* each listening socket has a reader; it accepts up to
  :data:`~._daemon.ACCEPT_BATCH` clients per wakeup;
* a backend connect is a non-blocking ``connect`` and a one-shot writer that
  fires when the handshake has finished;
* each direction of an established connection has a reader on its source
  that stays registered while bytes flow. Only backpressure changes the
  registration: when the sink cannot take everything, the direction swaps its
  reader for a writer on the sink until the held bytes are written, so a
  peer that stops reading stops its direction (the pipe or buffer is full and
  nothing more is read);
* each socket of an established connection is also watched for errors while
  nothing reads or writes it (after its peer's half-close it stays in the
  epoll set with an empty mask), so a late reset ends the connection at once.

On Linux the callbacks live in a :class:`~._loop.Readiness` registry:
registering one is a dict update and one ``epoll_ctl``, not asyncio's
several microseconds of Python. On the loop ``loble run`` makes
(:func:`~._loop.new_event_loop`) the registry shares the loop's own epoll
set, so a wakeup costs one ``epoll_wait`` and one function call; on other
loops it is a private epoll set polled as one reader of the loop.

Compare with awaiting ``wait_readable`` in a loop (the ``tasks`` path), which
on asyncio adds a reader, creates a future and removes the reader on every
single wait: ``docs/performance.md`` has the measured difference.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from loble.core import Backend, ConnectBackend

from ._copy import OneWay, Pumped
from ._daemon import ACCEPT_BACKOFF, ACCEPT_BATCH, SHORTAGES, established
from ._loop import readiness_for

if TYPE_CHECKING:
    from ._daemon import Addresses, Daemon, _Connection

__all__ = ["CallbackPath"]

_READ = Pumped.READ
_WRITE = Pumped.WRITE
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
"""Made non-blocking by ``socket()`` itself where it can: one ``ioctl`` less per connect."""
_ACCEPT_SKIP = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
"""accept() errors that concern one client only: skip it, accept the next."""


class _Attempt:
    """One connect attempt in progress: which addresses remain, and the socket."""

    __slots__ = ("backend", "lookup", "number", "remaining", "sock", "started")

    def __init__(self, number: int, backend: Backend, started: float) -> None:
        self.number = number
        self.backend = backend
        self.started = started
        self.remaining: Addresses = []
        self.sock: socket.socket | None = None
        self.lookup: asyncio.Future[Any] | None = None


class CallbackPath:
    """The data path of :mod:`._daemon` built on readiness callbacks.

    On Linux they live in a :class:`~._loop.Readiness` registry (the loop's
    own epoll set, or a private one); elsewhere they are the loop's own
    ``add_reader``/``add_writer``.
    """

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        loop = self._loop = asyncio.get_running_loop()
        self._paused: dict[socket.socket, asyncio.TimerHandle] = {}
        """Listeners pausing after an accept error, and the handle that resumes each."""
        self._epoll, self._private = readiness_for(loop)
        readiness: Any = self._epoll or loop
        self._add_reader: Callable[..., None] = readiness.add_reader
        self._add_writer: Callable[..., None] = readiness.add_writer
        self._remove_reader: Callable[[int], object] = readiness.remove_reader
        self._remove_writer: Callable[[int], object] = readiness.remove_writer

    def dispose(self) -> None:
        if self._private is not None:
            self._private.close()

    # -- accepting -----------------------------------------------------------------

    async def serve(self, listeners: Sequence[socket.socket]) -> None:
        for listener in listeners:
            self._add_reader(listener.fileno(), self._on_acceptable, listener)
        try:
            await anyio.sleep_forever()
        finally:
            # Every pending resume, not just the last: one left behind would
            # register a closed listener's descriptor number, which a new
            # socket may already have taken.
            for handle in self._paused.values():
                handle.cancel()
            self._paused.clear()
            for listener in listeners:
                self._remove_reader(listener.fileno())

    def _on_acceptable(self, listener: socket.socket) -> None:
        accepted = self._daemon.accepted
        for _ in range(ACCEPT_BATCH):
            try:
                client, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in _ACCEPT_SKIP:
                    continue
                # e.g. out of file descriptors: pause, let some connections close.
                self._daemon.accept_failed(error)
                self._pause(listener)
                return
            try:
                client.setblocking(False)
                client.setsockopt(*_NODELAY)
                accepted(client)
            except Exception:  # a bug: this client only, the batch goes on
                self._daemon.logger.exception("accepting a connection failed")
                client.close()

    def _pause(self, listener: socket.socket) -> None:
        self._remove_reader(listener.fileno())

        def resume() -> None:
            del self._paused[listener]
            self._add_reader(listener.fileno(), self._on_acceptable, listener)

        self._paused[listener] = self._loop.call_later(ACCEPT_BACKOFF, resume)

    # -- connecting ----------------------------------------------------------------

    def connect(self, connection: _Connection, action: ConnectBackend) -> None:
        self._abandon(connection)
        daemon = self._daemon
        attempt = _Attempt(action.attempt, action.backend, daemon.now())
        connection.attempt = attempt
        addresses = daemon.addresses(action.backend)
        if addresses is not None:
            attempt.remaining = list(addresses)
            self._try_next(connection, attempt)
            return
        # A host name: look it up (in the loop's thread pool) for this attempt.
        backend = action.backend
        lookup = asyncio.ensure_future(
            self._loop.getaddrinfo(backend.host, backend.port, type=socket.SOCK_STREAM)
        )
        attempt.lookup = lookup
        lookup.add_done_callback(lambda done: self._looked_up(connection, attempt, done))

    def _looked_up(
        self, connection: _Connection, attempt: _Attempt, lookup: asyncio.Future[Any]
    ) -> None:
        if connection.attempt is not attempt or lookup.cancelled():
            return
        attempt.lookup = None
        if lookup.exception() is None:
            attempt.remaining = [(info[0], info[4]) for info in lookup.result()]
        self._try_next(connection, attempt)

    def _try_next(self, connection: _Connection, attempt: _Attempt) -> None:
        """Connect to the next address of the attempt; report failure when none is left."""
        while attempt.remaining:
            family, address = attempt.remaining.pop(0)
            try:
                sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
            except OSError as failure:
                if failure.errno not in SHORTAGES:
                    continue  # e.g. EAFNOSUPPORT: this address family is off here
                connection.attempt = None  # EMFILE and the like: ours, not the backend's
                self._daemon.out_of_resources(connection, failure)
                return
            try:
                if not _NONBLOCK:
                    sock.setblocking(False)
                sock.setsockopt(*_NODELAY)
                error = sock.connect_ex(address)
            except OSError as failure:
                sock.close()
                connection.attempt = None
                self._daemon.out_of_resources(connection, failure)
                return
            if error == 0 or (error == errno.EINPROGRESS and established(sock)):
                self._connected(connection, attempt, sock)
                return
            if error == errno.EINPROGRESS:
                attempt.sock = sock
                self._add_writer(sock.fileno(), self._on_connect_done, connection, attempt)
                return
            sock.close()
        connection.attempt = None
        self._daemon.connect_failed(connection, attempt.number)

    def _on_connect_done(self, connection: _Connection, attempt: _Attempt) -> None:
        sock = attempt.sock
        assert sock is not None
        self._remove_writer(sock.fileno())
        attempt.sock = None
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                sock.close()
                self._try_next(connection, attempt)
                return
            self._connected(connection, attempt, sock)
        except Exception:
            if connection.backend is not sock:
                sock.close()
            self._failed(connection)

    def _connected(self, connection: _Connection, attempt: _Attempt, sock: socket.socket) -> None:
        connection.attempt = None
        self._daemon.connected(connection, attempt.number, attempt.backend, sock, attempt.started)

    def _abandon(self, connection: _Connection) -> None:
        attempt: _Attempt | None = connection.attempt
        if attempt is None:
            return
        connection.attempt = None
        if attempt.lookup is not None:
            attempt.lookup.cancel()
        if attempt.sock is not None:
            self._remove_writer(attempt.sock.fileno())
            attempt.sock.close()
            attempt.sock = None

    # -- forwarding ----------------------------------------------------------------

    def forward(self, connection: _Connection) -> None:
        add_reader = self._add_reader
        epoll = self._epoll
        for way in (connection.to_backend, connection.to_client):
            assert way is not None
            add_reader(way.source_fd, self._on_readable, connection, way)
            way.waiting = _READ
            if epoll is not None:  # after a half-close, nothing else would see a reset
                epoll.watch(way.source_fd, self._on_hangup, connection, way)

    def _on_hangup(self, connection: _Connection, way: OneWay) -> None:
        # Nothing reads or writes this socket (its peer half-closed) and it broke.
        try:
            self._daemon.copy_ended(connection, way, Pumped.SOURCE_ERROR)
        except Exception:
            self._failed(connection)

    def _on_readable(self, connection: _Connection, way: OneWay) -> None:
        try:
            end = way.pump()
            if way.moved:
                self._daemon.active(connection)
            if end is _READ:
                return  # the reader stays registered: the common case costs nothing more
            if end is _WRITE:
                self._remove_reader(way.source_fd)
                self._add_writer(way.sink_fd, self._on_writable, connection, way)
                way.waiting = _WRITE
                return
            # The copy ended: report it while still registered (see close).
            self._daemon.copy_ended(connection, way, end)
            if way.waiting is _READ:
                self._remove_reader(way.source_fd)
                way.waiting = None
        except Exception:
            self._failed(connection)

    def _on_writable(self, connection: _Connection, way: OneWay) -> None:
        try:
            end = way.pump()
            if way.moved:
                self._daemon.active(connection)
            if end is _WRITE:
                return
            if end is _READ:
                self._remove_writer(way.sink_fd)
                self._add_reader(way.source_fd, self._on_readable, connection, way)
                way.waiting = _READ
                return
            # The copy ended: report it while still registered (see close).
            self._daemon.copy_ended(connection, way, end)
            if way.waiting is _WRITE:
                self._remove_writer(way.sink_fd)
                way.waiting = None
        except Exception:
            self._failed(connection)

    def _failed(self, connection: _Connection) -> None:
        # A bug, so what is registered is unknown: unregister everything
        # before the sockets close, or the selector would keep stale entries.
        for sock in (connection.client, connection.backend):
            if sock is not None and sock.fileno() >= 0:
                self._remove_reader(sock.fileno())
                self._remove_writer(sock.fileno())
                if self._epoll is not None:
                    self._epoll.unwatch(sock.fileno())
        for way in (connection.to_backend, connection.to_client):
            if way is not None:
                way.waiting = None
        self._daemon.driver_failed(connection)

    def _forget_sockets(self, connection: _Connection) -> None:
        if self._epoll is not None:
            for sock in (connection.client, connection.backend):
                if sock is not None and sock.fileno() >= 0:
                    self._epoll.forget(sock.fileno())

    # -- closing -------------------------------------------------------------------

    def close(self, connection: _Connection) -> None:
        """Close both sockets; what they had registered goes with them.

        In an epoll set, closing a socket takes it out of the set when no
        other descriptor refers to the same socket, which holds here (Loble
        never duplicates one, and workers are exec'd with close-on-exec
        descriptors): forgetting its callbacks is enough, no ``epoll_ctl``
        is needed. (A duplicate left open, e.g. by an in-process fork without
        exec, would keep a stale entry reporting under a reused number.) That is also why
        a direction whose copy ended reports it *before* unregistering: when
        it was the connection's last, the core closes the connection at once
        and the unregistering would be wasted. The loop's own selector (no
        epoll) keeps a key per descriptor: there, what is registered is
        unregistered first.
        """
        self._abandon(connection)
        unregister = self._epoll is None
        for way in (connection.to_backend, connection.to_client):
            if way is None:
                continue
            if unregister and way.waiting is _READ:
                self._remove_reader(way.source_fd)
            elif unregister and way.waiting is _WRITE:
                self._remove_writer(way.sink_fd)
            way.waiting = None
        self._forget_sockets(connection)
        connection.client.close()
        if connection.backend is not None:
            connection.backend.close()
        self._daemon.forget(connection)
