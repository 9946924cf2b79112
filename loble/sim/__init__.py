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
    BackendModel,
    ClientsConfig,
    Distribution,
    Fault,
    FaultProcess,
    NetworkConfig,
    RatePhase,
    Scenario,
    SimConfig,
    load_scenario,
    parse_scenario,
)
from ._timeline import Recorder
from ._world import RequestModel, draw_faults, with_drawn_faults

__all__ = [
    "BEHAVIOURS",
    "INVARIANTS",
    "BackendModel",
    "ClientsConfig",
    "Distribution",
    "Fault",
    "FaultProcess",
    "Monitor",
    "NetworkConfig",
    "RatePhase",
    "Recorder",
    "RequestModel",
    "Scenario",
    "SimBackend",
    "SimConfig",
    "Simulation",
    "SimulationError",
    "Violation",
    "build_report",
    "draw_faults",
    "load_scenario",
    "parse_scenario",
    "render_report",
    "with_drawn_faults",
]
