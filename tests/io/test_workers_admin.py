"""With ``workers = 2``: one admin API for the whole process, on ``[admin] address``.

Each test runs ``loble run`` as a child process (a supervisor and two
workers) and talks to the one address: its ``/status`` sums the workers'
own (each worker's, on the private loopback socket it logs, is read to check
the sums), and each change reaches every worker, which the tests check where
clients see it too: where new connections go.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from loble.io._supervisor_admin import WorkerAdmin, WorkerReply, combined_status

pytestmark = pytest.mark.anyio

TOKEN = "workers-token"


class Supervised:
    """A running ``loble run`` with two workers, its one admin address and its workers' own."""

    def __init__(
        self,
        child: Any,
        admin: tuple[str, int],
        listener: tuple[str, int],
        document: dict[str, Any],
        net: Any,
    ) -> None:
        self.net = net
        self.child = child
        self.document = document
        """The configuration it runs, as written to ``loble.toml``."""
        self.admin = admin
        self.listener = listener

    def worker_admins(self) -> dict[int, tuple[str, int]]:
        """Each worker's private admin address, from the ``admin API`` line it logs."""
        found = {}
        for line in self.child.json_lines("admin API"):
            if line.get("worker") is not None:
                host, _, port = line["address"].removeprefix("http://").rstrip("/").rpartition(":")
                found[line["worker"]] = (host, int(port))
        return found

    async def status(self) -> dict[str, Any]:
        code, body = await self.net.admin_call(self.admin, "GET", "/status")
        assert code == 200, body
        return body  # type: ignore[no-any-return]


@asynccontextmanager
async def supervised(
    net: Any, tmp_path: Path, runtime_backend: str, backends: list[str]
) -> AsyncIterator[Supervised]:
    """Start it, wait until both workers answer through the one address; stop it at the end."""
    admin = ("127.0.0.1", net.free_port())
    document = {
        "listener": {"address": "127.0.0.1:0"},
        "runtime": {
            "backend": runtime_backend,
            "workers": 2,
            "pid_file": str(tmp_path / "loble.pid"),
        },
        "admin": {"enabled": True, "address": f"127.0.0.1:{admin[1]}", "token": TOKEN},
        "logging": {"format": "json"},
        "backends": [{"address": address} for address in backends],
    }
    path = net.write_config(tmp_path / "loble.toml", document)
    async with net.loble_process("run", "-c", str(path)) as child:
        await net.wait_for(lambda: len(child.json_lines("listening")) == 2)
        host, _, port = child.json_lines("listening")[0]["address"].rpartition(":")
        running = Supervised(child, admin, (host, int(port)), document, net)

        async def both_answer() -> bool:
            with anyio.fail_after(5):
                status = await running.status()
            return [w["ok"] for w in status["workers"]] == [True, True]

        await net.wait_for(both_answer, what="both workers answer through the one address")
        yield running
        if child.process.returncode is None:
            child.signal(signal.SIGTERM)
            assert await child.exit_code() == 0


async def test_status_on_the_one_address_sums_every_worker(
    net: Any, tmp_path: Path, runtime_backend: str
) -> None:
    async with net.loopback() as lab:
        a, b = await lab.backend("a"), await lab.backend("b")
        async with supervised(net, tmp_path, runtime_backend, [a.address, b.address]) as run:
            for number in range(20):
                answer = await net.request(run.listener, f"hello {number}".encode())
                assert answer.endswith(f"hello {number}".encode())

            async def all_counted() -> bool:
                status = await run.status()
                return (
                    status["in_flight"] == 0
                    and sum(
                        backend["connections"].get("completed", 0) for backend in status["backends"]
                    )
                    == 20
                )

            await net.wait_for(all_counted, what="the 20 connections counted, none in flight")
            status = await run.status()
            # One process: the supervisor's pid, no worker index, both workers listed.
            assert status["pid"] == int((tmp_path / "loble.pid").read_text())
            assert status["worker"] is None
            assert status["process"] == "running" and status["accepting"] is True
            assert [(w["worker"], w["ok"]) for w in status["workers"]] == [(0, True), (1, True)]
            assert status["eligible"] == [a.address, b.address]
            assert status["listeners"] == [f"{run.listener[0]}:{run.listener[1]}"]

            # The sums are the sums of what each worker says on its own socket.
            private = run.worker_admins()
            assert sorted(private) == [0, 1]
            own = [(await net.admin_call(private[k], "GET", "/status"))[1] for k in (0, 1)]
            assert [d["pid"] for d in own] == [w["pid"] for w in status["workers"]]
            assert [d["worker"] for d in own] == [0, 1]
            for address in (a.address, b.address):
                total = net.backend_of(status, address)
                parts = [net.backend_of(document, address) for document in own]
                assert total["state"] == "healthy" and total["admin"] == "ready"
                assert [w["worker"] for w in total["workers"]] == [0, 1]
                assert all(w["state"] == "healthy" for w in total["workers"])
                for key in ("peak_connections", "bytes_to_backend", "bytes_to_client"):
                    assert total[key] == sum(part[key] for part in parts), key
                assert total["connections"]["completed"] == sum(
                    part["connections"].get("completed", 0) for part in parts
                )
            assert sum(b["bytes_to_backend"] for b in status["backends"]) == sum(
                len(f"hello {number}") for number in range(20)
            )
            assert a.accepted + b.accepted == 20


