"""Hot reload under traffic: five reloads, zero failed connections, zero truncated streams.

A reload reads the configuration file again and applies it as a diff
through the core (``ProxyCore.reconfigure``). These tests change the file
while clients keep connecting and while long streams stay open across every
reload, and count what the clients saw.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest
import tomli_w

from loble.core import LobleError

pytestmark = pytest.mark.anyio


class Traffic:
    """Clients connecting in a loop; each checks it got back every byte it sent."""

    def __init__(self, address: tuple[str, int], names: set[str]) -> None:
        self.address = address
        self.names = names
        self.completed = 0
        self.failed: list[str] = []
        self.running = True

    async def client(self, number: int) -> None:
        sequence = 0
        while self.running:
            sequence += 1
            payload = f"client {number} request {sequence} ".encode() * 200
            try:
                with anyio.fail_after(10):
                    async with await anyio.connect_tcp(*self.address) as stream:
                        await stream.send(payload)
                        await stream.send_eof()
                        answer = b""
                        while True:
                            try:
                                answer += await stream.receive()
                            except anyio.EndOfStream:
                                break
            except (OSError, anyio.BrokenResourceError, TimeoutError) as error:
                self.failed.append(f"{type(error).__name__}: {error}")
                continue
            name, _, echoed = answer.partition(b":")
            if name.decode() not in self.names or echoed != payload:
                self.failed.append(f"truncated or wrong: {len(echoed)} of {len(payload)} bytes")
            else:
                self.completed += 1


class LongStream:
    """A connection held open across reloads, sending a chunk at each; checked at the end."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.sent = b""

    async def send(self, chunk: bytes) -> None:
        await self.stream.send(chunk)
        self.sent += chunk

    async def finish(self) -> bytes:
        await self.stream.send_eof()
        answer = b""
        with anyio.fail_after(10):
            while True:
                try:
                    answer += await self.stream.receive()
                except anyio.EndOfStream:
                    break
        await self.stream.aclose()
        return answer


def write(path: Path, document: dict[str, Any]) -> None:
    path.write_text(tomli_w.dumps(document), encoding="utf-8")


