"""Consistent hashing: Maglev and the ring keep clients where they were.

The figures the concepts page prints (disruption when one backend leaves,
spread over equal backends) are computed here, and the page must show
exactly these: the hashes are fixed (BLAKE2b of the addresses), so they
are the same on every machine.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loble.core import Backend, ConfigError, ConnectBackend, ProxyCore, Snapshot, parse_config
from loble.core._balancers import Maglev, RingHash
from loble.core._hashing import HashRing, MaglevTable, hash_key, is_prime

PAGE = Path(__file__).resolve().parents[2] / "docs" / "concepts.md"
KEYS = [hash_key(f"198.51.{i // 256}.{i % 256}") for i in range(20_000)]
"""20,000 client addresses' keys."""


def fleet(count: int, weight: int = 1) -> list[Backend]:
    return [
        Backend(address=f"10.4.{i // 250}.{i % 250 + 1}:80", weight=weight) for i in range(count)
    ]


def maglev_moved(before: MaglevTable, after: MaglevTable) -> float:
    """The share of the key space whose backend changed (slot by slot: exact)."""
    changed = sum(
        1
        for old, new in zip(before.slots, after.slots, strict=True)
        if before.backends[old] != after.backends[new]
    )
    return changed / before.size


def spread(shares: dict[str, float] | dict[str, int]) -> tuple[float, float]:
    """The smallest and the largest share of the key space, over the mean."""
    mean = sum(shares.values()) / len(shares)
    return min(shares.values()) / mean, max(shares.values()) / mean


ROWS = ((5, 65_537), (10, 65_537), (50, 65_537), (100, 65_537), (100, 655_373))


@functools.cache
def figures() -> list[str]:
    """The page's rows: N backends of weight 1, the table size, and for one leaving:
    the least share that must move (1/N), the share Maglev and the ring move;
    then the spread of the key space over the N (smallest and largest, over the mean)."""
    rows = []
    for count, size in ROWS:
        backends = fleet(count)
        maglev = MaglevTable(backends, size)
        ring = HashRing(backends)
        ring_moved = ring.shares()[backends[0].address]  # exactly the leaver's own arcs
        m_low, m_high = spread(maglev.shares())
        r_low, r_high = spread(ring.shares())
        rows.append(
            f"| {count} | {size:,} | {1 / count:.2%} "
            f"| {maglev_moved(maglev, MaglevTable(backends[1:], size)):.2%} "
            f"| {ring_moved:.2%} | {m_low:.3f}-{m_high:.3f} | {r_low:.2f}-{r_high:.2f} |"
        )
    return rows


def test_the_concepts_page_prints_the_measured_figures() -> None:
    page = PAGE.read_text()
    for row in figures():
        assert row in page, f"docs/concepts.md lacks the measured row:\n{row}"


# -- Maglev -----------------------------------------------------------------------------


def test_maglev_gives_each_equal_backend_its_share_of_slots_within_one() -> None:
    for count in (1, 3, 10, 100):
        shares = MaglevTable(fleet(count)).shares()
        assert sum(shares.values()) == 65_537
        assert max(shares.values()) - min(shares.values()) <= 1


def test_when_one_of_n_leaves_maglev_moves_close_to_one_nth() -> None:
    for count, size, most in ((5, 65_537, 1.05), (10, 65_537, 1.05), (100, 655_373, 1.2)):
        backends = fleet(count)
        share = maglev_moved(MaglevTable(backends, size), MaglevTable(backends[1:], size))
        # Its own keys must move, and a few others do: near-minimal disruption,
        # nearer as the table grows against the fleet (the paper: M >> 100 N).
        assert 1 / count <= share <= most / count, (count, share)
    # Keys sampled agree with the slots.
    backends = fleet(10)
    before, after = MaglevTable(backends), MaglevTable(backends[1:])
    sampled = sum(1 for key in KEYS if before.lookup(key) != after.lookup(key)) / len(KEYS)
    assert sampled == pytest.approx(maglev_moved(before, after), abs=0.01)


