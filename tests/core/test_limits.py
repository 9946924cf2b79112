"""Per-backend ``max_connections`` and the bounded queue, in the core.

HAProxy's server ``maxconn`` and ``timeout queue``: a backend at its limit is
skipped; with every eligible backend at its limit a new client waits, in
arrival order, in a queue of ``queue_size`` for ``queue_timeout``, and is
refused (``queue_full``, ``queue_timeout``) when it cannot wait.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loble.core import (
    AdminInput,
    CloseConnection,
    ConnectBackend,
    ConnectFailed,
    ConnectionClosed,
    ConnectionQueued,
    LobleError,
    MaxConnectionsChanged,
    Outcome,
    Output,
    ProxyCore,
    parse_config,
)

A, B, C = "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"


def document(limits: dict[str, int], **balancer: Any) -> dict[str, Any]:
    return {
        "balancer": {"queue_timeout": 2.0, **balancer},
        "backends": [
            {"address": address, "max_connections": most} if most else {"address": address}
            for address, most in limits.items()
        ],
    }


def core(limits: dict[str, int], **balancer: Any) -> ProxyCore:
    proxy = ProxyCore(parse_config(document(limits, **balancer)), random.Random(1))
    proxy.start(0.0)
    return proxy


def connects(outputs: list[Output]) -> list[tuple[int, str]]:
    return [(o.connection_id, o.backend.address) for o in outputs if isinstance(o, ConnectBackend)]


def closes(outputs: list[Output]) -> list[tuple[int, Outcome]]:
    return [(o.connection_id, o.outcome) for o in outputs if isinstance(o, ConnectionClosed)]


def opened(proxy: ProxyCore, now: float = 0.0) -> tuple[int, str]:
    """A new client that gets a backend; connected at once."""
    cid, outputs = proxy.accept(now)
    ((_, address),) = connects(outputs)
    assert proxy.connected(cid, 1, now) is not None
    return cid, address


def finish(proxy: ProxyCore, cid: int, now: float) -> list[Output]:
    proxy.client_eof(cid, now)
    return proxy.backend_eof(cid, now)


def test_a_backend_at_its_limit_is_skipped() -> None:
    proxy = core({A: 1, B: 0})
    assert opened(proxy)[1] == A
    # Round robin would alternate; A is full, so B takes every new client.
    assert [opened(proxy)[1] for _ in range(4)] == [B] * 4
    assert proxy.control.active_connections(A) == 1


def test_with_every_backend_full_the_client_waits_and_takes_the_first_room() -> None:
    proxy = core({A: 1, B: 1})
    first, _ = opened(proxy)
    opened(proxy)
    cid, outputs = proxy.accept(0.5)
    assert outputs == [ConnectionQueued(at=0.5, connection_id=cid, queued=1, deadline=2.5)]
    assert (proxy.in_flight, proxy.queued, proxy.statistics().queued) == (3, 1, 1)
    # The first client's end makes room on A: the queued one goes there, in
    # the same outputs, after the close that made the room.
    outputs = finish(proxy, first, 1.0)
    assert closes(outputs) == [(first, Outcome.COMPLETED)]
    assert connects(outputs) == [(cid, A)]
    assert outputs.index(closed_event(outputs)) < outputs.index(connect_action(outputs))
    assert proxy.queued == 0
    assert proxy.connected(cid, 1, 1.0) is not None


def closed_event(outputs: list[Output]) -> Output:
    return next(o for o in outputs if isinstance(o, ConnectionClosed))


def connect_action(outputs: list[Output]) -> Output:
    return next(o for o in outputs if isinstance(o, ConnectBackend))


def test_clients_leave_the_queue_in_the_order_they_came() -> None:
    proxy = core({A: 2})
    served = [opened(proxy)[0] for _ in range(2)]
    waiting = [proxy.accept(0.1 * n)[0] for n in range(1, 5)]
    order = []
    for n, cid in enumerate(served + waiting[:2]):
        if cid in waiting:
            assert proxy.connected(cid, 1, 1.0) is not None
        order += [queued for queued, _ in connects(finish(proxy, cid, 1.0 + n / 10))]
    assert order == waiting


def test_a_client_that_waits_its_queue_timeout_is_refused_with_fin() -> None:
    proxy = core({A: 1})
    opened(proxy)
    cid, _ = proxy.accept(1.0)
    assert proxy.next_deadline() == 3.0
    assert proxy.handle_timer(2.999) == []
    outputs = proxy.handle_timer(3.0)
    assert outputs[0] == CloseConnection(
        connection_id=cid, outcome=Outcome.QUEUE_TIMEOUT, reset=False
    )
    closed = closed_event(outputs)
    assert isinstance(closed, ConnectionClosed)
    assert (closed.backend, closed.attempts, closed.opened_at, closed.at) == (None, 0, 1.0, 3.0)
    assert (proxy.in_flight, proxy.queued) == (1, 0)


@pytest.mark.parametrize("size", [0, 1, 3])
def test_beyond_queue_size_clients_are_refused_at_once(size: int) -> None:
    proxy = core({A: 1}, queue_size=size)
    opened(proxy)
    for _ in range(size):
        assert isinstance(proxy.accept(0.0)[1][0], ConnectionQueued)
    cid, outputs = proxy.accept(0.0)
    assert outputs[0] == CloseConnection(connection_id=cid, outcome=Outcome.QUEUE_FULL, reset=False)
    assert proxy.queued == size


def test_with_no_backend_eligible_nobody_queues() -> None:
    proxy = core({A: 1, B: 1})
    proxy.admin(A, AdminInput.MAINTENANCE, 0.0)
    proxy.admin(B, AdminInput.MAINTENANCE, 0.0)
    cid, outputs = proxy.accept(0.0)
    assert closes(outputs) == [(cid, Outcome.NO_BACKEND)]


def test_a_backend_back_in_rotation_takes_the_queue() -> None:
    proxy = core({A: 1, B: 1})
    proxy.admin(B, AdminInput.MAINTENANCE, 0.0)
    opened(proxy)
    cid, _ = proxy.accept(0.0)
    outputs = proxy.admin(B, AdminInput.READY, 0.5)
    assert connects(outputs) == [(cid, B)]


def test_a_reload_that_raises_a_limit_serves_the_queue() -> None:
    proxy = core({A: 1})
    opened(proxy)
    waiting = [proxy.accept(0.0)[0] for _ in range(3)]
    outputs = proxy.reconfigure(parse_config(document({A: 3})), 1.0)
    assert connects(outputs) == [(waiting[0], A), (waiting[1], A)]
    assert proxy.queued == 1
    outputs = proxy.reconfigure(parse_config(document({A: 0})), 2.0)  # no limit at all
    assert connects(outputs) == [(waiting[2], A)]
    assert proxy.statistics().backends[0].max_connections == 0


def test_a_client_that_resets_while_queued_leaves_the_queue() -> None:
    proxy = core({A: 1})
    first, _ = opened(proxy)
    gone = proxy.accept(0.0)[0]
    kept = proxy.accept(0.0)[0]
    assert closes(proxy.client_error(gone, 0.5)) == [(gone, Outcome.CLIENT_RESET)]
    assert proxy.queued == 1
    assert connects(finish(proxy, first, 1.0)) == [(kept, A)]


def test_the_drain_deadline_cuts_the_queue_too() -> None:
    proxy = core({A: 1})
    opened(proxy)
    cid = proxy.accept(0.0)[0]
    proxy.shutdown(1.0)
    outputs = proxy.shutdown(1.5)  # a second request cuts at once
    assert (cid, Outcome.CUT) in closes(outputs)
    assert (proxy.in_flight, proxy.queued) == (0, 0)


def test_a_retry_goes_only_to_a_backend_with_room() -> None:
    proxy = core({A: 0, B: 1})
    opened(proxy)  # A
    opened(proxy)  # B, now full
    cid, outputs = proxy.accept(0.0)
    assert connects(outputs) == [(cid, A)]
    # A refuses; B is full, so the retry has nowhere to go.
    assert closes(proxy.connect_failed(cid, 1, 0.1)) == [(cid, Outcome.CONNECT_FAILED)]


@settings(max_examples=60, deadline=None)
@given(
    limits=st.lists(st.integers(0, 3), min_size=1, max_size=3),
    size=st.integers(0, 4),
    steps=st.lists(
        st.tuples(st.sampled_from(["accept", "end", "fail", "wait"]), st.integers(0, 50)),
        max_size=60,
    ),
)
def test_limits_hold_and_the_queue_is_fifo_and_never_waits_beside_room(
    limits: list[int], size: int, steps: list[tuple[str, int]]
) -> None:
    addresses = [A, B, C][: len(limits)]
    most = dict(zip(addresses, limits, strict=True))
    proxy = core(most, queue_size=size)
    now = 0.0
    queue: list[int] = []
    for action, pick in steps:
        now += 0.25
        if action == "accept":
            cid, outputs = proxy.accept(now)
            if any(isinstance(o, ConnectionQueued) for o in outputs):
                queue.append(cid)
        elif action == "wait":
            outputs = proxy.handle_timer(now)
        else:
            carried = [c for c in proxy.connections.values() if c.backend is not None]
            if not carried:
                continue
            connection = carried[pick % len(carried)]
            cid = connection.connection_id
            if connection.connected_at is not None:
                outputs = proxy.backend_error(cid, now)
            elif action == "fail":
                outputs = proxy.connect_failed(cid, connection.attempt, now)
            else:
                outputs = proxy.connected(cid, connection.attempt, now) or []
        for connection_id, _ in connects(outputs):
            if connection_id in queue:
                assert queue[0] == connection_id, "left the queue out of order"
                queue.pop(0)
        for connection_id, outcome in closes(outputs):
            if connection_id in queue:
                assert outcome is Outcome.QUEUE_TIMEOUT
                queue.remove(connection_id)
        active = {a: proxy.control.active_connections(a) for a in addresses}
        assert all(not most[a] or active[a] <= most[a] for a in addresses), active
        assert proxy.queued == len(queue) <= size
        if queue:  # waiting only while every backend is full
            assert all(most[a] and active[a] >= most[a] for a in addresses), active


def test_an_operator_sets_a_limit_live() -> None:
    proxy = core({A: 0})  # no limit: nothing queues
    assert proxy.set_max_connections(A, 0, 0.0) == []  # unchanged: nothing said
    opened(proxy)
    assert proxy.set_max_connections(A, 1, 0.5) == [
        MaxConnectionsChanged(at=0.5, address=A, old=0, new=1)
    ]
    assert proxy.timer_lead() == 2.0  # a queue timeout may be filed now
    cid, outputs = proxy.accept(1.0)
    assert isinstance(outputs[0], ConnectionQueued)
    # Lowering a limit cuts nothing; raising one serves the queue at once.
    outputs = proxy.set_max_connections(A, 2, 1.5)
    assert connects(outputs) == [(cid, A)]
    assert proxy.statistics().backends[0].max_connections == 2
    with pytest.raises(LobleError, match=r"^backend 127.0.0.1:7001: max_connections -1 must"):
        proxy.set_max_connections(A, -1, 2.0)
    with pytest.raises(LobleError, match=r"no backend '10\.0\.0\.9:80'"):
        proxy.set_max_connections("10.0.0.9:80", 3, 2.0)
    # A reload sets the configured limit again, as it does a weight.
    proxy.reconfigure(parse_config(document({A: 0})), 3.0)
    assert proxy.statistics().backends[0].max_connections == 0


def test_a_client_dequeued_by_a_timer_is_not_timed_out_by_the_same_call() -> None:
    # A late wake finds both due: the first's idle timeout and the second's
    # queue timeout. The first's end makes room, the second goes to the
    # backend with a fresh connect deadline: the same call must not time it out.
    document_ = document({A: 1})
    document_["balancer"]["queue_timeout"] = 10.0
    document_["timeouts"] = {"idle": 10.0, "connect": 5.0}
    proxy = ProxyCore(parse_config(document_), random.Random(1))
    proxy.start(0.0)
    first, _ = opened(proxy)
    waiting, _ = proxy.accept(1.0)
    outputs = proxy.handle_timer(11.5)
    assert closes(outputs) == [(first, Outcome.IDLE_TIMEOUT)]
    assert connects(outputs) == [(waiting, A)]
    assert not [o for o in outputs if isinstance(o, ConnectFailed)]
    assert proxy.control.health(A).consecutive_failures == 0
    assert proxy.connected(waiting, 1, 11.6) is not None
