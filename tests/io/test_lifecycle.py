"""Graceful shutdown: drain, the drain deadline, a second signal, and `loble run`."""

from __future__ import annotations

import os
import pwd
import signal
import socket
from pathlib import Path
from typing import Any

import anyio
import pytest

from loble.core import Outcome

pytestmark = pytest.mark.anyio


def count(daemon: Any, outcome: Outcome) -> float:
    return sum(
        sample.value
        for metric in daemon.metrics.connections.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["outcome"] == outcome.value
    )


async def refused(address: tuple[str, int]) -> bool:
    try:
        stream = await anyio.connect_tcp(*address)
    except OSError:
        return True
    await stream.aclose()
    return False


async def test_shutdown_drains_in_flight_connections_and_refuses_new_ones(net: Any) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon([backend.address])
        daemon.drain_progress_seconds = 0.05
        async with await anyio.connect_tcp(*daemon.listen_address) as stream:
            await stream.send(b"before ")
            await net.wait_for(lambda: len(backend.open) == 1)
            daemon.shutdown()
            await net.wait_for(lambda: refused(daemon.listen_address), what="listener closed")
            assert not daemon.core.stopped
            # While it drains, a line every few seconds says what it waits for.
            await net.wait_for(lambda: lab.logs.find("draining", in_flight=1))
            await stream.send(b"and after")
            await stream.send_eof()
            assert await net.read_all(stream) == b"a:before and after"
        await net.wait_for(lambda: daemon.core.stopped)
        assert lab.logs.find("shutdown finished", cut=0)
        assert count(daemon, Outcome.COMPLETED) == 1


async def test_drain_deadline_cuts_what_remains(net: Any) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon([backend.address], timeouts={"drain": 0.2})
        async with await anyio.connect_tcp(*daemon.listen_address) as stream:
            await stream.send(b"never finished")
            await net.wait_for(lambda: len(backend.open) == 1)
            daemon.shutdown()
            assert await net.read_all(stream) == b""  # cut at the deadline
        await net.wait_for(lambda: daemon.core.stopped)
        assert lab.logs.find("shutdown finished", cut=1)
        assert count(daemon, Outcome.CUT) == 1
        await net.wait_for(lambda: not backend.open)


async def test_second_shutdown_cuts_at_once(net: Any) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon([backend.address], timeouts={"drain": 600})
        async with await anyio.connect_tcp(*daemon.listen_address) as stream:
            await stream.send(b"x")
            await net.wait_for(lambda: len(backend.open) == 1)
            daemon.shutdown()
            assert not daemon.core.stopped
            daemon.shutdown()
            assert daemon.core.stopped
            assert await net.read_all(stream) == b""
        assert lab.logs.find("shutdown finished", cut=1)


async def test_shutdown_with_nothing_in_flight_stops_at_once(net: Any) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon([backend.address])
        daemon.shutdown()
        assert daemon.core.stopped
        await net.wait_for(lambda: refused(daemon.listen_address), what="listener closed")
        assert lab.logs.find("shutdown finished", cut=0)


async def _loble_run(net: Any, tmp_path: Path, backend: Any, runtime: str, **extra: Any) -> Any:
    document = {
        "listener": {"address": "127.0.0.1:0"},
        "timeouts": {"drain": 30},
        "logging": {"format": "json", "level": "info"},
        "runtime": {"backend": runtime},
        "backends": [{"address": backend.address}],
        **extra,
    }
    return net.loble_process("run", "-c", str(net.write_config(tmp_path / "c.toml", document)))


async def test_loble_run_drains_on_sigterm_and_exits_0(
    net: Any, tmp_path: Path, runtime_backend: str
) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        async with await _loble_run(net, tmp_path, backend, runtime_backend) as child:
            host, _, port = (await child.wait_json("listening"))["address"].rpartition(":")
            address = (host, int(port))
            async with await anyio.connect_tcp(*address) as stream:
                await stream.send(b"long ")
                await net.wait_for(lambda: len(backend.open) == 1)
                child.signal(signal.SIGTERM)
                await net.wait_for(
                    lambda: child.json_lines("shutdown started: not accepting, draining")
                )
                await net.wait_for(lambda: refused(address), what="listener closed")
                await stream.send(b"connection")
                await stream.send_eof()
                assert await net.read_all(stream) == b"a:long connection"
            assert await child.exit_code() == 0
            finished = child.json_lines("shutdown finished")
            assert [line["cut"] for line in finished] == [0]
            assert child.json_lines("stopped")
            assert not child.has("Traceback")


async def test_loble_run_second_signal_cuts_and_exits(
    net: Any, tmp_path: Path, runtime_backend: str
) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        async with await _loble_run(net, tmp_path, backend, runtime_backend) as child:
            host, _, port = (await child.wait_json("listening"))["address"].rpartition(":")
            async with await anyio.connect_tcp(host, int(port)) as stream:
                await stream.send(b"x")
                await net.wait_for(lambda: len(backend.open) == 1)
                child.signal(signal.SIGINT)
                await net.wait_for(
                    lambda: child.json_lines("shutdown started: not accepting, draining")
                )
                child.signal(signal.SIGTERM)
                assert await child.exit_code() == 0
                assert await net.read_all(stream) == b""
            assert [line["cut"] for line in child.json_lines("shutdown finished")] == [1]


