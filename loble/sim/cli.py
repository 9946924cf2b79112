"""``loble sim``: run a scenario, print the report, replay a failing seed.

One run prints the report (rich tables, or ``--json``) and can write the
trace (``--trace FILE``, one JSON line per event) and draw the run over time
(``--plot FILE``, with matplotlib, imported only then). ``--runs K`` runs seeds
N..N+K-1 on a process pool (both cores by default), shows a progress bar on
stderr, prints the impact on clients over the runs, and for each failing seed
prints the command that replays it; ``--plot`` then draws the spread over the
seeds. What a scenario asks for that the run never does (a parameter its
behaviour ignores, a fault outside the simulated time) is one ``warning:``
line each on stderr. The exit
status is 0 when every invariant held in every run, 3 when one failed, and 1
for a bad scenario or a run that cannot go on (one line per problem, from
``loble.__main__``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loble.core import LobleError

from ._engine import Simulation
from ._report import IMPACT, build_report, render_report
from ._scenario import Scenario, load_scenario
from ._timeline import Recorder, bin_width

__all__ = [
    "EXIT_INVARIANT_FAILED",
    "PLOT_HINT",
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
    sim.add_argument("--seed", type=int, default=None, help="the seed (default: sim.seed)")
    sim.add_argument(
        "--runs", type=int, default=1, metavar="K", help="run seeds N..N+K-1 (default 1)"
    )
    sim.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="J",
        help="processes for --runs (default: the number of cores, at most 2)",
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


def replay_command(scenario_path: str, seed: int) -> str:
    return f"loble sim {shlex.quote(scenario_path)} --seed {seed}"


def run_seed(scenario: Scenario, seed: int, trace: TextIO | None = None) -> dict[str, Any]:
    """Run one seed and return its report (writing the trace, if asked)."""
    return _run(scenario, seed, trace)[0]


def _run(
    scenario: Scenario, seed: int, trace: TextIO | None = None, plotted: bool = False
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run one seed: its report, and its series over time if ``plotted``."""
    record = None
    if trace is not None:
        write = trace.write

        def record(entry: dict[str, Any]) -> None:
            write(json.dumps(entry, separators=(",", ":")) + "\n")

    recorder = Recorder(bin_width(scenario.sim.duration)) if plotted else None
    simulation = Simulation(scenario, seed, trace=record, recorder=recorder).run()
    series = None if recorder is None else recorder.series(simulation)
    return build_report(simulation), series


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


def _handle(args: argparse.Namespace) -> int:
    if not args.scenario:  # Path("") is ".", which would name the current directory
        raise LobleError("scenario path is empty")
    scenario = load_scenario(args.scenario)
    seed = scenario.sim.seed if args.seed is None else args.seed
    if args.runs < 1:
        raise LobleError(f"--runs: {args.runs} must be >= 1")
    if seed < 0:
        raise LobleError(f"--seed: {seed} must be >= 0")
    # Before any run: a missing matplotlib or a bad file name fails at once.
    args.plotter = _plotter(args.plot) if args.plot is not None else None
    if args.runs == 1:
        return _single(args, scenario, seed)
    if args.trace:
        raise LobleError("--trace records one run: use it without --runs")
    return _many(args, scenario, seed)


def _single(args: argparse.Namespace, scenario: Scenario, seed: int) -> int:
    plotted = args.plotter is not None
    if args.trace:
        try:
            with open(args.trace, "w", encoding="utf-8") as trace:
                report, series = _run(scenario, seed, trace, plotted)
        except OSError as error:
            raise LobleError(f"--trace {args.trace}: {error.strerror or error}") from None
    else:
        report, series = _run(scenario, seed, plotted=plotted)
    _warn(report)
    if series is not None:
        args.plotter.save_plot(args.plot, [series], scenario)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = None if sys.stdout.isatty() else 120
        render_report(report, _StdoutConsole(highlight=False, width=width))
        if not report["ok"]:
            print(f"replay: {replay_command(args.scenario, seed)}")
    return 0 if report["ok"] else EXIT_INVARIANT_FAILED


def _many(args: argparse.Namespace, scenario: Scenario, first_seed: int) -> int:
    seeds = range(first_seed, first_seed + args.runs)
    jobs = args.jobs or min(2, os.cpu_count() or 1)
    reports: dict[int, dict[str, Any]] = {}
    series: dict[int, dict[str, Any] | None] = {}
    plotted = args.plotter is not None
    progress = Progress(
        TextColumn(f"{Path(args.scenario).name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=args.json,
    )
    with progress:
        task = progress.add_task("runs", total=len(seeds))
        if jobs <= 1:
            for seed in seeds:
                reports[seed], series[seed] = _run(scenario, seed, plotted=plotted)
                progress.advance(task)
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                futures = {pool.submit(_run, scenario, seed, None, plotted): seed for seed in seeds}
                try:
                    for future in as_completed(futures):
                        reports[futures[future]], series[futures[future]] = future.result()
                        progress.advance(task)
                except LobleError:
                    # A run that cannot go on (SimulationError) comes back as an
                    # exception, not a worker's traceback: stop the rest, say it once.
                    pool.shutdown(cancel_futures=True)
                    raise
    failed = [seed for seed in seeds if not reports[seed]["ok"]]
    for line in dict.fromkeys(line for seed in seeds for line in reports[seed]["warnings"]):
        print(f"warning: {line}", file=sys.stderr)
    if plotted:
        runs = [run for run in (series[seed] for seed in seeds) if run is not None]
        args.plotter.save_plot(args.plot, runs, scenario)
    if args.json:
        summary = {
            "scenario": scenario.name,
            "seeds": [seeds[0], seeds[-1]],
            "runs": len(seeds),
            "failed_seeds": failed,
            "reports": [reports[seed] for seed in seeds],
        }
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(args.scenario, scenario, seeds, reports, failed)
    return EXIT_INVARIANT_FAILED if failed else 0


def _print_summary(
    path: str,
    scenario: Scenario,
    seeds: range,
    reports: dict[int, dict[str, Any]],
    failed: list[int],
) -> None:
    totals: dict[str, int] = {}
    for seed in seeds:
        for outcome, count in reports[seed]["clients"]["outcomes"].items():
            totals[outcome] = totals.get(outcome, 0) + count
    seen = ", ".join(f"{outcome.replace('_', ' ')} {n}" for outcome, n in totals.items() if n)
    print(f"{scenario.name}: {len(seeds)} runs, seeds {seeds[0]}..{seeds[-1]}; clients: {seen}")
    for line in impact_over_runs([reports[seed] for seed in seeds]):
        print(f"Impact: {line}")
    if not failed:
        print("every invariant held in every run")
        return
    print(f"{len(failed)} of {len(seeds)} runs failed an invariant", file=sys.stdout)
    for seed in failed:
        first = next(row for row in reports[seed]["invariants"] if not row["held"])
        print(f"seed {seed}: {first['first'][0] if first['first'] else first['name']}")
        print(f"  replay: {replay_command(path, seed)}")


def impact_over_runs(reports: list[dict[str, Any]]) -> list[str]:
    """One line per kind of client failure: in how many runs, and the range over them
    of when it began, when it ended and how many connections it took."""
    lines = []
    for outcome, what in IMPACT.items():
        rows = [
            row
            for report in reports
            for row in report["clients"]["impact"]
            if row["outcome"] == outcome.value
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
