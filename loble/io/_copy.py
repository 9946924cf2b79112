"""Moving bytes one way between two sockets: the only code that touches payload.

A :class:`OneWay` moves what it can from a source socket to a sink socket
*without blocking*, and says what it is waiting for next: the source to
become readable, the sink to become writable, or nothing because the copy
ended (EOF, or an error on one side). Whoever drives it (readiness callbacks
on asyncio, tasks waiting with ``wait_readable`` on trio) only waits and
reports; this module knows nothing of the core or of event loops.

Three ways to move bytes, chosen per daemon (:class:`CopyMethod`):

* ``splice``: ``os.splice`` moves bytes socket -> pipe -> socket inside the
  kernel; Python never sees the payload. The pipe is the buffer.
* ``recv_into``: the portable fallback. ``recv_into`` a reusable buffer, then
  ``send`` from it; no allocation per read.
* ``auto`` (the default on Linux): each direction starts with ``recv_into``
  and switches to ``splice`` for the rest of the connection at its first
  read that nearly fills the buffer (:data:`_FULL_READ`), as HAProxy's
  ``splice-auto`` does. Small messages (requests, responses of a few KiB)
  cost less through a buffer: ``recv`` + ``send`` do less kernel work than
  two ``splice`` calls and a pipe, and no pipe is taken; bulk transfers get
  the kernel-side copy. The switch happens only with the buffer empty, so
  no byte is ever in both the buffer and the pipe.

Both hold at most one bounded buffer per direction (a pipe, or a
:data:`CHUNK_SIZE` buffer) and read again only once it has been written out,
so a peer that stops reading stops the copy, never Loble's memory.

Buffers are taken lazily: a direction holds a pipe or a buffer only while
bytes are in flight in it. ``recv_into`` reads into the pool's one scratch
buffer and a direction takes a buffer of its own only for bytes its sink
could not take; a pipe goes back to the :class:`BufferPool` shared by the
daemon when a wakeup ends with it empty (the common case: the sink took
everything). So an idle connection holds no pipe and no buffer, a wakeup
that writes out what it read takes nothing, and a busy daemon makes a pipe
once, not once per read.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import socket
import sys

__all__ = [
    "CHUNK_SIZE",
    "SPLICE_AVAILABLE",
    "BufferPool",
    "CopyMethod",
    "OneWay",
    "Pumped",
]

CHUNK_SIZE = 65_536
"""The most bytes held in memory per direction with ``recv_into``."""

PIPE_SIZE = 262_144
"""Pipe capacity asked for with ``splice``: bytes in flight per busy direction.

Larger than the default 64 KiB so bulk transfers move more per system call;
if the kernel refuses (``/proc/sys/fs/pipe-max-size``, or the per-user pipe
budget), the pipe keeps its default size.
"""

POOL_LIMIT = 64
"""Empty pipes or buffers kept for reuse; more are closed or dropped."""

_ROUNDS = 8
"""Reads per wakeup at most, so one busy connection cannot starve the others."""

_FULL_READ = 32_768
"""A read at least this large suggests more is waiting: read again at once.

