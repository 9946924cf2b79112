"""Choosing the event loop: ``[runtime] backend`` is asyncio, uvloop or trio.

All of Loble's I/O is written against anyio, so the choice is only which
loop ``anyio.run`` starts. On asyncio it is Loble's own loop
(:func:`._loop.new_event_loop`): a standard selector loop whose epoll set
also holds the data path's readiness callbacks, so a wakeup costs one
``epoll_wait``. A runtime that is not installed is a user error with a
one-line fix, never an ImportError traceback.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from loble.core import ConfigError, RuntimeConfig

from ._loop import new_event_loop

__all__ = ["run", "runtime_options"]


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
