"""Loble's sans-I/O core: every decision the load balancer makes, and no I/O.

Nothing here opens a socket, reads a clock, starts a thread or touches the
module-level ``random``: time comes in as ``now``, randomness as an injected
``random.Random``, and decisions go out as actions (see ``_events``). The real
daemon (``loble.io``) and the simulator (``loble.sim``) drive these same
objects.

What a user of the library needs is exported here: what it takes to drive a
:class:`ProxyCore` (its outputs, the enums they carry, its statistics, whose
fault a socket error is, the operator's admin states and inputs), to write a
balancer, to read and write PROXY protocol headers, to judge a probe's
reply (``judge_reply``), and to parse a
configuration (with the schema helper the simulator's scenarios use too). The machines
themselves (health, connection, process, control plane, timers) are the
core's internals: tests that need them import the private modules.
"""

from ._admin import AdminInput, AdminState
from ._backend import Backend, Snapshot
from ._balancers import (
    BALANCERS,
    Balancer,
    LeastConnections,
    PowerOfTwoChoices,
    RoundRobin,
    WeightedRandom,
    make_balancer,
)
from ._config import (
    ALGORITHMS,
    HASHING_ALGORITHMS,
    AdminConfig,
    BackendConfig,
    BalancerConfig,
    Config,
    HealthConfig,
    ListenerConfig,
    LoggingConfig,
    MetricsConfig,
    OutlierConfig,
    RuntimeConfig,
    TimeoutsConfig,
    config_to_dict,
    parse_address,
    parse_config,
    send_proxy_versions,
)
from ._connection import RESET_OUTCOMES
from ._errors import ConfigError, LobleError, StateMachineError
from ._events import (
    Action,
    AdminStateChanged,
    BackendEjected,
    BackendForgotten,
    BackendReturned,
    BackendStateChanged,
    CloseConnection,
    ConnectBackend,
    ConnectFailed,
    ConnectionClosed,
    ConnectionQueued,
    ConnectRedispatched,
    Event,
    FirstByteTimeout,
    HealthReport,
    MaxConnectionsChanged,
    Outcome,
    Output,
    PanicChanged,
    ProbeBackend,
    Reconfigured,
    ShutdownFinished,
    ShutdownStarted,
    ShutdownWrite,
    Side,
    SnapshotPublished,
    StopAccepting,
    WeightChanged,
)
from ._faults import ACCEPT_SKIP_ERRNOS, SHORTAGE_ERRNOS, is_shortage, skips_one_client
from ._health import HealthInput, HealthState
from ._probe import REPLY_LIMIT, ProbeCheck, ProbeFailure, judge_reply
from ._process import ProcessState
from ._proxy import ProxyCore
from ._proxy_protocol import (
    PROXY_ERROR_REASONS,
    HeaderParser,
    ProxyHeader,
    ProxyProtocolError,
    TrustedSources,
    encode,
    encode_v1,
    encode_v2,
)
from ._schema import Check, Checker, boolean, choice, integer, seconds
from ._statistics import BackendStatistics, CoreStatistics

__all__ = [
    "ACCEPT_SKIP_ERRNOS",
    "ALGORITHMS",
    "BALANCERS",
    "HASHING_ALGORITHMS",
    "PROXY_ERROR_REASONS",
    "REPLY_LIMIT",
    "RESET_OUTCOMES",
    "SHORTAGE_ERRNOS",
    "Action",
    "AdminConfig",
    "AdminInput",
    "AdminState",
    "AdminStateChanged",
    "Backend",
    "BackendConfig",
    "BackendEjected",
    "BackendForgotten",
    "BackendReturned",
    "BackendStateChanged",
    "BackendStatistics",
    "Balancer",
    "BalancerConfig",
    "Check",
    "Checker",
    "CloseConnection",
    "Config",
    "ConfigError",
    "ConnectBackend",
    "ConnectFailed",
    "ConnectRedispatched",
    "ConnectionClosed",
    "ConnectionQueued",
    "CoreStatistics",
    "Event",
    "FirstByteTimeout",
    "HeaderParser",
    "HealthConfig",
    "HealthInput",
    "HealthReport",
    "HealthState",
    "LeastConnections",
    "ListenerConfig",
    "LobleError",
    "LoggingConfig",
    "MaxConnectionsChanged",
    "MetricsConfig",
    "Outcome",
    "OutlierConfig",
    "Output",
    "PanicChanged",
    "PowerOfTwoChoices",
    "ProbeBackend",
    "ProbeCheck",
    "ProbeFailure",
    "ProcessState",
    "ProxyCore",
    "ProxyHeader",
    "ProxyProtocolError",
    "Reconfigured",
    "RoundRobin",
    "RuntimeConfig",
    "ShutdownFinished",
    "ShutdownStarted",
    "ShutdownWrite",
    "Side",
    "Snapshot",
    "SnapshotPublished",
    "StateMachineError",
    "StopAccepting",
    "TimeoutsConfig",
    "TrustedSources",
    "WeightChanged",
    "WeightedRandom",
    "boolean",
    "choice",
    "config_to_dict",
    "encode",
    "encode_v1",
    "encode_v2",
    "integer",
    "is_shortage",
    "judge_reply",
    "make_balancer",
    "parse_address",
    "parse_config",
    "seconds",
    "send_proxy_versions",
    "skips_one_client",
]
