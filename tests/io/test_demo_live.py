"""`loble demo` as a newcomer sees it: the live view, read off a pseudo-terminal.

The demo runs as a child process whose stdin, stdout and stderr are the
slave side of a pty of a fixed size; the test reads everything drawn on the
master side, strips the terminal's escape sequences (each frame rewrites
whole lines, so a line's text stays in one piece) and waits, with a bound,
for what the screen must show. The schedule and the health checks are
sped up by the options and the configuration.
"""

from __future__ import annotations

import codecs
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

COLUMNS, LINES = 160, 50
BOUND = 30.0
"""Seconds the whole demo may take to show everything and exit."""

_ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


class Terminal:
    """A child process on a pseudo-terminal, and the text it has drawn so far."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
        self.process = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.master = master
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.raw = ""
        self.closed = False

    @property
    def text(self) -> str:
        """Everything drawn, escape sequences removed."""
        return _ESCAPES.sub("", self.raw)

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], max(0.0, timeout))
        if not ready:
            return
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every writer of the slave side has gone
            chunk = b""
        if chunk:
            self.raw += self.decoder.decode(chunk)
        else:
            self.closed = True

    def wait_for(self, pattern: str, deadline: float, after: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` drawn at ``after`` or later; fail at ``deadline``."""
        compiled = re.compile(pattern)
        while True:
            found = compiled.search(self.text, after)
            if found is not None:
                return found
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                tail = self.text[-3000:]
                raise AssertionError(f"the screen never showed {pattern!r}; its end:\n{tail}")
            self._read(left)

    def exit_code(self, deadline: float) -> int:
        """Read to the end, then the child's exit status."""
        while not self.closed and time.monotonic() < deadline:
            self._read(deadline - time.monotonic())
        return self.process.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@pytest.fixture
def terminal() -> Iterator[Any]:
    opened: list[Terminal] = []

    def start(*args: str) -> Terminal:
        env = {
            **os.environ,
            "COLUMNS": str(COLUMNS),
            "LINES": str(LINES),
            "TERM": "xterm-256color",
            "PYTHONUTF8": "1",
        }
        for variable in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
            env.pop(variable, None)
        opened.append(Terminal([sys.executable, "-m", "loble", "demo", *args], env))
        return opened[-1]

    yield start
    for child in opened:
        child.close()


def fast_demo(net: Any, tmp_path: Path, runtime: str) -> Path:
    """Three backends on free ports, health checks every 50 ms."""
    document = {
        "listener": {"address": "127.0.0.1:0"},
        "health": {
            "failure_threshold": 3,
            "success_threshold": 2,
            "probe_interval": 0.05,
            "probe_timeout": 0.05,
        },
        "timeouts": {"drain": 5.0},
        "runtime": {"backend": runtime},
        "backends": [{"address": f"127.0.0.1:{port}"} for port in net.free_ports(3)],
    }
    return net.write_config(tmp_path / "demo.toml", document)


def test_the_live_view_shows_a_backend_fail_and_recover_and_a_drain(
    net: Any, tmp_path: Path, runtime_backend: str, terminal: Any
) -> None:
    deadline = time.monotonic() + BOUND
    demo = terminal(
        "-c",
        str(fast_demo(net, tmp_path, runtime_backend)),
        "--duration",
        "8",
        "--break-every",
        "4",
        "--first-break",
        "0.5",
        "--rate",
        "30",
    )
    demo.wait_for(r"Loble demo", deadline)
    demo.wait_for(r"running, up \d+ s", deadline)
    # The schedule stops a backend's server; the core takes it out...
    stopped = demo.wait_for(r"demo stops (backend-\d)'s server", deadline)
    name = stopped[1]
    down = demo.wait_for(rf"{name} (?:healthy|draining) → unhealthy", deadline, stopped.end())
    demo.wait_for(rf"{name}\s+127\.0\.0\.1:\d+\s+down\s+unhealthy\s", deadline)
    # ...and brings it back once its server is up again and the probes answer.
    demo.wait_for(
        rf"{name} unhealthy → healthy: 2 consecutive probe successes", deadline, down.end()
    )
    demo.wait_for(rf"{name}\s+127\.0\.0\.1:\d+\s+up\s+healthy\s", deadline, down.end())
    # The operator's path: drained, then ready again.
    drain = demo.wait_for(r"(backend-\d) admin ready → drain", deadline)
    other = drain[1]
    demo.wait_for(r"demo runs: loble ctl drain 127\.0\.0\.1:\d+", deadline)
    demo.wait_for(rf"{other}\s+127\.0\.0\.1:\d+\s+up\s+healthy\s+drain\s", deadline)
    demo.wait_for(rf"{other} admin drain → ready", deadline, drain.end())
    # The clients saw it all through the balancer: answers, by backend.
    demo.wait_for(r"answered\s+[1-9]\d*", deadline)
    demo.wait_for(rf"{name}\s+[1-9]\d*\s+\d+%", deadline)
    # --duration: the graceful drain, then exit 0.
    demo.wait_for(r"shutdown finished, 0 connections cut", deadline)
    assert demo.exit_code(deadline) == 0
    assert "Traceback" not in demo.text


def test_ctrl_c_drains_the_live_demo_and_exits_cleanly(
    net: Any, tmp_path: Path, terminal: Any
) -> None:
    deadline = time.monotonic() + BOUND
    demo = terminal("-c", str(fast_demo(net, tmp_path, "asyncio")), "--rate", "30")
    demo.wait_for(r"answered\s+[1-9]", deadline)
    demo.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    demo.wait_for(r"shutdown: not accepting, draining \d+ connections", deadline)
    demo.wait_for(r"shutdown finished, 0 connections cut", deadline)
    assert demo.exit_code(deadline) == 0
    assert "Traceback" not in demo.text


def test_without_a_terminal_the_demo_writes_log_lines(net: Any, tmp_path: Path) -> None:
    path = fast_demo(net, tmp_path, "asyncio")
    done = subprocess.run(
        [sys.executable, "-m", "loble", "demo", "-c", str(path), "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=BOUND,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # no frame drawn on a pipe
    assert 'msg="demo duration reached: draining"' in done.stderr
    assert "msg=connection " in done.stderr  # the access log is on
    assert 'msg="shutdown finished"' in done.stderr
