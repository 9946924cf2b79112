"""The report's impact lines and warnings: figures that agree with the run, and
warnings for what a scenario asks that the run never does (none for the shipped ones)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from loble.__main__ import main
from loble.core import Outcome
from loble.sim import load_scenario
from loble.sim._report import IMPACT, impact_line
from loble.sim.cli import impact_over_runs, run_seed

from .conftest import REPO, SCENARIOS, scenario

ALL_DOWN = REPO / "scenarios" / "all-down-recover.toml"


def closes_in_trace(trace: str) -> dict[str, list[float]]:
    """Each outcome's close times, read back from the trace's ConnectionClosed lines."""
    times: dict[str, list[float]] = {}
    for line in trace.splitlines():
        entry = json.loads(line)
        if entry.get("output") == "ConnectionClosed":
            times.setdefault(entry["outcome"], []).append(entry["t"])
    return times


def test_impact_figures_agree_with_the_counted_outcomes_and_the_trace() -> None:
    trace = io.StringIO()
    report = run_seed(load_scenario(ALL_DOWN), 1, trace)
    clients = report["clients"]
    closes = closes_in_trace(trace.getvalue())
    impact = {row["outcome"]: row for row in clients["impact"]}
    failed = {outcome for outcome, count in clients["outcomes"].items() if count} - {"completed"}
    assert set(impact) == failed == {"no_backend", "connect_failed", "backend_reset"}
    for outcome, row in impact.items():
        assert row["connections"] == clients["outcomes"][outcome] == len(closes[outcome])
        assert row["first"] == round(min(closes[outcome]), 6)
        assert row["last"] == round(max(closes[outcome]), 6)
    # The issue's own example: every backend crashed from t=20 s to 32 s.
    assert impact["no_backend"]["connections"] == 772
    assert 20.0 < impact["no_backend"]["first"] < 20.2
    assert 33.0 < impact["no_backend"]["last"] < 33.1


def test_the_report_prints_one_impact_line_per_kind_of_failure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["sim", str(ALL_DOWN), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("Impact: ")]
    assert lines == [
        "Impact: clients refused (no backend) from 20.111 s to 33.065 s, 772 connections (26.3% of arrivals)",
        "Impact: clients failed to connect from 20.035 s to 20.077 s, 3 connections (0.1% of arrivals)",
        "Impact: clients reset by their backend from 20.001 s to 20.003 s, 25 connections (0.9% of arrivals)",
    ]
    # Between the outcome table and the latency line.
    assert out.index("What clients saw") < out.index("Impact: ") < out.index("Connect latency")


def test_a_run_without_failures_has_no_impact_line(capsys: pytest.CaptureFixture[str]) -> None:
    report = run_seed(load_scenario(REPO / "scenarios" / "slow-drain.toml"), 1)
    assert report["clients"]["impact"] == []
    assert main(["sim", str(REPO / "scenarios" / "slow-drain.toml")]) == 0
    assert "Impact" not in capsys.readouterr().out


def test_every_way_to_fail_has_a_name_and_one_instant_reads_as_at() -> None:
    assert set(IMPACT) == set(Outcome) - {Outcome.COMPLETED}
    row = {"outcome": "cut", "first": 38.0, "last": 38.0, "connections": 1}
    assert (
        impact_line(row, 4)
        == "clients cut at the drain deadline at 38.000 s, 1 connection (25.0% of arrivals)"
    )


def test_impact_over_runs_gives_each_figure_as_a_range(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", str(ALL_DOWN), "--runs", "3", "--jobs", "1", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)["reports"]
    lines = impact_over_runs(reports)
    assert len(lines) == 3
    refused = [
        row
        for report in reports
        for row in report["clients"]["impact"]
        if row["outcome"] == "no_backend"
    ]
    counts = sorted(row["connections"] for row in refused)
    firsts = sorted(row["first"] for row in refused)
    assert lines[0].startswith("clients refused (no backend) in 3 of 3 runs: from ")
    assert f"from {firsts[0]:.3f}..{firsts[-1]:.3f} s" in lines[0]
    assert lines[0].endswith(f"{counts[0]}..{counts[-1]} connections a run")
    assert main(["sim", str(ALL_DOWN), "--runs", "3", "--jobs", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:4] == [f"Impact: {line}" for line in lines]


# -- warnings --------------------------------------------------------------------------

CRASH = {"at": 2.0, "until": 4.0, "backend": "10.9.0.1:80", "behaviour": "crash"}


def warnings_of(**changes: Any) -> list[str]:
    return run_seed(scenario(**changes), 1)["warnings"]


def test_a_parameter_the_behaviour_ignores_is_warned_about_by_its_key() -> None:
    faults = [
        {**CRASH, "delay": 0.2},
        {"at": 1.0, "backend": "10.9.0.2:80", "behaviour": "slow", "delay": 0.2, "limit": 3},
        {"at": 5.0, "until": 6.0, "backend": "*", "behaviour": "up"},
        {"at": 6.0, "backend": "10.9.0.2:80", "behaviour": "flapping", "period": 2.0},
        {"at": 7.0, "backend": "10.9.0.1:80", "behaviour": "reset", "probability": 0.1},
        {"at": 8.0, "backend": "10.9.0.1:80", "behaviour": "capacity", "limit": 5, "period": 1.0},
    ]
    assert warnings_of(sim_faults=faults) == [
        "sim.faults[0].delay: 'crash' ignores delay; only 'slow' uses it",
        "sim.faults[1].limit: 'slow' ignores limit; only 'capacity' uses it",
        "sim.faults[2].until: 'up' ignores until; the backend is up after it either way",
        "sim.faults[5].period: 'capacity' ignores period; only 'flapping' uses it",
    ]


def test_a_fault_outside_the_simulated_time_is_warned_about() -> None:
    # Clients arrive for 10 s; the run ends once the last connection closes.
    faults = [
        CRASH,
        {"at": 10.0, "backend": "10.9.0.1:80", "behaviour": "crash"},
        {"at": 500.0, "backend": "10.9.0.2:80", "behaviour": "blackhole"},
    ]
    operations = [{"at": 900.0, "action": "drain", "backend": "10.9.0.1:80"}]
    report = run_seed(scenario(sim_faults=faults, sim_operations=operations), 1)
    end = report["simulated_seconds"]
    assert 10.0 <= end < 12.0
    assert report["warnings"] == [
        "sim.faults[1].at: crash at 10 s is not before sim.duration (10 s): "
        "no client arrives while it is in force",
        f"sim.faults[2].at: blackhole at 500 s is after the run ended at {end:.3f} s: "
        "it never happened",
        f"sim.operations[0].at: drain at 900 s is after the run ended at {end:.3f} s: "
        "it never happened",
    ]


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda path: path.stem)
def test_no_shipped_scenario_has_a_warning(path: Path) -> None:
    loaded = load_scenario(path)
    assert loaded.warnings == ()
    assert run_seed(loaded, loaded.sim.seed)["warnings"] == []


def test_warnings_go_to_stderr_once_and_leave_json_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (REPO / "scenarios" / "backend-crash.toml").read_text()
    path = tmp_path / "late.toml"
    path.write_text(
        text
        + '\n[[sim.faults]]\nat = 90.0\nbackend = "10.0.0.1:8080"\nbehaviour = "crash"\ndelay = 1.0\n'
    )
    expected = [
        "warning: sim.faults[1].delay: 'crash' ignores delay; only 'slow' uses it",
        "warning: sim.faults[1].at: crash at 90 s is after the run ended at 62.146 s: it never happened",
    ]
    assert main(["sim", str(path), "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == expected
    assert "warning" not in captured.out
    assert main(["sim", str(path), "--seed", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == expected
    assert json.loads(captured.out)["warnings"] == [line[len("warning: ") :] for line in expected]
    # Over many runs, each line once (one that names a seed's end time is per seed);
    # the progress bar shares stderr.
    assert main(["sim", str(path), "--runs", "2", "--seed", "1", "--jobs", "1"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned[0] == expected[0] and warned.count(expected[0]) == 1
    assert all(line.startswith("warning: ") for line in warned)
