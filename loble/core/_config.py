"""The configuration schema: typed, validated, with documented defaults.

:func:`parse_config` turns the mapping read from a TOML file into a frozen
:class:`Config`, or raises :class:`ConfigError` listing *every* problem, each
naming the key path and the bad value. It reads no file: the caller parses the
TOML (``loble.config.load_config`` does), so the simulator can validate the
load-balancer part of a scenario with exactly the same code.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ._errors import ConfigError
from ._hashing import DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_RING_POINTS, is_prime
from ._probe import CONNECT_ONLY, PAYLOAD_LIMIT, ProbeCheck
from ._schema import Check, Checker, boolean, choice, integer, seconds

__all__ = [
    "ALGORITHMS",
    "HASHING_ALGORITHMS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_CONNECTIONS",
    "RUNTIME_BACKENDS",
    "SEND_PROXY",
    "WEIGHT",
    "AdminConfig",
    "BackendConfig",
    "BalancerConfig",
    "Config",
    "HealthConfig",
    "ListenerConfig",
    "LoggingConfig",
    "MetricsConfig",
    "OutlierConfig",
    "RuntimeConfig",
    "TimeoutsConfig",
    "config_to_dict",
    "parse_address",
    "parse_config",
    "probe_checks",
    "send_proxy_versions",
]

HASHING_ALGORITHMS = ("maglev", "ring_hash")
"""The algorithms that pick by the client's address (``hash_key``)."""
ALGORITHMS = ("round_robin", "random", "least_connections", "p2c", *HASHING_ALGORITHMS)
HASH_KEYS = ("address", "address_port")
WEIGHT = integer(1, 1_000_000)
"""The check of a backend's weight, in the config and for an operator's change."""
MAX_CONNECTIONS = integer(0, 1_000_000)
"""The check of a backend's ``max_connections``, in the config and for an operator's change."""
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("logfmt", "json")
RUNTIME_BACKENDS = ("asyncio", "uvloop", "trio")
SEND_PROXY = ("off", "v1", "v2")
"""What ``send_proxy`` takes: no PROXY protocol header to backends, or one of version 1 or 2."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerConfig:
    address: str = "127.0.0.1:9000"
    """Where clients connect. Port 0 lets the OS pick one (tests use it)."""
    backlog: int = 1024
    max_connections: int = 0
    """Client connections carried at once (HAProxy's ``maxconn``); at this many,
    accepting pauses and new clients wait in the listen backlog. 0: no limit
    but the one the file descriptors allow. A reload applies it at once."""
    accept_proxy_from: tuple[str, ...] = ()
    """Networks (canonical CIDRs) whose clients must begin with a PROXY protocol
    header, v1 or v2 (HAProxy's ``accept-proxy``); empty: no client may, and no
    client's bytes are ever read as one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BalancerConfig:
    algorithm: str = "round_robin"
    connect_retries: int = 2
    """Extra connect attempts, each on a backend not yet tried (redispatch)."""
    send_proxy: str = "off"
    """The PROXY protocol header sent to every backend before the client's bytes
    (``v1``, ``v2``), or none (``off``); a backend's own ``send_proxy`` overrides it."""
    hash_key: str = "address"
    """What ``maglev`` and ``ring_hash`` hash: the client's address, or address and port."""
    maglev_table_size: int = DEFAULT_MAGLEV_TABLE_SIZE
    """Slots of the Maglev lookup table: a prime, as Envoy's (65,537)."""
    ring_points: int = DEFAULT_RING_POINTS
    """Points on the hash ring per unit of a backend's weight (nginx's 160)."""
    slow_start: float = 0.0
    """Seconds over which a backend back in rotation ramps up to its full share
    of new connections (HAProxy's ``slowstart``); 0: at once."""
    slow_start_floor: float = 0.1
    """The share of its picks a backend keeps as its slow start begins (Envoy's
    ``min_weight_percent``, 10%)."""
    panic_threshold: float = 0.0
    """Below this share of healthy primary backends, spread over all of them,
    healthy or not (Envoy's ``healthy_panic_threshold``); 0: never."""
    queue_size: int = 1024
    """Clients that may wait at once for a backend with room, when every
    eligible backend is at its ``max_connections`` (HAProxy's queue, bounded as
    Envoy's ``max_pending_requests``, 1,024); beyond it a client is refused
    (``queue_full``). 0: no queue, refused at once."""
    queue_timeout: float = 5.0
    """Seconds a client waits in that queue before it is refused
    (``queue_timeout``): HAProxy's ``timeout queue``, which defaults to the
    connect timeout, as this does to its default."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthConfig:
    failure_threshold: int = 3
    success_threshold: int = 2
    probe_interval: float = 2.0
    """Seconds between probes of a backend that is being probed."""
    probe_timeout: float = 1.0
    active: bool = False
    """Probe every backend, not only the unhealthy ones."""
    probe_send: str = ""
    """Bytes a probe writes once connected (as UTF-8; ``"PING\\r\\n"``); "" for
    none. With no expectation the probe passes once they are written."""
    probe_expect: str = ""
    """A prefix the probe's reply must begin with (``"+PONG"``); "" for none."""
    probe_expect_regex: str = ""
    """A Python regular expression that must be found in the probe's reply
    (``re.search``, over bytes); "" for none. At most one of the two expect keys."""
    probe_jitter: float = 0.0
    """Each probe's next interval is ``probe_interval * (1 + u)``, ``u`` drawn
    uniform in ``[-probe_jitter, +probe_jitter]``, so the probes of many
    backends do not march in step; 0: exactly ``probe_interval``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutsConfig:
    connect: float = 5.0
    idle: float = 300.0
    drain: float = 30.0
    removal: float = 0.0
    """Seconds a backend removed by a reload may keep its connections; the
    ones still open then are cut (``Outcome.REMOVED``). 0: no limit, wait."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierConfig:
    """Outlier ejection (Envoy's ``outlier_detection``, for L4): a backend whose
    established connections its own resets end is taken out for a while."""

    consecutive_resets: int = 0
    """Established connections in a row that the backend ended with a reset
    that eject it (Envoy's ``consecutive_5xx``); 0: not by count."""
    failure_rate: float = 0.0
    """The share of a backend's judged connections (completed or reset by it)
    in one ``interval`` at which it is ejected; 0: not by rate."""
    minimum_connections: int = 50
    """Judged connections a backend must have ended in the interval for a verdict
    by rate (Envoy's ``failure_percentage_request_volume``, 50)."""
    interval: float = 10.0
    """Seconds between verdicts by rate (Envoy's ``interval``, 10 s)."""
    base_ejection_time: float = 30.0
    """The first ejection's length; the n-th in a row lasts n times it (Envoy's 30 s)."""
    max_ejection_time: float = 300.0
    """The longest an ejection lasts (Envoy's 300 s)."""
    max_ejection_percent: int = 10
    """The most of the backends ejected at once, in percent, rounded down but at
    least one (Envoy's 10%)."""
    redispatch_pending: bool = False
    """A connect in progress on a backend judged bad (taken out by health, or
    ejected) moves to another backend at once instead of waiting out its timeout."""
    first_byte_timeout: float = 0.0
    """Seconds after a client's first bytes within which the backend must send
    one, else that counts as a failure of the backend; 0: not watched."""

    @property
    def detecting(self) -> bool:
        """Whether any verdict is made: by count, by rate, or by first byte."""
        return bool(self.consecutive_resets or self.failure_rate or self.first_byte_timeout)


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
    pid_file: str = ""
    """Where the daemon writes its process id (``loble reload`` reads it); "" for none."""
    user: str = ""
    """The user to run as once every socket is bound (started as root to bind a
    port below 1024, say); "" to stay who started it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    """The admin API: status for anyone who can reach it, changes for the token holder."""

    enabled: bool = False
    address: str = "127.0.0.1:9091"
    token: str = ""
    """The bearer token every change needs. Empty: every change is refused
    (reading is still allowed), so an API switched on without a token is
    read-only rather than open."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    address: str
    weight: int = 1
    send_proxy: str = ""
    """This backend's PROXY protocol header (``off``, ``v1``, ``v2``); "" for
    ``[balancer] send_proxy``'s."""
    backup: bool = False
    """Used only while no other (primary) backend is healthy (HAProxy's ``backup``)."""
    probe_send: str = ""
    """This backend's ``probe_send``; "" for ``[health] probe_send``."""
    probe_expect: str = ""
    """This backend's ``probe_expect``; "" for ``[health]``'s expectation (setting
    either expect key here replaces both of ``[health]``'s)."""
    probe_expect_regex: str = ""
    """This backend's ``probe_expect_regex``; "" for ``[health]``'s expectation."""
    max_connections: int = 0
    """Connections this backend carries at once, connects in progress included
    (HAProxy's server ``maxconn``): at the limit it is skipped, and with every
    eligible backend at its limit new clients wait in the queue (``[balancer]
    queue_size``, ``queue_timeout``). 0: no limit."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    backends: tuple[BackendConfig, ...] = ()


_SECTIONS: dict[str, type[Any]] = {
    "listener": ListenerConfig,
    "balancer": BalancerConfig,
    "health": HealthConfig,
    "timeouts": TimeoutsConfig,
    "outlier": OutlierConfig,
    "metrics": MetricsConfig,
    "logging": LoggingConfig,
    "runtime": RuntimeConfig,
    "admin": AdminConfig,
}
_TOP_LEVEL = (*_SECTIONS, "backends")

# Slotted dataclasses keep no class-level defaults, so read them off instances.
_DEFAULT_LISTENER = ListenerConfig()
_DEFAULT_BALANCER = BalancerConfig()
_DEFAULT_HEALTH = HealthConfig()
_DEFAULT_TIMEOUTS = TimeoutsConfig()
_DEFAULT_OUTLIER = OutlierConfig()
_DEFAULT_METRICS = MetricsConfig()
_DEFAULT_LOGGING = LoggingConfig()
_DEFAULT_RUNTIME = RuntimeConfig()
_DEFAULT_ADMIN = AdminConfig()

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
    if not port_text.isascii():
        # str.isdigit and int() take any Unicode digit (full-width ones, '²'): a port
        # a resolver or another tool reads differently is a mistake.
        raise ValueError(f"port '{port_text}' must be ASCII digits")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} is out of range {low}-65535")
    return host, port


_SHORTEST = 0.001
"""The shortest timeout or interval: below a millisecond no clock or network
means anything, and a period so small that ``now + period == now`` would never
let time move on."""


def _address(*, allow_port_zero: bool = False) -> Check:
    def check(raw: Any) -> str | None:
        if not isinstance(raw, str):
            return "is not a 'host:port' string"
        try:
            parse_address(raw, allow_port_zero=allow_port_zero)
        except ValueError as problem:
            return str(problem)
        return None

    return check


def _share(raw: Any) -> str | None:
    """A number from 0 to 1 (a share)."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return "is not a number"
    if not 0.0 <= raw <= 1.0:
        return "must be from 0 to 1"
    return None


def _fraction(maximum: float) -> Check:
    """A number from 0 to ``maximum`` (a share of something, such as an interval)."""

    def check(raw: Any) -> str | None:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            return "is not a number"
        if not 0.0 <= raw <= maximum:
            return f"must be from 0 to {maximum:g}"
        return None

    return check


def _probe_bytes(raw: Any) -> str | None:
    """``probe_send`` or ``probe_expect``: a string, at most PAYLOAD_LIMIT bytes as UTF-8."""
    if not isinstance(raw, str):
        return 'is not a string (bytes as text, such as "PING\\r\\n", or "" for none)'
    try:
        size = len(raw.encode())
    except UnicodeEncodeError:
        return "is not valid Unicode text (a lone surrogate)"
    if size > PAYLOAD_LIMIT:
        return f"is {size} bytes as UTF-8: at most {PAYLOAD_LIMIT}"
    return None


def _probe_regex(raw: Any) -> str | None:
    """``probe_expect_regex``: a Python regular expression, compiled here, over bytes."""
    problem = _probe_bytes(raw)
    if problem is not None:
        return problem
    try:
        pattern = re.compile(raw.encode())
    except re.error as error:
        return f"is not a valid regular expression: {error}"
    if raw and pattern.search(b"") is not None:
        return "matches an empty reply, so a backend that answers nothing would pass"
    return None


def _probe_keys(checker: Checker, path: str, table: Mapping[str, Any]) -> dict[str, str]:
    """The three probe payload keys of ``[health]`` or of one backend ("" when unset)."""
    keys = {
        "probe_send": checker.value(path, table, "probe_send", "", _probe_bytes),
        "probe_expect": checker.value(path, table, "probe_expect", "", _probe_bytes),
        "probe_expect_regex": checker.value(path, table, "probe_expect_regex", "", _probe_regex),
    }
    if keys["probe_expect"] and keys["probe_expect_regex"]:
        checker.error(
            f"{path}.probe_expect_regex",
            f"{keys['probe_expect_regex']!r} is set with {path}.probe_expect "
            f"({keys['probe_expect']!r}): expect a prefix or a pattern, not both",
        )
        keys["probe_expect_regex"] = ""
    return keys


def _prime(minimum: int, maximum: int) -> Check:
    """An integer in bounds that is prime (a Maglev table's size)."""
    bounded = integer(minimum, maximum)

    def check(raw: Any) -> str | None:
        problem = bounded(raw)
        if problem is None and not is_prime(raw):
            return "must be a prime number (65537 is Envoy's default)"
        return problem

    return check


def _section(checker: Checker, data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    table = checker.table(name, data.get(name))
    valid = tuple(f.name for f in fields(_SECTIONS[name]))
    checker.unknown_keys(name, table, valid)
    return table


def parse_config(data: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document and return the effective configuration."""
    checker = Checker()
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
            "listener", table, "backlog", _DEFAULT_LISTENER.backlog, integer(1, 1_000_000)
        ),
        max_connections=checker.value(
            "listener",
            table,
            "max_connections",
            _DEFAULT_LISTENER.max_connections,
            integer(0, 1_000_000),
        ),
        accept_proxy_from=_networks(checker, table),
    )

    table = _section(checker, data, "balancer")
    balancer = BalancerConfig(
        algorithm=checker.value(
            "balancer", table, "algorithm", _DEFAULT_BALANCER.algorithm, choice(ALGORITHMS)
        ),
        connect_retries=checker.value(
            "balancer",
            table,
            "connect_retries",
            _DEFAULT_BALANCER.connect_retries,
            integer(0, 100),
        ),
        send_proxy=checker.value(
            "balancer", table, "send_proxy", _DEFAULT_BALANCER.send_proxy, choice(SEND_PROXY)
        ),
        hash_key=checker.value(
            "balancer", table, "hash_key", _DEFAULT_BALANCER.hash_key, choice(HASH_KEYS)
        ),
        maglev_table_size=checker.value(
            "balancer",
            table,
            "maglev_table_size",
            _DEFAULT_BALANCER.maglev_table_size,
            _prime(3, 5_000_011),
        ),
        ring_points=checker.value(
            "balancer", table, "ring_points", _DEFAULT_BALANCER.ring_points, integer(1, 10_000)
        ),
        slow_start=float(
            checker.value(
                "balancer",
                table,
                "slow_start",
                _DEFAULT_BALANCER.slow_start,
                seconds(positive=False, minimum=0.0),
            )
        ),
        slow_start_floor=float(
            checker.value(
                "balancer", table, "slow_start_floor", _DEFAULT_BALANCER.slow_start_floor, _share
            )
        ),
        panic_threshold=float(
            checker.value(
                "balancer", table, "panic_threshold", _DEFAULT_BALANCER.panic_threshold, _share
            )
        ),
        queue_size=checker.value(
            "balancer", table, "queue_size", _DEFAULT_BALANCER.queue_size, integer(0, 1_000_000)
        ),
        queue_timeout=float(
            checker.value(
                "balancer",
                table,
                "queue_timeout",
                _DEFAULT_BALANCER.queue_timeout,
                seconds(minimum=_SHORTEST),
            )
        ),
    )

    table = _section(checker, data, "health")
    health = HealthConfig(
        failure_threshold=checker.value(
            "health",
            table,
            "failure_threshold",
            _DEFAULT_HEALTH.failure_threshold,
            integer(1, 1_000),
        ),
        success_threshold=checker.value(
            "health",
            table,
            "success_threshold",
            _DEFAULT_HEALTH.success_threshold,
            integer(1, 1_000),
        ),
        probe_interval=float(
            checker.value(
                "health",
                table,
                "probe_interval",
                _DEFAULT_HEALTH.probe_interval,
                seconds(minimum=_SHORTEST),
            )
        ),
        probe_timeout=float(
            checker.value(
                "health",
                table,
                "probe_timeout",
                _DEFAULT_HEALTH.probe_timeout,
                seconds(minimum=_SHORTEST),
            )
        ),
        active=checker.value("health", table, "active", _DEFAULT_HEALTH.active, boolean()),
        probe_jitter=float(
            checker.value(
                "health", table, "probe_jitter", _DEFAULT_HEALTH.probe_jitter, _fraction(0.5)
            )
        ),
        **_probe_keys(checker, "health", table),
    )

    table = _section(checker, data, "timeouts")
    timeouts = TimeoutsConfig(
        connect=float(
            checker.value(
                "timeouts", table, "connect", _DEFAULT_TIMEOUTS.connect, seconds(minimum=_SHORTEST)
            )
        ),
        idle=float(
            checker.value(
                "timeouts", table, "idle", _DEFAULT_TIMEOUTS.idle, seconds(minimum=_SHORTEST)
            )
        ),
        drain=float(
            checker.value(
                "timeouts", table, "drain", _DEFAULT_TIMEOUTS.drain, seconds(positive=False)
            )
        ),
        removal=float(
            checker.value(
                "timeouts", table, "removal", _DEFAULT_TIMEOUTS.removal, seconds(positive=False)
            )
        ),
    )
    for name in ("drain", "removal"):
        value = getattr(timeouts, name)
        if value < 0:
            checker.error(f"timeouts.{name}", f"{value!r} must be >= 0 seconds")
            timeouts = replace(timeouts, **{name: getattr(_DEFAULT_TIMEOUTS, name)})

    outlier = _parse_outlier(checker, _section(checker, data, "outlier"))

    table = _section(checker, data, "metrics")
    metrics = MetricsConfig(
        enabled=checker.value("metrics", table, "enabled", _DEFAULT_METRICS.enabled, boolean()),
        address=checker.value(
            "metrics", table, "address", _DEFAULT_METRICS.address, _address(allow_port_zero=True)
        ),
    )

    table = _section(checker, data, "logging")
    logging = LoggingConfig(
        level=checker.value("logging", table, "level", _DEFAULT_LOGGING.level, choice(LOG_LEVELS)),
        format=checker.value(
            "logging", table, "format", _DEFAULT_LOGGING.format, choice(LOG_FORMATS)
        ),
        access_log=checker.value(
            "logging", table, "access_log", _DEFAULT_LOGGING.access_log, boolean()
        ),
    )

    table = _section(checker, data, "runtime")
    runtime = RuntimeConfig(
        backend=checker.value(
            "runtime", table, "backend", _DEFAULT_RUNTIME.backend, choice(RUNTIME_BACKENDS)
        ),
        workers=checker.value(
            "runtime", table, "workers", _DEFAULT_RUNTIME.workers, integer(1, 256)
        ),
        pid_file=checker.value("runtime", table, "pid_file", _DEFAULT_RUNTIME.pid_file, _path),
        user=checker.value("runtime", table, "user", _DEFAULT_RUNTIME.user, _user_name),
    )

    table = _section(checker, data, "admin")
    admin = AdminConfig(
        enabled=checker.value("admin", table, "enabled", _DEFAULT_ADMIN.enabled, boolean()),
        address=checker.value(
            "admin", table, "address", _DEFAULT_ADMIN.address, _address(allow_port_zero=True)
        ),
        token=_token(checker, table),
    )

    _check_together(checker, listener, health, metrics, admin)

    backends = _parse_backends(checker, data.get("backends"))

    if checker.errors:
        raise ConfigError(checker.errors)
    return Config(
        listener=listener,
        balancer=balancer,
        health=health,
        timeouts=timeouts,
        outlier=outlier,
        metrics=metrics,
        logging=logging,
        runtime=runtime,
        admin=admin,
        backends=backends,
    )


def _parse_outlier(checker: Checker, table: Mapping[str, Any]) -> OutlierConfig:
    def key(name: str, check: Check) -> Any:
        return checker.value("outlier", table, name, getattr(_DEFAULT_OUTLIER, name), check)

    def real(name: str, check: Check) -> float:
        return float(key(name, check))

    outlier = OutlierConfig(
        consecutive_resets=key("consecutive_resets", integer(0, 1_000_000)),
        failure_rate=real("failure_rate", _share),
        minimum_connections=key("minimum_connections", integer(1, 1_000_000)),
        interval=real("interval", seconds(minimum=_SHORTEST)),
        base_ejection_time=real("base_ejection_time", seconds(minimum=_SHORTEST)),
        max_ejection_time=real("max_ejection_time", seconds(minimum=_SHORTEST)),
        max_ejection_percent=key("max_ejection_percent", integer(1, 100)),
        redispatch_pending=key("redispatch_pending", boolean()),
        first_byte_timeout=real("first_byte_timeout", seconds(positive=False, minimum=0.0)),
    )
    if outlier.max_ejection_time < outlier.base_ejection_time:
        # An ejection never lasts less than the base: the cap would be ignored.
        checker.error(
            "outlier.max_ejection_time",
            f"{outlier.max_ejection_time!r} is shorter than outlier.base_ejection_time "
            f"({outlier.base_ejection_time!r})",
        )
        outlier = replace(outlier, max_ejection_time=outlier.base_ejection_time)
    return outlier


def _networks(checker: Checker, table: Mapping[str, Any]) -> tuple[str, ...]:
    """``[listener] accept_proxy_from``: networks, each checked by ``ipaddress``, canonical."""
    raw = table.get("accept_proxy_from", _DEFAULT_LISTENER.accept_proxy_from)
    if not isinstance(raw, (list, tuple)):
        checker.error(
            "listener.accept_proxy_from",
            f'{raw!r} is not an array of networks (["10.0.0.0/8", "::1/128"])',
        )
        return _DEFAULT_LISTENER.accept_proxy_from
    networks: list[str] = []
    for index, item in enumerate(raw):
        path = f"listener.accept_proxy_from[{index}]"
        if not isinstance(item, str):
            checker.error(path, f'{item!r} is not a string (a network such as "10.0.0.0/8")')
            continue
        problem = _network_problem(item)
        if problem is not None:
            checker.error(path, f"{item!r} {problem}")
            continue
        networks.append(str(ipaddress.ip_network(item)))
    return tuple(networks)


def _network_problem(text: str) -> str | None:
    if "%" in text:  # ipaddress takes zones (fe80::%eth0/64); peers' addresses are matched without
        return "has a zone (%...): write the network alone"
    try:
        ipaddress.ip_network(text)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            return "is not an IPv4 or IPv6 network (such as 10.0.0.0/8 or ::1/128)"
        return f"has host bits set: the network is {loose}"
    return None


def _backend_send_proxy(raw: Any) -> str | None:
    if not isinstance(raw, str):
        return 'is not a string ("off", "v1", "v2", or "" for [balancer] send_proxy)'
    if raw and raw not in SEND_PROXY:
        return 'is not one of off, v1, v2 (or "" for [balancer] send_proxy)'
    return None


def send_proxy_versions(config: Config) -> dict[str, int]:
    """The PROXY protocol version (1 or 2) each backend is sent, by address; a
    backend sent none is absent."""
    versions: dict[str, int] = {}
    for backend in config.backends:
        chosen = backend.send_proxy or config.balancer.send_proxy
        if chosen != "off":
            versions[backend.address] = int(chosen[1:])
    return versions


_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")


def _user_name(raw: Any) -> str | None:
    if not isinstance(raw, str):
        return 'is not a string (a user name, or "" to stay who started it)'
    if raw and not _USER_NAME.fullmatch(raw):
        return "is not a user name"
    return None


def _path(raw: Any) -> str | None:
    if not isinstance(raw, str):
        return 'is not a string (a file path, or "" for none)'
    if "\0" in raw:
        return "contains a NUL character"
    return None


_TOKEN = re.compile(r"[\x21-\x7e]*")
"""A bearer token as a header carries it: printable ASCII, no spaces."""


def _token(checker: Checker, table: Mapping[str, Any]) -> str:
    # The token is a secret: its errors never quote it, unlike every other key.
    raw = table.get("token", _DEFAULT_ADMIN.token)
    if not isinstance(raw, str):
        checker.error("admin.token", "is not a string")
        return _DEFAULT_ADMIN.token
    if not _TOKEN.fullmatch(raw):
        checker.error("admin.token", "must be printable ASCII without spaces (value not shown)")
        return _DEFAULT_ADMIN.token
    return raw


def _check_together(
    checker: Checker,
    listener: ListenerConfig,
    health: HealthConfig,
    metrics: MetricsConfig,
    admin: AdminConfig,
) -> None:
    """The rules that tie keys of different sections together."""
    if health.probe_timeout > health.probe_interval:
        # A probe still out when the next is due skips that round: the
        # interval would silently stretch to the timeout.
        checker.error(
            "health.probe_timeout",
            f"{health.probe_timeout!r} is longer than health.probe_interval "
            f"({health.probe_interval!r})",
        )
    elif health.probe_timeout > health.probe_interval * (1 - health.probe_jitter):
        # The same rule for the shortest interval the jitter draws.
        checker.error(
            "health.probe_jitter",
            f"{health.probe_jitter!r} makes the shortest interval "
            f"{health.probe_interval * (1 - health.probe_jitter):g} s, shorter than "
            f"health.probe_timeout ({health.probe_timeout!r})",
        )
    for name, section in (("metrics", metrics), ("admin", admin)):
        if section.enabled and _same_socket(section.address, listener.address):
            checker.error(
                f"{name}.address",
                f"{section.address!r} is also listener.address ({listener.address!r}): "
                "give each its own port",
            )


_WILDCARDS = ("0.0.0.0", "::")


def _same_socket(one: str, other: str) -> bool:
    """Would listening on both addresses collide? Port 0 never does (the OS picks)."""
    (host, port), (other_host, other_port) = _canonical(one), _canonical(other)
    if port != other_port or port == 0:
        return False
    return host == other_host or host in _WILDCARDS or other_host in _WILDCARDS


def _parse_backends(checker: Checker, raw: Any) -> tuple[BackendConfig, ...]:
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
        weight = checker.value(path, entry, "weight", 1, WEIGHT)
        send_proxy = checker.value(path, entry, "send_proxy", "", _backend_send_proxy)
        backup = checker.value(path, entry, "backup", False, boolean())
        probe_keys = _probe_keys(checker, path, entry)
        max_connections = checker.value(path, entry, "max_connections", 0, MAX_CONNECTIONS)
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
        backends.append(
            BackendConfig(
                address=address,
                weight=weight,
                send_proxy=send_proxy,
                backup=backup,
                **probe_keys,
                max_connections=max_connections,
            )
        )
    return tuple(backends)


def _canonical(address: str) -> tuple[str, int]:
    host, port = parse_address(address, allow_port_zero=True)
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
        result[name] = {f.name: _plain(getattr(section, f.name)) for f in fields(section)}
    result["backends"] = [
        {f.name: _plain(getattr(backend, f.name)) for f in fields(backend)}
        for backend in config.backends
    ]
    return result


def _plain(value: Any) -> Any:
    """A value as a TOML writer takes it: an array as a list."""
    return list(value) if isinstance(value, tuple) else value


def probe_checks(config: Config) -> dict[str, ProbeCheck]:
    """Each backend's check, by address: its own ``probe_send`` and expectation,
    each "" falling back on ``[health]``'s. The two expect keys go together: a
    backend that sets either ignores both of ``[health]``'s."""
    health = config.health
    checks: dict[str, ProbeCheck] = {}
    for backend in config.backends:
        send = backend.probe_send or health.probe_send
        if backend.probe_expect or backend.probe_expect_regex:
            expect, regex = backend.probe_expect, backend.probe_expect_regex
        else:
            expect, regex = health.probe_expect, health.probe_expect_regex
        check = ProbeCheck(
            send=send.encode(),
            expect=expect.encode(),
            expect_regex=re.compile(regex.encode()) if regex else None,
        )
        checks[backend.address] = CONNECT_ONLY if check == CONNECT_ONLY else check
    return checks
