"""The engine acts on the world's keys (issue 14 item 3, phase 2).

Requests on keep-alive connections, per-backend latency, client connect
timeouts and retries, timer jitter and drawn faults, each through the public
API (:class:`Simulation`, :func:`build_report`, ``loble sim``), with
constant distributions where a figure must come out exact.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from loble.__main__ import main
from loble.core import Outcome
from loble.sim import (
    Simulation,
    build_report,
    load_scenario,
    parse_scenario,
    with_drawn_faults,
)
from loble.sim._report import fault_data
from loble.sim._world import completed_requests

from .conftest import REPO, document, scenario

A, B = "10.9.0.1:80", "10.9.0.2:80"
ONE_CLIENT = {"arrival": "constant", "rate": 0.1}
"""Constant arrivals at 0.1/s over a 10 s run: one client, at t=0."""
NO_LATENCY = {"latency": 0.0}


def run(trace: list[dict[str, Any]] | None = None, seed: int = 1, **changes: Any) -> Simulation:
    found = scenario(**changes)
    return Simulation(found, seed, trace=None if trace is None else trace.append).run()


def held(simulation: Simulation) -> None:
    assert not simulation.monitor.violations, simulation.monitor.violations


def closes(trace: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in trace if entry.get("output") == "ConnectionClosed"]


# -- requests on keep-alive connections ------------------------------------------

FIVE_REQUESTS = {
    **ONE_CLIENT,
    "requests": 5,
    "think": 1.0,
    "half_close": 0.0,
}
"""Responses at 0.1, 1.2, 2.3, 3.4 and 4.5 s after the connect (service 0.1 s)."""


@pytest.mark.parametrize(
    ("behaviour", "outcome"),
    [("kill", Outcome.COMPLETED), ("crash", Outcome.BACKEND_RESET), ("host_down", None)],
)
def test_a_connection_cut_at_a_known_time_loses_the_tail_of_its_schedule(
    behaviour: str, outcome: Outcome | None
) -> None:
    trace: list[dict[str, Any]] = []
    simulation = run(
        trace,
        backends=[{"address": A}],
        sim_clients=FIVE_REQUESTS,
        sim_network=NO_LATENCY,
        sim_service=0.1,
        sim_faults=[{"at": 2.0, "backend": A, "behaviour": behaviour, "unread": "none"}],
    )
    held(simulation)
    report = build_report(simulation)
    requests = report["clients"]["requests"]
    assert requests == {"connections": 1, "completed": 2, "lost": 3, "open_at_end": 0}
    assert completed_requests([0.1, 1.2, 2.3, 3.4, 4.5], 2.0) == 2
    row = report["backends"][0]
    assert (row["requests_completed"], row["requests_lost"]) == (2, 3)
    (closed,) = closes(trace)
    if outcome is None:
        # The silent host: the idle timeout closes it, a timeout after the
        # last response that came in (1.2 s), and no later response counts.
        assert closed["outcome"] == Outcome.IDLE_TIMEOUT.value
        assert closed["at"] == pytest.approx(1.2 + 30.0)
    else:
        assert closed["outcome"] == outcome.value
    if behaviour == "kill":
        assert report["clients"]["seen"]["truncated"] == 1  # the FIN looked complete


def test_a_connection_lasts_its_requests_and_completes_them_all() -> None:
    trace: list[dict[str, Any]] = []
    simulation = run(
        trace,
        sim_clients=FIVE_REQUESTS,
        sim_network=NO_LATENCY,
        sim_service=0.1,
    )
    held(simulation)
    (closed,) = closes(trace)
    assert closed["outcome"] == "completed"
    assert closed["at"] == pytest.approx(4.5)  # the last response, then the EOFs at once
    requests = build_report(simulation)["clients"]["requests"]
    assert (requests["completed"], requests["lost"]) == (5, 0)


def test_a_think_time_longer_than_the_idle_timeout_is_cut_by_it() -> None:
    trace: list[dict[str, Any]] = []
    simulation = run(
        trace,
        timeouts={"connect": 0.5, "idle": 1.0, "drain": 5.0},
        sim_clients={**FIVE_REQUESTS, "think": 2.5},
        sim_network=NO_LATENCY,
        sim_service=0.1,
    )
    held(simulation)
    (closed,) = closes(trace)
    assert closed["outcome"] == "idle_timeout"
    assert closed["at"] == pytest.approx(0.1 + 1.0)  # a timeout after the first response
    requests = build_report(simulation)["clients"]["requests"]
    assert (requests["completed"], requests["lost"]) == (1, 4)


def test_a_slow_backend_serves_each_request_at_its_own_pace() -> None:
    """The backend's own service time and latency, drawn per request."""
    found = scenario(
        sim_duration=30.0,
        sim_clients={"rate": 20.0, "requests": {"kind": "exponential", "mean": 4}, "think": 0.2},
        sim_service={"kind": "exponential", "mean": 0.01},
        sim_backends=[{"address": B, "service": 0.5, "latency": 0.05}],
    )
    trace: list[dict[str, Any]] = []
    simulation = Simulation(found, 3, trace=trace.append).run()
    held(simulation)
    durations: dict[str, list[float]] = {A: [], B: []}
    for entry in closes(trace):
        if entry["outcome"] == "completed":
            durations[entry["backend"]].append(entry["at"] - entry["connected_at"])
    assert min(durations[B]) >= 0.55  # one request at least: its round trip and service
    mean = {address: sum(found) / len(found) for address, found in durations.items()}
    assert mean[B] > 2 * mean[A]
    report = build_report(simulation)
    assert report["clients"]["requests"]["lost"] == 0
    expected = sum(row["requests_completed"] for row in report["backends"])
    assert report["clients"]["requests"]["completed"] == expected > 1000


