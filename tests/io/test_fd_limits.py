"""Out of file descriptors: the daemon degrades and recovers, it never dies.

Each test runs ``loble run`` in a child process whose RLIMIT_NOFILE is
lowered before the daemon starts, then drives it from outside over loopback.
Waits poll a condition with a bound (:func:`wait_until`); nothing sleeps to wait.
"""

from __future__ import annotations

import contextlib
import json
import os
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


@pytest.mark.parametrize(("data_path", "copy"), DATA_PLANES, ids=["-".join(p) for p in DATA_PLANES])
def test_out_of_descriptors_for_backend_connects_the_daemon_carries_on(
    tmp_path: Path, sink: Sink, data_path: str, copy: str
) -> None:
    if copy != "recv_into" and not SPLICE_AVAILABLE:
        pytest.skip("splice(2) is not available here")
    document = {
        "listener": {"address": "127.0.0.1:0"},
        "backends": [{"address": sink.address}],
        "timeouts": {"connect": 0.5},
        "health": {"failure_threshold": 1},
        "logging": {"format": "json", "level": "debug", "access_log": True},
    }
    saw_no_socket = False
    # Each connection takes two descriptors: of two adjacent limits, one has the
    # accept take the last descriptor, so the backend socket() fails (EMFILE).
    # A descriptor the daemon opens at its own pace (a pooled pipe, the loop's
    # own) can shift the parity on a busy machine: two more limits cover that.
    for limit in (40, 41, 42, 43):
        if saw_no_socket and limit > 41:
            break
        env = {"LOBLE_DATA_PATH": data_path, "LOBLE_COPY": copy}
        with limited(tmp_path, limit, document, **env) as daemon:
            proxied = daemon.address("listening")
            clients: list[socket.socket] = []

            def progress() -> tuple[int, int, int]:
                failures = len(daemon.find(NO_SOCKET)) + len(daemon.find("accept failed"))
                return sink.accepted, failures, daemon.process.poll() or 0

            try:
                while len(clients) < 100:
                    before = progress()
                    # Accepted with no backend socket left: reset, maybe before connect() returns.
                    with contextlib.suppress(ConnectionResetError):
                        clients.append(socket.create_connection(proxied, timeout=BOUND))
                    wait_until(lambda b=before: progress() != b, "the daemon takes the client")
                    assert daemon.process.poll() is None, "\n".join(daemon.text[-20:])
                    if sink.accepted == before[0]:
                        break  # at the limit
                else:
                    raise AssertionError("never ran out of descriptors")
                if daemon.find(NO_SOCKET):
                    saw_no_socket = True
                    # Counted as the proxy's own shortage, not as a peer's reset.
                    wait_until(
                        lambda: any(
                            r.get("outcome") == "resource_exhausted"
                            for r in daemon.find("connection")
                        ),
                        "an access log line with outcome resource_exhausted",
                    )
                # A report at the limit does not kill it either, and an established
                # connection still moves bytes (with splice: no pipe, a buffer instead).
                clients[0].shutdown(socket.SHUT_WR)
                assert _read_to_end(clients[0]) == b"ok:", "\n".join(daemon.text[-30:])
                assert daemon.process.poll() is None, "\n".join(daemon.text[-20:])
            finally:
                for client in clients:
                    client.close()
            wait_until(lambda a=proxied: _answers(a), "the proxy serving again")
            assert daemon.stop() == 0, "\n".join(daemon.text[-20:])
            assert not daemon.find("backend state changed"), "fd pressure is not a backend fault"
            assert not any("Traceback" in line for line in daemon.text)
    assert saw_no_socket


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
