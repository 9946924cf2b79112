"""The configuration schema: typed, validated, with documented defaults.

:func:`parse_config` turns the mapping read from a TOML file into a frozen
:class:`Config`, or raises :class:`ConfigError` listing *every* problem, each
naming the key path and the bad value. It reads no file: the caller parses the
TOML (``loble.config.load_config`` does), so the simulator can validate the
load-balancer part of a scenario with exactly the same code.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from ._errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "RUNTIME_BACKENDS",
    "BackendConfig",
    "BalancerConfig",
    "Config",
    "HealthConfig",
    "ListenerConfig",
    "LoggingConfig",
    "MetricsConfig",
    "RuntimeConfig",
    "TimeoutsConfig",
    "config_to_dict",
    "parse_address",
    "parse_config",
]

ALGORITHMS = ("round_robin", "random", "least_connections", "p2c")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("logfmt", "json")
RUNTIME_BACKENDS = ("asyncio", "uvloop", "trio")


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerConfig:
    address: str = "127.0.0.1:9000"
    """Where clients connect. Port 0 lets the OS pick one (tests use it)."""
    backlog: int = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class BalancerConfig:
    algorithm: str = "round_robin"
    connect_retries: int = 2
    """Extra connect attempts, each on a backend not yet tried (redispatch)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthConfig:
    failure_threshold: int = 3
    success_threshold: int = 2
    probe_interval: float = 2.0
    """Seconds between probes of a backend that is being probed."""
    probe_timeout: float = 1.0
    active: bool = False
    """Probe every backend, not only the unhealthy ones."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutsConfig:
    connect: float = 5.0
    idle: float = 300.0
    drain: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    enabled: bool = False
    address: str = "127.0.0.1:9090"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingConfig:
    level: str = "info"
    format: str = "logfmt"
    access_log: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeConfig:
    backend: str = "asyncio"
    workers: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    address: str
    weight: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    backends: tuple[BackendConfig, ...] = ()


_SECTIONS: dict[str, type[Any]] = {
    "listener": ListenerConfig,
    "balancer": BalancerConfig,
    "health": HealthConfig,
    "timeouts": TimeoutsConfig,
    "metrics": MetricsConfig,
    "logging": LoggingConfig,
    "runtime": RuntimeConfig,
}
_TOP_LEVEL = (*_SECTIONS, "backends")

# Slotted dataclasses keep no class-level defaults, so read them off instances.
_DEFAULT_LISTENER = ListenerConfig()
_DEFAULT_BALANCER = BalancerConfig()
_DEFAULT_HEALTH = HealthConfig()
_DEFAULT_TIMEOUTS = TimeoutsConfig()
_DEFAULT_METRICS = MetricsConfig()
_DEFAULT_LOGGING = LoggingConfig()
_DEFAULT_RUNTIME = RuntimeConfig()

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
# Host names as resolvers take them: DNS labels, plus the underscores that
# container service names use, and an optional trailing dot (fully qualified).
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$)(?:{_LABEL})(?:\.{_LABEL})*\.?")


def parse_address(text: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port``; raise ValueError saying what is wrong."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError("has no closing ']'")
        host, rest = text[1:close], text[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"'{host}' is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError("has no port")
        port_text = rest[1:]
    else:
        if text.count(":") > 1:
            raise ValueError("is IPv6 without brackets: write it as [address]:port")
        host, sep, port_text = text.partition(":")
        if not sep:
            raise ValueError("has no port")
        if not host:
            raise ValueError("has no host")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{host!r} is not a valid host name or IPv4 address")
        if all(label.isdigit() for label in host.rstrip(".").split(".")):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{host!r} is not a valid IPv4 address") from None
    if not port_text.isdigit():
        raise ValueError(f"port '{port_text}' is not a number")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} is out of range {low}-65535")
    return host, port


_T = TypeVar("_T")


class _Checker:
    """Collects every error instead of stopping at the first."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def unknown_keys(self, path: str, table: Mapping[str, Any], valid: tuple[str, ...]) -> None:
        for key in table:
            if key in valid:
                continue
            where = f"{path}.{key}" if path else key
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            self.errors.append(f"{where}: unknown key{hint}")

    def value(
        self,
        path: str,
        table: Mapping[str, Any],
        key: str,
        default: _T,
        check: Callable[[Any], str | None],
    ) -> _T:
        if key not in table:
            return default
        raw = table[key]
        problem = check(raw)
        if problem is not None:
            self.error(f"{path}.{key}", f"{raw!r} {problem}")
            return default
        return raw  # type: ignore[no-any-return]