def test_requests_in_a_run_are_those_the_model_draws_for_the_seed() -> None:
    """The number of requests counted is the schedules' own: none is made up or dropped."""
    found = scenario(
        sim_clients={"rate": 20.0, "requests": {"kind": "uniform", "low": 1, "high": 6}},
    )
    simulation = Simulation(found, 5).run()
    held(simulation)
    requests = build_report(simulation)["clients"]["requests"]
    assert requests["lost"] == 0
    assert requests["connections"] == simulation.arrived
    # Between 1 and 6 a connection: the mean of 3.5 within a few percent.
    assert 3.2 < requests["completed"] / requests["connections"] < 3.8


def test_without_requests_the_report_has_none_of_the_new_fields() -> None:
    report = build_report(run())
    assert "requests" not in report["clients"] and "attempts" not in report["clients"]
    assert "drawn_faults" not in report
    assert all("requests_lost" not in row for row in report["backends"])


# -- per-backend latency ---------------------------------------------------------


def test_a_backend_s_own_latency_applies_to_its_connects_probes_and_eofs() -> None:
    trace: list[dict[str, Any]] = []
    simulation = run(
        trace,
        health={"active": True, "probe_interval": 0.5, "probe_timeout": 0.2},
        sim_network={"latency": 0.001},
        sim_backends=[{"address": B, "latency": 0.05}],
    )
    held(simulation)
    latency = build_report(simulation)["clients"]["connect_latency_ms"]
    assert (latency["p50"], latency["max"]) == (1.0, 50.0)
    connects = {
        entry["connection_id"]: entry["backend"]
        for entry in trace
        if entry.get("output") == "ConnectBackend"
    }
    for entry in closes(trace):
        if entry["outcome"] == "completed":
            expected = 0.05 if connects[entry["connection_id"]] == B else 0.001
            assert entry["connected_at"] - entry["opened_at"] == pytest.approx(expected)
    # A probe of B answers 50 ms after it is sent: beyond a 20 ms probe timeout it fails.
    failing = run(
        health={"active": True, "probe_interval": 0.5, "probe_timeout": 0.02},
        sim_backends=[{"address": B, "latency": 0.05}],
    )
    assert failing.monitor.probe_failures[B] == failing.monitor.probes[B] > 0
    assert failing.monitor.probe_failures[A] == 0
    # An EOF from B's side comes a 50 ms round trip after Loble's.
    shut = {
        entry["connection_id"]: entry["t"]
        for entry in trace
        if entry.get("output") == "ShutdownWrite" and entry["side"] == "backend"
    }
    eofs = [
        entry["t"] - shut[entry["args"][0]]
        for entry in trace
        if entry.get("event") == "backend_eof" and entry["args"][0] in shut
    ]
    assert any(gap == pytest.approx(0.05) for gap in eofs)
    assert all(gap == pytest.approx(0.05) or gap == pytest.approx(0.001) for gap in eofs)


