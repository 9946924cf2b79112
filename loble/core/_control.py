"""The control plane: health records, the published snapshot, probe scheduling.

It owns one :class:`BackendHealth` per backend, applies inputs to them, and
rebuilds the :class:`Snapshot` only when the set of eligible (``HEALTHY``)
backends changes: the same membership keeps the same version, so readers never
see churn. It also decides which backends get probed and when: every
``UNHEALTHY`` backend (it has no other way back), and with ``active = true``
every backend. Time only comes in as ``now``; :meth:`next_deadline` and
:meth:`handle_timer` let a driver (a real event loop or the simulator) run the
probe schedule.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable

from ._backend import Backend, Snapshot
from ._config import HealthConfig
from ._errors import LobleError
from ._events import (
    BackendStateChanged,
    Event,
    HealthReport,
    Output,
    ProbeBackend,
    SnapshotPublished,
)
from ._health import BackendHealth, HealthInput, HealthState, Thresholds, Transition

__all__ = ["ControlPlane"]

_PROBE_INPUT = {True: HealthInput.PROBE_SUCCESS, False: HealthInput.PROBE_FAILURE}


class ControlPlane:
    def __init__(self, backends: Iterable[Backend], health: HealthConfig | None = None) -> None:
        self.health_config = health or HealthConfig()
        thresholds = Thresholds(
            failure_threshold=self.health_config.failure_threshold,
            success_threshold=self.health_config.success_threshold,
        )
        self.backends: dict[str, Backend] = {}
        self._health: dict[str, BackendHealth] = {}
        self._reports: dict[str, dict[HealthInput, HealthReport]] = {}
        for backend in backends:
            if backend.address in self.backends:
                raise LobleError(f"backend {backend.address} is listed twice")
            self.backends[backend.address] = backend
            self._health[backend.address] = BackendHealth(backend.address, thresholds)
            self._reports[backend.address] = {
                health_input: HealthReport.of(backend.address, health_input)
                for health_input in HealthInput
            }
        self.snapshot = Snapshot(version=1, backends=tuple(self.backends.values()))
        """The current snapshot; replaced whole, never mutated."""
        # Probe schedule: a heap of (due, sequence, address) with lazy deletion;
        # _probe_due holds the one live due time per probed backend.
        self._probe_heap: list[tuple[float, int, str]] = []
        self._probe_due: dict[str, float] = {}
        self._probe_in_flight: dict[str, HealthState] = {}
        """Backends with a probe out, and the state each was in when it was sent."""
        self._sequence = 0
        self._started = False

    # -- reading ---------------------------------------------------------------

    def state(self, address: str) -> HealthState:
        return self._health[address].state

    def active_connections(self, address: str) -> int:
        return self._health[address].active_connections

    def health(self, address: str) -> BackendHealth:
        """The live health record (read it, don't change it)."""
        return self._health[address]

    def states(self) -> dict[str, HealthState]:
        return {address: health.state for address, health in self._health.items()}

    # -- inputs ----------------------------------------------------------------

    def start(self, now: float) -> list[Event]:
        """Begin the probe schedule; call once when the driver starts."""
        if not self._started:
            self._started = True
            if self.health_config.active:
                for address in self.backends:
                    self._schedule_probe(address, now)
        return [
            SnapshotPublished(
                at=now, version=self.snapshot.version, addresses=self.snapshot.addresses
            )
        ]

    def apply(self, address: str, health_input: HealthInput, now: float) -> list[Event]:
        """Apply one input to one backend; return what changed."""
        health = self._health.get(address)
        if health is None:
            raise LobleError(f"unknown backend {address}")
        transition = health.handle(health_input)
        if transition is None:
            return []
        return self._changed(address, transition, now)

    def report(
        self, out: list[Output], address: str, health_input: HealthInput, now: float
    ) -> None:
        """Append a connection's health report to ``out``, apply it, append what changed.

        The same as :meth:`apply` with the report in front: the hook through
        which :class:`ProxyCore`'s connections report, once per attempt start,
        end and verdict, so it is kept to one call and a table lookup.
        """
        health = self._health.get(address)
        if health is None:
            raise LobleError(f"unknown backend {address}")
        out.append(self._reports[address][health_input])
        transition = health.handle(health_input)
        if transition is not None:
            out.extend(self._changed(address, transition, now))

    def probe_result(self, address: str, ok: bool, now: float) -> list[Event]:
        """Report the outcome of a :class:`ProbeBackend` action.

        A result for a probe that was not issued, was already reported, or was
        sent before the backend last changed state is ignored: only probes of
        the current state count towards leaving it.
        """
        sent_in = self._probe_in_flight.pop(address, None)
        if sent_in is not self._health[address].state:
            # Not issued, or issued before the backend changed state: a probe
            # that left while it was healthy must not count as a success
            # earned while unhealthy (the no-flapping rule).
            return []
        return self.apply(address, _PROBE_INPUT[ok], now)

    # -- probe timer -----------------------------------------------------------

    def next_deadline(self) -> float | None:
        heap = self._probe_heap
        while heap:
            due, _, address = heap[0]
            if self._probe_due.get(address) == due:
                return due
            heapq.heappop(heap)
        return None

    def handle_timer(self, now: float) -> list[ProbeBackend]:
        """Issue every probe that is due at ``now``."""
        probes: list[ProbeBackend] = []
        heap = self._probe_heap
        while heap and heap[0][0] <= now:
            due, _, address = heapq.heappop(heap)
            if self._probe_due.get(address) != due:
                continue  # superseded or cancelled
            del self._probe_due[address]
            if not self._wants_probe(address):
                continue
            # One probe in flight per backend; the next is due an interval later.
            if address not in self._probe_in_flight:
                self._probe_in_flight[address] = self._health[address].state
                probes.append(
                    ProbeBackend(
                        backend=self.backends[address],
                        timeout=self.health_config.probe_timeout,
                    )
                )
            self._schedule_probe(address, now)
        return probes

    # -- internals ---------------------------------------------------------------

    def _changed(self, address: str, transition: Transition, now: float) -> list[Event]:
        events: list[Event] = [
            BackendStateChanged(
                at=now,
                address=address,
                old=transition.old,
                new=transition.new,
                reason=transition.reason,
            )
        ]
        if transition.new is HealthState.UNHEALTHY:
            self._schedule_probe(address, now)
        elif transition.new is HealthState.HEALTHY and not self.health_config.active:
            self._probe_due.pop(address, None)
        published = self._republish(now)
        if published is not None:
            events.append(published)
        return events

    def _wants_probe(self, address: str) -> bool:
        return self.health_config.active or self._health[address].state is HealthState.UNHEALTHY

    def _schedule_probe(self, address: str, now: float) -> None:
        due = now + self.health_config.probe_interval
        if due <= now:  # an interval lost in float rounding: never re-arm at now
            due = math.nextafter(now, math.inf)
        self._probe_due[address] = due
        self._sequence += 1
        heapq.heappush(self._probe_heap, (due, self._sequence, address))

    def _republish(self, now: float) -> SnapshotPublished | None:
        eligible = tuple(
            backend
            for address, backend in self.backends.items()
            if self._health[address].state is HealthState.HEALTHY
        )
        if eligible == self.snapshot.backends:
            return None
        self.snapshot = Snapshot(version=self.snapshot.version + 1, backends=eligible)
        return SnapshotPublished(
            at=now, version=self.snapshot.version, addresses=self.snapshot.addresses
        )
