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

from ._admin import AdminState
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
    admin: AdminState = AdminState.READY
    """The operator's say (``_admin``): new connections need ``READY`` and ``HEALTHY``."""
    since: float | None = None
    """When its health state last changed (or it was added awaiting probes); None if never."""
    reason: str = ""
    """Why, as the last ``BackendStateChanged`` said; "" if never."""
    last_probe_at: float | None = None
    """When its last probe result came in; None if never probed."""
    last_probe_ok: bool | None = None
    peak_connections: int = 0
    """The most ``active_connections`` at once since start."""
    removing: bool = False
    """A reload removed it; it still carries connections and is forgotten when they end."""
    ejected_until: float | None = None
    """Outlier ejection took it out of rotation until then (``[outlier]``); None if not."""
    max_connections: int = 0
    """Its ``[[backends]] max_connections``: at that many active it is skipped; 0: no limit."""


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
    """Every backend the core knows: the configured ones in config order, then
    those a reload removed that still carry connections."""
    cut: int
    """Connections cut by shutdown so far."""
    queued: int = 0
    """Clients waiting for a backend with room (counted in ``in_flight`` too)."""
