"""Loopback test rig for the daemon: backends, clients, daemons, bounded waits.

Everything runs on 127.0.0.1 with ports chosen by the OS. Tests never sleep
to wait for something: :func:`wait_for` polls a condition with a bound and
fails with the condition's description when the bound passes.

With ``--import-mode=importlib`` a test module cannot import this file, so
the rig reaches tests through one fixture, ``net``, whose attributes are the
helpers below (``net.loopback()``, ``net.wait_for``, ``net.request``...).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import tomli_w
from anyio.abc import Process, SocketStream, TaskGroup
from prometheus_client.parser import text_string_to_metric_families

from loble.config import load_config
from loble.core import Outcome, parse_config
from loble.io import Daemon
from loble.io._copy import SPLICE_AVAILABLE
from loble.io._loop import new_event_loop

WAIT_BOUND = 10.0
"""Seconds any single condition may take before the test fails."""


ANYIO_BACKENDS: dict[str, Any] = {
    # the loop `loble run` makes: the data path's callbacks in its own epoll set
    "asyncio": ("asyncio", {"loop_factory": new_event_loop}),
    # any other asyncio loop (as uvloop's): the callbacks in a private epoll set
    "asyncio_plain": ("asyncio", {}),
    "trio": "trio",
}


@pytest.fixture(params=list(ANYIO_BACKENDS))
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """The loop each test runs on; tests read its name from ``anyio_backend_name``."""
    return ANYIO_BACKENDS[request.param]


@pytest.fixture
def runtime_backend(anyio_backend: Any, anyio_backend_name: str) -> str:
    """``[runtime] backend`` for a ``loble`` child process, which makes its own loop."""
    if anyio_backend == ANYIO_BACKENDS["asyncio_plain"]:
        pytest.skip("a loble process makes its own loop: the same as on asyncio")
    return anyio_backend_name


DATA_PLANES = [
    ("callbacks", "auto"),
    ("callbacks", "splice"),
    ("callbacks", "recv_into"),
    ("tasks", "auto"),
    ("tasks", "splice"),
    ("tasks", "recv_into"),
]


@pytest.fixture(params=DATA_PLANES, ids="-".join)
def data_plane(
    request: pytest.FixtureRequest, anyio_backend: Any, anyio_backend_name: str
) -> dict[str, str]:
    """Every way the daemon can move bytes: pass it on as ``lab.daemon(..., **data_plane)``."""
    data_path, copy = request.param
    if data_path == "callbacks" and anyio_backend_name != "asyncio":
        pytest.skip("the callbacks data path runs on asyncio only")
    if data_path == "tasks" and anyio_backend == ANYIO_BACKENDS["asyncio_plain"]:
        pytest.skip("the tasks data path is the same on every asyncio loop")
    if copy != "recv_into" and not SPLICE_AVAILABLE:
        pytest.skip("splice(2) is Linux only")
    return {"data_path": data_path, "copy": copy}


async def wait_for(
    predicate: Callable[[], object],
    timeout: float = WAIT_BOUND,
    what: str = "",
) -> None:
    """Poll ``predicate`` (sync or async) until its result is truthy; fail after ``timeout``."""
    with anyio.move_on_after(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await anyio.sleep(0.005)
    raise AssertionError(f"not true within {timeout}s: {what or predicate}")


async def read_all(stream: SocketStream) -> bytes:
    """Read until EOF (a reset counts as EOF: the caller checks what arrived)."""
    data = b""
    while True:
        try:
            data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return data


async def request(address: tuple[str, int], payload: bytes = b"ping") -> bytes:
    """One client connection: send ``payload``, EOF, return everything answered."""
    with anyio.fail_after(WAIT_BOUND):
        async with await anyio.connect_tcp(*address) as stream:
            try:
                await stream.send(payload)
                await stream.send_eof()
            except (anyio.BrokenResourceError, OSError):
                pass  # closed on us already: what arrived, if anything, tells
            return await read_all(stream)


def outcomes(daemon: Any, outcome: Outcome) -> float:
    """How many connections ended with ``outcome``, summed over backends (the metric)."""
    return sum(
        count for (_, ended), count in daemon.metrics.connections.items() if ended == outcome.value
    )


def free_ports(count: int) -> list[int]:
    """Distinct ports nothing listens on (bound together, then released: connects
    to them are refused). One at a time, the OS may hand out the same port twice."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def free_port() -> int:
    return free_ports(1)[0]


