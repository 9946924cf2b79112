"""Loble's event loop: the data path's callbacks in the loop's own epoll set."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

import pytest

from loble.io._loop import EPOLL_AVAILABLE, new_event_loop, readiness_for

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
