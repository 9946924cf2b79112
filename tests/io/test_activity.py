"""Bytes moving keep a connection from its idle timeout, with the coarse touch.

The daemon tells the core of a connection's activity at most once per
``TOUCH_RESOLUTION`` (and per 1% of ``idle``); these tests drive
``Daemon.active``, what both data paths call after each wakeup that moved
bytes, with a clock of their own, and the core's timer as the daemon's timer
task would.
"""

from __future__ import annotations

import socket

import pytest

from loble.core import ConnectBackend, ConnectionClosed, Outcome, parse_config
from loble.io import Daemon
from loble.io._daemon import _Connection


def busy_then_quiet(
    idle: float, every: float, busy_for: float
) -> tuple[list[tuple[float, Outcome]], float]:
    """Move bytes every ``every`` s for ``busy_for`` s, then nothing.

    Returns when and how the connection closed, and when bytes last moved.
    """
    config = parse_config(
        {
            "listener": {"address": "127.0.0.1:0"},
            "backends": [{"address": "127.0.0.1:9"}],
            "timeouts": {"idle": idle},
        }
    )
    daemon = Daemon(config)
    clock = 1000.0
    daemon.now = lambda: clock
    core = daemon.core
    connection_id, outputs = core.accept(clock)
    attempt = next(o.attempt for o in outputs if isinstance(o, ConnectBackend))
    core.connected(connection_id, attempt, clock)
    client, other = socket.socketpair()
    connection = _Connection(connection_id, client, "", None)
    closed: list[tuple[float, Outcome]] = []
    step = every / 4  # the timer task wakes more often than bytes move
    ticks = 0
    last = 0.0
    while not closed and clock < 1000.0 + busy_for + 2 * idle:
        ticks += 1
        clock = 1000.0 + ticks * step
        closed += [
            (round(clock - 1000.0, 6), o.outcome)
            for o in core.handle_timer(clock)
            if isinstance(o, ConnectionClosed)
        ]
        if not closed and clock <= 1000.0 + busy_for and ticks % 4 == 0:
            daemon.active(connection)
            last = round(clock - 1000.0, 6)
    client.close()
    other.close()
    return closed, last


@pytest.mark.parametrize("idle", [0.001, 0.002, 0.05, 1.0])
def test_a_connection_moving_bytes_more_often_than_idle_stays_open(idle: float) -> None:
    every = 0.4 * idle
    closed, last = busy_then_quiet(idle, every=every, busy_for=5 * idle)
    # Open while bytes move; closed by the idle timeout once they stop, at
    # most the touch resolution early and one timer step late.
    assert len(closed) == 1
    at, outcome = closed[0]
    assert outcome is Outcome.IDLE_TIMEOUT
    assert last + idle - min(0.001, idle / 100) - 1e-9 <= at <= last + idle + every / 4 + 1e-9
