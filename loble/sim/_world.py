"""The world's pure draws: request schedules and faults from a failure process.

Everything here is a function of its arguments: a :class:`~loble.sim.Scenario`
and a seed, or samplers bound to the run's one ``random.Random``. Nothing
reads a clock, and nothing keeps state between calls but the generator the
caller passes, so the engine builds what it needs once per run and a seed
still fixes the whole run.

Requests on keep-alive connections
==================================

With ``[sim.clients] requests``, a connection carries a number of requests
drawn from that distribution, one after the other: each is answered a round
trip to its backend plus the backend's service time after it is sent
(``[sim.service]``, or the backend's own in ``[[sim.backends]]``), and the
client pauses for a ``think`` time between a response and its next request.
:func:`request_schedule` draws one connection's schedule: the end of each
request, in seconds after the connection is established. The last end is
the connection's duration; a connection cut at ``elapsed`` seconds has
completed ``completed_requests(ends, elapsed)`` requests and lost the rest.
:class:`RequestModel` binds the samplers once per run and looks up the
backend's.

Faults drawn from a failure process
===================================

:func:`draw_faults` expands each ``[[sim.fault_processes]]`` entry into
concrete :class:`~loble.sim.Fault` values. Each unit (one backend, or a zone
of backends that fail together) alternates: up for a draw of ``mtbf`` from
``start`` (or from its last repair), then down, in the process's behaviour,
for a draw of ``mttr``; failures start in ``[start, stop)``, and a repair
may come later. Each unit draws from a ``random.Random`` of its own, seeded
by a string of the seed, the process's index and the unit's addresses
(``"loble-faults:{seed}:{index}:{a}+{b}"``): the run's own generator draws
nothing for them, so a scenario without fault processes runs as before,
and adding a backend or a process leaves the others' failures as they were.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import random
from collections.abc import Callable

from ._scenario import (
    MOST_REQUESTS_DRAWN,
    Distribution,
    Fault,
    FaultProcess,
    Scenario,
    SimConfig,
)

__all__ = [
    "MOST_FAULTS_DRAWN",
    "RequestModel",
    "completed_requests",
    "count_sampler",
    "draw_faults",
    "latency_samplers",
    "process_faults",
    "request_schedule",
    "request_times",
    "with_drawn_faults",
]

MOST_FAULTS_DRAWN = 1_000_000
"""A fault process stops drawing after this many faults (the scenario check
refuses a process expected to draw more than a tenth of it)."""


# -- requests --------------------------------------------------------------------


def count_sampler(distribution: Distribution, rng: random.Random) -> Callable[[], int]:
    """A zero-argument function drawing a whole number >= 1 from ``distribution``.

    ``constant``: its value. ``uniform``: each whole number from ``low`` to
    ``high`` alike. ``exponential``: the geometric distribution from 1 of
    that ``mean`` (a client that, after each request, closes with
    probability ``1 / mean``), the exponential's discrete twin. ``lognormal``:
    a draw rounded to the nearest whole number, at least 1 (its median is
    about ``median``). No draw exceeds :data:`MOST_REQUESTS_DRAWN`.
    """
    most = MOST_REQUESTS_DRAWN
    draw = rng.random
    if distribution.kind == "uniform":
        low = int(distribution.low)
        span = int(distribution.high) - low + 1
        return lambda: low + int(draw() * span)
    if distribution.kind == "exponential" and distribution.mean > 1.0:
        scale = 1.0 / math.log1p(-1.0 / distribution.mean)  # negative
        log = math.log
        return lambda: min(most, 1 + int(log(1.0 - draw()) * scale))
    if distribution.kind == "lognormal":
        mu, sigma, lognormvariate = (
            math.log(distribution.median),
            distribution.sigma,
            rng.lognormvariate,
        )
        return lambda: max(1, round(min(most, lognormvariate(mu, sigma))))
    value = 1 if distribution.kind == "exponential" else int(distribution.value)
    return lambda: value


def request_schedule(
    count: Callable[[], int],
    service: Callable[[], float],
    latency: Callable[[], float],
    think: Callable[[], float],
) -> list[float]:
    """One connection's requests: the end of each, in seconds after it is established.

    Draws the number of requests, then for each a round trip and a service
    time and, before each but the first, a think time, in that order. The
    last end is the connection's duration.
    """
    return request_times(count, service, latency, think)[0]


def request_times(
    count: Callable[[], int],
    service: Callable[[], float],
    latency: Callable[[], float],
    think: Callable[[], float],
) -> tuple[list[float], list[float]]:
    """:func:`request_schedule`'s ends, with the instant each request is sent.

    The same draws in the same order; ``sends[0]`` is 0 (the first request
    leaves as the connection is established) and ``sends[i]`` is
    ``ends[i - 1]`` plus a think time. Bytes cross Loble at each send and
    each end, and at no other time: the engine reports those instants as
    the connection's activity, so a think or a service time longer than
    the idle timeout is cut by it, as in the daemon.
    """
    remaining = count() - 1
    elapsed = latency() + service()
    ends = [elapsed]
    sends = [0.0]
    append, sent = ends.append, sends.append
    for _ in range(remaining):
        start = elapsed + think()
        sent(start)
        elapsed = start + latency() + service()
        append(elapsed)
    return ends, sends


def completed_requests(ends: list[float], elapsed: float) -> int:
    """How many of a schedule's requests had ended ``elapsed`` seconds in (one ending then has)."""
    return bisect.bisect_right(ends, elapsed)


