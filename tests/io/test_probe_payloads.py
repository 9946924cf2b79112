"""Payload probes end to end, on real sockets: what takes a backend out.

Small servers of the test's own answer a probe rightly, wrongly, by closing,
by speaking first, or with an endless stream; the daemon's probes must pass
or fail each for its reason (the ``probe`` log line, the metric). Then real
``redis-server`` processes (skipped, saying why, when it is not installed;
``.ci/run`` installs it): a Redis frozen with SIGSTOP still completes TCP
handshakes, so connect-only probes keep it HEALTHY while its clients stall,
and a ``PING``/``+PONG`` probe takes it out within ``failure_threshold *
(interval + timeout)`` and brings it back after SIGCONT. Every wait is for
a condition, with a bound.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from loble.core import HealthState

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"
)

pytestmark = pytest.mark.anyio

FAST = {"active": True, "probe_interval": 0.1, "probe_timeout": 0.05, "failure_threshold": 2}


class Speaker:
    """A loopback server that answers every connection the same way.

    ``reply`` is sent after the first bytes it reads, or at once with
    ``first`` (a server that speaks first); ``close`` closes at once instead.
    """

    def __init__(self, reply: bytes = b"", *, first: bool = False, close: bool = False) -> None:
        self.reply, self.first, self.close = reply, first, close
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, *, task_status: Any) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self._answer)

    async def _answer(self, stream: SocketStream) -> None:
        async with stream:
            try:
                if self.close:
                    return
                if not self.first:
                    await stream.receive()
                await stream.send(self.reply)
                while True:  # until the prober hangs up
                    await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                pass


async def speakers(lab: Any, *servers: Speaker) -> list[str]:
    for server in servers:
        await lab.tasks.start(server.serve)
    return [server.address for server in servers]


def state(daemon: Any, address: str) -> HealthState:
    (found,) = [b for b in daemon.core.statistics().backends if b.address == address]
    return found.state


def probe_count(daemon: Any, address: str, *, result: str = "", reason: str = "") -> float:
    """The daemon's count of probes of ``address`` by result, or of failures by reason."""
    counter = daemon.metrics.probe_failures if reason else daemon.metrics.probes
    label, value = ("reason", reason) if reason else ("result", result)
    return sum(
        sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
        and sample.labels["backend"] == address
        and sample.labels[label] == value
    )


def failed_for(lab: Any, address: str) -> set[str]:
    """The reasons the ``probe`` log lines gave for failures of ``address``."""
    return {line["reason"] for line in lab.logs.find("probe", backend=address, ok=False)}


async def test_a_reply_that_does_not_match_or_a_close_takes_a_backend_out(net: Any) -> None:
    async with net.loopback() as lab:
        pong, wrong, closer = await speakers(
            lab, Speaker(b"+PONG\r\n"), Speaker(b"-ERR unknown\r\n"), Speaker(close=True)
        )
        daemon = await lab.daemon(
            [pong, wrong, closer],
            health={**FAST, "probe_send": "PING\r\n", "probe_expect": "+PONG"},
        )
        await net.wait_for(
            lambda: state(daemon, wrong) is state(daemon, closer) is HealthState.UNHEALTHY,
            what="the wrong reply and the close taking their backends out",
        )
        await net.wait_for(lambda: probe_count(daemon, pong, result="success") >= 3)
        assert state(daemon, pong) is HealthState.HEALTHY
        assert probe_count(daemon, pong, result="failure") == 0
        assert failed_for(lab, wrong) == {"reply did not match"}
        assert failed_for(lab, closer) == {"closed before the reply matched"}
        assert probe_count(daemon, wrong, reason="mismatch") >= 2
        assert probe_count(daemon, closer, reason="closed") >= 2
        assert daemon.core.snapshot.addresses == (pong,)


async def test_a_pattern_and_a_server_that_speaks_first(net: Any) -> None:
    async with net.loopback() as lab:
        banner, refusal, chatty = await speakers(
            lab,
            Speaker(b"220 mail.example ESMTP ready\r\n", first=True),
            Speaker(b"554 no service\r\n", first=True),
            Speaker(b"x" * 65536, first=True),  # never the pattern: judged at 16 KiB
        )
        daemon = await lab.daemon(
            [banner, refusal, chatty], health={**FAST, "probe_expect_regex": r"^220 .*ESMTP"}
        )
        await net.wait_for(
            lambda: state(daemon, refusal) is state(daemon, chatty) is HealthState.UNHEALTHY,
            what="the 554 banner and the endless stream taking their backends out",
        )
        await net.wait_for(lambda: probe_count(daemon, banner, result="success") >= 3)
        assert state(daemon, banner) is HealthState.HEALTHY
        # A pattern not found yet waits for more (the reply may be unfinished):
        # the 554 banner fails at the timeout, the stream at the byte bound.
        assert failed_for(lab, refusal) == {"timed out awaiting the reply"}
        assert failed_for(lab, chatty) == {"reply did not match"}


# -- real Redis, frozen -------------------------------------------------------------------


