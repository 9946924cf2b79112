"""Scenario files: a load-balancer config plus the ``[sim]`` world it runs in.

A scenario is one TOML document. Everything outside ``[sim]`` is the
load-balancer configuration in exactly the ``config.toml`` schema and goes
through :func:`loble.core.parse_config` unchanged, so a user simulates their
real config by pasting it, or by naming it with ``sim.config = "path"``
(its sections are the base; sections in the scenario replace them whole).
``[sim]`` describes the world: how long, the clients, the network and the
fault schedule. It is validated with the config's own checker
(:class:`loble.core.Checker`), so a bad scenario gets the same one-line,
key-naming errors as a bad config, all of them in one :class:`ConfigError`.

``[sim]`` also models the world closer to production: per-backend service
time and latency (``[sim.service]``, ``[[sim.backends]]``), requests on
keep-alive connections, client connect timeouts and retries
(``[sim.clients]``), faults drawn from a failure process
(``[[sim.fault_processes]]``), timer jitter, and operators adding and removing
backends (``add`` and ``remove`` operations, which become reloads of the
configuration in force here). :mod:`loble.sim._world` holds the pure
functions that draw from them.

This module reads no clock and draws no random number: it only turns a
document into frozen values (and each :class:`Distribution` into a sampler
bound to the run's one ``random.Random``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loble.config import read_toml
from loble.core import (
    Check,
    Checker,
    Config,
    ConfigError,
    choice,
    config_to_dict,
    integer,
    parse_config,
    seconds,
)

__all__ = [
    "BEHAVIOURS",
    "BackendModel",
    "ClientsConfig",
    "Distribution",
    "Fault",
    "FaultProcess",
    "NetworkConfig",
    "Operation",
    "RatePhase",
    "Scenario",
    "SimConfig",
    "load_scenario",
    "parse_scenario",
]

BEHAVIOURS = (
    "up",
    "crash",
    "blackhole",
    "reset",
    "slow",
    "capacity",
    "flapping",
    "recover",
    "kill",
    "host_down",
    "accept_hang",
)
"""What a backend does, switched on and off in time by the fault schedule.

* ``up``: accepts connects and serves them.
* ``kill``: the process dies: connects and probes are refused; each open
  connection gets a FIN (a stream cut short that looks complete), or a RST
  where the backend had unread bytes (``unread``: ``"senders"``, the
  connections whose client was still sending; ``"all"``; ``"none"``).
* ``crash``: an alias of ``kill`` with ``unread = "all"``: connects and probes
  are refused; every established connection is reset.
* ``host_down``: the host goes silent: connects and probes hang (until the
  connect or probe timeout), and so do open connections (until the idle timeout).
* ``accept_hang``: connects and connect-only probes succeed (the kernel
  accepts), then nothing answers: each new connection hangs until the idle
  timeout, and a probe that expects a reply fails at its timeout (a frozen
  process, SIGSTOP: only a payload check sees it).
* ``blackhole``: connects and probes hang (until the connect or probe timeout).
* ``reset``: connects succeed; the connections open when it starts are reset,
  and a share (``probability``) of the new ones is reset mid-stream.
* ``slow``: ``delay`` seconds added to connects, probes and responses.
* ``capacity``: refuses connects and probes beyond ``limit`` open connections.
* ``flapping``: up for ``period / 2``, down (as ``crash``, without resets), repeat.
* ``recover``: the same as ``up``; reads better at the end of a fault.
"""

ARRIVALS = ("poisson", "constant")
DISTRIBUTIONS = ("constant", "exponential", "uniform", "lognormal")
_DISTRIBUTION_KEYS: dict[str, tuple[str, ...]] = {
    "constant": ("kind", "value"),
    "exponential": ("kind", "mean"),
    "uniform": ("kind", "low", "high"),
    "lognormal": ("kind", "median", "sigma"),
}
_SIM_KEYS = (
    "config",
    "duration",
    "seed",
    "shutdown_at",
    "settle",
    "clients",
    "network",
    "faults",
    "operations",
    "service",
    "backends",
    "fault_processes",
    "timer_jitter",
)
WEIGHT = integer(1, 1_000_000)
"""A ``[[backends]] weight``'s bounds, which ``ProxyCore.set_weight`` enforces too."""
ACTIONS = ("drain", "undrain", "maintenance", "ready", "weight", "reload", "add", "remove")
"""What an operator does at a scheduled instant: an admin request on one
backend (``drain``, ``undrain``, ``maintenance``, ``ready``), a new
``weight`` for one, a ``reload`` of the whole configuration, or ``add`` or
``remove`` one backend. The last two are a reload of the configuration in
force then with that one backend added or removed: the parser builds that
configuration and hands the engine a ``reload`` (see :class:`Operation`)."""
MEMBERSHIP = ("add", "remove")
"""The actions that are a reload built by the parser."""
_OPERATION_KEYS = ("at", "action", "backend", "weight", "config")
_CLIENT_KEYS = (
    "arrival",
    "rate",
    "schedule",
    "duration",
    "bytes",
    "half_close",
    "requests",
    "think",
    "connect_timeout",
    "retries",
    "retry_backoff",
    "population",
)
LARGEST_POPULATION = 65_536
"""The most client addresses: 198.18.0.0 to 198.18.255.255."""
_NETWORK_KEYS = ("latency",)
_SIM_BACKEND_KEYS = ("address", "service", "latency")
_FAULT_PROCESS_KEYS = (
    "backend",
    "zone",
    "behaviour",
    "mtbf",
    "mttr",
    "start",
    "stop",
    "period",
    "limit",
    "delay",
    "probability",
    "unread",
)
PROCESS_BEHAVIOURS = tuple(name for name in BEHAVIOURS if name not in ("up", "recover"))
"""What a fault process switches a backend to when it fails: every behaviour
that is a fault. It is back ``up`` when repaired."""
LARGEST_REQUESTS = 100_000
"""The most requests per connection a ``requests`` distribution may name (its
``value``, ``high``, ``mean`` or ``median``)."""
MOST_REQUESTS_DRAWN = 1_000_000
"""A connection never draws more requests than this (the tail of an
``exponential`` or ``lognormal`` count is cut here)."""
LARGEST_RETRIES = 100
"""The most retries a client may make (``sim.clients.retries``)."""
MOST_EXPECTED_FAULTS = 100_000
"""The most faults a fault process may be expected to draw over its window
(``(stop - start) / (mtbf + mttr)``, times the backends it covers)."""
_FAULT_KEYS = (
    "at",
    "until",
    "backend",
    "behaviour",
    "period",
    "limit",
    "delay",
    "probability",
    "unread",
)
_PHASE_KEYS = ("at", "rate")
FAULT_PARAMETERS = {
    "period": "flapping",
    "limit": "capacity",
    "delay": "slow",
    "probability": "reset",
    "unread": "kill",
}
"""Each fault parameter and the one behaviour that reads it; the others ignore it."""
ALL_BACKENDS = "*"
UNREAD = ("senders", "all", "none")
"""Which open connections a ``kill`` finds with unread bytes, and so resets
(the kernel sends RST when a socket closes with data still to read); the
others get a FIN."""

