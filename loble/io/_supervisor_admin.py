"""With ``workers = N``: one admin API for the whole process, served by the supervisor.

Each worker is a complete daemon with its own core, so each has its own
admin API; an operator should not have to find N of them. The supervisor
(:mod:`._workers`) therefore:

* binds ``[admin] address`` itself and serves the one :func:`~._admin.admin_app`
  there, over :class:`SupervisorControl`, in a background thread with its
  own asyncio loop (:class:`SupervisorAdmin`): its main thread stays in its
  ``os.wait()`` loop and its signal handlers, untouched;
* binds, for each worker, a private listening socket on loopback (port 0)
  and hands it to the worker as an inherited descriptor named by
  :data:`WORKER_ADMIN_FD_ENV` (an internal interface, as ``LOBLE_WORKER``
  is); the worker serves its own admin API there and nowhere else.

:class:`SupervisorControl` answers the admin API by asking the workers,
with the same ``[admin] token`` (the check itself stays in ``admin_app``):
``GET /status`` asks every worker and sums what they say
(:func:`combined_status`); a change is sent to every worker and succeeds
only if every worker applied it; ``POST /reload`` validates the file once,
as the supervisor's SIGHUP handler does, then asks every worker to reload.

HTTP to the workers is the standard library's :mod:`urllib.request`, one
blocking request per worker in a thread, all at once: a short bounded
request to loopback needs no client of its own. It decides nothing about
backends: every change is applied by each worker's core.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from loble import __version__
from loble.config import load_config
from loble.core import AdminInput, ConfigError, LobleError

from ._admin import ADMIN_ACTIONS, UnknownBackend, admin_app
from ._datapath import format_address
from ._http import GRACEFUL_SECONDS, bind_tcp, serve_asgi
from ._logging import log

__all__ = [
    "WORKER_ADMIN_FD_ENV",
    "SupervisorAdmin",
    "SupervisorControl",
    "WorkerAdmin",
    "WorkerReply",
    "bind_worker_admin",
    "check_reload",
    "combined_status",
    "worker_admin_socket",
]

WORKER_ADMIN_FD_ENV = "LOBLE_WORKER_ADMIN_FD"
"""Set by the supervisor in each worker: the descriptor of its private admin socket."""

STATUS_TIMEOUT = 1.0
"""Seconds a worker may take to answer ``GET /status`` before it counts as unreachable."""

CHANGE_TIMEOUT = 5.0
"""Seconds a worker may take to apply a change or a reload."""

_HEALTH_ORDER = ("healthy", "draining", "unhealthy")
_ADMIN_ORDER = ("ready", "drain", "maint")
_PROCESS_ORDER = ("running", "draining", "stopped")
"""Each from best to worst: where workers disagree, the sum shows the worst."""

_SUMMED = (
    "active_connections",
    "peak_connections",
    "max_connections",
    "bytes_to_backend",
    "bytes_to_client",
)


# -- the workers' side -------------------------------------------------------------------


def bind_worker_admin() -> socket.socket:
    """A worker's private admin socket: listening on loopback, port chosen by the OS."""
    return bind_tcp("127.0.0.1:0", "admin.address")


