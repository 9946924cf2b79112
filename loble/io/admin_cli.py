"""``loble status``, ``top``, ``ctl`` and ``reload``: the operator's side of the admin API.

Each command is a client of a running daemon's admin API (:mod:`._admin`),
found from ``-c CONFIG`` (``[admin] address``) or ``--admin HOST:PORT``, with
the bearer token from ``--token`` or ``LOBLE_ADMIN_TOKEN``. ``loble reload``
can instead send SIGHUP to the process named by ``[runtime] pid_file``,
after validating the file the daemon will read. HTTP is the standard
library's :mod:`urllib.request`: one short request per command (per second
for ``top``) needs no client of its own.

Everything that can go wrong between the operator and the daemon (no admin
API configured, nothing listening, a refused token, an unknown backend, an
invalid file, a stale pid file) is a :class:`LobleError`, which
``loble.__main__`` prints as one line and exit status 1. This module decides
nothing about backends: it only shows what ``GET /status`` says and asks
for changes the daemon's control plane applies.

Every ``loble`` command, ``loble sim`` too, builds its parser with
:func:`register`, so this module imports none of the daemon's modules (nor
anyio or starlette) at the top: ``ctl``'s actions are the values of the
core's :class:`~loble.core.AdminInput`, the names in the admin API's URLs.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.text import Text

from loble.config import load_config
from loble.core import AdminInput, LobleError, parse_address

if TYPE_CHECKING:
    import urllib.error

__all__ = ["TOKEN_VARIABLE", "register", "status_view"]

TOKEN_VARIABLE = "LOBLE_ADMIN_TOKEN"
"""The environment variable the token is read from when ``--token`` is not given
(a token on the command line is visible to every user in ``ps``)."""

REQUEST_TIMEOUT = 5.0
"""Seconds one admin request may take: a daemon that answers at all answers at once."""

STATE_STYLES = {"healthy": "bold green", "draining": "bold yellow", "unhealthy": "bold red"}
ADMIN_STYLES = {"ready": "dim", "drain": "bold yellow", "maint": "bold magenta"}

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}
"""A daemon listening on every address is reached on loopback."""


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``status``, ``top``, ``ctl`` and ``reload`` to the ``loble`` parser."""
    status = commands.add_parser(
        "status",
        help="show every backend of a running daemon (its admin API)",
        description="One GET /status from the admin API, printed as a table.",
    )
    _admin_arguments(status)
    status.add_argument("--json", action="store_true", help="print the raw status document")
    status.set_defaults(handler=_status)

    top = commands.add_parser(
        "top",
        help="the status table, live, refreshed every second",
        description="The status table of 'loble status', refreshed until Ctrl-C. When "
        "stdout is not a terminal, every refresh is printed one after the other.",
    )
    _admin_arguments(top)
    top.add_argument("--count", type=int, default=None, metavar="N", help="stop after N refreshes")
    top.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between refreshes (default: 1)",
    )
    top.set_defaults(handler=_top)

    ctl = commands.add_parser(
        "ctl",
        help="drain, undrain, maintenance, ready or reweight one backend",
        description="Change one backend of a running daemon through its admin API "
        "(needs the token).",
    )
    actions = ctl.add_subparsers(dest="action", required=True, metavar="ACTION")
    explained = {
        "drain": "no new connections; existing ones finish",
        "undrain": "take new connections again after a drain",
        "maintenance": "no traffic and no probes",
        "ready": "back to normal from drain or maintenance",
    }
    for action in (admin_input.value for admin_input in AdminInput):  # the admin API's names
        parser = actions.add_parser(action, help=explained.get(action))
        parser.add_argument("backend", metavar="BACKEND", help="host:port, as in [[backends]]")
        _admin_arguments(parser)
        parser.set_defaults(handler=_ctl)
    weight = actions.add_parser("weight", help="set the backend's weight")
    weight.add_argument("backend", metavar="BACKEND", help="host:port, as in [[backends]]")
    weight.add_argument("weight", metavar="N", type=int, help="the new weight")
    _admin_arguments(weight)
    weight.set_defaults(handler=_ctl)
    limit = actions.add_parser(
        "max-connections", help="set the backend's max_connections (0: no limit)"
    )
    limit.add_argument("backend", metavar="BACKEND", help="host:port, as in [[backends]]")
    limit.add_argument("max_connections", metavar="N", type=int, help="the new limit")
    _admin_arguments(limit)
    limit.set_defaults(handler=_ctl)

    reload = commands.add_parser(
        "reload",
        help="make a running daemon reload its configuration file",
        description="With [runtime] pid_file set, validate the configuration file and send "
        "SIGHUP to the daemon's pid; with --admin, or with [admin] enabled and no "
        "pid_file, POST /reload and print what changed.",
    )
    _admin_arguments(reload)
    reload.set_defaults(handler=_reload)