SHORTEST = 1e-6
"""Seconds: the shortest flapping period a scenario may set (the config's own
timeouts and probe timings must be at least a millisecond already). Below it,
``now + interval`` rounds back to ``now`` on the clock of a
long run, and a periodic event would never move time forward."""
SMALLEST_SCALE = 1e-9
"""The smallest ``mean`` or ``median`` of a distribution (a rate of 10^9/s)."""
LARGEST_SIGMA = 10.0
"""Beyond it, a lognormal draw overflows a float (exp(8 * sigma) for the tail)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Distribution:
    """A non-negative random quantity: seconds or bytes."""

    kind: str = "constant"
    value: float = 0.0
    mean: float = 0.0
    low: float = 0.0
    high: float = 0.0
    median: float = 0.0
    sigma: float = 0.0

    def sampler(self, rng: random.Random) -> Callable[[], float]:
        """A zero-argument function drawing from this distribution with ``rng``."""
        if self.kind == "exponential":
            rate = 1.0 / self.mean
            expovariate = rng.expovariate
            return lambda: expovariate(rate)
        if self.kind == "uniform":
            low, span, draw = self.low, self.high - self.low, rng.random
            return lambda: low + span * draw()
        if self.kind == "lognormal":
            mu, sigma, lognormvariate = math.log(self.median), self.sigma, rng.lognormvariate
            return lambda: lognormvariate(mu, sigma)
        value = self.value
        return lambda: value

    @property
    def maximum(self) -> float:
        """The largest value it can draw (infinite for the unbounded kinds)."""
        if self.kind == "constant":
            return self.value
        if self.kind == "uniform":
            return self.high
        return math.inf

    def describe(self) -> str:
        if self.kind == "constant":
            return f"{self.value:g}"
        if self.kind == "exponential":
            return f"exponential(mean={self.mean:g})"
        if self.kind == "uniform":
            return f"uniform({self.low:g}..{self.high:g})"
        return f"lognormal(median={self.median:g}, sigma={self.sigma:g})"


NO_TIME = Distribution(kind="constant", value=0.0)
"""A duration that is always 0."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RatePhase:
    """From ``at`` on, clients arrive at ``rate`` per second."""

    at: float
    rate: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientsConfig:
    arrival: str = "poisson"
    rate: float = 10.0
    """Connections per second from t=0, until the first schedule phase."""
    schedule: tuple[RatePhase, ...] = ()
    duration: Distribution = Distribution(kind="exponential", mean=1.0)
    """How long a connection carries data once connected."""
    bytes: Distribution = Distribution(kind="constant", value=10_000.0)
    half_close: float = 0.5
    """Share of clients that send EOF first; the backend closes first for the rest."""
    requests: Distribution | None = None
    """Requests per connection, a whole number >= 1 (see
    :func:`loble.sim._world.count_sampler`); each is answered after a round
    trip to the backend plus its service time. None: a connection carries
    data for its ``duration``, as before requests existed."""
    think: Distribution = NO_TIME
    """The client's pause between a response and its next request."""
    connect_timeout: float | None = None
    """Seconds a client waits for its connection to reach a backend (from its
    arrival until Loble's connect succeeds) before it gives up; None: it waits."""
    retries: int = 0
    """How many times a client tries again after a failed connection attempt
    (refused by the kernel or by Loble, or past ``connect_timeout``)."""
    retry_backoff: Distribution = NO_TIME
    """Seconds a client waits before each retry."""
    population: int = 0
    """Distinct client addresses (198.18.x.y, drawn for each client from a
    generator of the run's seed of its own; a client's retries keep its
    address), passed to the core's ``accept`` for hashing; 0: clients have
    no address, as before."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendModel:
    """``[[sim.backends]]``: how one backend serves, in place of the defaults."""

    address: str
    service: Distribution | None = None
    """Its service time per request; None: ``sim.service``."""
    latency: Distribution | None = None
    """The round trip between Loble and it; None: ``sim.network.latency``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkConfig:
    latency: Distribution = Distribution(kind="constant", value=0.001)
    """Round-trip time between the load balancer and a backend or client."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """From ``at`` (until ``until``, if given) ``backend`` behaves as ``behaviour``."""

    at: float
    backend: str
    """A backend address, or ``*`` for every backend."""
    behaviour: str
    until: float | None = None
    period: float = 10.0
    limit: int = 100
    delay: float = 0.5
    probability: float = 0.5
    unread: str = "senders"


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    """At ``at``, an operator's ``action`` (see :data:`ACTIONS`).

    ``backend`` for the admin actions and ``weight``; ``weight`` for
    ``weight``; ``config`` for ``reload``: the new configuration, already
    validated, which the core applies as a diff.
    """

    at: float
    action: str
    backend: str = ""
    weight: int = 0
    config: Config | None = None
    written_as: str = ""
    """``add`` or ``remove`` when the file wrote this reload as one (``action``
    is then ``reload``, ``backend`` the backend added or removed, ``weight``
    the added one's, and ``config`` the configuration in force with that
    change); "" for every other operation."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultProcess:
    """``[[sim.fault_processes]]``: faults drawn from a failure process.

    Each unit of :attr:`units` fails on its own: it stays up for a draw of
    ``mtbf``, is in :attr:`fault`'s behaviour for a draw of ``mttr``, then is
    up again, and so on, for failures starting in ``[start, stop)``. The
    backends of one unit fail and are repaired together (a zone).
    :func:`loble.sim._world.draw_faults` does the drawing.
    """

    units: tuple[tuple[str, ...], ...]
    """Backends that fail together, one tuple per independent unit."""
    fault: Fault
    """The template of each fault drawn: its behaviour and parameters (its
    ``at``, ``until`` and ``backend`` are drawn)."""
    mtbf: Distribution
    """Time up, from the start or a repair to the next failure."""
    mttr: Distribution
    """Time down, from a failure to its repair."""
    start: float = 0.0
    stop: float | None = None
    """No failure starts at or after it; None: ``sim.duration``."""
    backend: str = ""
    """As written: an address, ``*`` (each backend on its own), or "" for a zone."""
    zone: tuple[str, ...] = ()
    """As written: the addresses of one zone, or ()."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    duration: float = 60.0
    """Seconds during which clients arrive; the run then settles (see ``settle``)."""
    seed: int = 1
    shutdown_at: float | None = None
    """When the process gets SIGTERM; it then drains for ``timeouts.drain``."""
    settle: float = 600.0
    """After ``duration``, at most this long for open connections to end."""
    clients: ClientsConfig = ClientsConfig()
    network: NetworkConfig = NetworkConfig()
    faults: tuple[Fault, ...] = ()
    operations: tuple[Operation, ...] = ()
    service: Distribution | None = None
    """A backend's service time per request (with ``clients.requests``);
    None: it answers at once."""
    backends: tuple[BackendModel, ...] = ()
    """Backends that serve otherwise than the defaults (``[[sim.backends]]``)."""
    fault_processes: tuple[FaultProcess, ...] = ()
    """Faults to draw from the seed; :func:`loble.sim._world.with_drawn_faults`
    turns them into ``faults`` (and empties this)."""
    drawn_faults: int = 0
    """How many of ``faults``, at the end, a fault process drew."""
    timer_jitter: Distribution | None = None
    """Extra delay with which the event loop fires each of the core's timers;
    None: on time."""

    def service_of(self, address: str) -> Distribution:
        """The service time of a request on ``address``."""
        for backend in self.backends:
            if backend.address == address and backend.service is not None:
                return backend.service
        return self.service if self.service is not None else NO_TIME

    def latency_of(self, address: str) -> Distribution:
        """The round trip between Loble and ``address``."""
        for backend in self.backends:
            if backend.address == address and backend.latency is not None:
                return backend.latency
        return self.network.latency


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    name: str
    config: Config
    sim: SimConfig
    warnings: tuple[str, ...] = ()
    """What the file says that the run will not do: a fault parameter its
    behaviour ignores (``"path: message"``, as an error line). The report adds
    those that depend on the run: see :func:`loble.sim.build_report`."""


# -- reading ---------------------------------------------------------------------


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; every problem in one ConfigError."""
    path = Path(path)
    document = read_toml(path)
    return parse_scenario(document, name=path.stem, base_dir=path.parent)


