"""Traffic policy end to end, on loopback: consistent hashing, slow start, backups, panic.

Clients come from different loopback addresses (127.0.0.0/8 is all
loopback on Linux: a client socket binds 127.0.0.N before it connects), so
the daemon hashes each as a different client. Each backend answers its
name, so a reply says where the client went.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
import tomli_w
import tomllib

from loble.core import HealthState

pytestmark = pytest.mark.anyio

CLIENTS = [f"127.0.0.{n}" for n in range(10, 40)]


async def served_by(address: tuple[str, int], source: str = "127.0.0.1") -> str:
    """The name of the backend that answered one request from ``source``."""
    with anyio.fail_after(10):
        async with await anyio.connect_tcp(*address, local_host=source) as stream:
            await stream.send(b"hi")
            await stream.send_eof()
            reply = b""
            while True:
                try:
                    reply += await stream.receive()
                except anyio.EndOfStream:
                    break
    return reply.split(b":", 1)[0].decode()


@pytest.mark.parametrize("algorithm", ["maglev", "ring_hash"])
async def test_two_daemons_send_each_client_to_the_same_backend(net: Any, algorithm: str) -> None:
    async with net.loopback() as loop:
        backends = [await loop.backend(name) for name in ("a", "b", "c", "d")]
        addresses = [backend.address for backend in backends]
        one = await loop.daemon(addresses, balancer={"algorithm": algorithm})
        other = await loop.daemon(addresses, balancer={"algorithm": algorithm})
        first = [await served_by(one.listen_address, client) for client in CLIENTS]
        assert [await served_by(other.listen_address, client) for client in CLIENTS] == first
        # The same client again (another port): the same backend.
        assert [await served_by(one.listen_address, client) for client in CLIENTS] == first
        assert len(set(first)) >= 3  # and the clients are spread


async def test_hash_key_address_port_spreads_one_clients_connections(net: Any) -> None:
    async with net.loopback() as loop:
        backends = [await loop.backend(name) for name in ("a", "b", "c")]
        daemon = await loop.daemon(
            [b.address for b in backends],
            balancer={"algorithm": "maglev", "hash_key": "address_port"},
        )
        seen = {await served_by(daemon.listen_address, "127.0.0.20") for _ in range(30)}
        assert seen == {"a", "b", "c"}


async def recover(net: Any, loop: Any, daemon: Any, backend: Any) -> None:
    """Take ``backend`` out (its listener closes, a connect is refused) and bring it back."""
    port = backend.port
    backend.stop_listening()
    control = daemon.core.control
    while control.state(backend.address) is HealthState.HEALTHY:
        await served_by(daemon.listen_address)  # one of them tries it, is refused, retries
    await loop.tasks.start(backend.serve, port)
    await net.wait_for(lambda: control.state(backend.address) is HealthState.HEALTHY)


@pytest.mark.parametrize("slow_start", [0.0, 120.0])
async def test_a_recovered_backend_starts_slow(net: Any, slow_start: float) -> None:
    async with net.loopback() as loop:
        a, b = await loop.backend("a"), await loop.backend("b")
        daemon = await loop.daemon(
            [a.address, b.address],
            balancer={"slow_start": slow_start, "slow_start_floor": 0.1},
            health={
                "failure_threshold": 1,
                "success_threshold": 1,
                "probe_interval": 0.05,
                "probe_timeout": 0.04,
            },
        )
        await recover(net, loop, daemon, a)
        share = Counter([await served_by(daemon.listen_address) for _ in range(100)])["a"]
        if slow_start:
            # Kept one pick in ten at first (and a little more by the end).
            assert share <= 20
        else:
            assert share == 50  # round robin, at once


async def test_a_backup_serves_only_while_no_primary_is_healthy(net: Any, tmp_path: Path) -> None:
    async with net.loopback() as loop:
        primary, spare = await loop.backend("primary"), await loop.backend("spare")
        health = {
            "failure_threshold": 1,
            "success_threshold": 1,
            "probe_interval": 0.05,
            "probe_timeout": 0.04,
        }
        config = tmp_path / "loble.toml"
        daemon = await loop.daemon([primary.address], health=health, config_path=config)
        # A reload adds the spare as a backup.
        document = tomllib.loads(config.read_text())
        document["backends"].append({"address": spare.address, "backup": True})
        config.write_text(tomli_w.dumps(document))
        await daemon.reload()
        assert {await served_by(daemon.listen_address) for _ in range(10)} == {"primary"}
        port = primary.port
        primary.stop_listening()
        # The first client to find it gone is refused: its retry reads the
        # snapshot of that instant, the primary alone (ConnectionPolicy's rule).
        # The failure takes the primary out, and the backup in.
        with pytest.raises((anyio.BrokenResourceError, AssertionError)):
            assert await served_by(daemon.listen_address) == "spare"
        control = daemon.core.control
        assert control.state(primary.address) is HealthState.UNHEALTHY
        assert {await served_by(daemon.listen_address) for _ in range(10)} == {"spare"}
        await loop.tasks.start(primary.serve, port)
        await net.wait_for(lambda: control.state(primary.address) is HealthState.HEALTHY)
        assert {await served_by(daemon.listen_address) for _ in range(10)} == {"primary"}


async def test_panic_spreads_over_every_backend_and_says_so(net: Any) -> None:
    async with net.loopback() as loop:
        backends = [await loop.backend(name) for name in ("a", "b", "c", "d")]
        daemon = await loop.daemon(
            [b.address for b in backends],
            balancer={"panic_threshold": 0.5, "connect_retries": 3},
            health={"failure_threshold": 1, "success_threshold": 1, "probe_interval": 60.0},
            metrics={"enabled": True, "address": "127.0.0.1:0"},
        )
        for backend in backends[1:]:
            backend.stop_listening()
        control = daemon.core.control
        while not control.panic:
            assert await served_by(daemon.listen_address) == "a"  # retried until a answers
        assert loop.logs.find(
            "panic: too few backends healthy, spreading over all of them", healthy=1, backends=4
        )
        assert daemon.core.snapshot.addresses == tuple(b.address for b in backends)
        status, text = await net.scrape(daemon.metrics_address)
        assert status == 200
        assert ("loble_panic", frozenset()) in net.samples(text)
        assert net.samples(text)[("loble_panic", frozenset())] == 1.0
        # Every client still reaches the one that is up: the others refuse, the
        # retries find it.
        assert {await served_by(daemon.listen_address) for _ in range(10)} == {"a"}
