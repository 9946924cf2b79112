"""``loble demo``'s live view: one frame of the terminal, drawn from a :class:`DemoState`.

Pure rendering. The demo driver (:mod:`._demo`) gathers a :class:`DemoState`
from the daemon (its core's statistics), from its own listener on the core's
events and from the client load, and :func:`render` turns it into a rich
renderable; :func:`describe` turns one core event into a line of the events
panel. Nothing here reads a clock, a socket or the daemon, so a test renders
a state to a recording console and reads the text.

The frame, top to bottom:

* a header: where the balancer listens, its process state, the snapshot
  version, what to try in another terminal and the demo's next step;
* one row per backend: whether its server is up (the demo stops and starts
  it), its health and admin state as the core sees them, weight, active
  connections, connections taken, and a sparkline of its connections per
  second over the last :data:`HISTORY_SECONDS`;
* the last core events (health transitions, snapshots, admin changes) and
  the demo's own steps, beside the clients' view: requests answered, failed,
  and by which backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from loble.core import (
    AdminState,
    AdminStateChanged,
    BackendStateChanged,
    HealthState,
    Output,
    ShutdownFinished,
    ShutdownStarted,
    SnapshotPublished,
    WeightChanged,
)

from .admin_cli import ADMIN_STYLES, STATE_STYLES

__all__ = [
    "EVENT_LINES",
    "HISTORY_SECONDS",
    "SPARK_BLOCKS",
    "BackendView",
    "ClientView",
    "DemoState",
    "Happening",
    "Spark",
    "describe",
    "render",
    "sparkline",
]

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
"""A sparkline's eight heights, lowest first (a zero is a space)."""

HISTORY_SECONDS = 30
"""How many seconds of traffic a sparkline shows, one character a second."""

EVENT_LINES = 8
"""How many of the latest events the events panel shows."""


def sparkline(values: Sequence[float], top: float | None = None) -> str:
    """One character per value: a space for 0 (or less), else ▁ to █ in proportion to ``top``.

    ``top`` (default: the largest of ``values``) is the value drawn as █; a
    larger one is drawn as █ too. Sharing one ``top`` between lines makes
    their heights comparable.
    """
    highest = max(values, default=0.0) if top is None else top
    blocks = len(SPARK_BLOCKS)
    chars = []
    for value in values:
        if value <= 0 or highest <= 0:
            chars.append(" ")
        else:
            level = math.ceil(value / highest * blocks) - 1
            chars.append(SPARK_BLOCKS[min(blocks - 1, max(0, level))])
    return "".join(chars)


@dataclass(frozen=True, kw_only=True)
class BackendView:
    """One backend's row."""

    name: str
    address: str
    health: str
    """The core's health state: ``healthy``, ``draining`` or ``unhealthy``."""
    admin: str
    """The operator's state: ``ready``, ``drain`` or ``maint``."""
    weight: int
    active: int
    total: int
    """Connections the balancer made to it since the start."""
    rates: tuple[int, ...] = ()
    """Its connections in each of the last seconds, oldest first (at most
    :data:`HISTORY_SECONDS`)."""
    server_up: bool = True
    """False while the demo has its server stopped (listener closed)."""


@dataclass(frozen=True, kw_only=True)
class Happening:
    """One line of the events panel."""

    at: float
    """Seconds since the demo started."""
    text: str
    style: str = ""


