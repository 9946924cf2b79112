"""HTTP for the daemon's endpoints: ASGI apps on hypercorn, on the daemon's own loop.

The metrics endpoint and the admin API are small Starlette apps served by
hypercorn, which runs on asyncio (and uvloop) and on trio, so they share the
event loop and thread of the core they read: a scrape or a status request
reads the core from the only thread that touches it. Nothing here parses
HTTP by hand.

The listening socket is bound by :func:`bind_tcp` before serving starts, so a
bad address is a one-line :class:`~loble.core.LobleError` at start-up (and
port 0 gets its OS-chosen port at once); hypercorn is handed the bound
socket's descriptor (``fd://``).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from typing import cast

import anyio
import hypercorn.asyncio
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import ASGIFramework
from starlette.applications import Starlette

from loble.core import LobleError, parse_address

from ._runtime import current_library

__all__ = ["GRACEFUL_SECONDS", "IDLE_SECONDS", "READ_SECONDS", "bind_tcp", "serve_asgi"]

_serve_on_trio: Callable[..., Awaitable[None]] | None
try:  # trio is optional: only `[runtime] backend = "trio"` needs it (and then has it)
    from hypercorn.trio import serve as _serve_on_trio
except ImportError:
    _serve_on_trio = None

GRACEFUL_SECONDS = 1.0
"""How long a request in progress may take once its endpoint stops."""

IDLE_SECONDS = 1.0
"""How long a connection may sit with no request before the endpoint closes it.

Hypercorn notices a client that closes before its first request only at this
timeout (measured: 30 such connections stayed in CLOSE-WAIT for its default
5 s). An idle scrape holds a descriptor the proxy may need, so idle ones go
quickly: a scraper opens a connection per scrape anyway."""


READ_SECONDS = 5
"""How long a request may take to arrive once begun: a slowloris client that
sends its headers a byte at a time is closed after this, so a few of them
cannot hold the endpoint's (and the proxy's) descriptors for long."""


def bind_tcp(address: str, key: str, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on ``address`` (``host:port``); a one-line error names ``key``."""
    host, port = parse_address(address, allow_port_zero=True)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise LobleError(f"{key}: cannot listen on {address}: {error.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        reason = error.strerror or str(error)
        raise LobleError(f"{key}: cannot listen on {address}: {reason}") from None
    sock.setblocking(False)
    return sock


async def serve_asgi(
    app: Starlette, sock: socket.socket, logger: logging.Logger, stop: anyio.Event
) -> None:
    """Serve ``app`` on the listening ``sock`` until ``stop`` is set; hypercorn takes the socket.

    Stop it with the event, not by cancelling: hypercorn's asyncio server
    finishes its requests in progress (up to :data:`GRACEFUL_SECONDS`) and
    fails if cancelled during that.
    """
    # Starlette and hypercorn type the ASGI callable each their own way.
    asgi = cast(ASGIFramework, app)
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = logger
    config.graceful_timeout = GRACEFUL_SECONDS
    config.keep_alive_timeout = IDLE_SECONDS
    config.read_timeout = READ_SECONDS
    config.include_server_header = False
    if current_library() == "trio":
        assert _serve_on_trio is not None  # trio runs this loop, so it is installed
        await _serve_on_trio(asgi, config, shutdown_trigger=stop.wait)
    else:
        await hypercorn.asyncio.serve(asgi, config, shutdown_trigger=stop.wait)
