"""The public face of loble.core: what a user needs, and no internals."""

from __future__ import annotations

import loble.core

INTERNALS = (
    "BackendHealth",
    "Thresholds",
    "Transition",
    "Connection",
    "ConnectionPolicy",
    "ConnInput",
    "ConnState",
    "ControlPlane",
    "ProcessInput",
    "ProcessLifecycle",
    "ProcessStep",
    "TimerQueue",
)

# What loble.io builds on: these must stay exported.
DRIVER_NAMES = (
    "Backend",
    "BackendStateChanged",
    "CloseConnection",
    "Config",
    "ConnectBackend",
    "ConnectionClosed",
    "HealthState",
    "LobleError",
    "Outcome",
    "Output",
    "ProbeBackend",
    "ProxyCore",
    "ShutdownFinished",
    "ShutdownStarted",
    "ShutdownWrite",
    "Side",
    "SnapshotPublished",
    "StopAccepting",
    "parse_address",
    "ConfigError",
    "RuntimeConfig",
    "LoggingConfig",
    "HealthInput",
    "HealthReport",
    "ProcessState",
    "CoreStatistics",
    "BackendStatistics",
    "is_shortage",
    "skips_one_client",
    "Checker",
    # Operating it live (issue 11).
    "AdminState",
    "AdminInput",
    "AdminConfig",
    "AdminStateChanged",
    "WeightChanged",
    "Reconfigured",
    "BackendForgotten",
)


def test_all_lists_exactly_what_the_package_exports() -> None:
    public = {name for name in vars(loble.core) if not name.startswith("_")}
    # Submodules are attributes too, but all of them are private (underscored).
    assert public == set(loble.core.__all__)
    assert sorted(loble.core.__all__) == sorted(set(loble.core.__all__))


def test_internals_are_not_exported() -> None:
    for name in INTERNALS:
        assert name not in loble.core.__all__
        assert not hasattr(loble.core, name), name


def test_the_drivers_names_are_exported() -> None:
    for name in DRIVER_NAMES:
        assert name in loble.core.__all__, name