def worker_admin_socket() -> socket.socket | None:
    """In a worker: the admin socket its supervisor bound for it, or None."""
    value = os.environ.get(WORKER_ADMIN_FD_ENV)
    if not value:
        return None
    sock = socket.socket(fileno=int(value))
    sock.setblocking(False)
    return sock


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerAdmin:
    """Where the supervisor reaches one worker's admin API."""

    index: int
    pid: int
    address: tuple[str, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerReply:
    """One worker's answer: ``status`` (HTTP) and ``document``; status 0 if unreachable."""

    worker: WorkerAdmin
    status: int
    document: dict[str, Any]
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


# -- validating a reload once ------------------------------------------------------------


def check_reload(config_path: str, logger: logging.Logger) -> None:
    """Validate the file every worker is about to reload; log and raise every problem."""
    try:
        load_config(config_path)
    except ConfigError as error:
        problems = str(error).splitlines()
        log(
            logger,
            logging.ERROR,
            "reload rejected: the running configuration stays",
            errors=len(problems),
        )
        for problem in problems:
            log(logger, logging.ERROR, "reload error", error=problem)
        raise


# -- summing the workers' status ---------------------------------------------------------


def combined_status(
    replies: Sequence[WorkerReply], *, uptime: float, pid: int | None = None
) -> dict[str, object]:
    """One status document for the whole process from each worker's own.

    Per backend, counts add up (active and peak connections, connections by
    outcome, bytes); state, admin state and weight are each worker's, listed
    under ``workers``, and the backend's own is the worst of them (the first
    worker's weight). The process's ``in_flight`` is the sum, its state the
    worst, and ``workers`` lists every worker, reachable (``ok``) or not.
    """
    answered = [reply for reply in replies if reply.ok]
    backends: dict[str, dict[str, Any]] = {}
    for reply in answered:
        for backend in reply.document.get("backends", []):
            _add_backend(backends, reply.worker.index, backend)
    documents = [reply.document for reply in answered]
    listeners: list[str] = []
    for document in documents:
        listeners.extend(a for a in document.get("listeners", []) if a not in listeners)
    eligible = [
        address
        for address in backends
        if documents and all(address in document.get("eligible", []) for document in documents)
    ]
    return {
        "version": __version__,
        "pid": os.getpid() if pid is None else pid,
        "worker": None,
        "uptime": round(uptime, 3),
        "listeners": listeners,
        "process": _worst(_PROCESS_ORDER, [d.get("process") for d in documents])
        if documents
        else "unreachable",
        "accepting": bool(documents) and all(d.get("accepting") for d in documents),
        "in_flight": sum(int(d.get("in_flight", 0)) for d in documents),
        "queued": sum(int(d.get("queued", 0)) for d in documents),
        "snapshot_version": max((int(d.get("snapshot_version", 0)) for d in documents), default=0),
        "eligible": eligible,
        "backends": list(backends.values()),
        "workers": [_worker_line(reply) for reply in replies],
    }


def _add_backend(backends: dict[str, dict[str, Any]], index: int, backend: dict[str, Any]) -> None:
    address = backend["address"]
    mine = {
        "worker": index,
        "state": backend.get("state"),
        "admin": backend.get("admin"),
        "weight": backend.get("weight"),
        "active_connections": backend.get("active_connections", 0),
    }
    total = backends.get(address)
    if total is None:
        total = backends[address] = {
            **backend,
            "connections": dict(backend.get("connections", {})),
            "workers": [mine],
        }
        return
    total["workers"].append(mine)
    for key in _SUMMED:
        total[key] = total.get(key, 0) + backend.get(key, 0)
    for outcome, count in backend.get("connections", {}).items():
        total["connections"][outcome] = total["connections"].get(outcome, 0) + count
    total["state"] = _worst(_HEALTH_ORDER, [total["state"], backend.get("state")])
    total["admin"] = _worst(_ADMIN_ORDER, [total["admin"], backend.get("admin")])
    total["removing"] = bool(total.get("removing") or backend.get("removing"))
    # The most recent health change and probe, with the reason and result that go with them.
    if _sooner(backend.get("since_seconds"), total.get("since_seconds")):
        total["since_seconds"], total["reason"] = backend["since_seconds"], backend.get("reason")
    if _sooner(backend.get("last_probe_seconds"), total.get("last_probe_seconds")):
        total["last_probe_seconds"] = backend["last_probe_seconds"]
        total["last_probe_ok"] = backend.get("last_probe_ok")


def _sooner(age: object, than: object) -> bool:
    """Whether ``age`` (seconds ago, or None for never) is more recent than ``than``."""
    if not isinstance(age, int | float):
        return False
    return not isinstance(than, int | float) or age < than


def _worst(order: Sequence[str], values: Sequence[object]) -> object:
    """The value furthest along ``order``; one it does not know wins (it is news)."""
    return max(values, key=lambda value: order.index(value) if value in order else len(order))


def _worker_brief(reply: WorkerReply) -> dict[str, object]:
    """Which worker, and whether it answered (if not, why)."""
    line: dict[str, object] = {"worker": reply.worker.index, "pid": reply.worker.pid}
    line["ok"] = reply.ok
    if not reply.ok:
        line["error"] = reply.error
    return line


def _worker_line(reply: WorkerReply) -> dict[str, object]:
    """A worker in the status document: with its process state, in flight and snapshot."""
    line = _worker_brief(reply)
    if reply.ok:
        for key in ("process", "in_flight", "snapshot_version"):
            line[key] = reply.document.get(key)
    return line


# -- the supervisor's Control ------------------------------------------------------------


class SupervisorControl:
    """The admin API's :class:`~._admin.Control` for a supervisor: every worker, as one.

    ``workers`` is replaced (never changed in place) by the supervisor's
    thread as it starts them, and read by the admin API's thread.
    """

    def __init__(self, config_path: str, token: str, logger: logging.Logger) -> None:
        self.config_path = config_path
        self.token = token
        self.logger = logger
        self.workers: tuple[WorkerAdmin, ...] = ()
        self._started = time.monotonic()

    async def status(self) -> dict[str, object]:
        replies = await self._ask_all("GET", "/status", timeout=STATUS_TIMEOUT)
        return combined_status(replies, uptime=time.monotonic() - self._started)

    async def admin(self, address: str, admin_input: AdminInput) -> dict[str, object]:
        (action,) = [name for name, value in ADMIN_ACTIONS.items() if value is admin_input]
        return await self._change(address, action, None)

    async def set_weight(self, address: str, weight: int) -> dict[str, object]:
        return await self._change(address, "weight", {"weight": weight})

    async def set_max_connections(self, address: str, limit: int) -> dict[str, object]:
        # Each worker's limit, as the configured one is per process.
        return await self._change(address, "max_connections", {"max_connections": limit})

    async def reload(self) -> dict[str, object]:
        check_reload(self.config_path, self.logger)  # an invalid file reaches no worker
        log(self.logger, logging.INFO, "reloading every worker", workers=len(self.workers))
        replies = await self._ask_all("POST", "/reload", timeout=CHANGE_TIMEOUT)
        first = self._all_or_error(replies, "reload")
        return {**first, "workers": [_worker_brief(reply) for reply in replies]}

    async def _change(
        self, address: str, action: str, body: dict[str, object] | None
    ) -> dict[str, object]:
        path = f"/backends/{urllib.parse.quote(address, safe='')}/{action}"
        replies = await self._ask_all("POST", path, body, timeout=CHANGE_TIMEOUT)
        answer = dict(self._all_or_error(replies, f"{action} {address}"))
        mine = [
            {"worker": r.worker.index, **{k: v for k, v in r.document.items() if k != "address"}}
            for r in replies
        ]
        answer["state"] = _worst(_HEALTH_ORDER, [line.get("state") for line in mine])
        answer["workers"] = mine
        return answer

    def _all_or_error(self, replies: Sequence[WorkerReply], what: str) -> dict[str, Any]:
        """The first worker's answer if every worker succeeded; else why not, as LobleError."""
        if not replies:
            raise LobleError(f"{what}: no worker is running")
        failed = [reply for reply in replies if not reply.ok]
        if not failed:
            return replies[0].document
        if len(failed) == len(replies) and len({(r.status, r.error) for r in failed}) == 1:
            # Every worker refused alike (an unknown backend, a bad weight): say it as one.
            error, status = failed[0].error, failed[0].status
            raise UnknownBackend(error) if status == 404 else LobleError(error)
        done = [str(reply.worker.index) for reply in replies if reply.ok]
        reasons = "; ".join(
            f"worker {reply.worker.index} (pid {reply.worker.pid}): {reply.error}"
            for reply in failed
        )
        reached = f"applied by worker {', '.join(done)}, " if done else ""
        raise LobleError(f"{what}: {reached}failed on {reasons}")

    async def _ask_all(
        self, method: str, path: str, body: dict[str, object] | None = None, *, timeout: float
    ) -> list[WorkerReply]:
        workers = self.workers
        replies: list[WorkerReply | None] = [None] * len(workers)

        async def ask(position: int, worker: WorkerAdmin) -> None:
            replies[position] = await anyio.to_thread.run_sync(
                self._ask, worker, method, path, body, timeout
            )

        async with anyio.create_task_group() as tasks:
            for position, worker in enumerate(workers):
                tasks.start_soon(ask, position, worker)
        return [reply for reply in replies if reply is not None]

    def _ask(
        self,
        worker: WorkerAdmin,
        method: str,
        path: str,
        body: dict[str, object] | None,
        timeout: float,
    ) -> WorkerReply:
        """One request to one worker (blocking, in a thread); never raises."""
        url = f"http://{format_address(*worker.address)}{path}"
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        if method == "POST" and data is None:
            data = b""
        request = urllib.request.Request(url, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return _reply(worker, response.status, response.read())
        except urllib.error.HTTPError as error:
            with error:
                return _reply(worker, error.code, error.read())
        except urllib.error.URLError as error:
            return _unreachable(worker, error.reason)
        except OSError as error:  # a timeout or a reset while reading the answer
            return _unreachable(worker, error)


def _reply(worker: WorkerAdmin, status: int, raw: bytes) -> WorkerReply:
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return WorkerReply(worker=worker, status=status or 500, document={}, error="no JSON")
    error = "" if status == 200 else str(document.get("error", f"status {status}"))
    return WorkerReply(worker=worker, status=status, document=document, error=error)


def _unreachable(worker: WorkerAdmin, reason: object) -> WorkerReply:
    if isinstance(reason, OSError):
        reason = reason.strerror or str(reason) or type(reason).__name__
    return WorkerReply(worker=worker, status=0, document={}, error=f"unreachable: {reason}")


# -- serving it beside the supervisor's main thread --------------------------------------


class SupervisorAdmin:
    """``admin_app`` over a :class:`SupervisorControl`, in a thread with its own loop.

    :meth:`start` serves on the listening ``sock`` (which it takes over);
    :meth:`close` stops serving (requests in progress get
    :data:`~._http.GRACEFUL_SECONDS`) and ends the thread.
    """

    def __init__(self, control: SupervisorControl, sock: socket.socket, token: str) -> None:
        self.control = control
        host, port = sock.getsockname()[:2]
        self.address = (str(host), int(port))
        self._sock = sock
        self._token = token
        self._running: contextlib.AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._stop: anyio.Event | None = None
        self._served: Future[None] | None = None

    def start(self) -> None:
        logger = self.control.logger
        app = admin_app(self.control, self._token, logger)
        with _signals_blocked():  # the thread inherits the mask: signals go to the main thread
            self._running = start_blocking_portal("asyncio", name="loble-admin")
            portal = self._portal = self._running.__enter__()
        self._stop = portal.call(anyio.Event)
        self._served = portal.start_task_soon(serve_asgi, app, self._sock, logger, self._stop)
        log(
            logger,
            logging.INFO,
            "admin API",
            address=f"http://{format_address(*self.address)}/",
            changes="refused: no token" if not self._token else "with the token",
            workers="every worker",
        )

    def close(self) -> None:
        running, portal = self._running, self._portal
        if running is None or portal is None:
            self._sock.close()  # never started: the socket is still ours
            return
        self._running = self._portal = None
        try:
            assert self._stop is not None and self._served is not None
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                portal.call(self._stop.set)
            with contextlib.suppress(Exception):  # hypercorn logged it; we are exiting anyway
                self._served.result(timeout=GRACEFUL_SECONDS + 1.0)
        finally:
            running.__exit__(None, None, None)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    # A signal the kernel hands to the admin thread would not interrupt the
    # main thread's os.wait(), so a SIGTERM to forward would wait for some
    # worker to exit first. Blocked in every thread but the main one, each
    # signal reaches the main thread, where the supervisor's handlers run.
    watched = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
