"""Property-based tests: whole generated scenarios, and the control plane as a machine.

Hypothesis draws the fleet, the config, the clients, the fault schedule and
the seed. The seed is drawn as an integer, so a failure shrinks to a small
scenario and a small seed, and replays with exactly that seed.
"""

from __future__ import annotations

import os
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from loble.core import (
    ALGORITHMS,
    Backend,
    Config,
    HealthConfig,
    HealthInput,
    HealthReport,
    HealthState,
    ProbeBackend,
    ProxyCore,
    Snapshot,
    parse_config,
)
from loble.core._control import ControlPlane
from loble.sim import BEHAVIOURS, Monitor, Simulation, build_report, parse_scenario

SCALE = 20 if os.environ.get("LOBLE_THOROUGH") else 1
"""An explicit max_examples overrides the profile, so LOBLE_THOROUGH scales them here."""

seconds = st.floats(min_value=0.05, max_value=2.0, allow_nan=False).map(lambda x: round(x, 3))


@st.composite
def lb_config(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(1, 5))
    interval = draw(st.floats(0.2, 2.0).map(lambda x: round(x, 2)))
    # A probe may take at most an interval (the config refuses longer).
    timeout = min(interval, draw(st.floats(0.05, 1.0).map(lambda x: round(x, 2))))
    return {
        "balancer": {
            "algorithm": draw(st.sampled_from(ALGORITHMS)),
            "connect_retries": draw(st.integers(0, 3)),
        },
        "health": {
            "failure_threshold": draw(st.integers(1, 4)),
            "success_threshold": draw(st.integers(1, 3)),
            "probe_interval": interval,
            "probe_timeout": timeout,
            "active": draw(st.booleans()),
        },
        "timeouts": {
            "connect": draw(st.floats(0.1, 2.0).map(lambda x: round(x, 2))),
            "idle": draw(st.sampled_from([1.0, 5.0, 60.0])),
            "drain": draw(st.sampled_from([0.0, 1.0, 5.0])),
        },
        "backends": [
            {"address": f"10.1.0.{i + 1}:80", "weight": draw(st.integers(1, 10))}
            for i in range(count)
        ],
    }


def fault(at: float, until: float | None, backend: str, behaviour: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"at": at, "backend": backend, "behaviour": behaviour}
    if until is not None:
        entry["until"] = until
    return entry


@st.composite
def faults(draw: st.DrawFn, addresses: list[str], end: float, *, must_end: bool) -> list[Any]:
    schedule = []
    for _ in range(draw(st.integers(0, 4))):
        at = round(draw(st.floats(0.0, end * 0.8)), 2)
        until: float | None = round(at + draw(st.floats(0.5, end)), 2)
        if must_end:
            until = min(until, end) if until is not None and until > at else None
            if until is None or until <= at:
                continue
        elif draw(st.booleans()):
            until = None
        entry = fault(
            at, until, draw(st.sampled_from([*addresses, "*"])), draw(st.sampled_from(BEHAVIOURS))
        )
        entry.update(
            period=draw(st.sampled_from([0.5, 2.0, 6.0])),
            limit=draw(st.integers(0, 5)),
            delay=draw(st.sampled_from([0.0, 0.05, 0.5, 3.0])),
            probability=draw(st.sampled_from([0.0, 0.3, 1.0])),
        )
        schedule.append(entry)
    return schedule


def clients(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "arrival": draw(st.sampled_from(["poisson", "constant"])),
        "rate": draw(st.floats(1.0, 40.0).map(lambda x: round(x, 1))),
        "duration": {"kind": "uniform", "low": 0.0, "high": draw(seconds) * 2},
        "half_close": draw(st.sampled_from([0.0, 0.5, 1.0])),
    }