# -- client connect timeouts and retries ----------------------------------------

BLACKHOLED = [{"at": 0.0, "backend": "*", "behaviour": "blackhole"}]


def test_a_blackholed_backend_sees_clients_give_up_at_exactly_their_timeout() -> None:
    trace: list[dict[str, Any]] = []
    simulation = run(
        trace,
        timeouts={"connect": 5.0, "idle": 30.0, "drain": 5.0},
        sim_clients={"rate": 20.0, "connect_timeout": 0.75},
        sim_faults=BLACKHOLED,
    )
    held(simulation)
    ended = closes(trace)
    assert len(ended) == simulation.arrived > 100
    for entry in ended:
        assert entry["outcome"] == "client_reset" and entry["connected_at"] is None
        assert entry["at"] == entry["opened_at"] + 0.75
    attempts = build_report(simulation)["clients"]["attempts"]
    assert attempts == {
        "clients": simulation.arrived,
        "connections": simulation.arrived,
        "retries": 0,
        "gave_up": simulation.arrived,
        "rescued": 0,
        "failed": simulation.arrived,
        "retrying_at_end": 0,
    }
    # A client reset is no verdict: the passive checks never take the backends out.
    assert simulation.monitor.timeline == []


def test_each_client_retries_at_most_its_retries_after_its_backoff() -> None:
    trace: list[dict[str, Any]] = []
    simulation = run(
        trace,
        sim_clients={**ONE_CLIENT, "rate": 1.0, "retries": 3, "retry_backoff": 0.25},
        sim_faults=[{"at": 0.0, "backend": "*", "behaviour": "crash"}],
    )
    held(simulation)
    attempts = build_report(simulation)["clients"]["attempts"]
    clients = attempts["clients"]
    assert clients == 10
    assert attempts["connections"] == simulation.arrived == 4 * clients
    assert attempts["retries"] == 3 * clients and attempts["failed"] == clients
    assert attempts["rescued"] == 0 and attempts["retrying_at_end"] == 0
    # Client 1 connects at 0 and fails once its connects are refused; each
    # retry comes 0.25 s after the failure before it.
    retries = [entry for entry in trace if entry.get("event") == "retry"]
    first = [entry for entry in retries if entry["args"][0] == 1]
    assert [entry["args"][1] for entry in first] == [2, 3, 4]
    ends = [entry["at"] for entry in closes(trace)]
    for entry in first:
        assert any(entry["t"] == pytest.approx(end + 0.25) for end in ends)


def test_a_retry_gets_a_client_through_what_would_have_failed() -> None:
    found = scenario(
        timeouts={"connect": 3.0, "idle": 30.0, "drain": 5.0},
        balancer={"connect_retries": 0},
        sim_clients={"rate": 20.0, "connect_timeout": 0.5, "retries": 2, "retry_backoff": 0.1},
        sim_faults=[{"at": 2.0, "until": 6.0, "backend": A, "behaviour": "blackhole"}],
    )
    simulation = Simulation(found, 2).run()
    held(simulation)
    report = build_report(simulation)
    attempts = report["clients"]["attempts"]
    assert attempts["rescued"] > 10
    assert attempts["gave_up"] == attempts["retries"] + attempts["failed"]
    assert attempts["connections"] == attempts["clients"] + attempts["retries"]
    assert report["clients"]["arrived"] == attempts["connections"]
    assert report["clients"]["outcomes"]["client_reset"] == attempts["gave_up"]


