"""``loble sim``: reports, JSON, traces, many seeds, replay lines, one-line errors."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from loble.__main__ import main
from loble.core import ProxyCore, StateMachineError
from loble.sim import Distribution
from loble.sim.cli import EXIT_INVARIANT_FAILED, replay_command

from .conftest import REPO

CRASH = str(REPO / "scenarios" / "backend-crash.toml")
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
    assert main(["sim", short, "--runs", "0"]) == 1
    assert capsys.readouterr().err == "error: --runs: 0 must be >= 1\n"
    assert main(["sim", short, "--seed", "-1"]) == 1
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
