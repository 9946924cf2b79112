"""The PROXY protocol end to end, on loopback: sent to backends, accepted from trusted clients.

Every backend here records the first bytes it receives, so a test reads
the header Loble sent (with the core's own parser) and the stream after it.
The main tests run on every data path and copy method, on asyncio (Loble's
loop and a plain one) and trio (``data_plane``). When ``haproxy`` is
installed, HAProxy with ``accept-proxy`` stands behind Loble's ``send_proxy``
and answers with the client address it read.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import tomli_w

from loble.config import load_config
from loble.core import HeaderParser, ProxyHeader, encode_v1, encode_v2, parse_config
from loble.io import Daemon
from loble.io._copy import BufferPool, CopyMethod
from loble.io._datapath import Link, ProxyState, send_preface

pytestmark = pytest.mark.anyio

REFUSED = "PROXY protocol header refused: closing the client"
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
"""Debian installs it in /usr/sbin, which a CI user's PATH may lack."""
CLIENT = ("203.0.113.7", 40123)
"""The client a trusted proxy's header names (TEST-NET-3: never a real peer here)."""
FRONT = ("198.51.100.9", 443)
"""The address that client connected to, as the header says."""


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd")) if sys.platform == "linux" else 0


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def header_and_rest(received: bytes) -> tuple[ProxyHeader, bytes]:
    """What a backend got: the PROXY header Loble sent, and the stream after it."""
    parser = HeaderParser()
    header = parser.feed(received)
    assert header is not None, received[:120]
    return header, parser.rest


