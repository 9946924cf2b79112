"""``max_connections`` and the queue in the simulator: the shipped scenario,
and the monitor catching a core that breaks the "connection limits" rules."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from loble.core import (
    Backend,
    ConnectBackend,
    ConnectionClosed,
    ConnectionQueued,
    Outcome,
    ProxyCore,
    SnapshotPublished,
)
from loble.sim import Monitor, Simulation, build_report, load_scenario, parse_scenario

from .conftest import REPO, document

A, B = "10.9.0.1:80", "10.9.0.2:80"
LIMITED = [{"address": A, "max_connections": 1}, {"address": B, "max_connections": 1}]


def test_the_shipped_scenario_queues_the_burst_and_no_backend_passes_its_limit() -> None:
    loaded = load_scenario(REPO / "scenarios" / "backend-limits.toml")
    simulation = Simulation(loaded, 1).run()
    report = build_report(simulation)
    assert report["ok"], report["invariants"]
    queue = report["traffic_policy"]["queue"]
    assert queue["served"] > 0 and queue["timed_out"] > 0
    assert queue["queued"] == queue["served"] + queue["timed_out"]
    assert queue["wait_ms"]["max"] <= 1000.0 + 1e-6  # queue_timeout = 1 s
    peaks = [b.peak_connections for b in simulation.core.statistics().backends]
    assert peaks == [15, 15]  # both reached their limit, and never passed it


def test_at_the_burst_rate_the_capacity_holds_without_the_queue_refusing(tmp_path: Path) -> None:
    text = (REPO / "scenarios" / "backend-limits.toml").read_text()
    changed = tmp_path / "gentler.toml"
    changed.write_text(text.replace("rate = 65.0", "rate = 60.0"))
    report = build_report(Simulation(load_scenario(changed), 1).run())
    assert report["ok"], report["invariants"]
    queue = report["traffic_policy"]["queue"]
    assert queue["served"] == queue["queued"] > 0
    assert queue["timed_out"] == queue["refused_full"] == 0


def monitor(**changes: Any) -> Monitor:
    loaded = parse_scenario(document(backends=LIMITED, **changes))
    watcher = Monitor(loaded.config, ProxyCore(loaded.config, random.Random(1)))
    watcher.snapshot_published(SnapshotPublished(at=0.0, version=1, addresses=(A, B)), 0.0)
    return watcher


def start(watcher: Monitor, connection_id: int, address: str) -> None:
    watcher.accepted_connection(connection_id, [])
    action = ConnectBackend(
        connection_id=connection_id, backend=Backend(address=address), attempt=1
    )
    watcher.connect_started(action, watcher.now)
    watcher.connected(connection_id, watcher.now)


def full(**changes: Any) -> Monitor:
    """A monitor that saw both backends take their one connection each."""
    watcher = monitor(**changes)
    start(watcher, 1, A)
    start(watcher, 2, B)
    return watcher


def queue(watcher: Monitor, connection_id: int, queued: int, deadline: float | None = None) -> None:
    watcher.accepted_connection(connection_id, [])
    due = watcher.now + watcher.queue_timeout if deadline is None else deadline
    event = ConnectionQueued(
        at=watcher.now, connection_id=connection_id, queued=queued, deadline=due
    )
    watcher.connection_queued(event, watcher.now)


def close(watcher: Monitor, connection_id: int, outcome: Outcome, backend: str | None) -> None:
    event = ConnectionClosed(
        at=watcher.now,
        connection_id=connection_id,
        backend=backend,
        outcome=outcome,
        attempts=0 if backend is None else 1,
        opened_at=0.0,
        connected_at=None,
    )
    watcher.connection_closed(event, watcher.now)


def names(watcher: Monitor) -> list[str]:
    return [v.invariant for v in watcher.violations]


def test_a_start_on_a_full_backend_is_caught() -> None:
    watcher = monitor()
    start(watcher, 1, A)
    start(watcher, 2, A)
    assert names(watcher) == ["connection limits"]


def test_queueing_beside_room_or_past_the_size_or_off_its_timeout_is_caught() -> None:
    watcher = monitor()
    start(watcher, 1, A)
    queue(watcher, 2, 1)  # B has room
    assert names(watcher) == ["connection limits"]
    watcher = full(balancer={"queue_size": 1})
    queue(watcher, 3, 1)
    assert names(watcher) == []
    queue(watcher, 4, 2)  # the queue holds one
    assert names(watcher) == ["connection limits"]
    watcher = full()
    queue(watcher, 3, 1, deadline=99.0)
    assert names(watcher) == ["connection limits"]


def test_leaving_the_queue_out_of_order_or_being_overtaken_is_caught() -> None:
    watcher = full()
    queue(watcher, 3, 1)
    queue(watcher, 4, 2)
    close(watcher, 1, Outcome.COMPLETED, A)
    start(watcher, 5, A)  # a new client ahead of the queue
    assert names(watcher) == ["connection limits"]
    watcher = full()
    queue(watcher, 3, 1)
    queue(watcher, 4, 2)
    close(watcher, 1, Outcome.COMPLETED, A)
    watcher.connect_started(
        ConnectBackend(connection_id=4, backend=Backend(address=A), attempt=1), watcher.now
    )
    assert names(watcher) == ["connection limits"]


def test_a_queue_that_waits_beside_room_at_the_end_of_a_step_is_caught() -> None:
    watcher = full()
    queue(watcher, 3, 1)
    watcher.end_step()
    assert names(watcher) == []
    close(watcher, 1, Outcome.COMPLETED, A)  # room on A, and nobody took it
    watcher.end_step()
    assert names(watcher) == ["connection limits"]


def test_a_queue_timeout_early_late_or_out_of_no_queue_is_caught() -> None:
    watcher = full(balancer={"queue_timeout": 2.0})
    queue(watcher, 3, 1)
    watcher.now = 1.0
    close(watcher, 3, Outcome.QUEUE_TIMEOUT, None)  # due at 2.0
    assert names(watcher) == ["connection limits"]
    watcher = full(balancer={"queue_timeout": 2.0})
    queue(watcher, 3, 1)
    watcher.now = 2.5
    watcher.end_step()
    assert names(watcher) == ["connection limits"]  # still queued past its deadline
    watcher = monitor()
    watcher.accepted_connection(9, [])
    close(watcher, 9, Outcome.QUEUE_TIMEOUT, None)
    close(watcher, 9, Outcome.QUEUE_FULL, None)
    assert names(watcher)[:2] == ["connection limits", "connection limits"]
