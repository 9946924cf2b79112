"""A balancer of one's own: three looks, and the least loaded of them wins."""

from __future__ import annotations

import random
from collections.abc import Callable, Collection

from loble.core import Backend, Snapshot


class LeastOfThree:
    """p2c with a third look: draw three backends, take the one with the fewest
    connections per unit of weight."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng  # the only randomness: the run's seed replays every pick

    def pick(
        self,
        snapshot: Snapshot,
        active: Callable[[str], int],
        exclude: Collection[str] = (),
    ) -> Backend | None:
        candidates = [b for b in snapshot.backends if b.address not in exclude]
        if not candidates:
            return None
        looks = self.rng.sample(candidates, min(3, len(candidates)))
        return min(looks, key=lambda b: (active(b.address) + 1) / b.weight)
