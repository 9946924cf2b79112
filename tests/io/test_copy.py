"""The byte mover on real loopback sockets, with auto, splice and recv_into.

A :class:`OneWay` never blocks; these tests drive it by hand, waiting for
readiness with ``select`` (bounded), the way an event loop would.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from loble.io._copy import (
    CHUNK_SIZE,
    PIPE_SIZE,
    SPLICE_AVAILABLE,
    BufferPool,
    CopyMethod,
    OneWay,
    Pumped,
)

BOUND = 10.0
LINUX_ONLY = pytest.mark.skipif(not SPLICE_AVAILABLE, reason="splice(2) is Linux only")
METHODS = [
    pytest.param(CopyMethod.AUTO, marks=LINUX_ONLY),
    pytest.param(CopyMethod.SPLICE, marks=LINUX_ONLY),
    CopyMethod.RECV_INTO,
]


@pytest.fixture(params=METHODS, ids=lambda method: method.value)
def pool(request: pytest.FixtureRequest) -> Iterator[BufferPool]:
    pool = BufferPool(request.param)
    yield pool
    pool.close()
    assert pool.open_pipes == 0


def tcp_pair(*, small: bool = False) -> tuple[socket.socket, socket.socket]:
    """A connected loopback pair: (connecting end, accepted end), both non-blocking.

    ``small``: 8 KiB send buffer on the connecting end and receive buffer on
    the accepted one, set before the handshake.
    """
    with socket.socket() as listener:
        near = socket.socket()
        if small:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near.connect(listener.getsockname())
        far, _ = listener.accept()
    near.setblocking(False)
    far.setblocking(False)
    return near, far


@pytest.fixture
def proxied(pool: BufferPool) -> Iterator[tuple[socket.socket, OneWay, socket.socket]]:
    """client -> [OneWay] -> server; yields (client, way, server)."""
    client, proxy_in = tcp_pair()
    proxy_out, server = tcp_pair()
    way = OneWay(proxy_in, proxy_out, pool)
    yield client, way, server
    way.release()
    for sock in (client, proxy_in, proxy_out, server):
        sock.close()


def wait(readable: list[socket.socket], writable: list[socket.socket]) -> None:
    ready = select.select(readable, writable, [], BOUND)
    assert ready[0] or ready[1], "socket not ready within the bound"


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def transfer(client: socket.socket, way: OneWay, server: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` and EOF through ``way``, pumping by hand; return what arrived."""
    received = bytearray()
    sent = 0
    while True:
        if sent < len(payload):
            with contextlib.suppress(BlockingIOError):  # the way pumps below: room comes
                sent += client.send(payload[sent : sent + 100_000])
            if sent == len(payload):
                client.shutdown(socket.SHUT_WR)
        end = way.pump()
        while True:
            try:
                received += server.recv(1 << 20)
            except BlockingIOError:
                break
        if end is Pumped.EOF:
            break
        if end is Pumped.READ and sent == len(payload):
            wait([way.source], [])
        assert end in (Pumped.READ, Pumped.WRITE)
    return bytes(received)


def test_everything_arrives_then_eof(proxied: tuple[socket.socket, OneWay, socket.socket]) -> None:
    client, way, server = proxied
    payload = os.urandom(3 * PIPE_SIZE + 12_345)
    assert transfer(client, way, server, payload) == payload
    assert way.total == len(payload)


@LINUX_ONLY
def test_auto_moves_small_reads_through_a_buffer_then_switches_to_splice_for_good() -> None:
    pool = BufferPool(CopyMethod.AUTO)
    client, proxy_in = tcp_pair()
    proxy_out, server = tcp_pair()
    way = OneWay(proxy_in, proxy_out, pool)
    small = os.urandom(1_000)
    received = bytearray()
    for _ in range(5):  # request-sized messages: no pipe is ever taken
        client.send(small)
        wait([proxy_in], [])
        assert way.pump() is Pumped.READ
        assert not way.splicing
        assert pool.open_pipes == 0
        wait([server], [])
        received += server.recv(1 << 20)
    # A bulk upload on the same connection: its first large read switches the
    # direction to splice mid-stream; not a byte is lost, reordered or doubled.
    bulk = os.urandom(3 * PIPE_SIZE + 12_345)
    received += transfer(client, way, server, bulk)
    assert way.splicing
    assert pool.open_pipes == 1
    sent = small * 5 + bulk
    assert hashlib.sha256(received).digest() == hashlib.sha256(sent).digest()
    assert way.total == len(sent)
    way.release()
    pool.close()
    assert pool.open_pipes == 0
    for sock in (client, proxy_in, proxy_out, server):
        sock.close()


