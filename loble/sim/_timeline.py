"""What a run did over simulated time, in bins: the data behind ``--plot``.

The report says how a run ended; a plot shows when things happened. Most of
that the simulator keeps anyway: each backend's state changes (the
monitor's timeline) and the behaviour the fault schedule gave it (each
:class:`SimBackend`'s timeline). Three series it does not keep, as they cost
a little at every connection: client outcomes over time, active connections
per backend over time and connect latency over time. A :class:`Recorder`
handed to :class:`Simulation` keeps them, in bins of fixed width; without
one the simulator runs exactly as before, not a call more.

The outcomes are what the client saw where Loble's outcome says less: a
stream a killed backend cut short with a FIN, which the core saw complete,
is ``truncated`` (the recorder reads the run's count of them as each
connection closes, so it must :meth:`~Recorder.watch` the run), and the
clients the kernel refused after the process stopped, which reach no core
and so no recorder, are ``refused_after_stop``. The run keeps only their
count and the first and the last of them, so their series spreads the
count evenly between those two: as arrivals go on at the scenario's rate
after the stop, the right total over the right span, but not each bin's
own draw.

:meth:`Recorder.series` turns a finished run into plain data (lists of
numbers, picklable, so ``--runs`` workers send it back), and
:func:`spread` and :func:`state_shares` summarise several runs. Nothing here
imports matplotlib: :mod:`loble.sim._plot` draws what this module computes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from loble.core import ConnectionClosed, HealthState, Outcome

from ._report import AFTER_STOP, percentile

if TYPE_CHECKING:
    from ._engine import Simulation

__all__ = ["BIN_TARGET", "Recorder", "bin_width", "evenly", "spread", "state_shares"]

BIN_TARGET = 150
"""About this many bins over ``sim.duration``: fine enough to see a
threshold's few seconds, coarse enough that a bin holds several connections."""

_NICE = (1.0, 2.0, 2.5, 5.0, 10.0)
STATES = tuple(state.value for state in HealthState)
_SPANS = ("drain", "maint", "removed")
"""Admin states and membership changes drawn as a span: until the next change."""


def bin_width(duration: float) -> float:
    """The smallest round width (1, 2, 2.5 or 5 times a power of ten) giving
    at most :data:`BIN_TARGET` bins over ``duration`` seconds."""
    raw = max(duration, 1e-6) / BIN_TARGET
    power = 10.0 ** math.floor(math.log10(raw))
    width = next(step * power for step in _NICE if step * power >= raw * (1 - 1e-12))
    return float(f"{width:.12g}")  # 0.5, not 0.5000000000000001


