"""The admin API: status, operator changes and reload over HTTP, as HAProxy's runtime API.

An ASGI app (Starlette, served by hypercorn through :mod:`._http`) on
``[admin] address``, off by default and on loopback unless configured:

* ``GET /`` is the status page (``status.html`` beside this file): a table
  per backend that refreshes itself from ``/status``;
* ``GET /status`` is every backend's state, since when and why, its active
  and peak connections, weight, admin state, connections by outcome, bytes
  and last probe, with the process state and snapshot version (JSON);
* ``POST /backends/{backend}/drain``, ``/undrain``, ``/maintenance``,
  ``/ready``, ``POST /backends/{backend}/weight`` (``{"weight": N}``) and
  ``POST /backends/{backend}/max_connections`` (``{"max_connections": N}``)
  change one backend through the core's control plane;
* ``POST /reload`` reloads the configuration file, as SIGHUP does.

Reading needs nothing; every change needs ``Authorization: Bearer TOKEN``
with ``[admin] token``, compared in constant time. With no token configured
every change is refused. Each refusal is logged with the client's address.
What the API can do is the :class:`Control` protocol, which the daemon (or,
with workers, the supervisor) implements.
"""

from __future__ import annotations

import hmac
import json
import logging
from importlib import resources
from typing import Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from loble.core import AdminInput, LobleError

from ._logging import log

__all__ = ["ADMIN_ACTIONS", "Control", "UnknownBackend", "admin_app"]

ADMIN_ACTIONS: dict[str, AdminInput] = {
    "drain": AdminInput.DRAIN,
    "undrain": AdminInput.UNDRAIN,
    "maintenance": AdminInput.MAINTENANCE,
    "ready": AdminInput.READY,
}
"""The operator's changes of a backend's admin state, by their name in the URL."""


class UnknownBackend(LobleError):
    """A request named a backend the configuration does not have."""


class Control(Protocol):
    """What the admin API asks of the process it runs in."""

    async def status(self) -> dict[str, object]:
        """The document ``GET /status`` answers."""

    async def admin(self, address: str, admin_input: AdminInput) -> dict[str, object]:
        """Apply an operator's change; :class:`UnknownBackend` or :class:`LobleError` if not."""

    async def set_weight(self, address: str, weight: int) -> dict[str, object]:
        """Set a backend's weight; :class:`UnknownBackend` or :class:`LobleError` if not."""

    async def set_max_connections(self, address: str, limit: int) -> dict[str, object]:
        """Set a backend's ``max_connections`` (0: none); as :meth:`set_weight`."""

    async def reload(self) -> dict[str, object]:
        """Reload the configuration file; :class:`LobleError` (every problem) if invalid."""


def _page() -> str:
    return resources.files(__package__).joinpath("status.html").read_text(encoding="utf-8")


def admin_app(control: Control, token: str, logger: logging.Logger) -> Starlette:
    """The admin API over ``control``; changes need ``token`` (none if it is empty)."""
    page = _page()
    expected = token.encode()

    def refused(request: Request) -> Response | None:
        """Why this change request is refused, as a response; None if it may go on."""
        if not expected:
            reason, status = "no [admin] token is configured: changes are refused", 403
        else:
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), expected):
                return None
            reason, status = "missing or wrong bearer token", 401
        client = request.client
        log(
            logger,
            logging.WARNING,
            "admin request refused",
            path=request.url.path,
            client=f"{client.host}:{client.port}" if client is not None else "",
            reason=reason,
        )
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": reason}, status_code=status, headers=headers)

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def status(request: Request) -> Response:
        return JSONResponse(await control.status())

    async def change(request: Request) -> Response:
        denial = refused(request)
        if denial is not None:
            return denial
        backend = request.path_params["backend"]
        action = request.path_params["action"]
        try:
            if action == "weight":
                weight = await _count(request, "weight")
                done = await control.set_weight(backend, weight)
            elif action == "max_connections":
                limit = await _count(request, "max_connections")
                done = await control.set_max_connections(backend, limit)
            elif action in ADMIN_ACTIONS:
                done = await control.admin(backend, ADMIN_ACTIONS[action])
            else:
                known = ", ".join([*ADMIN_ACTIONS, "weight", "max_connections"])
                return JSONResponse(
                    {"error": f"no action {action!r}; one of {known}"}, status_code=404
                )
        except UnknownBackend as error:
            return JSONResponse({"error": str(error)}, status_code=404)
        except LobleError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        log(logger, logging.INFO, "admin change", backend=backend, action=action)
        return JSONResponse(done)

    async def reload(request: Request) -> Response:
        denial = refused(request)
        if denial is not None:
            return denial
        try:
            done = await control.reload()
        except LobleError as error:
            errors = str(error).splitlines()
            return JSONResponse({"error": errors[0], "errors": errors}, status_code=400)
        return JSONResponse(done)

    return Starlette(
        routes=[
            Route("/", index, methods=["GET", "HEAD"]),
            Route("/status", status, methods=["GET", "HEAD"]),
            Route("/backends/{backend}/{action}", change, methods=["POST"]),
            Route("/reload", reload, methods=["POST"]),
        ]
    )


async def _count(request: Request, key: str) -> int:
    """The number a ``POST .../KEY`` asks for: ``{"KEY": N}`` or ``?KEY=N``."""
    raw: object = request.query_params.get(key)
    if raw is None:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise LobleError(f'{key}: the body is not JSON; send {{"{key}": N}}') from None
        raw = body.get(key) if isinstance(body, dict) else None
    if isinstance(raw, str) and raw.strip().isascii() and raw.strip().isdigit():
        return int(raw)
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    raise LobleError(f'{key}: {raw!r} is not a whole number; send {{"{key}": N}}')
