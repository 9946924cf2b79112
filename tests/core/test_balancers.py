"""Balancers: weights honoured, None when nothing is eligible, retries go elsewhere."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loble.core import (
    BALANCERS,
    Backend,
    LeastConnections,
    PowerOfTwoChoices,
    RoundRobin,
    Snapshot,
    WeightedRandom,
    make_balancer,
)
from loble.core._balancers import _SCHEDULE_BUDGET


def snapshot(*weights: int, version: int = 1) -> Snapshot:
    return Snapshot(
        version=version,
        backends=tuple(
            Backend(address=f"10.0.0.{index + 1}:80", weight=weight)
            for index, weight in enumerate(weights)
        ),
    )


def idle(address: str) -> int:
    return 0


def test_smooth_weighted_round_robin_interleaves_like_nginx() -> None:
    # nginx's documented sequence for weights a=5, b=1, c=1: a a b a c a a.
    balancer = RoundRobin()
    snap = snapshot(5, 1, 1)
    picks = [balancer.pick(snap, idle) for _ in range(14)]
    letters = "".join("abc"[int(p.address.split(".")[3][0]) - 1] for p in picks if p)
    assert letters == "aabacaa" * 2


def test_round_robin_without_weights_rotates() -> None:
    balancer = RoundRobin()
    snap = snapshot(1, 1, 1)
    assert [balancer.pick(snap, idle).address for _ in range(4)] == [  # type: ignore[union-attr]
        "10.0.0.1:80",
        "10.0.0.2:80",
        "10.0.0.3:80",
        "10.0.0.1:80",
    ]


def test_round_robin_with_huge_weights_runs_the_live_algorithm() -> None:
    balancer = RoundRobin()
    snap = snapshot(_SCHEDULE_BUDGET, _SCHEDULE_BUDGET)
    counts = Counter(balancer.pick(snap, idle).address for _ in range(1000))  # type: ignore[union-attr]
    assert counts == {"10.0.0.1:80": 500, "10.0.0.2:80": 500}
    assert balancer.pick(snap, idle, exclude={"10.0.0.1:80"}).address == "10.0.0.2:80"  # type: ignore[union-attr]
    assert balancer.pick(snap, idle, exclude={"10.0.0.1:80", "10.0.0.2:80"}) is None


def test_a_rebuild_never_costs_more_than_the_budget() -> None:
    # 200 backends of weight 300: a 60,000-pick period times 200 backends
    # would stall accept for seconds on every health change.
    balancer = RoundRobin()
    snap = snapshot(*[300] * 200)
    counts = Counter(balancer.pick(snap, idle).address for _ in range(2_000))  # type: ignore[union-attr]
    assert balancer._schedule == []
    assert set(counts.values()) == {10}


def test_round_robin_starts_over_when_the_snapshot_changes() -> None:
    balancer = RoundRobin()
    balancer.pick(snapshot(1, 1), idle)
    fresh = snapshot(1, 1, version=2)
    assert balancer.pick(fresh, idle).address == "10.0.0.1:80"  # type: ignore[union-attr]


@pytest.mark.parametrize("algorithm", sorted(BALANCERS))
def test_empty_snapshot_picks_none(algorithm: str) -> None:
    balancer = make_balancer(algorithm, random.Random(1))
    assert balancer.pick(snapshot(), idle) is None


@pytest.mark.parametrize("algorithm", sorted(BALANCERS))
def test_exclude_everything_picks_none(algorithm: str) -> None:
    balancer = make_balancer(algorithm, random.Random(1))
    snap = snapshot(3, 1)
    assert balancer.pick(snap, idle, exclude=set(snap.addresses)) is None


@pytest.mark.parametrize("algorithm", sorted(BALANCERS))
def test_a_retry_never_picks_an_excluded_backend(algorithm: str) -> None:
    balancer = make_balancer(algorithm, random.Random(7))
    snap = snapshot(5, 1, 3)
    for _ in range(200):
        choice = balancer.pick(snap, idle, exclude={"10.0.0.1:80"})
        assert choice is not None
        assert choice.address != "10.0.0.1:80"


def test_unknown_algorithm_names_the_choices() -> None:
    with pytest.raises(
        ValueError, match="round_robin, random, least_connections, p2c, maglev, ring_hash"
    ):
        make_balancer("fastest", random.Random())


def test_least_connections_picks_the_least_loaded_per_weight() -> None:
    balancer = LeastConnections()
    snap = snapshot(1, 1, 4)
    load = {"10.0.0.1:80": 3, "10.0.0.2:80": 0, "10.0.0.3:80": 3}
    # scores (active+1)/weight: 4, 1, 1 -> a tie between b and c, broken in rotation
    picks = {balancer.pick(snap, load.__getitem__).address for _ in range(4)}  # type: ignore[union-attr]
    assert picks == {"10.0.0.2:80", "10.0.0.3:80"}


def test_p2c_prefers_the_less_loaded_of_its_two_draws() -> None:
    balancer = PowerOfTwoChoices(random.Random(3))
    snap = snapshot(1, 1)
    load = {"10.0.0.1:80": 10, "10.0.0.2:80": 0}
    assert {balancer.pick(snap, load.__getitem__).address for _ in range(50)} == {  # type: ignore[union-attr]
        "10.0.0.2:80"
    }
    assert balancer.pick(snap, load.__getitem__, exclude={"10.0.0.2:80"}).address == "10.0.0.1:80"  # type: ignore[union-attr]


def test_weighted_random_is_reproducible_from_its_seed() -> None:
    snap = snapshot(5, 2, 1)
    first = [WeightedRandom(random.Random(42)).pick(snap, idle) for _ in range(1)]
    a = WeightedRandom(random.Random(42))
    b = WeightedRandom(random.Random(42))
    assert [a.pick(snap, idle) for _ in range(100)] == [b.pick(snap, idle) for _ in range(100)]
    assert first[0] is not None


# -- weighted distribution, for every balancer -------------------------------------------
#
# Tolerance: each backend's share of picks is within 0.05 (absolute) of
# weight / sum(weights). Round robin is exact over whole periods. Random and
# p2c are sampling: with 6,000 picks the standard deviation of a share is at
# most 0.0065, so 0.05 is over seven sigmas. Least connections and p2c only
# see weights through load, so those are measured with connections held open
# (the steady state of a busy balancer); with held connections, least
# connections is exact to within one connection per backend.

TOLERANCE = 0.05
PICKS = 6_000


def shares(counts: Counter[str], total: int) -> dict[str, float]:
    return {address: count / total for address, count in counts.items()}


@settings(max_examples=25)
@given(
    st.lists(st.integers(min_value=1, max_value=10), min_size=1, max_size=6),
    st.sampled_from(sorted(BALANCERS)),
    st.integers(min_value=0, max_value=2**32),
)
def test_weighted_distribution_within_tolerance(
    weights: list[int], algorithm: str, seed: int
) -> None:
    balancer = make_balancer(algorithm, random.Random(seed))
    snap = snapshot(*weights)
    held: Counter[str] = Counter()
    for _ in range(PICKS):
        choice = balancer.pick(snap, held.__getitem__)
        assert choice is not None
        held[choice.address] += 1  # the connection stays open
    total_weight = sum(weights)
    observed = shares(held, PICKS)
    for backend in snap.backends:
        expected = backend.weight / total_weight
        assert abs(observed.get(backend.address, 0.0) - expected) <= TOLERANCE, (
            algorithm,
            weights,
            backend.address,
            observed,
        )


def test_weight_ten_gets_twice_the_picks_of_weight_five() -> None:
    for algorithm in ("round_robin", "random"):
        balancer = make_balancer(algorithm, random.Random(5))
        snap = snapshot(10, 5)
        counts = Counter(balancer.pick(snap, idle).address for _ in range(3_000))  # type: ignore[union-attr]
        ratio = counts["10.0.0.1:80"] / counts["10.0.0.2:80"]
        assert 1.8 <= ratio <= 2.2, (algorithm, ratio)
