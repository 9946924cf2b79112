"""The backend health state machine.

Theory of operation
===================

Every backend is in one of three states:

* ``HEALTHY``: eligible for new connections; it is in the snapshot.
* ``DRAINING``: judged bad while connections were still running on it. It
  gets no new connections, and the ones it has run to completion; it is
  probed, and comes back with them if the probes say it recovered.
* ``UNHEALTHY``: judged bad and carrying nothing. It gets no client traffic;
  only health probes reach it.

::

    HEALTHY --failure_threshold failures, active > 0--> DRAINING
    HEALTHY --failure_threshold failures, active == 0--> UNHEALTHY
    DRAINING --active connections reach 0--> UNHEALTHY
    DRAINING --success_threshold probe successes--> HEALTHY (connections kept)
    UNHEALTHY --success_threshold probe successes--> HEALTHY

Six inputs drive it: a connection attempt started or finished on the backend
(which keeps ``active_connections``), a passive success or failure (the
verdict of a real connection attempt: it connected, or the connect was
refused or timed out) and a probe success or failure (a health check).

Rules that hold everywhere, and that this module alone enforces:

* **No flapping.** Only a full run of consecutive outcomes moves a backend:
  a success resets the failure count and a failure resets the success count.
  Entering ``UNHEALTHY`` resets both, so a backend becomes eligible again only
  after ``success_threshold`` consecutive successes seen *while* unhealthy;
  ``DRAINING`` is entered on a failure, so its success count starts at 0 too.
* **Safe draining.** A backend with active connections never becomes
  ``UNHEALTHY``; it drains first. ``DRAINING`` and ``UNHEALTHY`` backends are
  not in the snapshot, so no new connection starts on one, but in panic
  (``[balancer] panic_threshold``: too few healthy, so every backend takes
  connections). So every ``(state, input)`` pair has a row; a connection
  that an unhealthy backend carries in panic counts, and its success is no
  evidence (it comes back by probes alone).
* **Recovery needs probes.** A backend out of the snapshot gets no new
  traffic, so only probes bring it back: ``success_threshold`` consecutive
  probe successes, from ``UNHEALTHY`` or from ``DRAINING``. A ``DRAINING``
  backend that recovers keeps its connections, untouched: without that row a
  few seconds of trouble would keep a backend out for as long as its longest
  connection lasts (a pub/sub session or a pooled connection: hours). Which
  backends get probed, and when, is the control plane's job.
* **A payload check outweighs a connect.** A backend whose probes expect a
  reply (``probe_expect``, ``probe_expect_regex``: :attr:`BackendHealth.payload_probed`)
  can accept connects and answer nothing (a frozen process: the kernel
  completes the handshake). There a connect that succeeded proves less than
  a probe that failed, so while ``HEALTHY`` a passive success does not break
  a run of failures (HAProxy counts ``fall`` from its checks alone); with
  connect-only probes it does, being the same evidence as a probe success,
  and so it does without ``[health] active`` (no probe comes while the
  backend is healthy to end a run, and failures far apart must not add up).
* **Only probes earn recovery.** A passive success while ``DRAINING`` is the
  verdict of an attempt begun while the backend was still ``HEALTHY``: like a
  probe sent before a state change, it proves nothing about the backend
  since, so it neither counts towards the run nor breaks it. A failure of any
  kind breaks it: coming back late is cheap, flapping is not.

A passive success arrives while its attempt is active (the connect just
succeeded), so ``UNHEALTHY``, which carries nothing, never sees one. A
passive failure arrives right after its attempt's "finished" (the connect
was refused or timed out, so the attempt is over): it is weighed against the
backend's *other* connections, and it can reach a backend that has just
drained to ``UNHEALTHY``, where it only counts.

The whole machine is :data:`TRANSITIONS`, one dict keyed by
``(state, input)``. Each value is a rule: a function of the backend's health
record that updates its counters and returns the next state with the reason,
or ``None`` to stay.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from ._errors import StateMachineError

__all__ = [
    "TRANSITIONS",
    "BackendHealth",
    "HealthInput",
    "HealthState",
    "Thresholds",
    "Transition",
]


class HealthState(enum.Enum):
    # Members are singletons, so identity hashing is exact, and it runs in C:
    # Enum's own __hash__ is Python code on the hot path of every table lookup.
    __hash__ = object.__hash__

    HEALTHY = "healthy"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"


class HealthInput(enum.Enum):
    __hash__ = object.__hash__

    CONNECTION_STARTED = "connection_started"
    CONNECTION_FINISHED = "connection_finished"
    PASSIVE_SUCCESS = "passive_success"
    PASSIVE_FAILURE = "passive_failure"
    PROBE_SUCCESS = "probe_success"
    PROBE_FAILURE = "probe_failure"


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """How many consecutive outcomes it takes to change state."""

    failure_threshold: int = 3
    success_threshold: int = 2

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.success_threshold < 1:
            raise ValueError("thresholds must be >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition:
    """A state change, with the reason a person reads in the log."""

    old: HealthState
    new: HealthState
    reason: str


class BackendHealth:
    """The mutable health record of one backend; only the control plane holds it."""

    __slots__ = (
        "active_connections",
        "address",
        "consecutive_failures",
        "consecutive_successes",
        "payload_probed",
        "peak_connections",
        "state",
        "thresholds",
    )

    def __init__(self, address: str, thresholds: Thresholds) -> None:
        self.address = address
        self.thresholds = thresholds
        self.state = HealthState.HEALTHY
        self.active_connections = 0
        self.peak_connections = 0
        """The most ``active_connections`` ever reached, for the status page."""
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.payload_probed = False
        """Whether its probes expect a reply (set by the control plane): then a
        passive success does not break a run of failures."""

    def __repr__(self) -> str:
        return (
            f"BackendHealth({self.address!r}, state={self.state.name}, "
            f"active={self.active_connections}, failures={self.consecutive_failures}, "
            f"successes={self.consecutive_successes})"
        )

    def handle(self, health_input: HealthInput) -> Transition | None:
        """Apply one input; return the transition it caused, if any."""
        rule = TRANSITIONS[(self.state, health_input)]  # every pair has a row (panic)
        old = self.state
        outcome = rule(self)
        if outcome is None:
            return None
        new, reason = outcome
        self.state = new
        if new is HealthState.UNHEALTHY:
            # Recovery must be earned from scratch, while unhealthy.
            self.consecutive_failures = 0
            self.consecutive_successes = 0
        return Transition(old=old, new=new, reason=reason)


Rule = Callable[[BackendHealth], "tuple[HealthState, str] | None"]


# -- the rules -------------------------------------------------------------


def _started(health: BackendHealth) -> None:
    active = health.active_connections = health.active_connections + 1
    if active > health.peak_connections:
        health.peak_connections = active


def _finished(health: BackendHealth) -> None:
    if health.active_connections == 0:
        raise StateMachineError(
            f"backend {health.address}: can't handle CONNECTION_FINISHED "
            f"with no active connection (state={health.state.name})"
        )
    health.active_connections -= 1


def _count_success(health: BackendHealth) -> None:
    health.consecutive_failures = 0
    health.consecutive_successes += 1


def _healthy_passive_success(health: BackendHealth) -> None:
    """A connect succeeded: a success, but no answer to a payload probe's failures."""
    if not health.payload_probed:
        health.consecutive_failures = 0
    health.consecutive_successes += 1


