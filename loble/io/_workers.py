"""``[runtime] workers = N``: N worker processes sharing the listening port.

One Loble process is one event loop on one core. With ``workers = N`` the
``loble run`` process becomes a small supervisor: it starts N copies of
itself (the workers), each a complete, independent daemon with its own core,
that listen on the same address with ``SO_REUSEPORT``, so the kernel spreads
new connections over them.

The supervisor:

* resolves a listener port of 0 once, so every worker listens on the same
  port: it binds (never listens on) a ``SO_REUSEPORT`` socket and keeps it
  for its lifetime, which also keeps the port reserved;
* forwards SIGTERM and SIGINT to every worker (a first signal drains, a
  second cuts, exactly as with one process), and on SIGHUP validates the
  configuration file once and, if it is valid, sends SIGHUP to every worker,
  each of which reloads it (an invalid file is logged and reaches none);
* writes ``[runtime] pid_file`` (its own pid: the one ``loble reload``
  signals). Workers run in their own session, so Ctrl-C in a terminal
  reaches them once, through the supervisor; on Linux a worker also gets
  SIGTERM if the supervisor dies;
* exits 0 once every worker has exited 0, or, after a forwarded signal, was
  killed by it (a worker still starting has no handler yet: the default
  action ends it, with nothing to drain). If a worker fails (exits non-zero
  or is killed) while no shutdown was asked for, the supervisor asks the
  others to drain and exits 1.

Admin API: with ``[admin] enabled``, the supervisor serves the one admin
API for the whole process on ``[admin] address``; each worker serves its own
on a private loopback socket the supervisor binds and hands down
(:mod:`._supervisor_admin`), and the supervisor's status sums the workers'
and sends each change to every one.

Metrics: each worker serves its own ``/metrics`` (its own core, its own
counters); worker *k* listens on the metrics port + *k* (with port 0 each
picks its own). Sum over workers in Prometheus.

A worker learns its index, the resolved port and its admin socket from
environment variables set by the supervisor (:data:`WORKER_ENV`,
:data:`PORT_ENV`, :data:`~._supervisor_admin.WORKER_ADMIN_FD_ENV`); they are
an internal interface, not configuration.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import FrameType

from loble.core import Config, ConfigError, LobleError, parse_address

from ._datapath import format_address
from ._http import bind_tcp
from ._logging import log
from ._runtime import drop_privileges, remove_pid_file, write_pid_file
from ._supervisor_admin import (
    WORKER_ADMIN_FD_ENV,
    SupervisorAdmin,
    SupervisorControl,
    WorkerAdmin,
    bind_worker_admin,
    check_reload,
)

__all__ = ["PORT_ENV", "WORKER_ENV", "run_workers", "worker_config", "worker_index"]

WORKER_ENV = "LOBLE_WORKER"
"""Set by the supervisor in each worker: its index, 0 to N-1."""

PORT_ENV = "LOBLE_WORKER_PORT"
"""Set by the supervisor when it resolved a listener port of 0."""

_PR_SET_PDEATHSIG = 1


def worker_index() -> int | None:
    """This process's worker index, or None when it is not a worker."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value else None


def worker_config(config: Config, index: int) -> Config:
    """The configuration worker ``index`` runs: resolved listener port, its metrics port."""
    listener, metrics = config.listener, config.metrics
    port = os.environ.get(PORT_ENV)
    if port:
        host, _ = parse_address(listener.address, allow_port_zero=True)
        listener = dataclasses.replace(listener, address=format_address(host, int(port)))
    host, metrics_port = parse_address(metrics.address, allow_port_zero=True)
    if metrics_port:
        metrics = dataclasses.replace(metrics, address=format_address(host, metrics_port + index))
    return dataclasses.replace(config, listener=listener, metrics=metrics)


