"""Slow start: a backend back in rotation takes a growing share of new connections."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from loble.core import (
    AdminInput,
    BackendStateChanged,
    ConnectBackend,
    HealthState,
    ProbeBackend,
    ProxyCore,
    parse_config,
)

A, B, C, D = (f"10.6.0.{i}:80" for i in range(1, 5))


def core(algorithm: str = "random", **balancer: Any) -> ProxyCore:
    document = {
        "balancer": {"algorithm": algorithm, "connect_retries": 0, **balancer},
        "health": {"failure_threshold": 1, "success_threshold": 1, "probe_interval": 1.0},
        "timeouts": {"connect": 5.0, "idle": 1_000.0},
        "backends": [{"address": address} for address in (A, B, C, D)],
    }
    return ProxyCore(parse_config(document), random.Random(7))


def pick(proxy: ProxyCore, now: float, client: tuple[str, int] | None = None) -> str:
    _, outputs = proxy.accept(now, client)
    (connect,) = [output for output in outputs if isinstance(output, ConnectBackend)]
    return connect.backend.address


def take_out(proxy: ProxyCore, address: str, at: float) -> None:
    """A refused connect makes ``address`` (carrying nothing) unhealthy at ``at``."""
    while True:
        connection_id, outputs = proxy.accept(at)
        (connect,) = [output for output in outputs if isinstance(output, ConnectBackend)]
        if connect.backend.address == address:
            break
        proxy.connected(connection_id, connect.attempt, at)  # others carry on
    proxy.connect_failed(connection_id, connect.attempt, at)
    assert proxy.control.state(address) is HealthState.UNHEALTHY


def bring_back(proxy: ProxyCore, address: str, at: float) -> None:
    """Its probe, sent a second before ``at``, succeeds at ``at``."""
    probes = [o for o in proxy.handle_timer(at - 1.0) if isinstance(o, ProbeBackend)]
    assert [probe.backend.address for probe in probes] == [address]
    changes = proxy.probe_result(address, True, at)
    assert any(isinstance(o, BackendStateChanged) and o.new is HealthState.HEALTHY for o in changes)


def take_out_and_back(proxy: ProxyCore, address: str, at: float) -> None:
    take_out(proxy, address, at - 2.0)
    bring_back(proxy, address, at)


def share_of(proxy: ProxyCore, address: str, now: float, count: int = 4_000) -> float:
    return Counter(pick(proxy, now) for _ in range(count))[address] / count


def test_without_slow_start_a_recovered_backend_takes_its_share_at_once() -> None:
    proxy = core()
    take_out_and_back(proxy, A, 10.0)
    assert share_of(proxy, A, 10.0) == pytest.approx(0.25, abs=0.03)


def test_its_share_grows_from_the_floor_to_all_of_it_over_the_window() -> None:
    proxy = core(slow_start=10.0, slow_start_floor=0.1)
    take_out_and_back(proxy, A, 10.0)
    # Picked a quarter of the time, kept with the ramp's probability.
    for elapsed, kept in ((0.0, 0.1), (5.0, 0.55), (9.0, 0.91)):
        assert share_of(proxy, A, 10.0 + elapsed) == pytest.approx(0.25 * kept, abs=0.025)
    assert A in proxy.control.joined
    assert share_of(proxy, A, 20.0) == pytest.approx(0.25, abs=0.03)
    assert A not in proxy.control.joined  # ramped up: nothing to look at any more


def test_least_connections_does_not_flood_a_slow_starting_backend() -> None:
    def flood(proxy: ProxyCore) -> int:
        take_out(proxy, A, 1.0)
        for _ in range(30):  # the others carry 10 connections each meanwhile
            connection_id, outputs = proxy.accept(2.0)
            (connect,) = [o for o in outputs if isinstance(o, ConnectBackend)]
            proxy.connected(connection_id, connect.attempt, 2.0)
        bring_back(proxy, A, 10.0)
        return Counter(pick(proxy, 10.0) for _ in range(20))[A]

    # Without: it has nothing active (the others 10 each), so it takes most
    # of the next 20 (each counts as active from its pick), until it catches up.
    assert flood(core("least_connections")) >= 12
    assert flood(core("least_connections", slow_start=30.0)) <= 6


def test_a_hashing_balancer_brings_back_a_growing_stable_set_of_clients() -> None:
    proxy = core("maglev", slow_start=10.0)
    clients = [(f"203.0.113.{i % 250}", i) for i in range(1_000)]
    twin = core("maglev")  # the same backends: the same home for every client
    home = {client for client in clients if pick(twin, 0.0, client) == A}
    take_out_and_back(proxy, A, 10.0)
    back = [
        {client for client in clients if pick(proxy, 10.0 + elapsed, client) == A}
        for elapsed in (1.0, 4.0, 8.0, 10.0)
    ]
    assert back[0] <= back[1] <= back[2] <= back[3] == home  # growing, and only its own
    assert len(back[0]) < len(home) / 2


@pytest.mark.parametrize("how", ["maintenance", "added"])
def test_a_backend_back_from_maintenance_or_added_by_a_reload_starts_slow(how: str) -> None:
    proxy = core(slow_start=10.0)
    if how == "maintenance":
        proxy.admin(A, AdminInput.MAINTENANCE, 0.0)
        proxy.admin(A, AdminInput.READY, 10.0)
        joined = A
    else:
        joined = "10.6.0.9:80"
        document = {
            "balancer": {"slow_start": 10.0},
            "backends": [{"address": a} for a in (A, B, C, D, joined)],
        }
        proxy.reconfigure(parse_config(document), 10.0)
    assert proxy.control.joined == {joined: 10.0}
    assert share_of(proxy, joined, 10.0) < 0.1


def test_a_backend_back_from_draining_kept_its_load_and_needs_no_warm_up() -> None:
    proxy = core(slow_start=10.0)
    connection_id, outputs = proxy.accept(0.0)
    (connect,) = [o for o in outputs if isinstance(o, ConnectBackend)]
    proxy.connected(connection_id, connect.attempt, 0.0)
    address = connect.backend.address
    refused, outputs = proxy.accept(1.0)
    while next(o for o in outputs if isinstance(o, ConnectBackend)).backend.address != address:
        proxy.connected(refused, 1, 1.0)
        refused, outputs = proxy.accept(1.0)
    proxy.connect_failed(refused, 1, 1.0)
    assert proxy.control.state(address) is HealthState.DRAINING
    proxy.handle_timer(2.0)
    proxy.probe_result(address, True, 2.0)
    assert proxy.control.state(address) is HealthState.HEALTHY
    assert proxy.control.joined == {}


def test_a_reload_sets_slow_start_for_the_next_picks() -> None:
    proxy = core()
    take_out_and_back(proxy, A, 10.0)
    document = {
        "balancer": {"slow_start": 100.0},
        "backends": [{"address": a} for a in (A, B, C, D)],
    }
    proxy.reconfigure(parse_config(document), 10.0)
    assert share_of(proxy, A, 10.0) == pytest.approx(0.25 * 0.1, abs=0.02)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("slow_start", -1.0, "balancer.slow_start: -1.0 must be at least 0.0 seconds"),
        ("slow_start_floor", 1.5, "balancer.slow_start_floor: 1.5 must be from 0 to 1"),
        ("slow_start_floor", "all", "balancer.slow_start_floor: 'all' is not a number"),
    ],
)
def test_each_bad_slow_start_key_is_one_line(key: str, value: object, message: str) -> None:
    from loble.core import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config({"balancer": {key: value}, "backends": [{"address": A}]})
    assert caught.value.errors == [message]