def _count_failure(health: BackendHealth) -> None:
    health.consecutive_successes = 0
    health.consecutive_failures += 1


def _healthy_failure(health: BackendHealth) -> tuple[HealthState, str] | None:
    _count_failure(health)
    if health.consecutive_failures < health.thresholds.failure_threshold:
        return None
    reason = f"{health.consecutive_failures} consecutive failures"
    if health.active_connections > 0:
        return HealthState.DRAINING, f"{reason}, {health.active_connections} active"
    return HealthState.UNHEALTHY, f"{reason}, no active connections"


def _draining_finished(health: BackendHealth) -> tuple[HealthState, str] | None:
    _finished(health)
    if health.active_connections == 0:
        return HealthState.UNHEALTHY, "drained: last active connection finished"
    return None


def _unhealthy_success(health: BackendHealth) -> tuple[HealthState, str] | None:
    _count_success(health)
    if health.consecutive_successes < health.thresholds.success_threshold:
        return None
    return HealthState.HEALTHY, f"{health.consecutive_successes} consecutive probe successes"


def _draining_success(health: BackendHealth) -> tuple[HealthState, str] | None:
    _count_success(health)
    if health.consecutive_successes < health.thresholds.success_threshold:
        return None
    return HealthState.HEALTHY, (
        f"{health.consecutive_successes} consecutive probe successes while draining, "
        f"{health.active_connections} active kept"
    )


def _draining_passive_success(health: BackendHealth) -> None:
    """An attempt begun while HEALTHY connected: no evidence about the backend
    since it went out, so the probe run is left as it is."""


_H, _D, _U = HealthState.HEALTHY, HealthState.DRAINING, HealthState.UNHEALTHY
_I = HealthInput

TRANSITIONS: dict[tuple[HealthState, HealthInput], Rule] = {
    (_H, _I.CONNECTION_STARTED): _started,
    (_H, _I.CONNECTION_FINISHED): _finished,
    (_H, _I.PASSIVE_SUCCESS): _healthy_passive_success,
    (_H, _I.PASSIVE_FAILURE): _healthy_failure,
    (_H, _I.PROBE_SUCCESS): _count_success,
    (_H, _I.PROBE_FAILURE): _healthy_failure,
    # DRAINING and UNHEALTHY are out of the snapshot, but for panic
    # ([balancer] panic_threshold: too few healthy, so all take connections).
    (_D, _I.CONNECTION_STARTED): _started,
    (_D, _I.CONNECTION_FINISHED): _draining_finished,
    (_D, _I.PASSIVE_SUCCESS): _draining_passive_success,
    (_D, _I.PASSIVE_FAILURE): _count_failure,
    (_D, _I.PROBE_SUCCESS): _draining_success,
    (_D, _I.PROBE_FAILURE): _count_failure,
    # UNHEALTHY carries no connection but in panic: its connections count,
    # and their success is no evidence (probes alone bring it back).
    (_U, _I.CONNECTION_STARTED): _started,
    (_U, _I.CONNECTION_FINISHED): _finished,
    (_U, _I.PASSIVE_SUCCESS): _draining_passive_success,
    (_U, _I.PASSIVE_FAILURE): _count_failure,
    (_U, _I.PROBE_SUCCESS): _unhealthy_success,
    (_U, _I.PROBE_FAILURE): _count_failure,
}
"""Every legal ``(state, input)`` pair and the rule it runs."""
