"""Out of file descriptors: the daemon degrades and recovers, it never dies.

Each test runs ``loble run`` in a child process whose RLIMIT_NOFILE is
lowered before the daemon starts, then drives it from outside over loopback.
Waits poll a condition with a bound (:func:`wait_until`); nothing sleeps to wait.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from loble.io._copy import SPLICE_AVAILABLE

from .conftest import DATA_PLANES

BOUND = 10.0

_PRELUDE = (
    "import resource, sys\n"
    "limit = int(sys.argv.pop(1))\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))\n"
    "from loble.__main__ import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def wait_until(condition: Callable[[], object], what: str, bound: float = BOUND) -> None:
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound}s: {what}")
        time.sleep(0.01)  # polling interval of a bounded wait, not a wait in itself


class Limited:
    """``loble run`` with at most ``limit`` descriptors; stderr kept as JSON records."""

    def __init__(
        self, tmp_path: Path, limit: int, document: dict[str, Any], env: dict[str, str]
    ) -> None:
        document = {"logging": {"format": "json", "level": "debug"}, **document}
        path = tmp_path / "config.toml"
        path.write_text(tomli_w.dumps(document), encoding="utf-8")
        command = [sys.executable, "-c", _PRELUDE, str(limit), "run", "-c", str(path)]
        environment = {**os.environ, **env}
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, env=environment)
        self.records: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_until(lambda: self.find("listening") or self.process.poll() is not None, "listening")
        assert self.process.poll() is None, "\n".join(self.text)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.text.append(line)
            with contextlib.suppress(ValueError):
                self.records.append(json.loads(line))

    def find(self, message: str) -> list[dict[str, Any]]:
        return [r for r in list(self.records) if r.get("msg") == message]

    def address(self, message: str, key: str = "address") -> tuple[str, int]:
        text = str(self.find(message)[0][key]).removeprefix("http://").removesuffix("/metrics")
        host, _, port = text.rpartition(":")
        return host, int(port)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(BOUND)
        finally:
            self._reader.join(BOUND)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def limited(tmp_path: Path, limit: int, document: dict[str, Any], **env: str) -> Iterator[Limited]:
    daemon = Limited(tmp_path, limit, document, env)
    try:
        yield daemon
    finally:
        daemon.kill()


class Sink:
    """A backend that answers ``ok:`` plus what it read once the client sends EOF."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    @staticmethod
    def _answer(conn: socket.socket) -> None:
        with conn:
            data = b""
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    data += chunk
                conn.sendall(b"ok:" + data)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    backend = Sink()
    yield backend
    backend.close()


