"""Loble's event loop: the data path's callbacks in the loop's own epoll set."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import threading
from typing import Any

import pytest

from loble.io._loop import EPOLL_AVAILABLE, Readiness, new_event_loop, readiness_for

pytestmark = pytest.mark.skipif(not EPOLL_AVAILABLE, reason="epoll is Linux only")


def _epoll_sets() -> int:
    """epoll descriptors this process holds."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir used, gone already
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventpoll]"
    return count


@pytest.mark.parametrize(
    ("make_loop", "extra_sets"),
    [(new_event_loop, 0), (asyncio.new_event_loop, 1)],
    ids=["loble-loop", "plain-loop"],
)
def test_callbacks_share_the_loops_epoll_set_only_on_lobles_loop(
    make_loop: Any, extra_sets: int
) -> None:
    loop = make_loop()
    try:
        before = _epoll_sets()
        readiness, private = readiness_for(loop)
        assert readiness is not None
        assert _epoll_sets() - before == extra_sets
        assert (private is not None) == bool(extra_sets)
        if private is not None:
            private.close()
        assert _epoll_sets() == before
    finally:
        loop.close()


def test_a_failing_callback_is_reported_and_the_rest_of_the_batch_runs() -> None:
    loop = new_event_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    pairs = [socket.socketpair() for _ in range(2)]
    ran: list[int] = []
    try:
        readiness, _ = readiness_for(loop)
        assert readiness is not None

        def broken(fd: int) -> None:
            readiness.remove_reader(fd)
            raise RuntimeError("a bug")

        def working(fd: int) -> None:
            readiness.remove_reader(fd)
            ran.append(fd)

        (a, a_peer), (b, b_peer) = pairs
        readiness.add_reader(a.fileno(), broken, a.fileno())
        readiness.add_reader(b.fileno(), working, b.fileno())
        a_peer.send(b"x")
        b_peer.send(b"x")

        async def until_both_ran() -> None:
            while not (ran and reported):
                await asyncio.sleep(0)

        loop.run_until_complete(asyncio.wait_for(until_both_ran(), 10))
        assert ran == [b.fileno()]
        assert isinstance(reported[0]["exception"], RuntimeError)
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()
        loop.close()


