"""``loble sim``: run a scenario, print the report, replay a failing seed.

One run prints the report (rich tables, or ``--json``) and can write the
trace (``--trace FILE``, one JSON line per event) and draw the run over time
(``--plot FILE``, with matplotlib, imported only then). ``--runs K`` runs seeds
N..N+K-1 on a process pool (both cores by default) or, with ``--cluster
tcp://HOST:PORT``, on a Dask cluster's workers (see :mod:`loble.sim._swarm`),
shows a progress bar on stderr when it is a terminal, and leads with
distributions over the seeds (see :mod:`loble.sim._spread`): what clients
saw, the impact window, the number and the times of state changes, each
with the seeds behind its min and max and the commands that replay them;
``--json`` carries them under ``distributions``. For each failing seed it
prints the command that replays it; ``--plot`` then draws the spread over
the seeds. ``--swarm`` draws
each seed's faults from the seed. What a scenario asks for that the run never
does (a parameter its behaviour ignores, a fault outside the simulated time)
is one ``warning:`` line each on stderr. The exit status is 0 when every
invariant held in every run, 3 when one failed, and 1 for a bad scenario or a
run that cannot go on (one line per problem, from ``loble.__main__``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loble.core import LobleError

from ._report import AFTER_STOP, IMPACT, IMPACT_AFTER_STOP, SEEN, render_report
from ._scenario import Scenario, load_scenario
from ._spread import over_runs, render_distributions
from ._swarm import describe_faults, run_once, run_seeds

__all__ = [
    "EXIT_INVARIANT_FAILED",
    "PLOT_HINT",
    "clients_saw",
    "impact_over_runs",
    "register",
    "replay_command",
    "run_seed",
]

EXIT_INVARIANT_FAILED = 3


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``loble sim`` to the ``loble`` parser."""
    sim = commands.add_parser(
        "sim",
        help="simulate a scenario: a config under clients and faults, in simulated time",
        description="Run SCENARIO (a config.toml plus [sim] tables) in simulated time and "
        "report what backends and clients saw and whether every invariant held.",
    )
    sim.add_argument("scenario", metavar="SCENARIO", help="a scenario .toml file")
    # Whole numbers are checked by _handle, not argparse: a bad one is one line.
    sim.add_argument("--seed", default=None, metavar="N", help="the seed (default: sim.seed)")
    sim.add_argument("--runs", default="1", metavar="K", help="run seeds N..N+K-1 (default 1)")
    sim.add_argument(
        "--jobs",
        default=None,
        metavar="J",
        help="processes for --runs (default: the number of cores, at most 2)",
    )
    sim.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run the seeds of --runs on a Dask cluster, its scheduler at tcp://HOST:PORT "
        "(needs dask.distributed: pip install 'loble[swarm]')",
    )
    sim.add_argument(
        "--swarm",
        action="store_true",
        help="draw each seed's faults (start, length, behaviour) from the seed, "
        "one per fault of the scenario",
    )
    sim.add_argument("--trace", metavar="FILE", help="write one JSON line per event to FILE")
    sim.add_argument("--json", action="store_true", help="print the report as JSON")
    sim.add_argument(
        "--plot",
        metavar="FILE",
        help="draw the timeline (with --runs: the spread over seeds) to FILE, "
        "e.g. out.png (needs matplotlib: pip install 'loble[plot]')",
    )
    sim.set_defaults(handler=_handle)


class _StdoutConsole(Console):
    """A rich Console that leaves a closed stdout to ``loble.__main__``.

    rich's own answer is ``SystemExit(1)``; raising lets every command end
    the same way, with the same exit status, whether it prints with rich or not.
    """

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def replay_command(scenario_path: str, seed: int, swarm: bool = False) -> str:
    return f"loble sim {shlex.quote(scenario_path)} --seed {seed}" + (" --swarm" if swarm else "")


def run_seed(scenario: Scenario, seed: int, trace: TextIO | None = None) -> dict[str, Any]:
    """Run one seed and return its report (writing the trace, if asked)."""
    return _run(scenario, seed, trace)[0]


_run = run_once


