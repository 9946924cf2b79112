"""Many seeds: spread over local processes or a Dask cluster, and ``--swarm``.

:func:`run_seeds` runs one scenario over many seeds and hands back each
seed's report (and series, for ``--plot``), keyed by seed: in this process
(one job), on a local process pool (the default), or on the workers of a
Dask scheduler (``--cluster tcp://HOST:PORT``; ``distributed`` is the
optional extra ``loble[swarm]``, imported only then). A run is a pure
function of the scenario and the seed, so every executor gives the same
reports, byte for byte.

With ``swarm``, each seed also draws its fault schedule, as TigerBeetle's
VOPR does: :func:`swarm_faults` keeps the scenario's faults as templates
(how many, on which backend) and draws each one's start, length, behaviour
and that behaviour's parameter from a ``random.Random`` seeded by the seed
alone, so thousands of seeds explore thousands of failure mixes and
``loble sim SCENARIO --seed N --swarm`` replays one exactly. The draw has its
own generator: the run's own stream (arrivals, durations, ...) is the one the
seed gives without ``--swarm``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TextIO
from urllib.parse import urlsplit

from loble.core import LobleError

from ._engine import Simulation
from ._report import build_report
from ._scenario import BEHAVIOURS, FAULT_PARAMETERS, SHORTEST, Fault, Scenario
from ._timeline import Recorder, bin_width

__all__ = [
    "CONNECT_TIMEOUT",
    "SWARM_HINT",
    "describe_faults",
    "run_once",
    "run_seeds",
    "swarm_faults",
    "swarm_scenario",
]

SWARM_HINT = "--cluster needs dask.distributed: pip install 'loble[swarm]'"
CONNECT_TIMEOUT = 10.0
"""Seconds to reach the scheduler, and then for it to have a worker."""
SCHEMES = ("tcp", "tls")

Outcome = tuple[dict[str, Any], dict[str, Any] | None]
"""A run's report, and its series over time if plotted."""

DRAWN = tuple(name for name in BEHAVIOURS if name not in ("up", "recover"))
"""The behaviours a swarm draws from: every one that is a fault."""


# -- one run ---------------------------------------------------------------------


def run_once(
    scenario: Scenario,
    seed: int,
    trace: TextIO | None = None,
    plotted: bool = False,
    swarm: bool = False,
) -> Outcome:
    """Run one seed: its report, and its series over time if ``plotted``.

    With ``swarm``, the faults are those :func:`swarm_faults` draws for the
    seed, and the report lists them under ``swarm``.
    """
    if swarm:
        scenario = swarm_scenario(scenario, seed)
    record = None
    if trace is not None:
        write = trace.write

        def record(entry: dict[str, Any]) -> None:
            write(json.dumps(entry, separators=(",", ":")) + "\n")

    recorder = Recorder(bin_width(scenario.sim.duration)) if plotted else None
    simulation = Simulation(scenario, seed, trace=record, recorder=recorder)
    if recorder is not None:
        recorder.watch(simulation)  # it tells truncated streams from complete ones
    simulation.run()
    series = None if recorder is None else recorder.series(simulation)
    report = build_report(simulation)
    if swarm:
        report["swarm"] = [_fault_data(fault) for fault in scenario.sim.faults]
    return report, series


def _run_task(seed: int, scenario: Scenario, plotted: bool, swarm: bool) -> Outcome:
    """The unit of work a pool or a cluster runs: one seed, no trace."""
    return run_once(scenario, seed, None, plotted, swarm)


# -- swarm: faults drawn from the seed -------------------------------------------


def swarm_faults(scenario: Scenario, seed: int) -> tuple[Fault, ...]:
    """The faults ``seed`` draws: one per fault of the scenario (one at least).

    Each keeps its template's backend (a scenario without faults gets one on
    a backend drawn too) and draws: a behaviour among :data:`DRAWN`, a start
    in the first 90% of ``sim.duration``, an end 5% to 50% of the duration
    later (and no later than the duration), and the parameter that behaviour
    reads, scaled by the template's (or the default's): ``delay`` and
    ``limit`` from 0 to twice it, ``probability`` from 0 to 1, ``period``
    from 1% to 20% of the duration.
    """
    rng = random.Random(f"loble-swarm:{seed}")  # a str seeds the same everywhere
    duration = scenario.sim.duration
    addresses = [backend.address for backend in scenario.config.backends]
    templates: Iterable[Fault | None] = scenario.sim.faults or (None,)
    faults = []
    for template in templates:
        backend = template.backend if template is not None else rng.choice(addresses)
        base = template or Fault(at=0.0, backend=backend, behaviour="up")
        behaviour = rng.choice(DRAWN)
        at = rng.uniform(0.0, 0.9 * duration)
        until = min(duration, at + rng.uniform(0.05, 0.5) * duration)
        parameters: dict[str, Any] = {}
        for name, user in FAULT_PARAMETERS.items():
            if user != behaviour:
                continue
            if name == "delay":
                parameters[name] = rng.uniform(0.0, 2.0 * base.delay)
            elif name == "limit":
                parameters[name] = rng.randint(0, 2 * base.limit)
            elif name == "probability":
                parameters[name] = rng.random()
            elif name == "period":
                parameters[name] = max(SHORTEST, rng.uniform(0.01, 0.2) * duration)
        faults.append(
            Fault(
                at=at,
                until=until if until > at else None,
                backend=backend,
                behaviour=behaviour,
                **parameters,
            )
        )
    return tuple(faults)


