"""least_of_three.py with one thing forgotten: the backends to exclude."""

from __future__ import annotations

from collections.abc import Callable, Collection

from least_of_three import LeastOfThree

from loble.core import Backend, Snapshot


class Forgetful(LeastOfThree):
    def pick(
        self,
        snapshot: Snapshot,
        active: Callable[[str], int],
        exclude: Collection[str] = (),
    ) -> Backend | None:
        candidates = list(snapshot.backends)  # a retry may go back where it failed
        if not candidates:
            return None
        looks = self.rng.sample(candidates, min(3, len(candidates)))
        return min(looks, key=lambda b: (active(b.address) + 1) / b.weight)