def run_workers(config: Config, config_path: str, logger: logging.Logger) -> int:
    """Start ``config.runtime.workers`` workers; return the exit status."""
    count = config.runtime.workers
    environment = dict(os.environ)
    reserved = _reserve_port(config.listener.address)
    if reserved is not None:
        environment[PORT_ENV] = str(reserved.getsockname()[1])
    admin: SupervisorAdmin | None = None
    if config.admin.enabled:
        try:
            admin_socket = bind_tcp(config.admin.address, "admin.address")
        except LobleError:
            if reserved is not None:
                reserved.close()
            raise
        control = SupervisorControl(config_path, config.admin.token, logger)
        admin = SupervisorAdmin(control, admin_socket, config.admin.token)
    command = [sys.executable, "-m", "loble", "run", "-c", config_path]
    workers: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}
    stopping = False
    forwarded: list[int] = []  # the signals passed on to the workers, in order

    def send(signum: int) -> None:
        nonlocal stopping
        stopping = True
        for _, process in workers.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    def forward(signum: int, frame: FrameType | None) -> None:
        forwarded.append(signum)  # asked from outside, unlike our own drain after a failure
        send(signum)

    def reload(signum: int, frame: FrameType | None) -> None:
        # Validated once here: an invalid file reaches no worker, and every
        # worker reloads the same valid one. SIGHUP never stops either.
        try:
            check_reload(config_path, logger)
        except ConfigError:
            return  # logged, every problem
        log(logger, logging.INFO, "reloading every worker", workers=len(workers))
        for _, process in workers.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGHUP)

    previous = {
        signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
    pid_file: Path | None = None
    try:  # everything from here is undone in the finally, the pid file's failure too
        pid_file = write_pid_file(config.runtime.pid_file)
        if admin is not None:
            admin.start()
        for index in range(count):
            process, admin_address = _start_worker(
                command, {**environment, WORKER_ENV: str(index)}, admin=admin is not None
            )
            workers[process.pid] = (index, process)
            if admin is not None and admin_address is not None:
                worker = WorkerAdmin(index=index, pid=process.pid, address=admin_address)
                admin.control.workers = (*admin.control.workers, worker)
            if forwarded:  # a signal came while starting: this worker missed it
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(forwarded[-1])
        log(logger, logging.INFO, "workers started", workers=count, pids=sorted(workers))
        drop_privileges(config.runtime.user)  # every worker is started and the admin bound
        failed = False
        while workers:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                # Popen.send_signal polls first, so a worker that had already
                # exited when we signalled it was reaped there: its status is
                # on its Popen. Take those, one at a time, as os.wait would.
                pid = next(p for p, (_, proc) in workers.items() if proc.poll() is not None)
                code = workers[pid][1].returncode
                assert code is not None
            else:
                if pid not in workers:
                    continue
                code = os.waitstatus_to_exitcode(status)
            index, process = workers.pop(pid)
            process.returncode = code
            if -code in forwarded:
                # Killed by the signal we forwarded before it installed its handlers
                # (it was still starting): it had nothing to drain, a clean stop.
                log(logger, logging.INFO, "worker stopped while starting", worker=index, pid=pid)
            elif code != 0:
                failed = True
                log(logger, logging.ERROR, "worker failed", worker=index, pid=pid, status=code)
                if not stopping:
                    send(signal.SIGTERM)  # drain the others, then exit 1
        return 1 if failed else 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pid_file is not None:
            remove_pid_file(pid_file)
        for _, process in workers.values():  # only on an exception: do not orphan them
            process.kill()
            process.wait()
        if reserved is not None:
            reserved.close()
        if admin is not None:
            admin.close()


def _start_worker(
    command: list[str], environment: dict[str, str], *, admin: bool
) -> tuple[subprocess.Popen[bytes], tuple[str, int] | None]:
    """Start one worker; with ``admin``, with a private admin socket and where it listens."""
    if not admin:
        process = subprocess.Popen(
            command, env=environment, start_new_session=True, preexec_fn=_die_with_parent
        )
        return process, None
    private = bind_worker_admin()
    try:
        host, port = private.getsockname()[:2]
        process = subprocess.Popen(
            command,
            env={**environment, WORKER_ADMIN_FD_ENV: str(private.fileno())},
            pass_fds=(private.fileno(),),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    finally:
        # Only the worker keeps it open: once it exits, a request is refused, not left hanging.
        private.close()
    return process, (str(host), int(port))


def _reserve_port(address: str) -> socket.socket | None:
    host, port = parse_address(address, allow_port_zero=True)
    if port:
        return None
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        reserved = socket.socket(family, kind, proto)
    except OSError as error:
        raise LobleError(f"listener.address: cannot listen on {address}: {error}") from None
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind(sockaddr)
    except OSError as error:
        reserved.close()
        reason = error.strerror or str(error)
        raise LobleError(f"listener.address: cannot listen on {address}: {reason}") from None
    return reserved


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. An ignored signal stays ignored
    # across exec: a SIGHUP (a reload) that reaches a worker still starting,
    # before its daemon watches for it, must not kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # A worker whose supervisor is killed (SIGKILL, OOM) gets SIGTERM and
    # drains instead of living on.
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