async def test_loble_run_with_two_workers_shares_the_port_and_drains_on_sigterm(
    net: Any, tmp_path: Path, runtime_backend: str
) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        document = {
            "listener": {"address": "127.0.0.1:0"},
            "logging": {"format": "json", "level": "info"},
            "runtime": {"backend": runtime_backend, "workers": 2},
            "metrics": {"enabled": True, "address": "127.0.0.1:0"},
            "backends": [{"address": backend.address}],
        }
        path = net.write_config(tmp_path / "c.toml", document)
        async with net.loble_process("run", "-c", str(path)) as child:
            await net.wait_for(lambda: len(child.json_lines("listening")) == 2)
            listening = child.json_lines("listening")
            assert sorted(line["worker"] for line in listening) == [0, 1]
            # Port 0 was resolved once by the supervisor: both workers share it.
            assert len({line["address"] for line in listening}) == 1
            host, _, port = listening[0]["address"].rpartition(":")
            address = (host, int(port))
            assert port != "0"
            # Each worker serves its own metrics endpoint.
            assert len({line["address"] for line in child.json_lines("metrics endpoint")}) == 2
            for index in range(6):
                assert await net.request(address, b"%d" % index) == b"a:%d" % index
            async with await anyio.connect_tcp(*address) as stream:
                await stream.send(b"long ")
                await net.wait_for(lambda: len(backend.open) == 1)
                child.signal(signal.SIGTERM)
                await net.wait_for(
                    lambda: len(child.json_lines("shutdown started: not accepting, draining")) == 2
                )
                await net.wait_for(lambda: refused(address), what="listeners closed")
                await stream.send(b"connection")
                await stream.send_eof()
                assert await net.read_all(stream) == b"a:long connection"
            assert await child.exit_code() == 0
            assert [line["cut"] for line in child.json_lines("shutdown finished")] == [0, 0]
            assert len(child.json_lines("stopped")) == 2
            assert not child.has("Traceback")


async def test_sigterm_while_workers_are_starting_is_a_clean_stop(net: Any, tmp_path: Path) -> None:
    document = {
        "listener": {"address": "127.0.0.1:0"},
        "logging": {"format": "json"},
        "runtime": {"workers": 2},
        "backends": [{"address": "127.0.0.1:9"}],
    }
    path = net.write_config(tmp_path / "c.toml", document)
    async with net.loble_process("run", "-c", str(path)) as child:
        # The supervisor logs this right after the forks: the workers are still importing.
        await child.wait_json("workers started")
        child.signal(signal.SIGTERM)
        assert await child.exit_code() == 0, "\n".join(child.lines)
        assert not child.json_lines("worker failed")
        assert not child.has("Traceback")


async def test_workers_that_cannot_start_make_the_supervisor_exit_1(
    net: Any, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        document = {
            "listener": {"address": f"127.0.0.1:{taken.getsockname()[1]}"},
            "logging": {"format": "json"},
            "runtime": {"workers": 2},
            "backends": [{"address": "127.0.0.1:9"}],
        }
        path = net.write_config(tmp_path / "c.toml", document)
        async with net.loble_process("run", "-c", str(path)) as child:
            assert await child.exit_code() == 1
            # The first worker to fail makes the supervisor drain the other:
            # that one may fail the same way or stop on the drain first,
            # depending on which got further (a busy machine decides).
            await net.wait_for(lambda: len(child.json_lines("worker failed")) >= 1)
            assert child.has("Address already in use")
            assert not child.has("Traceback")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can change its user")
async def test_runtime_user_drops_privileges_once_bound(net: Any, tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        document = {
            "listener": {"address": "127.0.0.1:0"},
            "runtime": {"user": "nobody"},
            "logging": {"format": "json"},
            "backends": [{"address": backend.address}],
        }
        path = net.write_config(tmp_path / "loble.toml", document)
        async with net.loble_process("run", "-c", str(path)) as child:
            host, _, port = (await child.wait_json("listening"))["address"].rpartition(":")
            status = Path(f"/proc/{child.process.pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uids.split()[1:] == [str(nobody.pw_uid)] * 4  # real, effective, saved, fs
            assert await net.request((host, int(port))) == b"a:ping"
            child.signal(signal.SIGTERM)
            assert await child.exit_code() == 0


async def test_an_unknown_runtime_user_is_a_one_line_error(net: Any, tmp_path: Path) -> None:
    document = {
        "listener": {"address": "127.0.0.1:0"},
        "runtime": {"user": "no-such-user-here"},
        "backends": [{"address": "127.0.0.1:9"}],
    }
    path = net.write_config(tmp_path / "loble.toml", document)
    async with net.loble_process("run", "-c", str(path)) as child:
        assert await child.exit_code() == 1
        await net.wait_for(lambda: child.has("error: runtime.user: no user 'no-such-user-here'"))
        assert not child.has("Traceback")
