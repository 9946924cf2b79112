"""``loble sim --plot``: the series a run records, the figure drawn from them, the
file written, and the one-line hint where matplotlib is not installed."""

from __future__ import annotations

import io
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from loble import sim as sim_package
from loble.__main__ import main
from loble.core import ConnectFailed, ConnectionClosed
from loble.sim import Scenario, Simulation, build_report, load_scenario
from loble.sim._plot import STATE_COLOURS, build_figure
from loble.sim._timeline import Recorder, bin_width, spread, state_shares
from loble.sim.cli import PLOT_HINT, run_seed

from .conftest import REPO, scenario

CRASH = REPO / "scenarios" / "backend-crash.toml"
KILL = REPO / "scenarios" / "backend-kill.toml"
ROLLING = REPO / "scenarios" / "rolling-maintenance.toml"
SHUTDOWN = REPO / "scenarios" / "graceful-shutdown.toml"
HINT = f"error: {PLOT_HINT}\n"


def recorded(path: Path | Scenario, seed: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's report and its series over time."""
    loaded = load_scenario(path) if isinstance(path, Path) else path
    recorder = Recorder(bin_width(loaded.sim.duration))
    simulation = Simulation(loaded, seed, recorder=recorder)
    recorder.watch(simulation)
    simulation.run()
    return build_report(simulation), recorder.series(simulation)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def legend_labels(axes: Any) -> list[str]:
    return [text.get_text() for text in axes.get_legend().get_texts()]


# -- what a run records -------------------------------------------------------------------


def test_bins_are_round_and_about_150_over_the_duration() -> None:
    assert [bin_width(d) for d in (60.0, 90.0, 10.0, 3600.0, 45.0, 1.5)] == [
        0.5,
        1.0,
        0.1,
        25.0,
        0.5,
        0.01,
    ]
    with pytest.raises(ValueError, match="must be > 0"):
        Recorder(0.0)


def test_the_series_agree_with_the_report() -> None:
    report, series = recorded(CRASH)
    width = series["bin"]
    assert width == 0.5 and series["bins"] == int(report["simulated_seconds"] / width) + 1
    outcomes = {name: count for name, count in report["clients"]["outcomes"].items() if count}
    assert {name: sum(counts) for name, counts in series["outcomes"].items()} == outcomes
    assert all(len(counts) == series["bins"] for counts in series["outcomes"].values())
    # The resets come a round trip after the crash at t=20 s, all in its bin.
    resets = series["outcomes"]["backend_reset"]
    assert resets[int(20.0 / width)] == 6 and sum(resets) == 6
    # Health states: the report's timeline, from healthy at 0.
    crashed = "10.0.0.2:8080"
    changes = [(row["at"], row["new"]) for row in report["timeline"]]
    assert [(round(at, 6), state) for at, state in series["states"][crashed]] == [
        (0.0, "healthy"),
        *changes,
    ]
    assert series["behaviours"][crashed] == [(0.0, "up"), (20.0, "crash"), (40.0, "up")]
    # Nothing is active on the crashed backend while it is out.
    out = series["active"][crashed][int(21 / width) : int(40 / width)]
    assert out and set(out) == {0.0}
    assert max(series["active"]["10.0.0.1:8080"]) > 5
    # Latency per bin, in ms; NaN only where no connect was made.
    p50 = series["latency_ms"]["p50"]
    assert 0.5 < p50[0] < 2.5 and math.isnan(p50[-1])
    assert series["shutdown"] is None and series["spans"] == {}


def test_truncated_streams_and_refusals_after_the_stop_are_series_of_their_own() -> None:
    """What clients saw, not only Loble's outcomes: a killed backend's FIN, the
    kernel's refusals once the process stopped."""
    report, series = recorded(KILL)
    seen, outcomes = report["clients"]["seen"], series["outcomes"]
    assert seen["truncated"] > 0
    assert sum(outcomes["truncated"]) == seen["truncated"]
    assert sum(outcomes["completed"]) == seen["complete"]
    # The backend is killed at t=20 s: its streams end a moment later, in that bin.
    width = series["bin"]
    assert (
        sum(outcomes["truncated"][int(20.0 / width) : int(20.5 / width) + 1]) == seen["truncated"]
    )

    report, series = recorded(SHUTDOWN)
    clients, width = report["clients"], series["bin"]
    [row] = [row for row in clients["impact"] if row["outcome"] == "refused_after_stop"]
    refused = series["outcomes"]["refused_after_stop"]
    assert sum(refused) == clients["refused_after_stop"] > 0
    assert len(refused) == series["bins"] == int(row["last"] / width) + 1
    assert series["bins"] > int(series["end"] / width) + 1  # past the run's end
    assert {index for index, count in enumerate(refused) if count} == set(
        range(int(row["first"] / width), int(row["last"] / width) + 1)
    )
    figure = build_figure([series], load_scenario(SHUTDOWN))
    assert f"refused after stop, spread evenly ({clients['refused_after_stop']})" in legend_labels(
        figure.axes[2]
    )
    figure = build_figure([recorded(KILL)[1]], load_scenario(KILL))
    labels = legend_labels(figure.axes[2])
    assert labels[:2] == [
        f"completed ({seen['complete']})",
        f"truncated (FIN) ({seen['truncated']})",
    ]


def test_a_run_with_truncated_streams_must_be_watched() -> None:
    loaded = load_scenario(KILL)
    recorder = Recorder(bin_width(loaded.sim.duration))
    simulation = Simulation(loaded, 1, recorder=recorder).run()
    with pytest.raises(ValueError, match="watch"):
        recorder.series(simulation)


def test_the_area_under_active_connections_is_the_time_connections_were_held() -> None:
    """A constant-duration load: each connection holds its backend for 1 s plus a round trip."""
    one = scenario(
        sim_clients={"arrival": "constant", "rate": 10.0, "duration": 1.0},
        sim_network={"latency": 0.002},
    )
    report, series = recorded(one)
    held = sum(sum(values) for values in series["active"].values()) * series["bin"]
    connections = report["clients"]["outcomes"]["completed"]
    assert connections == 100
    # From the connect (one round trip) to the backend's close: about 1 s each.
    assert held == pytest.approx(connections * 1.002, rel=0.01)


def test_an_operators_drain_and_a_reloads_changes_are_spans_and_states() -> None:
    _, series = recorded(ROLLING)
    assert series["spans"]["10.0.3.2:80"] == [(10.0, 40.0, "drain")]
    [(removed, gone, what)] = series["spans"]["10.0.3.3:80"]
    assert (removed, what) == (25.0, "removed") and 25.0 < gone <= 30.0 + 1e-9
    assert series["states"]["10.0.3.3:80"][-1] == (gone, "gone")
    assert series["states"]["10.0.3.4:80"] == [(25.0, "healthy")]
    assert series["backends"] == ["10.0.3.1:80", "10.0.3.2:80", "10.0.3.3:80", "10.0.3.4:80"]


def test_a_drain_still_in_force_at_the_end_spans_to_the_end() -> None:
    one = scenario(sim_operations=[{"at": 4.0, "action": "maintenance", "backend": "10.9.0.1:80"}])
    _, series = recorded(one)
    assert series["spans"]["10.9.0.1:80"] == [(4.0, series["end"], "maint")]


def test_recording_changes_nothing_in_the_run_and_nothing_runs_without_it() -> None:
    loaded = load_scenario(CRASH)
    plain, recording = io.StringIO(), io.StringIO()
    without = Simulation(loaded, 3, trace=lambda entry: plain.write(json.dumps(entry)))
    assert without.recorder is None
    plain_report = build_report(without.run())
    recorder = Recorder(0.5)
    with_recorder = Simulation(
        loaded, 3, trace=lambda entry: recording.write(json.dumps(entry)), recorder=recorder
    )
    assert build_report(with_recorder.run()) == plain_report
    assert recording.getvalue() == plain.getvalue()
    # Without a recorder (or a trace) the outputs go straight to the monitor.
    untraced = Simulation(loaded, 3)
    assert untraced._dispatch[ConnectFailed] == untraced.monitor.connect_failed
    assert not untraced.core.health_reports  # the monitor reads them from the actions
    assert untraced._dispatch[ConnectionClosed] == untraced.monitor.connection_closed


def test_spread_and_state_shares() -> None:
    nan = math.nan
    median, low, high = spread([[1.0, 5.0, nan], [3.0, nan, nan], [2.0]])
    assert median[:2] == [2.0, 5.0] and low[:2] == [1.0, 5.0] and high[:2] == [3.0, 5.0]
    assert all(math.isnan(value) for value in (median[2], low[2], high[2]))
    assert spread([]) == ([], [], [])
    shares = state_shares([(0.0, "healthy"), (1.5, "unhealthy"), (3.0, "gone")], 1.0, 4, 3.5)
    assert shares["healthy"] == [1.0, 0.5, 0.0, 0.0]
    assert shares["unhealthy"] == [0.0, 0.5, 1.0, 0.0]
    assert shares["draining"] == [0.0] * 4


# -- the figure --------------------------------------------------------------------------


def test_one_runs_figure_has_its_panels_series_and_fault_schedule() -> None:
    loaded = load_scenario(CRASH)
    _, series = recorded(CRASH)
    figure = build_figure([series], loaded)
    assert isinstance(figure, Figure)
    states, active, outcomes, latency = figure.axes[:4]
    assert figure.get_suptitle() == "backend-crash seed 1: every invariant held"
    assert states.get_ylabel() == "backend state"
    assert [t.get_text() for t in states.get_yticklabels()] == [
        "10.0.0.3:8080",
        "10.0.0.2:8080",
        "10.0.0.1:8080",
    ]
    assert legend_labels(states) == ["healthy", "draining", "unhealthy", "fault: crash"]
    assert active.get_ylabel() == "active connections\n(mean per bin)"
    assert legend_labels(active) == ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]
    assert outcomes.get_ylabel() == "client outcomes\n(connections per 0.5 s)"
    assert legend_labels(outcomes) == ["completed (2975)", "backend reset (6)"]
    assert latency.get_ylabel() == "connect latency (ms)"
    assert legend_labels(latency) == ["p50", "p99"]
    assert latency.get_xlabel() == "simulated time (s)"
    # The fault: labelled above the first panel, a span from 20 s to 40 s on every panel.
    labels = [text.get_text() for text in states.texts]
    assert "crash 10.0.0.2:8080 (20-40 s)" in labels
    assert "crash" in labels  # the strip over the crashed backend's row
    for axes in (states, active, outcomes, latency):
        [span] = [p for p in axes.patches if p.get_gid() == "fault 0"]
        assert isinstance(span, Rectangle)
        assert (span.get_x(), span.get_width()) == (20.0, 20.0), axes.get_ylabel()
        assert any(list(line.get_xdata()) == [20.0, 20.0] for line in axes.get_lines())
    # The crashed backend's band is red (unhealthy) from its transition for 21 s.
    red = to_rgba(STATE_COLOURS["unhealthy"])
    [band] = [c for c in states.collections if tuple(c.get_facecolor()[0]) == red]
    [(x0, y0), *_] = band.get_paths()[0].vertices
    assert x0 == pytest.approx(20.074, abs=1e-3) and 0.5 < y0 < 1.5  # the middle row
    assert isinstance(figure.canvas, FigureCanvasAgg)


