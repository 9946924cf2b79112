"""The control plane: health records, the published snapshot, probe scheduling.

It owns one :class:`BackendHealth` per backend, applies inputs to them, and
rebuilds the :class:`Snapshot` only when the eligible backends change: the
same membership keeps the same version, so readers never see churn. A
backend is eligible when its health is ``HEALTHY``, its admin state (the
operator's, ``_admin``) is ``READY``, and a reload has not removed it. It
also decides which backends get probed and when: every ``DRAINING`` and
``UNHEALTHY`` backend (they have no other way back), and with ``active =
true`` every backend; never one in ``MAINT`` or one a reload removed. Time only comes in as ``now``;
:meth:`next_deadline` and :meth:`handle_timer` let a driver (a real event
loop or the simulator) run the probe schedule.

Membership also changes by the operator's hand (:meth:`set_admin`,
:meth:`set_weight`) and by a reload (:meth:`reconfigure`), which adds
backends, removes them and changes weights and health settings:

* an added backend joins ``HEALTHY`` at once, or, with ``active = true``,
  ``UNHEALTHY`` with reason "added, awaiting probes": it joins after
  ``success_threshold`` probe successes, like any backend coming back;
* a removed backend leaves the snapshot at once and is no longer probed; its
  record stays (as :class:`_Leaving`) while attempts on it run, and is
  forgotten (``BackendForgotten``) when the last one finishes. Re-added
  before that, it is a normal backend again, with its state and connections.

Outlier ejection (``_outlier``) takes a backend out too, beside its health:
:meth:`eject` and :meth:`restore` keep :attr:`ejected`, and an ejected
backend counts as not healthy for the snapshot (and for panic, as Envoy's
ejected hosts do). With :attr:`redispatch` on, a backend *judged bad* (health
takes it out of ``HEALTHY``, or it is ejected) is queued in
:attr:`judged_bad` for the core to move the connects pending on it.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections.abc import Iterable, Mapping

from ._admin import AdminInput, AdminState, next_admin_state
from ._backend import Backend, Snapshot
from ._config import HealthConfig
from ._errors import LobleError
from ._events import (
    AdminStateChanged,
    BackendEjected,
    BackendForgotten,
    BackendReturned,
    BackendStateChanged,
    Event,
    HealthReport,
    Output,
    PanicChanged,
    ProbeBackend,
    SnapshotPublished,
    WeightChanged,
)
from ._health import BackendHealth, HealthInput, HealthState, Thresholds, Transition
from ._probe import CONNECT_ONLY, ProbeCheck

__all__ = ["ControlPlane", "Probed"]

_PROBE_INPUT = {True: HealthInput.PROBE_SUCCESS, False: HealthInput.PROBE_FAILURE}
_READY, _MAINT = AdminState.READY, AdminState.MAINT
_HEALTHY, _UNHEALTHY = HealthState.HEALTHY, HealthState.UNHEALTHY
_FINISHED, _FAILURE = HealthInput.CONNECTION_FINISHED, HealthInput.PASSIVE_FAILURE
ADDED_REASON = "added, awaiting probes"


class _Leaving(BackendHealth):
    """The record of a backend a reload removed, while attempts on it run.

    Normal records pay nothing for removal: only this subclass checks, after
    each input, whether the last attempt has finished, and then answers with
    :data:`_GONE` instead of no transition, which :meth:`ControlPlane._changed`
    (off the hot path) turns into forgetting the backend; after a real
    transition on that last finish, ``_changed`` forgets it too.
    """

    __slots__ = ()

    def handle(self, health_input: HealthInput) -> Transition | None:
        transition = BackendHealth.handle(self, health_input)
        if transition is None and health_input is _FINISHED and self.active_connections == 0:
            return _GONE
        # (A real transition on the last finish, DRAINING -> UNHEALTHY, is
        # announced first; _changed then forgets the backend.)
        return transition


_GONE = Transition(old=_HEALTHY, new=_HEALTHY, reason="forgotten")
"""Not a transition: the sign that a removed backend's last attempt finished."""


