"""``loble sim --plot``: a run's timeline, or the spread of many runs, as a picture.

Four panels share the time axis: each backend's health state as a coloured
band (one row per backend, with the behaviour the fault schedule gave it as a
thin strip above the band, and an operator's drain or a reload's removal
hatched over it), the active connections on each backend, the client
outcomes per time bin (Loble's, with the streams a killed backend truncated
and the clients the kernel refused after the process stopped apart) and the
connect latency. The fault schedule is marked
across all four: a shaded span from each fault's ``at`` to its ``until`` (or
the end), labelled above the first panel, with operations and a shutdown as
dotted lines. With several runs (``--runs K``), each series becomes its
median over the runs with a band from the minimum to the maximum, and the
health rows show the share of runs in each state.

The data comes from :mod:`loble.sim._timeline`; this module only draws. It
is imported only for ``--plot``, so matplotlib stays an optional extra
(``loble[plot]``), and draws on the Agg canvas, never a window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory

from loble.core import LobleError

from ._scenario import ALL_BACKENDS, Scenario
from ._timeline import STATES, spread, state_shares

__all__ = ["build_figure", "check_target", "save_plot"]

STATE_COLOURS = {"healthy": "#66bb6a", "draining": "#ffa726", "unhealthy": "#e53935"}
SPAN_HATCHES = {"drain": "//", "maint": "xx", "removed": ".."}
SPAN_NAMES = {"drain": "drained (admin)", "maint": "maintenance (admin)", "removed": "removed"}
BEHAVIOUR_COLOURS = {
    "crash": "#b71c1c",
    "kill": "#d81b60",
    "host_down": "#37474f",
    "accept_hang": "#00695c",
    "blackhole": "#212121",
    "reset": "#6a1b9a",
    "slow": "#1565c0",
    "capacity": "#795548",
    "flapping": "#ef6c00",
    "up": "#2e7d32",
    "recover": "#2e7d32",
}
OUTCOME_COLOURS = {
    "completed": "#2e7d32",
    "truncated": "#9e9d24",
    "no_backend": "#c62828",
    "connect_failed": "#ef6c00",
    "client_reset": "#8d6e63",
    "backend_reset": "#6a1b9a",
    "idle_timeout": "#00838f",
    "cut": "#4e342e",
    "refused_shutting_down": "#ad1457",
    "refused_after_stop": "#f06292",
    "resource_exhausted": "#37474f",
    "removed": "#1565c0",
    "queue_timeout": "#ff8f00",
    "queue_full": "#b71c1c",
}
OUTCOME_NAMES = {
    "truncated": "truncated (FIN)",
    "refused_after_stop": "refused after stop, spread evenly",
}
"""The outcomes a client sees that are not Loble's, named for the legend: see
:mod:`loble.sim._timeline` for why the refusals after the stop are spread."""
_CHARACTER = 0.0075
"""About how much of the time axis one character of a schedule label takes:
a label that would run into the one before it goes on a line above."""


def check_target(path: str) -> None:
    """Refuse, before any run, a ``--plot`` file that could not be written."""
    target = Path(path)
    if not path or target.is_dir():
        raise LobleError(f"--plot {path!r}: not a file name")
    if not target.parent.is_dir():
        raise LobleError(f"--plot {path}: no such directory: {target.parent}")
    suffix = target.suffix.lstrip(".").lower()
    supported = FigureCanvasAgg.get_supported_filetypes()
    if suffix and suffix not in supported:
        raise LobleError(
            f"--plot {path}: {suffix!r} is not an image format matplotlib writes "
            f"({', '.join(sorted(supported))})"
        )


def save_plot(path: str, runs: Sequence[Mapping[str, Any]], scenario: Scenario) -> None:
    """Draw ``runs`` (one series, or several seeds) and write the picture to ``path``."""
    figure = build_figure(runs, scenario)
    try:
        figure.savefig(path, dpi=100)
    except OSError as error:
        raise LobleError(f"--plot {path}: {error.strerror or error}") from None


def build_figure(runs: Sequence[Mapping[str, Any]], scenario: Scenario) -> Figure:
    """The figure for one run's series, or the spread of several (see the module)."""
    if not runs:
        raise ValueError("build_figure needs at least one run")
    width = runs[0]["bin"]
    count = max(run["bins"] for run in runs)
    end = max(run["end"] for run in runs)
    edges = [index * width for index in range(count + 1)]
    backends = list(dict.fromkeys(address for run in runs for address in run["backends"]))
    rows = max(1, len(backends))
    figure = Figure(figsize=(12, 7.4 + 0.42 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    states_axes, active_axes, outcomes_axes, latency_axes = figure.subplots(
        4, 1, sharex=True, height_ratios=[1.0 + 0.42 * rows, 2.2, 2.2, 1.8]
    )
    if len(runs) == 1:
        run = runs[0]
        verdict = "every invariant held" if run["ok"] else "an invariant FAILED"
        figure.suptitle(f"{run['scenario']} seed {run['seed']}: {verdict}")
        _states(states_axes, run, backends)
    else:
        seeds = [run["seed"] for run in runs]
        failed = sum(1 for run in runs if not run["ok"])
        verdict = "every invariant held in every run" if not failed else f"{failed} failed"
        figure.suptitle(
            f"{runs[0]['scenario']}: {len(runs)} runs, seeds {min(seeds)}..{max(seeds)}, "
            f"{verdict}; lines are medians over the runs, bands span min to max"
        )
        _state_shares(states_axes, runs, backends, width, count, end)
    _behaviours(states_axes, runs[0], backends, end)
    _active(active_axes, runs, backends, edges)
    _outcomes(outcomes_axes, runs, edges, width)
    _latency(latency_axes, runs, edges)
    latency_axes.set_xlabel("simulated time (s)")
    latency_axes.set_xlim(0.0, max(end, edges[-1]) if edges[-1] > 0 else 1.0)
    _schedule(figure.axes, scenario, runs[0], end)
    return figure


# -- panels -------------------------------------------------------------------------


def _rows(axes: Axes, backends: list[str]) -> None:
    axes.set_yticks(range(len(backends)), [backends[-1 - i] for i in range(len(backends))])
    axes.set_ylim(-0.6, len(backends) - 0.4)
    axes.set_ylabel("backend state")


def _row(backends: list[str], address: str) -> int:
    return len(backends) - 1 - backends.index(address)


def _states(axes: Axes, run: Mapping[str, Any], backends: list[str]) -> None:
    end = run["end"]
    for address in backends:
        y = _row(backends, address)
        changes = run["states"].get(address, [])
        for position, (start, state) in enumerate(changes):
            stop = changes[position + 1][0] if position + 1 < len(changes) else end
            if state in STATE_COLOURS and stop > start:
                axes.broken_barh(
                    [(start, stop - start)], (y - 0.4, 0.6), facecolors=STATE_COLOURS[state]
                )
        for start, stop, what in run["spans"].get(address, []):
            axes.broken_barh(
                [(start, max(stop - start, 0.0))],
                (y - 0.4, 0.6),
                facecolors="none",
                edgecolors="#424242",
                hatch=SPAN_HATCHES[what],
                linewidth=0.6,
            )
    _rows(axes, backends)
    spans = {what for spans in run["spans"].values() for _, _, what in spans}
    _state_legend(axes, spans, _faulty(run))


def _state_shares(
    axes: Axes,
    runs: Sequence[Mapping[str, Any]],
    backends: list[str],
    width: float,
    count: int,
    end: float,
) -> None:
    edges = [index * width for index in range(count + 1)]
    for address in backends:
        y = _row(backends, address)
        shares = {state: [0.0] * count for state in STATES}
        for run in runs:
            changes = run["states"].get(address, [])
            for state, values in state_shares(changes, width, count, run["end"]).items():
                for index, value in enumerate(values):
                    shares[state][index] += value
        # Shares of the runs that were going, with this backend, in each bin:
        # a seed that ended earlier, or forgot the backend, has no say there.
        for index in range(count):
            present = sum(shares[state][index] for state in STATES)
            for state in STATES:
                shares[state][index] = shares[state][index] / present if present else 0.0
        bottom = [y - 0.4] * count
        for state in STATES:
            top = [low + 0.6 * share for low, share in zip(bottom, shares[state], strict=True)]
            axes.stairs(top, edges, baseline=bottom, fill=True, color=STATE_COLOURS[state])
            bottom = top
    _rows(axes, backends)
    axes.set_ylabel("backend state\n(share of runs)")
    _state_legend(axes, set(), _faulty(runs[0]))


def _state_legend(axes: Axes, spans: set[str], faults: list[str]) -> None:
    handles = [Patch(facecolor=colour, label=state) for state, colour in STATE_COLOURS.items()]
    handles += [
        Patch(facecolor="none", edgecolor="#424242", hatch=SPAN_HATCHES[what], label=name)
        for what, name in SPAN_NAMES.items()
        if what in spans
    ]
    handles += [Patch(facecolor=BEHAVIOUR_COLOURS[name], label=f"fault: {name}") for name in faults]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize="small")


def _faulty(run: Mapping[str, Any]) -> list[str]:
    """The behaviours other than up the fault schedule switched on, in order."""
    names = (name for timeline in run["behaviours"].values() for _, name in timeline)
    return list(dict.fromkeys(name for name in names if name not in ("up", "recover")))


def _behaviours(axes: Axes, run: Mapping[str, Any], backends: list[str], end: float) -> None:
    """A thin strip above each band: the behaviour the fault schedule gave the backend."""
    for address in backends:
        y = _row(backends, address)
        timeline = run["behaviours"].get(address, [])
        for position, (start, name) in enumerate(timeline):
            stop = timeline[position + 1][0] if position + 1 < len(timeline) else end
            if name in ("up", "recover") or stop <= start:
                continue
            colour = BEHAVIOUR_COLOURS[name]
            axes.broken_barh([(start, stop - start)], (y + 0.24, 0.16), facecolors=colour)
            axes.text(
                (start + stop) / 2,
                y + 0.32,
                name,
                ha="center",
                va="center",
                fontsize="x-small",
                color="white",
                clip_on=True,
            )


def _active(
    axes: Axes, runs: Sequence[Mapping[str, Any]], backends: list[str], edges: list[float]
) -> None:
    colours = _cycle(len(backends))
    for address, colour in zip(backends, colours, strict=True):
        series = [_fit(run["active"].get(address, []), len(edges) - 1, 0.0) for run in runs]
        _draw(axes, series, edges, colour, address)
    axes.set_ylabel("active connections\n(mean per bin)")
    axes.set_ylim(bottom=0)
    axes.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize="small")


