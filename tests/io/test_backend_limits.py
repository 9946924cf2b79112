"""``[[backends]] max_connections`` and the queue on real sockets.

A backend at its limit is skipped; with every backend at its limit the next
client is accepted and waits in Loble's queue (it sends its bytes, nothing
reaches a backend) until a connection ends, or is refused with a FIN at its
``queue_timeout``, counted as ``queue_timeout`` and logged once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
import tomli_w
import tomllib

from loble.core import Outcome

from .conftest import outcomes, read_all, request, scrape

pytestmark = pytest.mark.anyio


async def test_a_full_backend_is_skipped_and_then_clients_wait_their_turn(net: Any) -> None:
    async with net.loopback() as loop:
        a, b = await loop.backend("a"), await loop.backend("b")
        daemon = await loop.daemon(
            [a.address, b.address],
            limits={a.address: 1},
            balancer={"queue_timeout": 60.0},
        )
        control = daemon.core.control
        async with await anyio.connect_tcp(*daemon.listen_address):
            await net.wait_for(lambda: control.active_connections(a.address) == 1)
            # a is full: every other client goes to b, none waits.
            replies = [await request(daemon.listen_address, b"x") for _ in range(4)]
            assert replies == [b"b:x"] * 4
            assert daemon.core.queued == 0
        await net.wait_for(lambda: control.active_connections(a.address) == 0)


async def test_with_every_backend_full_a_client_waits_then_is_served(net: Any) -> None:
    async with net.loopback() as loop:
        a = await loop.backend("a")
        daemon = await loop.daemon(
            [a.address],
            limits={a.address: 1},
            balancer={"queue_timeout": 60.0},
            metrics={"enabled": True, "address": "127.0.0.1:0"},
        )
        held = await anyio.connect_tcp(*daemon.listen_address)
        await net.wait_for(lambda: daemon.core.control.active_connections(a.address) == 1)
        with anyio.fail_after(30):
            async with await anyio.connect_tcp(*daemon.listen_address) as waiting:
                await waiting.send(b"queued")
                await waiting.send_eof()
                await net.wait_for(lambda: daemon.core.queued == 1)
                assert a.accepted == 1  # the waiting client reached no backend
                _, text = await scrape(daemon.metrics_address)
                assert "loble_queue_length 1.0" in text
                assert f'loble_backend_max_connections{{backend="{a.address}"}} 1.0' in text
                await held.send_eof()  # the first client ends: the waiting one goes
                assert await read_all(held) == b"a:"
                await held.aclose()
                assert await read_all(waiting) == b"a:queued"
        assert daemon.core.queued == 0
        assert outcomes(daemon, Outcome.COMPLETED) == 2
        assert loop.logs.find("backends at max_connections: clients queued", clients=1)
        _, text = await scrape(daemon.metrics_address)
        assert "loble_queued_total 1.0" in text


async def test_a_client_that_waits_its_queue_timeout_gets_a_fin_and_is_counted(
    net: Any,
) -> None:
    async with net.loopback() as loop:
        a = await loop.backend("a")
        daemon = await loop.daemon(
            [a.address],
            limits={a.address: 1},
            balancer={"queue_timeout": 0.2, "queue_size": 1},
        )
        async with await anyio.connect_tcp(*daemon.listen_address):
            await net.wait_for(lambda: daemon.core.control.active_connections(a.address) == 1)
            waiting = anyio.create_memory_object_stream[bytes](1)
            async with anyio.create_task_group() as tasks:

                async def wait_in_queue() -> None:
                    await waiting[0].send(await request(daemon.listen_address, b"late"))

                tasks.start_soon(wait_in_queue)
                await net.wait_for(lambda: daemon.core.queued == 1)
                # The queue holds one: the next client is refused at once.
                assert await request(daemon.listen_address, b"extra") == b""
                assert outcomes(daemon, Outcome.QUEUE_FULL) == 1
                assert await waiting[1].receive() == b""  # an orderly close, no reply
            assert outcomes(daemon, Outcome.QUEUE_TIMEOUT) == 1
            assert a.accepted == 1
        assert loop.logs.find("queue timeout: refusing clients that waited too long", clients=1)
        assert loop.logs.find("queue full: refusing clients at once", clients=1)


async def test_a_reload_that_raises_the_limit_serves_the_waiting_client(
    net: Any, tmp_path: Path
) -> None:
    async with net.loopback() as loop:
        a = await loop.backend("a")
        config = tmp_path / "loble.toml"
        daemon = await loop.daemon(
            [a.address],
            limits={a.address: 1},
            balancer={"queue_timeout": 60.0},
            config_path=config,
        )
        async with await anyio.connect_tcp(*daemon.listen_address):
            await net.wait_for(lambda: daemon.core.control.active_connections(a.address) == 1)
            async with await anyio.connect_tcp(*daemon.listen_address) as waiting:
                await waiting.send(b"reloaded")
                await waiting.send_eof()
                await net.wait_for(lambda: daemon.core.queued == 1)
                document = tomllib.loads(config.read_text())
                document["backends"][0]["max_connections"] = 2
                config.write_text(tomli_w.dumps(document))
                await daemon.reload()
                with anyio.fail_after(10):
                    assert await read_all(waiting) == b"a:reloaded"
        assert loop.logs.find(
            "configuration reloaded", changed=f"backends[{a.address}].max_connections"
        )


async def test_the_admin_api_sets_a_limit_live_and_a_raised_one_serves_the_queue(
    net: Any,
) -> None:
    token = "limits-token"
    async with net.loopback() as loop:
        a = await loop.backend("a")
        daemon = await loop.daemon(
            [a.address],
            admin={"enabled": True, "address": "127.0.0.1:0", "token": token},
            balancer={"queue_timeout": 60.0},
        )
        admin = daemon.admin_address
        path = f"/backends/{a.address}/max_connections"
        status, done = await net.admin_call(
            admin, "POST", path, token=token, body={"max_connections": 1}
        )
        assert (status, done["max_connections"]) == (200, 1)
        assert loop.logs.find("backend max_connections changed", backend=a.address, old=0, new=1)
        async with await anyio.connect_tcp(*daemon.listen_address):
            await net.wait_for(lambda: daemon.core.control.active_connections(a.address) == 1)
            async with await anyio.connect_tcp(*daemon.listen_address) as waiting:
                await waiting.send(b"live")
                await waiting.send_eof()
                await net.wait_for(lambda: daemon.core.queued == 1)
                _, body = await net.admin_call(admin, "GET", "/status")
                assert body["queued"] == 1
                assert net.backend_of(body, a.address)["max_connections"] == 1
                status, done = await net.admin_call(
                    admin, "POST", f"{path}?max_connections=0", token=token
                )
                assert (status, done["max_connections"]) == (200, 0)  # no limit: it goes
                with anyio.fail_after(10):
                    assert await read_all(waiting) == b"a:live"
        for bad, problem in (
            ({"max_connections": -1}, "max_connections -1 must be >= 0"),
            ({"max_connections": "many"}, "max_connections: 'many' is not a whole number"),
        ):
            status, refused = await net.admin_call(admin, "POST", path, token=token, body=bad)
            assert status == 400 and problem in refused["error"], refused