class RequestModel:
    """Each connection's request schedule on the backend it reached, for one run.

    Built once per run (``RequestModel(scenario.sim, rng)``), its samplers
    bound to the run's generator; :meth:`schedule` is then one dictionary
    look-up and :func:`request_schedule`. Only a scenario with
    ``[sim.clients] requests`` needs one.
    """

    __slots__ = ("_by_backend", "_count", "_default", "_think")

    def __init__(self, sim: SimConfig, rng: random.Random) -> None:
        requests = sim.clients.requests
        if requests is None:
            raise ValueError("a request model needs [sim.clients] requests")
        self._count = count_sampler(requests, rng)
        self._think = sim.clients.think.sampler(rng)
        self._default = (sim.service_of("").sampler(rng), sim.network.latency.sampler(rng))
        self._by_backend = {
            backend.address: (
                sim.service_of(backend.address).sampler(rng),
                sim.latency_of(backend.address).sampler(rng),
            )
            for backend in sim.backends
        }

    def schedule(self, address: str) -> list[float]:
        """Draw the request ends of a connection established on ``address``."""
        service, latency = self._by_backend.get(address, self._default)
        return request_schedule(self._count, service, latency, self._think)

    def times(self, address: str) -> tuple[list[float], list[float]]:
        """Draw a connection's request ends and sends (:func:`request_times`)."""
        service, latency = self._by_backend.get(address, self._default)
        return request_times(self._count, service, latency, self._think)


def latency_samplers(sim: SimConfig, rng: random.Random) -> dict[str, Callable[[], float]]:
    """The round-trip samplers of the backends with a latency of their own, by address.

    Any other backend's round trips are ``sim.network.latency``'s.
    """
    return {
        backend.address: backend.latency.sampler(rng)
        for backend in sim.backends
        if backend.latency is not None
    }


# -- faults drawn from a process -------------------------------------------------


def process_faults(scenario: Scenario, seed: int) -> tuple[Fault, ...]:
    """The faults ``seed`` draws from the scenario's fault processes, by start time.

    Faults starting at one instant stay in the order drawn (process, then
    unit, then the unit's addresses), so a zone's backends fail in the order
    it lists them.
    """
    sim = scenario.sim
    drawn: list[Fault] = []
    for index, process in enumerate(sim.fault_processes):
        stop = sim.duration if process.stop is None else process.stop
        for unit in process.units:
            drawn.extend(_unit_faults(process, unit, stop, f"{seed}:{index}:{'+'.join(unit)}"))
    drawn.sort(key=lambda fault: fault.at)  # stable: ties keep their order
    return tuple(drawn)


def _unit_faults(
    process: FaultProcess, unit: tuple[str, ...], stop: float, key: str
) -> list[Fault]:
    rng = random.Random(f"loble-faults:{key}")  # a str seeds the same everywhere
    up = process.mtbf.sampler(rng)
    down = process.mttr.sampler(rng)
    template = process.fault
    replace = dataclasses.replace
    faults: list[Fault] = []
    repaired = process.start
    while len(faults) < MOST_FAULTS_DRAWN:
        at = repaired + up()
        if at >= stop:
            break
        repaired = at + down()
        until = repaired if repaired > at else math.nextafter(at, math.inf)
        faults.extend(replace(template, at=at, until=until, backend=address) for address in unit)
    return faults


def draw_faults(scenario: Scenario, seed: int) -> tuple[Fault, ...]:
    """The scenario's faults with those its fault processes draw for ``seed``.

    The file's own ``[[sim.faults]]`` come first, at the indexes their
    warnings and the trace name them by; the drawn ones follow, by start
    time (:func:`process_faults`). The engine orders faults by time itself:
    the order here only decides which of two faults on one backend starting
    at the very same instant wins (the later one), and a drawn start falls
    on a fixed one with probability 0. A drawn fault is a fault like any
    other: the last one started on a backend is the one in force, so a
    failure drawn during a fixed fault replaces it.
    """
    return scenario.sim.faults + process_faults(scenario, seed)


def with_drawn_faults(scenario: Scenario, seed: int) -> Scenario:
    """The scenario whose ``sim.faults`` are :func:`draw_faults`'s for ``seed``.

    Its ``fault_processes`` are emptied and ``drawn_faults`` says how many
    faults, at the end of ``faults``, were drawn, so applying it twice draws
    once. A scenario without fault processes comes back as it is (the same
    object).
    """
    sim = scenario.sim
    if not sim.fault_processes:
        return scenario
    drawn = process_faults(scenario, seed)
    sim = dataclasses.replace(
        sim,
        faults=sim.faults + drawn,
        fault_processes=(),
        drawn_faults=sim.drawn_faults + len(drawn),
    )
    return dataclasses.replace(scenario, sim=sim)
