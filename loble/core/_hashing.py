"""Consistent hashing: the same client goes to the same backend, and few move.

Two lookup structures, both pure functions of the backend set and their
weights (never of the order they were listed in, the process, or the time),
so two Loble instances configured alike send every key to the same backend
without talking to each other:

* :class:`MaglevTable`, Google's Maglev (Eisenbud et al., NSDI 2016): a
  lookup table of a prime size ``M`` (65,537 by default, as Envoy), filled
  by letting each backend in turn take the next free slot of its own
  permutation of ``0..M-1`` (``offset + j * skip`` mod ``M``, both drawn from
  a hash of its address). A lookup is one hash and one index. Each backend
  owns ``M / N`` slots within one, and when one of ``N`` backends leaves,
  the keys that move are its own plus a few more (the paper's "near
  minimal disruption"). Weights, as Envoy's weighted Maglev: a backend of
  weight ``w`` takes a turn in ``w / max_weight`` of the rounds, so it ends
  with that share of the slots.
* :class:`HashRing`, Karger's consistent hashing (Envoy's ``ring_hash``,
  nginx's ``hash ... consistent``): each backend puts points on a 64-bit
  ring in proportion to its weight; a key goes to the first point at or
  after its hash. A key moves only if its point's backend left: exactly
  that backend's share of the keys, but the spread over backends is only
  as even as the ring is large (160 points per unit of weight, as nginx).

A retry must go to another backend: both structures walk on from the key's
place (the next slot, the next point) to the first backend not excluded, so
a retry is as consistent as a first pick.

The hash is BLAKE2b (``hashlib``, 64 bits): Python's ``hash`` is salted per
process, and the point is that every process agrees.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Collection, Sequence

from ._backend import Backend

__all__ = [
    "DEFAULT_MAGLEV_TABLE_SIZE",
    "DEFAULT_RING_POINTS",
    "HashRing",
    "MaglevTable",
    "hash_key",
    "is_prime",
]

DEFAULT_MAGLEV_TABLE_SIZE = 65_537
"""Envoy's default: a prime, and about 100 slots a backend for 650 of them."""

_SPACE = 1 << 64
"""Keys are 64-bit: the ring's circumference."""

DEFAULT_RING_POINTS = 160
"""Points on the ring per unit of weight: nginx's ``hash ... consistent``."""


def hash_key(data: str, salt: bytes = b"") -> int:
    """A 64-bit hash of ``data`` that every process and machine agrees on."""
    digest = hashlib.blake2b(data.encode(), digest_size=8, salt=salt).digest()
    return int.from_bytes(digest, "little")


def is_prime(number: int) -> bool:
    """Whether ``number`` is prime (trial division: table sizes are small)."""
    if number < 2:
        return False
    if number % 2 == 0:
        return number == 2
    divisor = 3
    while divisor * divisor <= number:
        if number % divisor == 0:
            return False
        divisor += 2
    return True


def _canonical(backends: Sequence[Backend]) -> list[Backend]:
    """The backends in address order: the table must not depend on list order."""
    return sorted(backends, key=lambda backend: backend.address)