class Recorder:
    """Per-bin tallies of one run, fed by :class:`Simulation` as outputs pass."""

    __slots__ = (
        "_since",
        "_truncated",
        "_watched",
        "active_area",
        "admin",
        "bin",
        "latencies",
        "membership",
        "outcomes",
    )

    def __init__(self, width: float) -> None:
        if not width > 0:
            raise ValueError(f"bin width {width!r} must be > 0")
        self.bin = width
        self.outcomes: dict[str, list[int]] = {}
        """Connections ended in each bin, by outcome (the time the client saw it),
        with the completed streams cut short under ``"truncated"``."""
        self._watched: Simulation | None = None
        self._truncated = 0
        """How many truncated streams the watched run had counted at the last close."""
        self.latencies: list[list[float]] = []
        """Connect latencies (seconds), in the bin of the connect."""
        self.active_area: dict[str, list[float]] = {}
        """Per backend, the integral of its active connections over each bin."""
        self._since: dict[str, tuple[float, int]] = {}
        """Per backend: when its active count last changed, and to what."""
        self.admin: list[tuple[float, str, str]] = []
        """(at, backend, admin state) for each operator change."""
        self.membership: list[tuple[float, str, str]] = []
        """(at, backend, what) for each change a reload made: what is the health
        state a backend it added starts in, ``"removed"`` for one it removed
        (it keeps its connections for a while) and ``"gone"`` once forgotten."""

    def watch(self, simulation: Simulation) -> None:
        """Read ``simulation``'s count of truncated streams as connections close.

        The engine counts a stream a killed backend cut short when it closes
        the connection, just before the core's ``ConnectionClosed`` for it
        reaches :meth:`closed`: a count that has grown since the last close
        marks this one. Call it before the run; :meth:`series` refuses a run
        with truncated streams it did not watch.
        """
        self._watched = simulation
        self._truncated = simulation.truncated_completed

    # -- fed during the run --------------------------------------------------------------

    def closed(self, event: ConnectionClosed) -> None:
        width = self.bin
        outcome = event.outcome.value
        watched = self._watched
        if watched is not None and watched.truncated_completed != self._truncated:
            self._truncated = watched.truncated_completed
            if event.outcome is Outcome.COMPLETED:
                outcome = "truncated"
        counts = self.outcomes.setdefault(outcome, [])
        index = int(event.at / width)
        if len(counts) <= index:
            counts.extend([0] * (index + 1 - len(counts)))
        counts[index] += 1
        if event.connected_at is not None:
            index = int(event.connected_at / width)
            latencies = self.latencies
            while len(latencies) <= index:
                latencies.append([])
            latencies[index].append(event.connected_at - event.opened_at)

    def active(self, address: str, now: float, count: int) -> None:
        """``address`` carries ``count`` attempts from ``now`` on."""
        since, previous = self._since.get(address, (now, 0))
        self._accumulate(address, since, now, previous)
        self._since[address] = (now, count)

    def admin_changed(self, now: float, address: str, state: str) -> None:
        self.admin.append((now, address, state))

    def member(self, now: float, address: str, what: str) -> None:
        self.membership.append((now, address, what))

    def _accumulate(self, address: str, start: float, end: float, count: int) -> None:
        area = self.active_area.setdefault(address, [])
        width = self.bin
        last = int(end / width)
        if len(area) <= last:
            area.extend([0.0] * (last + 1 - len(area)))
        if not count or end <= start:
            return
        index = int(start / width)
        while index <= last:
            low = max(start, index * width)
            high = min(end, (index + 1) * width)
            if high > low:
                area[index] += count * (high - low)
            index += 1

    # -- after the run ---------------------------------------------------------------------

    def series(self, simulation: Simulation) -> dict[str, Any]:
        """The run over time, as plain data: see :mod:`loble.sim._plot` for its reader.

        The bins go on past the run's end while the kernel refuses clients.
        """
        if simulation.truncated_completed and self._watched is not simulation:
            raise ValueError("the run has truncated streams: watch() it before it runs")
        end = simulation.ended_at
        width = self.bin
        refused = simulation.refused_after_stop
        times = simulation.refused_after_stop_times
        last = max(end, times[-1]) if refused else end
        count = int(last / width) + 1  # a bin for what ends at the very end, too
        monitor = simulation.monitor
        for address, (since, active) in list(self._since.items()):
            self._accumulate(address, since, end, active)
            self._since[address] = (end, active)
        addresses = list(monitor.known)
        active_mean = {}
        for address in addresses:
            area = _padded(self.active_area.get(address, []), count, 0.0)
            active_mean[address] = [value / width for value in area]
        latency: dict[str, list[float]] = {"p50": [], "p99": [], "max": []}
        for index in range(count):
            ordered = sorted(self.latencies[index]) if index < len(self.latencies) else []
            for label, fraction in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
                latency[label].append(percentile(ordered, fraction) * 1000 if ordered else math.nan)
        # Membership first: at a reload's instant it comes before the state
        # changes that follow it (sorted() keeps that order at ties).
        events = sorted(
            [
                *(event for event in self.membership if event[2] != "removed"),
                *((c.at, c.address, c.new.value) for c in monitor.timeline),
            ],
            key=lambda event: event[0],
        )
        states: dict[str, list[tuple[float, str]]] = {
            backend.address: [(0.0, HealthState.HEALTHY.value)]
            for backend in simulation.scenario.config.backends
        }
        for at, address, what in events:
            states.setdefault(address, []).append((at, what))
        # Spans over the health band: an operator's drain or maintenance, and
        # a removed backend's last connections, each in its own lane.
        spans: dict[str, list[tuple[float, float, str]]] = {}
        opened: dict[tuple[str, str], tuple[float, str]] = {}
        marks = [(at, address, "admin", what) for at, address, what in self.admin]
        marks += [(at, address, "member", what) for at, address, what in self.membership]
        for at, address, lane, what in sorted(marks, key=lambda mark: mark[0]):
            begun = opened.pop((address, lane), None)
            if begun is not None:
                spans.setdefault(address, []).append((begun[0], at, begun[1]))
            if what in _SPANS:
                opened[(address, lane)] = (at, what)
        for (address, _), (at, what) in opened.items():
            spans.setdefault(address, []).append((at, end, what))
        return {
            "scenario": simulation.scenario.name,
            "seed": simulation.seed,
            "ok": not monitor.violations,
            "bin": width,
            "bins": count,
            "end": end,
            "backends": addresses,
            "states": states,
            "behaviours": {
                address: list(backend.timeline) for address, backend in simulation.backends.items()
            },
            "spans": spans,
            "shutdown": None
            if monitor.shutdown is None
            else (monitor.shutdown.at, monitor.shutdown.deadline),
            "outcomes": {
                **{outcome: _padded(counts, count, 0) for outcome, counts in self.outcomes.items()},
                **(
                    {AFTER_STOP: evenly(refused, times[0], times[-1], width, count)}
                    if refused
                    else {}
                ),
            },
            "active": active_mean,
            "latency_ms": latency,
        }