def _admin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default="config.toml",
        metavar="PATH",
        help="the daemon's configuration, to find [admin] address (default: config.toml)",
    )
    parser.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="the admin API's address, instead of reading it from the configuration",
    )
    parser.add_argument("--token", help=f"the admin bearer token (default: ${TOKEN_VARIABLE})")


# -- reaching the admin API ------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminClient:
    """One daemon's admin API: where it is and the token to show it."""

    url: str
    """``http://host:port``, no trailing slash."""
    token: str

    def get(self, path: str) -> dict[str, Any]:
        return self._request("GET", path, None)

    def post(self, path: str, body: Mapping[str, object] | None = None) -> dict[str, Any]:
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body: Mapping[str, object] | None) -> dict[str, Any]:
        import urllib.error  # they bring http.client, ssl and email: only a request needs them
        import urllib.request

        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
                return self._document(response.read())
        except urllib.error.HTTPError as error:
            raise self._refusal(error) from None
        except urllib.error.URLError as error:
            raise self._unreachable(error.reason) from None
        except OSError as error:  # a timeout or reset while reading the answer
            raise self._unreachable(error) from None

    def _document(self, raw: bytes) -> dict[str, Any]:
        try:
            document = json.loads(raw)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise LobleError(f"{self.url} answered, but not as Loble's admin API does (no JSON)")
        return document

    def _unreachable(self, reason: object) -> LobleError:
        if isinstance(reason, OSError):
            reason = reason.strerror or str(reason) or type(reason).__name__
        return LobleError(f"cannot reach the admin API at {self.url}: {reason}")

    def _refusal(self, error: urllib.error.HTTPError) -> LobleError:
        try:
            answer = json.loads(error.read())
        except (ValueError, OSError):
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("errors"), list):
            lines = [str(line) for line in answer["errors"]]  # a rejected reload: each problem
        elif isinstance(answer, dict) and "error" in answer:
            lines = [str(answer["error"])]
        else:
            lines = [f"{error.code} {error.reason}"]
        if error.code in (401, 403):
            lines[0] = f"the admin API at {self.url} refused the change: {lines[0]}"
            if error.code == 401 and not self.token:
                lines[0] += f" (pass --token or set {TOKEN_VARIABLE})"
        return LobleError("\n".join(lines))


def _client(args: argparse.Namespace) -> AdminClient:
    token = args.token if args.token is not None else os.environ.get(TOKEN_VARIABLE, "")
    if args.admin is not None:
        return AdminClient(url=_url(args.admin, "--admin"), token=token)
    config = load_config(args.config)
    if not config.admin.enabled:
        raise LobleError(
            f"{args.config}: [admin] enabled is false: the daemon serves no admin API "
            "(enable it, or pass --admin HOST:PORT)"
        )
    return AdminClient(url=_url(config.admin.address, "admin.address"), token=token)


def _url(address: str, key: str) -> str:
    from ._datapath import format_address

    try:
        host, port = parse_address(address, allow_port_zero=True)
    except ValueError as error:
        raise LobleError(f"{key}: {address!r} {error}") from None
    if port == 0:
        raise LobleError(
            f"{key}: {address!r} has port 0, chosen when the daemon starts "
            "(its log line 'admin API' names it): pass --admin HOST:PORT"
        )
    return f"http://{format_address(_WILDCARDS.get(host, host), port)}"


# -- status and top -------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    document = _client(args).get("/status")
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        _console().print(status_view(document))
    return 0


