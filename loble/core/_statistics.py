"""What a driver may read of a running core: immutable statistics, trio-style.

``ProxyCore.statistics()`` builds a :class:`CoreStatistics` on demand, for a
metrics scrape, a status page or the simulator's end-of-run checks: a value
that never changes under its reader, instead of the core's live tables. It
costs a walk of the backends and a sort of the open connections, so it is
for the occasional reader; a per-step loop reads ``ProxyCore.in_flight``,
``snapshot`` and ``stopped``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._health import HealthState
from ._process import ProcessState

__all__ = ["BackendStatistics", "CoreStatistics"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendStatistics:
    """One configured backend as the control plane sees it now."""

    address: str
    weight: int
    state: HealthState
    active_connections: int
    """Attempts on it that have started and not finished: connecting or established."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreStatistics:
    """The core at one instant."""

    process: ProcessState
    accepting: bool
    """False once shutdown has begun."""
    in_flight: int
    """Client connections open: accepted and not yet closed."""
    open_connection_ids: tuple[int, ...]
    """Their ids, ascending."""
    snapshot_version: int
    eligible: tuple[str, ...]
    """The snapshot's backends (those new connections may go to), in config order."""
    backends: tuple[BackendStatistics, ...]
    """Every configured backend, in config order."""
    cut: int
    """Connections cut by shutdown so far."""