def parse_scenario(
    document: Mapping[str, Any], *, name: str = "scenario", base_dir: Path | None = None
) -> Scenario:
    """Validate a parsed scenario document (the ``config.toml`` schema plus ``[sim]``)."""
    checker = Checker()
    lb_part = {key: value for key, value in document.items() if key != "sim"}
    sim_table = checker.table("sim", document.get("sim"))
    if "sim" not in document:
        checker.error("sim", "missing: a scenario needs a [sim] table")
    included = sim_table.get("config")
    if included is not None:
        if isinstance(included, str):
            base = read_toml((base_dir or Path()) / included)
            base.pop("sim", None)
            lb_part = {**base, **lb_part}
        else:
            checker.error("sim.config", f"{included!r} is not a path to a config file")
    config: Config | None = None
    try:
        config = parse_config(lb_part)
    except ConfigError as error:
        checker.errors.extend(error.errors)
    if config is not None and config.runtime.workers > 1:
        checker.error("runtime.workers", _WORKERS.format(workers=config.runtime.workers))
    operations = _parse_operations(checker, sim_table.get("operations"), lb_part, base_dir, config)
    # A fault or an operation may name any backend the run will know: the
    # scenario's own, and those a reload (or an add) brings.
    own = _addresses(lb_part.get("backends"))
    addresses = own
    for operation in operations:
        brought = [b.address for b in operation.config.backends] if operation.config else []
        if operation.action == "add":  # not built: the configuration has errors
            brought.append(operation.backend)
        addresses = (*addresses, *(a for a in brought if a not in addresses))
    _check_operation_backends(checker, sim_table.get("operations"), addresses)
    warnings: list[str] = []
    sim = _parse_sim(checker, sim_table, addresses, own, operations, warnings)
    if checker.errors or config is None:
        raise ConfigError(checker.errors)
    return Scenario(name=name, config=config, sim=sim, warnings=tuple(warnings))


_WORKERS = (
    "{workers!r} is not modelled: the simulator runs one worker process, and with "
    "N workers each runs its own health checks (N times the failures to take a backend "
    "out, each worker logging its own state changes); simulate with workers = 1"
)


def _addresses(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list):
        return ()
    return tuple(
        entry["address"]
        for entry in raw
        if isinstance(entry, Mapping) and isinstance(entry.get("address"), str)
    )


def _fraction(raw: Any) -> str | None:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return "is not a number"
    if not 0.0 <= raw <= 1.0:
        return "must be between 0 and 1"
    return None


