"""The real daemon: Loble on anyio sockets, driving :mod:`loble.core`.

:class:`Daemon` runs one load balancer; ``loble run`` and ``loble demo``
(:mod:`loble.io.cli`) start it from a configuration file.
"""

from ._daemon import Daemon

__all__ = ["Daemon"]