def test_reads_nothing_more_while_the_sink_does_not_read(
    proxied: tuple[socket.socket, OneWay, socket.socket],
) -> None:
    client, way, server = proxied
    client.setblocking(False)
    chunk = b"x" * 65_536
    # The server never reads: fill every buffer until the client cannot send.
    while True:
        try:
            client.send(chunk)
        except BlockingIOError:
            end = way.pump()
            if end is Pumped.WRITE:
                break
            assert end is Pumped.READ
            try:
                client.send(chunk)
            except BlockingIOError:
                wait([], [way.sink])  # only the sink can make progress now
    held = way.pending
    read = way.total + way.pending
    assert 0 < held <= max(PIPE_SIZE, CHUNK_SIZE)
    for _ in range(5):
        assert way.pump() is Pumped.WRITE
    # Nothing more was read from the source: the peer that stopped reading
    # holds one bounded buffer of Loble's, no more.
    assert way.total + way.pending == read
    assert server.recv(1) == b"x"


def test_source_reset_and_sink_reset_are_told_apart(pool: BufferPool) -> None:
    client, proxy_in = tcp_pair()
    proxy_out, server = tcp_pair()
    way = OneWay(proxy_in, proxy_out, pool)
    reset(client)
    wait([proxy_in], [])
    assert way.pump() is Pumped.SOURCE_ERROR
    way.release()

    client, proxy_in2 = tcp_pair()
    proxy_out2, server2 = tcp_pair()
    way = OneWay(proxy_in2, proxy_out2, pool)
    reset(server2)
    wait([proxy_out2], [])
    client.send(b"to a backend that is gone")
    wait([proxy_in2], [])
    assert way.pump() is Pumped.SINK_ERROR
    way.release()
    for sock in (client, proxy_in, proxy_out, server, proxy_in2, proxy_out2):
        sock.close()


def test_an_idle_direction_holds_no_buffer_and_buffers_are_reused(pool: BufferPool) -> None:
    pairs = [tcp_pair() for _ in range(4)]
    first = OneWay(pairs[0][1], pairs[1][0], pool)
    second = OneWay(pairs[2][1], pairs[3][0], pool)
    for client, way in ((pairs[0][0], first), (pairs[2][0], second)):
        client.send(b"hello")
        wait([way.source], [])
        assert way.pump() is Pumped.READ
        assert way.total == 5 and way.pending == 0
    # Both directions ran, one after the other, through the pool's scratch
    # buffer (or one pooled pipe): neither took a buffer of its own.
    splice = pool.method is CopyMethod.SPLICE
    assert pool.pooled == (1 if splice else 0)
    assert pool.open_pipes == (1 if splice else 0)
    for way in (first, second):
        way.release()
    for pair in pairs:
        for sock in pair:
            sock.close()


@pytest.mark.parametrize(
    "method",
    [pytest.param(CopyMethod.AUTO, marks=LINUX_ONLY), CopyMethod.RECV_INTO],
    ids=lambda method: method.value,
)
def test_bytes_held_for_a_slow_sink_survive_other_directions_waking(method: CopyMethod) -> None:
    # Directions read into one shared scratch buffer; bytes one of them cannot
    # write out must move to a buffer of its own before another reads.
    pool = BufferPool(method)
    slow_client, slow_in = tcp_pair()
    slow_out, slow_server = tcp_pair()
    slow_out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    slow_server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow = OneWay(slow_in, slow_out, pool)
    sent = bytearray()
    piece = 0
    while slow.pending == 0:  # small messages (no switch to splice) until the sink is full
        message = (b"%06d:" % piece) * 150
        slow_client.sendall(message)
        sent += message
        piece += 1
        wait([slow_in], [])
        slow.pump()
    assert pool.pooled == 0  # the held bytes' own buffer is taken from the pool

    other = [tcp_pair() for _ in range(2)]
    busy = OneWay(other[0][1], other[1][0], pool)
    for _ in range(20):
        other[0][0].send(b"z" * 2000)
        wait([busy.source], [])
        busy.pump()
        assert other[1][1].recv(4096)  # the scratch buffer was overwritten each time

    received = bytearray()
    while len(received) < len(sent):
        wait([slow_server], [])
        received += slow_server.recv(65536)
        if slow.pending:
            slow.pump()
    assert bytes(received) == bytes(sent)
    assert slow.pending == 0 and pool.pooled == 1  # given back once written out
    for way in (slow, busy):
        way.release()
    for sock in (slow_client, slow_in, slow_out, slow_server, *(s for pair in other for s in pair)):
        sock.close()
    pool.close()


