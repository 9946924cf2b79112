"""Balancers: which eligible backend takes the next connection.

A balancer is a small class behind one protocol, :class:`Balancer`: given the
snapshot the connection took, the active connection count of each backend and
the addresses already tried (a retry goes to a *different* backend), it
returns a backend or ``None`` when nothing is eligible. Randomness comes only
from the ``random.Random`` it is given, so a seed fixes every choice.

* ``round_robin``: smooth weighted round robin as nginx does it; a backend of
  weight 10 gets twice the picks of one of weight 5, interleaved rather than
  in bursts. The schedule of one snapshot repeats with period ``sum(weights)``,
  so it is computed once per snapshot and each pick is O(1).
* ``random``: weighted random, by bisection over cumulative weights.
* ``least_connections``: the lowest ``(active + 1) / weight`` (HAProxy's
  weighted leastconn), ties broken in rotation.
* ``p2c``: power of two choices: two distinct backends drawn by weight, the
  one with fewer active connections per weight wins (Envoy's LEAST_REQUEST).
* ``maglev`` and ``ring_hash``: consistent hashing of the client's address
  (:mod:`._hashing`): the same client goes to the same backend, on every
  Loble instance with the same backends, and when one of ``N`` backends
  leaves about ``1/N`` of the clients move. These are *keyed* balancers
  (:class:`KeyedBalancer`): the core gives them the connection's key.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from ._backend import Backend, Snapshot
from ._hashing import DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_RING_POINTS, HashRing, MaglevTable

__all__ = [
    "BALANCERS",
    "Balancer",
    "KeyedBalancer",
    "LeastConnections",
    "Maglev",
    "PowerOfTwoChoices",
    "RingHash",
    "RoundRobin",
    "WeightedRandom",
    "make_balancer",
]

ActiveCount = Callable[[str], int]
"""Active connections of a backend, by address."""

_SCHEDULE_BUDGET = 200_000
"""Most work (period x backends) spent precomputing a round-robin schedule.

A rebuild runs inside accept whenever membership changes, which is when the
balancer is under stress: beyond this budget (a few ms), picks run the live
algorithm, O(backends) each, instead."""


class Balancer(Protocol):
    def pick(
        self,
        snapshot: Snapshot,
        active: ActiveCount,
        exclude: Collection[str] = (),
    ) -> Backend | None:
        """Choose a backend of ``snapshot`` not in ``exclude``, or None."""
        ...


class KeyedBalancer(Balancer, Protocol):
    """A balancer that picks by the connection's key (a hash of the client's address).

    The core calls :meth:`pick_for` instead of ``pick`` when ``keyed`` is
    true; ``key`` is None when the driver gave no client address.
    """

    keyed: bool

    def pick_for(
        self,
        key: int | None,
        snapshot: Snapshot,
        active: ActiveCount,
        exclude: Collection[str] = (),
    ) -> Backend | None:
        """Choose the backend of ``key`` among ``snapshot``'s, not in ``exclude``."""
        ...


def _candidates(snapshot: Snapshot, exclude: Collection[str]) -> Sequence[Backend]:
    if not exclude:
        return snapshot.backends
    return [backend for backend in snapshot.backends if backend.address not in exclude]


class RoundRobin:
    """Smooth weighted round robin (nginx's ``ngx_http_upstream_get_peer``)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._version = -1
        self._schedule: list[Backend] = []
        self._position = 0
        self._current: dict[str, int] = {}

    def pick(
        self,
        snapshot: Snapshot,
        active: ActiveCount,
        exclude: Collection[str] = (),
    ) -> Backend | None:
        if snapshot.version != self._version:
            self._rebuild(snapshot)
        schedule = self._schedule
        if schedule:
            period = len(schedule)
            for _ in range(period):
                backend = schedule[self._position]
                self._position = (self._position + 1) % period
                if backend.address not in exclude:
                    return backend
            return None
        return self._live_pick(_candidates(snapshot, exclude))

    def _rebuild(self, snapshot: Snapshot) -> None:
        self._version = snapshot.version
        self._position = 0
        self._current = {backend.address: 0 for backend in snapshot.backends}
        total = sum(backend.weight for backend in snapshot.backends)
        if total > 0 and total * len(snapshot.backends) <= _SCHEDULE_BUDGET:
            schedule: list[Backend] = []
            for _ in range(total):
                backend = self._live_pick(snapshot.backends)
                assert backend is not None  # total > 0, so there are backends
                schedule.append(backend)
            self._schedule = schedule
            self._current = {backend.address: 0 for backend in snapshot.backends}
        else:
            self._schedule = []

    def _live_pick(self, candidates: Sequence[Backend]) -> Backend | None:
        best: Backend | None = None
        best_current = 0
        total = 0
        current = self._current
        for backend in candidates:
            value = current.get(backend.address, 0) + backend.weight
            current[backend.address] = value
            total += backend.weight
            if best is None or value > best_current:
                best, best_current = backend, value
        if best is not None:
            current[best.address] = best_current - total
        return best


class WeightedRandom:
    """Each pick is independent, with probability proportional to weight."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._version = -1
        self._cumulative: list[int] = []

    def pick(
        self,
        snapshot: Snapshot,
        active: ActiveCount,
        exclude: Collection[str] = (),
    ) -> Backend | None:
        if exclude:
            candidates = _candidates(snapshot, exclude)
            if not candidates:
                return None
            return self._rng.choices(candidates, weights=[b.weight for b in candidates])[0]
        backends = snapshot.backends
        if not backends:
            return None
        if snapshot.version != self._version:
            self._version = snapshot.version
            self._cumulative = list(itertools.accumulate(b.weight for b in backends))
        cumulative = self._cumulative
        point = self._rng.random() * cumulative[-1]
        return backends[bisect.bisect_right(cumulative, point)]