async def test_a_drain_and_a_weight_reach_every_worker(
    net: Any, tmp_path: Path, runtime_backend: str
) -> None:
    async with net.loopback() as lab:
        a, b = await lab.backend("a"), await lab.backend("b")
        async with supervised(net, tmp_path, runtime_backend, [a.address, b.address]) as run:
            code, done = await net.admin_call(
                run.admin, "POST", f"/backends/{b.address}/drain", token=TOKEN
            )
            assert code == 200, done
            assert done["address"] == b.address and done["admin"] == "drain"
            assert [(w["worker"], w["admin"]) for w in done["workers"]] == [
                (0, "drain"),
                (1, "drain"),
            ]
            accepted_by_b = b.accepted
            for _ in range(40):  # the kernel spreads them over both workers
                assert (await net.request(run.listener)).startswith(b"a:")
            assert b.accepted == accepted_by_b
            for address in run.worker_admins().values():
                _, own = await net.admin_call(address, "GET", "/status")
                assert net.backend_of(own, b.address)["admin"] == "drain"
            status = await run.status()
            assert net.backend_of(status, b.address)["admin"] == "drain"
            assert status["eligible"] == [a.address]

            code, done = await net.admin_call(
                run.admin, "POST", f"/backends/{a.address}/weight", token=TOKEN, body={"weight": 7}
            )
            assert code == 200, done
            assert [w["weight"] for w in done["workers"]] == [7, 7]
            assert net.backend_of(await run.status(), a.address)["weight"] == 7

            code, done = await net.admin_call(
                run.admin, "POST", "/backends/10.9.9.9:80/drain", token=TOKEN
            )
            assert (code, done) == (404, {"error": "no backend '10.9.9.9:80'"})


async def test_reload_through_the_one_address_adds_a_backend_on_every_worker(
    net: Any, tmp_path: Path, runtime_backend: str
) -> None:
    async with net.loopback() as lab:
        a, b = await lab.backend("a"), await lab.backend("b")
        async with supervised(net, tmp_path, runtime_backend, [a.address]) as run:
            path = tmp_path / "loble.toml"
            run.document["backends"].append({"address": b.address})
            net.write_config(path, run.document)
            code, done = await net.admin_call(run.admin, "POST", "/reload", token=TOKEN)
            assert code == 200, done
            assert done["reloaded"] is True and done["added"] == [b.address]
            assert [(w["worker"], w["ok"]) for w in done["workers"]] == [(0, True), (1, True)]
            # The log lines arrive through a pipe: wait for them, with a bound.
            await net.wait_for(lambda: len(run.child.json_lines("configuration reloaded")) == 2)
            reloaded = run.child.json_lines("configuration reloaded")
            assert sorted(line["worker"] for line in reloaded) == [0, 1]
            total = net.backend_of(await run.status(), b.address)
            assert [w["worker"] for w in total["workers"]] == [0, 1]

            # An invalid file is rejected once, by the supervisor, and reaches no worker.
            path.write_text("[listener\n", encoding="utf-8")
            code, done = await net.admin_call(run.admin, "POST", "/reload", token=TOKEN)
            assert code == 400 and done["errors"]
            rejected = "reload rejected: the running configuration stays"
            await net.wait_for(lambda: run.child.json_lines(rejected))
            assert len(run.child.json_lines("configuration reloaded")) == 2
            assert [
                line.get("worker")
                for line in run.child.json_lines("reload rejected: the running configuration stays")
            ] == [None]
            net.write_config(path, run.document)  # valid again for a clean stop


async def test_a_wrong_token_is_refused_by_the_one_address_and_changes_nothing(
    net: Any, tmp_path: Path, runtime_backend: str
) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        async with supervised(net, tmp_path, runtime_backend, [a.address]) as run:
            for token in ("wrong", None):
                code, done = await net.admin_call(
                    run.admin, "POST", f"/backends/{a.address}/drain", token=token
                )
                assert (code, done) == (401, {"error": "missing or wrong bearer token"})
            code, _ = await net.admin_call(run.admin, "POST", "/reload", token="wrong")
            assert code == 401
            # The log lines arrive through a pipe: wait for them, with a bound.
            await net.wait_for(lambda: len(run.child.json_lines("admin request refused")) == 3)
            refused = run.child.json_lines("admin request refused")
            assert [line.get("worker") for line in refused] == [None, None, None]
            status = await run.status()
            assert net.backend_of(status, a.address)["admin"] == "ready"
            assert all(w["admin"] == "ready" for w in net.backend_of(status, a.address)["workers"])
            assert run.child.json_lines("configuration reloaded") == []


