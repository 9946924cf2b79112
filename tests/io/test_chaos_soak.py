"""Chaos soak: thousands of checked streams while backends die, freeze and reset.

Loble runs as ``loble run CONFIG`` in front of four backend *processes*
(``chaos_backend.py``: an 8-byte greeting naming the backend and its
incarnation, then an echo until the client's EOF). Fifty clients open
connection after connection, each sending a pseudo-random pattern of its own
(seeded by its number, a few bytes to 512 KiB, in random chunks at a random
pace), then EOF, and check the echo byte for byte. Meanwhile two seeded lanes
of chaos run, each step logged with its time:

* faults: SIGKILL a backend and restart it on the same port later; SIGSTOP
  it for longer than the idle timeout, then SIGCONT; make it reset every
  connection it has (SIGUSR1);
* operations: reload the file with SIGHUP (a weight changed; a backend
  removed, then added back, after the removal timeout or before it); drain a
  backend through the admin API, then set it ready again.

Each connection ends one of four ways: *completed* (the exact echo, then a
clean EOF), *failed honestly* (a reset, a refused or failed connect),
*corrupted* (a wrong byte) or *truncated* (a clean EOF before the whole echo:
the worst case, since a client reading to the end would take it for
complete). Every failure must have a cause in the chaos log: the backend
that greeted it was killed, frozen, reset or removed while it was open; or,
for a connection no backend greeted, one of those faults was under way; or
the final SIGTERM (refused once the listener closed, cut at the drain
deadline). The test asserts no corrupted, no truncated and no unexplained
connection, and a completed share no lower than the schedule allows: each
fault may fail at most the connections it can reach: those on the backend
when it was killed or removed, as Loble's gauge counts them; those the
backend says it reset; for a freeze, those Loble cut at the idle timeout
during it and those still on it at the end. Loble's own count must agree
with the clients': as many connections, as many of them completed.

Before the chaos and after it, at rest, it counts Loble's descriptors
(``/proc/PID/fd``, by kind) and its tasks (the ``loble_tasks`` gauge): they
must be the same, but for the splice pipes Loble keeps for reuse, whose
number follows the most pipes in use at once. ``loble_splice_pipes`` counts
them: at rest none is in use, and the process's pipe descriptors minus two
per pipe it counts must be the same before and after, so every pipe is
accounted for. At the end Loble gets SIGTERM with connections in flight,
three of them trickling a byte at a time so the drain deadline must cut
them, and must exit 0 after its ``shutdown finished`` line.

The short form runs in the suite (about 30 s). The long form is the same with
``LOBLE_SOAK_SECONDS`` of chaos (600 for the committed figures);
``LOBLE_SOAK_SEED`` picks another schedule, ``LOBLE_SOAK_DATA_PATH``,
``LOBLE_SOAK_COPY`` and ``LOBLE_SOAK_RUNTIME`` another data plane,
``LOBLE_SOAK_PROXY=haproxy`` runs the same soak against HAProxy, and
``LOBLE_SOAK_REPORT=PATH`` writes the figures there as JSON.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process, SocketStream

pytestmark = pytest.mark.anyio

SHORT_SECONDS = 20.0
SECONDS = float(os.environ.get("LOBLE_SOAK_SECONDS", SHORT_SECONDS))
"""Seconds of chaos: the short form by default."""
SEED = int(os.environ.get("LOBLE_SOAK_SEED", "12"))
PROXY = os.environ.get("LOBLE_SOAK_PROXY", "loble")
REPORT = os.environ.get("LOBLE_SOAK_REPORT", "")
DATA_PATH = os.environ.get("LOBLE_SOAK_DATA_PATH", "")
COPY = os.environ.get("LOBLE_SOAK_COPY", "")
RUNTIME = os.environ.get("LOBLE_SOAK_RUNTIME", "asyncio")

BACKENDS = 4
CONCURRENCY = 50
MAX_PAYLOAD = 512 * 1024
MAX_CHUNK = 64 * 1024
PACE = 1.0
"""Seconds a connection spreads its chunks over, at most (one in ten: 3x that)."""
IDLE = 2.0
MAX_PAUSE = IDLE / 4
"""The longest pause between two chunks: far from the idle timeout."""
DRAIN = 3.0
REMOVAL = 1.0
PROBE_INTERVAL = 0.25
CONNECTION_BOUND = 30.0
"""Seconds a client connection may take before it counts as a hang (the idle
timeout ends any stalled one after IDLE)."""
TRICKLES = 3
"""Connections still sending at SIGTERM, one byte at a time: the drain deadline cuts them."""
SLACK = 5
EPSILON = 0.05
"""Seconds of slack between a fault's timestamps and what a client saw."""

GREETING = re.compile(rb"b(\d)g(\d{4})\n")
BACKEND_SCRIPT = Path(__file__).with_name("chaos_backend.py")


@pytest.fixture
def anyio_backend() -> str:
    """One run: the clients on asyncio; the data plane is the child's (see the env vars)."""
    return "asyncio"


def now() -> float:
    return time.monotonic()


# -- backends ---------------------------------------------------------------------


class Slot:
    """One backend's port and its successive processes (incarnations)."""

    def __init__(self, index: int) -> None:
        self.index = index
        # Bound, never listening: connects are refused while no incarnation
        # runs, and no other socket can take the port meanwhile (a bound port
        # is never an ephemeral one). Each incarnation binds it too (SO_REUSEPORT).
        self.placeholder = socket.socket()
        self.placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.placeholder.bind(("127.0.0.1", 0))
        self.port = int(self.placeholder.getsockname()[1])
        self.generation = 0
        self.process: Process | None = None
        self._out = b""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def name(self) -> bytes:
        return b"b%dg%04d\n" % (self.index, self.generation)

    async def start(self) -> None:
        assert self.process is None
        self.generation += 1
        self._out = b""
        self.process = await anyio.open_process(
            [sys.executable, str(BACKEND_SCRIPT), self.name.decode(), str(self.port)],
            stdout=subprocess.PIPE,
            stderr=None,
        )
        await self.line("ready")

    async def line(self, prefix: str) -> str:
        """The next line the incarnation writes, which must start with ``prefix``."""
        assert self.process is not None and self.process.stdout is not None
        with anyio.fail_after(10):
            while b"\n" not in self._out:
                self._out += await self.process.stdout.receive()
        line, _, self._out = self._out.partition(b"\n")
        assert line.decode().startswith(prefix), line
        return line.decode()

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        with anyio.fail_after(10):
            await self.process.wait()
        await self.process.aclose()
        self.process = None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            if self.process is not None:
                if self.process.returncode is None:
                    self.process.kill()
                await self.process.wait()
                await self.process.aclose()
                self.process = None
            self.placeholder.close()