def _read_to_end(conn: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except ConnectionResetError:
        return data + b"<reset>"
    return data


def exchange(address: tuple[str, int], payload: bytes = b"ping") -> bytes:
    with socket.create_connection(address, timeout=BOUND) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        return _read_to_end(conn)


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_metrics_scrapes_at_the_descriptor_limit_do_not_kill_the_daemon(
    tmp_path: Path, sink: Sink, runtime: str
) -> None:
    document = {
        "listener": {"address": "127.0.0.1:0"},
        "backends": [{"address": sink.address}],
        "metrics": {"enabled": True, "address": "127.0.0.1:0"},
        "runtime": {"backend": runtime},
    }
    with limited(tmp_path, 40, document) as daemon:
        metrics = daemon.address("metrics endpoint")
        hogs: list[socket.socket] = []
        try:
            # Idle scrapes hold a descriptor each until the daemon runs out.
            while not accept_failed(daemon) and len(hogs) < 100:
                assert daemon.process.poll() is None, "\n".join(daemon.text[-20:])
                hogs.append(socket.create_connection(metrics, timeout=BOUND))
            wait_until(lambda: accept_failed(daemon), "an accept failure")
            assert daemon.process.poll() is None, "\n".join(daemon.text[-20:])
        finally:
            for hog in hogs:
                hog.close()
        proxied = daemon.address("listening")
        wait_until(lambda: _answers(proxied), "the proxy serving again")
        assert daemon.stop() == 0, "\n".join(daemon.text[-20:])


def accept_failed(daemon: Limited) -> bool:
    """Whether the HTTP server's accept ran out of descriptors, as its event loop logs it:
    asyncio's 'socket.accept() out of system resource', trio's 'accept returned EMFILE'."""
    return any(
        str(record.get("msg", "")).startswith(("socket.accept() out of system", "accept returned"))
        for record in list(daemon.records)
    )


def _answers(address: tuple[str, int]) -> bool:
    try:
        return exchange(address) == b"ok:ping"
    except OSError:
        return False


NO_SOCKET = "no socket for a backend connect: closing the client"
PAUSED = "accepting paused: connection limit reached"
RESUMED = "accepting resumed: below the connection limit"
ACCEPT_PAUSED = "accepting paused: accept failed"
ACCEPT_RESUMED = "accepting resumed: accepts work again"


def budget(daemon: Limited) -> dict[str, Any]:
    """The daemon's ``connection limit`` line: connections, descriptor_limit, reserved, ..."""
    wait_until(lambda: daemon.find("connection limit"), "the connection limit line")
    return daemon.find("connection limit")[0]


def open_descriptors(pid: int) -> list[int]:
    return sorted(int(name) for name in os.listdir(f"/proc/{pid}/fd"))


def limit_leaving(pid: int, free: int) -> int:
    """A soft RLIMIT_NOFILE under which ``pid`` can open exactly ``free`` more descriptors
    (a new descriptor takes the lowest free number, and must be below the limit)."""
    used = set(open_descriptors(pid))
    number = 0
    holes = 0
    while True:
        if number not in used:
            if holes == free:
                return number
            holes += 1
        number += 1


def waiting(client: socket.socket) -> bool:
    """The client is connected and nothing came back: no reset, no EOF, no bytes."""
    timeout = client.gettimeout()
    client.setblocking(False)  # with a timeout, recv would wait for bytes first
    try:
        client.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        client.settimeout(timeout)
    return False


def scrape(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=BOUND) as conn:
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return _read_to_end(conn)


@pytest.mark.skipif(sys.platform != "linux", reason="lowers a running process's limit: Linux")
@pytest.mark.parametrize(("data_path", "copy"), DATA_PLANES, ids=["-".join(p) for p in DATA_PLANES])
def test_out_of_descriptors_from_outside_the_daemon_carries_on(
    tmp_path: Path, sink: Sink, data_path: str, copy: str
) -> None:
    # Below the connection limit a descriptor can still run out: the limit
    # lowered from outside (prlimit), or taken by something else. Lowered here
    # to leave exactly one descriptor (the accept takes it, the backend socket
    # fails) and then none (the accept fails): the daemon carries on.
    if copy != "recv_into" and not SPLICE_AVAILABLE:
        pytest.skip("splice(2) is not available here")
    document = {
        "listener": {"address": "127.0.0.1:0"},
        "backends": [{"address": sink.address}],
        "timeouts": {"connect": 0.5},
        "health": {"failure_threshold": 1},
        "logging": {"format": "json", "level": "debug", "access_log": True},
    }
    limit = 256
    env = {"LOBLE_DATA_PATH": data_path, "LOBLE_COPY": copy}
    with limited(tmp_path, limit, document, **env) as daemon:
        pid = daemon.process.pid
        proxied = daemon.address("listening")
        held = socket.create_connection(proxied, timeout=BOUND)
        try:
            held.sendall(b"held")
            wait_until(lambda: sink.accepted == 1, "the held client connected")
            # One descriptor left: the client is accepted, its backend socket is not made.
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit_leaving(pid, 1), limit))
            with socket.create_connection(proxied, timeout=BOUND) as client:
                assert _read_to_end(client) in (b"", b"<reset>")
            wait_until(lambda: daemon.find(NO_SOCKET), "the no-socket warning")
            # Counted as the proxy's own shortage, not as a peer's reset.
            wait_until(
                lambda: any(
                    r.get("outcome") == "resource_exhausted" for r in daemon.find("connection")
                ),
                "an access log line with outcome resource_exhausted",
            )
            # None left: accepts fail, the client waits in the backlog; one line.
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit_leaving(pid, 0), limit))
            late = socket.create_connection(proxied, timeout=BOUND)
            with late:
                late.sendall(b"late")
                late.shutdown(socket.SHUT_WR)
                wait_until(lambda: daemon.find(ACCEPT_PAUSED), "the accept-failed warning")
                # An established connection still moves bytes (splice: no pipe, a buffer).
                held.shutdown(socket.SHUT_WR)
                assert _read_to_end(held) == b"ok:held", "\n".join(daemon.text[-30:])
                assert waiting(late)
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
                assert _read_to_end(late) == b"ok:late", "\n".join(daemon.text[-30:])
            wait_until(lambda: daemon.find(ACCEPT_RESUMED), "the accepts-work-again line")
            assert len(daemon.find(ACCEPT_PAUSED)) == 1, "one line, not one per retry"
            assert len(daemon.find(ACCEPT_RESUMED)) == 1
            assert daemon.find(ACCEPT_RESUMED)[0]["failures"] >= 1
        finally:
            held.close()
        assert _answers(proxied)
        assert daemon.stop() == 0, "\n".join(daemon.text[-20:])
        assert not daemon.find("backend state changed"), "fd pressure is not a backend fault"
        assert not any("Traceback" in line for line in daemon.text)