def _copy_record(record: BackendHealth, kind: type[BackendHealth]) -> BackendHealth:
    copy = kind(record.address, record.thresholds)
    for name in BackendHealth.__slots__:
        setattr(copy, name, getattr(record, name))
    return copy


class Probed:
    """The last probe result of a backend, for statistics."""

    __slots__ = ("at", "ok")

    def __init__(self, at: float, ok: bool) -> None:
        self.at = at
        self.ok = ok


class ControlPlane:
    def __init__(
        self,
        backends: Iterable[Backend],
        health: HealthConfig | None = None,
        *,
        rng: random.Random | None = None,
        checks: Mapping[str, ProbeCheck] | None = None,
    ) -> None:
        self.health_config = health or HealthConfig()
        self._rng = rng or random.Random(0)
        """Draws each probe interval's jitter (``[health] probe_jitter``), and only that."""
        self.checks: Mapping[str, ProbeCheck] = checks or {}
        """What each backend's probes send and expect (absent: connect only)."""
        self._thresholds = _thresholds(self.health_config)
        self.backends: dict[str, Backend] = {}
        """Every backend the core knows, in config order, then those a reload
        removed that still carry attempts."""
        self._health: dict[str, BackendHealth] = {}
        self._reports: dict[str, dict[HealthInput, HealthReport]] = {}
        self.admin: dict[str, AdminState] = {}
        """The operator's admin state of each backend (``_admin``)."""
        self.removing: dict[str, None] = {}
        """Backends a reload removed that still carry attempts (ordered, unlike a set)."""
        self.since: dict[str, tuple[float, str]] = {}
        """When each backend's health state last changed, and why (absent: never)."""
        self.probed: dict[str, Probed] = {}
        """Each backend's last probe result (absent: never probed)."""
        self._forgotten: str | None = None
        self.panic_threshold = 0.0
        """``[balancer] panic_threshold``, set by the core (0: never panic)."""
        self.panic = False
        """Whether the snapshot is in panic: all primaries, too few healthy."""
        self.pending: list[Event] = []
        """Events :meth:`_republish` made for the caller to emit after the snapshot."""
        self.ejected: dict[str, float] = {}
        """Backends outlier ejection took out, and until when (``_outlier``)."""
        self.redispatch = False
        """``[outlier] redispatch_pending``, set by the core: queue backends judged bad."""
        self.judged_bad: list[str] = []
        """Backends judged bad since the core last looked (with :attr:`redispatch`)."""
        self.joined: dict[str, float] = {}
        """Backends back in rotation after being out (recovered, added by a
        reload, back from maintenance), and when: what slow start ramps from.
        The core drops an entry once its ramp is over or the backend leaves."""
        for backend in backends:
            if backend.address in self.backends:
                raise LobleError(f"backend {backend.address} is listed twice")
            self._add(backend)
        primaries = tuple(backend for backend in self.backends.values() if not backend.backup)
        self.snapshot = Snapshot(version=1, backends=primaries or tuple(self.backends.values()))
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
            if health_input is _FAILURE and address == self._forgotten:
                # The verdict of the attempt whose end let a removed backend
                # go (it follows that attempt's "finished"): nobody to judge.
                return
            raise LobleError(f"unknown backend {address}")
        out.append(self._reports[address][health_input])
        transition = health.handle(health_input)
        if transition is not None:
            out.extend(self._changed(address, transition, now))

    def judge(self, out: list[Output], address: str, health_input: HealthInput, now: float) -> None:
        """:meth:`report` without the report: apply it, append only what it changed.

        For a driver that reads a connection's reports from the actions and
        events around them (see ``ProxyCore``'s ``health_reports``): three
        outputs fewer per connection, nobody listening to them.
        """
        health = self._health.get(address)
        if health is None:
            if health_input is _FAILURE and address == self._forgotten:
                return
            raise LobleError(f"unknown backend {address}")
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
        health = self._health.get(address)
        if health is None or sent_in is not health.state:
            # Not issued, or issued before the backend changed state: a probe
            # that left while it was healthy must not count as a success
            # earned while unhealthy (the no-flapping rule). Or the backend
            # is gone (a reload removed it).
            return []
        self.probed[address] = Probed(now, ok)
        return self.apply(address, _PROBE_INPUT[ok], now)

    # -- outlier ejection -----------------------------------------------------------

    def may_eject(self, address: str, decided: Iterable[str] = ()) -> bool:
        """Whether ejecting ``address`` leaves some backend in rotation, with the
        ejections ``decided`` and not applied yet (an interval's, in turn) made too."""
        ejected = {**self.ejected, **dict.fromkeys(decided, 0.0), address: 0.0}
        return bool(self._eligible(ejected)[0])

    def eject(
        self, address: str, until: float, reason: str, ejections: int, now: float
    ) -> list[Event]:
        """Take ``address`` out of rotation until ``until``; the snapshot follows."""
        self.ejected[address] = until
        events: list[Event] = [
            BackendEjected(at=now, address=address, until=until, reason=reason, ejections=ejections)
        ]
        if self.redispatch:
            self.judged_bad.append(address)
        self._publish(now, events)
        return events

    def restore(self, address: str, now: float) -> list[Event]:
        """An ejection's time is up: back in rotation, if health and admin allow."""
        del self.ejected[address]
        events: list[Event] = [BackendReturned(at=now, address=address)]
        self._publish(now, events)
        return events

    # -- the operator and reloads ------------------------------------------------

    def set_admin(self, address: str, admin_input: AdminInput, now: float) -> list[Event]:
        """Apply an operator's request; LobleError (one line) if it is illegal."""
        self._known(address)
        old = self.admin[address]
        new = next_admin_state(address, old, admin_input)
        if new is old:
            return []
        self.admin[address] = new
        events: list[Event] = [AdminStateChanged(at=now, address=address, old=old, new=new)]
        if old is _MAINT:
            self._resume_probes(address, now)
            self.joined[address] = now
        elif new is _MAINT:
            self.joined.pop(address, None)
        self._publish(now, events)
        return events

    def set_weight(self, address: str, weight: int, now: float) -> list[Event]:
        """Give a backend a new weight (already validated); publish if it is eligible."""
        self._known(address)
        old = self.backends[address].weight
        if weight == old:
            return []
        self.backends[address] = dataclasses.replace(self.backends[address], weight=weight)
        events: list[Event] = [WeightChanged(at=now, address=address, old=old, new=weight)]
        self._publish(now, events)
        return events

    def reconfigure(
        self,
        backends: Iterable[Backend],
        health: HealthConfig,
        now: float,
        checks: Mapping[str, ProbeCheck] | None = None,
    ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], list[Event]]:
        """Apply a reload's backends, health settings and probe checks, as a diff.

        Returns the addresses added, removed and reweighted, and the events:
        weight changes, backends forgotten at once (removed with nothing on
        them), then the snapshot if it changed. The new checks apply from the
        next probe sent (one in flight keeps the check it went out with).
        """
        wanted = {backend.address: backend for backend in backends}
        self.health_config = health
        self.checks = checks or {}
        thresholds = self._thresholds = _thresholds(health)
        for address, record in self._health.items():
            record.thresholds = thresholds
            record.payload_probed = self._payload_probed(address)
        events: list[Event] = []
        added: list[str] = []
        reweighted: list[str] = []
        removed = tuple(
            address
            for address in self.backends
            if address not in wanted and address not in self.removing
        )
        for address, backend in wanted.items():
            known = self.backends.get(address)
            if known is None:
                added.append(address)
                self._add(backend, now=now)
                continue
            if address in self.removing:
                added.append(address)
                del self.removing[address]
                self._health[address] = _copy_record(self._health[address], BackendHealth)
                self._resume_probes(address, now)
            if known.weight != backend.weight:
                reweighted.append(address)
                events.append(
                    WeightChanged(at=now, address=address, old=known.weight, new=backend.weight)
                )
            self.backends[address] = backend
        for address in removed:
            record = self._health[address]
            self.ejected.pop(address, None)  # out of rotation anyway; forgotten by the detector
            self._probe_due.pop(address, None)
            self._probe_in_flight.pop(address, None)
            if record.active_connections == 0:
                events.append(self._forget(address, now))
            else:
                self.removing[address] = None
                self._health[address] = _copy_record(record, _Leaving)
        # Config order for the kept and added, then the ones still leaving.
        self.backends = {
            **{address: self.backends[address] for address in wanted},
            **{address: self.backends[address] for address in self.removing},
        }
        for address in self.backends:
            if address not in self._probe_due:
                self._resume_probes(address, now)
            else:
                # A shorter interval applies from now on, not after the
                # probe already scheduled on the old one.
                soonest = now + health.probe_interval
                if soonest < self._probe_due[address]:
                    self._file_probe(address, soonest)
        self._publish(now, events)
        return tuple(added), removed, tuple(reweighted), events

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
                        check=self.checks.get(address, CONNECT_ONLY),
                    )
                )
            # From when it was due, not when the timer fired: a driver's timer
            # fires a little late (an event loop's wake-up, up to a millisecond),
            # and filed from `now` every probe would add that to the schedule,
            # bringing a backend back later and later (0.75-1 ms a probe, seen
            # against the simulator). Late by a whole interval: from now.
            following = due + self._interval()
            if following > now:
                self._file_probe(address, following)
            else:
                self._schedule_probe(address, now)
        return probes

    # -- internals ---------------------------------------------------------------

    def _changed(self, address: str, transition: Transition, now: float) -> list[Event]:
        if transition is _GONE:
            return [self._forget(address, now)]
        self.since[address] = (now, transition.reason)
        events: list[Event] = [
            BackendStateChanged(
                at=now,
                address=address,
                old=transition.old,
                new=transition.new,
                reason=transition.reason,
            )
        ]
        if transition.new is _HEALTHY:
            if not self.health_config.active:
                self._probe_due.pop(address, None)
            if transition.old is _UNHEALTHY:
                self.joined[address] = now  # back from nothing: cold (DRAINING kept its load)
        elif transition.old is _HEALTHY:
            self.joined.pop(address, None)
            if self.redispatch:
                self.judged_bad.append(address)
            # Out of the snapshot, DRAINING or UNHEALTHY: only probes can bring
            # it back, the first an interval from now. DRAINING -> UNHEALTHY
            # keeps the schedule it has.
            self._schedule_probe(address, now)
        self._publish(now, events)
        if address in self.removing and self._health[address].active_connections == 0:
            events.append(self._forget(address, now))
        return events

    def _wants_probe(self, address: str) -> bool:
        if self.admin[address] is _MAINT or address in self.removing:
            return False
        return self.health_config.active or self._health[address].state is not _HEALTHY

    def _interval(self) -> float:
        """The next probe interval: ``probe_interval``, stretched or shrunk by
        a draw of ``probe_jitter``. No draw without jitter: the core's rng is
        the balancer's too, and a run without jitter stays draw for draw as it was."""
        health = self.health_config
        jitter = health.probe_jitter
        if not jitter:
            return health.probe_interval
        return health.probe_interval * (1.0 + self._rng.uniform(-jitter, jitter))

    def _schedule_probe(self, address: str, now: float) -> None:
        due = now + self._interval()
        if due <= now:  # an interval lost in float rounding: never re-arm at now
            due = math.nextafter(now, math.inf)
        self._file_probe(address, due)

    def _file_probe(self, address: str, due: float) -> None:
        self._probe_due[address] = due
        self._sequence += 1
        heapq.heappush(self._probe_heap, (due, self._sequence, address))

    def _resume_probes(self, address: str, now: float) -> None:
        """Probe it again if it should be and nothing is scheduled (after
        maintenance, a re-add, or ``active`` switched on by a reload)."""
        if address not in self._probe_due and self._wants_probe(address):
            self._schedule_probe(address, now)

    def require(self, address: str) -> None:
        """:class:`LobleError` with one line unless ``address`` is a backend an
        operator may change (known, and not removed by a reload)."""
        self._known(address)

    def _known(self, address: str) -> None:
        if address not in self._health:
            raise LobleError(f"backends: no backend {address!r}")
        if address in self.removing:
            raise LobleError(
                f"backends: {address!r} was removed by a reload; its last connections are finishing"
            )

    def _add(self, backend: Backend, *, now: float | None = None) -> None:
        """Start knowing a backend: at start-up (``now`` None) or added by a reload."""
        address = backend.address
        self.backends[address] = backend
        record = self._health[address] = BackendHealth(address, self._thresholds)
        record.payload_probed = self._payload_probed(address)
        self.admin.setdefault(address, _READY)
        self._reports[address] = {
            health_input: HealthReport.of(address, health_input) for health_input in HealthInput
        }
        if now is not None and self.health_config.active:
            # Not proven yet: it joins as a backend coming back does.
            record.state = _UNHEALTHY
            self.since[address] = (now, ADDED_REASON)
        elif now is not None:
            self.joined[address] = now  # in rotation at once, and cold

    def _payload_probed(self, address: str) -> bool:
        # Only where healthy backends are probed ([health] active): there a
        # probe's success ends a run of failures. Without active probes none
        # comes while it is healthy, and its passive successes must, or rare
        # failures far apart would add up to a fall.
        check = self.checks.get(address)
        return self.health_config.active and check is not None and check.awaits_reply

    def _forget(self, address: str, now: float) -> BackendForgotten:
        self.removing.pop(address, None)
        del self.backends[address], self._health[address], self._reports[address]
        del self.admin[address]
        self.since.pop(address, None)
        self.probed.pop(address, None)
        self.joined.pop(address, None)
        self.ejected.pop(address, None)
        self._probe_due.pop(address, None)
        self._probe_in_flight.pop(address, None)
        self._forgotten = address
        return BackendForgotten(at=now, address=address)

    def _publish(self, now: float, events: list[Event]) -> None:
        """Append a new snapshot, if the eligible backends changed, after what caused it."""
        published = self._republish(now)
        if self.pending:
            events.extend(self.pending)
            self.pending.clear()
        if published is not None:
            events.append(published)

    def _republish(self, now: float) -> SnapshotPublished | None:
        """Publish the eligible backends if they changed.

        Eligible: the healthy primaries an operator left ready (not removed).
        With none, the healthy backups (HAProxy's ``backup``). With
        ``panic_threshold`` set and fewer healthy primaries than that share
        of the ready ones (none included), every ready primary, healthy or
        not (Envoy's panic: better spread over all than crush the few left);
        :attr:`panic` says so, and a change of it is a :class:`PanicChanged`
        in :attr:`pending` for the caller to emit.
        """
        eligible, panic, healthy, total = self._eligible(self.ejected)
        if panic is not self.panic:
            self.panic = panic
            self.pending.append(PanicChanged(at=now, panic=panic, healthy=healthy, total=total))
        if eligible == self.snapshot.backends:
            return None
        self.snapshot = Snapshot(version=self.snapshot.version + 1, backends=eligible)
        return SnapshotPublished(
            at=now, version=self.snapshot.version, addresses=self.snapshot.addresses
        )

    def _eligible(self, ejected: dict[str, float]) -> tuple[tuple[Backend, ...], bool, int, int]:
        """Who would be eligible with these backends ejected: the backends, whether
        in panic, and how many primaries are healthy (and not ejected) of how many."""
        health, admin, removing = self._health, self.admin, self.removing
        ready = [
            backend
            for address, backend in self.backends.items()
            if admin[address] is _READY and address not in removing
        ]
        up = [
            backend
            for backend in ready
            if health[backend.address].state is _HEALTHY and backend.address not in ejected
        ]
        primaries = [backend for backend in ready if not backend.backup]
        healthy = [backend for backend in up if not backend.backup]
        threshold = self.panic_threshold
        panic = bool(threshold) and bool(primaries) and len(healthy) < threshold * len(primaries)
        if panic and not healthy:
            panic = not up  # no primary is up: a healthy backup is better than panic
        if panic:
            eligible = tuple(primaries)
        elif healthy or len(primaries) == len(ready):
            eligible = tuple(healthy)
        else:
            eligible = tuple(up)  # only backups are up
        return eligible, panic, len(healthy), len(primaries)


def _thresholds(health: HealthConfig) -> Thresholds:
    return Thresholds(
        failure_threshold=health.failure_threshold, success_threshold=health.success_threshold
    )