class Redis:
    """A ``redis-server`` on a loopback port; :meth:`freeze` and :meth:`thaw` it."""

    def __init__(self, process: Any, port: int, name: str) -> None:
        self.process, self.port, self.name = process, port, name

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def freeze(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)


async def ping(address: tuple[str, int]) -> bytes:
    async with await anyio.connect_tcp(*address) as stream:
        await stream.send(b"PING\r\n")
        return await stream.receive()


async def served_by(address: tuple[str, int]) -> str:
    """One short client connection through Loble: which redis answered ``GET name``."""
    async with await anyio.connect_tcp(*address) as stream:
        await stream.send(b"GET name\r\n")
        reply = b""
        while reply.count(b"\r\n") < 2:
            reply += await stream.receive()
        return reply.split(b"\r\n")[1].decode()


@asynccontextmanager
async def redis(net: Any, name: str) -> AsyncIterator[Redis]:
    assert REDIS_SERVER is not None
    port = net.free_port()
    arguments = [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port)]
    arguments += ["--save", "", "--appendonly", "no", "--logfile", ""]
    async with await anyio.open_process(
        arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ) as process:
        server = Redis(process, port, name)
        try:

            async def answers() -> bool:
                try:
                    return await ping(("127.0.0.1", port)) == b"+PONG\r\n"
                except OSError:
                    return False

            await net.wait_for(answers, what=f"{name} serving on port {port}")
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(f"SET name {name}\r\n".encode())
                assert await stream.receive() == b"+OK\r\n"
            yield server
        finally:
            server.thaw()  # a stopped process would hold SIGTERM until continued
            process.terminate()
            with anyio.CancelScope(shield=True):
                await process.wait()


one_loop = pytest.mark.parametrize("anyio_backend", ["asyncio"])
"""The Redis tests take seconds: one loop (the fast tests above run the probe on every one)."""

REDIS_HEALTH = {
    "active": True,
    "probe_interval": 0.2,
    "probe_timeout": 0.1,
    "failure_threshold": 2,
    "success_threshold": 2,
}


@needs_redis
@one_loop
async def test_a_frozen_redis_is_taken_out_by_a_ping_probe_and_comes_back(net: Any) -> None:
    async with net.loopback() as lab, AsyncExitStack() as stack:
        first = await stack.enter_async_context(redis(net, "redis-1"))
        second = await stack.enter_async_context(redis(net, "redis-2"))
        daemon = await lab.daemon(
            [first.address, second.address],
            health={**REDIS_HEALTH, "probe_send": "PING\r\n", "probe_expect": "+PONG"},
        )
        await net.wait_for(lambda: probe_count(daemon, first.address, result="success") >= 1)

        first.freeze()
        frozen_at = anyio.current_time()
        await net.wait_for(
            lambda: state(daemon, first.address) is HealthState.UNHEALTHY,
            what="the frozen redis UNHEALTHY",
        )
        took = anyio.current_time() - frozen_at
        # Two failed probes: up to one interval before the first goes, each a
        # timeout long, an interval apart; the loop's lateness on top.
        bound = 2 * (0.2 + 0.1)
        assert took <= bound + 0.25, f"{took:.3f} s to take it out, more than {bound} s"
        assert failed_for(lab, first.address) == {"timed out awaiting the reply"}
        assert probe_count(daemon, first.address, reason="reply_timeout") >= 2
        # New clients go to the other redis, none stalls on the frozen one.
        with anyio.fail_after(5):
            assert {await served_by(daemon.listen_address) for _ in range(4)} == {"redis-2"}

        first.thaw()
        await net.wait_for(
            lambda: state(daemon, first.address) is HealthState.HEALTHY,
            what="the thawed redis HEALTHY again",
        )
        with anyio.fail_after(5):
            back = [await served_by(daemon.listen_address) for _ in range(4)]
        assert sorted(back) == ["redis-1", "redis-1", "redis-2", "redis-2"]


@needs_redis
@one_loop
async def test_connect_only_probes_keep_a_frozen_redis_healthy(net: Any) -> None:
    """The reason for payload probes: the kernel completes handshakes for a
    stopped process, so every connect-only probe passes and clients stall."""
    async with net.loopback() as lab, AsyncExitStack() as stack:
        first = await stack.enter_async_context(redis(net, "redis-1"))
        second = await stack.enter_async_context(redis(net, "redis-2"))
        daemon = await lab.daemon([first.address, second.address], health=REDIS_HEALTH)
        first.freeze()
        passed = probe_count(daemon, first.address, result="success")
        await net.wait_for(
            lambda: probe_count(daemon, first.address, result="success") >= passed + 3,
            what="three connect-only probes of the frozen redis passing",
        )
        assert state(daemon, first.address) is HealthState.HEALTHY
        assert probe_count(daemon, first.address, result="failure") == 0
        # Round robin sends one of two clients to it: that one gets no answer.
        answered: list[str] = []
        with anyio.move_on_after(0.5) as stalled:
            for _ in range(2):
                answered.append(await served_by(daemon.listen_address))
        assert stalled.cancelled_caught and len(answered) <= 1
