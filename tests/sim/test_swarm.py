"""Many seeds on many machines: a Dask cluster gives the local report, and --swarm."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loble.__main__ import main
from loble.sim import Distribution, _swarm, load_scenario
from loble.sim._swarm import DRAWN, run_once, swarm_faults

from .conftest import REPO
from .test_cli import SHORT

CRASH = REPO / "scenarios" / "backend-crash.toml"
ALL_DOWN = REPO / "scenarios" / "all-down-recover.toml"


@pytest.fixture
def short(tmp_path: Path) -> str:
    path = tmp_path / "short.toml"
    path.write_text(SHORT)
    return str(path)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",  # loopback only, any free port
        worker_dashboard_address="127.0.0.1:0",  # loopback only, any free port
    ) as local:
        yield local.scheduler_address


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["sim", *argv, "--json"]) == 0, capsys.readouterr().err
    summary: dict[str, Any] = json.loads(capsys.readouterr().out)
    return summary


def test_a_cluster_gives_the_local_report_byte_for_byte(
    cluster: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for extra in ([], ["--swarm"]):
        argv = [str(CRASH), "--runs", "6", "--seed", "3", *extra]
        local = _json(capsys, *argv, "--jobs", "2")
        remote = _json(capsys, *argv, "--cluster", cluster)
        assert remote == local and len(remote["reports"]) == 6
        # The distributions too, replay commands and all (with --swarm, they carry it).
        spread = remote["distributions"]
        assert spread["runs"] == 6 and spread["transitions"]
        assert spread["state_changes"]["at_max"]["replay"].endswith(" --swarm" if extra else "")
        assert main(["sim", *argv, "--jobs", "1"]) == 0
        text = capsys.readouterr().out
        assert "Over 6 runs" in text and "Replay a seed behind a min or a max:" in text
        assert main(["sim", *argv, "--cluster", cluster]) == 0
        assert capsys.readouterr().out == text


@pytest.fixture(scope="module")
def threaded() -> Iterator[str]:
    """A cluster whose worker is a thread of this process: it sees the tests' patches."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tcp://",
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",  # loopback only, any free port
        worker_dashboard_address="127.0.0.1:0",  # loopback only, any free port
    ) as local:
        yield local.scheduler_address


def test_failures_on_the_cluster_are_replay_lines_or_one_line_errors(
    threaded: str, short: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from loble.core import ProxyCore, StateMachineError

    def broken(self: ProxyCore, connection_id: int, now: float) -> list[object]:
        raise StateMachineError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(ProxyCore, "backend_eof", broken)
        assert main(["sim", short, "--runs", "2", "--swarm", "--cluster", threaded]) == 3
        out = capsys.readouterr().out
        assert "2 of 2 runs failed an invariant" in out
        assert f"  replay: loble sim {short} --seed 2 --swarm" in out

    def overflowing(self: Distribution, rng: random.Random) -> Callable[[], float]:
        def draw() -> float:
            raise OverflowError("math range error")

        return draw

    with monkeypatch.context() as patch:
        patch.setattr(Distribution, "sampler", overflowing)
        assert main(["sim", short, "--runs", "2", "--cluster", threaded]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: scenario 'short', seed ") and len(err.splitlines()) == 1

    def crashing(*args: object) -> None:
        raise RuntimeError("worker lost its mind")

    with monkeypatch.context() as patch:
        patch.setattr(_swarm, "run_once", crashing)
        assert main(["sim", short, "--runs", "2", "--cluster", threaded]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: --cluster {threaded}: seed ")
        assert err.endswith(": RuntimeError: worker lost its mind\n")
        assert len(err.splitlines()) == 1


def test_the_same_seed_draws_the_same_faults_and_others_differ() -> None:
    scenario = load_scenario(ALL_DOWN)
    assert swarm_faults(scenario, 5) == swarm_faults(scenario, 5)
    draws = {swarm_faults(scenario, seed) for seed in range(200)}
    assert len(draws) == 200
    faults = [fault for draw in draws for fault in draw]
    assert {fault.behaviour for fault in faults} == set(DRAWN)
    duration = scenario.sim.duration
    for fault in faults:
        assert 0 <= fault.at < fault.until <= duration  # type: ignore[operator]
    templates = [fault.backend for fault in scenario.sim.faults]
    assert all([fault.backend for fault in draw] == templates for draw in draws)


def test_a_scenario_without_faults_gets_one_on_a_drawn_backend(short: str) -> None:
    scenario = load_scenario(short)
    backends = {fault.backend for seed in range(50) for fault in swarm_faults(scenario, seed)}
    assert backends == {"10.0.0.1:80", "10.0.0.2:80"}


def test_a_swarm_seed_replays_exactly(short: str, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = load_scenario(CRASH)
    summary = _json(capsys, str(CRASH), "--runs", "3", "--seed", "40", "--swarm", "--jobs", "1")
    for report in summary["reports"]:
        assert _json(capsys, str(CRASH), "--seed", str(report["seed"]), "--swarm") == report
        assert run_once(scenario, report["seed"], swarm=True)[0] == report
    plain = run_once(scenario, 40)[0]
    assert "swarm" not in plain and plain != summary["reports"][0]
    assert main(["sim", str(CRASH), "--seed", "40", "--swarm"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("swarm faults: ") and " on 10.0.0.2:8080 from " in first


def test_a_failing_swarm_seed_names_its_faults_and_swarm_replay(
    short: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from loble.core import ProxyCore, StateMachineError

    def broken(self: ProxyCore, connection_id: int, now: float) -> list[object]:
        raise StateMachineError("boom")

    monkeypatch.setattr(ProxyCore, "backend_eof", broken)
    assert main(["sim", short, "--runs", "2", "--swarm", "--jobs", "1"]) == 3
    out = capsys.readouterr().out
    assert "faults drawn from each seed" in out
    assert f"  replay: loble sim {short} --seed 2 --swarm" in out
    assert "  faults: " in out


def test_cluster_errors_are_one_line(
    short: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    assert main(["sim", short, "--runs", "2", "--cluster", "tcp://127.0.0.1:1"]) == 1
    assert capsys.readouterr().err == f"error: {_swarm.SWARM_HINT}\n"
    monkeypatch.undo()
    pytest.importorskip("distributed")
    cases = {
        "foo": "the scheme must be tcp:// or tls://",
        "tcp://127.0.0.1": "it needs a host and a port",
        "tcp://127.0.0.1:99999": "Port out of range",
        "tcp://127.0.0.1:8786/x": "it is only a scheme, a host and a port",
    }
    for address, problem in cases.items():
        assert main(["sim", short, "--runs", "2", "--cluster", address]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: --cluster {address!r}: not a scheduler") and problem in err
        assert len(err.splitlines()) == 1
    monkeypatch.setattr(_swarm, "CONNECT_TIMEOUT", 0.5)
    assert main(["sim", short, "--runs", "2", "--cluster", "tcp://127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --cluster tcp://127.0.0.1:1: cannot reach the scheduler")
    assert len(err.splitlines()) == 1
    assert main(["sim", short, "--cluster", "tcp://127.0.0.1:1"]) == 1
    assert "use it with --runs" in capsys.readouterr().err
    assert main(["sim", short, "--runs", "2", "--jobs", "2", "--cluster", "tcp://h:1"]) == 1
    assert "--jobs counts local processes" in capsys.readouterr().err
