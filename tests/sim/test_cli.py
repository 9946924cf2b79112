"""``loble sim``: reports, JSON, traces, many seeds, replay lines, one-line errors."""

from __future__ import annotations

import json
import random
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loble.__main__ import main
from loble.core import ProxyCore, StateMachineError
from loble.sim import Distribution
from loble.sim.cli import EXIT_INVARIANT_FAILED, replay_command

from .conftest import REPO

CRASH = str(REPO / "scenarios" / "backend-crash.toml")
FLAPPING = str(REPO / "scenarios" / "flapping-backend.toml")
KILL = str(REPO / "scenarios" / "backend-kill.toml")
SHUTDOWN = str(REPO / "scenarios" / "graceful-shutdown.toml")
SHORT = """
[[backends]]
address = "10.0.0.1:80"

[[backends]]
address = "10.0.0.2:80"

[sim]
duration = 2.0

[sim.clients]
rate = 20.0
"""


@pytest.fixture
def short(tmp_path: Path) -> str:
    path = tmp_path / "short.toml"
    path.write_text(SHORT)
    return str(path)


def test_report_is_printed_identically_twice(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", CRASH, "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert main(["sim", CRASH, "--seed", "1"]) == 0
    assert capsys.readouterr().out == first
    for heading in ("Backends", "State timeline", "What clients saw", "Invariants"):
        assert heading in first
    assert "every invariant held" in first


def test_json_and_trace(tmp_path: Path, short: str, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.jsonl"
    assert main(["sim", short, "--seed", "4", "--json", "--trace", str(trace)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seed"] == 4 and report["ok"]
    lines = trace.read_text().splitlines()
    assert len(lines) > report["steps"]
    assert all(json.loads(line)["step"] >= 0 for line in lines)


def test_many_runs_on_one_and_two_processes(short: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", short, "--runs", "3", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 runs, seeds 1..3" in out and "every invariant held in every run" in out
    assert main(["sim", short, "--runs", "4", "--seed", "10", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["seeds"] == [10, 13] and summary["failed_seeds"] == []
    assert [r["seed"] for r in summary["reports"]] == [10, 11, 12, 13]


def test_a_failing_run_prints_the_seed_and_the_replay_command(
    short: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(self: ProxyCore, connection_id: int, now: float) -> list[object]:
        raise StateMachineError("boom")

    monkeypatch.setattr(ProxyCore, "backend_eof", broken)
    assert main(["sim", short, "--runs", "2", "--jobs", "1"]) == EXIT_INVARIANT_FAILED
    out = capsys.readouterr().out
    assert "2 of 2 runs failed an invariant" in out
    assert f"replay: {replay_command(short, 1)}" in out
    assert main(["sim", short, "--seed", "2"]) == EXIT_INVARIANT_FAILED
    out = capsys.readouterr().out
    assert "FAILED" in out and f"replay: loble sim {short} --seed 2" in out


def test_user_errors_are_one_line_each(
    tmp_path: Path, short: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(SHORT.replace("rate = 20.0", "rat = 20.0\nhalf_close = 3"))
    assert main(["sim", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: sim.clients.rat: unknown key; did you mean 'rate'?",
        "error: sim.clients.half_close: 3 must be between 0 and 1",
    ]
    assert main(["sim", str(tmp_path / "missing.toml")]) == 1
    assert "no such file" in capsys.readouterr().err
    for argv, message in (
        (["--runs", "0"], "--runs: 0 must be >= 1"),
        (["--runs", "-3"], "--runs: -3 must be >= 1"),
        (["--runs", "many"], "--runs: 'many' is not a whole number"),
        (["--runs", "2.5"], "--runs: '2.5' is not a whole number"),
        (["--runs", "2", "--jobs", "0"], "--jobs: 0 must be >= 1"),
        (["--runs", "2", "--jobs", "two"], "--jobs: 'two' is not a whole number"),
        (["--seed", "-1"], "--seed: -1 must be >= 0"),
        (["--seed", "x"], "--seed: 'x' is not a whole number"),
    ):
        assert main(["sim", short, *argv]) == 1, argv
        captured = capsys.readouterr()
        assert (captured.err, captured.out) == (f"error: {message}\n", ""), argv
    assert main(["sim", short, "--runs", "2", "--trace", "x"]) == 1
    assert "--trace records one run" in capsys.readouterr().err
    assert main(["sim", short, "--trace", str(tmp_path / "no" / "dir" / "t")]) == 1
    assert "--trace" in capsys.readouterr().err


def test_an_arithmetic_error_in_a_run_is_one_line_naming_the_run(
    short: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every known overflow is refused by the scenario check; this is the backstop.
    def overflowing(self: Distribution, rng: random.Random) -> Callable[[], float]:
        def draw() -> float:
            raise OverflowError("math range error")

        return draw

    monkeypatch.setattr(Distribution, "sampler", overflowing)
    expected = (
        "error: scenario 'short', seed 5: OverflowError at step 2, t=0.048762: math range error\n"
    )
    assert main(["sim", short, "--seed", "5"]) == 1
    captured = capsys.readouterr()
    assert captured.err == expected and captured.out == ""
    for jobs in ("1", "2"):  # workers fork with the patch: no traceback from them either
        assert main(["sim", short, "--runs", "3", "--seed", "5", "--jobs", jobs, "--json"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: scenario 'short', seed ") and "Traceback" not in err
        assert len(err.splitlines()) == 1


def test_bad_runs_are_one_line_from_the_command_too(short: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loble", "sim", short, "--runs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "error: --runs: 0 must be >= 1\n")


# -- distributions over seeds ------------------------------------------------------------


def table(out: str) -> dict[str, list[str]]:
    """The rows of the printed tables (and their headings): the first cell, then the others."""
    rows = {}
    for line in out.splitlines():
        if line[:1] in ("│", "┃"):
            cells = [cell.strip() for cell in line.strip()[1:-1].split(line[0])]
            rows[cells[0]] = cells[1:]
    return rows


def replayed(capsys: pytest.CaptureFixture[str], command: str) -> dict[str, Any]:
    """The report of a printed replay command, run as typed (plus --json)."""
    argv = shlex.split(command)
    assert argv[:2] == ["loble", "sim"]
    assert main([*argv[1:], "--json"]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def first_unhealthy(report: dict[str, Any]) -> float:
    times = [row["at"] for row in report["timeline"] if row["new"] == "unhealthy"]
    return float(times[0])


def test_many_runs_print_distributions_whose_extremes_replay_to_their_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Least connections against a flapping backend: the count of state changes
    varies by seed, and the seeds named at its min and max replay to them."""
    assert main(["sim", FLAPPING, "--runs", "10", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("flapping-backend: 10 runs, seeds 1..10; clients saw: complete ")
    assert "With 10 runs, p99 is the max: run more seeds for the tail" in lines
    assert lines[-1] == "every invariant held in every run"
    printed = [line.strip() for line in lines if line.startswith("  loble sim ")]
    rows = table(out)
    assert rows["figure"] == ["runs", "min", "p50", "p90", "p99", "max", "min seed", "max seed"]
    checks: list[tuple[str, Callable[[dict[str, Any]], float], str]] = [
        ("state changes", lambda report: len(report["timeline"]), "d"),
        ("10.0.1.3:8080 -> unhealthy (1st) at (s)", first_unhealthy, ".3f"),
        ("saw complete", lambda report: report["clients"]["seen"]["complete"], "d"),
    ]
    for label, figure, spec in checks:
        runs, low, *_, high, low_seed, high_seed = rows[label]
        assert runs == "10" and low != high, label  # a spread, not one value
        for value, cell in ((low, low_seed), (high, high_seed)):
            command = replay_command(FLAPPING, int(cell.split()[0]))
            assert command in printed
            assert format(figure(replayed(capsys, command)), spec) == value, label
    # The last cycles happen in some runs only: the row says in how many.
    transitions = [label for label in rows if label.startswith("10.0.1.3:8080 -> ")]
    assert {rows[label][0] for label in transitions} - {"10"}


def test_the_summary_line_counts_what_clients_saw(capsys: pytest.CaptureFixture[str]) -> None:
    for path in (KILL, SHUTDOWN):
        assert main(["sim", path, "--runs", "3", "--json"]) == 0
        reports = json.loads(capsys.readouterr().out)["reports"]
        seen = {
            saw: sum(report["clients"]["seen"][saw] for report in reports)
            for saw in reports[0]["clients"]["seen"]
        }
        arrived = sum(report["clients"]["arrived"] for report in reports)
        assert main(["sim", path, "--runs", "3"]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        if path == KILL:  # streams a killed backend cut short: Loble saw them complete
            assert seen["truncated"] > 0
            expected = (
                f"complete {seen['complete']}, truncated (FIN) {seen['truncated']}, "
                f"reset {seen['reset']} (of {arrived} arrived)"
            )
        else:  # refused while shutting down, and by the kernel after the stop
            expected = (
                f"complete {seen['complete']}, reset {seen['reset']}, "
                f"refused by the kernel {seen['refused_by_kernel']} (of {arrived} arrived)"
            )
        assert first.endswith(f"; clients saw: {expected}"), first


def test_json_carries_the_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", SHUTDOWN, "--runs", "4", "--seed", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    reports = summary["reports"]
    spread = summary["distributions"]
    assert set(spread) == {"runs", "clients", "impact", "state_changes", "transitions"}
    keys = {"runs", "min", "p50", "p90", "p99", "max", "at_min", "at_max"}
    clients = spread["clients"]
    figures = [
        clients["arrived"],
        clients["still_open_at_end"],
        *clients["seen"].values(),
        *clients["seen_rows"],
        *spread["impact"].values(),
        spread["state_changes"],
    ]
    for figure in figures:
        assert keys <= set(figure) and figure["runs"] == 4
        for end in ("at_min", "at_max"):
            assert set(figure[end]) == {"seed", "runs", "replay"}
            assert figure[end]["replay"] == replay_command(SHUTDOWN, figure[end]["seed"])
    assert list(clients["seen"]) == [
        "complete",
        "truncated",
        "reset",
        "refused_by_kernel",
        "refused_by_loble",
    ]
    assert [(row["saw"], row["outcome"]) for row in clients["seen_rows"]] == [
        ("complete", "completed"),
        ("reset", "cut"),
        ("refused_by_kernel", "refused_shutting_down"),
        ("refused_by_kernel", "refused_after_stop"),
    ]
    after_stop = [report["clients"]["refused_after_stop"] for report in reports]
    row = clients["seen_rows"][3]
    assert (row["min"], row["max"]) == (min(after_stop), max(after_stop))
    assert reports[after_stop.index(row["max"])]["seed"] == row["at_max"]["seed"]
    last = spread["impact"]["last"]
    report = replayed(capsys, last["at_max"]["replay"])
    assert max(row["last"] for row in report["clients"]["impact"]) == last["max"]
    assert spread["transitions"] == [] and spread["state_changes"]["max"] == 0
    # The impact lines over the runs count the clients refused after the stop too.
    assert main(["sim", SHUTDOWN, "--runs", "4", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "Impact: clients refused by the kernel (nothing listening) in 4 of 4 runs" in out
    assert "none: the process had stopped" in table(out)  # under "saw refused by the kernel"