PLOT_HINT = "--plot needs matplotlib: pip install 'loble[plot]'"


def _plotter(path: str) -> ModuleType:
    """The plotting module, imported only now, once ``path`` is known to be writable."""
    try:
        from . import _plot
    except ImportError:
        raise LobleError(PLOT_HINT) from None
    _plot.check_target(path)
    return _plot


def _warn(report: dict[str, Any]) -> None:
    for line in report["warnings"]:
        print(f"warning: {line}", file=sys.stderr)


def _whole(option: str, text: str, least: int) -> int:
    """``text`` as a whole number of at least ``least``; one line naming ``option`` if not."""
    try:
        value = int(text)
    except ValueError:
        raise LobleError(f"{option}: {text!r} is not a whole number") from None
    if value < least:
        raise LobleError(f"{option}: {value} must be >= {least}")
    return value


def _handle(args: argparse.Namespace) -> int:
    if not args.scenario:  # Path("") is ".", which would name the current directory
        raise LobleError("scenario path is empty")
    args.runs = _whole("--runs", args.runs, 1)
    if args.jobs is not None:
        args.jobs = _whole("--jobs", args.jobs, 1)
    given = None if args.seed is None else _whole("--seed", args.seed, 0)
    scenario = load_scenario(args.scenario)
    seed = scenario.sim.seed if given is None else given
    if seed < 0:
        raise LobleError(f"--seed: {seed} must be >= 0")
    # Before any run: a missing matplotlib or a bad file name fails at once.
    args.plotter = _plotter(args.plot) if args.plot is not None else None
    if args.runs == 1:
        if args.cluster is not None:
            raise LobleError("--cluster spreads the seeds of --runs K: use it with --runs")
        return _single(args, scenario, seed)
    if args.trace:
        raise LobleError("--trace records one run: use it without --runs")
    if args.cluster is not None and args.jobs is not None:
        raise LobleError("--jobs counts local processes: with --cluster, its workers run the seeds")
    return _many(args, scenario, seed)


def _single(args: argparse.Namespace, scenario: Scenario, seed: int) -> int:
    plotted = args.plotter is not None
    if args.trace:
        try:
            with open(args.trace, "w", encoding="utf-8") as trace:
                report, series = _run(scenario, seed, trace, plotted, args.swarm)
        except OSError as error:
            raise LobleError(f"--trace {args.trace}: {error.strerror or error}") from None
    else:
        report, series = _run(scenario, seed, plotted=plotted, swarm=args.swarm)
    _warn(report)
    if series is not None:
        args.plotter.save_plot(args.plot, [series], scenario)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        if args.swarm:
            print(f"swarm faults: {describe_faults(report['swarm'])}")
        width = None if sys.stdout.isatty() else 120
        render_report(report, _StdoutConsole(highlight=False, width=width))
        if not report["ok"]:
            print(f"replay: {replay_command(args.scenario, seed, args.swarm)}")
    return 0 if report["ok"] else EXIT_INVARIANT_FAILED