# -- the proxy under test ---------------------------------------------------------


class Loble:
    """``loble run CONFIG`` as a child, with its metrics and admin API."""

    name = "loble"
    reload_signal = "SIGHUP"

    def __init__(self, net: Any, directory: Path, slots: list[Slot]) -> None:
        self.net = net
        self.path = directory / "loble.toml"
        self.slots = slots
        self.members = [slot.index for slot in slots]
        self.weights = {slot.index: 1 for slot in slots}
        self.child: Any = None
        self.address: tuple[str, int] = ("", 0)
        self.metrics: tuple[str, int] = ("", 0)
        self.admin: tuple[str, int] = ("", 0)
        self._scanned = 0
        self._reloads: list[dict[str, Any]] = []

    def document(self) -> dict[str, Any]:
        return {
            "listener": {"address": "127.0.0.1:0"},
            "balancer": {"algorithm": "round_robin", "connect_retries": 2},
            "health": {
                "active": True,
                "probe_interval": PROBE_INTERVAL,
                "probe_timeout": 0.2,
                "failure_threshold": 2,
                "success_threshold": 2,
            },
            "timeouts": {"connect": 1.0, "idle": IDLE, "drain": DRAIN, "removal": REMOVAL},
            "metrics": {"enabled": True, "address": "127.0.0.1:0"},
            "admin": {"enabled": True, "address": "127.0.0.1:0", "token": "soak"},
            "logging": {"format": "json", "level": "info"},
            "runtime": {"backend": RUNTIME},
            "backends": [
                {"address": self.slots[i].address, "weight": self.weights[i]} for i in self.members
            ],
        }

    def write(self) -> None:
        staged = self.path.with_suffix(".new")
        self.net.write_config(staged, self.document())
        os.replace(staged, self.path)  # a reload never reads half a file

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Loble]:
        self.write()
        async with self.net.loble_process("run", "-c", str(self.path)) as child:
            self.child = child
            self.address = _host_port((await child.wait_json("listening"))["address"])
            self.metrics = _host_port((await child.wait_json("metrics endpoint"))["address"])
            self.admin = _host_port((await child.wait_json("admin API"))["address"])
            yield self

    @property
    def pid(self) -> int:
        return int(self.child.process.pid)

    async def reload(self) -> str:
        """SIGHUP with the file as it is now; what the reload line says changed."""
        self.write()
        done = len(self._reloaded())
        self.child.signal(signal.SIGHUP)
        await self.net.wait_for(lambda: len(self._reloaded()) > done, what="the reload applied")
        line = self._reloaded()[done]
        return " ".join(f"{k}={line[k]}" for k in ("added", "removed", "reweighted") if line[k])

    def _reloaded(self) -> list[dict[str, Any]]:
        """The ``configuration reloaded`` lines so far (each log line read once: the
        long soak's log is long)."""
        lines = self.child.lines
        for line in lines[self._scanned :]:
            if "configuration reloaded" in line:
                self._reloads.append(json.loads(line))
        self._scanned = len(lines)
        return self._reloads

    async def active_on(self, slot: Slot) -> int:
        """Connections Loble has on ``slot`` now, connecting or established."""
        code, text = await self.net.scrape(self.metrics)
        assert code == 200
        key = ("loble_backend_active_connections", frozenset({("backend", slot.address)}))
        return int(self.net.samples(text).get(key, 0))

    async def idle_cuts_on(self, slot: Slot) -> int:
        """Connections on ``slot`` Loble has ended at the idle timeout so far."""
        code, text = await self.net.scrape(self.metrics)
        assert code == 200
        labels = frozenset({("backend", slot.address), ("outcome", "idle_timeout")})
        return int(self.net.samples(text).get(("loble_connections_total", labels), 0))

    async def admin_state(self, index: int, action: str) -> None:
        status, answer = await self.net.admin_call(
            self.admin, "POST", f"/backends/{self.slots[index].address}/{action}", token="soak"
        )
        assert status == 200, answer

    async def status(self) -> dict[str, Any]:
        status, answer = await self.net.admin_call(self.admin, "GET", "/status")
        assert status == 200, answer
        found: dict[str, Any] = answer
        return found

    async def healthy(self) -> bool:
        status = await self.status()
        return all(b["state"] == "healthy" and b["admin"] == "ready" for b in status["backends"])

    async def settled(self) -> bool:
        """Every backend configured, healthy, ready; nothing in flight."""
        status = await self.status()
        backends = {b["address"]: b for b in status["backends"]}
        return status["in_flight"] == 0 and all(
            backends.get(slot.address, {}).get("state") == "healthy"
            and backends[slot.address]["admin"] == "ready"
            and not backends[slot.address]["removing"]
            for slot in self.slots
        )

    async def gauges(self) -> dict[str, float]:
        code, text = await self.net.scrape(self.metrics)
        assert code == 200
        samples = self.net.samples(text)
        figures = {
            "in_flight": samples[("loble_connections_in_flight", frozenset())],
            "tasks": samples[("loble_tasks", frozenset())],
            "pipes_in_use": samples[("loble_splice_pipes", frozenset({("state", "in_use")}))],
            "pipes_pooled": samples[("loble_splice_pipes", frozenset({("state", "pooled")}))],
            "active": sum(
                value
                for (name, _), value in samples.items()
                if name == "loble_backend_active_connections"
            ),
        }
        outcomes: Counter[str] = Counter()
        for (name, labels), value in samples.items():
            if name == "loble_connections_total":
                outcomes[dict(labels)["outcome"]] += int(value)
        figures.update({f"outcome {k}": v for k, v in sorted(outcomes.items()) if v})
        return figures

    async def terminate(self) -> dict[str, Any]:
        self.child.signal(signal.SIGTERM)
        with anyio.fail_after(DRAIN + 15):
            code = await self.child.process.wait()
        finished = self.child.json_lines("shutdown finished")
        return {
            "exit_code": code,
            "shutdown_finished": finished[0] if finished else None,
            "tracebacks": sum("Traceback" in line for line in self.child.lines),
        }