def _number(raw: Any) -> str | None:
    return seconds(positive=False)(raw) or (None if raw >= 0 else "must be >= 0")


def _scale(raw: Any) -> str | None:
    """A mean or median: positive, and not so small that its inverse overflows."""
    problem = seconds()(raw)
    if problem is None and raw < SMALLEST_SCALE:
        return f"must be >= {SMALLEST_SCALE:g}"
    return problem


def _period(raw: Any) -> str | None:
    problem = seconds()(raw)
    if problem is None and raw < SHORTEST:
        return f"must be >= {SHORTEST:g} seconds"
    return problem


def _parse_sim(
    checker: Checker,
    table: Mapping[str, Any],
    addresses: tuple[str, ...],
    own: tuple[str, ...],
    operations: tuple[Operation, ...],
    warnings: list[str],
) -> SimConfig:
    checker.unknown_keys("sim", table, _SIM_KEYS)
    defaults = SimConfig()
    duration = float(checker.value("sim", table, "duration", defaults.duration, seconds()))
    seed = checker.value("sim", table, "seed", defaults.seed, integer(0))
    shutdown_at = checker.value("sim", table, "shutdown_at", None, _number)
    settle = float(checker.value("sim", table, "settle", defaults.settle, _number))
    clients = _parse_clients(checker, checker.table("sim.clients", table.get("clients")), warnings)
    network_table = checker.table("sim.network", table.get("network"))
    checker.unknown_keys("sim.network", network_table, _NETWORK_KEYS)
    network = NetworkConfig(
        latency=_distribution(
            checker, "sim.network.latency", network_table, "latency", NetworkConfig().latency
        )
    )
    faults = _parse_faults(
        checker, table.get("faults"), addresses, _joins(own, operations), warnings
    )
    service = _optional_distribution(checker, "sim.service", table, "service")
    backends = _parse_backend_models(checker, table.get("backends"), addresses)
    processes = _parse_fault_processes(
        checker, table.get("fault_processes"), own, addresses, duration, warnings
    )
    timer_jitter = _optional_distribution(checker, "sim.timer_jitter", table, "timer_jitter")
    if clients.requests is None:
        served = ["sim.service"] if service is not None else []
        served += [
            f"sim.backends[{index}].service"
            for index, entry in enumerate(_listed(table.get("backends")))
            if isinstance(entry, Mapping) and "service" in entry
        ]
        warnings.extend(f"{where}: {_PER_REQUEST}" for where in served)
    return SimConfig(
        duration=duration,
        seed=seed,
        shutdown_at=None if shutdown_at is None else float(shutdown_at),
        settle=settle,
        clients=clients,
        network=network,
        faults=faults,
        operations=operations,
        service=service,
        backends=backends,
        fault_processes=processes,
        timer_jitter=timer_jitter,
    )


_PER_REQUEST = (
    "ignored: a service time is per request, and without sim.clients.requests "
    "a connection carries data for its duration"
)


def _listed(raw: Any) -> list[Any]:
    """An array's items (none if it is not an array)."""
    return raw if isinstance(raw, list) else []


def _optional_distribution(
    checker: Checker, path: str, table: Mapping[str, Any], key: str
) -> Distribution | None:
    """A distribution if ``key`` is there (and good), else None."""
    if key not in table:
        return None
    before = len(checker.errors)
    found = _distribution(checker, path, table, key, NO_TIME)
    return found if len(checker.errors) == before else None


def _parse_clients(
    checker: Checker, table: Mapping[str, Any], warnings: list[str]
) -> ClientsConfig:
    path = "sim.clients"
    checker.unknown_keys(path, table, _CLIENT_KEYS)
    defaults = ClientsConfig()
    arrival = checker.value(path, table, "arrival", defaults.arrival, choice(ARRIVALS))
    rate = float(checker.value(path, table, "rate", defaults.rate, _number))
    schedule: list[RatePhase] = []
    raw_schedule = table.get("schedule", [])
    if not isinstance(raw_schedule, list):
        checker.error(f"{path}.schedule", f"{raw_schedule!r} is not an array of tables")
        raw_schedule = []
    for index, entry in enumerate(raw_schedule):
        where = f"{path}.schedule[{index}]"
        if not isinstance(entry, Mapping):
            checker.error(where, f"{entry!r} is not a table")
            continue
        checker.unknown_keys(where, entry, _PHASE_KEYS)
        if "at" not in entry or "rate" not in entry:
            checker.error(where, "needs both 'at' and 'rate'")
            continue
        at = checker.value(where, entry, "at", None, _number)
        phase_rate = checker.value(where, entry, "rate", None, _number)
        if at is None or phase_rate is None:
            continue
        if schedule and at <= schedule[-1].at:
            checker.error(f"{where}.at", f"{at!r} must be later than the phase before")
            continue
        schedule.append(RatePhase(at=float(at), rate=float(phase_rate)))
    clients = ClientsConfig(
        arrival=arrival,
        rate=rate,
        schedule=tuple(schedule),
        duration=_distribution(checker, f"{path}.duration", table, "duration", defaults.duration),
        bytes=_distribution(checker, f"{path}.bytes", table, "bytes", defaults.bytes),
        half_close=float(checker.value(path, table, "half_close", defaults.half_close, _fraction)),
        requests=_requests(checker, f"{path}.requests", table),
        think=_distribution(checker, f"{path}.think", table, "think", defaults.think),
        connect_timeout=_optional_seconds(checker, path, table, "connect_timeout"),
        retries=checker.value(
            path, table, "retries", defaults.retries, integer(0, LARGEST_RETRIES)
        ),
        retry_backoff=_distribution(
            checker, f"{path}.retry_backoff", table, "retry_backoff", defaults.retry_backoff
        ),
        population=checker.value(
            path, table, "population", defaults.population, integer(0, LARGEST_POPULATION)
        ),
    )
    if "requests" in table:
        if "duration" in table:
            warnings.append(
                f"{path}.duration: ignored: with requests, a connection lasts as long as "
                "its requests, think times and round trips"
            )
    elif "think" in table:
        warnings.append(
            f"{path}.think: ignored: think is the pause between requests, "
            "and without requests a connection has none"
        )
    if "retry_backoff" in table and clients.retries == 0:
        warnings.append(f"{path}.retry_backoff: ignored: a client makes no retry (retries = 0)")
    return clients