LATENCY = {"kind": "uniform", "low": 0.0002, "high": 0.004}


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    document = draw(lb_config())
    addresses = [b["address"] for b in document["backends"]]
    duration = draw(st.floats(2.0, 20.0).map(lambda x: round(x, 1)))
    document["sim"] = {
        "duration": duration,
        "clients": clients(draw),
        "network": {"latency": LATENCY},
        "faults": draw(faults(addresses, duration, must_end=False)),
    }
    if draw(st.booleans()):
        document["sim"]["shutdown_at"] = round(draw(st.floats(0.0, duration)), 2)
    return document


@given(document=scenarios(), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60 * SCALE)
def test_every_invariant_holds_in_generated_scenarios(document: dict[str, Any], seed: int) -> None:
    report = build_report(Simulation(parse_scenario(document), seed).run())
    failed = [row["first"] for row in report["invariants"] if not row["held"]]
    assert report["ok"], failed
    seen = report["clients"]
    # Every arrival is accounted for: an outcome, still open, or refused by
    # the kernel after the process stopped; and each is seen one way.
    assert (
        sum(seen["outcomes"].values()) + seen["in_flight_at_end"] + seen["refused_after_stop"]
        == seen["arrived"]
        == sum(seen["seen"].values()) + seen["in_flight_at_end"]
    )


POOL = [f"10.1.0.{i + 1}:80" for i in range(7)]
"""Addresses a reload may add: the generated fleet's, and two more."""


@st.composite
def operations(draw: st.DrawFn, base: dict[str, Any], end: float) -> list[dict[str, Any]]:
    """An operator's random requests and reloads; refused ones are part of the test."""
    schedule: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 6))):
        at = round(draw(st.floats(0.0, end)), 2)
        action = draw(
            st.sampled_from(["drain", "undrain", "maintenance", "ready", "weight"] + ["reload"] * 2)
        )
        if action != "reload":
            entry: dict[str, Any] = {
                "at": at,
                "action": action,
                "backend": draw(st.sampled_from(POOL[:5])),
            }
            if action == "weight":
                entry["weight"] = draw(st.integers(1, 10))
            schedule.append(entry)
            continue
        fleet = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=5, unique=True))
        config: dict[str, Any] = {
            "backends": [{"address": a, "weight": draw(st.integers(1, 10))} for a in fleet]
        }
        if draw(st.booleans()):
            other = draw(lb_config())
            config.update({key: other[key] for key in ("balancer", "health", "timeouts")})
            config["timeouts"]["removal"] = draw(st.sampled_from([0.0, 0.2, 1.0]))
        schedule.append({"at": at, "action": "reload", "config": config})
    return schedule


@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60 * SCALE)
def test_every_invariant_holds_under_random_operations_and_reloads(
    data: st.DataObject, seed: int
) -> None:
    document = data.draw(lb_config())
    duration = data.draw(st.floats(2.0, 15.0).map(lambda x: round(x, 1)))
    addresses = [b["address"] for b in document["backends"]]
    document["sim"] = {
        "duration": duration,
        "clients": clients(data.draw),
        "network": {"latency": LATENCY},
        "faults": data.draw(faults(addresses, duration, must_end=False)),
        "operations": data.draw(operations(document, duration)),
    }
    if data.draw(st.booleans()):
        document["sim"]["shutdown_at"] = round(data.draw(st.floats(0.0, duration)), 2)
    # An operation may name a backend only the pool knows: give it a home.
    known = set(addresses)
    for operation in document["sim"]["operations"]:
        known.update(b["address"] for b in operation.get("config", {}).get("backends", []))
    for operation in document["sim"]["operations"]:
        if operation.get("backend") not in known and operation["action"] != "reload":
            operation["backend"] = addresses[0]
    simulation = Simulation(parse_scenario(document), seed).run()
    report = build_report(simulation)
    failed = [row["first"] for row in report["invariants"] if not row["held"]]
    assert report["ok"], failed
    seen = report["clients"]
    # Every arrival is accounted for: an outcome, still open, or refused by
    # the kernel after the process stopped; and each is seen one way.
    assert (
        sum(seen["outcomes"].values()) + seen["in_flight_at_end"] + seen["refused_after_stop"]
        == seen["arrived"]
        == sum(seen["seen"].values()) + seen["in_flight_at_end"]
    )