def reset(stream: SocketStream) -> None:
    """Make the next close send RST, as a killed process's sockets do."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class TestBackend:
    """A backend the test controls.

    ``reply`` mode reads until the client's EOF, then answers ``name:`` plus
    everything it read and closes: a reply proves the EOF arrived while the
    other direction stayed open. ``greet`` mode sends ``name`` and EOF at once,
    then records what the client sends until its EOF.
    """

    __test__ = False

    def __init__(self, name: str, mode: str = "reply", host: str = "127.0.0.1") -> None:
        self.name = name
        self.mode = mode
        self.host = host
        self.port = 0
        self.accepted = 0
        self.received: list[bytes] = []
        self.open: set[SocketStream] = set()
        self._scope: anyio.CancelScope | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def serve(self, port: int, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        multi = await anyio.create_tcp_listener(local_host=self.host, local_port=port)
        (listener,) = multi.listeners
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tasks:
            # Connections live outside the accept loop's scope: they outlive the listener.
            with anyio.CancelScope() as self._scope:
                async with multi:
                    task_status.started()
                    while True:
                        stream = await listener.accept()
                        self.accepted += 1
                        self.open.add(stream)
                        tasks.start_soon(self._handle, stream)

    def stop_listening(self) -> None:
        """New connects are refused from now on; open connections carry on."""
        assert self._scope is not None
        self._scope.cancel()

    async def kill_connections(self) -> None:
        for stream in list(self.open):
            reset(stream)
            await stream.aclose()

    async def _handle(self, stream: SocketStream) -> None:
        try:
            if self.mode == "greet":
                await stream.send(self.name.encode())
                await stream.send_eof()
                self.received.append(await read_all(stream))
            else:
                data = await read_all(stream)
                self.received.append(data)
                await stream.send(self.name.encode() + b":" + data)
                await stream.send_eof()
                await read_all(stream)  # close after the client, never with unread data
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            self.open.discard(stream)
            await stream.aclose()


class Capture(logging.Handler):
    """Keeps each record's message and structured fields."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.getMessage(), dict(getattr(record, "fields", {}))))

    def find(self, message: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            found
            for msg, found in self.lines
            if msg == message and all(found.get(k) == v for k, v in fields.items())
        ]


@dataclass
class Loopback:
    """Backends and daemons sharing one task group; everything stops on exit."""

    tasks: TaskGroup
    daemons: list[Daemon] = field(default_factory=list)
    logs: Capture = field(default_factory=Capture)

    async def backend(
        self, name: str, *, port: int = 0, mode: str = "reply", host: str = "127.0.0.1"
    ) -> TestBackend:
        backend = TestBackend(name, mode, host)
        await self.tasks.start(backend.serve, port)
        return backend

    async def daemon(
        self,
        backends: list[str],
        *,
        copy: str | None = None,
        data_path: str | None = None,
        config_path: Path | None = None,
        **sections: Any,
    ) -> Daemon:
        """A daemon in front of ``backends``; with ``config_path``, its document is
        written there and a reload (SIGHUP, ``Daemon.reload``) reads that file."""
        document: dict[str, Any] = {
            "listener": {"address": sections.pop("listen", "127.0.0.1:0")},
            "backends": [{"address": address} for address in backends],
        }
        for name, values in sections.items():
            if name == "weights":
                for entry, weight in zip(document["backends"], values.values(), strict=True):
                    entry["weight"] = weight
            elif name == "limits":  # {address: max_connections}
                for entry in document["backends"]:
                    if entry["address"] in values:
                        entry["max_connections"] = values[entry["address"]]
            else:
                document[name] = values
        logger = logging.getLogger(f"loble.test.{len(self.daemons)}.{id(self)}")
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.addHandler(self.logs)
        reload_from = None
        if config_path is not None:
            config_path.write_text(tomli_w.dumps(document), encoding="utf-8")
            reload_from = partial(load_config, config_path)
        daemon = Daemon(
            parse_config(document),
            logger=logger,
            copy=copy,
            data_path=data_path,
            reload_from=reload_from,
        )
        self.daemons.append(daemon)
        await self.tasks.start(_run_daemon, daemon)
        return daemon


