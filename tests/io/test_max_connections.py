"""``[listener] max_connections`` on real sockets: at the limit, clients wait in the backlog.

HAProxy's ``maxconn``: with ``max_connections = N``, N clients are served and
the next one waits in the kernel's listen backlog (its TCP handshake is done,
Loble has not accepted it: no backend connection, no reset) until one of the
N closes. The backlog is read from the kernel itself (``/proc/net/tcp``: a
listening socket's receive queue is its accept queue), so "not accepted" is
a fact, not a guess from a pause.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform != "linux", reason="reads the accept queue in /proc/net/tcp"),
]

PAUSED = "accepting paused: connection limit reached"
RESUMED = "accepting resumed: below the connection limit"


def accept_queue(port: int) -> int:
    """Connections the kernel has completed on 127.0.0.1:``port`` and nobody accepted yet."""
    with open("/proc/net/tcp", encoding="ascii") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # LISTEN
                return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def waiting(stream: Any) -> bool:
    """The client is connected and nothing came back: no reset, no EOF, no bytes."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)  # asyncio's has no recv
    with socket.socket(fileno=os.dup(raw.fileno())) as peek:
        try:
            peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
    return False


async def finish(net: Any, stream: Any) -> bytes:
    """Send EOF, read the backend's answer to the end, close."""
    async with stream:
        await stream.send_eof()
        with anyio.fail_after(10):
            return bytes(await net.read_all(stream))


def limited(max_connections: int) -> dict[str, Any]:
    return {"address": "127.0.0.1:0", "max_connections": max_connections}


async def test_at_max_connections_the_next_client_waits_in_the_backlog_until_one_closes(
    net: Any, data_plane: dict[str, str]
) -> None:
    limit = 3
    async with net.loopback() as lab:
        backend = await lab.backend("a")  # answers "a:" + what it read, after the EOF
        daemon = await lab.daemon(
            [backend.address],
            listener=limited(limit),
            metrics={"enabled": True, "address": "127.0.0.1:0"},
            **data_plane,
        )
        port = daemon.listen_address[1]
        held = []
        for number in range(limit):
            stream = await anyio.connect_tcp(*daemon.listen_address)
            await stream.send(b"held-%d" % number)
            held.append(stream)
        await net.wait_for(lambda: backend.accepted == limit, what="the held clients connected")
        assert daemon.conductor is not None and daemon.conductor.accepting_paused
        late = await anyio.connect_tcp(*daemon.listen_address)  # the kernel completes it
        await late.send(b"late")
        await net.wait_for(lambda: accept_queue(port) == 1, what="the late client in the backlog")
        # The metrics endpoint answers at the limit; once it has, the loop has had its turns.
        status, body = await net.scrape(daemon.metrics_address)
        assert status == 200
        figures = net.samples(body)
        assert figures["loble_connection_limit", frozenset()] == limit
        assert figures["loble_accepting_paused", frozenset()] == 1
        assert accept_queue(port) == 1, "accepted past max_connections"
        assert backend.accepted == limit and daemon.open_connections == limit
        assert waiting(late), "the waiting client was reset or answered"
        # One closes: the late client takes its place at once.
        assert await finish(net, held.pop(0)) == b"a:held-0"
        await net.wait_for(lambda: backend.accepted == limit + 1, what="the late client served")
        assert accept_queue(port) == 0
        assert await finish(net, late) == b"a:late"
        for number, stream in enumerate(held, start=1):
            assert await finish(net, stream) == b"a:held-%d" % number
        await net.wait_for(lambda: lab.logs.find(RESUMED), what="the resumed line")
        assert await net.request(daemon.listen_address, b"again") == b"a:again"
    (paused,) = lab.logs.find(PAUSED)
    assert paused["open"] == paused["limit"] == limit
    assert (paused["limited_by"], paused["max_connections"]) == ("max_connections", limit)
    (resumed,) = lab.logs.find(RESUMED)
    assert resumed["limited_by"] == "max_connections"
    assert resumed["accepted"] == 1 and resumed["pauses"] == 2
    (line,) = lab.logs.find("connection limit")
    assert (line["connections"], line["limited_by"]) == (limit, "max_connections")


async def test_a_reload_changes_max_connections_live_and_cuts_nothing(
    net: Any, tmp_path: Path
) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        path = tmp_path / "config.toml"
        daemon = await lab.daemon([backend.address], config_path=path)
        port = daemon.listen_address[1]
        held = []
        for number in range(3):
            stream = await anyio.connect_tcp(*daemon.listen_address)
            await stream.send(b"held-%d" % number)
            held.append(stream)
        await net.wait_for(lambda: backend.accepted == 3)

        async def reload(max_connections: int) -> dict[str, Any]:
            document = {"listener": limited(max_connections)}
            net.write_config(path, {**document, "backends": [{"address": backend.address}]})
            return dict(await daemon.reload())

        # Lowered below what is open: nothing is cut, the next client waits.
        done = await reload(2)
        assert (done["changed"], done["restart_needed"]) == (["listener.max_connections"], [])
        assert daemon.open_connections == 3
        late = await anyio.connect_tcp(*daemon.listen_address)
        await late.send(b"late")
        await net.wait_for(lambda: accept_queue(port) == 1, what="the late client in the backlog")
        assert backend.accepted == 3 and waiting(late)
        # Raised: the waiting client is accepted at once, with every held one still open.
        await reload(10)
        await net.wait_for(lambda: backend.accepted == 4, what="the late client served")
        assert accept_queue(port) == 0
        assert await finish(net, late) == b"a:late"
        for number, stream in enumerate(held):
            assert await finish(net, stream) == b"a:held-%d" % number
    assert [line["connections"] for line in lab.logs.find("connection limit")][-2:] == [2, 10]
    (paused,) = lab.logs.find(PAUSED)
    assert (paused["open"], paused["limit"], paused["limited_by"]) == (3, 2, "max_connections")
    assert len(lab.logs.find(RESUMED)) == 1


async def test_a_reload_applies_a_new_backlog_at_once(net: Any, tmp_path: Path) -> None:
    # The backlog is the other half of the limit: how many clients wait. A
    # reload that changes it applies it to the listening socket at once (listen
    # again), or the reload would report a change it did not make.
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        path = tmp_path / "config.toml"
        daemon = await lab.daemon([backend.address], config_path=path, listener=limited(1))
        port = daemon.listen_address[1]
        held = await anyio.connect_tcp(*daemon.listen_address)
        await held.send(b"held")
        await net.wait_for(lambda: backend.accepted == 1)
        document = {"listener": {**limited(1), "backlog": 2}}
        net.write_config(path, {**document, "backends": [{"address": backend.address}]})
        done = dict(await daemon.reload())
        assert (done["changed"], done["restart_needed"]) == (["listener.backlog"], [])
        # Linux keeps backlog + 1 handshaken clients waiting, and drops the SYNs
        # beyond (the client would retry a second later).
        waiting = [await anyio.connect_tcp(*daemon.listen_address) for _ in range(3)]
        await net.wait_for(lambda: accept_queue(port) == 3, what="three clients waiting")
        with pytest.raises(TimeoutError), anyio.fail_after(0.5):
            waiting.append(await anyio.connect_tcp(*daemon.listen_address))
        assert accept_queue(port) == 3
        for stream in waiting:
            await stream.aclose()
        assert await finish(net, held) == b"a:held"