PATHS = [("asyncio", "callbacks"), ("asyncio", "tasks"), ("trio", "tasks")]

SMALL = 8
"""Connections the threshold limits are chosen around."""


@pytest.mark.parametrize(("runtime", "data_path"), PATHS, ids=["-".join(p) for p in PATHS])
def test_at_the_connection_limit_clients_wait_in_the_backlog_then_are_served(
    tmp_path: Path, sink: Sink, runtime: str, data_path: str
) -> None:
    # The 256 and 257 (one of them used to accept and reset), then the
    # descriptor limits just below, at and above the one that carries SMALL.
    threshold: int | None = None
    for run, limit in enumerate((256, 257, None, None, None)):
        if limit is None:
            assert threshold is not None
            limit = threshold + run - 3  # threshold - 1, threshold, threshold + 1
        document = {
            "listener": {"address": "127.0.0.1:0"},
            "backends": [{"address": sink.address}],
            "metrics": {"enabled": True, "address": "127.0.0.1:0"},
            "runtime": {"backend": runtime},
        }
        sink.accepted = 0
        (tmp_path / str(run)).mkdir()
        with limited(tmp_path / str(run), limit, document, LOBLE_DATA_PATH=data_path) as daemon:
            figures = budget(daemon)
            reserved, per_connection = figures["reserved"], figures["per_connection"]
            connections = figures["connections"]
            assert figures["descriptor_limit"] == limit
            assert connections == max(1, (limit - reserved) // per_connection)
            if threshold is None:
                threshold = reserved + SMALL * per_connection
            elif run >= 2:
                assert connections == SMALL + min(0, run - 3), (limit, figures)
            _fill_wait_and_serve(daemon, sink, connections)
            assert daemon.stop() == 0, "\n".join(daemon.text[-20:])
            assert not any("Traceback" in line for line in daemon.text)


def _fill_wait_and_serve(daemon: Limited, sink: Sink, connections: int) -> None:
    proxied = daemon.address("listening")
    metrics = daemon.address("metrics endpoint")
    extra = max(1, connections // 4)
    held: list[socket.socket] = []
    late: list[socket.socket] = []
    try:
        for number in range(connections):
            client = socket.create_connection(proxied, timeout=BOUND)
            held.append(client)
            client.sendall(b"held-%d" % number)
        wait_until(lambda: sink.accepted == connections, f"{connections} clients connected")
        wait_until(lambda: daemon.find(PAUSED), "the paused line")
        paused = daemon.find(PAUSED)[0]
        assert (paused["open"], paused["limit"]) == (connections, connections), paused
        for number in range(extra):
            client = socket.create_connection(proxied, timeout=BOUND)  # the backlog's
            late.append(client)
            client.sendall(b"late-%d" % number)
        # The endpoint answers at the limit; once it has, the loop has had its turn.
        answer = scrape(metrics)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b"loble_accepting_paused 1" in answer
        assert sink.accepted == connections, "accepted past the limit"
        assert all(waiting(client) for client in late), "a waiting client was reset"
        for number, client in enumerate(held):
            client.shutdown(socket.SHUT_WR)
            assert _read_to_end(client) == b"ok:held-%d" % number
            client.close()
            if number < extra:  # its place goes to the next client in the backlog
                wait_until(
                    lambda n=number: sink.accepted == connections + n + 1, "a waiting client in"
                )
        for number, client in enumerate(late):
            client.shutdown(socket.SHUT_WR)
            assert _read_to_end(client) == b"ok:late-%d" % number
    finally:
        for client in held + late:
            client.close()
    wait_until(lambda: daemon.find(RESUMED), "the resumed line")
    assert len(daemon.find(PAUSED)) == 1, [r["msg"] for r in daemon.records]
    assert len(daemon.find(RESUMED)) == 1
    resumed = daemon.find(RESUMED)[0]
    assert resumed["accepted"] == extra and resumed["pauses"] == extra + 1, resumed
    assert not daemon.find(NO_SOCKET) and not daemon.find(ACCEPT_PAUSED)
    assert _answers(proxied), "serves again"
    assert b"loble_accepting_paused 0" in scrape(metrics)


# -- an address family switched off ---------------------------------------------------

_NO_IPV6 = r"""
import ctypes, fcntl, json, os, signal, socket, struct, subprocess, sys, threading, time

BOUND = 10.0
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET: a network namespace of our own
    print(json.dumps({"skip": os.strerror(ctypes.get_errno())}))
    sys.exit(0)
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bring its loopback up
flags = struct.unpack("16sH14s", fcntl.ioctl(probe, 0x8913, struct.pack("16sH14s", b"lo", 0, b"")))[1]
fcntl.ioctl(probe, 0x8914, struct.pack("16sH14s", b"lo", flags | 1, b""))
try:
    with open("/proc/sys/net/ipv6/conf/lo/disable_ipv6", "w") as switch:
        switch.write("1")  # connect() to [::1] now fails with EADDRNOTAVAIL
except OSError as error:
    print(json.dumps({"skip": f"cannot switch IPv6 off: {error}"}))
    sys.exit(0)

backend = socket.create_server(("127.0.0.1", 9001))
def serve():
    while True:
        peer, _ = backend.accept()
        with peer:
            while peer.recv(4096):
                pass
            peer.sendall(b"ok")
threading.Thread(target=serve, daemon=True).start()

config, data_path = sys.argv[1], sys.argv[2]
daemon = subprocess.Popen(
    [sys.executable, "-m", "loble", "run", "-c", config],
    stderr=subprocess.PIPE, env={**os.environ, "LOBLE_DATA_PATH": data_path},
)
records = []
def read():
    for line in daemon.stderr:
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({"msg": line.decode(errors="replace")})
threading.Thread(target=read, daemon=True).start()

def seen(message):
    return [r for r in list(records) if r.get("msg") == message]

deadline = time.monotonic() + BOUND
while not seen("listening") and time.monotonic() < deadline and daemon.poll() is None:
    time.sleep(0.01)  # polling interval of a bounded wait
answers = []
for _ in range(6):
    with socket.create_connection(("127.0.0.1", 8000), timeout=BOUND) as client:
        client.sendall(b"hi")
        client.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := client.recv(4096):
                answer += chunk
        except OSError as error:
            answer = repr(error).encode()
        answers.append(answer.decode())
daemon.send_signal(signal.SIGTERM)
code = daemon.wait(BOUND)
print(json.dumps({
    "exit": code,
    "answers": answers,
    "outcomes": [r.get("outcome") for r in seen("connection")],
    "changes": [(r.get("backend"), r.get("new")) for r in seen("backend state changed")],
}))
"""


@pytest.mark.parametrize("data_path", ["callbacks", "tasks"])
def test_a_backend_in_a_switched_off_address_family_is_a_failing_backend(
    tmp_path: Path, data_path: str
) -> None:
    # connect() to [::1] with IPv6 off answers EADDRNOTAVAIL, forever: that is
    # the backend failing (retry elsewhere, mark it unhealthy), not Loble out
    # of resources, or every client sent there would be reset for good.
    # Provoked for real in a network namespace of the test's own.
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs Linux and root, for a network namespace")
    document = {
        "listener": {"address": "127.0.0.1:8000"},
        "backends": [{"address": "[::1]:9001"}, {"address": "127.0.0.1:9001"}],
        "health": {"failure_threshold": 1, "probe_interval": 60.0},
        "logging": {"format": "json", "level": "debug", "access_log": True},
    }
    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps(document), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-c", _NO_IPV6, str(config), data_path],
        capture_output=True,
        text=True,
        timeout=4 * BOUND,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(f"no network namespace here: {report['skip']}")
    assert report["exit"] == 0, report
    assert report["answers"] == ["ok"] * 6, report
    assert report["outcomes"] == ["completed"] * 6, report
    assert report["changes"] == [["[::1]:9001", "unhealthy"]], report