async def _run_daemon(daemon: Daemon, *, task_status: Any) -> None:
    await daemon.run(handle_signals=False, task_status=task_status)


@asynccontextmanager
async def _loopback() -> AsyncIterator[Loopback]:
    async with anyio.create_task_group() as tasks:
        rig = Loopback(tasks)
        try:
            yield rig
        finally:
            with anyio.CancelScope(shield=True), anyio.fail_after(WAIT_BOUND):
                for daemon in rig.daemons:
                    while not daemon.core.stopped:
                        daemon.shutdown()  # twice if need be: cut what a test left open
                    await wait_for(lambda d=daemon: d.open_connections == 0)
                    # Its HTTP endpoints end gracefully: cancelled mid-way,
                    # hypercorn's asyncio server fails.
                    await wait_for(lambda d=daemon: d.finished or not d.conductor)
            tasks.cancel_scope.cancel()


async def scrape(address: tuple[str, int], path: str = "/metrics") -> tuple[int, str]:
    """GET ``path``; return the status code and the body."""
    with anyio.fail_after(WAIT_BOUND):
        async with await anyio.connect_tcp(*address) as stream:
            await stream.send(
                f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode()
            )
            await stream.send_eof()
            response = await read_all(stream)
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by name and label set."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def admin_call(
    address: tuple[str, int],
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: object = None,
) -> tuple[int, Any]:
    """One request to an admin API: (status, decoded JSON, or the text if not JSON)."""
    url = f"http://{address[0]}:{address[1]}{path}"
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")

    def send() -> tuple[int, bytes, str]:
        try:
            with urllib.request.urlopen(request, timeout=WAIT_BOUND) as response:
                return response.status, response.read(), response.headers["content-type"]
        except urllib.error.HTTPError as error:
            return error.code, error.read(), error.headers["content-type"] or ""

    status, raw, kind = await anyio.to_thread.run_sync(send)
    return status, json.loads(raw) if "json" in kind else raw.decode()


def backend_of(status: dict[str, Any], address: str) -> dict[str, Any]:
    """The entry of one backend in a status document."""
    (found,) = [b for b in status["backends"] if b["address"] == address]
    return found


class LobleProcess:
    """``python -m loble ...`` as a child process, its stderr kept line by line."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def collect(self) -> None:
        assert self.process.stderr is not None
        pending = b""
        async for chunk in self.process.stderr:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            self.lines.extend(line.decode() for line in complete)

    def json_lines(self, message: str) -> list[dict[str, Any]]:
        found = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("msg") == message:
                    found.append(record)
        return found

    async def wait_json(self, message: str) -> dict[str, Any]:
        """The first JSON log line with ``message``, once it has been written."""
        try:
            await wait_for(lambda: self.json_lines(message))
        except AssertionError:
            tail = "\n".join(self.lines[-20:])
            raise AssertionError(f"no {message!r} line; stderr so far:\n{tail}") from None
        return self.json_lines(message)[0]

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def exit_code(self) -> int:
        with anyio.fail_after(WAIT_BOUND):
            return await self.process.wait()


@asynccontextmanager
async def loble_process(*args: str) -> AsyncIterator[LobleProcess]:
    """Run ``loble ARGS`` (this interpreter); kill it if the test leaves it running."""
    command = [sys.executable, "-m", "loble", *args]
    async with await anyio.open_process(command, stdout=None, stderr=subprocess.PIPE) as process:
        child = LobleProcess(process)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(child.collect)
            try:
                yield child
            finally:
                if process.returncode is None:
                    process.kill()
                with anyio.CancelScope(shield=True):
                    await process.wait()


def write_config(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


class Net:
    """The helpers, as the ``net`` fixture hands them to tests."""

    loble_process = staticmethod(loble_process)
    write_config = staticmethod(write_config)

    loopback = staticmethod(_loopback)
    wait_for = staticmethod(wait_for)
    request = staticmethod(request)
    read_all = staticmethod(read_all)
    free_port = staticmethod(free_port)
    free_ports = staticmethod(free_ports)
    reset = staticmethod(reset)
    scrape = staticmethod(scrape)
    admin_call = staticmethod(admin_call)
    backend_of = staticmethod(backend_of)
    samples = staticmethod(samples)


@pytest.fixture
def net() -> type[Net]:
    return Net
