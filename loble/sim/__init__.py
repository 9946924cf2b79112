"""The deterministic discrete-event simulator, driving loble.core.

A scenario (``config.toml`` plus ``[sim]``) and a seed fix a whole run: the
same :class:`loble.core.ProxyCore` the daemon uses meets simulated clients,
backends, faults and a network in simulated time, and a :class:`Monitor`
checks Loble's invariants from the outside at every step.
"""

from ._engine import SimBackend, Simulation, SimulationError
from ._monitor import INVARIANTS, Monitor, Violation
from ._report import build_report, render_report
from ._scenario import (
    BEHAVIOURS,
    ClientsConfig,
    Distribution,
    Fault,
    NetworkConfig,
    RatePhase,
    Scenario,
    SimConfig,
    load_scenario,
    parse_scenario,
)
from ._timeline import Recorder

__all__ = [
    "BEHAVIOURS",
    "INVARIANTS",
    "ClientsConfig",
    "Distribution",
    "Fault",
    "Monitor",
    "NetworkConfig",
    "RatePhase",
    "Recorder",
    "Scenario",
    "SimBackend",
    "SimConfig",
    "Simulation",
    "SimulationError",
    "Violation",
    "build_report",
    "load_scenario",
    "parse_scenario",
    "render_report",
]
