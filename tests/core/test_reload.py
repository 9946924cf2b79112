"""ProxyCore.reconfigure (a reload as a diff) and the statistics an operator reads."""

from __future__ import annotations

import random
from typing import Any

import pytest

from loble.core import (
    AdminInput,
    AdminState,
    BackendForgotten,
    BackendStateChanged,
    CloseConnection,
    ConnectBackend,
    ConnectionClosed,
    HealthState,
    LobleError,
    Outcome,
    Output,
    ProbeBackend,
    ProxyCore,
    Reconfigured,
    SnapshotPublished,
    WeightChanged,
    parse_config,
)
from loble.core._balancers import LeastConnections, RoundRobin

A, B, C = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"


def config(*addresses: str, **sections: Any) -> Any:
    return parse_config({"backends": [{"address": a} for a in addresses], **sections})


def core(*addresses: str, **sections: Any) -> ProxyCore:
    proxy = ProxyCore(config(*(addresses or (A, B)), **sections), random.Random(1))
    proxy.start(0.0)
    return proxy


def kinds(outputs: list[Output]) -> list[str]:
    return [type(output).__name__ for output in outputs]


def connect_to(proxy: ProxyCore, address: str, now: float) -> int:
    """Open a connection and steer it to ``address`` (drain the others for a moment)."""
    others = [a for a in proxy.snapshot.addresses if a != address]
    for other in others:
        proxy.admin(other, AdminInput.DRAIN, now)
    cid, outputs = proxy.accept(now)
    (connect,) = [o for o in outputs if isinstance(o, ConnectBackend)]
    assert connect.backend.address == address
    for other in others:
        proxy.admin(other, AdminInput.UNDRAIN, now)
    return cid


def stats_of(proxy: ProxyCore, address: str) -> Any:
    (found,) = [b for b in proxy.statistics().backends if b.address == address]
    return found


def test_a_reload_that_changes_nothing_still_says_so() -> None:
    proxy = core()
    version = proxy.snapshot.version
    assert proxy.reconfigure(config(A, B), 1.0) == [
        Reconfigured(at=1.0, added=(), removed=(), reweighted=(), changed=())
    ]
    assert proxy.snapshot.version == version


def test_changed_names_every_changed_key_as_a_dotted_path() -> None:
    proxy = core()
    new = config(
        A,
        B,
        listener={"address": "127.0.0.1:9100"},
        balancer={"algorithm": "least_connections"},
        health={"probe_interval": 3.0},
        admin={"enabled": True, "token": "t"},
    )
    (reloaded,) = proxy.reconfigure(new, 1.0)
    assert isinstance(reloaded, Reconfigured)
    assert reloaded.changed == (
        "listener.address",
        "balancer.algorithm",
        "health.probe_interval",
        "admin.enabled",
        "admin.token",
    )
    assert proxy.config is new
    assert isinstance(proxy.balancer, LeastConnections)


def test_the_same_algorithm_keeps_its_balancer() -> None:
    proxy = core()
    balancer = proxy.balancer
    assert isinstance(balancer, RoundRobin)
    proxy.reconfigure(config(A, B, timeouts={"idle": 10.0}), 1.0)
    assert proxy.balancer is balancer


def test_an_added_backend_joins_at_once() -> None:
    proxy = core()
    outputs = proxy.reconfigure(config(A, B, C), 1.0)
    assert outputs == [
        Reconfigured(at=1.0, added=(C,), removed=(), reweighted=(), changed=()),
        SnapshotPublished(at=1.0, version=2, addresses=(A, B, C)),
    ]
    assert stats_of(proxy, C).state is HealthState.HEALTHY


def test_with_active_probes_an_added_backend_must_prove_itself() -> None:
    health = {"active": True, "probe_interval": 1.0, "probe_timeout": 0.5, "success_threshold": 2}
    proxy = core(health=health)
    outputs = proxy.reconfigure(config(A, B, C, health=health), 0.5)
    assert kinds(outputs) == ["Reconfigured"]  # not in the snapshot yet
    added = stats_of(proxy, C)
    assert (added.state, added.since, added.reason) == (
        HealthState.UNHEALTHY,
        0.5,
        "added, awaiting probes",
    )
    probes = [o.backend.address for o in proxy.handle_timer(1.5) if isinstance(o, ProbeBackend)]
    assert C in probes
    assert proxy.probe_result(C, True, 1.6) == []
    proxy.handle_timer(2.5)
    outputs = proxy.probe_result(C, True, 2.6)
    assert kinds(outputs) == ["BackendStateChanged", "SnapshotPublished"]
    assert proxy.snapshot.addresses == (A, B, C)
    probed = stats_of(proxy, C)
    assert (probed.last_probe_at, probed.last_probe_ok, probed.since) == (2.6, True, 2.6)


