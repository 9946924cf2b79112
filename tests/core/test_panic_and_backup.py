"""When too many backends are down: backups (HAProxy) and panic mode (Envoy)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from loble.core import (
    AdminInput,
    ConfigError,
    ConnectBackend,
    HealthInput,
    HealthState,
    PanicChanged,
    ProxyCore,
    SnapshotPublished,
    parse_config,
)

PRIMARIES = [f"10.7.0.{i}:80" for i in range(1, 5)]
BACKUPS = ["10.7.1.1:80", "10.7.1.2:80"]


def core(panic: float = 0.0, backups: tuple[str, ...] = ()) -> ProxyCore:
    document: dict[str, Any] = {
        "balancer": {"panic_threshold": panic, "connect_retries": 0},
        "health": {"failure_threshold": 1, "success_threshold": 1},
        "backends": [{"address": a} for a in PRIMARIES]
        + [{"address": a, "backup": True} for a in backups],
    }
    proxy = ProxyCore(parse_config(document), random.Random(1))
    proxy.start(0.0)
    return proxy


def fail(proxy: ProxyCore, address: str, now: float = 1.0) -> list[Any]:
    """Make ``address`` (carrying nothing) unhealthy: its connect is refused."""
    for _ in range(100):
        connection_id, outputs = proxy.accept(now)
        connects = [o for o in outputs if isinstance(o, ConnectBackend)]
        if not connects:
            break
        (connect,) = connects
        if connect.backend.address == address:
            events = proxy.connect_failed(connection_id, connect.attempt, now)
            assert proxy.control.state(address) is HealthState.UNHEALTHY
            return events
        # Another backend's: it connects and ends, leaving nothing active.
        proxy.connected(connection_id, connect.attempt, now)
        proxy.client_eof(connection_id, now)
        proxy.backend_eof(connection_id, now)
    raise AssertionError(f"{address} was never picked")


def eligible(proxy: ProxyCore) -> tuple[str, ...]:
    return proxy.snapshot.addresses


def test_backups_wait_until_no_primary_is_healthy() -> None:
    proxy = core(backups=tuple(BACKUPS))
    assert eligible(proxy) == tuple(PRIMARIES)
    for address in PRIMARIES[:3]:
        proxy.control.apply(address, HealthInput.PROBE_FAILURE, 1.0)
    assert eligible(proxy) == (PRIMARIES[3],)  # one primary left: still no backup
    events = proxy.control.apply(PRIMARIES[3], HealthInput.PROBE_FAILURE, 1.0)
    assert eligible(proxy) == tuple(BACKUPS)
    assert isinstance(events[-1], SnapshotPublished)
    # The first primary back takes over again.
    proxy.control.apply(PRIMARIES[0], HealthInput.PROBE_SUCCESS, 2.0)
    assert eligible(proxy) == (PRIMARIES[0],)


def test_an_operator_drained_primary_counts_as_not_there() -> None:
    proxy = core(backups=(BACKUPS[0],))
    for address in PRIMARIES:
        proxy.admin(address, AdminInput.DRAIN, 1.0)
    assert eligible(proxy) == (BACKUPS[0],)


def test_below_the_panic_threshold_every_primary_takes_connections() -> None:
    proxy = core(panic=0.5)
    events = []
    for address in PRIMARIES[:2]:
        events += proxy.control.apply(address, HealthInput.PROBE_FAILURE, 1.0)
    assert eligible(proxy) == tuple(PRIMARIES[2:])  # 2 of 4 healthy: at the threshold, fine
    events = proxy.control.apply(PRIMARIES[2], HealthInput.PROBE_FAILURE, 1.0)
    panics = [e for e in events if isinstance(e, PanicChanged)]
    assert panics == [PanicChanged(at=1.0, panic=True, healthy=1, total=4)]
    assert eligible(proxy) == tuple(PRIMARIES)  # 1 of 4: spread over all
    assert isinstance(events[-1], SnapshotPublished)  # after the change that caused it
    # Connections reach the unhealthy ones too, and count on them.
    picks = set()
    for _ in range(40):
        connection_id, outputs = proxy.accept(2.0)
        (connect,) = [o for o in outputs if isinstance(o, ConnectBackend)]
        proxy.connected(connection_id, connect.attempt, 2.0)
        picks.add(connect.backend.address)
    assert picks == set(PRIMARIES)
    assert proxy.control.active_connections(PRIMARIES[0]) > 0
    assert proxy.control.state(PRIMARIES[0]) is HealthState.UNHEALTHY  # passive success: no
    # Enough probe successes end the panic.
    events = proxy.control.apply(PRIMARIES[0], HealthInput.PROBE_SUCCESS, 3.0)
    assert [e for e in events if isinstance(e, PanicChanged)] == [
        PanicChanged(at=3.0, panic=False, healthy=2, total=4)
    ]
    assert eligible(proxy) == (PRIMARIES[0], PRIMARIES[3])


def test_with_no_primary_healthy_backups_come_before_panic() -> None:
    proxy = core(panic=0.5, backups=(BACKUPS[0],))
    for address in PRIMARIES:
        proxy.control.apply(address, HealthInput.PROBE_FAILURE, 1.0)
    assert eligible(proxy) == (BACKUPS[0],)
    assert not proxy.control.panic
    events = proxy.control.apply(BACKUPS[0], HealthInput.PROBE_FAILURE, 1.0)
    assert eligible(proxy) == tuple(PRIMARIES)  # nothing healthy at all: panic
    assert [e.panic for e in events if isinstance(e, PanicChanged)] == [True]


def test_without_a_threshold_there_is_never_panic() -> None:
    proxy = core()
    for address in PRIMARIES:
        proxy.control.apply(address, HealthInput.PROBE_FAILURE, 1.0)
    assert eligible(proxy) == ()
    _, outputs = proxy.accept(2.0)
    assert [type(o).__name__ for o in outputs][-1] == "ConnectionClosed"  # no backend


def test_a_reload_sets_the_threshold_and_the_backups() -> None:
    proxy = core()
    for address in PRIMARIES[:3]:
        proxy.control.apply(address, HealthInput.PROBE_FAILURE, 1.0)
    document = {
        "balancer": {"panic_threshold": 0.5},
        "backends": [{"address": a} for a in PRIMARIES] + [{"address": BACKUPS[0], "backup": True}],
    }
    outputs = proxy.reconfigure(parse_config(document), 2.0)
    assert any(isinstance(o, PanicChanged) and o.panic for o in outputs)
    assert eligible(proxy) == tuple(PRIMARIES)


def test_a_new_weight_keeps_a_backup_a_backup() -> None:
    proxy = core(backups=(BACKUPS[0],))
    proxy.set_weight(BACKUPS[0], 5, 1.0)
    backend = proxy.control.backends[BACKUPS[0]]
    assert (backend.weight, backend.backup) == (5, True)
    assert eligible(proxy) == tuple(PRIMARIES)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"balancer": {"panic_threshold": 2}}, "balancer.panic_threshold: 2 must be from 0 to 1"),
        (
            {"backends": [{"address": "10.7.0.1:80", "backup": "yes"}]},
            "backends[0].backup: 'yes' is not true or false",
        ),
    ],
)
def test_each_bad_key_is_one_line(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"backends": [{"address": "10.7.0.1:80"}], **document})
    assert caught.value.errors == [message]


def test_refused_connects_drive_a_panic_too() -> None:
    proxy = core(panic=0.75)
    events = fail(proxy, PRIMARIES[0])
    events += fail(proxy, PRIMARIES[1])
    assert any(isinstance(e, PanicChanged) and e.panic for e in events)
    assert eligible(proxy) == tuple(PRIMARIES)
