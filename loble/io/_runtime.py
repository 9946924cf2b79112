"""Choosing how the daemon runs: the event loop, the data path, the copy, the clock.

``[runtime] backend`` is asyncio, uvloop or trio. All of Loble's I/O is
written against anyio, so the choice is only which loop ``anyio.run``
starts. On asyncio it is Loble's own loop (:func:`._loop.new_event_loop`): a
standard selector loop whose epoll set also holds the data path's readiness
callbacks, so a wakeup costs one ``epoll_wait``. A runtime that is not
installed is a user error with a one-line fix, never an ImportError
traceback.

Two environment variables pick the data path (``LOBLE_DATA_PATH``:
``callbacks``, the default on asyncio and uvloop, or ``tasks``) and how
bytes move (``LOBLE_COPY``: ``auto``, ``splice`` or ``recv_into``); a bad
value is a one-line :class:`~loble.core.LobleError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import pwd
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from loble.core import ConfigError, LobleError, RuntimeConfig

from ._copy import SPLICE_AVAILABLE, CopyMethod
from ._loop import new_event_loop

__all__ = [
    "COPY_ENV",
    "DATA_PATHS",
    "DATA_PATH_ENV",
    "choose_copy_method",
    "choose_data_path",
    "current_library",
    "data_path_for",
    "drop_privileges",
    "loop_clock",
    "remove_pid_file",
    "run",
    "runtime_options",
    "write_pid_file",
]

COPY_ENV = "LOBLE_COPY"
"""Environment variable: ``auto`` (default on Linux), ``splice`` or ``recv_into``."""

DATA_PATH_ENV = "LOBLE_DATA_PATH"
"""Environment variable: ``callbacks`` (default on asyncio/uvloop) or ``tasks``."""

DATA_PATHS = ("callbacks", "tasks")


def runtime_options(runtime: RuntimeConfig) -> tuple[str, dict[str, Any]]:
    """The anyio backend name and options for ``anyio.run``."""
    if runtime.backend == "trio":
        _require("trio", "pip install trio")
        return "trio", {}
    if runtime.backend == "uvloop":
        _require("uvloop", "pip install 'loble[uvloop]', or set backend = \"asyncio\"")
        return "asyncio", {"use_uvloop": True}
    return "asyncio", {"loop_factory": new_event_loop}


def _require(module: str, fix: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError([f"runtime.backend: '{module}' is not installed: {fix}"]) from None


def run(main: Callable[[], Awaitable[object]], runtime: RuntimeConfig) -> None:
    """Run ``main`` to completion on the configured event loop."""
    backend, options = runtime_options(runtime)
    anyio.run(main, backend=backend, backend_options=options)


def choose_copy_method(chosen: str | None) -> CopyMethod:
    """``chosen``, else ``LOBLE_COPY``, else the fastest the platform has."""
    value = chosen if chosen is not None else os.environ.get(COPY_ENV, "")
    if not value:
        return CopyMethod.default()
    try:
        method = CopyMethod(value)
    except ValueError:
        options = ", ".join(m.value for m in CopyMethod)
        raise LobleError(f"{COPY_ENV}: {value!r} is not one of {options}") from None
    if method.needs_splice and not SPLICE_AVAILABLE:
        raise LobleError(f"{COPY_ENV}: {value!r} needs Linux; use 'recv_into'")
    return method


def choose_data_path(chosen: str | None) -> str:
    """``chosen``, else ``LOBLE_DATA_PATH``; "" means the loop's default (:func:`data_path_for`)."""
    value = chosen if chosen is not None else os.environ.get(DATA_PATH_ENV, "")
    if value and value not in DATA_PATHS:
        raise LobleError(f"{DATA_PATH_ENV}: {value!r} is not one of {', '.join(DATA_PATHS)}")
    return value


def data_path_for(chosen: str, library: str) -> str:
    """The data path to run on ``library``: the chosen one, else the loop's fastest."""
    if chosen == "callbacks" and library != "asyncio":
        raise LobleError(f"{DATA_PATH_ENV}: 'callbacks' needs asyncio or uvloop")
    return chosen or ("callbacks" if library == "asyncio" else "tasks")


def current_library() -> str:
    """``asyncio`` or ``trio``: what anyio runs on in this thread now."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return "trio"  # anyio runs on asyncio or trio
    return "asyncio"


def loop_clock() -> Callable[[], float]:
    """The running loop's monotonic clock, read the cheapest way (the core's ``now``)."""
    if current_library() == "trio":
        clock: Callable[[], float] = sys.modules["trio"].current_time  # trio runs this loop
        return clock
    loop = asyncio.get_running_loop()
    # asyncio's loop.time() is time.monotonic() behind a Python call; read the
    # same clock directly (it is read several times per connection). Other
    # loops (uvloop) keep their own time().
    plain = type(loop).time is asyncio.BaseEventLoop.time
    return time.monotonic if plain else loop.time


def drop_privileges(user: str) -> None:
    """Become ``user`` (its uid, its gid, no other groups), as HAProxy's ``user``.

    Called once every socket is bound: a daemon started as root to bind a
    privileged port serves as an unprivileged user. "" changes nothing; an
    unknown user, or a process not allowed to change, is a one-line error.
    """
    if not user:
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise LobleError(f"runtime.user: no user {user!r} on this machine") from None
    if (os.getuid(), os.getgid()) == (entry.pw_uid, entry.pw_gid):
        return
    try:
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except PermissionError:
        raise LobleError(
            f"runtime.user: cannot become {user!r}: only root can change its user"
        ) from None


def write_pid_file(name: str) -> Path | None:
    """Write this process's id to ``name`` (``[runtime] pid_file``, for ``loble reload``);
    None when no file is configured. A file that cannot be written is one line."""
    if not name:
        return None
    path = Path(name)
    try:
        path.write_text(f"{os.getpid()}\n")
    except OSError as error:
        raise LobleError(f"runtime.pid_file: cannot write {name}: {error.strerror}") from None
    return path


def remove_pid_file(path: Path) -> None:
    """Remove the pid file if it is still ours: a second daemon started with it owns it now."""
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()
