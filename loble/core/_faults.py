"""Whose fault a local socket error is: pure functions of an ``errno`` number.

A driver meets ``OSError`` where the core cannot see it: making a socket for
a connect, or accepting a client. What follows is a decision, so it lives
here, where a test checks it without a socket, and both data paths share it:

* making a socket: a *shortage* (:func:`is_shortage`) is this process's own
  lack of a resource; the driver reports it with
  ``ProxyCore.resource_exhausted`` (outcome ``RESOURCE_EXHAUSTED``, no backend
  blamed). Any other error there concerns the address being tried (the next
  one is tried, and once none is left the attempt failed).
* accepting: an error that concerns one client only (:func:`skips_one_client`)
  skips that client; any other pauses accepting for a moment, since retrying
  at once would spin (a shortage there is the usual case).

``None`` (an ``OSError`` without an errno) is never a shortage and never
skips: an error nobody can name is handled the careful way.
"""

from __future__ import annotations

import errno

__all__ = ["ACCEPT_SKIP_ERRNOS", "SHORTAGE_ERRNOS", "is_shortage", "skips_one_client"]

SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""Out of file descriptors (this process's or the system's) or of socket memory.

``EADDRNOTAVAIL`` is not among them: it also means an address family switched
off on this host, a real failure to reach that address, so it blames the
backend like a refused connect."""

ACCEPT_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
"""``accept()`` errors about the one connection being accepted: it was reset
while queued (``ECONNABORTED``, ``EPROTO`` on some systems), or a firewall
rule refused it (``EPERM`` on Linux). The listener itself is fine."""


def is_shortage(error_number: int | None) -> bool:
    """Whether this process is short of a resource (the connection ends
    ``RESOURCE_EXHAUSTED``, and no backend is blamed)."""
    return error_number in SHORTAGE_ERRNOS


def skips_one_client(error_number: int | None) -> bool:
    """Whether an ``accept()`` error concerns one client only: skip it and
    accept the next. Any other accept error pauses accepting."""
    return error_number in ACCEPT_SKIP_ERRNOS