def _outcomes(
    axes: Axes, runs: Sequence[Mapping[str, Any]], edges: list[float], width: float
) -> None:
    seen = list(dict.fromkeys(outcome for run in runs for outcome in run["outcomes"]))
    ordered = [outcome for outcome in OUTCOME_COLOURS if outcome in seen]
    for outcome in ordered:
        series = [_fit(run["outcomes"].get(outcome, []), len(edges) - 1, 0) for run in runs]
        total = sum(sum(values) for values in series)
        label = OUTCOME_NAMES.get(outcome, outcome.replace("_", " "))
        if len(runs) == 1:
            label = f"{label} ({total})"
        _draw(axes, series, edges, OUTCOME_COLOURS[outcome], label)
    axes.set_ylabel(f"client outcomes\n(connections per {width:g} s)")
    axes.set_ylim(bottom=0)
    if ordered:
        axes.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize="small")


def _latency(axes: Axes, runs: Sequence[Mapping[str, Any]], edges: list[float]) -> None:
    values: list[float] = []
    # Per bin, not over the run: with a few dozen connects in a bin its p99
    # is close to its maximum, which is the point (the worst a client saw then).
    for label, colour in (("p50", "#1565c0"), ("p99", "#c62828")):
        series = [_fit(run["latency_ms"][label], len(edges) - 1, math.nan) for run in runs]
        _draw(axes, series, edges, colour, label)
        values += [value for run in series for value in run if not math.isnan(value)]
    axes.set_ylabel("connect latency (ms)")
    positive = [value for value in values if value > 0]
    if positive and max(positive) / min(positive) > 20:
        axes.set_yscale("log")
    else:  # from zero: a flat 1 ms must not look like a spike of 1e-12
        axes.set_ylim(0.0, max(positive, default=1.0) * 1.15)
    axes.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize="small")