@dataclass(frozen=True, kw_only=True)
class ClientView:
    """What the demo's clients saw."""

    rate: float
    """Requests a second they aim at."""
    answered: int = 0
    failed: int = 0
    by_backend: tuple[tuple[str, int], ...] = ()
    """Answers by the name of the backend that gave them."""
    answered_rates: tuple[int, ...] = ()
    """Answers in each of the last seconds, oldest first."""
    failed_rates: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class DemoState:
    """Everything one frame shows."""

    uptime: float
    listen: str
    """Where clients connect, ``host:port``."""
    algorithm: str
    process: str
    """The core's process state: ``running``, ``draining`` or ``stopped``."""
    snapshot_version: int
    eligible: tuple[str, ...]
    """The names of the snapshot's backends (those new connections may go to)."""
    in_flight: int
    backends: tuple[BackendView, ...]
    client: ClientView
    happenings: tuple[Happening, ...] = ()
    """Oldest first; the panel shows the last :data:`EVENT_LINES`."""
    next_step: str = ""
    """The demo's next scheduled step, e.g. ``stop backend-2's server in 3 s``; "" for none."""
    admin_url: str = ""
    metrics_url: str = ""
    ends_in: float | None = None
    """Seconds left before ``--duration`` starts the drain; None without it."""


_PROCESS_STYLES = {"running": "bold green", "draining": "bold yellow", "stopped": "bold red"}


def render(state: DemoState) -> RenderableType:
    """The whole frame for ``state``."""
    bottom = Table.grid(expand=True, padding=(0, 1))
    bottom.add_column(ratio=1)
    bottom.add_column(width=32)
    bottom.add_row(_events(state), _clients(state))
    return Group(_header(state), _backends(state), bottom)


class Spark:
    """A :func:`sparkline` as wide as it is given room for, newest value at the right."""

    def __init__(self, values: Sequence[float], top: float | None = None, style: str = "") -> None:
        self.values = values
        self.top = top
        self.style = style

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        shown = self.values[-width:] if width > 0 else ()
        yield Text(sparkline(shown, self.top).rjust(width), self.style, no_wrap=True)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(1, min(options.max_width, HISTORY_SECONDS))


def _header(state: DemoState) -> Panel:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(ratio=1)
    balancer = Text(state.listen, "bold cyan")
    balancer.append(f" · {state.algorithm} · ")
    balancer.append(state.process, _PROCESS_STYLES.get(state.process, ""))
    balancer.append(f", up {state.uptime:.0f} s · {state.in_flight} in flight")
    members = ", ".join(state.eligible) or "no backend eligible"
    snapshot = Text(f"v{state.snapshot_version}: {members}")
    snapshot.append(f" ({len(state.eligible)} of {len(state.backends)} eligible)", "dim")
    tries = Text(f"curl http://{state.listen}/", "cyan")
    if state.admin_url:
        tries.append(" · status page ")
        tries.append(state.admin_url, "cyan")
    if state.metrics_url:
        tries.append(" · metrics ")
        tries.append(state.metrics_url, "cyan")
    if state.process == "running":
        plan = Text(state.next_step or "nothing scheduled")
        plan.append(" · Ctrl-C drains and exits")
        if state.ends_in is not None:
            plan.append(f" · drains in {max(0.0, state.ends_in):.0f} s")
    elif state.process == "draining":
        plan = Text("draining: waiting for the connections in flight", "bold yellow")
    else:
        plan = Text("stopped", "bold")
    for line in (balancer, snapshot, plan):
        line.no_wrap = True
        line.overflow = "ellipsis"
    grid.add_row("balancer", balancer)
    grid.add_row("snapshot", snapshot)
    grid.add_row("try", tries)
    grid.add_row("next", plan)
    return Panel(grid, title="[bold]Loble demo[/]", title_align="left")