def evenly(total: int, first: float, last: float, width: float, count: int) -> list[int]:
    """``total`` connections spread evenly from ``first`` to ``last``, in whole
    connections per bin: each bin has the share of the span it covers, rounded
    so that the bins add up to ``total`` exactly."""
    bins = [0] * count
    if last <= first:
        bins[min(int(first / width), count - 1)] = total
        return bins
    given = 0
    for index in range(int(first / width), min(int(last / width), count - 1) + 1):
        covered = min(last, (index + 1) * width) - first
        upto = total if covered >= last - first else round(total * covered / (last - first))
        bins[index] = upto - given
        given = upto
    return bins


def _padded(values: list[Any], length: int, fill: Any) -> list[Any]:
    return [*values[:length], *([fill] * (length - len(values)))]


def spread(runs: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per bin: the median, the minimum and the maximum over runs.

    Runs may have different lengths (a seed ends a little earlier or later):
    a missing bin is absent from that run, not zero, except that the caller
    pads counts with zeros where zero is the truth. NaN (a bin without a
    connect, for latency) is left out; a bin no run has a value for is NaN.
    """
    length = max((len(run) for run in runs), default=0)
    medians, lows, highs = [], [], []
    for index in range(length):
        values = [run[index] for run in runs if index < len(run) and not math.isnan(run[index])]
        if values:
            medians.append(float(statistics.median(values)))
            lows.append(float(min(values)))
            highs.append(float(max(values)))
        else:
            medians.append(math.nan)
            lows.append(math.nan)
            highs.append(math.nan)
    return medians, lows, highs


def state_shares(
    changes: Sequence[tuple[float, str]], width: float, count: int, end: float
) -> dict[str, list[float]]:
    """Per bin, the share of its time a backend spent in each health state.

    ``changes`` is ``[(at, state), ...]`` in time order, from the moment the
    backend is first known; the time before that, and after ``end``, counts
    for no state.
    """
    shares = {state: [0.0] * count for state in STATES}
    for position, (start, state) in enumerate(changes):
        if state not in shares:
            continue  # "gone": forgotten after a reload removed it
        stop = changes[position + 1][0] if position + 1 < len(changes) else end
        stop = min(stop, end, count * width)
        index = int(start / width)
        while index < count and index * width < stop:
            low = max(start, index * width)
            high = min(stop, (index + 1) * width)
            if high > low:
                shares[state][index] += (high - low) / width
            index += 1
    return shares