def test_operations_shutdown_and_spans_are_marked(tmp_path: Path) -> None:
    _, series = recorded(ROLLING)
    figure = build_figure([series], load_scenario(ROLLING))
    states = figure.axes[0]
    labels = [text.get_text() for text in states.texts]
    assert labels == ["drain 10.0.3.2:80 (10 s)", "reload (25 s)", "undrain 10.0.3.2:80 (40 s)"]
    assert legend_labels(states) == [
        "healthy",
        "draining",
        "unhealthy",
        "drained (admin)",
        "removed",
    ]
    shutdown = load_scenario(REPO / "scenarios" / "graceful-shutdown.toml")
    _, series = recorded(shutdown)
    figure = build_figure([series], shutdown)
    labels = [text.get_text() for text in figure.axes[0].texts]
    assert labels == ["SIGTERM (30 s)", "drain deadline (38 s)"]
    assert "cut (36)" in legend_labels(figure.axes[2])


def test_many_runs_draw_medians_over_bands() -> None:
    loaded = load_scenario(CRASH)
    runs = [recorded(CRASH, seed)[1] for seed in (1, 2, 3)]
    figure = build_figure(runs, loaded)
    states, active, outcomes, latency = figure.axes[:4]
    assert figure.get_suptitle().startswith("backend-crash: 3 runs, seeds 1..3, every invariant")
    assert "medians over the runs" in figure.get_suptitle()
    assert states.get_ylabel() == "backend state\n(share of runs)"
    assert legend_labels(outcomes) == ["completed", "backend reset"]
    assert legend_labels(latency) == ["p50", "p99"]
    # Each series: a filled band (min to max) and its median line.
    filled = [patch for patch in active.patches if patch.get_fill()]
    assert len(filled) >= 3
    with pytest.raises(ValueError, match="at least one run"):
        build_figure([], loaded)