def payload(size: int) -> bytes:
    block = bytes(range(251))  # a prime length: a byte lost or moved shows
    return (block * (size // len(block) + 1))[:size]


async def exchange(address: tuple[str, int], *parts: bytes) -> tuple[bytes, tuple[str, int]]:
    """Send ``parts`` (each its own write), EOF, read to the end; also the client's address."""
    with anyio.fail_after(10):
        async with await anyio.connect_tcp(*address) as stream:
            local = stream.extra(anyio.abc.SocketAttribute.local_address)
            for part in parts:
                await stream.send(part)
            await stream.send_eof()
            reply = b""
            while True:
                try:
                    reply += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    break
    return reply, (str(local[0]), int(local[1]))


async def start(lab: Any, document: dict[str, Any], **data_plane: str) -> Daemon:
    """A daemon for a whole configuration document (per-backend keys too), in ``lab``."""
    logger = logging.getLogger(f"loble.test.pp.{len(lab.daemons)}.{id(lab)}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(lab.logs)
    path = document.pop("_path", None)
    reload_from = None
    if path is not None:
        path.write_text(tomli_w.dumps(document), encoding="utf-8")
        reload_from = lambda: load_config(path)  # noqa: E731
    daemon = Daemon(parse_config(document), logger=logger, reload_from=reload_from, **data_plane)
    lab.daemons.append(daemon)

    async def run(*, task_status: Any) -> None:
        await daemon.run(handle_signals=False, task_status=task_status)

    await lab.tasks.start(run)
    return daemon


def errors(net: Any, daemon: Daemon) -> dict[str, float]:
    samples = net.samples(daemon.metrics.render().decode())
    return {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "loble_proxy_protocol_errors_total"
    }


# -- sending headers to backends ----------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_a_backend_sees_the_client_s_address_in_the_header_then_the_stream_intact(
    net: Any, data_plane: dict[str, str], version: str
) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon(
            [backend.address],
            balancer={"send_proxy": version},
            logging={"access_log": True},
            **data_plane,
        )
        data = payload(1 << 20)  # more than any buffer: backpressure behind the header
        reply, client = await exchange(daemon.listen_address, data[:1000], data[1000:])
        (received,) = backend.received
        header, rest = header_and_rest(received)
        assert header.version == int(version[1])
        assert header.source == client
        assert header.destination == daemon.listen_address
        assert rest == data
        assert reply == b"a:" + received
        await net.wait_for(lambda: lab.logs.find("connection"))
        (line,) = lab.logs.find("connection")
        assert line["client"] == f"{client[0]}:{client[1]}"
        assert line["bytes_to_backend"] == len(data)  # the header is Loble's, not the client's
        assert "via" not in line


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_over_ipv6_the_header_is_tcp6(net: Any, version: str) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("six", host="::1")
        daemon = await lab.daemon(
            [backend.address], listen="[::1]:0", balancer={"send_proxy": version}
        )
        _, client = await exchange(daemon.listen_address, b"hello")
        header, rest = header_and_rest(backend.received[0])
        assert (header.source, header.destination) == (client, daemon.listen_address)
        assert header.source is not None and header.source[0] == "::1"
        first = backend.received[0]
        assert first.startswith(b"PROXY TCP6 ::1 ::1 ") if version == "v1" else first[13] == 0x21
        assert rest == b"hello"


async def test_a_backend_s_own_send_proxy_overrides_the_balancer_s(net: Any) -> None:
    async with net.loopback() as lab:
        plain, one, two = [await lab.backend(name) for name in ("plain", "one", "two")]
        daemon = await start(
            lab,
            {
                "listener": {"address": "127.0.0.1:0"},
                "balancer": {"send_proxy": "v2"},
                "backends": [
                    {"address": plain.address, "send_proxy": "off"},
                    {"address": one.address, "send_proxy": "v1"},
                    {"address": two.address},
                ],
            },
        )
        for _ in range(3):
            await exchange(daemon.listen_address, b"data")
        assert plain.received == [b"data"]
        assert one.received[0].startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
        assert one.received[0].endswith(b"\r\ndata")
        assert two.received[0].startswith(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11")


# -- accepting headers from trusted clients -------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_a_trusted_client_s_header_names_the_client_everywhere(
    net: Any, data_plane: dict[str, str], version: str
) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon(
            [backend.address],
            listener={"accept_proxy_from": ["127.0.0.0/8"]},
            balancer={"send_proxy": "v2"},
            logging={"access_log": True},
            **data_plane,
        )
        header = encode_v1(CLIENT, FRONT) if version == "v1" else encode_v2(CLIENT, FRONT)
        data = os.urandom(1 << 20)
        # The header in two writes, the stream's first bytes in the same write as its end.
        reply, proxy = await exchange(
            daemon.listen_address, header[:7], header[7:] + data[:3000], data[3000:]
        )
        (received,) = backend.received
        sent, rest = header_and_rest(received)
        assert (sent.source, sent.destination) == (CLIENT, FRONT)
        assert hashlib.sha256(rest).digest() == hashlib.sha256(data).digest()
        assert reply == b"a:" + received
        await net.wait_for(lambda: lab.logs.find("connection"))
        (line,) = lab.logs.find("connection")
        assert line["client"] == "203.0.113.7:40123"
        assert line["via"] == f"{proxy[0]}:{proxy[1]}"
        assert line["bytes_to_backend"] == len(data)
        assert errors(net, daemon) == {"missing": 0, "malformed": 0, "timeout": 0, "closed": 0}


async def test_a_trusted_client_s_header_is_not_passed_on_without_send_proxy(
    net: Any, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon(
            [backend.address], listener={"accept_proxy_from": ["127.0.0.1/32"]}, **data_plane
        )
        reply, _ = await exchange(daemon.listen_address, encode_v2(CLIENT, FRONT) + b"just this")
        assert backend.received == [b"just this"]
        assert reply == b"a:just this"
        # LOCAL (a health check of the proxy in front): the connection's own address stands.
        reply, _ = await exchange(daemon.listen_address, encode_v2(None, None), b"local")
        assert reply == b"a:local"


async def test_a_malformed_header_closes_that_client_alone_with_a_line_and_a_count(
    net: Any, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon(
            [backend.address], listener={"accept_proxy_from": ["127.0.0.1/32"]}, **data_plane
        )
        data = payload(300_000)
        async with await anyio.connect_tcp(*daemon.listen_address) as other:
            # A connection under way while the bad ones come and go.
            await other.send(encode_v1(CLIENT, FRONT) + data[:1000])
            await net.wait_for(lambda: daemon.core.in_flight == 1)
            reply, _ = await exchange(daemon.listen_address, b"PROXY TCP4 1.2.3.4 bogus 1 2\r\nx")
            assert reply == b""
            reply, _ = await exchange(daemon.listen_address, b"GET / HTTP/1.1\r\n\r\n")
            assert reply == b""
            await other.send(data[1000:])
            await other.send_eof()
            assert await net.read_all(other) == b"a:" + data
        await net.wait_for(lambda: len(lab.logs.find(REFUSED)) == 2)
        malformed, missing = lab.logs.find(REFUSED)
        assert malformed["reason"] == "malformed"
        assert malformed["error"] == "v1 header: destination address 'bogus' is not an IPv4 address"
        assert malformed["client"].startswith("127.0.0.1:")
        assert missing["reason"] == "missing"
        assert missing["error"].startswith("not a PROXY protocol header: starts b'GET / HTTP/1.1")
        assert errors(net, daemon) == {"missing": 1, "malformed": 1, "timeout": 0, "closed": 0}
        assert backend.received == [data]  # the bad ones never reached a backend
        reply, _ = await exchange(daemon.listen_address, encode_v1(CLIENT, FRONT), b"after")
        assert reply == b"a:after"
        await net.wait_for(lambda: daemon.open_connections == 0)
        assert daemon.conductor is not None and daemon.conductor.holding == 0


async def test_a_trusted_client_that_sends_no_header_in_time_is_closed(
    net: Any, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon(
            [backend.address],
            listener={"accept_proxy_from": ["127.0.0.1/32"]},
            timeouts={"idle": 0.2},
            **data_plane,
        )
        gc.collect()  # sockets an earlier test left to the collector close now, not mid-test
        before = open_descriptors()
        for sent in (b"", b"PROXY TCP4 1.2.3.4"):
            with anyio.fail_after(10):
                async with await anyio.connect_tcp(*daemon.listen_address) as silent:
                    if sent:
                        await silent.send(sent)
                    assert await net.read_all(silent) == b""  # closed by Loble, not by us
        await net.wait_for(lambda: len(lab.logs.find(REFUSED, reason="timeout")) == 2)
        assert lab.logs.find(REFUSED)[0]["error"] == (
            "no complete header within 0.2 s ([timeouts] idle)"
        )
        # A client that hangs up half-way is one too.
        async with await anyio.connect_tcp(*daemon.listen_address) as gone:
            await gone.send(b"\r\n\r\n\x00\r\n")
            await gone.send_eof()
            await net.read_all(gone)
        await net.wait_for(lambda: errors(net, daemon)["closed"] == 1)
        assert errors(net, daemon) == {"missing": 0, "malformed": 0, "timeout": 2, "closed": 1}
        assert backend.accepted == 0
        await net.wait_for(lambda: daemon.conductor.holding == 0)  # type: ignore[union-attr]
        if sys.platform == "linux":
            await net.wait_for(lambda: open_descriptors() == before, what="no descriptor left")


async def test_a_client_outside_the_networks_is_never_read_as_a_header(
    net: Any, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon(
            [backend.address],
            listener={"accept_proxy_from": ["10.0.0.0/8", "::1/128"]},
            **data_plane,
        )
        looks_like_one = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhello"
        reply, _ = await exchange(daemon.listen_address, looks_like_one)
        assert backend.received == [looks_like_one]
        assert reply == b"a:" + looks_like_one
        assert errors(net, daemon)["malformed"] == 0


async def test_a_shutdown_closes_the_clients_still_sending_a_header(net: Any) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon(
            [backend.address], listener={"accept_proxy_from": ["127.0.0.1/32"]}
        )
        async with await anyio.connect_tcp(*daemon.listen_address) as waiting:
            await waiting.send(b"PROXY ")
            await net.wait_for(lambda: daemon.conductor.awaiting_header)  # type: ignore[union-attr]
            daemon.shutdown()
            assert await net.read_all(waiting) == b""
        await net.wait_for(lambda: daemon.finished)
        assert lab.logs.find(
            "shutdown: closing the clients whose PROXY protocol header is not complete", clients=1
        )
        assert backend.accepted == 0


async def test_a_reload_applies_both_keys_to_what_comes_after_it(net: Any, tmp_path: Path) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        document: dict[str, Any] = {
            "listener": {"address": "127.0.0.1:0"},
            "backends": [{"address": backend.address}],
        }
        daemon = await start(lab, {**document, "_path": tmp_path / "loble.toml"})
        looks_like_one = encode_v1(CLIENT, FRONT) + b"one"
        await exchange(daemon.listen_address, looks_like_one)
        assert backend.received == [looks_like_one]
        document["listener"] = {"address": "127.0.0.1:0", "accept_proxy_from": ["127.0.0.1/32"]}
        document["backends"] = [{"address": backend.address, "send_proxy": "v1"}]
        (tmp_path / "loble.toml").write_text(tomli_w.dumps(document), encoding="utf-8")
        result = await daemon.reload()
        assert result["changed"] == [
            "listener.accept_proxy_from",
            f"backends[{backend.address}].send_proxy",
        ]
        await exchange(daemon.listen_address, encode_v2(CLIENT, FRONT) + b"two")
        header, rest = header_and_rest(backend.received[1])
        assert (header.version, header.source, rest) == (1, CLIENT, b"two")


# -- the held preface, on a socket that takes nothing ---------------------------------------


def test_a_preface_the_backend_cannot_take_at_once_is_held_and_goes_first() -> None:
    client, client_peer = socket.socketpair()
    backend, backend_peer = socket.socketpair()
    pool = BufferPool(CopyMethod.RECV_INTO)
    try:
        for sock in (client, backend, client_peer, backend_peer):
            sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            while True:  # fill the backend's buffers: nothing more goes now
                backend.send(bytes(65536))
        link = Link(client)
        link.join(backend, "backend", pool)
        state = link.proxy_protocol = ProxyState()
        header = encode_v2(CLIENT, FRONT)
        state.preface, state.uncounted = header + b"early", len(header)
        assert send_preface(link) is True
        way = link.to_backend
        assert way is not None and way.pending == len(header) + 5
        client_peer.send(b"later")
        drained = 0
        with pytest.raises(BlockingIOError):
            while True:
                drained += len(backend_peer.recv(1 << 20))
        way.pump()  # the held bytes first, then (a wakeup later) the client's
        way.pump()
        seen = backend_peer.recv(1 << 16)
        parsed, rest = header_and_rest(seen)
        assert parsed.source == CLIENT
        assert rest == b"earlylater"
        assert way.total == len(b"earlylater")  # the header is not the client's bytes
    finally:
        for sock in (client, client_peer, backend, backend_peer):
            sock.close()
        pool.close()


# -- HAProxy behind Loble --------------------------------------------------------------------


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_haproxy_with_accept_proxy_sees_the_original_client(
    net: Any, tmp_path: Path, version: str
) -> None:
    # HAProxy serves a socket bound here (port 0: the OS picks), inherited as fd@N:
    # no port to guess, none another process can take first.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "\n".join(
            [
                "global",
                "    log stderr format raw local0",
                "defaults",
                "    mode http",
                "    log global",
                "    timeout client 10s",
                "    timeout connect 10s",
                "    timeout server 10s",
                "frontend behind_loble",
                f"    bind fd@{listener.fileno()} accept-proxy",
                '    log-format "seen %ci:%cp"',
                "    http-request return status 200 content-type text/plain "
                'lf-string "%[src]:%[src_port]"',
                "",
            ]
        ),
        encoding="utf-8",
    )
    assert HAPROXY is not None
    command = [HAPROXY, "-db", "-f", str(config)]
    async with await anyio.open_process(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=[listener.fileno()]
    ) as haproxy:
        listener.close()  # HAProxy's now
        logged: list[str] = []

        async def read_log() -> None:
            assert haproxy.stderr is not None
            async for chunk in haproxy.stderr:
                logged.extend(chunk.decode(errors="replace").splitlines())

        try:
            async with net.loopback() as lab:
                lab.tasks.start_soon(read_log)
                daemon = await lab.daemon([f"127.0.0.1:{port}"], balancer={"send_proxy": version})
                # Connects wait in the socket's backlog until HAProxy accepts them.
                request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                reply, client = await exchange(daemon.listen_address, request)
                assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
                assert reply.endswith(f"{client[0]}:{client[1]}".encode()), reply
                assert client[1] != port
                # HAProxy's own log line names the client too, not Loble.
                seen = f"seen {client[0]}:{client[1]}"
                await net.wait_for(lambda: seen in logged, what=f"{seen!r} in {logged}")
        finally:
            haproxy.kill()
            with anyio.CancelScope(shield=True):
                await haproxy.wait()
