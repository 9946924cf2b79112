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

This module reads no clock and draws no random number: it only turns a
document into frozen values (and each :class:`Distribution` into a sampler
bound to the run's one ``random.Random``).
"""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loble.config import read_toml
from loble.core import Checker, Config, ConfigError, choice, integer, parse_config, seconds

__all__ = [
    "BEHAVIOURS",
    "ClientsConfig",
    "Distribution",
    "Fault",
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
* ``accept_hang``: connects and probes succeed (the kernel accepts), then
  nothing answers: each new connection hangs until the idle timeout.
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
)
WEIGHT = integer(1, 1_000_000)
"""A ``[[backends]] weight``'s bounds, which ``ProxyCore.set_weight`` enforces too."""
ACTIONS = ("drain", "undrain", "maintenance", "ready", "weight", "reload")
"""What an operator does at a scheduled instant: an admin request on one
backend (``drain``, ``undrain``, ``maintenance``, ``ready``), a new
``weight`` for one, or a ``reload`` of the whole configuration."""
_OPERATION_KEYS = ("at", "action", "backend", "weight", "config")
_CLIENT_KEYS = ("arrival", "rate", "schedule", "duration", "bytes", "half_close")
_NETWORK_KEYS = ("latency",)
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
    operations = _parse_operations(checker, sim_table.get("operations"), lb_part, base_dir)
    # A fault or an operation may name any backend the run will know: the
    # scenario's own, and those a reload adds.
    addresses = _addresses(lb_part.get("backends"))
    for operation in operations:
        if operation.config is not None:
            added = (b.address for b in operation.config.backends if b.address not in addresses)
            addresses = (*addresses, *added)
    _check_operation_backends(checker, sim_table.get("operations"), addresses)
    warnings: list[str] = []
    sim = _parse_sim(checker, sim_table, addresses, operations, warnings)
    if checker.errors or config is None:
        raise ConfigError(checker.errors)
    return Scenario(name=name, config=config, sim=sim, warnings=tuple(warnings))


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
    operations: tuple[Operation, ...],
    warnings: list[str],
) -> SimConfig:
    checker.unknown_keys("sim", table, _SIM_KEYS)
    defaults = SimConfig()
    duration = float(checker.value("sim", table, "duration", defaults.duration, seconds()))
    seed = checker.value("sim", table, "seed", defaults.seed, integer(0))
    shutdown_at = checker.value("sim", table, "shutdown_at", None, _number)
    settle = float(checker.value("sim", table, "settle", defaults.settle, _number))
    clients = _parse_clients(checker, checker.table("sim.clients", table.get("clients")))
    network_table = checker.table("sim.network", table.get("network"))
    checker.unknown_keys("sim.network", network_table, _NETWORK_KEYS)
    network = NetworkConfig(
        latency=_distribution(
            checker, "sim.network.latency", network_table, "latency", NetworkConfig().latency
        )
    )
    faults = _parse_faults(checker, table.get("faults"), addresses, warnings)
    return SimConfig(
        duration=duration,
        seed=seed,
        shutdown_at=None if shutdown_at is None else float(shutdown_at),
        settle=settle,
        clients=clients,
        network=network,
        faults=faults,
        operations=operations,
    )


def _parse_clients(checker: Checker, table: Mapping[str, Any]) -> ClientsConfig:
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
    return ClientsConfig(
        arrival=arrival,
        rate=rate,
        schedule=tuple(schedule),
        duration=_distribution(checker, f"{path}.duration", table, "duration", defaults.duration),
        bytes=_distribution(checker, f"{path}.bytes", table, "bytes", defaults.bytes),
        half_close=float(checker.value(path, table, "half_close", defaults.half_close, _fraction)),
    )