def test_a_quiet_run_draws_too() -> None:
    """No arrivals at all: no outcome, no connect, a flat latency axis from zero."""
    quiet = scenario(sim_clients={"rate": 0.0})
    _, series = recorded(quiet)
    figure = build_figure([series], quiet)
    assert figure.axes[2].get_legend() is None
    assert figure.axes[3].get_ylim()[0] == 0.0


# -- the command -------------------------------------------------------------------------


def test_plot_writes_a_png_of_sensible_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "out.png"
    assert main(["sim", str(CRASH), "--seed", "1", "--plot", str(target)]) == 0
    out = capsys.readouterr().out
    assert "every invariant held" in out and "Impact: " in out
    width, height = png_size(target)
    assert width == 1200 and 700 <= height <= 1400
    assert 30_000 < target.stat().st_size < 1_000_000


def test_many_runs_plot_and_svg(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "runs.svg"
    argv = ["sim", str(CRASH), "--runs", "3", "--jobs", "2", "--plot", str(target), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == 3
    svg = target.read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    target = tmp_path / "runs.png"
    assert main(["sim", str(CRASH), "--runs", "2", "--jobs", "1", "--plot", str(target)]) == 0
    assert png_size(target)[0] == 1200


def test_the_committed_plot_is_what_the_documented_command_draws(tmp_path: Path) -> None:
    page = (REPO / "docs" / "simulation.md").read_text()
    command = "loble sim scenarios/backend-crash.toml --seed 1 --plot docs/images/backend-crash.png"
    assert command in page and "](images/backend-crash.png)" in page
    fresh = tmp_path / "backend-crash.png"
    assert main(["sim", str(CRASH), "--seed", "1", "--plot", str(fresh)]) == 0
    assert png_size(REPO / "docs" / "images" / "backend-crash.png") == png_size(fresh)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            "{tmp}/no/such/dir/out.png",
            "error: --plot {tmp}/no/such/dir/out.png: no such directory: {tmp}/no/such/dir\n",
        ),
        (
            "{tmp}/out.xyz",
            "error: --plot {tmp}/out.xyz: 'xyz' is not an image format matplotlib writes (",
        ),
        ("{tmp}", "error: --plot '{tmp}': not a file name\n"),
        ("", "error: --plot '': not a file name\n"),
    ],
)
def test_a_bad_plot_target_is_one_line_before_any_run(
    target: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the run started before the plot target was checked")

    monkeypatch.setattr(Simulation, "run", no_run)
    assert main(["sim", str(CRASH), "--plot", target.format(tmp=tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(message.format(tmp=tmp_path))
    assert len(captured.err.splitlines()) == 1 and captured.out == ""


def test_a_plot_that_cannot_be_written_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(self: Figure, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Figure, "savefig", refuse)
    target = tmp_path / "out.png"
    assert main(["sim", str(CRASH), "--plot", str(target)]) == 1
    assert capsys.readouterr().err == f"error: --plot {target}: Permission denied\n"


def test_without_matplotlib_plot_is_a_one_line_hint_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    monkeypatch.delitem(sys.modules, "loble.sim._plot", raising=False)
    monkeypatch.delattr(sim_package, "_plot", raising=False)
    target = tmp_path / "out.png"
    assert main(["sim", str(CRASH), "--plot", str(target)]) == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", HINT)
    assert not target.exists()
    # Everything else still runs without it.
    assert run_seed(load_scenario(CRASH), 1)["ok"]


def hidden_matplotlib(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import matplotlib`` fails, as where it is not installed."""
    hiding = tmp_path / "hide-matplotlib"
    hiding.mkdir()
    (hiding / "matplotlib.py").write_text("raise ImportError('matplotlib is hidden')\n")
    inherited = os.environ.get("PYTHONPATH")
    path = str(hiding) if not inherited else os.pathsep.join([str(hiding), inherited])
    return {**os.environ, "PYTHONPATH": path}


def loble(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loble", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=REPO,
    )


def test_without_matplotlib_plot_is_a_one_line_hint_and_the_rest_runs(tmp_path: Path) -> None:
    env = hidden_matplotlib(tmp_path)
    target = tmp_path / "out.png"
    for extra in ([], ["--runs", "2"]):
        done = loble("sim", str(CRASH), *extra, "--plot", str(target), env=env)
        assert (done.returncode, done.stdout, done.stderr) == (1, "", HINT)
        assert not target.exists()
    done = loble("sim", str(CRASH), env=env)
    assert done.returncode == 0 and "every invariant held" in done.stdout
    assert done.stderr == ""


def test_matplotlib_is_imported_only_for_plot(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from loble.__main__ import main\n"
        f"assert main(['sim', {str(CRASH)!r}, '--json']) == 0\n"
        "assert 'matplotlib' not in sys.modules, 'imported without --plot'\n"
        f"assert main(['sim', {str(CRASH)!r}, '--json', '--plot', {str(tmp_path / 'p.png')!r}]) == 0\n"
        "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert png_size(tmp_path / "p.png")[0] == 1200