def _distribution(
    checker: Checker, path: str, table: Mapping[str, Any], key: str, default: Distribution
) -> Distribution:
    """A bare number means a constant; a table names its ``kind`` and parameters."""
    if key not in table:
        return default
    found = _parse_distribution(
        checker, path, table[key], noun="distribution", constant=_number, parameter=_time_check
    )
    return default if found is None else found


def _time_check(name: str) -> Check:
    """The check of a distribution's parameter ``name``: a scale must be positive."""
    return _scale if name in ("mean", "median") else _number


def _parse_distribution(
    checker: Checker,
    path: str,
    raw: Any,
    *,
    noun: str,
    constant: Check,
    parameter: Callable[[str], Check],
) -> Distribution | None:
    """``raw`` as a :class:`Distribution`: a bare number is a constant (checked by
    ``constant``), a table names its ``kind`` and parameters (each checked by
    ``parameter(name)``). None after an error, each one line naming the key."""
    if not isinstance(raw, Mapping):
        problem = constant(raw)
        if problem is not None:
            checker.error(path, f"{raw!r} {problem}")
            return None
        return Distribution(kind="constant", value=float(raw))
    kind = _kind(checker, path, raw)
    if kind is None:
        return None
    valid = _DISTRIBUTION_KEYS[kind]
    checker.unknown_keys(path, raw, valid)
    before = len(checker.errors)
    parameters: dict[str, float] = {}
    for name in valid[1:]:
        if name not in raw:
            checker.error(f"{path}.{name}", f"missing: a {kind} {noun} needs {name}")
            continue
        problem = parameter(name)(raw[name])
        if problem is not None:
            checker.error(f"{path}.{name}", f"{raw[name]!r} {problem}")
            continue
        parameters[name] = float(raw[name])
    if parameters.get("sigma", 0.0) > LARGEST_SIGMA:
        checker.error(f"{path}.sigma", f"{raw['sigma']!r} must be <= {LARGEST_SIGMA:g}")
    if "low" in parameters and "high" in parameters and parameters["low"] > parameters["high"]:
        checker.error(f"{path}.high", f"{raw['high']!r} must be >= low")
    if len(checker.errors) > before:
        return None
    return Distribution(kind=kind, **parameters)


def _kind(checker: Checker, path: str, raw: Mapping[str, Any]) -> str | None:
    """A distribution table's ``kind``, or None (with the error noted)."""
    if "kind" not in raw:
        checker.error(f"{path}.kind", f"missing: one of {', '.join(DISTRIBUTIONS)}")
        return None
    kind = raw["kind"]
    problem = choice(DISTRIBUTIONS)(kind)
    if problem is not None:
        checker.error(f"{path}.kind", f"{kind!r} {problem}")
        return None
    assert isinstance(kind, str)
    return kind


_COUNT = integer(1, LARGEST_REQUESTS)


def _count_scale(raw: Any) -> str | None:
    """A count's mean or median: a number from 1 to :data:`LARGEST_REQUESTS`."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return "is not a number"
    if not 1 <= raw <= LARGEST_REQUESTS:  # a NaN fails this too
        return f"must be between 1 and {LARGEST_REQUESTS}"
    return None


def _requests(checker: Checker, path: str, table: Mapping[str, Any]) -> Distribution | None:
    """``requests``: a count of requests, a whole number from 1 on.

    The kinds are the distributions' own, over whole numbers: ``constant``
    (``value``), ``uniform`` (every whole number from ``low`` to ``high``),
    ``exponential`` (its discrete twin, the geometric distribution from 1,
    of that ``mean``) and ``lognormal`` (rounded, at least 1).
    """
    if "requests" not in table:
        return None
    return _parse_distribution(
        checker, path, table["requests"], noun="count", constant=_COUNT, parameter=_count_check
    )


def _count_check(name: str) -> Check:
    """The check of a count distribution's parameter ``name``: whole numbers, but sigma."""
    if name == "sigma":
        return _number
    return _COUNT if name in ("value", "low", "high") else _count_scale


def _optional_seconds(
    checker: Checker, path: str, table: Mapping[str, Any], key: str
) -> float | None:
    found = checker.value(path, table, key, None, _period)
    return None if found is None else float(found)


