"""The callback data path (asyncio, uvloop): readiness callbacks that stay registered.

Every piece of per-connection work is a plain function the event loop calls
when a socket is ready; no task, future or coroutine is created per
connection, and none per wakeup:

* each listening socket has a reader; it accepts up to
  :data:`~._datapath.ACCEPT_BATCH` clients per wakeup. Pausing (at the
  connection limit) removes the readers, resuming adds them back;
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
  epoll set with an empty mask), so a late reset ends the connection at once;
* a client that must send a PROXY protocol header first has a reader of its
  own and a loop timer (its deadline) until the header is complete; bytes a
  backend must get first (a PROXY header) are written as the connect is
  agreed, and what the socket does not take at once has the direction wait
  for the backend to be writable before it reads the client.

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
import socket
from collections.abc import Callable, Sequence
from typing import Any

import anyio

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
from ._loop import readiness_for

__all__ = ["CallbackLink", "CallbackPath"]

_READ = Pumped.READ
_WRITE = Pumped.WRITE
_CONNECTED, _IN_PROGRESS = Dialed.CONNECTED, Dialed.IN_PROGRESS
_REFUSED = Dialed.REFUSED
_MORE, _DONE = HeaderRead.MORE, HeaderRead.DONE


class CallbackAttempt(Attempt):
    """An attempt of this path: also the host-name lookup it may be waiting for."""

    __slots__ = ("lookup",)

    def __init__(self, action: ConnectBackend, started: float) -> None:
        super().__init__(action, started)
        self.lookup: asyncio.Future[Any] | None = None


class CallbackLink(Link):
    """A :class:`~._datapath.Link` of this path: also its connect attempt in progress."""

    __slots__ = ("attempt",)

    def __init__(self, client: socket.socket, address: object, listener: str) -> None:
        super().__init__(client, address, listener)
        self.attempt: CallbackAttempt | None = None


class CallbackPath:
    """The data path built on readiness callbacks (a :class:`~._datapath.DataPath`).

    On Linux they live in a :class:`~._loop.Readiness` registry (the loop's
    own epoll set, or a private one); elsewhere they are the loop's own
    ``add_reader``/``add_writer``.
    """

    def __init__(
        self, reports: Reports[CallbackLink], pool: BufferPool, now: Callable[[], float]
    ) -> None:
        self._reports = reports
        self._pool = pool
        self._now = now
        self._addresses = AddressBook()
        loop = self._loop = asyncio.get_running_loop()
        self._paused: dict[socket.socket, asyncio.TimerHandle] = {}
        """Listeners pausing after an accept error, and the handle that resumes each."""
        self._serving: dict[socket.socket, str] = {}
        """Listeners being served, and their labels."""
        self._accepting = True
        """False while the conductor has paused accepting (:meth:`pause_accepting`)."""
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
            label = self._serving[listener] = listener_label(listener)
            if self._accepting:
                self._add_reader(listener.fileno(), self._on_acceptable, listener, label)
        try:
            await anyio.sleep_forever()
        finally:
            # Every pending resume of these listeners: one left behind would
            # register a closed listener's descriptor number, which a new
            # socket may already have taken.
            for listener in listeners:
                handle = self._paused.pop(listener, None)
                if handle is not None:
                    handle.cancel()
                del self._serving[listener]
                self._remove_reader(listener.fileno())

    def pause_accepting(self) -> None:
        if not self._accepting:
            return
        self._accepting = False
        for listener in self._serving:
            if listener not in self._paused:  # one backing off has no reader
                self._remove_reader(listener.fileno())

    def resume_accepting(self) -> None:
        if self._accepting:
            return
        self._accepting = True
        for listener, label in self._serving.items():
            if listener not in self._paused:  # one backing off adds its reader when due
                self._add_reader(listener.fileno(), self._on_acceptable, listener, label)

    def _on_acceptable(self, listener: socket.socket, label: str) -> None:
        def on_client(client: socket.socket, address: object) -> bool:
            self._on_client(client, address, label)
            return self._accepting  # paused by that client: the rest wait in the backlog

        error = accept_batch(listener, on_client)
        if error is not None:
            # e.g. out of file descriptors: pause, let some connections close.
            self._reports.accept_failed(error)
            self._pause(listener, label)

    def _on_client(self, client: socket.socket, address: object, label: str) -> None:
        link = CallbackLink(client, address, label)
        try:
            self._reports.accepted(link)
        except Exception:  # a bug: this client only, the batch goes on
            self._failed(link)

    def _pause(self, listener: socket.socket, label: str) -> None:
        """Back off after an accept error: no reader for :data:`ACCEPT_BACKOFF` seconds."""
        if self._accepting:  # else pause_accepting took the reader already
            self._remove_reader(listener.fileno())

        def resume() -> None:
            del self._paused[listener]
            if self._accepting:
                self._add_reader(listener.fileno(), self._on_acceptable, listener, label)

        self._paused[listener] = self._loop.call_later(ACCEPT_BACKOFF, resume)

    # -- connecting ----------------------------------------------------------------

    def connect(self, link: CallbackLink, action: ConnectBackend) -> None:
        self._abandon(link)
        attempt = link.attempt = CallbackAttempt(action, self._now())
        addresses = self._addresses.known(action.backend)
        if addresses is not None:
            attempt.remaining = list(addresses)
            self._dial(link, attempt)
            return
        # A host name: look it up (in the loop's thread pool) for this attempt.
        backend = action.backend
        lookup = asyncio.ensure_future(
            self._loop.getaddrinfo(backend.host, backend.port, type=socket.SOCK_STREAM)
        )
        attempt.lookup = lookup
        lookup.add_done_callback(lambda done: self._looked_up(link, attempt, done))

    def _looked_up(
        self, link: CallbackLink, attempt: CallbackAttempt, lookup: asyncio.Future[Any]
    ) -> None:
        if link.attempt is not attempt or lookup.cancelled():
            return
        attempt.lookup = None
        if lookup.exception() is None:
            attempt.remaining = [(info[0], info[4]) for info in lookup.result()]
        try:
            self._dial(link, attempt)
        except Exception:
            self._failed(link)

    def _dial(self, link: CallbackLink, attempt: CallbackAttempt) -> None:
        """Connect to the attempt's next address; report how it ended unless it is under way."""
        dialed = dial(attempt)
        if dialed is _IN_PROGRESS:
            sock = attempt.sock
            assert sock is not None
            try:
                self._add_writer(sock.fileno(), self._on_connect_done, link, attempt)
            except OSError as error:  # epoll_ctl: ENOMEM, ENOSPC (max_user_watches)
                attempt.sock = None
                sock.close()
                link.attempt = None
                self._reports.out_of_resources(link, error)
            return
        link.attempt = None
        if dialed is _CONNECTED:
            hand_over(self._reports, link, attempt)
        elif dialed is _REFUSED:
            self._reports.connect_failed(link, attempt)
        else:
            assert attempt.error is not None
            self._reports.out_of_resources(link, attempt.error)

    def _on_connect_done(self, link: CallbackLink, attempt: CallbackAttempt) -> None:
        sock = attempt.sock
        assert sock is not None
        self._remove_writer(sock.fileno())
        try:
            if dial_finished(sock):
                link.attempt = None
                hand_over(self._reports, link, attempt)
                return
            attempt.sock = None
            sock.close()
            self._dial(link, attempt)
        except Exception:
            self._failed(link)

    def forward(self, link: CallbackLink, attempt: Attempt) -> None:
        sock = attempt.sock
        assert sock is not None
        attempt.sock = None
        link.join(sock, attempt.backend.address, self._pool)
        state = link.proxy_protocol
        # Bytes the backend gets first and could not take at once: held, and
        # that direction waits to write them before it reads the client.
        held = None
        if state is not None and state.preface and send_preface(link):
            held = link.to_backend
        add_reader = self._add_reader
        epoll = self._epoll
        try:
            for way in (link.to_backend, link.to_client):
                assert way is not None
                if way is held:
                    self._add_writer(way.sink_fd, self._on_writable, link, way)
                    way.waiting = _WRITE
                else:
                    add_reader(way.source_fd, self._on_readable, link, way)
                    way.waiting = _READ
                if epoll is not None:  # after a half-close, nothing else would see a reset
                    epoll.watch(way.source_fd, self._on_hangup, link, way)
        except OSError as error:  # epoll_ctl: ENOMEM, ENOSPC (max_user_watches)
            self._reports.out_of_resources(link, error)

    def _abandon(self, link: CallbackLink) -> None:
        attempt = link.attempt
        if attempt is None:
            return
        link.attempt = None
        if attempt.lookup is not None:
            attempt.lookup.cancel()
        if attempt.sock is not None:
            self._remove_writer(attempt.sock.fileno())
            attempt.sock.close()
            attempt.sock = None

    # -- a client's PROXY protocol header ------------------------------------------

    def read_header(self, link: CallbackLink) -> None:
        state = link.proxy_protocol
        assert state is not None
        self._add_reader(link.client.fileno(), self._on_header, link)
        state.reading = True
        state.timer = self._loop.call_later(state.timeout, self._header_late, link)

    def _on_header(self, link: CallbackLink) -> None:
        try:
            read = read_header(link)
            if read is _MORE:
                return
            self._stop_header(link)
            state = link.proxy_protocol
            assert state is not None
            if read is _DONE:
                self._reports.header_read(link)
            else:
                self._reports.header_failed(link, state.reason, state.problem)
        except Exception:
            self._failed(link)

    def _header_late(self, link: CallbackLink) -> None:
        state = link.proxy_protocol
        assert state is not None
        state.timer = None
        try:
            self._stop_header(link)
            self._reports.header_failed(
                link, TIMEOUT, f"no complete header within {state.timeout} s ([timeouts] idle)"
            )
        except Exception:
            self._failed(link)

    def _stop_header(self, link: CallbackLink) -> None:
        """No more reading of the header: its reader and its deadline go."""
        state = link.proxy_protocol
        assert state is not None
        if state.reading:
            state.reading = False
            self._remove_reader(link.client.fileno())
        timer = state.timer
        if timer is not None:
            state.timer = None
            assert isinstance(timer, asyncio.TimerHandle)
            timer.cancel()

    # -- forwarding ----------------------------------------------------------------

    def _on_hangup(self, link: CallbackLink, way: OneWay) -> None:
        # Nothing reads or writes this socket (its peer half-closed) and it broke.
        try:
            self._reports.copy_ended(link, way, Pumped.SOURCE_ERROR)
        except Exception:
            self._failed(link)

    def _on_readable(self, link: CallbackLink, way: OneWay) -> None:
        try:
            end = way.pump()
            if way.moved:
                self._reports.active(link)
            if end is _READ:
                return  # the reader stays registered: the common case costs nothing more
            if end is _WRITE:
                self._remove_reader(way.source_fd)
                self._add_writer(way.sink_fd, self._on_writable, link, way)
                way.waiting = _WRITE
                return
            # The copy ended: report it while still registered (see close).
            self._reports.copy_ended(link, way, end)
            if way.waiting is _READ:
                self._remove_reader(way.source_fd)
                way.waiting = None
        except Exception:
            self._failed(link)

    def _on_writable(self, link: CallbackLink, way: OneWay) -> None:
        try:
            end = way.pump()
            if way.moved:
                self._reports.active(link)
            if end is _WRITE:
                return
            if end is _READ:
                self._remove_writer(way.sink_fd)
                self._add_reader(way.source_fd, self._on_readable, link, way)
                way.waiting = _READ
                return
            # The copy ended: report it while still registered (see close).
            self._reports.copy_ended(link, way, end)
            if way.waiting is _WRITE:
                self._remove_writer(way.sink_fd)
                way.waiting = None
        except Exception:
            self._failed(link)

    def shutdown_write(self, link: CallbackLink, side: Side) -> None:
        epoll = self._epoll
        if epoll is not None and epoll.defers:
            # After the next poll's batch: if that batch brings the peer's
            # own close (wrk, an HTTP/1.0 client: they close once the answer
            # is in), the connection closes whole and no shutdown is needed.
            epoll.defer(self._shut_later, link, side)
        else:
            shut_write(self._reports, link, side)

    def _shut_later(self, link: CallbackLink, side: Side) -> None:
        if link.released:
            return  # closed meanwhile: its close ended the stream (FIN, or RST if meant)
        try:
            shut_write(self._reports, link, side)
        except Exception:
            self._failed(link)

    def _failed(self, link: CallbackLink) -> None:
        # A bug, so what is registered is unknown: unregister everything
        # before the sockets close, or the selector would keep stale entries.
        if link.proxy_protocol is not None and link.client.fileno() >= 0:
            self._stop_header(link)
        for sock in (link.client, link.backend):
            if sock is not None and sock.fileno() >= 0:
                self._remove_reader(sock.fileno())
                self._remove_writer(sock.fileno())
                if self._epoll is not None:
                    self._epoll.unwatch(sock.fileno())
        for way in (link.to_backend, link.to_client):
            if way is not None:
                way.waiting = None
        self._reports.driver_failed(link)

    # -- closing -------------------------------------------------------------------

    def close(self, link: CallbackLink, reset: bool) -> None:
        """Close both sockets; what they had registered goes with them.

        In an epoll set, closing a socket takes it out of the set when no
        other descriptor refers to the same socket, which holds here (Loble
        never duplicates one, and workers are exec'd with close-on-exec
        descriptors): forgetting its callbacks is enough, no ``epoll_ctl``
        is needed. (A duplicate left open, e.g. by an in-process fork without
        exec, would keep a stale entry reporting under a reused number.) That
        is also why a direction whose copy ended reports it *before*
        unregistering: when it was the connection's last, the core closes the
        connection at once and the unregistering would be wasted. The loop's
        own selector (no epoll) keeps a key per descriptor: there, what is
        registered is unregistered first. Closing twice does nothing more:
        a closed socket's descriptor is -1 and its directions hold nothing.
        """
        self._abandon(link)
        state = link.proxy_protocol
        if state is not None and link.client.fileno() >= 0:
            self._stop_header(link)  # still reading its header, or not: at most a check
        if reset:
            set_reset(link.client, link.backend)
        unregister = self._epoll is None
        for way in (link.to_backend, link.to_client):
            if way is None:
                continue
            if unregister and way.waiting is _READ:
                self._remove_reader(way.source_fd)
            elif unregister and way.waiting is _WRITE:
                self._remove_writer(way.sink_fd)
            way.waiting = None
            way.release()
        epoll = self._epoll
        for sock in (link.client, link.backend):
            if sock is not None:
                if epoll is not None and sock.fileno() >= 0:
                    epoll.forget(sock.fileno())
                sock.close()
        self._reports.released(link)