class LeastConnections:
    """Fewest active connections per unit of weight; ties rotate."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._offset = 0

    def pick(
        self,
        snapshot: Snapshot,
        active: ActiveCount,
        exclude: Collection[str] = (),
    ) -> Backend | None:
        candidates = _candidates(snapshot, exclude)
        count = len(candidates)
        if count == 0:
            return None
        self._offset = (self._offset + 1) % count
        best: Backend | None = None
        best_score = 0.0
        for index in range(count):
            backend = candidates[(self._offset + index) % count]
            score = (active(backend.address) + 1) / backend.weight
            if best is None or score < best_score:
                best, best_score = backend, score
        return best


class PowerOfTwoChoices:
    """Two distinct backends drawn by weight; the less loaded one wins."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(
        self,
        snapshot: Snapshot,
        active: ActiveCount,
        exclude: Collection[str] = (),
    ) -> Backend | None:
        candidates = _candidates(snapshot, exclude)
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        weights = [backend.weight for backend in candidates]
        first = self._rng.choices(range(len(candidates)), weights=weights)[0]
        weights[first] = 0
        second = self._rng.choices(range(len(candidates)), weights=weights)[0]
        a, b = candidates[first], candidates[second]
        score_a = (active(a.address) + 1) / a.weight
        score_b = (active(b.address) + 1) / b.weight
        if score_a == score_b:
            return a  # already a weighted random draw
        return a if score_a < score_b else b


_KEPT_TABLES = 4
"""Lookup tables a hashing balancer keeps, by backend set: a backend that
flaps out and back finds its tables built (a Maglev table of 65,537 slots
takes some 40 ms of Python to fill)."""


class _Hashing:
    """What Maglev and the ring share: a table per backend set, built on demand."""

    keyed = True

    def __init__(
        self, rng: random.Random, build: Callable[[Sequence[Backend]], MaglevTable | HashRing]
    ) -> None:
        self._rng = rng
        self._build = build
        self._version = -1
        self._table: MaglevTable | HashRing | None = None
        self._tables: dict[tuple[tuple[str, int], ...], MaglevTable | HashRing] = {}

    def pick(
        self,
        snapshot: Snapshot,
        active: ActiveCount,
        exclude: Collection[str] = (),
    ) -> Backend | None:
        """Without a key: a random slot's backend (Envoy, for a request with no hash)."""
        return self.pick_for(None, snapshot, active, exclude)

    def pick_for(
        self,
        key: int | None,
        snapshot: Snapshot,
        active: ActiveCount,
        exclude: Collection[str] = (),
    ) -> Backend | None:
        if snapshot.version != self._version:
            self._version = snapshot.version
            members = tuple((backend.address, backend.weight) for backend in snapshot.backends)
            table = self._tables.pop(members, None)
            if table is None:
                table = self._build(snapshot.backends)
                if len(self._tables) >= _KEPT_TABLES:
                    del self._tables[next(iter(self._tables))]  # the oldest
            self._tables[members] = table  # most recent last
            self._table = table
        assert self._table is not None
        if key is None:
            key = self._rng.getrandbits(64)
        return self._table.lookup(key, exclude)


class Maglev(_Hashing):
    """Google's Maglev: a prime-sized lookup table, near-minimal disruption."""

    def __init__(self, rng: random.Random, table_size: int = DEFAULT_MAGLEV_TABLE_SIZE) -> None:
        super().__init__(rng, lambda backends: MaglevTable(backends, table_size))
        self.table_size = table_size


class RingHash(_Hashing):
    """Karger's consistent-hash ring: points per unit of weight, nginx's 160 by default."""

    def __init__(self, rng: random.Random, points: int = DEFAULT_RING_POINTS) -> None:
        super().__init__(rng, lambda backends: HashRing(backends, points))
        self.points = points


BALANCERS: dict[str, Callable[[random.Random], Balancer]] = {
    "round_robin": RoundRobin,
    "random": WeightedRandom,
    "least_connections": LeastConnections,
    "p2c": PowerOfTwoChoices,
    "maglev": Maglev,
    "ring_hash": RingHash,
}


def make_balancer(
    algorithm: str,
    rng: random.Random,
    *,
    table_size: int = DEFAULT_MAGLEV_TABLE_SIZE,
    ring_points: int = DEFAULT_RING_POINTS,
) -> Balancer:
    """The balancer ``algorithm`` names; the hashing ones sized as configured."""
    if algorithm == "maglev":
        return Maglev(rng, table_size)
    if algorithm == "ring_hash":
        return RingHash(rng, ring_points)
    try:
        factory = BALANCERS[algorithm]
    except KeyError:
        raise ValueError(
            f"unknown balancer {algorithm!r}; choose one of {', '.join(BALANCERS)}"
        ) from None
    return factory(rng)
