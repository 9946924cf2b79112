"""Outlier ejection (``[outlier]``, Envoy's outlier detection for L4) and redispatch."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loble.core import (
    AdminInput,
    BackendEjected,
    BackendReturned,
    ConfigError,
    ConnectBackend,
    ConnectionClosed,
    ConnectRedispatched,
    FirstByteTimeout,
    HealthInput,
    HealthReport,
    HealthState,
    OutlierConfig,
    Output,
    PanicChanged,
    ProbeBackend,
    ProxyCore,
    SnapshotPublished,
    parse_config,
)
from loble.core._connection import TRANSITIONS, ConnInput, ConnState
from loble.core._outlier import OutlierDetector, run_reason

FLEET = [f"10.8.0.{i}:80" for i in range(1, 6)]


def config(backends: list[str] | None = None, **outlier: Any) -> Any:
    document: dict[str, Any] = {
        "outlier": outlier,
        "backends": [{"address": a} for a in backends or FLEET],
    }
    return parse_config(document)


def core(backends: list[str] | None = None, **outlier: Any) -> ProxyCore:
    proxy = ProxyCore(config(backends, **outlier), random.Random(1))
    proxy.start(0.0)
    return proxy


def of(kind: type, outputs: list[Output] | None) -> list[Any]:
    return [output for output in outputs or () if isinstance(output, kind)]


def open_stream(proxy: ProxyCore, now: float) -> tuple[int, str, list[Output]]:
    """Accept a client and connect it; its connection id, backend, outputs."""
    connection_id, outputs = proxy.accept(now)
    (connect,) = of(ConnectBackend, outputs)
    more = proxy.connected(connection_id, connect.attempt, now)
    assert more is not None
    return connection_id, connect.backend.address, outputs + more


def end_stream(proxy: ProxyCore, connection_id: int, reset: bool, now: float) -> list[Output]:
    if reset:
        return proxy.backend_error(connection_id, now)
    return proxy.client_eof(connection_id, now) + proxy.backend_eof(connection_id, now)


def traffic(proxy: ProxyCore, start: float, count: int, resets: dict[str, int]) -> list[Output]:
    """``count`` streams spread over [start, start + 1): the n-th stream of a
    backend in ``resets`` ends in its reset when n is a multiple of the value."""
    outputs: list[Output] = []
    seen: dict[str, int] = {}
    for index in range(count):
        now = start + index / count
        connection_id, address, opened = open_stream(proxy, now)
        outputs += opened
        seen[address] = seen.get(address, 0) + 1
        every = resets.get(address)
        outputs += end_stream(proxy, connection_id, bool(every) and seen[address] % every == 0, now)
    return outputs


# -- the configuration ------------------------------------------------------------


def test_off_by_default() -> None:
    outlier = parse_config({"backends": [{"address": "10.0.0.1:80"}]}).outlier
    assert outlier == OutlierConfig()
    assert not outlier.detecting
    assert (outlier.interval, outlier.base_ejection_time, outlier.max_ejection_time) == (
        10.0,
        30.0,
        300.0,
    )
    assert outlier.max_ejection_percent == 10
    assert not outlier.redispatch_pending


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("consecutive_resets", -1, "outlier.consecutive_resets: -1 must be >= 0"),
        ("consecutive_resets", 1.5, "outlier.consecutive_resets: 1.5 is not an integer"),
        ("failure_rate", 1.5, "outlier.failure_rate: 1.5 must be from 0 to 1"),
        ("failure_rate", "10%", "outlier.failure_rate: '10%' is not a number"),
        ("minimum_connections", 0, "outlier.minimum_connections: 0 must be >= 1"),
        ("interval", 0, "outlier.interval: 0 must be at least 0.001 seconds"),
        ("base_ejection_time", -3, "outlier.base_ejection_time: -3 must be at least 0.001 seconds"),
        ("max_ejection_time", "5m", "outlier.max_ejection_time: '5m' is not a number of seconds"),
        ("max_ejection_percent", 0, "outlier.max_ejection_percent: 0 must be >= 1"),
        ("max_ejection_percent", 101, "outlier.max_ejection_percent: 101 must be <= 100"),
        ("redispatch_pending", 1, "outlier.redispatch_pending: 1 is not true or false"),
        ("first_byte_timeout", -1, "outlier.first_byte_timeout: -1 must be at least 0.0 seconds"),
        ("consecutive_reset", 3, "outlier.consecutive_reset: unknown key; did you mean"),
    ],
)
def test_a_bad_key_is_one_line_naming_it(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config(**{key: value})
    (line,) = raised.value.errors
    assert line.startswith(message)
    assert "\n" not in line


def test_the_longest_ejection_is_not_shorter_than_the_first() -> None:
    with pytest.raises(ConfigError) as raised:
        config(base_ejection_time=60, max_ejection_time=30)
    assert raised.value.errors == [
        "outlier.max_ejection_time: 30.0 is shorter than outlier.base_ejection_time (60.0)"
    ]


def test_the_section_must_be_a_table() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"outlier": 3, "backends": [{"address": "10.0.0.1:80"}]})
    assert raised.value.errors == ["outlier: 3 is not a table"]


# -- the detector alone -------------------------------------------------------------------


def detector(**keys: Any) -> OutlierDetector:
    found = OutlierDetector(config(**keys).outlier, fleet=10)
    found.start(0.0)
    return found


def test_consecutive_resets_eject_and_a_success_breaks_the_run() -> None:
    outlier = detector(consecutive_resets=3)
    assert outlier.record("a", True, 1.0) is None
    assert outlier.record("a", True, 1.0) is None
    assert outlier.record("a", False, 1.0) is None  # the run starts again
    assert outlier.record("a", True, 2.0) is None
    assert outlier.record("a", True, 2.0) is None
    ejection = outlier.record("a", True, 2.0)
    assert ejection is not None
    assert (ejection.address, ejection.until, ejection.ejections) == ("a", 32.0, 1)
    assert ejection.reason == "3 consecutive resets"
    assert outlier.record("a", True, 3.0) is None  # ejected: not counted
    assert outlier.deadline == 10.0  # the interval's tick comes before the return


def test_the_nth_ejection_lasts_n_times_the_base_up_to_the_cap() -> None:
    outlier = detector(consecutive_resets=1, base_ejection_time=30, max_ejection_time=100)
    now = 0.0
    lengths = []
    for _ in range(5):
        ejection = outlier.record("a", True, now)
        assert ejection is not None
        lengths.append(ejection.until - now)
        now = ejection.until
        assert outlier.due(now) == ["a"]
    assert lengths == [30.0, 60.0, 90.0, 100.0, 100.0]


def test_each_interval_back_and_behaving_takes_one_ejection_off() -> None:
    outlier = detector(consecutive_resets=1, interval=10, base_ejection_time=5)
    for now in (0.0, 5.0):
        ejection = outlier.record("a", True, now)
        assert ejection is not None
        outlier.due(ejection.until)
    assert outlier.tallies["a"].ejections == 2  # back at 15 from its second (10 s)
    outlier.tick(20.0, ["a"])  # 5 s after the return: not a full interval yet
    assert outlier.tallies["a"].ejections == 2
    outlier.tick(30.0, ["a"])
    assert outlier.tallies["a"].ejections == 1
    outlier.tick(40.0, ["a"])
    outlier.tick(50.0, ["a"])
    assert outlier.tallies["a"].ejections == 0
    ejection = outlier.record("a", True, 51.0)
    assert ejection is not None and ejection.until == 56.0  # the base again


def test_a_verdict_by_rate_needs_the_minimum_and_the_share() -> None:
    outlier = detector(failure_rate=0.5, minimum_connections=4)
    for failed in (True, True, False):
        outlier.record("few", failed, 1.0)  # 67% of 3: too few to say
    for failed in (True, False, False, False):
        outlier.record("fine", failed, 1.0)  # 25% of 4
    for failed in (True, True, False, False):
        outlier.record("bad", failed, 1.0)  # 50% of 4: at the share
    (ejection,) = outlier.tick(10.0, ["few", "fine", "bad"])
    assert ejection.address == "bad"
    assert ejection.reason == "failure rate 50% of 4 connections in 10 s >= 50%"
    assert outlier.next_tick == 20.0
    assert outlier.tallies["few"].judged == 0  # a fresh window


def test_the_worst_goes_first_when_there_is_room_for_one() -> None:
    outlier = OutlierDetector(config(failure_rate=0.1, minimum_connections=1).outlier, fleet=3)
    outlier.start(0.0)
    for address, failures in (("a", 2), ("b", 3), ("c", 3)):
        for index in range(4):
            outlier.record(address, index < failures, 1.0)
    (ejection,) = outlier.tick(10.0, ["c", "b", "a"])  # b and c tie: config order
    assert ejection.address == "c"


def test_a_late_tick_skips_the_lost_intervals() -> None:
    outlier = detector(failure_rate=0.5, interval=10)
    outlier.tick(47.0, [])
    assert outlier.next_tick == 57.0


def test_the_cap_rounds_down_but_allows_one() -> None:
    for fleet, percent, room in ((5, 10, 1), (25, 10, 2), (100, 10, 10), (3, 100, 3), (1, 10, 1)):
        outlier = OutlierDetector(OutlierConfig(max_ejection_percent=percent), fleet=fleet)
        assert outlier.room == room, (fleet, percent)


def test_no_room_means_no_ejection_until_there_is() -> None:
    outlier = OutlierDetector(OutlierConfig(consecutive_resets=1), fleet=5)
    outlier.start(0.0)
    assert outlier.record("a", True, 0.0) is not None
    assert outlier.record("b", True, 1.0) is None  # one of five is the most
    assert outlier.due(30.0) == ["a"]
    ejection = outlier.record("b", True, 31.0)  # still in its run: ejected now
    assert ejection is not None and ejection.address == "b"


def test_forgetting_an_ejected_backend_drops_its_return() -> None:
    outlier = detector(consecutive_resets=1)
    outlier.configure(OutlierConfig(consecutive_resets=0), 0.5)  # no tick any more
    outlier.configure(OutlierConfig(consecutive_resets=1), 0.5)
    assert outlier.record("a", True, 1.0) is not None
    outlier.configure(OutlierConfig(), 2.0)  # off: the ejection keeps its time
    assert outlier.deadline == 31.0
    outlier.forget("a")
    assert outlier.deadline is None
    assert outlier.due(31.0) == []


# -- in the core: ejected and back -------------------------------------------------------


def rate_core(**keys: Any) -> ProxyCore:
    settings: dict[str, Any] = {
        "failure_rate": 0.1,
        "minimum_connections": 10,
        "interval": 10,
        "base_ejection_time": 30,
        "max_ejection_time": 300,
        **keys,
    }
    return core(**settings)


BAD = FLEET[2]


def test_a_backend_resetting_a_fifth_of_its_streams_is_ejected_and_back_twice_as_late() -> None:
    proxy = rate_core()
    lengths = []
    now = 0.0
    for _ in range(3):
        # Within one interval of being in rotation, it is judged and ejected.
        outputs = traffic(proxy, now + 1.0, 100, {BAD: 5})  # 4 resets in its 20
        assert not of(BackendEjected, outputs)
        tick = proxy.next_deadline()
        assert tick is not None and tick <= now + 10.0
        outputs = proxy.handle_timer(tick)
        (ejected,) = of(BackendEjected, outputs)
        assert ejected.address == BAD
        assert ejected.reason.startswith("failure rate 20% of 20 connections")
        assert isinstance(outputs[-1], SnapshotPublished)
        assert BAD not in proxy.snapshot.addresses
        assert proxy.control.state(BAD) is HealthState.HEALTHY  # not unhealthy: ejected
        assert proxy.statistics().backends[2].ejected_until == ejected.until
        lengths.append((ejected.ejections, ejected.until - tick))
        # While it is out, nobody is sent to it; the ticks judge nobody.
        while (due := proxy.next_deadline()) is not None and due < ejected.until:
            outputs = traffic(proxy, due, 40, {})
            assert BAD not in {c.backend.address for c in of(ConnectBackend, outputs)}
            assert not of(BackendEjected, proxy.handle_timer(due))
        outputs = proxy.handle_timer(ejected.until)
        assert of(BackendReturned, outputs) == [BackendReturned(at=ejected.until, address=BAD)]
        assert BAD in proxy.snapshot.addresses
        now = ejected.until
    assert lengths == [(1, 30.0), (2, 60.0), (3, 90.0)]


def test_the_ejection_time_is_capped() -> None:
    proxy = rate_core(max_ejection_time=45)
    lengths = []
    now = 0.0
    for _ in range(3):
        traffic(proxy, now + 1.0, 100, {BAD: 5})
        tick = proxy.next_deadline()
        assert tick is not None
        (ejected,) = of(BackendEjected, proxy.handle_timer(tick))
        lengths.append(ejected.until - tick)
        proxy.handle_timer(ejected.until)
        now = ejected.until
    assert lengths == [30.0, 45.0, 45.0]


def test_an_ejected_backend_keeps_its_connections_and_probes_do_not_bring_it_back() -> None:
    proxy = core(consecutive_resets=2, base_ejection_time=30)
    held = []
    for _ in range(len(FLEET) * 3):
        connection_id, address, _ = open_stream(proxy, 1.0)
        if address == BAD:
            held.append(connection_id)
    first, second, kept = held
    proxy.backend_error(first, 2.0)
    assert of(BackendEjected, proxy.backend_error(second, 2.0))
    assert BAD not in proxy.snapshot.addresses
    assert kept in proxy.connections  # left alone, as draining does
    assert proxy.probe_result(BAD, True, 3.0) == []  # no probe was out: ignored anyway
    proxy.control.apply(BAD, HealthInput.PROBE_SUCCESS, 3.0)
    assert BAD not in proxy.snapshot.addresses
    # Its running connection ending in a reset tells of the time before.
    assert not of(BackendEjected, proxy.backend_error(kept, 4.0))
    assert proxy.outlier.tallies[BAD].resets_in_a_row == 0


def test_the_ejection_follows_the_close_that_caused_it() -> None:
    proxy = core(consecutive_resets=1)
    connection_id, address, _ = open_stream(proxy, 1.0)
    outputs = proxy.backend_error(connection_id, 2.0)
    names = [type(o).__name__ for o in outputs if not isinstance(o, HealthReport)]
    assert names == ["CloseConnection", "ConnectionClosed", "BackendEjected", "SnapshotPublished"]
    (ejected,) = of(BackendEjected, outputs)
    assert ejected == BackendEjected(
        at=2.0, address=address, until=32.0, reason="1 consecutive resets", ejections=1
    )


def test_only_resets_and_completions_are_verdicts() -> None:
    proxy = core(consecutive_resets=1)
    for end in ("client_error", "idle", "cut"):
        connection_id, _address, _ = open_stream(proxy, 1.0)
        if end == "client_error":
            outputs = proxy.client_error(connection_id, 1.5)
        elif end == "idle":
            outputs = proxy.handle_timer(1.0 + proxy.config.timeouts.idle)
        else:
            outputs = proxy.resource_exhausted(connection_id, 1.5)
        assert of(ConnectionClosed, outputs)
        assert not of(BackendEjected, outputs)
    assert all(tally.judged == 0 for tally in proxy.outlier.tallies.values())


def test_never_the_last_backend_in_rotation() -> None:
    proxy = core([FLEET[0]], consecutive_resets=1, max_ejection_percent=100)
    connection_id, _, _ = open_stream(proxy, 1.0)
    assert not of(BackendEjected, proxy.backend_error(connection_id, 1.0))
    assert proxy.snapshot.addresses == (FLEET[0],)


def test_a_backup_takes_over_from_an_ejected_primary() -> None:
    document = {
        "outlier": {"consecutive_resets": 1, "max_ejection_percent": 100},
        "backends": [{"address": FLEET[0]}, {"address": FLEET[1], "backup": True}],
    }
    proxy = ProxyCore(parse_config(document), random.Random(1))
    proxy.start(0.0)
    connection_id, _, _ = open_stream(proxy, 1.0)
    assert of(BackendEjected, proxy.backend_error(connection_id, 1.0))
    assert proxy.snapshot.addresses == (FLEET[1],)


def test_an_ejected_backend_counts_as_down_for_panic() -> None:
    document = {
        "balancer": {"panic_threshold": 0.9},
        "outlier": {"consecutive_resets": 1, "max_ejection_percent": 50},
        "backends": [{"address": a} for a in FLEET[:2]],
    }
    proxy = ProxyCore(parse_config(document), random.Random(1))
    proxy.start(0.0)
    connection_id, address, _ = open_stream(proxy, 1.0)
    outputs = proxy.backend_error(connection_id, 1.0)
    (panic,) = of(PanicChanged, outputs)
    assert (panic.panic, panic.healthy, panic.total) == (True, 1, 2)
    assert address in proxy.snapshot.addresses  # in panic, all of them take connections


# -- never more than max_ejection_percent --------------------------------------------------


@given(
    st.integers(min_value=1, max_value=25),
    st.integers(min_value=1, max_value=100),
    st.integers(min_value=1, max_value=3),
    st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=25, max_size=25),
    st.integers(min_value=0, max_value=2**32),
)
def test_never_more_than_max_ejection_percent_at_once(
    size: int, percent: int, consecutive: int, reset_shares: list[float], seed: int
) -> None:
    backends = [f"10.8.1.{i}:80" for i in range(1, size + 1)]
    proxy = core(
        backends,
        consecutive_resets=consecutive,
        failure_rate=0.2,
        minimum_connections=3,
        interval=1.0,
        base_ejection_time=2.0,
        max_ejection_percent=percent,
    )
    allowed = max(1, size * percent // 100)
    shares = dict(zip(backends, reset_shares, strict=False))
    draw = random.Random(seed)
    now = 0.0
    for _ in range(300):
        now += draw.expovariate(30.0)
        due = proxy.next_deadline()
        if due is not None and due <= now:
            proxy.handle_timer(now)
        connection_id, outputs = proxy.accept(now)
        connects = of(ConnectBackend, outputs)
        if connects:
            (connect,) = connects
            proxy.connected(connection_id, connect.attempt, now)
            reset = draw.random() < shares[connect.backend.address]
            end_stream(proxy, connection_id, reset, now)
        ejected = proxy.control.ejected
        assert len(ejected) <= allowed
        assert proxy.snapshot.addresses  # never the last
        assert not set(ejected) & set(proxy.snapshot.addresses)
        assert set(proxy.outlier.ejected) == set(ejected)


# -- reloads -----------------------------------------------------------------------------------


def test_a_reload_switches_it_on_for_what_follows() -> None:
    proxy = core()
    assert proxy.next_deadline() is None
    connection_id, _, _ = open_stream(proxy, 1.0)
    assert not of(BackendEjected, proxy.backend_error(connection_id, 1.0))
    outputs = proxy.reconfigure(config(consecutive_resets=1, interval=5), 2.0)
    assert "outlier.consecutive_resets" in outputs[0].changed  # type: ignore[union-attr]
    assert proxy.next_deadline() == 7.0
    connection_id, _, _ = open_stream(proxy, 3.0)
    assert of(BackendEjected, proxy.backend_error(connection_id, 3.0))


def test_a_reload_that_removes_an_ejected_backend_forgets_it() -> None:
    proxy = core(consecutive_resets=1)
    connection_id, address, _ = open_stream(proxy, 1.0)
    proxy.backend_error(connection_id, 1.0)
    assert address in proxy.control.ejected
    proxy.reconfigure(config([a for a in FLEET if a != address], consecutive_resets=1), 2.0)
    assert address not in proxy.control.ejected
    assert address not in proxy.outlier.tallies
    assert proxy.outlier.fleet == len(FLEET) - 1
    for tick in (10.0, 20.0, 31.0):
        assert not of(BackendReturned, proxy.handle_timer(tick))


def test_a_removed_backends_last_connections_are_no_verdict() -> None:
    proxy = core(consecutive_resets=1)
    held = {}
    for _ in range(len(FLEET)):
        connection_id, address, _ = open_stream(proxy, 1.0)
        held[address] = connection_id
    proxy.reconfigure(config(FLEET[1:], consecutive_resets=1), 2.0)
    assert FLEET[0] in proxy.control.removing
    assert not of(BackendEjected, proxy.backend_error(held[FLEET[0]], 3.0))


def test_switched_off_the_ejected_stay_out_for_their_time() -> None:
    proxy = core(consecutive_resets=1)
    connection_id, address, _ = open_stream(proxy, 1.0)
    proxy.backend_error(connection_id, 1.0)
    proxy.reconfigure(config(), 2.0)
    assert proxy.next_deadline() == 31.0
    assert of(BackendReturned, proxy.handle_timer(31.0)) == [
        BackendReturned(at=31.0, address=address)
    ]
    assert proxy.next_deadline() is None


# -- the timer lead ---------------------------------------------------------------------------


def test_the_lead_covers_an_ejections_return() -> None:
    proxy = core(consecutive_resets=1, base_ejection_time=0.5, interval=60)
    lead = proxy.timer_lead()
    assert lead == 0.5
    connection_id, _, _ = open_stream(proxy, 1.0)
    proxy.backend_error(connection_id, 1.0)
    due = proxy.next_deadline()
    assert due is not None and due >= 1.0 + lead
    assert core().timer_lead() == core(interval=0.01).timer_lead()  # off: unchanged


# -- redispatch ------------------------------------------------------------------------------


def pending_on(proxy: ProxyCore, address: str, count: int, now: float) -> list[int]:
    """Open connections until ``count`` are connecting to ``address`` (the others connect)."""
    held = []
    while len(held) < count:
        connection_id, outputs = proxy.accept(now)
        (connect,) = of(ConnectBackend, outputs)
        if connect.backend.address == address:
            held.append(connection_id)
        else:
            proxy.connected(connection_id, connect.attempt, now)
    return held


def test_connects_pending_on_a_backend_health_takes_out_move_at_once() -> None:
    document = {
        "health": {"failure_threshold": 1},
        "outlier": {"redispatch_pending": True},
        "backends": [{"address": a} for a in FLEET],
    }
    proxy = ProxyCore(parse_config(document), random.Random(1))
    proxy.start(0.0)
    first, second, third = pending_on(proxy, BAD, 3, 1.0)
    outputs = proxy.connect_failed(first, 1, 2.0)
    moved = of(ConnectRedispatched, outputs)
    assert moved == [
        ConnectRedispatched(at=2.0, connection_id=second, attempt=1, backend=BAD),
        ConnectRedispatched(at=2.0, connection_id=third, attempt=1, backend=BAD),
    ]
    connects = {c.connection_id: c for c in of(ConnectBackend, outputs)}
    for connection_id in (first, second, third):
        assert connects[connection_id].attempt == 2
        assert connects[connection_id].backend.address != BAD
    # No verdict on the bad backend for the attempts given up: only their finish.
    reports = [o.input for o in of(HealthReport, outputs) if o.address == BAD]
    assert reports.count(HealthInput.PASSIVE_FAILURE) == 1  # the first's own
    assert reports.count(HealthInput.CONNECTION_FINISHED) == 3
    # The old attempt's answer is stale now.
    assert proxy.connected(second, 1, 2.5) is None
    assert proxy.connected(second, 2, 2.5) is not None
    connection = proxy.connections[second]
    assert connection.tried == (BAD,)


def test_a_blackholed_backend_costs_one_timeout_not_one_per_client() -> None:
    document = {
        "health": {"failure_threshold": 1},
        "timeouts": {"connect": 10},
        "outlier": {"redispatch_pending": True},
        "backends": [{"address": a} for a in FLEET],
    }
    proxy = ProxyCore(parse_config(document), random.Random(1))
    proxy.start(0.0)
    held = pending_on(proxy, BAD, 1, 0.0) + pending_on(proxy, BAD, 3, 5.0)
    outputs = proxy.handle_timer(10.0)  # the first one's connect timeout
    moved = {o.connection_id for o in of(ConnectRedispatched, outputs)}
    assert moved == set(held[1:])  # the later three waited 5 s, not 10


def test_redispatch_keeps_within_connect_retries() -> None:
    document = {
        "balancer": {"connect_retries": 1},
        "health": {"failure_threshold": 1},
        "outlier": {"redispatch_pending": True},
        "backends": [{"address": a} for a in FLEET],
    }
    proxy = ProxyCore(parse_config(document), random.Random(1))
    proxy.start(0.0)
    first, second = pending_on(proxy, FLEET[0], 2, 1.0)
    outputs = proxy.connect_failed(first, 1, 2.0)
    (moved,) = of(ConnectRedispatched, outputs)
    assert moved.connection_id == second
    (connect,) = [c for c in of(ConnectBackend, outputs) if c.connection_id == second]
    # Its second attempt's backend is judged bad too: no retry left, it waits.
    third = pending_on(proxy, connect.backend.address, 1, 2.0)[0]
    outputs = proxy.connect_failed(third, 1, 3.0)
    assert second not in {o.connection_id for o in of(ConnectRedispatched, outputs)}
    assert proxy.connections[second].attempt == 2
    assert proxy.connected(second, 2, 3.5) is not None


def test_with_nowhere_else_to_go_the_connect_waits() -> None:
    document = {
        "health": {"failure_threshold": 1},
        "outlier": {"redispatch_pending": True},
        "backends": [{"address": a} for a in FLEET[:2]],
    }
    proxy = ProxyCore(parse_config(document), random.Random(1))
    proxy.start(0.0)
    first, second = pending_on(proxy, FLEET[0], 2, 1.0)
    proxy.admin(FLEET[1], AdminInput.DRAIN, 1.0)
    outputs = proxy.connect_failed(first, 1, 2.0)
    assert not of(ConnectRedispatched, outputs)
    assert proxy.connections[second].attempt == 1


def test_without_the_key_pending_connects_wait_as_before() -> None:
    document = {"health": {"failure_threshold": 1}, "backends": [{"address": a} for a in FLEET]}
    proxy = ProxyCore(parse_config(document), random.Random(1))
    proxy.start(0.0)
    first, second = pending_on(proxy, BAD, 2, 1.0)
    outputs = proxy.connect_failed(first, 1, 2.0)
    assert not of(ConnectRedispatched, outputs)
    assert proxy.connections[second].attempt == 1
    assert proxy.control.judged_bad == []


def test_connects_pending_on_an_ejected_backend_move() -> None:
    proxy = core(consecutive_resets=1, redispatch_pending=True)
    connection_id, address, _ = open_stream(proxy, 1.0)
    (waiting,) = pending_on(proxy, address, 1, 1.0)
    outputs = proxy.backend_error(connection_id, 2.0)
    assert of(BackendEjected, outputs)
    assert of(ConnectRedispatched, outputs)[0].connection_id == waiting
    assert proxy.connections[waiting].backend.address != address  # type: ignore[union-attr]


def test_a_failed_probe_that_takes_a_backend_out_moves_its_pending_connects() -> None:
    document = {
        "health": {
            "failure_threshold": 1,
            "active": True,
            "probe_interval": 1.0,
            "probe_timeout": 0.5,
        },
        "outlier": {"redispatch_pending": True},
        "backends": [{"address": a} for a in FLEET],
    }
    proxy = ProxyCore(parse_config(document), random.Random(1))
    proxy.start(0.0)
    (waiting,) = pending_on(proxy, BAD, 1, 0.5)
    assert BAD in {p.backend.address for p in of(ProbeBackend, proxy.handle_timer(1.0))}
    outputs = proxy.probe_result(BAD, False, 1.2)
    assert of(ConnectRedispatched, outputs)[0].connection_id == waiting


def test_in_panic_a_backend_judged_bad_stays_and_so_do_its_connects() -> None:
    document = {
        "balancer": {"panic_threshold": 1.0},
        "health": {"failure_threshold": 1},
        "outlier": {"redispatch_pending": True},
        "backends": [{"address": a} for a in FLEET],
    }
    proxy = ProxyCore(parse_config(document), random.Random(1))
    proxy.start(0.0)
    first, _second = pending_on(proxy, BAD, 2, 1.0)
    outputs = proxy.connect_failed(first, 1, 2.0)
    assert BAD in proxy.snapshot.addresses
    assert not of(ConnectRedispatched, outputs)


def test_the_redispatch_row() -> None:
    assert (ConnState.CONNECTING, ConnInput.REDISPATCH) in TRANSITIONS
    assert all(
        (state, ConnInput.REDISPATCH) not in TRANSITIONS
        for state in ConnState
        if state is not ConnState.CONNECTING
    )


# -- the first-byte timeout --------------------------------------------------------------------


def test_a_silent_backend_is_a_failure_once() -> None:
    proxy = core(first_byte_timeout=2, consecutive_resets=2)
    assert proxy.watches_first_byte
    assert proxy.timer_lead() == 2.0
    silent, address, _ = open_stream(proxy, 1.0)
    proxy.client_sent(silent, 1.5)
    proxy.client_sent(silent, 1.9)  # only the first counts
    assert proxy.next_deadline() == 3.5
    # One failure of two: said, and nothing more yet.
    assert proxy.handle_timer(3.5) == [
        FirstByteTimeout(at=3.5, connection_id=silent, backend=address)
    ]
    assert proxy.outlier.tallies[address].resets_in_a_row == 1
    assert silent in proxy.connections  # left alone
    proxy.backend_sent(silent, 4.0)  # late: the verdict stands
    assert not of(BackendEjected, end_stream(proxy, silent, True, 5.0))  # no second verdict
    assert proxy.outlier.tallies[address].resets_in_a_row == 1


def test_a_backend_that_answers_or_speaks_first_is_no_failure() -> None:
    proxy = core(first_byte_timeout=2, consecutive_resets=1)
    answered, first_address, _ = open_stream(proxy, 1.0)
    proxy.client_sent(answered, 1.0)
    proxy.backend_sent(answered, 2.0)
    greeting, _, _ = open_stream(proxy, 1.0)
    proxy.backend_sent(greeting, 1.0)  # SMTP, MySQL: the server speaks first
    proxy.client_sent(greeting, 1.5)
    closed, _, _ = open_stream(proxy, 1.0)
    proxy.client_sent(closed, 1.0)
    proxy.backend_eof(closed, 1.5)  # an EOF is an answer too
    assert not of(BackendEjected, proxy.handle_timer(10.0))
    assert proxy.outlier.tallies.get(first_address) is None
    ended, _, _ = open_stream(proxy, 1.0)
    proxy.client_sent(ended, 1.0)
    end_stream(proxy, ended, False, 1.5)
    assert proxy.handle_timer(20.0) == []
    assert proxy._first_byte_due == {}
    assert proxy._first_byte_seen == {answered, greeting, closed}  # open: kept until they end


def test_a_silent_backend_can_be_ejected_by_it() -> None:
    proxy = core(first_byte_timeout=1, consecutive_resets=1)
    silent, address, _ = open_stream(proxy, 1.0)
    proxy.client_sent(silent, 1.0)
    outputs = proxy.handle_timer(2.0)
    (ejected,) = of(BackendEjected, outputs)
    assert ejected.address == address
    assert ejected.reason == "1 consecutive first-byte timeouts"
    assert outputs.index(of(FirstByteTimeout, outputs)[0]) < outputs.index(ejected)
    assert not of(BackendEjected, end_stream(proxy, silent, True, 3.0))


def test_without_the_timeout_the_reports_do_nothing() -> None:
    proxy = core()
    assert not proxy.watches_first_byte
    connection_id, _, _ = open_stream(proxy, 1.0)
    proxy.client_sent(connection_id, 1.0)
    proxy.backend_sent(connection_id, 1.0)
    proxy.client_sent(999, 1.0)
    assert proxy._first_byte_heap == [] and proxy._first_byte_seen == set()


def test_a_shutdown_cut_and_a_reload_clear_the_watches() -> None:
    proxy = core(first_byte_timeout=5)
    connection_id, _, _ = open_stream(proxy, 1.0)
    proxy.client_sent(connection_id, 1.0)
    proxy.client_sent(12345, 1.0)  # unknown: nothing
    other, _, _ = open_stream(proxy, 1.0)
    proxy.backend_sent(other, 1.0)
    proxy.reconfigure(config(), 2.0)
    assert proxy._first_byte_due == {} and proxy._first_byte_heap == []
    proxy.reconfigure(config(first_byte_timeout=5), 2.0)
    proxy.client_sent(connection_id, 2.0)
    proxy.shutdown(2.0)
    proxy.shutdown(2.0)  # a second one cuts at once
    assert proxy._first_byte_due == {}


# -- the drivers' promise: no call files a timer sooner than timer_lead ------------------------


@given(st.integers(min_value=0, max_value=2**32), st.booleans())
def test_no_call_but_handle_timer_brings_the_next_deadline_inside_the_lead(
    seed: int, redispatch: bool
) -> None:
    document = {
        "timeouts": {"connect": 0.5},
        "health": {"failure_threshold": 1, "probe_interval": 0.6, "probe_timeout": 0.1},
        "outlier": {
            "consecutive_resets": 2,
            "failure_rate": 0.2,
            "minimum_connections": 3,
            "interval": 0.25,
            "base_ejection_time": 0.4,
            "first_byte_timeout": 0.3,
            "max_ejection_percent": 50,
            "redispatch_pending": redispatch,
        },
        "backends": [{"address": a} for a in FLEET],
    }
    proxy = ProxyCore(parse_config(document), random.Random(seed))
    proxy.start(0.0)
    lead = proxy.timer_lead(shutdown_possible=False)
    assert lead == 0.3
    draw = random.Random(seed)
    pending: dict[int, int] = {}
    probes: list[str] = []

    def take(outputs: list[Output] | None) -> None:
        for output in outputs or ():
            if isinstance(output, ConnectBackend):
                pending[output.connection_id] = output.attempt
            elif isinstance(output, ProbeBackend):
                probes.append(output.backend.address)

    now = 0.0
    wake = proxy.next_deadline()
    for _ in range(400):
        now += draw.expovariate(40.0)
        if wake is not None and wake <= now:
            take(proxy.handle_timer(now))
            wake = proxy.next_deadline()
            continue
        roll = draw.random()
        open_ids = [c for c in proxy.connections if c not in pending]
        if roll < 0.3:
            take(proxy.accept(now)[1])
        elif roll < 0.55 and pending:
            connection_id = draw.choice(sorted(pending))
            attempt = pending.pop(connection_id)
            if connection_id not in proxy.connections:
                continue
            if draw.random() < 0.3:
                take(proxy.connect_failed(connection_id, attempt, now))
            else:
                take(proxy.connected(connection_id, attempt, now))
        elif roll < 0.85 and open_ids:
            connection_id = draw.choice(open_ids)
            kind = draw.random()
            if kind < 0.3:
                proxy.client_sent(connection_id, now)
            elif kind < 0.45:
                proxy.backend_sent(connection_id, now)
            elif kind < 0.75:
                take(proxy.backend_error(connection_id, now))
            else:
                take(proxy.client_error(connection_id, now))
        elif probes:
            take(proxy.probe_result(probes.pop(0), draw.random() < 0.5, now))
        new = proxy.next_deadline()
        bound = now + lead if wake is None else min(wake, now + lead)
        assert new is None or new >= bound, (new, bound)
        wake = new


def test_a_run_of_resets_and_silences_says_which_made_it() -> None:
    assert run_reason(3, 0) == "3 consecutive resets"
    assert run_reason(2, 2) == "2 consecutive first-byte timeouts"
    assert run_reason(3, 1) == "3 consecutive failures (2 resets, 1 first-byte timeout)"
    proxy = core(first_byte_timeout=1, consecutive_resets=2)
    silent, address, _ = open_stream(proxy, 1.0)
    proxy.client_sent(silent, 1.0)
    proxy.handle_timer(2.0)
    reset, other, _ = open_stream(proxy, 2.0)
    while other != address:  # round robin: the next one on the same backend
        end_stream(proxy, reset, False, 2.0)
        reset, other, _ = open_stream(proxy, 2.0)
    (ejected,) = of(BackendEjected, end_stream(proxy, reset, True, 2.5))
    assert ejected.reason == "2 consecutive failures (1 reset, 1 first-byte timeout)"


def test_two_verdicts_of_one_interval_never_eject_the_last_backend_together() -> None:
    # Both backends fail at the rate, and the cap allows both: the interval's
    # second ejection is weighed with the first, though not applied yet
    # (found by the property above: each used to see the other in rotation).
    pair = ["10.8.2.1:80", "10.8.2.2:80"]
    proxy = core(
        pair, failure_rate=0.5, minimum_connections=2, interval=1.0, max_ejection_percent=100
    )
    assert not of(BackendEjected, traffic(proxy, 0.0, 8, {pair[0]: 1, pair[1]: 1}))
    outputs = proxy.handle_timer(1.0)
    assert [e.address for e in of(BackendEjected, outputs)] == [pair[0]]
    assert proxy.snapshot.addresses == (pair[1],)
