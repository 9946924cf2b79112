"""What every data path shares: the connection record, the two protocols, connect and accept.

The daemon is three layers (``docs/architecture.md`` draws them): a *data
path* owns the sockets, the *conductor* (:mod:`._conductor`) owns the core
and carries out its orders, and the *lifecycle* (:mod:`._daemon`) starts and
stops both. This module is the bottom of the data paths and knows nothing
above it:

* :class:`Link`, the daemon's record of one client connection (its sockets,
  its two directions, when its activity is next worth telling the core);
* :class:`DataPath`, what the conductor asks of a path, and
  :class:`Reports`, what a path tells the conductor: the only two ways the
  layers talk;
* the one copy of the socket work both paths do the same way: a
  non-blocking connect (:func:`dial`, walking an :class:`Attempt`'s
  addresses), a batch of accepts (:func:`accept_batch`), a half-close
  (:func:`send_eof`), a close that resets (:func:`set_reset`), a probe
  (:func:`probe`), reading a client's PROXY protocol header
  (:func:`read_header`, into a :class:`ProxyState`) and writing what a
  backend gets before the client's bytes (:func:`send_preface`);
* how many client connections the process's descriptors can carry at once
  (:func:`connection_budget`), which the conductor enforces.

Which local errors are whose fault is the core's to say
(:func:`loble.core.is_shortage`, :func:`loble.core.skips_one_client`); this
module only asks.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import ipaddress
import os
import resource
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import anyio
from anyio.abc import SocketStream

from loble.core import (
    PROXY_ERROR_REASONS,
    REPLY_LIMIT,
    Backend,
    ConnectBackend,
    ConnectionClosed,
    HeaderParser,
    ProbeBackend,
    ProbeCheck,
    ProbeFailure,
    ProxyHeader,
    ProxyProtocolError,
    Side,
    is_shortage,
    judge_reply,
    skips_one_client,
)

from ._copy import BufferPool, CopyMethod, OneWay, Pumped

__all__ = [
    "ACCEPT_BACKOFF",
    "ACCEPT_BATCH",
    "HEADER_ERROR_REASONS",
    "AddressBook",
    "Addresses",
    "Attempt",
    "ConnectionBudget",
    "DataPath",
    "Dialed",
    "HeaderRead",
    "Link",
    "ProxyState",
    "Reports",
    "accept_batch",
    "connection_budget",
    "dial",
    "dial_finished",
    "format_address",
    "hand_over",
    "listener_label",
    "prepare_listener",
    "probe",
    "read_header",
    "send_eof",
    "send_preface",
    "set_reset",
    "shut_write",
]

ACCEPT_BACKOFF = 0.1
"""Seconds to pause accepting after an accept error such as EMFILE, before trying again."""

ACCEPT_BATCH = 64
"""Connections accepted per wakeup of a listening socket at most."""

NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

NODELAY_INHERITED = sys.platform == "linux"
"""Whether an accepted socket keeps its listener's ``TCP_NODELAY``: Linux clones
the listener's TCP settings into each accepted socket, so the listener is set
once (:func:`prepare_listener`) instead of each client (one ``setsockopt`` less
per connection; ``tests/io/test_dataplane.py`` checks it holds)."""

_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
"""Made non-blocking by ``socket()`` itself where it can: one ``ioctl`` less per connect."""

_LINGER_ABORT = struct.pack("ii", 1, 0)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the record ----------------------------------------------------------------------


class Link:
    """The daemon's record of one client connection, from accept to close.

    A data path makes it (with a subclass that adds the path's own state),
    the conductor files it under the core's connection id, and the path
    fills in the backend side once a connect succeeds (:meth:`join`). The
    conductor drops it when the core says the connection closed.
    """

    __slots__ = (
        "backend",
        "backend_address",
        "client",
        "connection_id",
        "ended",
        "first_bytes",
        "listener",
        "peer_address",
        "proxy_protocol",
        "released",
        "to_backend",
        "to_client",
        "touch_due",
    )

    def __init__(
        self, client: socket.socket, peer_address: object = None, listener: str = ""
    ) -> None:
        self.connection_id = 0
        """The core's id, set when the conductor files the link."""
        self.client = client
        self.listener = listener
        """The address of the listening socket that accepted it."""
        self.peer_address = peer_address
        """The client's address as ``accept`` returned it (formatted only when asked),
        or as its PROXY protocol header gave it."""
        self.proxy_protocol: ProxyState | None = None
        """The PROXY protocol's part, for a connection that uses it (else None)."""
        self.ended: ConnectionClosed | None = None
        """How the core ended the connection, once it has (the conductor notes it)."""
        self.released = False
        """Whether the path has closed the sockets and stopped every copy."""
        self.backend: socket.socket | None = None
        self.backend_address = ""
        self.to_backend: OneWay | None = None
        self.to_client: OneWay | None = None
        self.touch_due = 0.0
        """When activity is next worth telling the core (``ProxyCore.touch_resolution``)."""
        self.first_bytes = 0
        """With ``[outlier] first_byte_timeout``: which sides' first bytes the core
        was told of (:data:`CLIENT_SPOKE`, :data:`BACKEND_SPOKE`); untouched otherwise."""

    def join(self, backend: socket.socket, address: str, pool: BufferPool) -> None:
        """The backend connected: build the two directions between the sockets."""
        self.backend = backend
        self.backend_address = address
        self.to_backend = OneWay(self.client, backend, pool)
        self.to_client = OneWay(backend, self.client, pool)

    def socket(self, side: Side) -> socket.socket | None:
        return self.client if side is Side.CLIENT else self.backend

    @property
    def peer(self) -> str:
        """``host:port`` of the client, or "" if unknown."""
        address = self.peer_address
        if isinstance(address, tuple) and len(address) >= 2:
            return format_address(str(address[0]), int(address[1]))
        return ""

    @property
    def bytes_to_backend(self) -> int:
        return self.to_backend.total if self.to_backend is not None else 0

    @property
    def bytes_to_client(self) -> int:
        return self.to_client.total if self.to_client is not None else 0


class ProxyState:
    """A connection's part of the PROXY protocol: the header its client sends, the
    bytes its backend gets before the client's.

    Made by the conductor for a client from ``[listener] accept_proxy_from``
    (with a :attr:`parser`, until the header is complete) or for a backend
    with ``send_proxy`` (with a :attr:`preface` only).
    """

    __slots__ = (
        "destination",
        "early",
        "header",
        "parser",
        "preface",
        "problem",
        "proxy",
        "reading",
        "reason",
        "timeout",
        "timer",
        "uncounted",
    )

    def __init__(self, parser: HeaderParser | None = None, timeout: float = 0.0) -> None:
        self.parser = parser
        """Reading the client's header, until it is complete (then None)."""
        self.timeout = timeout
        """Seconds the client has to send the whole header."""
        self.timer: object = None
        """The path's handle on that deadline, if it keeps one (the callbacks path)."""
        self.reading = False
        """Whether the path is watching the client for the header's bytes."""
        self.header: ProxyHeader | None = None
        self.early = b""
        """The client's bytes that came with the header, after it: the backend's first."""
        self.proxy: object = None
        """The address of the peer that sent the header (the proxy in front), when the
        header named another client (then ``Link.peer_address`` is the client's)."""
        self.destination: tuple[str, int] | None = None
        """The address the client connected to, as the header said."""
        self.preface = b""
        """What the backend gets first, once connected: the header Loble sends, then
        :attr:`early`."""
        self.uncounted = 0
        """Bytes at the start of :attr:`preface` that are Loble's own (the header)."""
        self.reason = ""
        """Why the header was refused: ``missing``, ``malformed``, ``timeout``, ``closed``."""
        self.problem = ""
        """What was wrong with it, one line."""


L = TypeVar("L", bound=Link, contravariant=True)


class Attempt:
    """One connect attempt: the core's order, and the addresses still to try."""

    __slots__ = ("backend", "error", "number", "remaining", "sock", "started")

    def __init__(self, action: ConnectBackend, started: float) -> None:
        self.number = action.attempt
        self.backend = action.backend
        self.started = started
        self.remaining: Addresses = []
        """``(family, sockaddr)`` pairs not tried yet, in order."""
        self.sock: socket.socket | None = None
        """The socket connected or connecting, once :func:`dial` made one."""
        self.error: OSError | None = None
        """Why :func:`dial` answered :attr:`Dialed.NO_RESOURCES`."""


Addresses = list[tuple[int, tuple[object, ...]]]
"""``(family, sockaddr)`` pairs to try in order for one backend."""


class AddressBook:
    """Where to connect for each backend, when it is known without a lookup.

    A backend given as an IP literal has one address, computed once; a host
    name is looked up for every attempt (:meth:`known` says None), so a DNS
    change reaches the next connection.
    """

    def __init__(self) -> None:
        self._known: dict[str, Addresses | None] = {}

    def known(self, backend: Backend) -> Addresses | None:
        address = backend.address
        try:
            return self._known[address]
        except KeyError:
            pass
        try:
            ip = ipaddress.ip_address(backend.host)
        except ValueError:
            found: Addresses | None = None
        else:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            found = [(int(family), (str(ip), backend.port))]
        self._known[address] = found
        return found


# -- the two protocols ------------------------------------------------------------------


class DataPath(Protocol[L]):
    """What the conductor asks of a data path: see :mod:`._callbacks` and :mod:`._tasks`.

    Every socket operation on a connection is the path's: it accepts, it
    connects (abandoning an earlier attempt of the same connection), it
    builds the two directions once connected and moves the bytes, it
    half-closes, and it closes, with RST where the core says ``reset``.
    Nothing it is asked blocks; what the network does comes back through
    :class:`Reports`.
    """

    async def serve(self, listeners: Sequence[socket.socket]) -> None:
        """Accept on ``listeners`` until cancelled (the caller closes them)."""

    def connect(self, link: L, action: ConnectBackend) -> None:
        """Start the attempt, abandoning any earlier one of ``link``."""

    def forward(self, link: L, attempt: Attempt) -> None:
        """The attempt's socket connected and the core agrees: build both directions
        (:meth:`Link.join`) and start moving bytes."""

    def shutdown_write(self, link: L, side: Side) -> None:
        """Send EOF to ``side``; the other direction keeps flowing."""

    def close(self, link: L, reset: bool) -> None:
        """Close the connection's sockets (RST if ``reset``, else FIN) and stop its work.

        Once the sockets are closed and no copy can move another byte, the
        path reports :meth:`Reports.released` (at once, or a moment later).
        May be called again for a link already closed: it then does nothing."""

    def pause_accepting(self) -> None:
        """Stop accepting on every listener (clients wait in the kernel's backlog).

        Takes effect at once: an accept batch under way stops after the
        client being accepted. Calling it while paused does nothing."""

    def resume_accepting(self) -> None:
        """Accept again on every listener still served. Does nothing unless paused."""

    def read_header(self, link: L) -> None:
        """Read the client's PROXY protocol header (into ``link.proxy_protocol``) and
        report :meth:`Reports.header_read` or :meth:`Reports.header_failed`, within
        the state's ``timeout``. Nothing is read past the stream's first bytes."""

    def dispose(self) -> None:
        """Every connection is closed and serving has ended: release the rest."""


class Reports(Protocol[L]):
    """What a data path tells the conductor, each the moment it happens."""

    def accepted(self, link: L) -> None:
        """A client connected: file it and carry out the core's first orders."""

    def accept_failed(self, error: OSError) -> None:
        """Accepting failed for a reason of ours (e.g. EMFILE); the path pauses."""

    def connected(self, link: L, attempt: Attempt) -> bool:
        """The attempt connected (its socket is :attr:`Attempt.sock`).

        If the core agrees, the conductor asks the path to :meth:`DataPath.forward`
        before it carries out anything else, and answers True; False if the
        core had given up on the attempt (the path closes the socket).
        """

    def connect_failed(self, link: L, attempt: Attempt) -> None:
        """Every address of the attempt refused or failed."""

    def out_of_resources(self, link: L, error: OSError) -> None:
        """No socket for the connect (e.g. EMFILE): ours, not the backend's fault."""

    def copy_ended(self, link: L, way: OneWay, end: Pumped) -> None:
        """One direction stopped: EOF, or an error on its source or its sink."""

    def socket_failed(self, link: L, side: Side) -> None:
        """An operation on ``side``'s socket failed outside a copy (e.g. a half-close)."""

    def active(self, link: L) -> None:
        """Bytes moved on ``link``."""

    def released(self, link: L) -> None:
        """The connection's sockets are closed and no copy runs: its figures are final."""

    def driver_failed(self, link: L) -> None:
        """A bug in the path, not a network event: end this connection, keep the rest."""

    def header_read(self, link: L) -> None:
        """The client's PROXY protocol header is complete (``link.proxy_protocol.header``)."""

    def header_failed(self, link: L, reason: str, problem: str) -> None:
        """The client's PROXY protocol header was refused, or did not come in time."""


# -- socket work both paths do the same way ---------------------------------------------


class Dialed(enum.Enum):
    """What :func:`dial` got for an attempt."""

    CONNECTED = "connected"
    """:attr:`Attempt.sock` is connected (on loopback, usually at once)."""
    IN_PROGRESS = "in_progress"
    """:attr:`Attempt.sock` is connecting: wait until it is writable, then ask
    :func:`dial_finished`."""
    REFUSED = "refused"
    """No address left: the attempt failed."""
    NO_RESOURCES = "no_resources"
    """No socket could be made (:attr:`Attempt.error`): this process's shortage."""


def dial(attempt: Attempt) -> Dialed:
    """Start a non-blocking connect to the attempt's next usable address.

    An address whose socket cannot be made or set up for a reason that is
    not a shortage (e.g. EAFNOSUPPORT: that family is off here) or whose
    connect fails at once is skipped for the next; a shortage stops the
    attempt, whoever's address it was.
    """
    remaining = attempt.remaining
    while remaining:
        family, address = remaining.pop(0)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
        except OSError as error:
            if is_shortage(error.errno):
                attempt.error = error
                return Dialed.NO_RESOURCES
            continue
        try:
            if not _NONBLOCK:
                sock.setblocking(False)
            sock.setsockopt(*NODELAY)
            code = sock.connect_ex(address)
        except OSError as error:
            sock.close()
            if is_shortage(error.errno):
                attempt.error = error
                return Dialed.NO_RESOURCES
            continue
        if code == 0 or (code == errno.EINPROGRESS and _established(sock)):
            attempt.sock = sock
            return Dialed.CONNECTED
        if code == errno.EINPROGRESS:
            attempt.sock = sock
            return Dialed.IN_PROGRESS
        sock.close()
        if is_shortage(code):
            attempt.error = OSError(code, "connect failed")
            return Dialed.NO_RESOURCES
    return Dialed.REFUSED


def hand_over(reports: Reports[L], link: L, attempt: Attempt) -> None:
    """The attempt's socket connected: tell the conductor, which has the path forward it.

    If the core had given up on the attempt, the socket is closed here; if
    the report fails (a bug), a socket the link does not own yet is too.
    """
    sock = attempt.sock
    assert sock is not None
    try:
        live = reports.connected(link, attempt)  # the path's forward() runs in there
    except BaseException:
        if link.backend is not sock:
            sock.close()
        raise
    if not live:
        attempt.sock = None
        sock.close()  # stale: the core had given up on this attempt


class HeaderRead(enum.Enum):
    """What :func:`read_header` got."""

    MORE = "more"
    """Not all of it yet: wait until the client is readable again."""
    DONE = "done"
    """Complete: ``header`` and ``early`` are set."""
    FAILED = "failed"
    """Refused, or the client closed: ``reason`` and ``problem`` say why."""


HEADER_READ_SIZE = 4096
"""Bytes read from a client at a time while its header is incomplete.

The stream's bytes that come with the header are held until the backend
is connected, so this also bounds what a connection holds then."""

CLOSED = "closed"
TIMEOUT = "timeout"
HEADER_ERROR_REASONS = (*PROXY_ERROR_REASONS, TIMEOUT, CLOSED)
"""Why a client's header can be refused: the metric's labels."""


def read_header(link: Link) -> HeaderRead:
    """Read what the client has sent of its PROXY protocol header, without blocking."""
    state = link.proxy_protocol
    assert state is not None and state.parser is not None
    parser = state.parser
    try:
        data = link.client.recv(HEADER_READ_SIZE)
    except BlockingIOError:
        return HeaderRead.MORE
    except OSError as error:
        state.reason, state.problem = CLOSED, f"the client's socket failed: {error.strerror}"
        return HeaderRead.FAILED
    if not data:
        state.reason, state.problem = CLOSED, "the client closed before its header was complete"
        return HeaderRead.FAILED
    try:
        header = parser.feed(data)
    except ProxyProtocolError as error:
        state.reason, state.problem = error.reason, str(error)
        return HeaderRead.FAILED
    if header is None:
        return HeaderRead.MORE
    state.header, state.early, state.parser = header, parser.rest, None
    return HeaderRead.DONE


def send_preface(link: Link) -> bool:
    """Write to the just connected backend what it gets before the client's bytes.

    Sent at once when the socket takes it all (a fresh connection's buffer is
    empty, so it nearly always does); what it does not take, or everything if
    the send fails, is held in ``link.to_backend`` (:meth:`OneWay.hold`), which
    writes it before reading the client: answers True then, and the path waits
    for the backend to be writable. Loble's own header is never counted as
    the client's bytes.
    """
    state, way, backend = link.proxy_protocol, link.to_backend, link.backend
    assert state is not None and way is not None and backend is not None
    preface, uncounted = state.preface, state.uncounted
    state.preface, state.early = b"", b""
    try:
        sent = backend.send(preface)
    except OSError:
        sent = 0  # EAGAIN, or broken: the copy finds out which
    way.total += max(0, sent - uncounted)
    if sent == len(preface):
        return False
    way.hold(preface[sent:], max(0, uncounted - sent))
    return True


def shut_write(reports: Reports[L], link: L, side: Side) -> None:
    """Half-close ``side``; a socket already broken is reported as a failure of that side."""
    sock = link.socket(side)
    assert sock is not None
    if not send_eof(sock):
        reports.socket_failed(link, side)


def dial_finished(sock: socket.socket) -> bool:
    """Whether a connect that was in progress succeeded (the socket turned writable)."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    except OSError:
        return False


def _established(sock: socket.socket) -> bool:
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


def listener_label(listener: socket.socket) -> str:
    """``host:port`` a listening socket is bound to, as metrics and logs name it."""
    address = listener.getsockname()
    return format_address(str(address[0]), int(address[1]))


def prepare_listener(listener: socket.socket) -> None:
    """Make a listening socket ready for :func:`accept_batch`: non-blocking,
    and with ``TCP_NODELAY`` for its clients to inherit where they do."""
    listener.setblocking(False)
    if NODELAY_INHERITED and listener.family in (socket.AF_INET, socket.AF_INET6):
        listener.setsockopt(*NODELAY)


def accept_batch(
    listener: socket.socket, on_client: Callable[[socket.socket, object], bool]
) -> OSError | None:
    """Accept up to :data:`ACCEPT_BATCH` clients, each handed to ``on_client`` with its address.

    ``on_client`` answers whether to go on: False (the path was just paused,
    e.g. at the connection limit) ends the batch there, leaving the rest in
    the backlog. Returns the error that should pause accepting (e.g.
    EMFILE), else None (the backlog is empty, the batch is done or was
    stopped). Errors that concern one client only skip it.
    """
    # socket.accept() wraps the new descriptor with the listener's family and
    # type read through properties that convert to enums: about ten Python
    # calls per client. The C accept and a socket built from known values
    # are two (and accept4 sets close-on-exec as before).
    accept: Callable[[], tuple[int, object]] = listener._accept  # type: ignore[attr-defined]
    family = listener.family
    nodelay = not NODELAY_INHERITED
    for _ in range(ACCEPT_BATCH):
        try:
            descriptor, address = accept()
        except BlockingIOError:
            return None
        except OSError as error:
            if skips_one_client(error.errno):
                continue
            return error
        client = socket.socket(family, socket.SOCK_STREAM, 0, descriptor)
        try:
            client.setblocking(False)
            if nodelay:
                client.setsockopt(*NODELAY)
        except OSError:
            client.close()  # gone before it could be set up (e.g. reset at once)
            continue
        if not on_client(client, address):
            return None
    return None


# -- how many connections the descriptors carry ----------------------------------------

SOCKETS_PER_CONNECTION = 2
"""The client's socket and the backend's (a retry closes one attempt's before the next)."""

PIPE_ENDS_PER_CONNECTION = 4
"""With ``splice`` (or ``auto``): a pipe, two ends, per direction while bytes are in it."""

HTTP_RESERVE = 8
"""Descriptors kept for each HTTP endpoint (metrics, admin): concurrent requests it
can still take while the proxy is full."""

SLACK = 8
"""Descriptors the process opens at its own pace: a host name's lookup (a file,
a UDP socket), a module imported late, a connect attempt closing as the next
one opens."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionBudget:
    """How many client connections the process's descriptors carry at once.

    ``connections = max(1, (descriptor_limit - reserved) // per_connection)``;
    see :func:`connection_budget` for each term.
    """

    descriptor_limit: int
    """``RLIMIT_NOFILE``'s soft limit when the daemon started."""
    reserved: int
    """Descriptors not for client connections: open at start, HTTP, probes, slack."""
    per_connection: int
    """Descriptors one client connection may hold at most."""
    connections: int
    """Client connections carried at once; at this many, accepting pauses."""


def connection_budget(
    copy: CopyMethod, *, endpoints: int, backends: int, in_use: int | None = None
) -> ConnectionBudget | None:
    """The connections this process can carry, from ``RLIMIT_NOFILE`` read now (None: no limit).

    The arithmetic, in the spirit of HAProxy deriving ``maxconn`` from the
    ulimit (``maxsock = 2 * maxconn + 2 * maxpipes + reserved``)::

        per_connection = 2 sockets (+ 4 pipe ends when the copy may splice)
        reserved       = in_use + 8 per HTTP endpoint + 1 per backend + 8
        connections    = max(1, (descriptor_limit - reserved) // per_connection)

    * ``per_connection``: the client socket and the backend socket; with
      ``splice`` or ``auto``, each direction also holds a pipe (two ends)
      while bytes are in it. Pipes the pool keeps are covered too: the pool
      makes a pipe only when it has none to hand out, so the pipes open never
      exceed two per connection open at the busiest moment, which is at most
      two per connection of this budget. (With ``recv_into``: 2.)
    * ``in_use``: descriptors open as serving starts, counted, not guessed
      (standard streams, the event loop's epoll set and wake-up pipes, the
      listening sockets, the metrics and admin sockets).
    * 8 per HTTP endpoint (:data:`HTTP_RESERVE`): a scrape or an admin
      request still gets a descriptor while the proxy is full.
    * 1 per backend: a health probe is one socket, one at a time per backend.
    * 8 (:data:`SLACK`): what the process opens at its own pace.

    At least one connection, so a limit too low for the reserve still serves.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    if in_use is None:
        in_use = _open_descriptors()
    per_connection = SOCKETS_PER_CONNECTION + (PIPE_ENDS_PER_CONNECTION if copy.needs_splice else 0)
    reserved = in_use + HTTP_RESERVE * endpoints + backends + SLACK
    return ConnectionBudget(
        descriptor_limit=soft,
        reserved=reserved,
        per_connection=per_connection,
        connections=max(1, (soft - reserved) // per_connection),
    )


def _open_descriptors() -> int:
    """How many descriptors this process has open (``/proc/self/fd`` or ``/dev/fd``)."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(directory)) - 1  # the listing's own descriptor
    return 16  # no way to count: a typical daemon's start-up set


def send_eof(sock: socket.socket) -> bool:
    """Half-close: ``shutdown(SHUT_WR)``; False if the socket is broken (its peer reset).

    The direction into this socket has ended with nothing held (a copy reads
    EOF only once its buffer is empty), so the EOF follows every byte.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return False
    return True


def set_reset(*sockets: socket.socket | None) -> None:
    """Make closing these sockets send RST instead of FIN (``SO_LINGER`` 0)."""
    for sock in sockets:
        if sock is not None and sock.fileno() >= 0:
            # Already reset by its peer: closing sends nothing either way.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)


async def probe(action: ProbeBackend) -> ProbeFailure | None:
    """A health probe as ``action`` orders it: None if it passed, else why not.

    Connect, write the check's ``send``, then read until ``judge_reply`` has a
    verdict, all within the action's timeout; never more than ``REPLY_LIMIT``
    bytes are read. A check that expects nothing passes once the write is done.
    """
    backend, check = action.backend, action.check
    connected = False
    with anyio.move_on_after(action.timeout):
        try:
            stream = await anyio.connect_tcp(backend.host, backend.port)
        except OSError:
            return ProbeFailure.REFUSED
        connected = True
        try:
            return await _exchange(stream, check)
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
    return ProbeFailure.REPLY_TIMEOUT if connected else ProbeFailure.CONNECT_TIMEOUT


async def _exchange(stream: SocketStream, check: ProbeCheck) -> ProbeFailure | None:
    """The payload part of a probe, on a connected stream."""
    try:
        if check.send:
            await stream.send(check.send)
        reply = b""
        verdict = judge_reply(check, reply)
        while verdict is None:
            reply += await stream.receive(REPLY_LIMIT - len(reply))
            verdict = judge_reply(check, reply)
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        return ProbeFailure.CLOSED  # closed or reset before a verdict
    return None if verdict else ProbeFailure.MISMATCH