A smaller read means the socket was probably drained; asking again would
most likely cost a system call that answers EAGAIN.
"""

SPLICE_AVAILABLE = hasattr(os, "splice") and sys.platform == "linux"
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class CopyMethod(enum.Enum):
    """How bytes move: in the kernel (``splice``), through a buffer (``recv_into``), or
    through a buffer until a direction proves bulky, then in the kernel (``auto``)."""

    AUTO = "auto"
    SPLICE = "splice"
    RECV_INTO = "recv_into"

    @classmethod
    def default(cls) -> CopyMethod:
        return cls.AUTO if SPLICE_AVAILABLE else cls.RECV_INTO

    @property
    def needs_splice(self) -> bool:
        return self is not CopyMethod.RECV_INTO


class Pumped(enum.Enum):
    """What a :meth:`OneWay.pump` is waiting for, or why the copy ended."""

    READ = "read"
    """Wait until the source is readable (nothing is held)."""
    WRITE = "write"
    """Wait until the sink is writable (bytes are held; do not read meanwhile)."""
    EOF = "eof"
    """The source sent EOF; everything before it reached the sink."""
    SOURCE_ERROR = "source_error"
    SINK_ERROR = "sink_error"


_READ = Pumped.READ
_WRITE = Pumped.WRITE
_EOF = Pumped.EOF
_SOURCE_ERROR = Pumped.SOURCE_ERROR
_SINK_ERROR = Pumped.SINK_ERROR


class BufferPool:
    """Empty pipes (``splice``) or buffers (``recv_into``) for directions to borrow.

    Everything it hands out is either given back empty (kept, up to
    :data:`POOL_LIMIT`) or discarded (a pipe with bytes in it is closed: its
    bytes belonged to a connection that is gone). :meth:`close` closes what
    it keeps; ``open_pipes`` counts every pipe made and not yet closed, so
    tests can prove none outlives its connection.
    """

    def __init__(self, method: CopyMethod) -> None:
        if method.needs_splice and not SPLICE_AVAILABLE:
            raise ValueError("splice(2) is not available on this platform")
        self.method = method
        self._pipes: list[tuple[int, int]] = []
        self._buffers: list[memoryview] = []
        self.scratch = memoryview(bytearray(CHUNK_SIZE))
        """What a direction holding nothing reads into; the bytes it cannot
        write out at once move to a buffer of its own (:meth:`take_buffer`),
        so a wakeup that writes all it read, the usual case, takes nothing."""
        self.open_pipes = 0

    @property
    def pooled(self) -> int:
        """Empty pipes or buffers kept for reuse."""
        return len(self._pipes) + len(self._buffers)

    @property
    def pooled_pipes(self) -> int:
        return len(self._pipes)

    def take_pipe(self) -> tuple[int, int]:
        if self._pipes:
            return self._pipes.pop()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.open_pipes += 1
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
        return read_end, write_end

    def give_pipe(self, pipe: tuple[int, int]) -> None:
        """Return an *empty* pipe."""
        if len(self._pipes) < POOL_LIMIT:
            self._pipes.append(pipe)
        else:
            self.discard_pipe(pipe)

    def discard_pipe(self, pipe: tuple[int, int]) -> None:
        os.close(pipe[0])
        os.close(pipe[1])
        self.open_pipes -= 1

    def take_buffer(self) -> memoryview:
        if self._buffers:
            return self._buffers.pop()
        return memoryview(bytearray(CHUNK_SIZE))

    def give_buffer(self, buffer: memoryview) -> None:
        if len(self._buffers) < POOL_LIMIT:
            self._buffers.append(buffer)

    def close(self) -> None:
        while self._pipes:
            self.discard_pipe(self._pipes.pop())
        self._buffers.clear()


class OneWay:
    """One direction of one connection: source socket to sink socket.

    :meth:`pump` moves bytes until it would block and returns what to wait
    for; :attr:`moved` is how many bytes that call wrote to the sink and
    :attr:`total` how many since the start. Call :meth:`release` when the
    connection closes (it gives back or discards what the direction holds).
    """

    __slots__ = (
        "_auto",
        "_buffer",
        "_offset",
        "_pipe",
        "_pool",
        "_splice",
        "moved",
        "pending",
        "reported",
        "sink",
        "sink_fd",
        "source",
        "source_fd",
        "total",
        "uncounted",
        "waiting",
    )

    def __init__(self, source: socket.socket, sink: socket.socket, pool: BufferPool) -> None:
        self.source = source
        self.sink = sink
        self.source_fd = source.fileno()
        self.sink_fd = sink.fileno()
        self._pool = pool
        self._splice = pool.method is CopyMethod.SPLICE
        self._auto = pool.method is CopyMethod.AUTO
        """Still copying through a buffer, ready to switch to splice at a large read."""
        self._pipe: tuple[int, int] | None = None
        self._buffer: memoryview | None = None
        self._offset = 0
        self.pending = 0
        """Bytes read from the source and not yet written to the sink."""
        self.moved = 0
        self.total = 0
        self.reported = 0
        """Of ``total``, how much the driver has already counted in its metrics."""
        self.uncounted = 0
        """Bytes held (:meth:`hold`) that are Loble's own, not the source's (a PROXY
        header): written first, and left out of ``total``."""
        self.waiting: Pumped | None = None
        """The driver's note of what it waits for (e.g. which callback is registered)."""

    @property
    def splicing(self) -> bool:
        """Whether this direction moves its bytes with ``splice`` now."""
        return self._splice

    def pump(self) -> Pumped:
        """Move what can move now; return what to wait for, or how the copy ended."""
        if self._splice:
            if self._buffer is None:
                return self._pump_splice()
            return self._pump_recv_into()  # a wakeup that fell back to a buffer ends there
        if self.pending:
            return self._pump_recv_into()  # bytes held since an earlier wakeup go first
        # The usual wakeup, kept short: nothing held, one request-sized read,
        # written out whole. Anything else carries on in _pump_recv_into.
        scratch = self._pool.scratch
        self.moved = 0
        try:
            read = self.source.recv_into(scratch)
        except BlockingIOError:
            return _READ
        except OSError:
            return _SOURCE_ERROR
        if not read:
            return _EOF
        written = 0
        if read < _FULL_READ:
            try:
                written = self.sink.send(scratch[:read])
            except OSError:
                written = 0  # _pump_recv_into sends again and tells EAGAIN from an error
            if written == read:
                self.moved = read
                self.total += read
                return _READ
        result = self._pump_recv_into(read, written)
        if result is _READ and self._splice and self._auto:
            # Switched at a large read, with the buffer written out: more is
            # probably waiting; carry on with splice in this same wakeup.
            self._auto = False
            moved = self.moved
            result = self._pump_splice()
            self.moved += moved
        return result

    def _pump_splice(self) -> Pumped:
        splice = os.splice
        pipe = self._pipe
        if pipe is None:
            try:
                pipe = self._pipe = self._pool.take_pipe()
            except OSError:
                # No pipe (e.g. EMFILE): copy through a pooled buffer this time
                # rather than fail a healthy connection. Never return without
                # reading: readiness is level-triggered and would call again at once.
                return self._pump_recv_into()
        read_end, write_end = pipe
        pending = self.pending
        moved = 0
        result = _READ
        for _ in range(_ROUNDS):
            if not pending:
                try:
                    read = splice(self.source_fd, write_end, PIPE_SIZE, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    break
                except OSError:
                    result = _SOURCE_ERROR
                    break
                if not read:
                    result = _EOF
                    break
                pending = read
            else:
                read = 0  # flushing what an earlier wakeup could not write
            try:
                written = splice(read_end, self.sink_fd, pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                result = _WRITE
                break
            except OSError:
                result = _SINK_ERROR
                break
            moved += written
            pending -= written
            if pending:
                result = _WRITE  # the sink's buffer is full: wait for it
                break
            if read < _FULL_READ:
                break  # probably drained; level-triggered readiness calls again if not
        self.pending = pending
        self.moved = moved
        self.total += moved
        if not pending:
            self._pipe = None
            self._pool.give_pipe(pipe)
        return result

    def _pump_recv_into(self, read: int = 0, written: int = 0) -> Pumped:
        """Copy through a buffer until the source is drained, the sink is full or the copy ends.

        ``read`` bytes may already be in the scratch buffer from this wakeup,
        ``written`` of them sent (see :meth:`pump`).
        """
        # A direction that holds nothing reads into the pool's scratch buffer;
        # only bytes the sink could not take get a buffer of their own (below).
        pending = self.pending
        if pending:
            buffer = self._buffer
            assert buffer is not None
            offset = self._offset
        else:
            buffer = self._pool.scratch
            pending, offset = read - written, written
        recv_into = self.source.recv_into
        send = self.sink.send
        moved = written
        result = _READ
        rounds = _ROUNDS - 1 if read else _ROUNDS
        while True:
            if pending:
                try:
                    written = send(buffer[offset : offset + pending])
                except BlockingIOError:
                    result = _WRITE
                    break
                except OSError:
                    result = _SINK_ERROR
                    break
                moved += written
                pending -= written
                if pending:
                    offset += written
                    result = _WRITE  # the sink's buffer is full: wait for it
                    break
                if read < _FULL_READ:
                    break  # probably drained (or flushed held bytes): readiness calls again if not
                if self._auto:
                    self._splice = True  # a bulk direction: splice from now on
                    break
            if not rounds:
                break
            rounds -= 1
            try:
                read = recv_into(buffer)
            except BlockingIOError:
                break
            except OSError:
                result = _SOURCE_ERROR
                break
            if not read:
                result = _EOF
                break
            pending, offset = read, 0
        self.moved = moved
        self.total += moved
        if self.uncounted:
            header = min(self.uncounted, moved)
            self.uncounted -= header
            self.total -= header
        self.pending = pending
        if pending:
            if buffer is not self._buffer:
                # Held bytes outlive this wakeup: move them out of the scratch
                # buffer, which the next direction to wake reads into.
                own = self._buffer = self._pool.take_buffer()
                own[:pending] = buffer[offset : offset + pending]
                offset = 0
            self._offset = offset
        elif self._buffer is not None:
            self._pool.give_buffer(self._buffer)
            self._buffer = None
        return result

    def hold(self, data: bytes, uncounted: int = 0) -> None:
        """Bytes to write to the sink before any read from the source, of which the
        first ``uncounted`` are Loble's own (left out of ``total``).

        For what a backend must get first: a PROXY header, and the client's bytes
        read with the header it sent. Called on a fresh direction, before the
        driver pumps it: the driver then waits for the sink to be writable.
        """
        assert not self.pending and len(data) <= CHUNK_SIZE
        buffer = self._buffer = self._pool.take_buffer()
        buffer[: len(data)] = data
        self._offset = 0
        self.pending = len(data)
        self.uncounted = uncounted

    def release(self) -> None:
        """The connection is closing: give back (or discard) what this direction holds."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            if self.pending:
                self._pool.discard_pipe(pipe)
            else:
                self._pool.give_pipe(pipe)
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            self._pool.give_buffer(buffer)
        self.pending = 0
