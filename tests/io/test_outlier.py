"""Outlier ejection end to end, on loopback: what an operator sees and what clients feel.

A backend that resets a fifth of its connections passes every connect and
probe; the rate rule ejects it (the warning line, the gauge, no new
connections) and its time brings it back. A pending connect on a
blackholed backend is redispatched once the backend is judged bad, instead
of waiting out the connect timeout. A backend that accepts and never
answers is judged by the first-byte timeout, on every data path and copy
method.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import tomllib
from anyio.abc import SocketStream

pytestmark = pytest.mark.anyio

METRICS = {"enabled": True, "address": "127.0.0.1:0"}
RESET = struct.pack("ii", 1, 0)


class Served:
    """A backend on an OS-picked loopback port; each connection goes to ``_handle``."""

    def __init__(self) -> None:
        self.accepted = 0
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self._handle)

    async def _handle(self, stream: SocketStream) -> None:
        raise NotImplementedError


class FlakyBackend(Served):
    """Answers ``name:`` plus the request, except every ``every``-th connection,
    which it resets once the request is in (a crashing worker behind a live port)."""

    def __init__(self, name: str, every: int) -> None:
        super().__init__()
        self.name = name
        self.every = every

    async def _handle(self, stream: SocketStream) -> None:
        self.accepted += 1
        doomed = self.accepted % self.every == 0
        async with stream:
            data = b""
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                while True:
                    data += await stream.receive()
            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            if doomed:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                return
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await stream.send(self.name.encode() + b":" + data)
                await stream.send_eof()


class SilentBackend(Served):
    """Accepts, reads, and never sends a byte nor closes (a hung worker)."""

    async def _handle(self, stream: SocketStream) -> None:
        self.accepted += 1
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                while True:
                    await stream.receive()


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """A loopback address whose SYNs are dropped: a listener with backlog 0, filled by
    a connection of our own, as a full backlog does (tests/io/fidelity_backend.py)."""
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(0)
    port = sink.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=1.0)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        filler.close()
        sink.close()


async def gauge(net: Any, daemon: Any, name: str, backend: str) -> float:
    _, body = await net.scrape(daemon.metrics_address)
    return float(net.samples(body)[(name, frozenset({("backend", backend)}))])


async def test_a_backend_that_resets_a_fifth_of_its_connections_is_ejected_then_returns(
    net: Any,
) -> None:
    async with net.loopback() as loop:
        flaky = FlakyBackend("flaky", every=5)
        await loop.tasks.start(flaky.serve)
        good = await loop.backend("good")
        daemon = await loop.daemon(
            [flaky.address, good.address],
            outlier={
                "failure_rate": 0.1,
                "interval": 0.5,
                "minimum_connections": 5,
                "base_ejection_time": 2.0,
            },
            metrics=METRICS,
        )
        # From start-up, at zero: every backend's series.
        for backend in (flaky.address, good.address):
            assert await gauge(net, daemon, "loble_backend_ejected", backend) == 0
            assert await gauge(net, daemon, "loble_outlier_ejections_total", backend) == 0
            assert await gauge(net, daemon, "loble_connect_redispatched_total", backend) == 0
        # Its connects all succeed: health never sees anything wrong.
        started, requests = time.perf_counter(), 0
        with anyio.fail_after(10):
            while not loop.logs.find("backend ejected: outlier", backend=flaky.address):
                await net.request(daemon.listen_address)
                requests += 1
        print(f"ejected after {requests} requests, {time.perf_counter() - started:.3f} s")
        (line,) = loop.logs.find("backend ejected: outlier", backend=flaky.address)
        assert line["ejections"] == 1
        assert 0 < line["until_seconds"] <= 2.0
        assert "failure rate" in line["reason"]
        assert await gauge(net, daemon, "loble_backend_ejected", flaky.address) == 1
        assert await gauge(net, daemon, "loble_outlier_ejections_total", flaky.address) == 1
        assert daemon.core.control.state(flaky.address).value == "healthy"
        status = daemon.core.statistics()
        (ejected,) = [b for b in status.backends if b.ejected_until is not None]
        assert ejected.address == flaky.address
        # While ejected, no new connection reaches it.
        before = flaky.accepted
        for _ in range(20):
            assert (await net.request(daemon.listen_address)).startswith(b"good:")
        assert flaky.accepted == before
        # Its time brings it back.
        ejected_at = time.perf_counter()
        await net.wait_for(
            lambda: loop.logs.find("backend returned from ejection", backend=flaky.address),
            what="the return",
        )
        print(f"returned {time.perf_counter() - ejected_at:.3f} s after 20 requests")
        assert await gauge(net, daemon, "loble_backend_ejected", flaky.address) == 0
        seen = {(await net.request(daemon.listen_address)).split(b":")[0] for _ in range(4)}
        assert b"flaky" in seen


async def connect_latencies(net: Any, loop: Any, redispatch: bool) -> list[float]:
    """Seconds from connect to the reply for clients, half of them sent first to a
    blackholed backend that active probes find within 0.3 s; connect timeout 3 s."""
    good = await loop.backend("good")
    with blackhole() as hole:
        daemon = await loop.daemon(
            [hole, good.address],
            health={
                "active": True,
                "probe_interval": 0.3,
                "probe_timeout": 0.3,
                "failure_threshold": 1,
            },
            timeouts={"connect": 3.0},
            outlier={"redispatch_pending": redispatch},
        )
        latencies: list[float] = []

        async def client() -> None:
            started = time.perf_counter()
            reply = await net.request(daemon.listen_address)
            assert reply.startswith(b"good:")
            latencies.append(time.perf_counter() - started)

        async with anyio.create_task_group() as clients:
            for _ in range(6):
                clients.start_soon(client)
        redispatched = loop.logs.find("connect redispatched", backend=hole)
        assert len(redispatched) == (3 if redispatch else 0)
        while not daemon.core.stopped:
            daemon.shutdown()
        await net.wait_for(lambda: daemon.finished)
    return sorted(latencies)


async def test_pending_connects_on_a_blackholed_backend_are_redispatched(net: Any) -> None:
    async with net.loopback() as loop:
        waiting = await connect_latencies(net, loop, redispatch=False)
    async with net.loopback() as loop:
        moved = await connect_latencies(net, loop, redispatch=True)
    print(f"slowest client: {waiting[-1]:.3f} s waiting, {moved[-1]:.3f} s redispatched")
    assert waiting[-1] >= 2.9  # the whole connect timeout
    assert moved[-1] < 1.0  # the probe's verdict, then another backend
    assert moved[-1] * 3 < waiting[-1]


async def test_a_silent_backend_is_judged_within_the_first_byte_timeout(
    net: Any, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as loop:
        silent = SilentBackend()
        await loop.tasks.start(silent.serve)
        # A backend that speaks first is never watched: its greeting is its answer.
        talker = await loop.backend("talker", mode="greet")
        daemon = await loop.daemon(
            [silent.address, talker.address],
            outlier={"first_byte_timeout": 0.3, "consecutive_resets": 1},
            metrics=METRICS,
            **data_plane,
        )
        assert daemon.core.watches_first_byte
        streams = []
        with anyio.fail_after(5):
            spoke = time.perf_counter()  # before any client byte reaches a backend
            for _ in range(2):  # round robin: one on each
                stream = await anyio.connect_tcp(*daemon.listen_address)
                streams.append(stream)
                await stream.send(b"hello")
            await net.wait_for(lambda: silent.accepted == 1 and talker.accepted == 1)
        await net.wait_for(
            lambda: loop.logs.find("backend ejected: outlier", backend=silent.address),
            timeout=2.0,
            what="the silent backend's verdict",
        )
        judged = time.perf_counter() - spoke
        print(f"judged {judged:.3f} s after the client spoke")
        assert 0.3 <= judged < 1.0
        assert not loop.logs.find("backend ejected: outlier", backend=talker.address)
        assert await gauge(net, daemon, "loble_backend_ejected", silent.address) == 1
        assert loop.logs.find(
            "backend ejected: outlier",
            backend=silent.address,
            reason="1 consecutive first-byte timeouts",
        )
        assert loop.logs.find("backend silent past first_byte_timeout", backend=silent.address)
        assert daemon.metrics.first_byte_timeouts.labels(silent.address)._value.get() == 1
        assert daemon.metrics.first_byte_timeouts.labels(talker.address)._value.get() == 0
        # The connection itself is left alone.
        assert daemon.core.statistics().in_flight == 2
        for stream in streams:
            await stream.aclose()


async def test_first_bytes_cost_nothing_when_the_timeout_is_off(net: Any) -> None:
    async with net.loopback() as loop:
        backend = await loop.backend("a")
        daemon = await loop.daemon([backend.address])
        assert not daemon.core.watches_first_byte
        conductor = daemon.conductor
        assert conductor.active == conductor._active
        assert (await net.request(daemon.listen_address)).startswith(b"a:")


async def test_a_reload_turns_the_first_byte_watch_on_and_drops_a_removed_backends_gauge(
    net: Any, tmp_path: Path
) -> None:
    async with net.loopback() as loop:
        silent = SilentBackend()
        await loop.tasks.start(silent.serve)
        talker = await loop.backend("talker", mode="greet")
        gone = await loop.backend("gone")
        path = tmp_path / "loble.toml"
        daemon = await loop.daemon(
            [silent.address, talker.address, gone.address], config_path=path, metrics=METRICS
        )
        conductor = daemon.conductor
        assert conductor.active == conductor._active
        assert await gauge(net, daemon, "loble_backend_ejected", gone.address) == 0
        document = tomllib.loads(path.read_text(encoding="utf-8"))
        document["backends"] = document["backends"][:2]
        document["outlier"] = {"first_byte_timeout": 0.3, "consecutive_resets": 1}
        net.write_config(path, document)
        await daemon.reload()
        assert conductor.active == conductor._active_watching
        _, body = await net.scrape(daemon.metrics_address)
        series = net.samples(body)
        assert ("loble_backend_ejected", frozenset({("backend", gone.address)})) not in series
        # The connections after it are watched: the silent backend is judged.
        streams = []
        for _ in range(2):
            stream = await anyio.connect_tcp(*daemon.listen_address)
            streams.append(stream)
            await stream.send(b"hello")
        await net.wait_for(
            lambda: loop.logs.find("backend ejected: outlier", backend=silent.address),
            what="the silent backend's verdict",
        )
        for stream in streams:
            await stream.aclose()