async def test_sigterm_still_stops_the_supervisor_cleanly_and_frees_the_admin_address(
    net: Any, tmp_path: Path, runtime_backend: str
) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        async with supervised(net, tmp_path, runtime_backend, [a.address]) as run:
            pid_file = tmp_path / "loble.pid"
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
            assert await run.child.exit_code() == 0
            assert not pid_file.exists()
            assert len(run.child.json_lines("stopped")) == 2
            with socket.socket() as probe:  # nothing listens there any more
                assert probe.connect_ex(run.admin) != 0


async def test_an_admin_address_the_supervisor_cannot_bind_is_one_line_and_exit_1(
    net: Any, tmp_path: Path, runtime_backend: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        document = {
            "listener": {"address": "127.0.0.1:0"},
            "runtime": {"backend": runtime_backend, "workers": 2},
            "admin": {"enabled": True, "address": f"127.0.0.1:{port}", "token": TOKEN},
            "backends": [{"address": "127.0.0.1:9"}],
        }
        path = net.write_config(tmp_path / "loble.toml", document)
        async with net.loble_process("run", "-c", str(path)) as child:
            assert await child.exit_code() == 1
            await net.wait_for(
                lambda: child.has(f"admin.address: cannot listen on 127.0.0.1:{port}")
            )
            assert not child.has("Traceback")
            assert not child.has("workers started")


def test_workers_that_disagree_show_each_and_the_worst_and_an_unreachable_one_is_named() -> None:
    def document(pid: int, state: str, admin: str, completed: int) -> dict[str, Any]:
        return {
            "pid": pid,
            "process": "running",
            "accepting": True,
            "in_flight": 1,
            "snapshot_version": 3,
            "listeners": ["127.0.0.1:9000"],
            "eligible": ["10.0.0.1:80"] if admin == "ready" else [],
            "backends": [
                {
                    "address": "10.0.0.1:80",
                    "state": state,
                    "admin": admin,
                    "weight": 1,
                    "active_connections": 1,
                    "peak_connections": 2,
                    "connections": {"completed": completed, "connect_refused": 1},
                    "bytes_to_backend": 10,
                    "bytes_to_client": 20,
                    "since_seconds": 5.0 if state == "healthy" else 1.0,
                    "reason": state,
                    "last_probe_ok": None,
                    "last_probe_seconds": None,
                    "removing": False,
                }
            ],
        }

    workers = [WorkerAdmin(index=k, pid=100 + k, address=("127.0.0.1", 1 + k)) for k in range(3)]
    replies = [
        WorkerReply(worker=workers[0], status=200, document=document(100, "healthy", "ready", 4)),
        WorkerReply(worker=workers[1], status=200, document=document(101, "unhealthy", "drain", 6)),
        WorkerReply(worker=workers[2], status=0, document={}, error="unreachable: timed out"),
    ]
    status = combined_status(replies, uptime=12.0, pid=99)
    assert status["pid"] == 99 and status["worker"] is None
    assert status["in_flight"] == 2 and status["process"] == "running"
    assert status["eligible"] == []  # eligible only where every worker that answered says so
    (backend,) = status["backends"]  # type: ignore[misc]
    assert backend["state"] == "unhealthy" and backend["admin"] == "drain"
    assert backend["since_seconds"] == 1.0 and backend["reason"] == "unhealthy"
    assert backend["connections"] == {"completed": 10, "connect_refused": 2}
    assert (backend["active_connections"], backend["peak_connections"]) == (2, 4)
    assert (backend["bytes_to_backend"], backend["bytes_to_client"]) == (20, 40)
    assert [(w["worker"], w["state"], w["admin"]) for w in backend["workers"]] == [
        (0, "healthy", "ready"),
        (1, "unhealthy", "drain"),
    ]
    assert status["workers"] == [
        {
            "worker": 0,
            "pid": 100,
            "ok": True,
            "process": "running",
            "in_flight": 1,
            "snapshot_version": 3,
        },
        {
            "worker": 1,
            "pid": 101,
            "ok": True,
            "process": "running",
            "in_flight": 1,
            "snapshot_version": 3,
        },
        {"worker": 2, "pid": 102, "ok": False, "error": "unreachable: timed out"},
    ]
    nobody = combined_status(replies[2:], uptime=1.0)
    assert nobody["process"] == "unreachable" and nobody["backends"] == []
