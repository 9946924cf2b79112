"""The callback path's half-close, deferred until after the next poll's batch.

A side's ``shutdown(SHUT_WR)`` waits for the callbacks of one more poll:
when that batch closes the connection (wrk and HTTP/1.0 clients close as
soon as the answer is in), the close sends the FIN and the shutdown is
never made. The poll after a deferral never waits, so the FIN is late by at
most one batch, never by a timer.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from loble.core import Side
from loble.io import _callbacks
from loble.io._callbacks import CallbackLink, CallbackPath
from loble.io._copy import BufferPool, CopyMethod
from loble.io._loop import EPOLL_AVAILABLE, new_event_loop, readiness_for

pytestmark = pytest.mark.skipif(not EPOLL_AVAILABLE, reason="the loop's epoll set is Linux only")

BOUND = 10.0
"""Seconds any wait here may take at most."""


class Released:
    """The reports a path makes here: only ``released`` matters (as the conductor's)."""

    def __init__(self) -> None:
        self.failed: list[tuple[CallbackLink, Side]] = []

    def released(self, link: CallbackLink) -> None:
        link.released = True

    def socket_failed(self, link: CallbackLink, side: Side) -> None:
        self.failed.append((link, side))

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected report {name}")


def _run(test: Any) -> None:
    loop = new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(test(), BOUND))
    finally:
        loop.close()


async def _eof_seen(peer: socket.socket) -> bytes:
    """What ``peer`` reads until EOF, waiting on the loop (no sleeping)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    got = bytearray()

    def readable() -> None:
        chunk = peer.recv(65536)
        got.extend(chunk)
        if not chunk:
            loop.remove_reader(peer.fileno())
            done.set_result(bytes(got))

    peer.setblocking(False)
    loop.add_reader(peer.fileno(), readable)
    return await done


def test_a_deferred_half_close_reaches_the_peer_without_waiting_for_a_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shut: list[Side] = []
    real = _callbacks.shut_write
    monkeypatch.setattr(
        _callbacks, "shut_write", lambda r, link, side: (shut.append(side), real(r, link, side))
    )

    async def test() -> None:
        loop = asyncio.get_running_loop()
        client, peer = socket.socketpair()
        path = CallbackPath(Released(), BufferPool(CopyMethod.RECV_INTO), time.monotonic)  # type: ignore[arg-type]
        link = CallbackLink(client, None, "test")
        # A timer far off is all the loop has: a poll that waited for it
        # would outlive the bound.
        far = loop.call_later(BOUND * 3, lambda: None)
        started = time.monotonic()
        path.shutdown_write(link, Side.CLIENT)
        assert shut == []  # not yet: after the next batch
        assert await _eof_seen(peer) == b""
        assert shut == [Side.CLIENT]
        assert time.monotonic() - started < BOUND
        far.cancel()
        path.close(link, reset=False)
        peer.close()
        path.dispose()

    _run(test)


def test_a_half_close_followed_by_the_close_makes_no_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shut: list[Side] = []
    monkeypatch.setattr(_callbacks, "shut_write", lambda r, link, side: shut.append(side))

    async def test() -> None:
        client, peer = socket.socketpair()
        peer.sendall(b"bye")  # the client's last bytes, unread: a close would reset
        peer.shutdown(socket.SHUT_WR)
        path = CallbackPath(Released(), BufferPool(CopyMethod.RECV_INTO), time.monotonic)  # type: ignore[arg-type]
        link = CallbackLink(client, None, "test")
        path.shutdown_write(link, Side.CLIENT)
        client.recv(16)  # the connection ends in order before the deferred call
        path.close(link, reset=False)
        assert await _eof_seen(peer) == b""
        await asyncio.sleep(0)  # a turn more: the deferred call has surely run
        assert shut == []
        assert link.released
        peer.close()
        path.dispose()

    _run(test)


def test_a_broken_socket_found_by_the_deferred_half_close_is_reported() -> None:
    async def test() -> None:
        client, peer = socket.socketpair()
        reports = Released()
        path = CallbackPath(reports, BufferPool(CopyMethod.RECV_INTO), time.monotonic)  # type: ignore[arg-type]
        link = CallbackLink(client, None, "test")
        path.shutdown_write(link, Side.CLIENT)
        client.close()  # the socket is gone before the deferred call: it fails
        peer.close()
        while not reports.failed:
            await asyncio.sleep(0)
        assert reports.failed == [(link, Side.CLIENT)]
        path.dispose()

    _run(test)


def test_a_half_close_ordered_inside_a_batch_goes_out_with_the_loop_idle() -> None:
    # The order comes from a readiness callback (as the conductor's do), and
    # the loop has no timer but the test's bound: the poll after the batch
    # must not wait for it.
    async def test() -> None:
        loop = asyncio.get_running_loop()
        readiness, _ = readiness_for(loop)
        assert readiness is not None
        client, peer = socket.socketpair()
        trigger, pull = socket.socketpair()
        path = CallbackPath(Released(), BufferPool(CopyMethod.RECV_INTO), time.monotonic)  # type: ignore[arg-type]
        link = CallbackLink(client, None, "test")

        def order() -> None:
            trigger.recv(1)
            readiness.remove_reader(trigger.fileno())
            path.shutdown_write(link, Side.CLIENT)

        readiness.add_reader(trigger.fileno(), order)
        pull.send(b"x")
        started = time.monotonic()
        assert await _eof_seen(peer) == b""
        assert time.monotonic() - started < BOUND / 2  # not the bound's timer
        path.close(link, reset=False)
        for sock in (peer, trigger, pull):
            sock.close()
        path.dispose()

    _run(test)