def _many(args: argparse.Namespace, scenario: Scenario, first_seed: int) -> int:
    seeds = range(first_seed, first_seed + args.runs)
    jobs = args.jobs or min(2, os.cpu_count() or 1)
    plotted = args.plotter is not None
    progress = Progress(
        TextColumn(f"{Path(args.scenario).name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=args.json or not sys.stderr.isatty(),
    )
    with progress:
        task = progress.add_task("runs", total=len(seeds))
        outcomes = run_seeds(
            scenario,
            seeds,
            jobs=jobs,
            cluster=args.cluster,
            plotted=plotted,
            swarm=args.swarm,
            advance=lambda: progress.advance(task),
        )
    reports = {seed: outcome[0] for seed, outcome in outcomes.items()}
    series = {seed: outcome[1] for seed, outcome in outcomes.items()}
    failed = [seed for seed in seeds if not reports[seed]["ok"]]
    for line in dict.fromkeys(line for seed in seeds for line in reports[seed]["warnings"]):
        print(f"warning: {line}", file=sys.stderr)
    if plotted:
        runs = [run for run in (series[seed] for seed in seeds) if run is not None]
        args.plotter.save_plot(args.plot, runs, scenario)
    ordered = [reports[seed] for seed in seeds]
    distributions = over_runs(ordered, lambda seed: replay_command(args.scenario, seed, args.swarm))
    if args.json:
        summary = {
            "scenario": scenario.name,
            "seeds": [seeds[0], seeds[-1]],
            "runs": len(seeds),
            "failed_seeds": failed,
            "distributions": distributions,
            "reports": ordered,
        }
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(args.scenario, scenario, seeds, reports, failed, args.swarm)
        width = None if sys.stdout.isatty() else 120
        render_distributions(distributions, _StdoutConsole(highlight=False, width=width))
        _print_failures(args.scenario, seeds, reports, failed, args.swarm)
    return EXIT_INVARIANT_FAILED if failed else 0


def clients_saw(reports: list[dict[str, Any]]) -> str:
    """What clients saw, summed over ``reports``: ``complete 59677, reset 162 (of 59839 arrived)``.

    The client's view (``clients.seen``), not Loble's outcomes: a stream a
    killed backend cut short is truncated, not completed, and a client the
    kernel refused after the process stopped is counted with the others.
    """
    totals = dict.fromkeys(SEEN, 0)
    for report in reports:
        for saw, count in report["clients"]["seen"].items():
            totals[saw] += count
    parts = [f"{SEEN[saw]} {count}" for saw, count in totals.items() if count]
    still_open = sum(report["clients"]["in_flight_at_end"] for report in reports)
    if still_open:
        parts.append(f"still open at the end {still_open}")
    arrived = sum(report["clients"]["arrived"] for report in reports)
    return f"{', '.join(parts) or 'none'} (of {arrived} arrived)"


def _print_summary(
    path: str,
    scenario: Scenario,
    seeds: range,
    reports: dict[int, dict[str, Any]],
    failed: list[int],
    swarm: bool = False,
) -> None:
    ordered = [reports[seed] for seed in seeds]
    drawn = ", faults drawn from each seed" if swarm else ""
    print(
        f"{scenario.name}: {len(seeds)} runs, seeds {seeds[0]}..{seeds[-1]}{drawn}; "
        f"clients saw: {clients_saw(ordered)}"
    )
    for line in impact_over_runs(ordered):
        print(f"Impact: {line}")


def _print_failures(
    path: str,
    seeds: range,
    reports: dict[int, dict[str, Any]],
    failed: list[int],
    swarm: bool = False,
) -> None:
    if not failed:
        print("every invariant held in every run")
        return
    print(f"{len(failed)} of {len(seeds)} runs failed an invariant", file=sys.stdout)
    for seed in failed:
        first = next(row for row in reports[seed]["invariants"] if not row["held"])
        print(f"seed {seed}: {first['first'][0] if first['first'] else first['name']}")
        if swarm:
            print(f"  faults: {describe_faults(reports[seed]['swarm'])}")
        print(f"  replay: {replay_command(path, seed, swarm)}")


def impact_over_runs(reports: list[dict[str, Any]]) -> list[str]:
    """One line per kind of client failure: in how many runs, and the range over them
    of when it began, when it ended and how many connections it took.

    The kinds are those of a single run's impact lines, in the same order:
    Loble's outcomes, then the clients the kernel refused after the process
    stopped."""
    kinds = {outcome.value: what for outcome, what in IMPACT.items()}
    kinds[AFTER_STOP] = IMPACT_AFTER_STOP
    lines = []
    for outcome, what in kinds.items():
        rows = [
            row
            for report in reports
            for row in report["clients"]["impact"]
            if row["outcome"] == outcome
        ]
        if not rows:
            continue
        first = _range([row["first"] for row in rows], ".3f")
        last = _range([row["last"] for row in rows], ".3f")
        count = _range([row["connections"] for row in rows], "d")
        lines.append(
            f"{what} in {len(rows)} of {len(reports)} runs: from {first} s to {last} s, "
            f"{count} connections a run"
        )
    return lines


def _range(values: list[Any], spec: str) -> str:
    low, high = format(min(values), spec), format(max(values), spec)
    return low if low == high else f"{low}..{high}"