def test_maglev_honours_weights() -> None:
    backends = [
        Backend(address="10.4.0.1:80", weight=3),
        Backend(address="10.4.0.2:80", weight=1),
        Backend(address="10.4.0.3:80", weight=6),
    ]
    shares = MaglevTable(backends).shares()
    for backend in backends:
        assert shares[backend.address] / 65_537 == pytest.approx(backend.weight / 10, abs=0.002)


def test_a_table_depends_on_the_set_not_its_order() -> None:
    backends = fleet(20)
    shuffled = backends[:]
    random.Random(3).shuffle(shuffled)
    assert MaglevTable(backends).slots == MaglevTable(shuffled).slots
    ring, ring_shuffled = HashRing(backends), HashRing(shuffled)
    assert [ring.lookup(key) for key in KEYS] == [ring_shuffled.lookup(key) for key in KEYS]


def test_a_table_size_must_be_prime() -> None:
    assert [n for n in range(20) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19]
    assert is_prime(65_537) and not is_prime(65_536)
    with pytest.raises(ValueError, match="must be prime, not 100"):
        MaglevTable(fleet(2), 100)
    small = MaglevTable(fleet(3), 7)
    assert sorted(small.shares().values()) == [2, 2, 3]


# -- the ring ----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(count=st.integers(2, 12), leaving=st.integers(0, 11), points=st.integers(1, 40))
def test_on_the_ring_only_the_leaving_backends_keys_move(
    count: int, leaving: int, points: int
) -> None:
    backends = fleet(count)
    gone = backends[leaving % count]
    before = HashRing(backends, points)
    after = HashRing([b for b in backends if b != gone], points)
    for key in KEYS[:2_000]:
        was = before.lookup(key)
        assert was is not None
        if was != gone:
            assert after.lookup(key) == was
        else:
            assert after.lookup(key) != gone


def test_the_ring_places_points_per_unit_of_weight() -> None:
    backends = [Backend(address="10.4.0.1:80", weight=2), Backend(address="10.4.0.2:80")]
    assert len(HashRing(backends)) == 3 * 160
    with pytest.raises(ValueError, match="at least one point"):
        HashRing(backends, 0)


# -- retries and empty sets ---------------------------------------------------------------


@pytest.mark.parametrize("kind", [MaglevTable, HashRing])
def test_a_retry_walks_on_to_the_next_backend_not_tried(kind: type[MaglevTable]) -> None:
    table = kind(fleet(4))
    for key in KEYS[:200]:
        first = table.lookup(key)
        assert first is not None
        second = table.lookup(key, exclude={first.address})
        assert second is not None and second != first
        assert table.lookup(key, exclude={first.address}) == second  # consistent too
    everyone = {backend.address for backend in fleet(4)}
    assert table.lookup(KEYS[0], exclude=everyone) is None
    assert kind([]).lookup(KEYS[0]) is None


# -- in the core ---------------------------------------------------------------------------


def core(algorithm: str, count: int = 6, **balancer: object) -> ProxyCore:
    document = {
        "balancer": {"algorithm": algorithm, **balancer},
        "backends": [{"address": backend.address} for backend in fleet(count)],
    }
    return ProxyCore(parse_config(document), random.Random(0))


def first_pick(proxy: ProxyCore, client: tuple[str, int] | None, now: float = 0.0) -> str:
    _, outputs = proxy.accept(now, client)
    (connect,) = [output for output in outputs if isinstance(output, ConnectBackend)]
    return connect.backend.address


@pytest.mark.parametrize("algorithm", ["maglev", "ring_hash"])
def test_two_cores_with_the_same_backends_send_each_client_alike(algorithm: str) -> None:
    one, other = core(algorithm), ProxyCore(core(algorithm).config, random.Random(99))
    clients = [(f"203.0.113.{i}", 40_000 + i) for i in range(200)]
    picks = [first_pick(one, client) for client in clients]
    assert picks == [first_pick(other, client) for client in clients]
    assert len(set(picks)) == 6  # spread over the fleet
    # By address: the same client from another port keeps its backend.
    assert [first_pick(one, (host, 1)) for host, _ in clients] == picks