def test_a_removed_backend_without_connections_is_forgotten_at_once() -> None:
    proxy = core(A, B, C)
    outputs = proxy.reconfigure(config(A, C), 1.0)
    assert outputs == [
        Reconfigured(at=1.0, added=(), removed=(B,), reweighted=(), changed=()),
        BackendForgotten(at=1.0, address=B),
        SnapshotPublished(at=1.0, version=2, addresses=(A, C)),
    ]
    assert [b.address for b in proxy.statistics().backends] == [A, C]
    with pytest.raises(LobleError, match="no backend"):
        proxy.admin(B, AdminInput.DRAIN, 2.0)


def test_a_removed_backends_connections_run_on_and_then_it_is_forgotten() -> None:
    proxy = core()
    cid = connect_to(proxy, B, 0.0)
    proxy.connected(cid, 1, 0.1)
    outputs = proxy.reconfigure(config(A), 1.0)
    assert kinds(outputs) == ["Reconfigured", "SnapshotPublished"]
    assert proxy.snapshot.addresses == (A,)
    leaving = stats_of(proxy, B)
    assert (leaving.removing, leaving.active_connections) == (True, 1)
    with pytest.raises(LobleError, match="was removed by a reload"):
        proxy.set_weight(B, 3, 1.5)
    proxy.client_eof(cid, 2.0)
    outputs = proxy.backend_eof(cid, 3.0)
    assert BackendForgotten(at=3.0, address=B) in outputs
    assert [b.address for b in proxy.statistics().backends] == [A]


def test_a_failed_connect_on_a_removed_backend_is_retried_and_blames_nobody() -> None:
    proxy = core()
    cid = connect_to(proxy, B, 0.0)
    proxy.reconfigure(config(A), 1.0)
    outputs = proxy.connect_failed(cid, 1, 1.5)
    assert kinds(outputs)[:4] == [
        "ConnectFailed",
        "HealthReport",
        "BackendForgotten",
        "HealthReport",
    ]
    (retry,) = [o for o in outputs if isinstance(o, ConnectBackend)]
    assert (retry.backend.address, retry.attempt) == (A, 2)


def test_the_removal_timeout_cuts_what_is_left_with_a_reset() -> None:
    proxy = core(timeouts={"removal": 5.0, "idle": 100.0})
    cid = connect_to(proxy, B, 0.0)
    proxy.connected(cid, 1, 0.1)
    kept = connect_to(proxy, A, 0.2)
    proxy.connected(kept, 1, 0.3)
    proxy.reconfigure(config(A, timeouts={"removal": 5.0, "idle": 100.0}), 1.0)
    assert proxy.next_deadline() == 6.0
    assert proxy.handle_timer(5.9) == []
    outputs = proxy.handle_timer(6.0)
    assert CloseConnection(connection_id=cid, outcome=Outcome.REMOVED, reset=True) in outputs
    (closed,) = [o for o in outputs if isinstance(o, ConnectionClosed)]
    assert (closed.connection_id, closed.outcome) == (cid, Outcome.REMOVED)
    # Forgotten as the cut attempt finishes, right after its close is announced.
    assert kinds(outputs) == [
        "CloseConnection",
        "ConnectionClosed",
        "HealthReport",
        "BackendForgotten",
    ]
    assert list(proxy.connections) == [kept]


def test_a_backend_re_added_before_it_is_forgotten_is_normal_again() -> None:
    proxy = core(timeouts={"removal": 5.0})
    cid = connect_to(proxy, B, 0.0)
    proxy.connected(cid, 1, 0.1)
    proxy.reconfigure(config(A, timeouts={"removal": 5.0}), 1.0)
    version = proxy.snapshot.version
    outputs = proxy.reconfigure(config(A, B, timeouts={"removal": 5.0}), 2.0)
    assert outputs == [
        Reconfigured(at=2.0, added=(B,), removed=(), reweighted=(), changed=()),
        SnapshotPublished(at=2.0, version=version + 1, addresses=(A, B)),
    ]
    back = stats_of(proxy, B)
    assert (back.removing, back.active_connections) == (False, 1)
    assert [o for o in proxy.handle_timer(6.0) if isinstance(o, CloseConnection)] == []
    proxy.client_eof(cid, 7.0)
    assert "BackendForgotten" not in kinds(proxy.backend_eof(cid, 7.1))
    assert stats_of(proxy, B).active_connections == 0


def test_a_removed_unhealthy_backend_is_no_longer_probed() -> None:
    proxy = core(health={"failure_threshold": 1, "probe_interval": 1.0})
    cid = connect_to(proxy, B, 0.0)
    other = connect_to(proxy, B, 0.0)
    proxy.connect_failed(cid, 1, 0.1)  # B draining, retry on A
    assert stats_of(proxy, B).state is HealthState.DRAINING
    proxy.reconfigure(config(A, health={"failure_threshold": 1, "probe_interval": 1.0}), 0.5)
    outputs = proxy.connect_failed(other, 1, 0.6)
    assert BackendForgotten(at=0.6, address=B) in outputs
    assert [o for o in proxy.handle_timer(5.0) if isinstance(o, ProbeBackend)] == []
    assert proxy.probe_result(B, True, 5.0) == []