class HAProxy:
    """``haproxy -W`` (master-worker) with the same backends, checks and timeouts.

    Where Loble has no equal here: a reload (SIGUSR2 to the master) starts a
    new worker and leaves the old one to finish its connections, with no
    removal timeout; a drain is ``set server be/sN state drain`` on the
    master CLI; the shutdown is a soft stop (SIGUSR1) and, if it is still
    running :data:`DRAIN` seconds later, a hard one (SIGTERM), Loble's drain
    deadline. HAProxy counts neither its tasks nor, across its old workers,
    the connections on a backend, so the budget takes the bound that holds
    anyway: every client's connection, :data:`CONCURRENCY`. Its descriptors
    are the current worker's.
    """

    name = "haproxy"
    reload_signal = "SIGUSR2"

    def __init__(self, net: Any, directory: Path, slots: list[Slot]) -> None:
        self.net = net
        self.path = directory / "haproxy.cfg"
        self.cli = directory / "master.sock"
        self.slots = slots
        self.members = [slot.index for slot in slots]
        self.weights = {slot.index: 1 for slot in slots}
        self.process: Process | None = None
        self.lines: list[str] = []
        # The listener's port, as the backends': bound, never listening, so no
        # other socket takes it (HAProxy binds it with SO_REUSEPORT too).
        self.placeholder = socket.socket()
        self.placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.placeholder.bind(("127.0.0.1", 0))
        self.address: tuple[str, int] = ("127.0.0.1", int(self.placeholder.getsockname()[1]))
        self.worker = 0

    def write(self) -> None:
        servers = "\n".join(
            f"    server s{i} {self.slots[i].address} weight {self.weights[i]} check"
            for i in self.members
        )
        staged = self.path.with_suffix(".new")
        staged.write_text(
            f"""global
    master-worker
    maxconn 4000
defaults
    mode tcp
    timeout connect 1s
    timeout client {int(IDLE * 1000)}ms
    timeout server {int(IDLE * 1000)}ms
    retries 2
    option redispatch 1
frontend fe
    bind {self.address[0]}:{self.address[1]}
    default_backend be
backend be
    balance roundrobin
    default-server inter {int(PROBE_INTERVAL * 1000)}ms fall 2 rise 2
{servers}
""",
            encoding="utf-8",
        )
        os.replace(staged, self.path)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[HAProxy]:
        self.write()
        command = ["haproxy", "-W", "-db", "-S", str(self.cli), "-f", str(self.path)]
        try:
            async with await anyio.open_process(command, stderr=subprocess.PIPE) as process:
                self.process = process
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(self._collect)
                    try:
                        await self.net.wait_for(self._current, what="a haproxy worker")
                    except AssertionError:
                        raise AssertionError("\n".join(["no worker:", *self.lines])) from None
                    try:
                        yield self
                    finally:
                        if process.returncode is None:
                            process.kill()
                        with anyio.CancelScope(shield=True):
                            await process.wait()
        finally:
            self.placeholder.close()

    async def _collect(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.lines.extend(chunk.decode(errors="replace").splitlines())

    async def command(self, line: str) -> str:
        """One master CLI command (``@1 ...`` goes to the current worker). The
        master executes itself again at each reload: its CLI is away a moment."""
        answers: list[str] = []

        async def answered() -> bool:
            try:
                async with await anyio.connect_unix(str(self.cli)) as stream:
                    await stream.send(line.encode() + b"\n")
                    await stream.send_eof()  # one command: the CLI answers, then closes
                    answers.append((await self.net.read_all(stream)).decode())
            except (OSError, anyio.BrokenResourceError):
                return False
            return True

        await self.net.wait_for(answered, what=f"the master CLI answering {line!r}")
        return answers[0]

    async def _workers(self) -> tuple[int, list[int]]:
        """The current worker's pid (0 if none yet) and the old ones'."""
        current, old, section = 0, [], ""
        for row in (await self.command("show proc")).splitlines():
            if row.startswith("#"):
                section = row
                continue
            fields = row.split()
            if len(fields) > 1 and fields[1] == "worker":
                if "old" in section:
                    old.append(int(fields[0]))
                elif not current:
                    current = int(fields[0])
        return current, old

    async def _current(self) -> bool:
        self.worker = (await self._workers())[0]
        return bool(self.worker)

    @property
    def pid(self) -> int:
        return self.worker

    async def reload(self) -> str:
        self.write()
        before = self.worker
        assert self.process is not None
        self.process.send_signal(signal.SIGUSR2)

        async def new_worker() -> bool:
            return await self._current() and self.worker != before

        await self.net.wait_for(new_worker, what="a new haproxy worker")
        return f"worker {self.worker}"

    async def admin_state(self, index: int, action: str) -> None:
        answer = await self.command(f"@1 set server be/s{index} state {action}")
        assert not answer.strip(), answer

    async def stats(self) -> list[dict[str, str]]:
        text = (await self.command("@1 show stat")).lstrip("# ")
        return list(csv.DictReader(io.StringIO(text)))

    async def healthy(self) -> bool:
        rows = [r for r in await self.stats() if r["svname"].startswith("s")]
        return len(rows) == len(self.slots) and all(r["status"] == "UP" for r in rows)

    async def settled(self) -> bool:
        rows = await self.stats()
        frontend = [r for r in rows if r["svname"] == "FRONTEND"]
        return (
            await self.healthy()
            and int(frontend[0]["scur"]) == 0
            and not (await self._workers())[1]  # no old worker still draining
        )

    async def active_on(self, slot: Slot) -> int:
        return CONCURRENCY

    async def idle_cuts_on(self, slot: Slot) -> int | None:
        return None

    async def gauges(self) -> dict[str, Any]:
        rows = await self.stats()
        return {
            "in_flight": float(sum(int(r["scur"]) for r in rows if r["svname"] == "FRONTEND")),
            "tasks": None,
            "pipes_in_use": 0.0,
            "pipes_pooled": 0.0,
            "active": float(sum(int(r["scur"]) for r in rows if r["svname"].startswith("s"))),
        }

    async def terminate(self) -> dict[str, Any]:
        assert self.process is not None
        self.process.send_signal(signal.SIGUSR1)  # soft stop: finish what is open
        hard = False
        with anyio.move_on_after(DRAIN):
            await self.process.wait()
        if self.process.returncode is None:
            hard = True
            self.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):
            code = await self.process.wait()
        return {"exit_code": code, "hard_stopped": hard, "stderr": self.lines[-20:]}