class _Turns:
    """Counts the loop's polls (its selector's ``select`` calls) on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.count = 0
        selector = loop._selector  # type: ignore[attr-defined]
        polling = selector.select

        def counted(timeout: float | None = None) -> Any:
            self.count += 1
            return polling(timeout)

        selector.select = counted


def _rescue(loop: asyncio.AbstractEventLoop, seconds: float = 10.0) -> threading.Timer:
    """Stop ``loop`` from another thread after ``seconds`` (a bound, if a test hangs)."""
    rescue = threading.Timer(seconds, loop.call_soon_threadsafe, (loop.stop,))
    rescue.start()
    return rescue


def test_one_select_runs_lobles_callbacks_until_the_loop_has_work() -> None:
    # A byte passed back and forth between two socket pairs, 50 times, by
    # callbacks alone: one loop turn polls again and again, and the turn
    # ends when a callback gives the loop work (here call_soon).
    loop = new_event_loop()
    (a, a_peer), (b, b_peer) = socket.socketpair(), socket.socketpair()
    hops: list[int] = []
    try:
        readiness, _ = readiness_for(loop)
        assert readiness is not None
        done = loop.create_future()

        def hop(sock: socket.socket, onward: socket.socket) -> None:
            sock.recv(1)
            hops.append(sock.fileno())
            if len(hops) == 50:
                loop.call_soon(done.set_result, None)
            else:
                onward.send(b"x")

        readiness.add_reader(a.fileno(), hop, a, b_peer)
        readiness.add_reader(b.fileno(), hop, b, a_peer)
        a_peer.send(b"x")
        turns = _Turns(loop)
        rescue = _rescue(loop)
        loop.run_until_complete(done)
        assert rescue.is_alive()  # ended by the callback's work, not the rescue
        rescue.cancel()
        assert len(hops) == 50
        assert hops[:2] == [a.fileno(), b.fileno()]
        assert turns.count <= 3  # a turn per hop without the inner polling
    finally:
        for sock in (a, a_peer, b, b_peer):
            sock.close()
        loop.close()


def test_a_due_timer_and_the_loops_own_sockets_end_the_inner_polling() -> None:
    # A descriptor that is always readable (never drained) keeps Loble's
    # callbacks busy; the loop's timer still fires on time and its own
    # reader still runs.
    loop = new_event_loop()
    (busy, busy_peer), (own, own_peer) = socket.socketpair(), socket.socketpair()
    seen = {"busy": 0, "own": 0}
    try:
        readiness, _ = readiness_for(loop)
        assert readiness is not None

        def spin() -> None:
            seen["busy"] += 1

        def own_read() -> None:
            own.recv(1)
            seen["own"] += 1
            loop.remove_reader(own.fileno())

        readiness.add_reader(busy.fileno(), spin)
        busy_peer.send(b"x")
        loop.add_reader(own.fileno(), own_read)
        own_peer.send(b"x")
        timed = loop.create_future()
        loop.call_later(0.05, timed.set_result, "timer")
        rescue = _rescue(loop)
        assert loop.run_until_complete(timed) == "timer"
        assert rescue.is_alive()  # ended by the timer, not the rescue
        rescue.cancel()
        assert seen["own"] == 1
        assert seen["busy"] > 0
    finally:
        for sock in (busy, busy_peer, own, own_peer):
            sock.close()
        loop.close()


def test_a_stop_from_a_callback_ends_the_inner_polling() -> None:
    loop = new_event_loop()
    busy, busy_peer = socket.socketpair()
    try:
        readiness, _ = readiness_for(loop)
        assert readiness is not None
        stopped: list[bool] = []

        def stop_once() -> None:
            if not stopped:
                stopped.append(True)
                loop.stop()

        readiness.add_reader(busy.fileno(), stop_once)
        busy_peer.send(b"x")  # never drained: readable on every poll
        rescue = _rescue(loop)
        loop.run_forever()
        assert rescue.is_alive()  # the loop stopped itself, not the rescue
        rescue.cancel()
        assert stopped == [True]
    finally:
        busy.close()
        busy_peer.close()
        loop.close()


def test_a_call_deferred_during_a_batch_runs_once_after_the_next() -> None:
    epoll = select.epoll()
    a, b = socket.socketpair()
    try:
        readiness = Readiness(epoll, None)
        ran: list[str] = []

        def reader() -> None:
            readiness.defer(ran.append, "deferred")

        readiness.add_reader(a.fileno(), reader)
        readiness.dispatch([(a.fileno(), select.EPOLLIN)])  # nothing deferred before it
        assert ran == []  # deferred past the batch that made it
        readiness.dispatch([])
        assert ran == ["deferred"]
        readiness.dispatch([])
        readiness.dispatch([(a.fileno(), select.EPOLLIN)])
        assert ran == ["deferred"]  # once, however many batches follow
        readiness.dispatch([])
        assert ran == ["deferred", "deferred"]
    finally:
        a.close()
        b.close()
        epoll.close()


def test_a_failing_deferred_call_is_reported_and_the_others_run() -> None:
    loop = new_event_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        readiness, _ = readiness_for(loop)
        assert readiness is not None
        ran: list[str] = []

        def broken() -> None:
            raise RuntimeError("a bug")

        readiness.defer(broken)
        readiness.defer(ran.append, "after")
        readiness.dispatch([])
        assert ran == ["after"]
        assert isinstance(reported[0]["exception"], RuntimeError)
    finally:
        loop.close()


def test_deferred_calls_an_interruption_stopped_run_after_the_next_batch() -> None:
    epoll = select.epoll()
    try:
        readiness = Readiness(epoll, None)
        ran: list[str] = []

        def interrupt() -> None:
            raise KeyboardInterrupt

        readiness.defer(ran.append, "first")
        readiness.defer(interrupt)
        readiness.defer(ran.append, "last")
        with pytest.raises(KeyboardInterrupt):
            readiness.dispatch([])
        assert ran == ["first"]
        readiness.dispatch([])
        assert ran == ["first", "last"]  # not lost: a FIN it would send still goes
    finally:
        epoll.close()
