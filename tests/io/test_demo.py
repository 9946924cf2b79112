"""`loble demo` and `loble demo --backends-only` + `loble run`, as a newcomer runs them."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

pytestmark = pytest.mark.anyio


def demo_config(net: Any, tmp_path: Path, runtime: str) -> tuple[Path, list[str], str]:
    *ports, metrics_port = net.free_ports(4)
    backends = [f"127.0.0.1:{port}" for port in ports]
    metrics = f"127.0.0.1:{metrics_port}"
    document = {
        "listener": {"address": "127.0.0.1:0"},
        "metrics": {"enabled": True, "address": metrics},
        "logging": {"format": "json"},
        "runtime": {"backend": runtime},
        "backends": [{"address": address} for address in backends],
    }
    return net.write_config(tmp_path / "demo.toml", document), backends, metrics


def address_of(line: dict[str, Any]) -> tuple[str, int]:
    host, _, port = line["address"].rpartition(":")
    return host, int(port)


async def test_demo_shows_traffic_logs_and_metrics(
    net: Any, tmp_path: Path, runtime_backend: str
) -> None:
    path, backends, metrics = demo_config(net, tmp_path, runtime_backend)
    async with net.loble_process("demo", "-c", str(path), "--plain", "--rate", "50") as demo:
        listening = address_of(await demo.wait_json("listening"))

        def served() -> set[str]:
            return {
                line["backend"]
                for line in demo.json_lines("connection")
                if line["outcome"] == "completed"
            }

        await net.wait_for(lambda: served() == set(backends), what="every backend answered")
        answer = await net.request(listening, b"GET / HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK") and b"hello from backend-" in answer
        assert await net.request(listening, b"echo me") == b"echo me"
        host, _, port = metrics.rpartition(":")
        _, body = await net.scrape((host, int(port)))
        completed = sum(
            count
            for (name, labels), count in net.samples(body).items()
            if name == "loble_connections_total" and ("outcome", "completed") in labels
        )
        assert completed >= 3
        demo.signal(signal.SIGINT)
        assert await demo.exit_code() == 0
        assert demo.json_lines("shutdown finished")
        assert not demo.has("Traceback")


async def test_loble_run_against_demo_backends_only(
    net: Any, tmp_path: Path, runtime_backend: str
) -> None:
    path, backends, _ = demo_config(net, tmp_path, runtime_backend)
    async with net.loble_process("demo", "-c", str(path), "--backends-only") as demo:
        await net.wait_for(lambda: len(demo.json_lines("demo backend listening")) == 3)
        async with net.loble_process("run", "-c", str(path)) as daemon:
            listening = address_of(await daemon.wait_json("listening"))
            names = set()
            for _ in range(3):
                answer = await net.request(listening, b"GET / HTTP/1.0\r\n\r\n")
                names.add(answer.rpartition(b"hello from ")[2].split(b" ")[0])
            assert names == {b"backend-1", b"backend-2", b"backend-3"}
            daemon.signal(signal.SIGTERM)
            assert await daemon.exit_code() == 0
        demo.signal(signal.SIGTERM)
        assert await demo.exit_code() == 0
        with pytest.raises(OSError):
            host, _, port = backends[0].rpartition(":")
            await anyio.connect_tcp(host, int(port))
