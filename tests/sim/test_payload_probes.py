"""Payload probes in the simulator: a frozen backend (``accept_hang``) is taken
out only by a probe that expects a reply, and the monitor holds probes to
their interval and jitter."""

from __future__ import annotations

import random
from typing import Any

import tomllib

from loble.core import ProxyCore
from loble.sim import Monitor, Simulation, build_report, parse_scenario

from .conftest import REPO, scenario

FROZEN = REPO / "scenarios" / "frozen-backend.toml"
THIRD = "10.0.9.3:6379"


def run(document: dict[str, Any], seed: int = 1) -> dict[str, Any]:
    loaded = parse_scenario(document, name="frozen-backend", base_dir=REPO / "scenarios")
    return build_report(Simulation(loaded, seed).run())


def frozen(**health: Any) -> dict[str, Any]:
    document = tomllib.loads(FROZEN.read_text(encoding="utf-8"))
    document["health"].update(health)
    for key in [key for key, value in document["health"].items() if value is None]:
        del document["health"][key]
    return document


def idle_timeouts(report: dict[str, Any]) -> int:
    return sum(
        row["connections"]
        for row in report["clients"]["seen_rows"]
        if row["outcome"] == "idle_timeout"
    )


def test_a_payload_probe_takes_a_frozen_backend_out_and_brings_it_back() -> None:
    report = run(frozen())
    assert report["ok"]
    changes = [(c["at"], c["old"], c["new"]) for c in report["timeline"] if c["address"] == THIRD]
    (out, at_out), drained, (back, at_back) = (
        (changes[0][1:], changes[0][0]),
        changes[1][1:],
        (changes[2][1:], changes[2][0]),
    )
    assert out == ("healthy", "draining") and drained == ("draining", "unhealthy")
    assert back == ("unhealthy", "healthy") and len(changes) == 3
    # Frozen at 15 s: three failed probes, each at most interval * 1.1 apart
    # and failing a timeout after it left.
    assert 15.0 < at_out <= 15.0 + 3 * 1.0 * 1.1 + 0.5
    # Thawed at 45 s: two answered probes.
    assert 45.0 < at_back <= 45.0 + 2 * 1.0 * 1.1 + 0.01
    assert report["backends"][2]["probe_failures"] > 0


def test_connect_only_probes_leave_the_frozen_backend_in_and_its_clients_hanging() -> None:
    with_payload = run(frozen())
    connect_only = run(frozen(probe_send=None, probe_expect=None))
    assert connect_only["ok"] and connect_only["timeline"] == []
    assert connect_only["backends"][2]["probe_failures"] == 0
    # Out within seconds, only the connections already on it hang: far fewer.
    assert idle_timeouts(with_payload) * 4 < idle_timeouts(connect_only)


def test_a_probe_that_sends_without_expecting_passes_on_a_frozen_backend() -> None:
    report = run(frozen(probe_expect=None))
    assert report["ok"] and report["timeline"] == []


def monitor(jitter: float) -> Monitor:
    loaded = scenario(
        health={"active": True, "probe_interval": 1.0, "probe_timeout": 0.5, "probe_jitter": jitter}
    )
    return Monitor(loaded.config, ProxyCore(loaded.config, random.Random(1)))


def on_time(watcher: Monitor) -> list[str]:
    return [v.message for v in watcher.violations if v.invariant == "timeouts on time"]


def send(watcher: Monitor, address: str, at: float) -> None:
    watcher.now = at
    watcher.timer_step = True
    watcher.probe_sent(address, at)
    watcher.timer_step = False
    watcher.probe_result(address, True)


def test_the_monitor_catches_a_probe_sooner_or_later_than_the_jitter_allows() -> None:
    watcher = monitor(0.1)
    for at in (1.0, 1.95, 3.0, 4.1):  # each within [0.9, 1.1] of the last
        send(watcher, "10.9.0.1:80", at)
    assert on_time(watcher) == []
    send(watcher, "10.9.0.1:80", 4.95)  # 0.85 after: too soon
    send(watcher, "10.9.0.1:80", 6.2)  # 1.25 after: too late
    too_soon, too_late = on_time(watcher)
    assert "sooner than probe_interval * (1 - probe_jitter)" in too_soon
    assert "later than probe_interval * (1 + probe_jitter)" in too_late


def test_a_probe_still_out_when_the_next_was_due_may_skip_a_round() -> None:
    watcher = monitor(0.0)
    watcher.now = 1.0
    watcher.timer_step = True
    watcher.probe_sent("10.9.0.1:80", 1.0)
    watcher.now = 2.5  # its answer after the next was due: that round was skipped
    watcher.probe_result("10.9.0.1:80", False)
    send(watcher, "10.9.0.1:80", 3.0)
    assert on_time(watcher) == []
    send(watcher, "10.9.0.1:80", 3.5)  # sooner is never allowed
    (too_soon,) = on_time(watcher)
    assert "before t=4.000000" in too_soon