def _parse_backend_models(
    checker: Checker, raw: Any, addresses: tuple[str, ...]
) -> tuple[BackendModel, ...]:
    """``[[sim.backends]]``: a backend's own service time and latency."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        checker.error("sim.backends", f"{raw!r} is not an array of tables ([[sim.backends]])")
        return ()
    models: list[BackendModel] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(raw):
        path = f"sim.backends[{index}]"
        if not isinstance(entry, Mapping):
            checker.error(path, f"{entry!r} is not a table")
            continue
        checker.unknown_keys(path, entry, _SIM_BACKEND_KEYS)
        before = len(checker.errors)
        address = entry.get("address")
        if "address" not in entry:
            checker.error(f"{path}.address", "missing: which backend, by its address")
        elif _not_a_backend(checker, f"{path}.address", address, addresses):
            pass
        elif address in seen:
            checker.error(
                f"{path}.address", f"{address!r} duplicates sim.backends[{seen[address]}]"
            )
        service = _optional_distribution(checker, f"{path}.service", entry, "service")
        latency = _optional_distribution(checker, f"{path}.latency", entry, "latency")
        if len(checker.errors) == before:
            assert isinstance(address, str)
            seen[address] = index
            models.append(BackendModel(address=address, service=service, latency=latency))
    return tuple(models)


def _not_a_backend(
    checker: Checker, path: str, raw: Any, addresses: tuple[str, ...], star: bool = False
) -> bool:
    """Note it and say so if ``raw`` is not one of ``addresses`` (nor ``*``, if allowed)."""
    if star and raw == ALL_BACKENDS:
        return False
    if isinstance(raw, str) and raw in addresses:
        return False
    close = difflib.get_close_matches(str(raw), addresses, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    either = " (or '*')" if star else ""
    checker.error(path, f"{raw!r} is not a backend address{either}{hint}")
    return True


def _joins(own: tuple[str, ...], operations: tuple[Operation, ...]) -> dict[str, float]:
    """When each backend an operation brings (a reload or an add) first joins the run."""
    joins: dict[str, float] = {}
    for operation in operations:
        if operation.config is None:
            continue
        for backend in operation.config.backends:
            address = backend.address
            if address not in own and operation.at < joins.get(address, math.inf):
                joins[address] = operation.at
    return joins


def _parse_faults(
    checker: Checker,
    raw: Any,
    addresses: tuple[str, ...],
    joins: Mapping[str, float],
    warnings: list[str],
) -> tuple[Fault, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        checker.error("sim.faults", f"{raw!r} is not an array of tables ([[sim.faults]])")
        return ()
    faults: list[Fault] = []
    for index, entry in enumerate(raw):
        path = f"sim.faults[{index}]"
        if not isinstance(entry, Mapping):
            checker.error(path, f"{entry!r} is not a table")
            continue
        checker.unknown_keys(path, entry, _FAULT_KEYS)
        before = len(checker.errors)
        for required in ("at", "backend", "behaviour"):
            if required not in entry:
                checker.error(
                    f"{path}.{required}", "missing: every fault needs at, backend, behaviour"
                )
        at = float(checker.value(path, entry, "at", 0.0, _number))
        backend = entry.get("backend", ALL_BACKENDS)
        if "backend" in entry:
            _not_a_backend(checker, f"{path}.backend", backend, addresses, star=True)
        joined = joins.get(backend, -1.0) if isinstance(backend, str) else -1.0
        if "at" in entry and _number(entry["at"]) is None and at <= joined:
            # At one instant faults change before operations run: it is not there yet.
            checker.error(
                f"{path}.at",
                f"{entry['at']!r} must be later than {joined:g} s, when an operation "
                f"brings {backend!r}",
            )
        behaviour = checker.value(path, entry, "behaviour", "up", choice(BEHAVIOURS))
        until = checker.value(path, entry, "until", None, _number)
        if until is not None and until <= at:
            checker.error(f"{path}.until", f"{until!r} must be later than at ({at:g})")
        fault = Fault(
            at=at,
            backend=backend,
            behaviour=behaviour,
            until=None if until is None else float(until),
            **_fault_parameters(checker, path, entry),
        )
        if len(checker.errors) == before:
            faults.append(fault)
            warnings.extend(_ignored(path, entry, behaviour))
    return tuple(faults)


_DEFAULT_FAULT = Fault(at=0.0, backend=ALL_BACKENDS, behaviour="up")


def _fault_parameters(checker: Checker, path: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of a fault (or of a fault process's faults): see :data:`FAULT_PARAMETERS`."""
    defaults = _DEFAULT_FAULT
    return {
        "period": float(checker.value(path, entry, "period", defaults.period, _period)),
        "limit": checker.value(path, entry, "limit", defaults.limit, integer(0)),
        "delay": float(checker.value(path, entry, "delay", defaults.delay, _number)),
        "probability": float(
            checker.value(path, entry, "probability", defaults.probability, _fraction)
        ),
        "unread": checker.value(path, entry, "unread", defaults.unread, choice(UNREAD)),
    }