class MaglevTable:
    """A Maglev lookup table for one backend set (build once per snapshot)."""

    __slots__ = ("backends", "size", "slots")

    def __init__(self, backends: Sequence[Backend], size: int = DEFAULT_MAGLEV_TABLE_SIZE) -> None:
        if not is_prime(size):
            raise ValueError(f"a Maglev table size must be prime, not {size}")
        self.size = size
        self.backends: tuple[Backend, ...] = tuple(_canonical(backends))
        """The backends, in address order; :attr:`slots` holds their indexes."""
        self.slots: list[int] = self._populate() if self.backends else []

    def _populate(self) -> list[int]:
        size = self.size
        backends = self.backends
        skips = [hash_key(b.address, b"skip") % (size - 1) + 1 for b in backends]
        # Each backend's next candidate slot: its permutation is offset, offset
        # + skip, offset + 2 skip, ... (mod size), walked by adding, not multiplying.
        following = [hash_key(b.address, b"offset") % size for b in backends]
        weights = [b.weight for b in backends]
        top = max(weights)
        # A backend takes a turn in a round when its weight has earned one:
        # weight `top` every round, weight top/3 every third (Envoy's rule).
        targets = [top] * len(backends)
        turns = range(len(backends))
        slots = [-1] * size
        left = size
        round_number = 0
        while left:
            round_number += 1
            for index in turns:
                if round_number * weights[index] < targets[index]:
                    continue
                targets[index] += top
                slot, skip = following[index], skips[index]
                while slots[slot] != -1:
                    slot += skip
                    if slot >= size:
                        slot -= size
                slots[slot] = index
                slot += skip
                following[index] = slot - size if slot >= size else slot
                left -= 1
                if not left:
                    break
        return slots

    def lookup(self, key: int, exclude: Collection[str] = ()) -> Backend | None:
        """The backend of ``key`` (a :func:`hash_key`), skipping ``exclude``; None if none."""
        slots = self.slots
        if not slots:
            return None
        position = key % self.size
        backend = self.backends[slots[position]]
        if not exclude or backend.address not in exclude:
            return backend
        if all(b.address in exclude for b in self.backends):
            return None
        size = self.size
        while True:  # the next slot's backend: a retry is as consistent as a pick
            position = (position + 1) % size
            backend = self.backends[slots[position]]
            if backend.address not in exclude:
                return backend

    def shares(self) -> dict[str, int]:
        """Slots per backend address (for tests and the docs' spread figures)."""
        counts = dict.fromkeys((b.address for b in self.backends), 0)
        for index in self.slots:
            counts[self.backends[index].address] += 1
        return counts


class HashRing:
    """A consistent-hash ring (Ketama, as nginx's ``hash ... consistent``) for one backend set.

    Each backend puts ``points`` points on the ring per unit of weight (nginx
    uses 160), named from its own address only: a backend's points never
    depend on the others, so when one leaves, only the keys of its points
    move, and when it comes back they return.
    """

    __slots__ = ("_owners", "_points", "backends")

    def __init__(self, backends: Sequence[Backend], points: int = DEFAULT_RING_POINTS) -> None:
        if points < 1:
            raise ValueError(f"a hash ring needs at least one point per weight, not {points}")
        self.backends: tuple[Backend, ...] = tuple(_canonical(backends))
        ring: list[tuple[int, int]] = []
        for index, backend in enumerate(self.backends):
            ring.extend(
                (hash_key(f"{backend.address}-{replica}"), index)
                for replica in range(points * backend.weight)
            )
        ring.sort()
        self._points = [point for point, _ in ring]
        self._owners = [index for _, index in ring]

    def __len__(self) -> int:
        return len(self._points)

    def shares(self) -> dict[str, float]:
        """The share of the key space each backend owns (the arcs before its points)."""
        owned = dict.fromkeys((b.address for b in self.backends), 0)
        points, owners = self._points, self._owners
        previous = points[-1] - _SPACE if points else 0
        for point, index in zip(points, owners, strict=True):
            owned[self.backends[index].address] += point - previous
            previous = point
        return {address: arc / _SPACE for address, arc in owned.items()}

    def lookup(self, key: int, exclude: Collection[str] = ()) -> Backend | None:
        """The backend of the first point at or after ``key``, skipping ``exclude``."""
        points = self._points
        if not points:
            return None
        position = bisect.bisect_left(points, key) % len(points)
        backend = self.backends[self._owners[position]]
        if not exclude or backend.address not in exclude:
            return backend
        if all(b.address in exclude for b in self.backends):
            return None
        while True:
            position = (position + 1) % len(points)
            backend = self.backends[self._owners[position]]
            if backend.address not in exclude:
                return backend
