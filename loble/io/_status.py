"""The status document: what ``GET /status``, ``loble status`` and the status page show.

One JSON-ready dict built from the core's :meth:`~loble.core.ProxyCore.statistics`
(states, admin states, weights, active and peak connections, last change
and last probe, how long an outlier ejection still lasts) and the daemon's
metrics (connections by outcome, bytes), with the process around them.
Times the core keeps on its own clock become ages in seconds, which mean
the same to every reader.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from loble import __version__
from loble.core import ProxyCore

from ._datapath import format_address
from ._metrics import Metrics

__all__ = ["status_document"]


def status_document(
    core: ProxyCore,
    metrics: Metrics,
    *,
    now: float,
    started: float,
    listeners: Sequence[tuple[str, int]],
    worker: int | None,
) -> dict[str, object]:
    """The status of one daemon at ``now`` (the core's clock), JSON-ready."""
    stats = core.statistics()
    metrics.before_render()  # the bytes of open connections too
    backends = []
    for backend in stats.backends:
        figures = metrics.figures(backend.address)
        backends.append(
            {
                "address": backend.address,
                "state": backend.state.value,
                "admin": backend.admin.value,
                "weight": backend.weight,
                "active_connections": backend.active_connections,
                "peak_connections": backend.peak_connections,
                "since_seconds": _age(now, backend.since),
                "reason": backend.reason,
                "last_probe_ok": backend.last_probe_ok,
                "last_probe_seconds": _age(now, backend.last_probe_at),
                "removing": backend.removing,
                "ejected_for_seconds": _until(now, backend.ejected_until),
                "max_connections": backend.max_connections,
                **figures,
            }
        )
    return {
        "version": __version__,
        "pid": os.getpid(),
        "worker": worker,
        "uptime": round(now - started, 3),
        "listeners": [format_address(*address) for address in listeners],
        "process": stats.process.value,
        "accepting": stats.accepting,
        "in_flight": stats.in_flight,
        "queued": stats.queued,
        "snapshot_version": stats.snapshot_version,
        "eligible": list(stats.eligible),
        "backends": backends,
    }


def _until(now: float, at: float | None) -> float | None:
    """Seconds from ``now`` to ``at`` (an ejection's end), None if none."""
    return None if at is None else round(max(0.0, at - now), 3)


def _age(now: float, at: float | None) -> float | None:
    return None if at is None else round(max(0.0, now - at), 3)
