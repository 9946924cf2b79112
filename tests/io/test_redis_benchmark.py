"""Real protocols through Loble: ``redis-benchmark`` against a real Redis.

``redis-benchmark`` sends SET, GET, INCR and LPUSH through Loble, 20,000 of
each from 20 clients, 4 pipelined at a time; it exits non-zero at the first
error reply or lost connection. Every request must be answered, and Redis,
asked directly, must hold exactly what they did: the INCR counter at 20,000,
the LPUSH list 20,000 long. Skipped, saying why, when ``redis-server`` or
``redis-benchmark`` is not installed (Debian's ``redis-server``, which pulls
in ``redis-tools``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

REDIS_SERVER = shutil.which("redis-server")
REDIS_BENCHMARK = shutil.which("redis-benchmark")

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        REDIS_SERVER is None or REDIS_BENCHMARK is None,
        reason="redis-server and redis-benchmark are not installed (apt-get install redis-server)",
    ),
    # On the loop `loble run` uses, each data path with its default copy: every
    # loop x path x copy would take 15 s; their byte moving is the TLS test's.
    pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True),
    pytest.mark.parametrize("data_path", ["callbacks", "tasks"]),
]

TESTS = ("SET", "GET", "INCR", "LPUSH")
REQUESTS, CLIENTS, PIPELINE = 20_000, 20, 4


async def ask(port: int, *words: bytes) -> Any:
    """One command on a fresh connection to 127.0.0.1:``port``: its reply
    (simple string, integer or bulk string; an error reply fails)."""
    request = b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        reply = b""
        while not reply.endswith(b"\r\n") or (reply[:1] == b"$" and reply.count(b"\r\n") < 2):
            reply += await stream.receive()
    kind, line = reply[:1], reply[1:].split(b"\r\n")[0]
    if kind == b"+":
        return line
    if kind == b":":
        return int(line)
    if kind == b"$":
        return None if line == b"-1" else reply.split(b"\r\n")[1]
    raise AssertionError(f"redis answered {reply!r}")


async def answers(port: int) -> bool:
    try:
        return bool(await ask(port, b"PING") == b"PONG")
    except OSError:
        return False


@asynccontextmanager
async def redis_server(net: Any) -> AsyncIterator[int]:
    """A ``redis-server`` on 127.0.0.1, nothing saved; yields its port once it answers."""
    assert REDIS_SERVER is not None
    port = net.free_port()
    arguments = [
        REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port),
        "--save", "", "--appendonly", "no", "--logfile", "",
    ]  # fmt: skip
    async with await anyio.open_process(
        arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ) as process:
        try:
            await net.wait_for(lambda: answers(port), what=f"redis serving on port {port}")
            yield port
        finally:
            process.terminate()
            with anyio.CancelScope(shield=True):
                await process.wait()


async def test_redis_benchmark_through_loble(net: Any, data_path: str) -> None:
    assert REDIS_BENCHMARK is not None
    async with net.loopback() as lab, redis_server(net) as redis:
        backend = f"127.0.0.1:{redis}"
        daemon = await lab.daemon([backend], data_path=data_path)
        command = [
            REDIS_BENCHMARK, "-h", "127.0.0.1", "-p", str(daemon.listen_address[1]),
            "-t", ",".join(TESTS).lower(), "-n", str(REQUESTS), "-c", str(CLIENTS),
            "-P", str(PIPELINE), "--csv",
        ]  # fmt: skip
        with anyio.fail_after(60):
            done = await anyio.run_process(command, check=False)
        out, err = done.stdout.decode(), done.stderr.decode()
        # It stops at the first error reply or lost connection, exiting 1.
        assert done.returncode == 0, f"redis-benchmark exited {done.returncode}:\n{out}\n{err}"
        assert err == "", err
        rows = list(csv.DictReader(out.splitlines()))
        assert [row["test"] for row in rows] == list(TESTS), out
        assert all(float(row["rps"]) > 0 for row in rows), out

        # Asked directly, not through Loble: every request did its work, once.
        assert await ask(redis, b"GET", b"counter:__rand_int__") == b"%d" % REQUESTS
        assert await ask(redis, b"LLEN", b"mylist") == REQUESTS
        value = await ask(redis, b"GET", b"key:__rand_int__")
        assert isinstance(value, bytes) and len(value) == 3, value  # -d's default size
        assert await ask(redis, b"DBSIZE") == 3

        await net.wait_for(lambda: daemon.open_connections == 0, what="every connection ended")
        figures = daemon.metrics.figures(backend)
        # Each benchmark client's connection (and its config query's) ended cleanly.
        assert set(figures["connections"]) == {"completed"}, figures
        assert figures["connections"]["completed"] > CLIENTS * len(TESTS), figures
        print(
            f"\nredis-benchmark through Loble ({data_path}): {len(TESTS)} x {REQUESTS} "
            f"requests answered, counter and list exact; {figures['connections']} connections; "
            + ", ".join(f"{row['test']} {float(row['rps']):.0f}/s" for row in rows)
        )