def _distribution(
    checker: Checker, path: str, table: Mapping[str, Any], key: str, default: Distribution
) -> Distribution:
    """A bare number means a constant; a table names its ``kind`` and parameters."""
    if key not in table:
        return default
    raw = table[key]
    if not isinstance(raw, Mapping):
        problem = _number(raw)
        if problem is not None:
            checker.error(path, f"{raw!r} {problem}")
            return default
        return Distribution(kind="constant", value=float(raw))
    if "kind" not in raw:
        checker.error(f"{path}.kind", f"missing: one of {', '.join(DISTRIBUTIONS)}")
        return default
    kind = raw["kind"]
    problem = choice(DISTRIBUTIONS)(kind)
    if problem is not None:
        checker.error(f"{path}.kind", f"{kind!r} {problem}")
        return default
    assert isinstance(kind, str)
    valid = _DISTRIBUTION_KEYS[kind]
    checker.unknown_keys(path, raw, valid)
    before = len(checker.errors)
    parameters: dict[str, float] = {}
    for name in valid[1:]:
        if name not in raw:
            checker.error(f"{path}.{name}", f"missing: a {kind} distribution needs {name}")
            continue
        problem = (_scale if name in ("mean", "median") else _number)(raw[name])
        if problem is not None:
            checker.error(f"{path}.{name}", f"{raw[name]!r} {problem}")
            continue
        parameters[name] = float(raw[name])
    if parameters.get("sigma", 0.0) > LARGEST_SIGMA:
        checker.error(f"{path}.sigma", f"{raw['sigma']!r} must be <= {LARGEST_SIGMA:g}")
    if "low" in parameters and "high" in parameters and parameters["low"] > parameters["high"]:
        checker.error(f"{path}.high", f"{raw['high']!r} must be >= low")
    if len(checker.errors) > before:
        return default
    return Distribution(kind=kind, **parameters)


def _parse_faults(
    checker: Checker, raw: Any, addresses: tuple[str, ...], warnings: list[str]
) -> tuple[Fault, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        checker.error("sim.faults", f"{raw!r} is not an array of tables ([[sim.faults]])")
        return ()
    faults: list[Fault] = []
    defaults = Fault(at=0.0, backend=ALL_BACKENDS, behaviour="up")
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
        if "backend" in entry and backend != ALL_BACKENDS and backend not in addresses:
            close = difflib.get_close_matches(str(backend), addresses, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            checker.error(f"{path}.backend", f"{backend!r} is not a backend address (or '*'){hint}")
        behaviour = checker.value(path, entry, "behaviour", "up", choice(BEHAVIOURS))
        until = checker.value(path, entry, "until", None, _number)
        if until is not None and until <= at:
            checker.error(f"{path}.until", f"{until!r} must be later than at ({at:g})")
        fault = Fault(
            at=at,
            backend=backend,
            behaviour=behaviour,
            until=None if until is None else float(until),
            period=float(checker.value(path, entry, "period", defaults.period, _period)),
            limit=checker.value(path, entry, "limit", defaults.limit, integer(0)),
            delay=float(checker.value(path, entry, "delay", defaults.delay, _number)),
            probability=float(
                checker.value(path, entry, "probability", defaults.probability, _fraction)
            ),
            unread=checker.value(path, entry, "unread", defaults.unread, choice(UNREAD)),
        )
        if len(checker.errors) == before:
            faults.append(fault)
            warnings.extend(_ignored(path, entry, behaviour))
    return tuple(faults)


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
    checker: Checker, raw: Any, lb_part: Mapping[str, Any], base_dir: Path | None
) -> tuple[Operation, ...]:
    """``[[sim.operations]]``: an operator's actions in virtual time.

    A reload's ``config`` is a path to a config file (relative to the
    scenario) or an inline table; either way its sections replace the
    scenario's own whole, as ``sim.config`` does, so ``config = { backends =
    [...] }`` changes only the backends.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list):
        checker.error("sim.operations", f"{raw!r} is not an array of tables ([[sim.operations]])")
        return ()
    operations: list[Operation] = []
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
        config: Config | None = None
        if action == "reload":
            for stray in ("backend", "weight"):
                if stray in entry:
                    checker.error(f"{path}.{stray}", "a reload takes only 'config'")
            config = _reload_config(checker, path, entry, lb_part, base_dir)
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
            elif "weight" in entry:
                checker.error(
                    f"{path}.weight", f"only action 'weight' takes a weight, not {action!r}"
                )
        if len(checker.errors) == before:
            operations.append(
                Operation(at=at, action=action, backend=backend, weight=weight, config=config)
            )
    return tuple(operations)


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
            and entry.get("action") != "reload"
            and backend not in addresses
        ):
            close = difflib.get_close_matches(backend, addresses, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            checker.error(
                f"sim.operations[{position}].backend", f"{backend!r} is not a backend address{hint}"
            )