def test_clients_refused_after_the_stop_retry_against_the_kernel() -> None:
    simulation = run(
        sim_duration=4.0,
        sim_shutdown_at=1.0,
        sim_clients={"arrival": "constant", "rate": 2.0, "retries": 2, "retry_backoff": 0.1},
        sim_network=NO_LATENCY,
        sim_faults=[],
        timeouts={"connect": 0.5, "idle": 30.0, "drain": 0.5},
    )
    held(simulation)
    attempts = build_report(simulation)["clients"]["attempts"]
    assert attempts["clients"] == 8  # t = 0, 0.5, ..., 3.5
    # Those after the SIGTERM are refused, then retried twice (0.1 s apart), all refused.
    late = sum(1 for index in range(8) if index * 0.5 > 1.0)
    assert attempts["failed"] >= late
    assert attempts["retries"] == 2 * attempts["failed"]
    assert simulation.refused_after_stop > late
    assert attempts["connections"] == simulation.arrived


def test_the_monitor_catches_a_client_retrying_past_its_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = scenario(
        sim_clients={**ONE_CLIENT, "retries": 1},
        sim_faults=[{"at": 0.0, "backend": "*", "behaviour": "crash"}],
    )
    simulation = Simulation(found, 1)
    simulation._retry_limit = 2  # the world retries once more than the scenario allows
    simulation.run()
    found_violations = [
        v for v in simulation.monitor.violations if v.invariant == "bounded retries"
    ]
    assert found_violations and "exceeds 1 + retries (1)" in found_violations[0].message