def _parse_fault_processes(
    checker: Checker,
    raw: Any,
    own: tuple[str, ...],
    addresses: tuple[str, ...],
    duration: float,
    warnings: list[str],
) -> tuple[FaultProcess, ...]:
    """``[[sim.fault_processes]]``: failures and repairs drawn from the seed.

    A process names what fails (``backend``: an address, or ``*`` for every
    backend, each on its own; or ``zone``: addresses that fail together),
    what a failure does (``behaviour`` and its parameters, as a fault's),
    how long a backend stays up and down (``mtbf``, ``mttr``: a bare number
    is the mean of an exponential, a table any distribution) and when
    failures may start (``start``, ``stop``: by default all of
    ``sim.duration``). Only the scenario's own ``[[backends]]`` can be named:
    a process runs from its start, before any reload.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list):
        checker.error(
            "sim.fault_processes",
            f"{raw!r} is not an array of tables ([[sim.fault_processes]])",
        )
        return ()
    processes: list[FaultProcess] = []
    for index, entry in enumerate(raw):
        path = f"sim.fault_processes[{index}]"
        if not isinstance(entry, Mapping):
            checker.error(path, f"{entry!r} is not a table")
            continue
        checker.unknown_keys(path, entry, _FAULT_PROCESS_KEYS)
        before = len(checker.errors)
        units = _units(checker, path, entry, own, addresses)
        if "behaviour" not in entry:
            checker.error(f"{path}.behaviour", f"missing: one of {', '.join(PROCESS_BEHAVIOURS)}")
        behaviour = checker.value(path, entry, "behaviour", "crash", choice(PROCESS_BEHAVIOURS))
        template = Fault(
            at=0.0,
            backend=ALL_BACKENDS,
            behaviour=behaviour,
            **_fault_parameters(checker, path, entry),
        )
        mtbf = _mean_time(checker, f"{path}.mtbf", entry, "mtbf")
        mttr = _mean_time(checker, f"{path}.mttr", entry, "mttr")
        start = float(checker.value(path, entry, "start", 0.0, _number))
        stop = checker.value(path, entry, "stop", None, _number)
        window_end = duration if stop is None else float(stop)
        if start >= duration:
            checker.error(
                f"{path}.start", f"{entry['start']!r} must be before sim.duration ({duration:g})"
            )
        elif stop is not None and stop > duration:
            checker.error(f"{path}.stop", f"{stop!r} must be <= sim.duration ({duration:g})")
        elif stop is not None and stop <= start:
            checker.error(f"{path}.stop", f"{stop!r} must be later than start ({start:g})")
        if len(checker.errors) > before or mtbf is None or mttr is None:
            continue
        expected = (window_end - start) / (_typical(mtbf) + _typical(mttr))
        expected *= sum(len(unit) for unit in units)
        if expected > MOST_EXPECTED_FAULTS:
            checker.error(
                f"{path}.mtbf",
                f"{mtbf.describe()} would draw about {expected:.0f} faults from "
                f"{start:g} s to {window_end:g} s (at most {MOST_EXPECTED_FAULTS})",
            )
            continue
        processes.append(
            FaultProcess(
                units=units,
                fault=template,
                mtbf=mtbf,
                mttr=mttr,
                start=start,
                stop=None if stop is None else float(stop),
                backend=entry.get("backend", "") if "zone" not in entry else "",
                zone=units[0] if "zone" in entry else (),
            )
        )
        warnings.extend(_ignored(path, entry, behaviour))
    return tuple(processes)


def _units(
    checker: Checker,
    path: str,
    entry: Mapping[str, Any],
    own: tuple[str, ...],
    addresses: tuple[str, ...],
) -> tuple[tuple[str, ...], ...]:
    """What a fault process fails: one unit per backend for ``*``, one for an address or a zone."""
    if "backend" in entry and "zone" in entry:
        checker.error(f"{path}.zone", "give backend or zone, not both")
        return ()
    if "zone" in entry:
        zone = entry["zone"]
        if not isinstance(zone, list) or not zone:
            checker.error(f"{path}.zone", f"{zone!r} is not a list of backend addresses")
            return ()
        members: list[str] = []
        for position, address in enumerate(zone):
            where = f"{path}.zone[{position}]"
            if _not_own(checker, where, address, own, addresses):
                continue
            if address in members:
                checker.error(where, f"{address!r} is listed twice")
                continue
            members.append(address)
        return (tuple(members),)
    if "backend" not in entry:
        checker.error(
            f"{path}.backend",
            "missing: a fault process needs backend (an address, or '*' for each backend "
            "on its own) or zone (addresses that fail together)",
        )
        return ()
    backend = entry["backend"]
    if backend == ALL_BACKENDS:
        return tuple((address,) for address in own)
    if _not_own(checker, f"{path}.backend", backend, own, addresses, star=True):
        return ()
    return ((backend,),)


def _not_own(
    checker: Checker,
    path: str,
    raw: Any,
    own: tuple[str, ...],
    addresses: tuple[str, ...],
    star: bool = False,
) -> bool:
    """:func:`_not_a_backend` for the scenario's own ``[[backends]]``."""
    if isinstance(raw, str) and raw in addresses and raw not in own:
        checker.error(
            path,
            f"{raw!r} is added by an operation: a fault process names only the "
            "scenario's own [[backends]]",
        )
        return True
    return _not_a_backend(checker, path, raw, own, star)


def _mean_time(
    checker: Checker, path: str, table: Mapping[str, Any], key: str
) -> Distribution | None:
    """``mtbf`` or ``mttr``: a bare number is an exponential's mean, a table any distribution."""
    if key not in table:
        checker.error(path, f"missing: the mean seconds {_MEAN_TIMES[key]}")
        return None
    raw = table[key]
    if not isinstance(raw, Mapping):
        problem = _scale(raw)
        if problem is not None:
            checker.error(path, f"{raw!r} {problem}")
            return None
        return Distribution(kind="exponential", mean=float(raw))
    found = _optional_distribution(checker, path, table, key)
    if found is not None and _typical(found) <= 0:
        checker.error(path, f"{found.describe()} must not be always 0")
        return None
    return found


_MEAN_TIMES = {
    "mtbf": "a backend stays up between failures",
    "mttr": "a failure lasts until its repair",
}


def _typical(distribution: Distribution) -> float:
    """A draw's typical size: the mean, or the median of a lognormal (whose mean its tail makes)."""
    if distribution.kind == "constant":
        return distribution.value
    if distribution.kind == "uniform":
        return (distribution.low + distribution.high) / 2
    if distribution.kind == "exponential":
        return distribution.mean
    return distribution.median


def _ignored(path: str, entry: Mapping[str, Any], behaviour: str) -> list[str]:
    """A warning for each parameter a fault sets that its behaviour never reads."""
    warnings = [
        f"{path}.{key}: {behaviour!r} ignores {key}; only {user!r} uses it"
        for key, user in FAULT_PARAMETERS.items()
        if key in entry and behaviour != user
    ]
    if "until" in entry and behaviour in ("up", "recover"):
        warnings.append(
            f"{path}.until: {behaviour!r} ignores until; the backend is up after it either way"
        )
    return warnings