def recovery_bound(
    config: Config, max_duration: float, max_rtt: float, max_delay: float = 0.0
) -> float:
    """How long after the last fault ends every backend must be HEALTHY again.

    Let T be the end of the last fault; from then on every backend answers.

    1. Failure verdicts can still arrive from work begun before T: a connect
       attempt times out at most ``connect`` after it began, and a probe at most
       ``probe_timeout`` after. After T1 = T + max(connect, probe_timeout) every
       input is a success, so no HEALTHY backend leaves HEALTHY again.
    2. A DRAINING backend gets no new connections, and each one it has was
       established by T1 and lasts at most the longest client duration, plus a
       round trip for each side's EOF, plus the added delay of a ``slow``
       fault: a backend's EOF sent while it was slow lands that much later,
       even if the fault ended meanwhile (``max_delay``). It is UNHEALTHY by
       T2 = T1 + max_duration + 2 * max_rtt + max_delay.
    3. An UNHEALTHY backend is probed every ``probe_interval``; the first probe
       due after max(T1, the moment it became UNHEALTHY) comes at most one
       interval later, and ``success_threshold`` probes, each answering within
       one round trip, bring it back: by T2 + (success_threshold + 1) *
       probe_interval + max_rtt, with one interval of slack for the probe that
       was skipped because an older one was still in flight.
    """
    health = config.health
    settle_failures = max(config.timeouts.connect, health.probe_timeout)
    drain = max_duration + 2 * max_rtt + max_delay
    probes = (health.success_threshold + 1) * health.probe_interval + max_rtt
    return settle_failures + drain + probes


@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=40 * SCALE)
def test_liveness_every_answering_backend_recovers_within_the_bound(
    data: st.DataObject, seed: int
) -> None:
    document = data.draw(lb_config())
    addresses = [b["address"] for b in document["backends"]]
    faults_end = data.draw(st.floats(1.0, 10.0).map(lambda x: round(x, 1)))
    schedule = data.draw(faults(addresses, faults_end, must_end=True))
    client_table = clients(data.draw)
    config = parse_config(document)
    slow = [fault["delay"] for fault in schedule if fault["behaviour"] == "slow"]
    bound = recovery_bound(
        config, client_table["duration"]["high"], LATENCY["high"], max(slow, default=0.0)
    )
    check_at = faults_end + bound
    document["sim"] = {
        "duration": check_at + 1.0,
        "clients": client_table,
        "network": {"latency": LATENCY},
        "faults": schedule,
    }
    report = build_report(Simulation(parse_scenario(document), seed).run())
    assert report["ok"]
    for address in addresses:
        state = "healthy"
        for change in report["timeline"]:
            if change["address"] == address and change["at"] <= check_at:
                state = change["new"]
        assert state == "healthy", (address, check_at, report["timeline"])


# -- the control plane as a state machine ----------------------------------------------