def test_admin_states_survive_a_reload() -> None:
    proxy = core()
    proxy.admin(B, AdminInput.MAINTENANCE, 0.5)
    outputs = proxy.reconfigure(config(A, B, C), 1.0)
    assert outputs[-1] == SnapshotPublished(at=1.0, version=3, addresses=(A, C))
    assert stats_of(proxy, B).admin is AdminState.MAINT


def test_a_reload_reweights() -> None:
    proxy = core()
    new = parse_config({"backends": [{"address": A, "weight": 3}, {"address": B}]})
    assert proxy.reconfigure(new, 1.0) == [
        Reconfigured(at=1.0, added=(), removed=(), reweighted=(A,), changed=()),
        WeightChanged(at=1.0, address=A, old=1, new=3),
        SnapshotPublished(at=1.0, version=2, addresses=(A, B)),
    ]
    assert proxy.snapshot.backends[0].weight == 3


def test_a_reload_may_reorder_the_backends() -> None:
    proxy = core()
    outputs = proxy.reconfigure(config(B, A), 1.0)
    assert outputs[-1] == SnapshotPublished(at=1.0, version=2, addresses=(B, A))


def test_new_timeouts_are_for_new_connections() -> None:
    proxy = core(timeouts={"idle": 10.0})
    old = connect_to(proxy, A, 0.0)
    proxy.connected(old, 1, 0.0)
    proxy.reconfigure(config(A, B, timeouts={"idle": 100.0}), 1.0)
    assert proxy.timer_lead() == 2.0  # the probe interval is now the shortest
    new = connect_to(proxy, A, 1.0)
    proxy.connected(new, 1, 1.0)
    outputs = proxy.handle_timer(10.0)
    (closed,) = [o for o in outputs if isinstance(o, ConnectionClosed)]
    assert (closed.connection_id, closed.outcome) == (old, Outcome.IDLE_TIMEOUT)
    assert list(proxy.connections) == [new]


def test_new_thresholds_apply_to_the_next_verdicts() -> None:
    proxy = core(health={"failure_threshold": 5})
    first = connect_to(proxy, A, 0.0)
    proxy.connect_failed(first, 1, 0.1)  # one failure on A, retried on B
    proxy.reconfigure(config(A, B, health={"failure_threshold": 2}), 1.0)
    second = connect_to(proxy, A, 1.0)
    outputs = proxy.connect_failed(second, 1, 1.1)
    (changed,) = [o for o in outputs if isinstance(o, BackendStateChanged)]
    assert (changed.address, changed.new) == (A, HealthState.UNHEALTHY)


def test_a_shorter_probe_interval_applies_from_now() -> None:
    proxy = core(health={"active": True, "probe_interval": 600.0})
    assert proxy.next_deadline() == 600.0
    proxy.reconfigure(config(A, B, health={"active": True, "probe_interval": 2.0}), 10.0)
    assert proxy.next_deadline() == 12.0


def test_switching_active_probes_on_starts_them() -> None:
    proxy = core()
    assert proxy.next_deadline() is None
    proxy.reconfigure(config(A, B, health={"active": True}), 10.0)
    assert proxy.next_deadline() == 12.0


def test_a_new_drain_timeout_applies_to_the_next_shutdown() -> None:
    proxy = core()
    open_one = connect_to(proxy, A, 0.0)
    proxy.connected(open_one, 1, 0.0)
    proxy.reconfigure(config(A, B, timeouts={"drain": 3.0}), 1.0)
    (started,) = [o for o in proxy.shutdown(2.0) if type(o).__name__ == "ShutdownStarted"]
    assert started.deadline == 5.0  # type: ignore[attr-defined]


def test_statistics_count_peaks_probes_and_state_changes() -> None:
    proxy = core(health={"failure_threshold": 1, "probe_interval": 1.0})
    first = connect_to(proxy, A, 0.0)
    second = connect_to(proxy, A, 0.0)
    proxy.connected(first, 1, 0.1)
    proxy.connected(second, 1, 0.1)
    for cid in (first, second):
        proxy.client_eof(cid, 0.5)
        proxy.backend_eof(cid, 0.6)
    quiet = stats_of(proxy, A)
    assert (quiet.peak_connections, quiet.active_connections) == (2, 0)
    assert (quiet.since, quiet.reason, quiet.last_probe_at, quiet.last_probe_ok) == (
        None,
        "",
        None,
        None,
    )
    assert (quiet.admin, quiet.removing) == (AdminState.READY, False)
    failing = connect_to(proxy, B, 1.0)
    proxy.connect_failed(failing, 1, 1.2)
    down = stats_of(proxy, B)
    assert (down.state, down.since) == (HealthState.UNHEALTHY, 1.2)
    assert down.reason == "1 consecutive failures, no active connections"
    proxy.handle_timer(2.2)
    proxy.probe_result(B, False, 2.3)
    probed = stats_of(proxy, B)
    assert (probed.last_probe_at, probed.last_probe_ok) == (2.3, False)