def _parse_operations(
    checker: Checker,
    raw: Any,
    lb_part: Mapping[str, Any],
    base_dir: Path | None,
    config: Config | None,
) -> tuple[Operation, ...]:
    """``[[sim.operations]]``: an operator's actions in virtual time.

    A reload's ``config`` is a path to a config file (relative to the
    scenario) or an inline table; either way its sections replace the
    scenario's own whole, as ``sim.config`` does, so ``config = { backends =
    [...] }`` changes only the backends. ``add`` and ``remove`` are reloads
    too, built here from the configuration in force at that instant (see
    :func:`_membership`).
    """
    if raw is None:
        return ()
    if not isinstance(raw, list):
        checker.error("sim.operations", f"{raw!r} is not an array of tables ([[sim.operations]])")
        return ()
    operations: list[tuple[int, Operation]] = []
    for index, entry in enumerate(raw):
        path = f"sim.operations[{index}]"
        if not isinstance(entry, Mapping):
            checker.error(path, f"{entry!r} is not a table")
            continue
        checker.unknown_keys(path, entry, _OPERATION_KEYS)
        before = len(checker.errors)
        for required in ("at", "action"):
            if required not in entry:
                checker.error(f"{path}.{required}", "missing: every operation needs at and action")
        at = float(checker.value(path, entry, "at", 0.0, _number))
        action = checker.value(path, entry, "action", "reload", choice(ACTIONS))
        backend = ""
        weight = 0
        reloaded: Config | None = None
        if action == "reload":
            for stray in ("backend", "weight"):
                if stray in entry:
                    checker.error(f"{path}.{stray}", "a reload takes only 'config'")
            reloaded = _reload_config(checker, path, entry, lb_part, base_dir)
        else:
            if "config" in entry:
                checker.error(f"{path}.config", f"only a reload takes a config, not {action!r}")
            if "backend" not in entry:
                checker.error(f"{path}.backend", f"missing: {action!r} needs the backend's address")
            elif not isinstance(entry["backend"], str):
                checker.error(f"{path}.backend", f"{entry['backend']!r} is not an address")
            else:
                backend = entry["backend"]
            if action == "weight":
                if "weight" not in entry:
                    checker.error(f"{path}.weight", "missing: 'weight' needs the new weight")
                weight = checker.value(path, entry, "weight", 1, WEIGHT)
            elif action == "add":
                weight = checker.value(path, entry, "weight", 1, WEIGHT)
            elif "weight" in entry:
                checker.error(
                    f"{path}.weight",
                    f"only action 'weight' takes a weight (and 'add', the new backend's), "
                    f"not {action!r}",
                )
        if len(checker.errors) == before:
            operation = Operation(
                at=at, action=action, backend=backend, weight=weight, config=reloaded
            )
            operations.append((index, operation))
    if config is not None and any(op.action in MEMBERSHIP for _, op in operations):
        operations = _membership(checker, operations, config)
    return tuple(operation for _, operation in operations)


def _membership(
    checker: Checker, operations: list[tuple[int, Operation]], config: Config
) -> list[tuple[int, Operation]]:
    """Turn each ``add`` and ``remove`` into the reload it stands for.

    The operations are followed in the order the run applies them (by
    ``at``, then in file order) from the scenario's configuration: a reload
    puts its configuration in force, a ``weight`` changes that backend's
    weight in it (an operator's weight stays in force across an add or a
    remove, as it would if the operator wrote it in the file), and an
    ``add`` or a ``remove`` becomes a reload of the configuration in force
    with that one backend added (last, with its ``weight``) or removed. An
    add of a backend already there, a remove of one that is not, or of the
    last one, is an error naming the operation.
    """
    current = config
    built: dict[int, Operation | None] = {}
    for index, operation in sorted(operations, key=lambda item: (item[1].at, item[0])):
        path = f"sim.operations[{index}].backend"
        address = operation.backend
        present = [backend.address for backend in current.backends]
        if operation.action == "reload":
            assert operation.config is not None
            current = operation.config
        elif operation.action == "weight":
            current = dataclasses.replace(
                current,
                backends=tuple(
                    dataclasses.replace(backend, weight=operation.weight)
                    if backend.address == address
                    else backend
                    for backend in current.backends
                ),
            )
        elif operation.action == "add":
            built[index] = None
            if address in present:
                checker.error(path, f"{address!r} is already a backend at {operation.at:g} s")
                continue
            document = config_to_dict(current)
            document["backends"].append({"address": address, "weight": operation.weight})
            try:
                current = parse_config(document)
            except ConfigError as error:
                for line in error.errors:
                    checker.error(path, line.partition(": ")[2] or line)
                continue
            built[index] = dataclasses.replace(
                operation, action="reload", config=current, written_as="add"
            )
        elif operation.action == "remove":
            built[index] = None
            if address not in present:
                known = ", ".join(present)
                checker.error(
                    path, f"{address!r} is not a backend at {operation.at:g} s (they are {known})"
                )
                continue
            if len(present) == 1:
                checker.error(path, f"{address!r} is the last backend: there must be one at least")
                continue
            current = dataclasses.replace(
                current,
                backends=tuple(b for b in current.backends if b.address != address),
            )
            built[index] = dataclasses.replace(
                operation, action="reload", weight=0, config=current, written_as="remove"
            )
    kept: list[tuple[int, Operation]] = []
    for index, operation in operations:
        replacement = built.get(index, operation)
        if replacement is not None:  # an add or a remove in error is dropped
            kept.append((index, replacement))
    return kept


def _reload_config(
    checker: Checker,
    path: str,
    entry: Mapping[str, Any],
    lb_part: Mapping[str, Any],
    base_dir: Path | None,
) -> Config | None:
    if "config" not in entry:
        checker.error(f"{path}.config", "missing: a reload needs a config (a path or a table)")
        return None
    raw = entry["config"]
    if isinstance(raw, str):
        try:
            table: Mapping[str, Any] = read_toml((base_dir or Path()) / raw)
        except ConfigError as error:
            checker.errors.extend(f"{path}.config: {line}" for line in error.errors)
            return None
    elif isinstance(raw, Mapping):
        table = raw
    else:
        checker.error(f"{path}.config", f"{raw!r} is not a path or a table")
        return None
    document = {**lb_part, **{key: value for key, value in table.items() if key != "sim"}}
    try:
        return parse_config(document)
    except ConfigError as error:
        checker.errors.extend(f"{path}.config.{line}" for line in error.errors)
        return None


def _check_operation_backends(checker: Checker, raw: Any, addresses: tuple[str, ...]) -> None:
    if not isinstance(raw, list):
        return
    for position, entry in enumerate(raw):
        if not isinstance(entry, Mapping):
            continue
        backend = entry.get("backend")
        if (
            isinstance(backend, str)
            and entry.get("action") not in ("reload", *MEMBERSHIP)
            and backend not in addresses
        ):
            close = difflib.get_close_matches(backend, addresses, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            checker.error(
                f"sim.operations[{position}].backend", f"{backend!r} is not a backend address{hint}"
            )
