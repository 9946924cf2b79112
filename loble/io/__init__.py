"""The real daemon: Loble on anyio sockets, driving :mod:`loble.core`.

:class:`Daemon` runs one load balancer; ``loble run`` and ``loble demo``
(:mod:`loble.io.cli`) start it from a configuration file.

``Daemon`` is imported on first use, not with this package: the ``loble``
command imports :mod:`loble.io.cli` and :mod:`loble.io.admin_cli` to build
its parser, and ``loble sim`` must not pay for anyio, hypercorn and
starlette (nor need them installed) to do so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._daemon import Daemon

__all__ = ["Daemon"]


def __getattr__(name: str) -> object:
    if name == "Daemon":
        from ._daemon import Daemon

        globals()["Daemon"] = Daemon  # the next lookup finds it without this hook
        return Daemon
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
