"""Fault semantics as the kernel has them, and what clients see on the wire.

Through the public interface only: a scenario, ``Simulation``, the JSON
report and the ``loble sim`` CLI.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from loble.__main__ import main
from loble.core import ConfigError
from loble.sim import Simulation, build_report, load_scenario, parse_scenario

from .conftest import REPO, SCENARIOS, document, scenario

SHUTDOWN = REPO / "scenarios" / "graceful-shutdown.toml"
LONG = {"rate": 20.0, "duration": {"kind": "uniform", "low": 2.0, "high": 6.0}}
"""Connections long enough that a fault at t=5 s finds several open."""


def run(loaded: Any, seed: int = 1, **kwargs: Any) -> dict[str, Any]:
    return build_report(Simulation(loaded, seed, **kwargs).run())


def with_fault(**fault: Any) -> Any:
    entry = {"at": 5.0, "until": 7.0, "backend": "10.9.0.1:80", **fault}
    return scenario(sim_clients=LONG, sim_faults=[entry])


def seen(report: dict[str, Any]) -> dict[str, int]:
    return {key: count for key, count in report["clients"]["seen"].items() if count}


def outcomes(report: dict[str, Any]) -> dict[str, int]:
    return {key: count for key, count in report["clients"]["outcomes"].items() if count}


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_every_arrival_is_seen_exactly_once(path: Path) -> None:
    report = run(load_scenario(path))
    clients = report["clients"]
    assert report["ok"]
    assert sum(clients["seen"].values()) + clients["in_flight_at_end"] == clients["arrived"]
    assert sum(row["connections"] for row in clients["seen_rows"]) == sum(clients["seen"].values())


def test_kill_refuses_connects_and_closes_open_connections_fin_or_rst() -> None:
    report = run(with_fault(behaviour="kill"))
    assert report["ok"]
    killed = report["backends"][0]
    assert killed["connect_failures"] > 0 and killed["behaviours"][1] == [5.0, "kill"]
    # Clients still sending (half_close: they send EOF first) left unread
    # bytes: a RST. The others read a FIN: truncated, and Loble logs it completed.
    assert seen(report)["truncated"] > 0
    assert report["clients"]["outcomes"]["backend_reset"] == killed["resets"] > 0
    rows = {(row["saw"], row["outcome"]) for row in report["clients"]["seen_rows"]}
    assert ("truncated", "completed") in rows and ("reset", "backend_reset") in rows


def test_kill_with_unread_none_sends_only_fins() -> None:
    report = run(with_fault(behaviour="kill", unread="none"))
    assert report["ok"]
    assert "backend_reset" not in outcomes(report)
    assert seen(report)["truncated"] > 0


def test_crash_is_kill_with_unread_all() -> None:
    crash = run(with_fault(behaviour="crash"))
    kill = run(with_fault(behaviour="kill", unread="all"))
    for report in (crash, kill):
        for row in report["backends"]:
            row.pop("behaviours")
    assert crash == kill
    assert "truncated" not in seen(crash) and crash["clients"]["outcomes"]["backend_reset"] > 0


def test_host_down_hangs_connects_probes_and_open_connections() -> None:
    loaded = scenario(
        sim_clients=LONG,
        sim_faults=[{"at": 5.0, "until": 8.0, "backend": "10.9.0.1:80", "behaviour": "host_down"}],
        timeouts={"connect": 0.5, "idle": 2.0, "drain": 5.0},
    )
    trace: list[dict[str, Any]] = []
    report = run(loaded, trace=trace.append)
    assert report["ok"]  # "timeouts on time": each idle close came exactly on time
    down = report["backends"][0]
    assert down["connect_failures"] > 0 and down["probe_failures"] > 0
    # The open connections went silent: Loble reset each at the idle timeout.
    idle = [
        line
        for line in trace
        if line.get("output") == "ConnectionClosed" and line["outcome"] == "idle_timeout"
    ]
    assert idle and all(line["backend"] == "10.9.0.1:80" for line in idle)
    # Each idles out 2 s after its last byte: the last touch (every idle / 2 = 1 s)
    # before the fault, or the connect that landed as it began.
    assert all(5.0 - 1.0 + 2.0 <= line["t"] <= 5.0 + 0.01 + 2.0 for line in idle)
    assert report["clients"]["seen_rows"][1] == {
        "saw": "reset",
        "outcome": "idle_timeout",
        "connections": len(idle),
    }
    # No connect on it timed out as a refusal: each one waited out the connect timeout.
    failed = [line for line in trace if line.get("output") == "ConnectFailed"]
    assert failed and all(line["timed_out"] for line in failed)


def test_accept_hang_keeps_the_backend_healthy_and_its_clients_hanging() -> None:
    report = run(load_scenario(REPO / "scenarios" / "accept-hang.toml"))
    assert report["ok"]
    assert report["timeline"] == []  # connects and probes succeed: nothing to see
    hung = report["backends"][2]
    assert hung["probe_failures"] == 0 and hung["connect_failures"] == 0
    assert outcomes(report).keys() == {"completed", "idle_timeout"}
    impact = report["clients"]["impact"]
    assert [row["outcome"] for row in impact] == ["idle_timeout"]
    assert impact[0]["first"] >= 15.0 + 5.0 and impact[0]["last"] <= 45.0 + 5.0


def test_reset_resets_the_open_connections_and_accepts_connects() -> None:
    report = run(with_fault(behaviour="reset", probability=0.0))
    assert report["ok"]
    resetting = report["backends"][0]
    assert resetting["resets"] > 0 and resetting["connect_failures"] == 0
    impact = {row["outcome"]: row for row in report["clients"]["impact"]}
    # Only those open at t=5 s, a round trip later: no new one (probability 0).
    assert impact["backend_reset"]["first"] == impact["backend_reset"]["last"] == 5.001


def test_arrivals_after_the_process_stops_are_refused_by_the_kernel() -> None:
    trace: list[dict[str, Any]] = []
    report = run(load_scenario(SHUTDOWN), trace=trace.append)
    clients = report["clients"]
    after = clients["refused_after_stop"]
    assert after > 0
    accepted = sum(clients["outcomes"].values()) + clients["in_flight_at_end"]
    assert clients["arrived"] == accepted + after
    assert report["simulated_seconds"] == 38.0  # the run still ends when the process stopped
    assert clients["seen"]["refused_by_kernel"] == (
        clients["outcomes"]["refused_shutting_down"] + after
    )
    # A connection cut at the deadline reaches its client as a reset.
    assert clients["seen"]["reset"] == clients["outcomes"]["cut"] > 0
    row = clients["impact"][-1]
    assert row["outcome"] == "refused_after_stop" and row["connections"] == after
    assert 38.0 < row["first"] <= row["last"] < 45.0
    refused = [line for line in trace if "refused" in line and line.get("event") == "arrival"]
    assert len(refused) == after and round(refused[0]["t"], 6) == row["first"]


def test_the_table_and_impact_lines_say_what_clients_saw(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["sim", str(SHUTDOWN)]) == 0
    out = capsys.readouterr().out
    assert "refused by the kernel" in out and "none: the process had stopped" in out
    assert "Impact: clients refused by the kernel (nothing listening) from 38." in out


def test_kill_report_from_the_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", str(REPO / "scenarios" / "backend-kill.toml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clients"]["seen"]["truncated"] > 0
    assert report["clients"]["seen"]["reset"] > 0


def test_unread_is_checked_and_only_kill_reads_it() -> None:
    bad = document(sim_faults=[{"at": 1.0, "backend": "*", "behaviour": "kill", "unread": "some"}])
    with pytest.raises(ConfigError) as caught:
        parse_scenario(bad)
    assert "sim.faults[0].unread: 'some' is not one of senders, all, none" in str(caught.value)
    ignored = parse_scenario(
        document(sim_faults=[{"at": 1.0, "backend": "*", "behaviour": "crash", "unread": "none"}])
    )
    assert ignored.warnings == (
        "sim.faults[0].unread: 'crash' ignores unread; only 'kill' uses it",
    )


def test_trace_of_a_kill_replays_byte_for_byte() -> None:
    loaded = load_scenario(REPO / "scenarios" / "backend-kill.toml")
    traces = []
    for _ in range(2):
        out = io.StringIO()
        Simulation(loaded, 3, trace=lambda line, out=out: out.write(json.dumps(line) + "\n")).run()
        traces.append(out.getvalue())
    assert traces[0] == traces[1]