def test_hash_key_address_port_spreads_one_clients_connections() -> None:
    proxy = core("maglev", hash_key="address_port")
    picks = {first_pick(proxy, ("203.0.113.9", port)) for port in range(40_000, 40_100)}
    assert len(picks) == 6


def test_a_refused_connect_is_retried_on_the_clients_next_backend() -> None:
    proxy = core("maglev")
    cid, _ = proxy.accept(0.0, ("203.0.113.7", 5_000))
    first = first_pick(core("maglev"), ("203.0.113.7", 5_000))
    retry = [o for o in proxy.connect_failed(cid, 1, 0.1) if isinstance(o, ConnectBackend)]
    assert retry and retry[0].backend.address != first
    expected = MaglevTable(fleet(6)).lookup(hash_key("203.0.113.7"), exclude={first})
    assert expected is not None
    assert retry[0].backend.address == expected.address


def test_without_a_client_address_a_hashing_balancer_still_picks() -> None:
    proxy = core("ring_hash")
    assert len({first_pick(proxy, None) for _ in range(60)}) > 1


def test_a_reload_of_the_table_size_builds_a_new_balancer() -> None:
    proxy = core("maglev")
    balancer = proxy.balancer
    assert isinstance(balancer, Maglev) and balancer.table_size == 65_537
    new = parse_config(
        {
            "balancer": {"algorithm": "maglev", "maglev_table_size": 251},
            "backends": [{"address": backend.address} for backend in fleet(6)],
        }
    )
    proxy.reconfigure(new, 1.0)
    assert isinstance(proxy.balancer, Maglev) and proxy.balancer.table_size == 251
    proxy.reconfigure(
        parse_config({**new_document(), "balancer": {"algorithm": "ring_hash", "ring_points": 7}}),
        2.0,
    )
    assert isinstance(proxy.balancer, RingHash) and proxy.balancer.points == 7


def new_document() -> dict[str, object]:
    return {"backends": [{"address": backend.address} for backend in fleet(6)]}


def test_a_flapping_backend_finds_its_tables_built() -> None:
    balancer = Maglev(random.Random(0))
    full, short = tuple(fleet(3)), tuple(fleet(3)[:2])
    for version in range(1, 7):
        snapshot = Snapshot(version=version, backends=full if version % 2 else short)
        balancer.pick_for(KEYS[0], snapshot, lambda address: 0)
    assert len(balancer._tables) == 2


@pytest.mark.parametrize(
    ("balancer", "message"),
    [
        ({"maglev_table_size": 65_536}, "balancer.maglev_table_size: 65536 must be a prime number"),
        ({"maglev_table_size": 2}, "balancer.maglev_table_size: 2 must be >= 3"),
        ({"ring_points": 0}, "balancer.ring_points: 0 must be >= 1"),
        ({"hash_key": "port"}, "balancer.hash_key: 'port' is not one of address, address_port"),
    ],
)
def test_each_bad_hashing_key_is_one_line(balancer: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"balancer": balancer, "backends": [{"address": "10.4.0.1:80"}]})
    assert any(line.startswith(message) for line in caught.value.errors), caught.value.errors


def test_the_figures_are_what_the_properties_say() -> None:
    for row in figures():
        cells = [cell.strip(" %") for cell in row.split("|")[1:-1]]
        minimal, maglev, ring = (float(cell) for cell in cells[2:5])
        assert minimal <= maglev <= minimal * 1.6
        # The ring moves exactly the leaver's share: 1/N give or take its spread.
        assert minimal * 0.7 <= ring <= minimal * 1.3
        low, high = (float(value) for value in cells[5].split("-"))
        assert 0.99 <= low <= 1.0 <= high <= 1.01  # Maglev: within one slot of even