def _top(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise LobleError(f"--count: {args.count} must be at least 1")
    if not args.interval > 0:
        raise LobleError(f"--interval: {args.interval} must be more than 0")
    from rich.live import Live

    client = _client(args)
    console = _console()
    view = status_view(client.get("/status"))  # unreachable at the start: one line, exit 1
    # On a terminal the table redraws in place; to a file or a pipe every
    # refresh is printed after the last, as `top -b` does.
    live = Live(view, console=console, auto_refresh=False) if console.is_terminal else None
    refreshes = 1
    try:
        if live is None:
            console.print(view)
        else:
            live.start()
        while args.count is None or refreshes < args.count:
            time.sleep(args.interval)
            view = _refreshed(client, view)
            if live is None:
                console.print(view)
            else:
                live.update(view, refresh=True)
            refreshes += 1
    except KeyboardInterrupt:  # Ctrl-C is how top ends
        pass
    finally:
        if live is not None:
            live.stop()
    return 0


def _refreshed(client: AdminClient, previous: Group) -> Group:
    """The next view; while the API is gone (a restart), the last table under the error."""
    try:
        return status_view(client.get("/status"))
    except LobleError as error:
        return Group(Text(f"{error} (retrying)", style="bold red"), previous.renderables[-1])


def _of_limit(active: object, limit: object) -> str:
    """Active connections, and out of how many when the backend has a ``max_connections``."""
    return f"{active}/{limit}" if limit else str(active)


def status_view(document: Mapping[str, Any]) -> Group:
    """The status document as the header line above one row per backend."""
    from rich.table import Table

    backends: Sequence[Mapping[str, Any]] = document.get("backends", [])
    header = Text()
    process = document.get("process")
    header.append(f"process {process}", "bold green" if process == "running" else "bold yellow")
    header.append(
        f" · snapshot v{document.get('snapshot_version')}"
        f" · {document.get('in_flight')} in flight"
        + (f" ({document['queued']} queued)" if document.get("queued") else "")
        + f" · {len(document.get('eligible', []))} of {len(backends)} backends eligible"
        f" · up {_duration(document.get('uptime'))}"
        f" · pid {document.get('pid')}"
    )
    if document.get("worker") is not None:
        header.append(f" · worker {document['worker']}")
    # On a narrow terminal the reason wraps and the figures squeeze; who and
    # in what state are never cut short.
    table = Table(box=None, pad_edge=False, collapse_padding=True, header_style="bold")
    widest = max((len(str(backend.get("address"))) for backend in backends), default=7)
    table.add_column("backend", no_wrap=True, min_width=widest + 11 * _any_removing(backends))
    table.add_column("state", no_wrap=True, min_width=len("unhealthy"))
    table.add_column("admin", no_wrap=True, min_width=len("maint"))
    for name in ("weight", "active", "peak", "completed", "failed", "to backend", "to client"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("last change")
    table.add_column("last probe", no_wrap=True)
    for backend in backends:
        outcomes: Mapping[str, int] = backend.get("connections", {})
        state = str(backend.get("state"))
        admin = str(backend.get("admin"))
        change = _ago(backend.get("since_seconds"))
        if backend.get("reason"):
            change += f": {backend['reason']}"
        table.add_row(
            str(backend.get("address")) + (" (removing)" if backend.get("removing") else ""),
            Text(state, STATE_STYLES.get(state, "")),
            Text(admin, ADMIN_STYLES.get(admin, "")),
            str(backend.get("weight")),
            _of_limit(backend.get("active_connections"), backend.get("max_connections")),
            str(backend.get("peak_connections")),
            str(outcomes.get("completed", 0)),
            # As the status page counts: every outcome but "completed" is a
            # failure, whatever outcomes the daemon grows.
            str(sum(count for name, count in outcomes.items() if name != "completed")),
            _bytes(backend.get("bytes_to_backend", 0)),
            _bytes(backend.get("bytes_to_client", 0)),
            change,
            _probe(backend),
        )
    return Group(header, table)


def _any_removing(backends: Sequence[Mapping[str, Any]]) -> bool:
    return any(backend.get("removing") for backend in backends)


def _console() -> Console:
    # Not a terminal (a pipe, a file, a test): wide enough that no cell is cut.
    return _StdoutConsole(highlight=False, width=None if sys.stdout.isatty() else 200)


class _StdoutConsole(Console):
    """A Console that leaves a closed stdout to ``loble.__main__``, as ``loble sim``'s does.

    rich's own answer is ``SystemExit(1)``; raising lets every command end
    the same way (status 141) whether it prints with rich or not.
    """

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def _bytes(count: object) -> str:
    value = float(count) if isinstance(count, (int, float)) else 0.0
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _duration(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _ago(seconds: object) -> str:
    return "never" if seconds is None else f"{_duration(seconds)} ago"


def _probe(backend: Mapping[str, Any]) -> Text:
    ok = backend.get("last_probe_ok")
    if ok is None:
        return Text("—", "dim")
    age = _ago(backend.get("last_probe_seconds"))
    return Text(f"ok, {age}", "green") if ok else Text(f"failed, {age}", "red")


# -- ctl and reload -------------------------------------------------------------------


def _ctl(args: argparse.Namespace) -> int:
    client = _client(args)
    action = args.action.replace("-", "_")  # max-connections: the API's max_connections
    path = f"/backends/{urllib.parse.quote(args.backend, safe='')}/{action}"
    body: dict[str, object] | None = None
    if action in ("weight", "max_connections"):
        body = {action: getattr(args, action)}
    done = client.post(path, body)
    limit = done.get("max_connections")
    print(
        f"{done.get('address', args.backend)}: {done.get('state')}, "
        f"admin {done.get('admin')}, weight {done.get('weight')}"
        + (f", max_connections {limit}" if limit else "")
    )
    return 0


def _reload(args: argparse.Namespace) -> int:
    if args.admin is None:
        config = load_config(args.config)  # an invalid file stops here, before any signal
        if config.runtime.pid_file:
            _signal_reload(Path(config.runtime.pid_file), args.config)
            return 0
        if not config.admin.enabled:
            raise LobleError(
                f"{args.config}: neither [runtime] pid_file nor [admin] enabled is set: "
                "no way to reach the daemon (or pass --admin HOST:PORT)"
            )
    done = _client(args).post("/reload")
    print(_reload_summary(done))
    return 0


def _signal_reload(pid_file: Path, config_path: str) -> None:
    key = f"runtime.pid_file: {pid_file}"
    try:
        text = pid_file.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise LobleError(f"{key}: no such file: is the daemon running?") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not a process id"
        raise LobleError(f"{key}: cannot read it: {reason}") from None
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise LobleError(f"{key}: holds {text[:40]!r}, not a process id")
    pid = int(text)
    try:
        os.kill(pid, 0)  # only asks whether it exists and may be signalled
        if not _is_loble(pid):
            raise LobleError(f"{key}: process {pid} is not loble: a stale pid file?")
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise LobleError(f"{key}: no process {pid}: a stale pid file?") from None
    except PermissionError:
        raise LobleError(f"{key}: not allowed to signal process {pid}") from None
    print(
        f"{config_path}: valid; sent SIGHUP to loble (pid {pid}), "
        "which logs 'configuration reloaded' with what changed"
    )


def _is_loble(pid: int) -> bool:
    """Whether ``pid`` runs loble, as far as this system says; True where it cannot tell.

    A pid file left by a daemon that died can name a process started since;
    SIGHUP would end most programs, so look before signalling (Linux's /proc).
    """
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True
    # `loble run`, `python -m loble run`, `/usr/bin/loble run`: one argument
    # names loble itself (a mere "loble" in a path, as a checkout's, does not).
    return any(Path(os.fsdecode(argument)).name == "loble" for argument in arguments)


def _reload_summary(done: Mapping[str, Any]) -> str:
    lines = ["reloaded"]
    for key, label in (
        ("added", "added"),
        ("removed", "removed"),
        ("reweighted", "reweighted"),
        ("changed", "changed"),
        ("restart_needed", "at the next start"),
    ):
        values = done.get(key) or []
        if values:
            lines.append(f"  {label}: {', '.join(str(value) for value in values)}")
    if len(lines) == 1:
        lines[0] += ": nothing changed"
    return "\n".join(lines)