def test_a_direction_closed_with_bytes_held_discards_its_pipe(pool: BufferPool) -> None:
    client, proxy_in = tcp_pair()
    proxy_out, server = tcp_pair()
    proxy_out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    way = OneWay(proxy_in, proxy_out, pool)
    client.setblocking(True)
    client.sendall(b"y" * 200_000)
    wait([proxy_in], [])
    while way.pump() is not Pumped.WRITE:
        wait([proxy_in], [])
    assert way.pending > 0
    way.release()
    assert pool.pooled == (0 if pool.method is CopyMethod.SPLICE else 1)
    assert pool.open_pipes == 0
    for sock in (client, proxy_in, proxy_out, server):
        sock.close()


FUZZ_CASES = [
    pytest.param(CopyMethod.RECV_INTO, 0.0, id="recv_into"),
    pytest.param(CopyMethod.AUTO, 0.0, marks=LINUX_ONLY, id="auto"),
    pytest.param(CopyMethod.AUTO, 0.5, marks=LINUX_ONLY, id="auto-no-pipe-half-the-time"),
    pytest.param(CopyMethod.SPLICE, 0.5, marks=LINUX_ONLY, id="splice-no-pipe-half-the-time"),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("method", "no_pipe"), FUZZ_CASES)
def test_directions_sharing_a_pool_deliver_every_byte_in_order(
    method: CopyMethod, no_pipe: float, seed: int
) -> None:
    # Four directions on one pool (one scratch buffer, pooled pipes), driven in
    # a random order with random message sizes and slow readers, some pipes
    # refused (the EMFILE fallback): every byte arrives, once, in order.
    rng = random.Random(seed)
    pool = BufferPool(method)
    take_pipe = pool.take_pipe

    def sometimes_no_pipe() -> tuple[int, int]:
        if rng.random() < no_pipe:
            raise OSError(errno.EMFILE, "no pipe for this test")
        return take_pipe()

    pool.take_pipe = sometimes_no_pipe  # type: ignore[method-assign]
    ways = []
    for _ in range(4):
        client, proxy_in = tcp_pair()
        # Most sinks small (their buffers set before the handshake, as a
        # window shrunk afterwards stalls TCP): they fill up, bytes get held.
        proxy_out, server = tcp_pair(small=rng.random() < 0.7)
        ways.append((client, OneWay(proxy_in, proxy_out, pool), server, bytearray(), bytearray()))
    held = 0
    for _ in range(1500):
        client, way, server, sent, received = rng.choice(ways)
        action = rng.random()
        if action < 0.35:
            size = rng.choice([1, 100, 3000, 20_000, 40_000])
            data = rng.randbytes(size)
            with contextlib.suppress(BlockingIOError):
                sent += data[: client.send(data)]
        elif action < 0.7:
            way.pump()
            held += way.pending > 0
        else:
            with contextlib.suppress(BlockingIOError):
                received += server.recv(rng.choice([100, 5000, 65_536]))
    deadline = time.monotonic() + BOUND
    while any(len(w[4]) < len(w[3]) for w in ways):
        assert time.monotonic() < deadline, "bytes still missing after the bound"
        select.select([w[2] for w in ways], [], [], 0.01)
        for _, way, server, _, received in ways:
            way.pump()
            with contextlib.suppress(BlockingIOError):
                received += server.recv(65_536)
    for _, way, _, sent, received in ways:
        assert hashlib.sha256(received).digest() == hashlib.sha256(sent).digest()
        assert way.total == len(received)  # every byte counted once, for metrics
        way.release()
    assert held > 0  # the slow sinks made directions hold bytes
    for client, way, server, _, _ in ways:
        for sock in (client, way.source, way.sink, server):
            sock.close()
    pool.close()
    assert pool.open_pipes == 0