class _ControlOnly:
    """The one piece of a core the monitor reads at each step: the snapshot."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    @property
    def snapshot(self) -> Snapshot:
        return self.control.snapshot


class ControlPlaneMachine(RuleBasedStateMachine):
    """Drive ControlPlane with any legal sequence; the Monitor checks every output."""

    @initialize(
        count=st.integers(1, 4),
        failure_threshold=st.integers(1, 4),
        success_threshold=st.integers(1, 3),
        active=st.booleans(),
    )
    def setup(
        self, count: int, failure_threshold: int, success_threshold: int, active: bool
    ) -> None:
        self.addresses = [f"10.2.0.{i + 1}:80" for i in range(count)]
        health = HealthConfig(
            failure_threshold=failure_threshold,
            success_threshold=success_threshold,
            probe_interval=1.0,
            active=active,
        )
        self.control = ControlPlane((Backend(address=a) for a in self.addresses), health)
        config = parse_config(
            {
                "health": {
                    "failure_threshold": failure_threshold,
                    "success_threshold": success_threshold,
                },
                "backends": [{"address": a} for a in self.addresses],
            }
        )
        self.monitor = Monitor(config, cast(ProxyCore, _ControlOnly(self.control)))
        self.now = 0.0
        self.attempts: list[tuple[str, bool]] = []  # (address, verdict given)
        self.probes: list[str] = []
        self.feed(self.control.start(self.now))

    def feed(self, outputs: list[Any]) -> None:
        handlers = {
            "BackendStateChanged": self.monitor.state_changed,
            "SnapshotPublished": self.monitor.snapshot_published,
        }
        for output in outputs:
            if isinstance(output, ProbeBackend):
                self.probes.append(output.backend.address)
                self.monitor.probe_sent(output.backend.address)
            else:
                handlers[type(output).__name__](output, self.now)
        self.monitor.end_step()

    def apply(self, address: str, health_input: HealthInput) -> None:
        self.monitor.step += 1
        self.monitor.health_report(HealthReport(address=address, input=health_input), self.now)
        self.feed(self.control.apply(address, health_input, self.now))

    @rule(data=st.data())
    def start_connection(self, data: st.DataObject) -> None:
        eligible = list(self.control.snapshot.addresses)
        if eligible:
            address = data.draw(st.sampled_from(eligible))
            self.attempts.append((address, False))
            self.apply(address, HealthInput.CONNECTION_STARTED)

    @precondition(lambda self: any(not given for _, given in self.attempts))
    @rule(data=st.data(), ok=st.booleans())
    def verdict(self, data: st.DataObject, ok: bool) -> None:
        pending = [i for i, (_, given) in enumerate(self.attempts) if not given]
        index = data.draw(st.sampled_from(pending))
        address = self.attempts[index][0]
        self.attempts[index] = (address, True)
        self.apply(address, HealthInput.PASSIVE_SUCCESS if ok else HealthInput.PASSIVE_FAILURE)

    @precondition(lambda self: bool(self.attempts))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.attempts) - 1))
        address, _ = self.attempts.pop(index)
        self.apply(address, HealthInput.CONNECTION_FINISHED)

    @rule(seconds=st.floats(0.1, 3.0))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.monitor.step += 1
        self.feed(list(self.control.handle_timer(self.now)))

    @precondition(lambda self: bool(self.probes))
    @rule(data=st.data(), ok=st.booleans())
    def probe_result(self, data: st.DataObject, ok: bool) -> None:
        address = self.probes.pop(data.draw(st.integers(0, len(self.probes) - 1)))
        self.monitor.step += 1
        self.monitor.probe_result(address, ok)
        self.feed(self.control.probe_result(address, ok, self.now))

    @invariant()
    def monitor_saw_no_violation(self) -> None:
        assert self.monitor.violations == []

    @invariant()
    def snapshot_is_exactly_the_healthy_set(self) -> None:
        states = self.control.states()
        healthy = tuple(a for a in self.addresses if states[a] is HealthState.HEALTHY)
        assert self.control.snapshot.addresses == healthy

    @invariant()
    def draining_means_busy_and_unhealthy_means_idle(self) -> None:
        for address in self.addresses:
            active = self.control.active_connections(address)
            assert active == sum(1 for a, _ in self.attempts if a == address)
            state = self.control.state(address)
            if state is HealthState.UNHEALTHY:
                assert active == 0
            if state is HealthState.DRAINING:
                assert active > 0


ControlPlaneMachine.TestCase.settings = settings(max_examples=60 * SCALE, stateful_step_count=40)
TestControlPlane = ControlPlaneMachine.TestCase