Proxy = Loble | HAProxy
PROXIES: dict[str, type[Proxy]] = {"loble": Loble, "haproxy": HAProxy}


def _host_port(address: str) -> tuple[str, int]:
    address = address.removeprefix("http://").rstrip("/").removesuffix("/metrics")
    host, _, port = address.rpartition(":")
    return host, int(port)


# -- descriptors ------------------------------------------------------------------


def descriptors(pid: int) -> Counter[str]:
    """The process's open descriptors by kind: pipes, the anon inodes, files, and
    sockets as ``tcp listening``, ``tcp connection`` (any other state), ``unix``."""
    sockets = _socket_kinds(pid)
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed while listed
        if target.startswith("socket:["):
            kinds[sockets.get(int(target[8:-1]), "socket")] += 1
        else:
            kinds[target.split(":", 1)[0] if target.startswith("pipe:") else target] += 1
    return kinds


def _socket_kinds(pid: int) -> dict[int, str]:
    """Socket inodes in the process's network namespace, by kind."""
    kinds: dict[int, str] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/net/{table}") as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                listening = fields[3] == "0A"  # TCP_LISTEN
                kinds[int(fields[9])] = "tcp listening" if listening else "tcp connection"
    with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/net/unix") as rows:
        next(rows)
        for row in rows:
            kinds[int(row.split()[6])] = "unix"
    return kinds


# -- clients ----------------------------------------------------------------------


@dataclass
class Record:
    """One client connection, as the client saw it."""

    number: int
    phase: str
    start: float
    end: float = 0.0
    size: int = 0
    greeter: str = ""
    """The greeting's backend and incarnation, ``b2g0003`` ("" if none arrived)."""
    outcome: str = ""
    """completed, reset, refused, connect_error, closed_empty, corrupted, truncated, hang."""
    detail: str = ""
    checked: int = 0
    """Echoed payload bytes compared and found right."""
    cause: str = ""
    """For a failure, what in the chaos log explains it ("" if nothing does)."""

    @property
    def backend(self) -> tuple[int, int] | None:
        if not self.greeter:
            return None
        return int(self.greeter[1]), int(self.greeter[3:])


FAILED_HONESTLY = {"reset", "refused", "connect_error", "closed_empty"}


def plan(number: int) -> tuple[bytes, list[int], float]:
    """Connection ``number``'s payload, chunk sizes and pause after each chunk."""
    rng = random.Random(f"{SEED}/{number}")
    size = int(math.exp(rng.uniform(0, math.log(MAX_PAYLOAD))))
    payload = rng.randbytes(size)
    chunks = []
    left = size
    while left:
        chunk = min(left, int(math.exp(rng.uniform(0, math.log(MAX_CHUNK)))))
        chunks.append(chunk)
        left -= chunk
    pace = rng.uniform(0, PACE) * (3 if rng.random() < 0.1 else 1)
    return payload, chunks, min(MAX_PAUSE, pace / len(chunks))