def _draw(
    axes: Axes, series: list[list[float]], edges: list[float], colour: Any, label: str
) -> None:
    """One run: its steps. Several: the median's steps over a min-max band."""
    if len(series) == 1:
        axes.stairs(series[0], edges, baseline=None, color=colour, label=label, linewidth=1.2)
        return
    median, low, high = spread(series)
    axes.stairs(high, edges, baseline=low, fill=True, color=colour, alpha=0.2, linewidth=0)
    axes.stairs(median, edges, baseline=None, color=colour, label=label, linewidth=1.2)


def _fit(values: Sequence[float], length: int, fill: float) -> list[float]:
    return [*values[:length], *([fill] * (length - len(values)))]


def _cycle(count: int) -> list[Any]:
    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(index % palette.N) for index in range(count)]


# -- the schedule ------------------------------------------------------------------


def _schedule(
    all_axes: Iterable[Axes], scenario: Scenario, run: Mapping[str, Any], end: float
) -> None:
    """Mark every fault (a span and a label), operation and shutdown on every panel."""
    all_axes = list(all_axes)
    marks: list[tuple[float, str, Any, float | None, str]] = []
    for index, fault in enumerate(scenario.sim.faults):
        target = "every backend" if fault.backend == ALL_BACKENDS else fault.backend
        when = f"from {fault.at:g} s" if fault.until is None else f"{fault.at:g}-{fault.until:g} s"
        label = f"{fault.behaviour} {target} ({when})"
        ends = fault.until if fault.until is not None else max(end, fault.at)
        marks.append((fault.at, label, BEHAVIOUR_COLOURS[fault.behaviour], ends, f"fault {index}"))
    for index, operation in enumerate(scenario.sim.operations):
        action = operation.written_as or operation.action  # an add is a reload, shown as an add
        label = action if not operation.backend else f"{action} {operation.backend}"
        marks.append(
            (operation.at, f"{label} ({operation.at:g} s)", "#616161", None, f"operation {index}")
        )
    if run["shutdown"] is not None:
        at, deadline = run["shutdown"]
        marks.append((at, f"SIGTERM ({at:g} s)", "#000000", None, "shutdown"))
        if deadline > at:
            marks.append(
                (deadline, f"drain deadline ({deadline:g} s)", "#000000", None, "deadline")
            )
    top = all_axes[0]
    transform = blended_transform_factory(top.transData, top.transAxes)
    free_from: list[float] = []  # per line of labels: where its last label ends
    span = max(end, 1e-9)
    for at, label, colour, until, gid in sorted(marks, key=lambda mark: mark[0]):
        for axes in all_axes:
            if until is not None:
                axes.axvspan(at, until, color=colour, alpha=0.08, linewidth=0, gid=gid)
                axes.axvline(at, color=colour, linestyle="--", linewidth=0.8, gid=gid)
            else:
                axes.axvline(at, color=colour, linestyle=":", linewidth=1.0, gid=gid)
        level = next((i for i, x in enumerate(free_from) if x <= at), len(free_from))
        if level == len(free_from):
            free_from.append(0.0)
        free_from[level] = at + (len(label) + 2) * _CHARACTER * span
        top.annotate(
            label,
            xy=(at, 1.0),
            xycoords=transform,
            xytext=(2, 4 + 12 * level),
            textcoords="offset points",
            color=colour,
            fontsize="small",
            ha="left",
            va="bottom",
            annotation_clip=False,
        )