def _integer(minimum: int, maximum: int | None = None) -> Callable[[Any], str | None]:
    def check(raw: Any) -> str | None:
        if isinstance(raw, bool) or not isinstance(raw, int):
            return "is not an integer"
        if raw < minimum:
            return f"must be >= {minimum}"
        if maximum is not None and raw > maximum:
            return f"must be <= {maximum}"
        return None

    return check


_SHORTEST = 0.001
"""The shortest timeout or interval: below a millisecond no clock or network
means anything, and a period so small that ``now + period == now`` would never
let time move on."""


def _seconds(*, positive: bool = True, minimum: float | None = None) -> Callable[[Any], str | None]:
    def check(raw: Any) -> str | None:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            return "is not a number of seconds"
        try:
            seconds = float(raw)
        except OverflowError:
            return "is too large"
        if not math.isfinite(seconds):
            return "is not finite"
        if seconds > 10**9:
            return "is too large (more than 10^9 seconds)"
        if minimum is not None and seconds < minimum:
            return f"must be at least {minimum} seconds"
        if positive and seconds <= 0:
            return "must be > 0 seconds"
        return None

    return check


def _boolean(raw: Any) -> str | None:
    return None if isinstance(raw, bool) else "is not true or false"


def _choice(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(raw: Any) -> str | None:
        if not isinstance(raw, str):
            return "is not a string"
        if raw not in options:
            close = difflib.get_close_matches(raw, options, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            return f"is not one of {', '.join(options)}{hint}"
        return None

    return check


def _address(*, allow_port_zero: bool = False) -> Callable[[Any], str | None]:
    def check(raw: Any) -> str | None:
        if not isinstance(raw, str):
            return "is not a 'host:port' string"
        try:
            parse_address(raw, allow_port_zero=allow_port_zero)
        except ValueError as problem:
            return str(problem)
        return None

    return check


def _table(checker: _Checker, path: str, raw: Any) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        checker.error(path, f"{raw!r} is not a table")
        return {}
    return raw


def _section(checker: _Checker, data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    table = _table(checker, name, data.get(name))
    valid = tuple(f.name for f in fields(_SECTIONS[name]))
    checker.unknown_keys(name, table, valid)
    return table


def parse_config(data: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document and return the effective configuration."""
    checker = _Checker()
    checker.unknown_keys("", data, _TOP_LEVEL)

    table = _section(checker, data, "listener")
    listener = ListenerConfig(
        address=checker.value(
            "listener",
            table,
            "address",
            _DEFAULT_LISTENER.address,
            _address(allow_port_zero=True),
        ),
        backlog=checker.value(
            "listener", table, "backlog", _DEFAULT_LISTENER.backlog, _integer(1, 1_000_000)
        ),
    )

    table = _section(checker, data, "balancer")
    balancer = BalancerConfig(
        algorithm=checker.value(
            "balancer", table, "algorithm", _DEFAULT_BALANCER.algorithm, _choice(ALGORITHMS)
        ),
        connect_retries=checker.value(
            "balancer",
            table,
            "connect_retries",
            _DEFAULT_BALANCER.connect_retries,
            _integer(0, 100),
        ),
    )

    table = _section(checker, data, "health")
    health = HealthConfig(
        failure_threshold=checker.value(
            "health",
            table,
            "failure_threshold",
            _DEFAULT_HEALTH.failure_threshold,
            _integer(1, 1_000),
        ),
        success_threshold=checker.value(
            "health",
            table,
            "success_threshold",
            _DEFAULT_HEALTH.success_threshold,
            _integer(1, 1_000),
        ),
        probe_interval=float(
            checker.value(
                "health",
                table,
                "probe_interval",
                _DEFAULT_HEALTH.probe_interval,
                _seconds(minimum=_SHORTEST),
            )
        ),
        probe_timeout=float(
            checker.value(
                "health",
                table,
                "probe_timeout",
                _DEFAULT_HEALTH.probe_timeout,
                _seconds(minimum=_SHORTEST),
            )
        ),
        active=checker.value("health", table, "active", _DEFAULT_HEALTH.active, _boolean),
    )

    table = _section(checker, data, "timeouts")
    timeouts = TimeoutsConfig(
        connect=float(
            checker.value(
                "timeouts", table, "connect", _DEFAULT_TIMEOUTS.connect, _seconds(minimum=_SHORTEST)
            )
        ),
        idle=float(
            checker.value(
                "timeouts", table, "idle", _DEFAULT_TIMEOUTS.idle, _seconds(minimum=_SHORTEST)
            )
        ),
        drain=float(
            checker.value(
                "timeouts", table, "drain", _DEFAULT_TIMEOUTS.drain, _seconds(positive=False)
            )
        ),
    )
    if timeouts.drain < 0:
        checker.error("timeouts.drain", f"{timeouts.drain!r} must be >= 0 seconds")
        timeouts = TimeoutsConfig(connect=timeouts.connect, idle=timeouts.idle)

    table = _section(checker, data, "metrics")
    metrics = MetricsConfig(
        enabled=checker.value("metrics", table, "enabled", _DEFAULT_METRICS.enabled, _boolean),
        address=checker.value(
            "metrics", table, "address", _DEFAULT_METRICS.address, _address(allow_port_zero=True)
        ),
    )

    table = _section(checker, data, "logging")
    logging = LoggingConfig(
        level=checker.value("logging", table, "level", _DEFAULT_LOGGING.level, _choice(LOG_LEVELS)),
        format=checker.value(
            "logging", table, "format", _DEFAULT_LOGGING.format, _choice(LOG_FORMATS)
        ),
        access_log=checker.value(
            "logging", table, "access_log", _DEFAULT_LOGGING.access_log, _boolean
        ),
    )

    table = _section(checker, data, "runtime")
    runtime = RuntimeConfig(
        backend=checker.value(
            "runtime", table, "backend", _DEFAULT_RUNTIME.backend, _choice(RUNTIME_BACKENDS)
        ),
        workers=checker.value(
            "runtime", table, "workers", _DEFAULT_RUNTIME.workers, _integer(1, 256)
        ),
    )

    backends = _parse_backends(checker, data.get("backends"))

    if checker.errors:
        raise ConfigError(checker.errors)
    return Config(
        listener=listener,
        balancer=balancer,
        health=health,
        timeouts=timeouts,
        metrics=metrics,
        logging=logging,
        runtime=runtime,
        backends=backends,
    )


def _parse_backends(checker: _Checker, raw: Any) -> tuple[BackendConfig, ...]:
    if raw is None:
        checker.error("backends", "no backends: add at least one [[backends]] table")
        return ()
    if not isinstance(raw, list):
        checker.error("backends", f"{raw!r} is not an array of tables ([[backends]])")
        return ()
    if not raw:
        checker.error("backends", "no backends: add at least one [[backends]] table")
    valid = tuple(f.name for f in fields(BackendConfig))
    seen: dict[tuple[str, int], int] = {}
    backends: list[BackendConfig] = []
    for index, entry in enumerate(raw):
        path = f"backends[{index}]"
        if not isinstance(entry, Mapping):
            checker.error(path, f"{entry!r} is not a table")
            continue
        checker.unknown_keys(path, entry, valid)
        if "address" not in entry:
            checker.error(f"{path}.address", "missing: every backend needs 'host:port'")
            continue
        address = entry["address"]
        weight = checker.value(path, entry, "weight", 1, _integer(1, 1_000_000))
        problem = _address()(address)
        if problem is not None:
            checker.error(f"{path}.address", f"{address!r} {problem}")
            continue
        key = _canonical(address)
        if key in seen:
            checker.error(
                f"{path}.address",
                f"{address!r} duplicates backends[{seen[key]}].address",
            )
            continue
        seen[key] = index
        backends.append(BackendConfig(address=address, weight=weight))
    return tuple(backends)


def _canonical(address: str) -> tuple[str, int]:
    host, port = parse_address(address)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = host.lower()
    return host, port


def config_to_dict(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, defaults filled in (for TOML output)."""
    result: dict[str, Any] = {}
    for name in _SECTIONS:
        section = getattr(config, name)
        result[name] = {f.name: getattr(section, f.name) for f in fields(section)}
    result["backends"] = [
        {"address": backend.address, "weight": backend.weight} for backend in config.backends
    ]
    return result