def test_the_monitor_catches_a_client_that_gave_up_yet_connected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A world that forgets to reset the connection its client gave up on."""
    found = scenario(
        sim_clients={"rate": 5.0, "connect_timeout": 0.1},
        sim_faults=[{"at": 0.0, "backend": "*", "behaviour": "slow", "delay": 0.3}],
    )
    simulation = Simulation(found, 1)
    monkeypatch.setattr(simulation.core, "client_error", lambda cid, now: [])
    simulation.run()
    messages = [str(v) for v in simulation.monitor.violations]
    assert any("timeouts on time" in m and "gave up" in m for m in messages), messages


# -- timer jitter ----------------------------------------------------------------


def jittered(jitter: Any, **changes: Any) -> dict[str, Any]:
    return document(
        health={"active": False, "failure_threshold": 2, "success_threshold": 2},
        balancer={"algorithm": "round_robin", "connect_retries": 1},
        sim_clients=ONE_CLIENT,
        sim_timer_jitter=jitter,
        sim_faults=[{"at": 0.0, "backend": A, "behaviour": "blackhole"}],
        **changes,
    )


def test_jitter_delays_a_connect_timeout_by_exactly_the_drawn_lateness() -> None:
    for jitter, late in ((0.25, 0.25), (0.0, 0.0)):
        trace: list[dict[str, Any]] = []
        found = parse_scenario(jittered(jitter), name="jitter")
        simulation = Simulation(found, 1, trace=trace.append).run()
        held(simulation)
        (failed,) = [entry for entry in trace if entry.get("output") == "ConnectFailed"]
        assert failed["timed_out"] and failed["backend"] == A
        assert failed["at"] == 0.5 + late  # the connect timeout, handled that late
        timers = [entry["t"] for entry in trace if entry.get("event") == "core_timer"]
        assert timers[0] == 0.5 + late


def test_the_monitor_allows_exactly_the_lateness_it_is_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = scenario(
        sim_duration=20.0,
        health={"active": True, "probe_interval": 0.5, "probe_timeout": 0.3},
        sim_timer_jitter={"kind": "exponential", "mean": 0.05},
        sim_faults=[{"at": 3.0, "until": 12.0, "backend": A, "behaviour": "host_down"}],
        timeouts={"connect": 0.5, "idle": 2.0, "drain": 5.0},
    )
    honest = Simulation(found, 4).run()
    held(honest)
    # A loop that wakes late but tells the monitor nothing: the checks see it.
    original = Simulation._late

    def silent(self: Simulation, due: float) -> float:
        fire = original(self, due)
        self.monitor.late_wake = None
        return fire

    monkeypatch.setattr(Simulation, "_late", silent)
    untold = Simulation(found, 4).run()
    assert untold.monitor.violation_counts["timeouts on time"] > 0


# -- fault processes ------------------------------------------------------------


def test_drawn_faults_run_and_appear_in_the_trace_and_the_report() -> None:
    found = scenario(
        sim_duration=30.0,
        sim_faults=[{"at": 1.0, "until": 2.0, "backend": B, "behaviour": "crash"}],
        sim_fault_processes=[{"backend": A, "behaviour": "crash", "mtbf": 3.0, "mttr": 0.5}],
    )
    trace: list[dict[str, Any]] = []
    simulation = Simulation(found, 7, trace=trace.append).run()
    held(simulation)
    drawn = with_drawn_faults(found, 7).sim.faults[1:]
    assert len(drawn) > 3
    events = [entry for entry in trace if entry.get("event") == "fault"]
    fixed = [entry for entry in events if len(entry["args"]) == 1]
    assert [(entry["t"], entry["args"]) for entry in fixed] == [(1.0, [0])]  # by its index
    shown = [entry for entry in events if entry not in fixed]
    assert [entry["args"] for entry in shown] == [
        [index, "drawn", A, "crash"] for index in range(1, len(drawn) + 1)
    ]
    assert [entry["t"] for entry in shown] == [fault.at for fault in drawn]
    report = build_report(simulation)
    assert report["drawn_faults"] == [fault_data(fault) for fault in drawn]
    behaviours = simulation.backends[A].timeline
    assert sum(1 for _, name in behaviours if name == "crash") == len(drawn)
    assert simulation.monitor.passive_failures[A] > 0


def test_a_drawn_fault_warning_names_the_draw_not_a_file_index() -> None:
    found = scenario(
        sim_duration=30.0,
        sim_shutdown_at=5.0,
        timeouts={"connect": 0.5, "idle": 30.0, "drain": 0.5},
        sim_fault_processes=[{"backend": A, "behaviour": "crash", "mtbf": 3.0, "mttr": 0.5}],
    )
    report = build_report(Simulation(found, 7).run())
    late = [line for line in report["warnings"] if "never happened" in line]
    assert late and all(line.startswith("sim.fault_processes: drawn fault ") for line in late)


# -- the shipped scenarios -------------------------------------------------------

NEW = {
    "keepalive-requests": "requests",
    "client-retries": "attempts",
    "random-failures": "drawn_faults",
}


@pytest.mark.parametrize("name", sorted(NEW))
def test_each_new_scenario_shows_its_field_and_holds(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = REPO / "scenarios" / f"{name}.toml"
    assert main(["sim", str(path), "--seed", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"], report["invariants"]
    field = NEW[name]
    shown = report.get(field) or report["clients"].get(field)
    assert shown
    assert main(["sim", str(path), "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    heading = {"requests": "Requests: ", "attempts": "Clients: ", "drawn_faults": "Faults drawn"}
    assert heading[field] in printed


def test_the_new_scenarios_say_what_they_show() -> None:
    report = build_report(
        Simulation(load_scenario(REPO / "scenarios/keepalive-requests.toml"), 1).run()
    )
    killed = next(row for row in report["backends"] if row["address"] == "10.0.4.2:80")
    others = [row for row in report["backends"] if row is not killed]
    assert killed["requests_lost"] > 100 and all(row["requests_lost"] == 0 for row in others)
    retries = build_report(
        Simulation(load_scenario(REPO / "scenarios/client-retries.toml"), 1).run()
    )
    attempts = retries["clients"]["attempts"]
    assert attempts["rescued"] > attempts["failed"] and attempts["retries"] > 0
    # The clients give up before Loble's connect timeout: no passive failure on the backend.
    assert all(row["connect_failures"] == 0 for row in retries["backends"])
    assert retries["timeline"][0]["reason"].startswith("3 consecutive failures")
    failures = load_scenario(REPO / "scenarios/random-failures.toml")
    assert failures.sim.timer_jitter is not None and failures.sim.fault_processes


def test_the_plot_labels_an_add_and_a_remove_as_written() -> None:
    from loble.sim._plot import build_figure
    from loble.sim._swarm import run_once

    found = scenario(
        sim_operations=[
            {"at": 2.0, "action": "add", "backend": "10.9.0.3:80"},
            {"at": 6.0, "action": "remove", "backend": A},
        ]
    )
    _, series = run_once(found, 1, plotted=True)
    assert series is not None
    figure = build_figure([series], found)
    labels = [text.get_text() for text in figure.axes[0].texts]
    assert labels == ["add 10.9.0.3:80 (2 s)", f"remove {A} (6 s)"]


def test_a_slow_backend_delays_each_response_and_the_requests_after_it() -> None:
    trace: list[dict[str, Any]] = []
    simulation = run(
        trace,
        backends=[{"address": A}],
        sim_clients=FIVE_REQUESTS,
        sim_network=NO_LATENCY,
        sim_service=0.1,
        sim_faults=[{"at": 0.0, "backend": A, "behaviour": "slow", "delay": 0.5}],
    )
    held(simulation)
    (closed,) = closes(trace)
    assert closed["connected_at"] == 0.5  # the connect is 0.5 s late too
    # Responses at 0.6, 2.2, 3.8, 5.4 and 7.0 s after it (each 0.5 s late, and
    # the requests after it with it): the backend closes first, at the last.
    assert closed["at"] == pytest.approx(0.5 + 7.0)
    # Each request sent (1.6, 3.2, 4.8, 6.4 s after the connect) and each
    # response in, but the last (the end), is activity told to the core.
    touches = [entry["t"] for entry in trace if entry.get("event") == "touch"]
    assert touches == pytest.approx([1.1, 2.1, 2.7, 3.7, 4.3, 5.3, 5.9, 6.9])


@pytest.mark.parametrize(
    ("fault", "lost"),
    [
        ({"behaviour": "accept_hang"}, 5),  # accepted, never answered: all of them
        ({"behaviour": "reset", "probability": 1.0}, None),  # reset mid-stream: a tail
        ({"behaviour": "crash"}, 0),  # refused: never established, no request sent
    ],
)
def test_requests_on_a_backend_in_fault_from_the_start(
    fault: dict[str, Any], lost: int | None
) -> None:
    simulation = run(
        backends=[{"address": A}],
        sim_clients=FIVE_REQUESTS,
        sim_network=NO_LATENCY,
        sim_service=0.1,
        sim_faults=[{"at": 0.0, "backend": A, **fault}],
    )
    held(simulation)
    requests = build_report(simulation)["clients"]["requests"]
    assert requests["completed"] + requests["lost"] == (0 if lost == 0 else 5)
    if lost is None:
        assert requests["lost"] >= 1
    else:
        assert requests["lost"] == lost


def test_retries_after_the_stop_are_traced_and_the_run_ends_with_them_due() -> None:
    trace: list[dict[str, Any]] = []
    found = scenario(
        sim_duration=6.0,
        sim_settle=1.0,
        sim_shutdown_at=1.0,
        sim_clients={
            "arrival": "constant",
            "rate": 2.0,
            "schedule": [{"at": 4.0, "rate": 1.0}],
            "retries": 2,
            "retry_backoff": 1.5,
        },
        timeouts={"connect": 0.5, "idle": 30.0, "drain": 0.5},
    )
    simulation = Simulation(found, 1, trace=trace.append).run()
    held(simulation)
    refused = [entry for entry in trace if entry.get("refused", "").startswith("kernel")]
    assert {entry["event"] for entry in refused} == {"arrival", "retry"}
    attempts = build_report(simulation)["clients"]["attempts"]
    # The horizon is 7 s: a retry due later is still to come when the run ends.
    assert attempts["retrying_at_end"] > 0
    assert max(entry["t"] for entry in refused) <= 7.0
    assert attempts["connections"] == attempts["clients"] + attempts["retries"]


def test_the_monitor_catches_a_client_that_never_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A world whose clients ignore their connect timeout: they wait for Loble's."""
    found = scenario(
        timeouts={"connect": 2.0, "idle": 30.0, "drain": 5.0},
        sim_clients={"rate": 5.0, "connect_timeout": 0.5},
        sim_faults=BLACKHOLED,
    )
    monkeypatch.setattr(Simulation, "_on_give_up", lambda self, event, now: None)
    simulation = Simulation(found, 1).run()
    messages = [str(v) for v in simulation.monitor.violations]
    assert any("past its client's connect timeout" in m for m in messages), messages