def _backends(state: DemoState) -> Table:
    table = Table(
        title=f"backends [dim](traffic: connections a second, the last {HISTORY_SECONDS} s)[/]",
        title_justify="left",
        title_style="bold",
        box=None,
        pad_edge=False,
        collapse_padding=True,
        header_style="bold",
    )
    table.add_column("backend", no_wrap=True)
    table.add_column("address", no_wrap=True)
    table.add_column("server", no_wrap=True)
    table.add_column("health", no_wrap=True, min_width=len("unhealthy"))
    table.add_column("admin", no_wrap=True, min_width=len("maint"))
    for name in ("weight", "active", "total", "conn/s"):
        table.add_column(name, justify="right", no_wrap=True)
    # The one column that gives way on a narrow terminal: older seconds go first.
    table.add_column("traffic")
    top = max((max(b.rates, default=0) for b in state.backends), default=0)
    for backend in state.backends:
        table.add_row(
            backend.name,
            backend.address,
            Text("up", "green") if backend.server_up else Text("down", "bold red"),
            Text(backend.health, STATE_STYLES.get(backend.health, "")),
            Text(backend.admin, ADMIN_STYLES.get(backend.admin, "")),
            str(backend.weight),
            str(backend.active),
            str(backend.total),
            str(backend.rates[-1]) if backend.rates else "0",
            Spark(backend.rates, top, "cyan"),
        )
    return table


def _events(state: DemoState) -> Panel:
    lines = Table.grid(padding=(0, 1), expand=True)
    lines.add_column(justify="right", no_wrap=True, style="dim")
    lines.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    shown = state.happenings[-EVENT_LINES:]
    for happening in shown:
        lines.add_row(f"{happening.at:.1f} s", Text(happening.text, happening.style))
    body: RenderableType = lines if shown else Text("no event yet", "dim")
    return Panel(body, title="health, admin and snapshots", title_align="left")


def _clients(state: DemoState) -> Panel:
    client = state.client
    grid = Table.grid(padding=(0, 1), expand=True)
    grid.add_column(no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    grid.add_column(ratio=1)
    top = max(max(client.answered_rates, default=0), max(client.failed_rates, default=0))
    grid.add_row(
        "answered",
        Text(str(client.answered), "green"),
        Spark(client.answered_rates, top, "green"),
    )
    grid.add_row(
        "failed",
        Text(str(client.failed), "bold red" if client.failed else ""),
        Spark(client.failed_rates, top, "red"),
    )
    for name, count in client.by_backend:
        share = f"{count / client.answered:.0%}" if client.answered else ""
        grid.add_row(f"  {name}", str(count), Text(share, "dim"))
    return Panel(grid, title=f"clients, {client.rate:g} requests/s", title_align="left")


# -- the events panel's lines --------------------------------------------------------

_HEALTH_STYLES = {
    HealthState.HEALTHY: "bold green",
    HealthState.DRAINING: "bold yellow",
    HealthState.UNHEALTHY: "bold red",
}


def describe(output: Output, names: Mapping[str, str], started: float) -> Happening | None:
    """The events panel's line for one of the core's outputs; None for one it skips.

    ``names`` maps a backend's address to its name (``backend-2``); ``started``
    is when the demo started, on the core's clock.
    """
    text: str
    style = ""
    if isinstance(output, BackendStateChanged):
        text = f"{_name(output.address, names)} {output.old.value} → {output.new.value}"
        if output.reason:
            text += f": {output.reason}"
        style = _HEALTH_STYLES.get(output.new, "")
    elif isinstance(output, SnapshotPublished):
        members = ", ".join(_name(address, names) for address in output.addresses)
        text = f"snapshot v{output.version}: {members or 'no backend eligible'}"
        style = "cyan" if output.addresses else "bold red"
    elif isinstance(output, AdminStateChanged):
        text = f"{_name(output.address, names)} admin {output.old.value} → {output.new.value}"
        style = "bold green" if output.new is AdminState.READY else "bold yellow"
    elif isinstance(output, WeightChanged):
        text = f"{_name(output.address, names)} weight {output.old} → {output.new}"
    elif isinstance(output, ShutdownStarted):
        text = f"shutdown: not accepting, draining {output.in_flight} connections"
        style = "bold yellow"
    elif isinstance(output, ShutdownFinished):
        text = f"shutdown finished, {output.cut} connections cut"
        style = "bold"
    else:
        return None
    return Happening(at=output.at - started, text=text, style=style)


def _name(address: str, names: Mapping[str, str]) -> str:
    return names.get(address, address)