class Load:
    """The clients: each connection checked byte for byte and recorded."""

    def __init__(self, address: tuple[str, int], slots: list[Slot]) -> None:
        self.address = address
        self.slots = slots
        self.records: list[Record] = []
        self.numbers = itertools.count()
        self.open = 0
        self.phase = "warmup"
        self.running = True

    def valid_greeting(self, greeting: bytes) -> bool:
        match = GREETING.fullmatch(greeting)
        if match is None:
            return False
        index, generation = int(match[1]), int(match[2])
        return index < len(self.slots) and 1 <= generation <= self.slots[index].generation

    async def worker(self) -> None:
        while self.running:
            record = await self.connection(next(self.numbers))
            if record.outcome != "completed":
                if self.phase == "final" and record.outcome == "refused":
                    return  # the listener is closed: the shutdown has begun
                await anyio.sleep(0.02)  # a client's back-off before it tries again

    async def connection(self, number: int) -> Record:
        payload, chunks, pause = plan(number)
        record = Record(number, self.phase, now(), size=len(payload))
        self.records.append(record)
        self.open += 1
        try:
            with anyio.fail_after(CONNECTION_BOUND):
                try:
                    stream = await anyio.connect_tcp(*self.address)
                except OSError as error:
                    if isinstance(error.__cause__ or error, ConnectionRefusedError):
                        record.outcome = "refused"
                    else:
                        record.outcome, record.detail = "connect_error", repr(error.__cause__)
                    return record
                attribute = anyio.abc.SocketAttribute
                if stream.extra(attribute.local_port) == stream.extra(attribute.remote_port, 0):
                    # Nothing listens on the port, and the kernel picked it as
                    # this socket's own: TCP's self-connect. Not a connection to
                    # the proxy at all. (No peer port at all: reset already, which
                    # the receiving side below sees.)
                    await stream.aclose()
                    record.outcome, record.detail = "refused", "self-connect"
                    return record
                async with stream:
                    async with anyio.create_task_group() as tasks:
                        tasks.start_soon(self._send, stream, payload, chunks, pause)
                        await self._receive(stream, record, payload)
                        tasks.cancel_scope.cancel()
                    if record.outcome != "completed":
                        with contextlib.suppress(OSError):
                            self._abort(stream)
        except TimeoutError:
            record.outcome = "hang"
        finally:
            record.end = now()
            self.open -= 1
        return record

    @staticmethod
    def _abort(stream: SocketStream) -> None:
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")

    @staticmethod
    async def _send(stream: SocketStream, payload: bytes, chunks: list[int], pause: float) -> None:
        offset = 0
        try:
            for chunk in chunks:
                await stream.send(payload[offset : offset + chunk])
                offset += chunk
                if pause:
                    await anyio.sleep(pause)
            await stream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the receiving side sees how it ended

    async def _receive(self, stream: SocketStream, record: Record, payload: bytes) -> None:
        head = b""
        position = 0
        while True:
            try:
                data = await stream.receive()
            except anyio.EndOfStream:
                if record.greeter and position == len(payload):
                    record.outcome = "completed"
                elif not head:
                    record.outcome = "closed_empty"  # nothing carried: honest, like a refusal
                else:
                    record.outcome = "truncated"
                    record.detail = f"clean EOF after {position} of {len(payload)} bytes"
                return
            except (anyio.BrokenResourceError, OSError) as error:
                record.outcome, record.detail = "reset", type(error).__name__
                return
            if not record.greeter:
                head += data
                if len(head) < 8:
                    continue
                greeting, data = head[:8], head[8:]
                if not self.valid_greeting(greeting):
                    record.outcome, record.detail = "corrupted", f"greeting {greeting!r}"
                    return
                record.greeter = greeting[:7].decode()
            if data:
                expected = payload[position : position + len(data)]
                if data != expected:
                    at = next(
                        (i for i, (a, b) in enumerate(zip(data, expected, strict=False)) if a != b),
                        len(expected),
                    )
                    record.outcome = "corrupted"
                    record.detail = f"byte {position + at} of {len(payload)} wrong"
                    return
                position += len(data)
                record.checked = position

    async def trickle(self, number: int, greeted: Callable[[], None]) -> Record:
        """Send one byte every 0.2 s until the stream ends; never EOF."""
        record = Record(number, "trickle", now())
        self.records.append(record)
        try:
            with anyio.fail_after(CONNECTION_BOUND):
                async with await anyio.connect_tcp(*self.address) as stream:
                    head = b""
                    while len(head) < 8:
                        head += await stream.receive()
                    assert self.valid_greeting(head[:8]), head
                    record.greeter = head[:7].decode()
                    greeted()
                    echoed = len(head) - 8
                    sent = 0
                    while True:
                        with anyio.move_on_after(0.2):
                            try:
                                echoed += len(await stream.receive())
                            except anyio.EndOfStream:
                                record.outcome = "truncated"
                                break
                            except (anyio.BrokenResourceError, OSError):
                                record.outcome = "reset"
                                break
                            continue
                        try:
                            await stream.send(b".")
                            sent += 1
                        except (anyio.BrokenResourceError, OSError):
                            record.outcome = "reset"
                            break
                    record.checked = echoed
                    record.detail = f"sent {sent}, echoed {echoed}"
        except TimeoutError:
            record.outcome = "hang"
        finally:
            record.end = now()
        return record


# -- chaos ------------------------------------------------------------------------


@dataclass
class Fault:
    """A span during which connections on one backend may legitimately fail."""

    kind: str
    """killed, frozen, reset, removed."""
    backend: int
    generation: int
    """The incarnation it hit (0 for removed: the address, whichever runs there)."""
    start: float
    end: float


HARD = ("killed", "frozen", "reset")


