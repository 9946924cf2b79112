"""Peers that misbehave, on real loopback sockets through the daemon.

Slow senders on either side, clients that half-close, vanish or stop
reading, bytes after a FIN, and a flood of idle clients far beyond
``[listener] max_connections``. In every case the bytes that arrive are
exactly the bytes that were sent, a connection nobody finishes is bounded
by the idle timeout, its end is counted, and nothing leaks: no connection
left open at the daemon, no descriptor left open in the process (the daemon
runs in the test's process, so ``/proc/self/fd`` is its table).

Waits are bounded polls (``net.wait_for``); the pauses of the lockstep
senders below are waits for the other side to have the previous byte.
"""

from __future__ import annotations

import gc
import os
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from .conftest import ANYIO_BACKENDS

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform != "linux", reason="counts descriptors in /proc/self/fd"),
]

IDLE = 0.3
"""The idle timeout of the tests whose peers go silent."""

RESET_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


def pattern(size: int) -> bytes:
    """``size`` bytes that are not all alike, so a byte lost or moved shows."""
    block = bytes(range(251))  # a prime length: no alignment with any buffer size
    return (block * (size // len(block) + 1))[:size]


async def read_to_end(stream: Any) -> tuple[bytes, str]:
    """Everything the stream delivers, and how it ended: ``eof`` (FIN) or ``reset``."""
    data = bytearray()
    while True:
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            return bytes(data), "eof"
        except RESET_ERRORS:
            return bytes(data), "reset"


def raw_copy(stream: Any) -> socket.socket:
    """A socket object on a duplicate of the stream's descriptor (asyncio's has no recv)."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    return socket.socket(fileno=os.dup(raw.fileno()))


def set_reset(stream: Any) -> None:
    """The stream's next close sends RST, as a killed process's does."""
    with raw_copy(stream) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


Handler = Callable[["Server", Any], Awaitable[str]]


class Server:
    """A backend running ``handler(server, stream)`` per connection.

    The handler returns how its connection ended (``eof`` or ``reset``); a
    connection error counts as ``reset``. The server keeps what it read
    (``received``, one entry per connection, filled as bytes come in), how
    many connections it has open and the most it had at once.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = 0
        self.accepted = 0
        self.open = 0
        self.peak = 0
        self.received: list[bytearray] = []
        self.endings: list[str] = []
        self.warming = True
        """Until the test begins: answer as :func:`echo_after_eof`, whatever the handler."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", backlog=1024)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self._one)

    async def _one(self, stream: Any) -> None:
        self.accepted += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        how = "reset"
        try:
            async with stream:
                handler = echo_after_eof if self.warming else self.handler
                how = await handler(self, stream)
        except RESET_ERRORS:
            how = "reset"
        finally:
            self.open -= 1
            self.endings.append(how)

    async def read_to_end(self, stream: Any) -> str:
        """Read into a new ``received`` entry until EOF or reset; say which."""
        received = bytearray()
        self.received.append(received)
        while True:
            try:
                received += await stream.receive()
            except anyio.EndOfStream:
                return "eof"
            except RESET_ERRORS:
                return "reset"


async def echo_after_eof(server: Server, stream: Any) -> str:
    """Read to the client's EOF, answer ``echo:`` and what was read, EOF, close after it."""
    if await server.read_to_end(stream) != "eof":
        return "reset"
    await stream.send(b"echo:" + bytes(server.received[-1]))
    await stream.send_eof()
    return (await read_to_end(stream))[1]


async def quiet(server: Server, stream: Any) -> str:
    """Say nothing; read until the client's EOF or reset."""
    return await server.read_to_end(stream)


def accept_queue(port: int) -> int:
    """Connections completed on 127.0.0.1:``port`` that nobody accepted yet (``/proc/net/tcp``:
    a listening socket's receive queue is its accept queue)."""
    with open("/proc/net/tcp", encoding="ascii") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # LISTEN
                return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@asynccontextmanager
async def hostile(net: Any, handler: Handler, **settings: Any) -> Any:
    """A lab with one :class:`Server` and a daemon (access log on) in front of it.

    Yields ``(lab, server, daemon)``. On the way out, with the test's clients
    closed, it checks nothing leaked: no connection open at the daemon or
    the backend, every pipe still open an empty one in the daemon's pool, and
    the process back to the descriptors it had before the test's traffic.
    """
    async with net.loopback() as lab:
        server = Server(handler)
        await lab.tasks.start(server.serve)
        logging = {"access_log": True, **settings.pop("logging", {})}
        daemon = await lab.daemon([server.address], logging=logging, **settings)
        # Whatever the loop and the endpoints make lazily, made before counting.
        async with await anyio.connect_tcp(*daemon.listen_address) as warm:
            await warm.send_eof()
            await read_to_end(warm)
        if daemon.metrics_address is not None:
            await net.scrape(daemon.metrics_address)
        await net.wait_for(lambda: daemon.open_connections == 0 and server.open == 0)
        server.warming = False
        lab.logs.lines.clear()
        server.received.clear()
        server.endings.clear()
        server.accepted = server.peak = 0

        def without_pooled_pipes() -> int:
            return open_descriptors() - 2 * daemon.pool.open_pipes

        gc.collect()  # sockets an earlier test left to the collector close now, not mid-test
        before = without_pooled_pipes()
        yield lab, server, daemon
        await net.wait_for(lambda: daemon.open_connections == 0, what="no connection open")
        await net.wait_for(lambda: server.open == 0, what="no backend connection open")
        await net.wait_for(
            lambda: without_pooled_pipes() == before,
            what=f"descriptors back to {before} (now {without_pooled_pipes()})",
        )
        assert daemon.conductor is not None and daemon.conductor.holding == 0
        assert daemon.pool.open_pipes == daemon.pool.pooled_pipes


def ends(lab: Any) -> list[dict[str, Any]]:
    """The access log's line for each connection that ended, in order."""
    return lab.logs.find("connection")


# -- slow senders ----------------------------------------------------------------------


async def test_a_client_sending_one_byte_at_a_time_gets_exactly_the_echo(
    net: Any, data_plane: dict[str, str]
) -> None:
    payload = pattern(24)
    async with hostile(net, echo_after_eof, **data_plane) as (lab, server, daemon):
        async with await anyio.connect_tcp(*daemon.listen_address) as client:
            for sent in range(1, len(payload) + 1):
                await client.send(payload[sent - 1 : sent])
                # Each byte is passed on as it comes, not held for more to join it.
                await net.wait_for(
                    lambda n=sent: server.received and len(server.received[0]) == n,
                    what=f"byte {sent} at the backend",
                )
            await client.send_eof()
            assert await read_to_end(client) == (b"echo:" + payload, "eof")
        await net.wait_for(lambda: ends(lab))
    (line,) = ends(lab)
    assert line["outcome"] == "completed"
    assert (line["bytes_to_backend"], line["bytes_to_client"]) == (24, 29)


async def test_a_backend_trickling_its_reply_reaches_the_client_whole(
    net: Any, data_plane: dict[str, str]
) -> None:
    reply = pattern(24)
    delivered = bytearray()

    async def trickle(server: Server, stream: Any) -> str:
        if await server.read_to_end(stream) != "eof":
            return "reset"
        for sent in range(1, len(reply) + 1):
            await stream.send(reply[sent - 1 : sent])
            await net.wait_for(lambda n=sent: len(delivered) == n, what=f"byte {sent} delivered")
        await stream.send_eof()
        return (await read_to_end(stream))[1]

    async with hostile(net, trickle, **data_plane) as (lab, server, daemon):
        async with await anyio.connect_tcp(*daemon.listen_address) as client:
            await client.send(b"go")
            await client.send_eof()
            while True:
                try:
                    delivered.extend(await client.receive())
                except anyio.EndOfStream:
                    break
        assert bytes(delivered) == reply
        await net.wait_for(lambda: server.endings == ["eof"])
    (line,) = ends(lab)
    assert (line["outcome"], line["bytes_to_backend"], line["bytes_to_client"]) == (
        "completed",
        2,
        24,
    )


# -- half-open clients and bytes after a FIN --------------------------------------------

REPLY = 4 * 1024 * 1024
"""A reply far larger than the socket buffers: it flows long after the client's FIN."""


async def test_a_client_that_half_closes_gets_the_whole_reply_and_can_send_no_more(
    net: Any, data_plane: dict[str, str]
) -> None:
    request = pattern(1000)
    reply = pattern(REPLY)

    async def answer_after_eof(server: Server, stream: Any) -> str:
        if await server.read_to_end(stream) != "eof":
            return "reset"
        for start in range(0, len(reply), 65536):
            await stream.send(reply[start : start + 65536])
        await stream.send_eof()
        return (await read_to_end(stream))[1]

    async with hostile(net, answer_after_eof, **data_plane) as (lab, server, daemon):
        async with await anyio.connect_tcp(*daemon.listen_address) as client:
            await client.send(request)
            await client.send_eof()
            # TCP allows no byte after one's own FIN: the kernel refuses it here,
            # so nothing more can reach Loble, and nothing more reaches the backend.
            with raw_copy(client) as raw, pytest.raises(BrokenPipeError):
                raw.send(b"after the FIN")
            assert await read_to_end(client) == (reply, "eof")
        await net.wait_for(lambda: server.endings == ["eof"])
    assert [bytes(r) for r in server.received] == [request]
    (line,) = ends(lab)
    assert (line["outcome"], line["bytes_to_backend"], line["bytes_to_client"]) == (
        "completed",
        len(request),
        len(reply),
    )


async def test_after_the_backend_s_fin_the_client_s_bytes_still_flow_to_it(
    net: Any, data_plane: dict[str, str]
) -> None:
    upload = pattern(1024 * 1024)

    async def greet_then_listen(server: Server, stream: Any) -> str:
        await stream.send(b"hello")
        await stream.send_eof()  # its FIN first: it only listens from now on
        return await server.read_to_end(stream)

    async with hostile(net, greet_then_listen, **data_plane) as (lab, server, daemon):
        async with await anyio.connect_tcp(*daemon.listen_address) as client:
            assert await read_to_end(client) == (b"hello", "eof")
            for start in range(0, len(upload), 65536):  # after the backend's FIN
                await client.send(upload[start : start + 65536])
            await client.send_eof()
            await net.wait_for(lambda: server.endings == ["eof"], what="the upload's EOF")
        assert [bytes(r) for r in server.received] == [upload]
        await net.wait_for(lambda: ends(lab))
    (line,) = ends(lab)
    assert (line["outcome"], line["bytes_to_backend"], line["bytes_to_client"]) == (
        "completed",
        len(upload),
        5,
    )


async def test_a_client_gone_after_its_fin_is_reset_by_its_kernel_and_loble_resets_the_backend(
    net: Any, data_plane: dict[str, str]
) -> None:
    # A client that sends, FINs and closes without reading: its kernel answers
    # the reply's first bytes with RST. Loble passes that on as a reset.
    sent = 0

    async def answer_forever(server: Server, stream: Any) -> str:
        nonlocal sent
        if await server.read_to_end(stream) != "eof":
            return "reset"
        chunk = pattern(65536)
        while sent < 64 * 1024 * 1024:  # far more than every buffer on the way holds
            await stream.send(chunk)  # raises once Loble resets this side
            sent += len(chunk)
        return "eof"

    async with hostile(net, answer_forever, **data_plane) as (lab, server, daemon):
        client = await anyio.connect_tcp(*daemon.listen_address)
        await client.send(b"fire and forget")
        await client.send_eof()
        await client.aclose()
        await net.wait_for(lambda: server.endings, what="the backend's connection ended")
        assert server.endings == ["reset"] and sent < 64 * 1024 * 1024
        await net.wait_for(lambda: ends(lab))
    (line,) = ends(lab)
    assert line["outcome"] == "client_reset"
    assert line["bytes_to_backend"] == len(b"fire and forget")
    assert line["bytes_to_client"] < sent  # what got as far as Loble, not all the backend sent


# -- clients that vanish: bounded by the idle timeout -------------------------------------


@pytest.mark.parametrize("half_closed", [False, True], ids=["open", "half-closed"])
async def test_a_client_that_vanishes_with_a_reset_ends_both_sides_and_is_counted(
    net: Any, data_plane: dict[str, str], half_closed: bool
) -> None:
    gone = anyio.Event()

    async def work_on_it(server: Server, stream: Any) -> str:
        # Reads the request (to the client's EOF, or its reset), then, once Loble
        # has ended the connection, answers: a reset makes that send fail at once.
        if await server.read_to_end(stream) == "reset":
            return "reset"
        await gone.wait()
        # Straight to the kernel: asyncio's transport would take the bytes and
        # report the error later. After a RST the send fails; after a FIN it
        # would go through.
        with raw_copy(stream) as raw:
            try:
                raw.send(b"the answer")
            except OSError:
                return "reset"
        return "eof"

    settings = {"timeouts": {"idle": IDLE}, **data_plane}
    async with hostile(net, work_on_it, **settings) as (lab, server, daemon):
        client = await anyio.connect_tcp(*daemon.listen_address)
        await client.send(b"half a requ")
        if half_closed:
            await client.send_eof()
        await net.wait_for(lambda: server.received and len(server.received[0]) == 11)
        set_reset(client)
        await client.aclose()
        # The callbacks path notices the reset at once; the tasks path, on a
        # half-closed side with the backend quiet, at the idle timeout at the latest.
        await net.wait_for(lambda: ends(lab), timeout=IDLE + 5, what="the connection's end")
        assert daemon.conductor is not None
        await net.wait_for(lambda: daemon.conductor.holding == 0, what="its sockets closed")
        gone.set()
        await net.wait_for(lambda: server.endings, what="the backend's end")
    (line,) = ends(lab)
    assert server.endings == ["reset"], line
    if half_closed:
        assert line["outcome"] in ("client_reset", "idle_timeout"), line
    else:
        assert line["outcome"] == "client_reset", line
    assert line["bytes_to_backend"] == 11


async def test_a_client_that_stops_reading_is_cut_at_the_idle_timeout(
    net: Any, data_plane: dict[str, str]
) -> None:
    pushed = 0

    async def push(server: Server, stream: Any) -> str:
        nonlocal pushed
        chunk = pattern(65536)
        while True:
            await stream.send(chunk)  # blocks once every buffer is full; raises at the cut
            pushed += len(chunk)

    settings = {"timeouts": {"idle": IDLE}, **data_plane}
    async with hostile(net, push, **settings) as (lab, server, daemon):
        async with await anyio.connect_tcp(*daemon.listen_address) as client:
            # Connected, never reads, never closes: the buffers fill, nothing
            # moves, and the idle timeout ends it.
            await net.wait_for(lambda: ends(lab), timeout=IDLE + 5, what="the idle cut")
            received, how = await read_to_end(client)
        assert how == "reset"  # the cut is no clean end
        await net.wait_for(lambda: server.endings == ["reset"])
    (line,) = ends(lab)
    assert line["outcome"] == "idle_timeout"
    assert len(received) <= line["bytes_to_client"] < pushed


async def test_clients_that_give_up_in_the_backlog_are_accepted_ended_and_counted(
    net: Any, data_plane: dict[str, str]
) -> None:
    # At max_connections, one waiting client closes (FIN) and one resets before
    # Loble gets to them: accepted later, each ends at once, neither leaks.
    settings = {"listener": {"address": "127.0.0.1:0", "max_connections": 1}, **data_plane}
    async with hostile(net, echo_after_eof, **settings) as (lab, server, daemon):
        held = await anyio.connect_tcp(*daemon.listen_address)
        await held.send(b"held")
        await net.wait_for(lambda: server.accepted == 1)
        gave_up: dict[str, str] = {}
        for how in ("fin", "reset"):
            waiting = await anyio.connect_tcp(*daemon.listen_address)
            host, port = waiting.extra(anyio.abc.SocketAttribute.local_address)[:2]
            gave_up[f"{host}:{port}"] = how
            await waiting.send(b"gave up")
            if how == "reset":
                set_reset(waiting)
            await waiting.aclose()
        await held.send_eof()
        assert await read_to_end(held) == (b"echo:held", "eof")
        await held.aclose()
        await net.wait_for(lambda: len(ends(lab)) == 3, what="three ends")
    assert server.accepted == 3
    # What each waiting client sent before it gave up was in its socket: the
    # kernel delivers it, then the EOF or the reset, and so does Loble.
    assert sorted(bytes(r) for r in server.received) == [b"gave up", b"gave up", b"held"]
    outcome = {gave_up.get(line["client"], "held"): line["outcome"] for line in ends(lab)}
    assert outcome["held"] == "completed" and outcome["reset"] == "client_reset", outcome
    # The FIN one's answer goes into a closed socket, whose kernel resets: that
    # may come back before Loble is done, so either end is honest.
    assert outcome["fin"] in ("completed", "client_reset"), outcome
    resets = list(outcome.values()).count("client_reset")
    assert sorted(server.endings) == ["eof"] * (3 - resets) + ["reset"] * resets


# -- an idle-client flood ----------------------------------------------------------------

FLOOD = 300
LIMIT = 50
FLOOD_IDLE = 0.5


async def test_a_flood_of_idle_clients_waits_in_the_backlog_and_is_served_in_turn(
    net: Any, anyio_backend: Any
) -> None:
    # Six times max_connections of clients that say one thing and then nothing:
    # at most LIMIT are ever open at Loble, the rest wait in the backlog and
    # get in as the idle timeout cuts the silent ones; the metrics endpoint
    # answers throughout.
    if anyio_backend == ANYIO_BACKENDS["asyncio_plain"]:
        pytest.skip("seconds long: the callbacks path (asyncio) and the tasks path (trio) do")
    settings = {
        "listener": {"address": "127.0.0.1:0", "max_connections": LIMIT},
        "timeouts": {"idle": FLOOD_IDLE},
        "metrics": {"enabled": True, "address": "127.0.0.1:0"},
    }
    endings: list[tuple[bytes, str]] = []
    scrapes: list[dict[Any, float]] = []
    holding: list[int] = []
    backlog: list[int] = []

    async def idle_client(number: int) -> None:
        async with await anyio.connect_tcp(*daemon.listen_address) as client:
            await client.send(b"client-%03d" % number)
            endings.append(await read_to_end(client))

    async with hostile(net, quiet, **settings) as (lab, server, daemon):
        assert daemon.conductor is not None and daemon.metrics_address is not None
        conductor = daemon.conductor

        async def watch() -> None:
            while True:
                holding.append(conductor.holding)
                backlog.append(accept_queue(daemon.listen_address[1]))
                status, body = await net.scrape(daemon.metrics_address)
                assert status == 200
                scrapes.append(net.samples(body))
                await anyio.sleep(0.05)  # the interval between two scrapes

        with anyio.fail_after(4 * FLOOD * FLOOD_IDLE / LIMIT + 10):
            async with anyio.create_task_group() as watching:
                watching.start_soon(watch)
                async with anyio.create_task_group() as clients:
                    for number in range(FLOOD):
                        clients.start_soon(idle_client, number)
                watching.cancel_scope.cancel()
        statistics = daemon.core.statistics()
    # Every client was served (its bytes reached the backend) and then cut.
    assert sorted(bytes(r) for r in server.received) == [b"client-%03d" % n for n in range(FLOOD)]
    assert endings == [(b"", "reset")] * FLOOD
    assert server.endings == ["reset"] * FLOOD
    assert {line["outcome"] for line in ends(lab)} == {"idle_timeout"} and len(ends(lab)) == FLOOD
    # Never more than the limit open at Loble at once, and the limit was reached.
    # (Not counted at the backend: its end of a cut connection may close a moment
    # after Loble has accepted the next client.)
    assert statistics.backends[0].peak_connections == LIMIT
    assert max(holding) <= LIMIT
    assert server.accepted == FLOOD, "one backend connection per client, no retry"
    assert max(backlog) >= FLOOD - 2 * LIMIT, "the others waited in the listen backlog"
    in_flight = [s["loble_connections_in_flight", frozenset()] for s in scrapes]
    assert len(scrapes) >= 10 and max(in_flight) <= LIMIT
    assert any(s["loble_accepting_paused", frozenset()] == 1 for s in scrapes)
    assert scrapes[-1]["loble_connection_limit", frozenset()] == LIMIT
    assert len(lab.logs.find("accepting paused: connection limit reached")) >= 1