async def test_five_reloads_under_traffic_lose_no_connection_and_truncate_no_stream(
    net: Any, tmp_path: Path, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as lab:
        a, b, c, d = [await lab.backend(name) for name in ("a", "b", "c", "d")]
        path = tmp_path / "loble.toml"
        daemon = await lab.daemon([a.address, b.address, c.address], config_path=path, **data_plane)
        document = {
            "listener": {"address": f"127.0.0.1:{daemon.listen_address[1]}"},
            "backends": [{"address": x.address} for x in (a, b, c)],
        }
        traffic = Traffic(daemon.listen_address, {"a", "b", "c", "d"})
        long = [LongStream(await anyio.connect_tcp(*daemon.listen_address)) for _ in range(3)]
        await net.wait_for(lambda: len(a.open) + len(b.open) + len(c.open) == 3)
        async with anyio.create_task_group() as clients:
            for number in range(4):
                clients.start_soon(traffic.client, number)

            async def reload(change: str) -> dict[str, Any]:
                write(path, document)
                before = traffic.completed
                done = await daemon.reload()
                for stream in long:
                    await stream.send(f"[{change}]".encode())
                await net.wait_for(lambda: traffic.completed >= before + 20, what=change)
                return done

            document["backends"].append({"address": d.address})
            assert (await reload("add d"))["added"] == [d.address]
            document["backends"][0]["weight"] = 3
            assert (await reload("reweight a"))["reweighted"] == [a.address]
            document["backends"] = [x for x in document["backends"] if x["address"] != b.address]
            assert (await reload("remove b"))["removed"] == [b.address]
            accepted_by_b = b.accepted
            document["balancer"] = {"algorithm": "least_connections"}
            assert (await reload("algorithm"))["changed"] == ["balancer.algorithm"]
            document["health"] = {"failure_threshold": 5}
            document["backends"][-1]["weight"] = 2
            done = await reload("thresholds and weight")
            assert done["reweighted"] == [d.address]
            assert "health.failure_threshold" in done["changed"]
            traffic.running = False
        answers = [await stream.finish() for stream in long]
        # The removed backend got no new connection, and its open one finished whole.
        assert b.accepted == accepted_by_b
        assert d.accepted > 0
        for stream, answer in zip(long, answers, strict=True):
            name, _, echoed = answer.partition(b":")
            assert name in (b"a", b"b", b"c") and echoed == stream.sent
        assert traffic.failed == []
        assert traffic.completed >= 100
        assert daemon.reloads == 5
        assert len(lab.logs.find("configuration reloaded")) == 5


async def test_an_invalid_file_is_rejected_with_every_error_and_the_old_config_stays(
    net: Any, tmp_path: Path
) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        path = tmp_path / "loble.toml"
        daemon = await lab.daemon([a.address], config_path=path)
        path.write_text(
            '[balancer]\nalgorithm = "fastest"\n[[backends]]\naddress = "10.0.0.1"\n',
            encoding="utf-8",
        )
        with pytest.raises(LobleError) as error:
            await daemon.reload()
        problems = str(error.value).splitlines()
        assert len(problems) == 2
        assert [line["error"] for line in lab.logs.find("reload error")] == problems
        assert lab.logs.find("reload rejected: the running configuration stays", errors=2)
        assert daemon.reloads == 0
        assert await net.request(daemon.listen_address) == b"a:ping"  # still serving as before


async def test_a_new_listener_address_is_bound_before_the_old_one_closes(
    net: Any, tmp_path: Path
) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        path = tmp_path / "loble.toml"
        daemon = await lab.daemon([a.address], config_path=path)
        old = daemon.listen_address
        held = await anyio.connect_tcp(*old)  # through the old listener, open across the change
        await held.send(b"before ")
        new_port = net.free_port()
        write(
            path,
            {
                "listener": {"address": f"127.0.0.1:{new_port}"},
                "backends": [{"address": a.address}],
            },
        )
        done = await daemon.reload()
        assert done["changed"] == ["listener.address"]
        assert daemon.listen_address == ("127.0.0.1", new_port)
        assert await net.request(daemon.listen_address) == b"a:ping"

        async def refused() -> bool:
            try:
                stream = await anyio.connect_tcp(*old)
            except OSError:
                return True
            await stream.aclose()
            return False

        await net.wait_for(refused, what="the old listener closed")
        await held.send(b"and after")  # its connection is untouched
        await held.send_eof()
        assert await net.read_all(held) == b"a:before and after"


async def test_a_reload_that_needs_a_restart_says_so(net: Any, tmp_path: Path) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        path = tmp_path / "loble.toml"
        daemon = await lab.daemon([a.address], config_path=path)
        write(
            path,
            {
                "listener": {"address": f"127.0.0.1:{daemon.listen_address[1]}"},
                "runtime": {"backend": "trio"},
                "logging": {"level": "debug"},
                "backends": [{"address": a.address}],
            },
        )
        done = await daemon.reload()
        assert done["restart_needed"] == ["runtime.backend"]
        assert lab.logs.find("reload: these take effect at the next start", keys="runtime.backend")


async def test_sighup_reloads_and_never_kills_even_mid_download(
    net: Any, tmp_path: Path, runtime_backend: str
) -> None:
    size = 30 * 1024 * 1024
    sent: list[int] = []

    async def big(stream: Any) -> None:
        async with stream:
            chunk = b"x" * 65536
            for _ in range(size // len(chunk)):
                await stream.send(chunk)
            sent.append(size)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, big)
        pid_file = tmp_path / "loble.pid"
        document = {
            "listener": {"address": "127.0.0.1:0"},
            "runtime": {"backend": runtime_backend, "pid_file": str(pid_file)},
            "logging": {"format": "json"},
            "backends": [{"address": f"127.0.0.1:{port}"}],
        }
        path = net.write_config(tmp_path / "loble.toml", document)
        async with net.loble_process("run", "-c", str(path)) as child:
            listening = await child.wait_json("listening")
            host, _, listen_port = listening["address"].rpartition(":")
            await net.wait_for(pid_file.exists, what="the pid file")
            assert int(pid_file.read_text()) == child.process.pid
            received = 0
            async with await anyio.connect_tcp(host, int(listen_port)) as stream:
                while received < size // 4:
                    received += len(await stream.receive())
                os.kill(child.process.pid, signal.SIGHUP)  # a valid file: reloads
                await child.wait_json("configuration reloaded")
                path.write_text("[listener\n", encoding="utf-8")
                os.kill(child.process.pid, signal.SIGHUP)  # an invalid one: rejected
                await child.wait_json("reload rejected: the running configuration stays")
                with anyio.fail_after(30):
                    while True:
                        try:
                            received += len(await stream.receive())
                        except anyio.EndOfStream:
                            break
            assert received == size  # the download was never cut
            assert child.process.returncode is None
            child.signal(signal.SIGTERM)
            assert await child.exit_code() == 0
        tasks.cancel_scope.cancel()
    assert not pid_file.exists()


async def test_sighup_to_the_supervisor_reloads_every_worker(
    net: Any, tmp_path: Path, runtime_backend: str
) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        b = await lab.backend("b")
        pid_file = tmp_path / "loble.pid"
        document = {
            "listener": {"address": "127.0.0.1:0"},
            "runtime": {"backend": runtime_backend, "workers": 2, "pid_file": str(pid_file)},
            "logging": {"format": "json"},
            "backends": [{"address": a.address}],
        }
        path = net.write_config(tmp_path / "loble.toml", document)
        async with net.loble_process("run", "-c", str(path)) as child:
            await net.wait_for(lambda: len(child.json_lines("listening")) == 2)
            document["backends"].append({"address": b.address})
            net.write_config(path, document)
            os.kill(int(pid_file.read_text()), signal.SIGHUP)
            await net.wait_for(lambda: len(child.json_lines("configuration reloaded")) == 2)
            workers = sorted(line["worker"] for line in child.json_lines("configuration reloaded"))
            assert workers == [0, 1]
            assert all(
                line["added"] == b.address for line in child.json_lines("configuration reloaded")
            )
            path.write_text("[listener\n", encoding="utf-8")
            child.signal(signal.SIGHUP)
            await child.wait_json("reload rejected: the running configuration stays")
            assert len(child.json_lines("configuration reloaded")) == 2  # none reached a worker
            child.signal(signal.SIGTERM)
            assert await child.exit_code() == 0