def swarm_scenario(scenario: Scenario, seed: int) -> Scenario:
    """The scenario with the faults ``seed`` draws in place of its own.

    The file's warnings about its own faults name faults that no longer run,
    so they go; the others stay.
    """
    sim = dataclasses.replace(scenario.sim, faults=swarm_faults(scenario, seed))
    warnings = tuple(line for line in scenario.warnings if not line.startswith("sim.faults"))
    return dataclasses.replace(scenario, sim=sim, warnings=warnings)


def _fault_data(fault: Fault) -> dict[str, Any]:
    data: dict[str, Any] = {
        "at": round(fault.at, 6),
        "until": None if fault.until is None else round(fault.until, 6),
        "backend": fault.backend,
        "behaviour": fault.behaviour,
    }
    for name, user in FAULT_PARAMETERS.items():
        if user == fault.behaviour:
            value = getattr(fault, name)
            data[name] = round(value, 6) if isinstance(value, float) else value
    return data


def describe_faults(faults: list[dict[str, Any]]) -> str:
    """One line for a report's ``swarm`` faults: ``crash on B from 1.000 s to 2.000 s``."""
    parts = []
    for fault in faults:
        extra = "".join(
            f" {name}={fault[name]:g}"
            if isinstance(fault[name], float)
            else f" {name}={fault[name]}"
            for name in FAULT_PARAMETERS
            if name in fault
        )
        end = "" if fault["until"] is None else f" to {fault['until']:.3f} s"
        parts.append(
            f"{fault['behaviour']}{extra} on {fault['backend']} from {fault['at']:.3f} s{end}"
        )
    return "; ".join(parts)


# -- many runs -------------------------------------------------------------------


def run_seeds(
    scenario: Scenario,
    seeds: range,
    *,
    jobs: int,
    cluster: str | None = None,
    plotted: bool = False,
    swarm: bool = False,
    advance: Callable[[], None] = lambda: None,
) -> dict[int, Outcome]:
    """Each seed's outcome, calling ``advance`` as each run ends.

    On ``cluster`` (a Dask scheduler's address) if given; else in this
    process for one job, or on a pool of ``jobs`` local processes. A run
    that cannot go on (a :class:`LobleError`) stops the rest and is raised.
    """
    if cluster is not None:
        return _on_cluster(cluster, scenario, seeds, plotted, swarm, advance)
    outcomes: dict[int, Outcome] = {}
    if jobs <= 1:
        for seed in seeds:
            outcomes[seed] = _run_task(seed, scenario, plotted, swarm)
            advance()
        return outcomes
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_run_task, seed, scenario, plotted, swarm): seed for seed in seeds}
        try:
            for future in as_completed(futures):
                outcomes[futures[future]] = future.result()
                advance()
        except LobleError:
            # A run that cannot go on (SimulationError) comes back as an
            # exception, not a worker's traceback: stop the rest, say it once.
            pool.shutdown(cancel_futures=True)
            raise
    return outcomes


def check_address(address: str) -> None:
    """A scheduler address is ``tcp://HOST:PORT`` (or ``tls://``); one line if not."""
    problem = None
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError as error:
        problem = str(error)
    else:
        if parts.scheme not in SCHEMES:
            problem = f"the scheme must be {' or '.join(f'{s}://' for s in SCHEMES)}"
        elif not parts.hostname or port is None:
            problem = "it needs a host and a port"
        elif parts.path or parts.query or parts.fragment:
            problem = "it is only a scheme, a host and a port"
    if problem is not None:
        raise LobleError(
            f"--cluster {address!r}: not a scheduler address like tcp://HOST:PORT: {problem}"
        )


def _on_cluster(
    address: str,
    scenario: Scenario,
    seeds: range,
    plotted: bool,
    swarm: bool,
    advance: Callable[[], None],
) -> dict[int, Outcome]:
    try:
        import distributed as _distributed
    except ImportError:
        raise LobleError(SWARM_HINT) from None
    # Parts of distributed's API are untyped; only this function touches it.
    distributed: Any = _distributed
    check_address(address)
    try:
        client = distributed.Client(
            address, timeout=CONNECT_TIMEOUT, set_as_default=False, name="loble-sim"
        )
    except Exception as error:  # OSError, TimeoutError, or the comm's own ValueError
        raise LobleError(f"--cluster {address}: cannot reach the scheduler: {error}") from None
    outcomes: dict[int, Outcome] = {}
    with client, client.as_current():  # as_completed looks for the current client
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
        except Exception:
            raise LobleError(
                f"--cluster {address}: the scheduler has no worker after {CONNECT_TIMEOUT:g} s"
            ) from None
        shared = client.scatter(scenario, broadcast=True)
        futures = client.map(
            _run_task,
            list(seeds),
            scenario=shared,
            plotted=plotted,
            swarm=swarm,
            pure=False,
        )
        seed_of = {future.key: seed for future, seed in zip(futures, seeds, strict=True)}
        try:
            for future in distributed.as_completed(futures):
                seed = seed_of[future.key]
                try:
                    outcomes[seed] = future.result()
                except LobleError:
                    raise
                except Exception as error:  # a worker's own failure, never a traceback
                    raise LobleError(
                        f"--cluster {address}: seed {seed}: {type(error).__name__}: {error}"
                    ) from None
                advance()
        except BaseException:
            client.cancel(futures)
            raise
    return outcomes
