"""Process plumbing for the benchmark: start, wait, measure, and always clean up.

Every process the harness starts goes through :class:`Registry`, which starts it
in its own session (so one signal reaches a master and its workers) and kills
the whole group on :meth:`Registry.close`, which ``run.py`` calls from a
``finally`` block: after a normal run, an exception, or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "Registry",
    "Started",
    "free_port",
    "process_tree",
    "raise_nofile",
    "rss_kib",
    "wait_listening",
]


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (soft, and hard if we may) toward *wanted*; return the soft limit.

    Children inherit it, so call this before starting anything.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
        return wanted
    target = hard if hard != resource.RLIM_INFINITY else wanted
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A loopback TCP port the OS reports free right now.

    The tools take a port number in their config, so there is a short window
    between picking and binding; on a benchmark machine that is acceptable.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening_ports() -> set[int]:
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(port: int, started: Started | None, timeout: float) -> None:
    """Wait until something listens on *port*, without connecting to it.

    Connecting would disturb some servers (iperf3 takes any connection for a
    test client), so this reads the kernel's socket table instead.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port in _listening_ports():
            return
        if started is not None and started.popen.poll() is not None:
            raise RuntimeError(
                f"{started.name} exited with status {started.popen.returncode} "
                f"before listening on {port}: {started.tail(3)}"
            )
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def process_tree(pid: int) -> list[int]:
    """*pid* and all its descendants, read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def rss_kib(pid: int) -> int:
    """VmRSS of *pid* plus every descendant (an nginx master and its workers), in KiB."""
    total = 0
    for each in process_tree(pid):
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


class Started:
    """One process the registry started; its output goes to a log file."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])


class Registry:
    """Starts processes in their own sessions and kills every one of them on close."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._started: list[Started] = []
        self._count = 0

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdin: int | None = subprocess.DEVNULL,
        stdout_pipe: bool = False,
        env: dict[str, str] | None = None,
    ) -> Started:
        """Start ``argv`` in its own session; ``env`` adds to (or overrides) ours."""
        self._count += 1
        log = self.workdir / f"{self._count:03d}-{name}.log"
        with log.open("wb") as sink:
            popen = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=subprocess.PIPE if stdout_pipe else sink,
                stderr=sink,
                start_new_session=True,
                cwd=self.workdir,
                env={**os.environ, **env} if env else None,
            )
        started = Started(name, popen, log)
        self._started.append(started)
        return started

    def run(self, name: str, argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
        """Run a client to completion, killed if it outlives *timeout*; (status, stdout, log)."""
        started = self.start(name, argv, stdout_pipe=True)
        try:
            out, _ = started.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(started)
            return -1, "", f"killed after {timeout:.0f} s: {started.tail()}"
        except BaseException:
            self.stop(started)
            raise
        self._forget(started)
        return started.popen.returncode, out.decode(errors="replace"), started.tail()

    def stop(self, started: Started, grace: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL it after *grace* seconds."""
        try:
            if started.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(started.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    started.popen.wait(timeout=grace)
            # Workers may outlive their master: always sweep the group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(started.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                started.popen.wait(timeout=grace)
            for stream in (started.popen.stdin, started.popen.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        finally:
            self._forget(started)

    def _forget(self, started: Started) -> None:
        with contextlib.suppress(ValueError):
            self._started.remove(started)

    def close(self) -> None:
        """Stop everything still running, newest first (proxies before their backends)."""
        for started in reversed(list(self._started)):
            with contextlib.suppress(Exception):
                self.stop(started, grace=2.0)