@dataclass
class Chaos:
    proxy: Proxy
    slots: list[Slot]
    seed: int
    started: float
    faults: list[Fault] = field(default_factory=list)
    log: list[tuple[float, str]] = field(default_factory=list)
    drains: list[tuple[int, float, float]] = field(default_factory=list)
    budget: list[tuple[str, int]] = field(default_factory=list)
    """Per fault, the most client connections it can fail (see :meth:`allow`)."""

    def allow(self, fault: str, connections: int) -> None:
        """Let ``fault`` fail up to ``connections`` client connections, plus
        :data:`SLACK` that may have reached the backend while it was counted."""
        self.budget.append((fault, connections + SLACK))

    def note(self, text: str) -> None:
        self.log.append((round(now() - self.started, 3), text))
        print(f"chaos {self.log[-1][0]:8.3f}  {text}", flush=True)  # live, with -s

    async def faults_lane(self, until: float) -> None:
        rng = random.Random(f"{self.seed}/faults")
        kinds = ["kill", "freeze", "reset"]
        rng.shuffle(kinds)  # each kind once first, then at random
        for step in itertools.count():
            await anyio.sleep(rng.uniform(0.4, 1.2))
            if now() >= until:
                return
            kind = kinds[step] if step < len(kinds) else rng.choice(kinds)
            slot = rng.choice(self.slots)
            generation, begun = slot.generation, now()
            if kind == "kill":
                # It can fail what it carries: the connects it refuses are retried.
                on_it = await self.proxy.active_on(slot)
                await slot.kill()
                self.note(f"SIGKILL b{slot.index} (incarnation {generation}), {on_it} on it")
                self.allow(f"kill b{slot.index}", on_it)
                await anyio.sleep(rng.uniform(1.0, 2.5))
                await slot.start()
                self.note(f"restarted b{slot.index} as incarnation {slot.generation}")
                self.faults.append(Fault("killed", slot.index, generation, begun, now()))
            elif kind == "freeze":
                cut_before = await self.proxy.idle_cuts_on(slot)
                slot.signal(signal.SIGSTOP)
                self.note(f"SIGSTOP b{slot.index}")
                await anyio.sleep(rng.uniform(IDLE + 0.5, IDLE + 1.5))
                # Its connects still succeed (the kernel's backlog) and stall: it can
                # fail what it carried while frozen, those cut at the idle timeout
                # meanwhile and those still on it.
                carried = await self.proxy.active_on(slot)
                cut_after = await self.proxy.idle_cuts_on(slot)
                if cut_before is None or cut_after is None:  # not counted: the bound
                    carried = int(CONCURRENCY * (1 + (now() - begun) / IDLE))
                else:
                    carried += cut_after - cut_before
                slot.signal(signal.SIGCONT)
                self.note(f"SIGCONT b{slot.index} after {now() - begun:.2f} s, {carried} carried")
                self.allow(f"freeze b{slot.index}", carried)
                self.faults.append(Fault("frozen", slot.index, generation, begun, now()))
            else:
                slot.signal(signal.SIGUSR1)
                line = await slot.line("reset")  # written once every connection is reset
                self.note(f"SIGUSR1 b{slot.index}: {line}")
                self.allow(f"reset b{slot.index}", int(line.split()[1]))
                self.faults.append(Fault("reset", slot.index, generation, begun, now()))

    async def operations_lane(self, until: float) -> None:
        rng = random.Random(f"{self.seed}/operations")
        kinds = ["reweight", "remove", "drain"]
        rng.shuffle(kinds)
        proxy = self.proxy
        for step in itertools.count():
            await anyio.sleep(rng.uniform(0.5, 1.5))
            if now() >= until:
                return
            kind = kinds[step] if step < len(kinds) else rng.choice(kinds)
            slot = rng.choice(self.slots)
            if kind == "reweight":
                proxy.weights[slot.index] = rng.choice(
                    [w for w in (1, 2, 3, 5) if w != proxy.weights[slot.index]]
                )
                done = await proxy.reload()
                self.note(
                    f"{proxy.reload_signal}: b{slot.index} weight {proxy.weights[slot.index]} ({done})"
                )
            elif kind == "remove":
                begun = now()
                proxy.members.remove(slot.index)
                done = await proxy.reload()
                on_it = await proxy.active_on(slot)  # no new ones from now on
                self.note(f"{proxy.reload_signal}: b{slot.index} removed ({done}), {on_it} on it")
                self.allow(f"remove b{slot.index}", on_it)
                # Mostly past the removal timeout (what it still carries is cut),
                # sometimes before it (nothing may be cut).
                late = rng.random() < 0.7
                await anyio.sleep(
                    rng.uniform(REMOVAL + 0.3, REMOVAL + 2.0) if late else rng.uniform(0.1, 0.5)
                )
                proxy.members = sorted([*proxy.members, slot.index])
                done = await proxy.reload()
                self.note(f"{proxy.reload_signal}: b{slot.index} added back ({done})")
                self.faults.append(Fault("removed", slot.index, 0, begun, now()))
            else:
                begun = now()
                await proxy.admin_state(slot.index, "drain")
                self.note(f"admin: b{slot.index} drain")
                await anyio.sleep(rng.uniform(1.0, 2.5))
                await proxy.admin_state(slot.index, "ready")
                self.note(f"admin: b{slot.index} ready")
                self.drains.append((slot.index, begun, now()))


async def progress(load: Load, chaos: Chaos) -> None:
    """A line every few seconds (seen with -s): connections so far, by outcome."""
    while load.running:
        await anyio.sleep(5)
        outcomes = Counter(r.outcome or "open" for r in load.records)
        print(f"chaos {now() - chaos.started:8.3f}  clients: {dict(outcomes)}", flush=True)


def explain(record: Record, faults: list[Fault], terminated: float) -> str:
    """The cause of a failure in the chaos log, or "" if there is none.

    With faults overlapping, several may explain one failure: the one named is
    the one whose effect came last before the connection ended."""
    backend = record.backend

    def during(fault: Fault, start: float) -> bool:
        return record.start <= fault.end + EPSILON and record.end >= start - EPSILON

    def effect(fault: Fault) -> float:
        """When ``fault`` could have ended this connection, at the earliest."""
        if fault.kind == "frozen":  # at the idle timeout, counted from the freeze
            return max(fault.start, record.start) + IDLE
        if fault.kind == "removed":  # at the removal timeout
            return fault.start + REMOVAL
        return fault.start

    causes: list[tuple[float, str]] = []
    for fault in faults:
        if backend is None:
            if fault.kind in HARD and during(fault, fault.start):
                causes.append((effect(fault), f"no greeting, a backend {fault.kind}"))
        elif fault.backend == backend[0]:
            if fault.kind == "removed":
                # Cut only once the removal timeout has passed, and only if it
                # passed before the backend was added back (which cancels the cut).
                deadline = effect(fault)
                if fault.end >= deadline - EPSILON and during(fault, deadline):
                    causes.append((deadline, "its backend removed"))
            elif fault.generation == backend[1] and during(fault, fault.start):
                causes.append((effect(fault), f"its backend {fault.kind}"))
    if causes:
        return max([c for c in causes if c[0] <= record.end + EPSILON] or causes)[1]
    if record.end >= terminated - EPSILON:
        if record.outcome == "refused":
            return "refused after SIGTERM"
        if backend is None:
            return "no greeting, closed at SIGTERM"
        if record.end >= terminated + DRAIN - EPSILON:
            return "cut at the drain deadline"
    return ""


# -- the soak ---------------------------------------------------------------------


