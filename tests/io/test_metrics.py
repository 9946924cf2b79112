"""The Prometheus endpoint, scraped and parsed as Prometheus would, and the access log."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import loble
from loble.core import ProxyCore, parse_config
from loble.io import _http as http
from loble.io._copy import SPLICE_AVAILABLE
from loble.io._metrics import TO_BACKEND, TO_CLIENT, Metrics, living_tasks

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_metrics_endpoint_reports_traffic_health_and_draining(net: Any) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        refused = f"127.0.0.1:{net.free_port()}"
        daemon = await lab.daemon(
            [a.address, refused],
            metrics={"enabled": True, "address": "127.0.0.1:0"},
            health={"failure_threshold": 1, "probe_interval": 600},
            logging={"access_log": True},
        )
        # Round robin: a, then the refused one (retried on a; it goes unhealthy), then a.
        for _ in range(3):
            assert await net.request(daemon.listen_address) == b"a:ping"
        await net.wait_for(lambda: daemon.core.in_flight == 0)
        status, body = await net.scrape(daemon.metrics_address)
        assert status == 200
        samples = net.samples(body)
        assert (
            value(samples, "loble_connections_total", backend=a.address, outcome="completed") == 3
        )
        assert (
            value(samples, "loble_backend_bytes_total", backend=a.address, direction="to_backend")
            == 12
        )
        assert (
            value(samples, "loble_backend_bytes_total", backend=a.address, direction="to_client")
            == 18
        )
        assert (
            value(samples, "loble_connect_failures_total", backend=refused, reason="refused") == 1
        )
        assert value(samples, "loble_connect_retries_total", backend=a.address) == 1
        into_unhealthy = [
            count
            for (name, labels), count in samples.items()
            if name == "loble_health_transitions_total"
            and ("backend", refused) in labels
            and ("to", "unhealthy") in labels
        ]
        assert sorted(into_unhealthy) == [0, 1]  # from healthy: 1; from draining: 0
        assert value(samples, "loble_backend_state", backend=refused, state="unhealthy") == 1
        assert value(samples, "loble_backend_state", backend=refused, state="healthy") == 0
        assert value(samples, "loble_backend_state", backend=a.address, state="healthy") == 1
        assert value(samples, "loble_snapshot_version") == 2
        assert value(samples, "loble_snapshot_backends") == 1
        assert (
            value(samples, "loble_backend_connect_duration_seconds_count", backend=a.address) == 3
        )
        assert value(samples, "loble_no_backend_refusals_total") == 0
        assert value(samples, "loble_draining") == 0
        assert value(samples, "loble_connections_in_flight") == 0

        access = lab.logs.find("connection", backend=a.address, outcome="completed")
        assert [(line["bytes_to_backend"], line["bytes_to_client"]) for line in access] == [
            (4, 6)
        ] * 3
        assert all(line["client"].startswith("127.0.0.1:") for line in access)
        assert [line["attempts"] for line in access] == [1, 2, 1]
        assert [line["tried"] for line in access] == ["", refused, ""]  # every backend tried

        # The operator's metrics.
        listener = f"127.0.0.1:{daemon.listen_address[1]}"
        assert value(samples, "loble_listener_connections_total", listener=listener) == 3
        assert value(samples, "loble_backend_weight", backend=a.address) == 1
        assert value(samples, "loble_backend_admin_state", backend=a.address, state="ready") == 1
        assert value(samples, "loble_backend_admin_state", backend=a.address, state="drain") == 0
        assert value(samples, "loble_backend_state_age_seconds", backend=refused) >= 0
        assert (
            value(samples, "loble_connect_failures_total", backend=refused, reason="timeout") == 0
        )
        builds = [labels for (name, labels), _ in samples.items() if name == "loble_build_info"]
        assert builds and ("version", loble.__version__) in builds[0]
        assert value(samples, "process_open_fds") > 0  # prometheus_client's process collector

        # While draining: the endpoint still answers and shows the connection in flight.
        async with await anyio.connect_tcp(*daemon.listen_address) as stream:
            await stream.send(b"x")
            await net.wait_for(lambda: len(a.open) == 1)
            daemon.shutdown()
            samples = net.samples((await net.scrape(daemon.metrics_address))[1])
            assert value(samples, "loble_draining") == 1
            assert value(samples, "loble_connections_in_flight") == 1
            assert value(samples, "loble_backend_active_connections", backend=a.address) == 1
            await stream.send_eof()
            assert await net.read_all(stream) == b"a:x"


async def test_metrics_endpoint_answers_404_elsewhere(net: Any) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await lab.daemon([a.address], metrics={"enabled": True, "address": "127.0.0.1:0"})
        for path in ("/nope", "/", "/metrics/extra"):
            status, _ = await net.scrape(daemon.metrics_address, path)
            assert status == 404, path


async def test_every_documented_series_exists_from_start_up(net: Any) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await lab.daemon([a.address])
        samples = net.samples(daemon.metrics.render().decode())
    for labels in (
        {"backend": a.address, "from": "healthy", "to": "draining"},
        {"backend": a.address, "from": "unhealthy", "to": "healthy"},
    ):
        assert value(samples, "loble_health_transitions_total", **labels) == 0
    for result in ("success", "failure"):
        assert value(samples, "loble_probes_total", backend=a.address, result=result) == 0
    for outcome in ("refused_shutting_down", "no_backend"):
        assert value(samples, "loble_connections_total", backend="", outcome=outcome) == 0
    assert value(samples, "loble_connections_total", backend=a.address, outcome="removed") == 0


async def test_every_metric_is_documented(net: Any) -> None:
    documented = DOCS.read_text(encoding="utf-8")
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await lab.daemon([a.address])
        families = list(text_string_to_metric_families(daemon.metrics.render().decode()))
    # prometheus_client's "_created" series (on unless `loble run` turned them
    # off, which test_cli does for the whole session) are not Loble's metrics.
    names = {
        f.name + ("_total" if f.type == "counter" else "")
        for f in families
        if not f.name.endswith("_created")
    }
    assert len(names) >= 15
    missing = sorted(name for name in names if f"`{name}`" not in documented)
    assert not missing, f"not in docs/metrics.md: {missing}"


def test_outside_an_event_loop_there_are_no_tasks_to_count() -> None:
    assert living_tasks() is None


async def test_the_tasks_gauge_counts_a_connection_s_tasks_and_returns_at_rest(net: Any) -> None:
    def tasks(daemon: Any) -> float:
        return value(net.samples(daemon.metrics.render().decode()), "loble_tasks")

    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await lab.daemon([a.address], data_path="tasks")
        # Rest is after a first connection: every long-lived task has started by then.
        assert await net.request(daemon.listen_address) == b"a:ping"
        await net.wait_for(lambda: daemon.open_connections == 0 and not a.open)
        at_rest = tasks(daemon)
        assert at_rest >= 1
        async with await anyio.connect_tcp(*daemon.listen_address) as stream:
            await stream.send(b"held open")
            await net.wait_for(lambda: len(a.open) == 1)
            # The connection's task and one per direction (the backend's handler too).
            assert tasks(daemon) >= at_rest + 3
        await net.wait_for(lambda: daemon.open_connections == 0 and not a.open)
        await net.wait_for(lambda: tasks(daemon) == at_rest, what="the tasks back to rest")


@pytest.mark.parametrize("copy", ["splice", "recv_into"])
async def test_the_pipe_gauges_count_the_pool_at_rest(net: Any, copy: str) -> None:
    if copy == "splice" and not SPLICE_AVAILABLE:
        pytest.skip("splice(2) is Linux only")
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await lab.daemon([a.address], copy=copy)
        payload = b"p" * (1 << 20)
        assert await net.request(daemon.listen_address, payload) == b"a:" + payload
        await net.wait_for(lambda: daemon.open_connections == 0)
        samples = net.samples(daemon.metrics.render().decode())
        pooled = value(samples, "loble_splice_pipes", state="pooled")
        assert value(samples, "loble_splice_pipes", state="in_use") == 0
        assert pooled == daemon.pool.open_pipes == daemon.pool.pooled_pipes
        assert pooled >= (1 if copy == "splice" else 0)
        assert pooled <= (2 if copy == "splice" else 0)


def test_per_connection_metrics_render_as_prometheus_client_would() -> None:
    # The hot-path metrics are plain numbers exposed by a collector; the
    # histograms must keep prometheus_client's buckets (le is inclusive) and
    # its series, and counters their _total, to any scraper.
    address = "127.0.0.1:9"
    ours = Metrics(ProxyCore(parse_config({"backends": [{"address": address}]}), random.Random(0)))
    registry = CollectorRegistry()
    histogram = Histogram(
        "loble_backend_connect_duration_seconds",
        "Time to establish a backend connection (successful attempts).",
        ("backend",),
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        registry=registry,
    )
    counter = Counter(
        "loble_backend_bytes",
        "Bytes proxied, by backend and direction (to_backend or to_client).",
        ("backend", "direction"),
        unit="bytes",
        registry=registry,
    )
    for seconds in (0.0001, 0.0005, 0.00051, 0.001, 5, 7.5):  # on, below, above the bounds
        ours.connect_duration(address).observe(seconds)
        histogram.labels(address).observe(seconds)
    ours.bytes.labels(address, TO_BACKEND).inc(12_345)
    counter.labels(address, TO_BACKEND).inc(12_345)
    counter.labels(address, TO_CLIENT)  # Loble makes every backend's series at zero

    def series(text: str, prefix: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            if family.name.startswith(prefix)
            for sample in family.samples
            if not sample.name.endswith("_created")
        }

    expected = generate_latest(registry).decode()
    rendered = ours.render().decode()
    for prefix in ("loble_backend_connect_duration_seconds", "loble_backend_bytes"):
        assert series(rendered, prefix) == series(expected, prefix)


async def test_a_slowloris_on_the_http_endpoints_is_closed_and_leaks_nothing(
    net: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "READ_SECONDS", 1)  # the bound a request has to arrive in
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await lab.daemon(
            [a.address],
            metrics={"enabled": True, "address": "127.0.0.1:0"},
            admin={"enabled": True, "address": "127.0.0.1:0", "token": "t"},
        )

        def open_fds() -> int:
            return len(os.listdir("/proc/self/fd"))

        before = open_fds()
        for address in (daemon.metrics_address, daemon.admin_address):
            slow = [await anyio.connect_tcp(*address) for _ in range(10)]
            closed: list[int] = []

            async def drip(index: int, stream: Any, closed: list[int] = closed) -> None:
                # Headers a byte at a time, never finished: the server must hang up.
                await stream.send(b"GET /status HTTP/1.1\r\n")
                with anyio.fail_after(10):
                    while True:
                        try:
                            await stream.send(b"X")
                        except (anyio.BrokenResourceError, OSError):
                            break
                        with anyio.move_on_after(0.2):
                            try:
                                if not await stream.receive():
                                    break
                            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                                break
                closed.append(index)

            async with anyio.create_task_group() as tasks:
                for index, stream in enumerate(slow):
                    tasks.start_soon(drip, index, stream)
                # Meanwhile an honest request is answered at once.
                status, _ = await net.scrape(
                    address, "/metrics" if address == daemon.metrics_address else "/status"
                )
                assert status == 200
            assert sorted(closed) == list(range(10))
            for stream in slow:
                await stream.aclose()
        await net.wait_for(lambda: open_fds() <= before, what="the slow connections' descriptors")