async def test_chaos_soak(net: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if DATA_PATH:
        monkeypatch.setenv("LOBLE_DATA_PATH", DATA_PATH)
    if COPY:
        monkeypatch.setenv("LOBLE_COPY", COPY)
    assert PROXY in PROXIES, f"LOBLE_SOAK_PROXY={PROXY!r}: one of {sorted(PROXIES)}"
    report: dict[str, Any] = {
        "proxy": PROXY,
        "seed": SEED,
        "chaos_seconds": SECONDS,
        "runtime": RUNTIME,
        "data_path": DATA_PATH or "default",
        "copy": COPY or "default",
        "backends": BACKENDS,
        "concurrency": CONCURRENCY,
        "idle_timeout": IDLE,
        "drain_timeout": DRAIN,
        "removal_timeout": REMOVAL,
        "commit": _commit(),
        "cpus": os.cpu_count(),
    }
    began = now()
    slots = [Slot(index) for index in range(BACKENDS)]
    try:
        with anyio.fail_after(SECONDS + 120):
            for slot in slots:
                await slot.start()
            proxy = PROXIES[PROXY](net, tmp_path, slots)
            async with proxy.running():
                await soak(net, proxy, slots, report)
    finally:
        for slot in slots:
            await slot.close()
    report["wall_seconds"] = round(now() - began, 1)
    verdict(report)


async def soak(net: Any, proxy: Proxy, slots: list[Slot], report: dict[str, Any]) -> None:
    await net.wait_for(proxy.settled, what="every backend healthy")
    load = Load(proxy.address, slots)

    # Warm-up traffic; then the figures at rest.
    async with anyio.create_task_group() as clients:
        for _ in range(CONCURRENCY):
            clients.start_soon(load.worker)
        await net.wait_for(lambda: len(load.records) >= 200, what="the warm-up's connections")
        load.running = False
    await net.wait_for(proxy.settled, what="rest after the warm-up")
    before = await rest_figures(net, proxy)

    # The chaos, under traffic.
    load.phase, load.running = "chaos", True
    chaos = Chaos(proxy, slots, SEED, now())
    until = now() + SECONDS
    async with anyio.create_task_group() as clients:
        for _ in range(CONCURRENCY):
            clients.start_soon(load.worker)
        clients.start_soon(progress, load, chaos)
        async with anyio.create_task_group() as lanes:
            lanes.start_soon(chaos.faults_lane, until)
            lanes.start_soon(chaos.operations_lane, until)
        chaos.note("chaos over: every backend running, configured and ready")
        # Traffic goes on until Loble sees every backend healthy again.
        await net.wait_for(proxy.healthy, timeout=IDLE + 10, what="every backend healthy again")
        load.running = False
    chaos.note("clients done")
    await net.wait_for(proxy.settled, what="rest after the chaos")
    after = await rest_figures(net, proxy, like=before)
    report["at_rest_before"], report["at_rest_after"] = before, after

    # SIGTERM with connections in flight; three trickle until the deadline cuts them.
    load.phase, load.running = "final", True
    greeted: list[int] = []
    trickles: list[Record] = []

    async def trickle(number: int) -> None:
        trickles.append(await load.trickle(number, lambda: greeted.append(number)))

    async with anyio.create_task_group() as clients:
        for number in range(TRICKLES):
            clients.start_soon(trickle, -1 - number)
        for _ in range(CONCURRENCY):
            clients.start_soon(load.worker)
        await net.wait_for(
            lambda: len(greeted) == TRICKLES and load.open >= CONCURRENCY // 2,
            what="connections in flight",
        )
        terminated = now()
        chaos.note(f"SIGTERM with {load.open} clients in flight")
        report["shutdown"] = await proxy.terminate()
        load.running = False
        chaos.note("loble exited")

    # Every failure explained?
    for record in load.records:
        if record.outcome in FAILED_HONESTLY:
            record.cause = explain(record, chaos.faults, terminated)
    report["trickles"] = [relative(record, chaos.started) for record in trickles]
    summarize(load.records, report, chaos.started)
    before_sigterm = report["connections"]["before_sigterm"]
    allowed = sum(most for _, most in chaos.budget)
    report["connections"]["failures_the_faults_allow"] = allowed
    report["connections"]["completed_floor_from_the_schedule"] = round(
        1 - allowed / before_sigterm, 4
    )
    report["budget"] = [f"{fault}: {most}" for fault, most in chaos.budget]
    report["chaos"] = [f"{at:8.3f}  {text}" for at, text in chaos.log]
    report["faults"] = [
        {
            **asdict(f),
            "start": round(f.start - chaos.started, 3),
            "end": round(f.end - chaos.started, 3),
        }
        for f in chaos.faults
    ]
    report["terminated_at"] = round(terminated - chaos.started, 3)


async def rest_figures(
    net: Any, proxy: Proxy, like: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Descriptors by kind and the gauges, at rest: no TCP connection open (a probe,
    the last scrape's connection may be a moment away from closed) and the same
    figures three reads in a row. With ``like``, wait (bounded) for the same
    figures as those; the verdict says what differs if they never come."""
    figures: dict[str, Any] = {}
    readings: list[tuple[dict[str, int], float]] = []

    async def read() -> bool:
        figures["descriptors"] = dict(sorted(descriptors(proxy.pid).items()))
        if "tcp connection" in figures["descriptors"]:
            readings.clear()
            return False
        figures.update(await proxy.gauges())
        figures["besides_pooled_pipes"] = besides_pipes(figures)
        readings.append((figures["besides_pooled_pipes"], figures["tasks"]))
        if like is not None:
            return readings[-1] == (like["besides_pooled_pipes"], like["tasks"])
        return len(readings) >= 3 and readings[-1] == readings[-2] == readings[-3]

    with contextlib.suppress(AssertionError):
        await net.wait_for(read, what="the figures at rest")
    return figures


def besides_pipes(figures: dict[str, Any]) -> dict[str, int]:
    """The descriptors by kind, less two per splice pipe Loble counts."""
    kinds = dict(figures["descriptors"])
    pipes = int(figures["pipes_in_use"] + figures["pipes_pooled"])
    kinds["pipe"] = kinds.get("pipe", 0) - 2 * pipes
    return kinds


def relative(record: Record, origin: float) -> dict[str, Any]:
    """A record as the report shows it: times in seconds since the chaos began."""
    return {
        **asdict(record),
        "start": round(record.start - origin, 3),
        "end": round(record.end - origin, 3),
    }


def summarize(records: list[Record], report: dict[str, Any], origin: float) -> None:
    chaos = [r for r in records if r.phase in ("warmup", "chaos")]
    final = [r for r in records if r.phase == "final"]
    outcomes = Counter(r.outcome for r in records if r.phase != "trickle")
    causes = Counter(r.cause or "UNEXPLAINED" for r in records if r.outcome in FAILED_HONESTLY)
    completed = sum(r.outcome == "completed" for r in chaos)
    report["connections"] = {
        "tried": len(records),
        "completed": outcomes["completed"],
        "failed_honestly": sum(outcomes[o] for o in FAILED_HONESTLY),
        "failed_by_what_the_client_saw": {o: outcomes[o] for o in sorted(FAILED_HONESTLY)},
        "failed_by_cause": dict(causes.most_common()),
        "corrupted": outcomes["corrupted"],
        "truncated_looking_complete": outcomes["truncated"],
        "hung": outcomes["hang"],
        "unexplained": causes["UNEXPLAINED"],
        "before_sigterm": len(chaos),
        "completed_before_sigterm": completed,
        "completed_share_before_sigterm": round(completed / max(1, len(chaos)), 4),
        "in_the_final_phase": len(final),
        "completed_in_the_final_phase": sum(r.outcome == "completed" for r in final),
        "payload_bytes_checked": sum(r.checked for r in records),
        "greeted_by": dict(sorted(Counter(r.greeter[:2] for r in records if r.greeter).items())),
    }
    samples: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.outcome in FAILED_HONESTLY and len(samples.setdefault(r.cause, [])) < 2:
            samples[r.cause].append(relative(r, origin))
    report["failure_samples"] = samples
    report["wrong"] = [
        relative(r, origin)
        for r in records
        if r.outcome in ("corrupted", "truncated", "hang")
        or (r.outcome in FAILED_HONESTLY and not r.cause)
    ][:50]


def verdict(report: dict[str, Any]) -> None:
    print(figures(report))
    if REPORT:
        Path(REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    connections = report["connections"]
    before, after = report["at_rest_before"], report["at_rest_after"]
    assert connections["corrupted"] == 0, report["wrong"]
    assert connections["truncated_looking_complete"] == 0, report["wrong"]
    assert connections["hung"] == 0, report["wrong"]
    assert connections["unexplained"] == 0, report["wrong"]
    assert (
        connections["completed_share_before_sigterm"]
        >= connections["completed_floor_from_the_schedule"]
    ), report["budget"]
    assert before["besides_pooled_pipes"] == after["besides_pooled_pipes"], (before, after)
    assert before["pipes_in_use"] == after["pipes_in_use"] == 0, (before, after)
    assert before["tasks"] == after["tasks"], (before, after)
    assert after["in_flight"] == 0 and after["active"] == 0, after
    shutdown = report["shutdown"]
    assert shutdown["exit_code"] == 0, shutdown
    if report["proxy"] == "loble":
        # Loble's own count agrees with the clients': every connection it calls
        # completed, they found whole, and it counted each one they made.
        counted = {k[8:]: v for k, v in after.items() if k.startswith("outcome ")}
        assert counted.get("completed", 0) == connections["completed_before_sigterm"], counted
        assert sum(counted.values()) == connections["before_sigterm"], counted
        assert shutdown["shutdown_finished"] is not None, shutdown
        assert shutdown["shutdown_finished"]["cut"] >= TRICKLES, shutdown
        assert shutdown["tracebacks"] == 0, shutdown
    for trickle in report["trickles"]:
        assert trickle["outcome"] == "reset", trickle  # cut at the deadline: never a FIN
        assert trickle["cause"] == "cut at the drain deadline", trickle


def figures(report: dict[str, Any]) -> str:
    """The figures, as the end of a ``-s`` run prints them."""
    c = report["connections"]
    before, after = report["at_rest_before"], report["at_rest_after"]
    shutdown = report["shutdown"]
    finished = shutdown.get("shutdown_finished") or {}
    lines = [
        f"chaos soak: {report['proxy']} ({report['runtime']}, data path {report['data_path']},"
        f" copy {report['copy']}), seed {report['seed']}, {report['chaos_seconds']:g} s of"
        f" chaos, {report['wall_seconds']} s in all",
        f"connections tried {c['tried']}: completed {c['completed']}, failed honestly"
        f" {c['failed_honestly']}, corrupted {c['corrupted']}, truncated-looking-complete"
        f" {c['truncated_looking_complete']}, hung {c['hung']}, unexplained {c['unexplained']}",
        f"failed by cause: {c['failed_by_cause']}",
        f"failed as the clients saw it: {c['failed_by_what_the_client_saw']}",
        f"completed before SIGTERM: {c['completed_share_before_sigterm']:.2%} of"
        f" {c['before_sigterm']} (floor from the schedule"
        f" {c['completed_floor_from_the_schedule']:.2%}: the faults may fail"
        f" {c['failures_the_faults_allow']})",
        f"payload bytes checked: {c['payload_bytes_checked']:,}",
        f"descriptors at rest: before {before['descriptors']}, after {after['descriptors']};"
        f" splice pipes pooled {before['pipes_pooled']:g} -> {after['pipes_pooled']:g},"
        f" in use {before['pipes_in_use']:g} -> {after['pipes_in_use']:g}",
        f"tasks at rest: before {before['tasks']}, after {after['tasks']};"
        f" in flight after {after['in_flight']:g}",
        f"shutdown: exit {shutdown['exit_code']}, cut {finished.get('cut')},"
        f" took {finished.get('took')} s, hard stop {shutdown.get('hard_stopped')}",
    ]
    lines += [f"WRONG: {wrong}" for wrong in report["wrong"][:10]]
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty", "--exclude", "*"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
