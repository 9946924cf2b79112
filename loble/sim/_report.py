"""What a run tells a person (rich tables) or a program (``--json``).

:func:`build_report` turns a finished :class:`Simulation` into plain data, the
one source for both forms, so the table and the JSON can never disagree.
Everything in it is derived from simulated time and the seed, never from the
wall clock, so the same run gives the same bytes.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from rich.console import Console
from rich.table import Table

from loble.core import RESET_OUTCOMES, HealthState, Outcome

from ._engine import Simulation
from ._monitor import INVARIANTS
from ._scenario import FAULT_PARAMETERS, Fault, Scenario

__all__ = [
    "IMPACT",
    "build_report",
    "fault_data",
    "impact_line",
    "percentile",
    "render_report",
    "run_warnings",
]

_TIMELINE_ROWS = 40
"""The table shows this many state changes; ``--json`` and ``--trace`` have all."""

IMPACT = {
    Outcome.NO_BACKEND: "clients refused (no backend)",
    Outcome.CONNECT_FAILED: "clients failed to connect",
    Outcome.CLIENT_RESET: "clients reset their own connections",
    Outcome.BACKEND_RESET: "clients reset by their backend",
    Outcome.IDLE_TIMEOUT: "clients closed for idleness",
    Outcome.CUT: "clients cut at the drain deadline",
    Outcome.REFUSED_SHUTTING_DOWN: "clients refused while shutting down",
    Outcome.RESOURCE_EXHAUSTED: "clients refused for want of proxy resources",
    Outcome.REMOVED: "clients cut when their backend was removed",
    Outcome.QUEUE_TIMEOUT: "clients refused after waiting queue_timeout (backends full)",
    Outcome.QUEUE_FULL: "clients refused at once, the queue full (backends full)",
}
"""What each way for a client to fail is called in the impact lines."""

AFTER_STOP = "refused_after_stop"
"""The impact row, and the outcome column, of clients that arrived after the
process stopped: no core outcome, the kernel refused them."""
IMPACT_AFTER_STOP = "clients refused by the kernel (nothing listening)"

SEEN = {
    "complete": "complete",
    "truncated": "truncated (FIN)",
    "reset": "reset",
    "refused_by_kernel": "refused by the kernel",
    "refused_by_loble": "refused by Loble",
}
"""What a client sees on the wire, as the daemon closes it, and its label.

``complete``: every byte, then a FIN. ``truncated``: a FIN before the end of
the stream (a killed backend's), which the client cannot tell from
``complete``. ``reset``: a RST, for every outcome the core closes with one
(``RESET_OUTCOMES``: a peer's reset, the idle timeout, the drain deadline's
cut, a removed backend's cut). ``refused_by_kernel``: the listener was
closed (after SIGTERM, or the process had stopped). ``refused_by_loble``:
Loble accepted, then closed it with a FIN before a byte (no backend, or no
backend connect succeeded)."""


def client_saw(outcome: Outcome) -> str:
    """The :data:`SEEN` key a client sees for a connection the core closed with ``outcome``."""
    if outcome is Outcome.COMPLETED:
        return "complete"
    if outcome in RESET_OUTCOMES:
        return "reset"
    if outcome is Outcome.REFUSED_SHUTTING_DOWN:
        return "refused_by_kernel"
    return "refused_by_loble"


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _round(value: float) -> float:
    return round(value, 6)


def build_report(simulation: Simulation) -> dict[str, Any]:
    monitor = simulation.monitor
    scenario = simulation.scenario
    config = scenario.config
    end = simulation.ended_at
    requests = scenario.sim.clients.requests is not None
    backends = []
    for address in monitor.known:
        world = simulation.backends[address]
        row: dict[str, Any] = {
            "address": address,
            "weight": monitor.weight[address],
            "connections": monitor.started[address],
            "connect_failures": monitor.passive_failures[address],
            "probes": monitor.probes[address],
            "probe_failures": monitor.probe_failures[address],
            "resets": monitor.resets[address],
            "bytes": int(world.bytes),
            "final_state": monitor.state[address].value,
            "seconds_in_state": _time_in_state(simulation, address, end),
            "behaviours": [[_round(at), name] for at, name in world.timeline],
        }
        if requests:
            completed, lost = simulation.request_counts.get(address, (0, 0))
            row["requests_completed"], row["requests_lost"] = completed, lost
        backends.append(row)
    latencies = sorted(monitor.connect_latencies)
    latency: dict[str, Any] = {"count": len(latencies)}
    if latencies:
        for label, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
            latency[label] = _round(percentile(latencies, fraction) * 1000)
    shutdown: dict[str, Any] | None = None
    if monitor.shutdown is not None:
        finished = monitor.shutdown_finished
        shutdown = {
            "at": _round(monitor.shutdown.at),
            "deadline": _round(monitor.shutdown.deadline),
            "in_flight": monitor.shutdown.in_flight,
            "finished_at": None if finished is None else _round(finished.at),
            "cut": None if finished is None else finished.cut,
        }
    invariants = []
    for name in INVARIANTS:
        count = monitor.violation_counts[name]
        invariants.append(
            {
                "name": name,
                "held": count == 0,
                "violations": count,
                "first": [str(v) for v in monitor.violations if v.invariant == name],
            }
        )
    impact = []
    for outcome in IMPACT:  # in the order of the table "What clients saw"
        times = monitor.outcome_times.get(outcome)
        if times is not None:
            impact.append(
                {
                    "outcome": outcome.value,
                    "first": _round(times[0]),
                    "last": _round(times[1]),
                    "connections": monitor.outcomes[outcome],
                }
            )
    if simulation.refused_after_stop:
        times = simulation.refused_after_stop_times
        first, last = times[0], times[-1]
        impact.append(
            {
                "outcome": AFTER_STOP,
                "first": _round(first),
                "last": _round(last),
                "connections": simulation.refused_after_stop,
            }
        )
    seen_rows = _seen_rows(simulation)
    seen = dict.fromkeys(SEEN, 0)
    for seen_row in seen_rows:
        seen[seen_row["saw"]] += seen_row["connections"]
    clients: dict[str, Any] = {
        "arrived": simulation.arrived,
        "outcomes": {outcome.value: monitor.outcomes[outcome] for outcome in Outcome},
        "refused_after_stop": simulation.refused_after_stop,
        "seen": seen,
        "seen_rows": seen_rows,
        "in_flight_at_end": len(monitor.open),
        "connect_latency_ms": latency,
        "impact": impact,
    }
    # Only a scenario that sets their keys has these: any other's report is as it was.
    if requests:
        clients["requests"] = _requests(simulation)
    if simulation.clients_model:
        clients["attempts"] = {
            "clients": simulation.clients,
            "connections": simulation.arrived,
            "retries": simulation.retried,
            "gave_up": simulation.gave_up,
            "rescued": simulation.clients_rescued,
            "failed": simulation.clients_failed,
            "retrying_at_end": simulation.retrying,
        }
    report: dict[str, Any] = {
        "scenario": scenario.name,
        "seed": simulation.seed,
        "ok": not monitor.violations,
        "warnings": [*scenario.warnings, *run_warnings(scenario, end)],
        "simulated_seconds": _round(end),
        "steps": monitor.step,
        "config": {
            "algorithm": simulation.balancer_name,
            "connect_retries": config.balancer.connect_retries,
            "failure_threshold": config.health.failure_threshold,
            "success_threshold": config.health.success_threshold,
            "probe_interval": config.health.probe_interval,
            "probe_timeout": config.health.probe_timeout,
            "active_probes": config.health.active,
            "connect_timeout": config.timeouts.connect,
            "idle_timeout": config.timeouts.idle,
            "drain_timeout": config.timeouts.drain,
        },
        "backends": backends,
        "timeline": [
            {
                "at": _round(change.at),
                "address": change.address,
                "old": change.old.value,
                "new": change.new.value,
                "reason": change.reason,
            }
            for change in monitor.timeline
        ],
        "clients": clients,
        "shutdown": shutdown,
        "refused_operations": [
            {"at": _round(at), "action": action, "reason": reason}
            for at, action, reason in simulation.refused
        ],
        "invariants": invariants,
    }
    policy = _traffic_policy(simulation, end)
    if policy:
        report["traffic_policy"] = policy
    sim = scenario.sim
    if sim.drawn_faults:
        report["drawn_faults"] = [
            fault_data(fault) for fault in sim.faults[len(sim.faults) - sim.drawn_faults :]
        ]
    return report


def _traffic_policy(simulation: Simulation, end: float) -> dict[str, Any]:
    """Panic periods, ejections, redispatches and hashing, each only if it occurred."""
    monitor = simulation.monitor
    policy: dict[str, Any] = {}
    if monitor.panic_periods:
        policy["panic"] = [
            {"from": _round(began), "until": None if ended is None else _round(ended)}
            for began, ended in monitor.panic_periods
        ]
        policy["panic_seconds"] = _round(
            sum((end if ended is None else ended) - began for began, ended in monitor.panic_periods)
        )
    if monitor.ejections:
        returned: dict[str, list[float]] = {}
        for at, address in monitor.returned:
            returned.setdefault(address, []).append(at)
        per_backend: dict[str, dict[str, Any]] = {}
        for at, address, until, _, _ in monitor.ejections:
            row = per_backend.setdefault(address, {"ejections": 0, "seconds": 0.0})
            row["ejections"] += 1
            back = [t for t in returned.get(address, []) if t >= at]
            row["seconds"] += (back[0] if back else min(until, end)) - at
        for row in per_backend.values():
            row["seconds"] = _round(row["seconds"])
        policy["ejected"] = per_backend
        policy["ejections"] = [
            {
                "at": _round(at),
                "address": address,
                "until": _round(until),
                "reason": reason,
                "ejections": ejections,
            }
            for at, address, until, reason, ejections in monitor.ejections
        ]
        policy["returned"] = [
            {"at": _round(at), "address": address} for at, address in monitor.returned
        ]
    if monitor.redispatches:
        policy["redispatched"] = monitor.redispatches
    full = monitor.outcomes[Outcome.QUEUE_FULL]
    if monitor.queued_total or full:
        waits = sorted(monitor.queue_waits)
        queue: dict[str, Any] = {
            "queued": monitor.queued_total,
            "served": len(waits),
            "timed_out": monitor.outcomes[Outcome.QUEUE_TIMEOUT],
            "refused_full": full,
        }
        if waits:
            queue["wait_ms"] = {
                label: _round(percentile(waits, fraction) * 1000)
                for label, fraction in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))
            }
        policy["queue"] = queue
    if simulation.population:
        policy["hashing"] = {
            "population": simulation.population,
            "addresses_seen": len({a for picks in monitor.picks.values() for a in picks}),
            "moves": hashing_moves(monitor.picks),
        }
    return policy


def hashing_moves(picks: dict[int, dict[str, str]]) -> list[dict[str, Any]]:
    """For each snapshot version after the first that clients saw: of the client
    addresses seen on it and on the one before, how many went to another backend."""
    moves: list[dict[str, Any]] = []
    versions = sorted(picks)
    for before, after in itertools.pairwise(versions):
        common = [address for address in picks[after] if address in picks[before]]
        moved = sum(1 for address in common if picks[after][address] != picks[before][address])
        moves.append(
            {
                "from_version": before,
                "to_version": after,
                "clients": len(common),
                "moved": moved,
                "share": _round(moved / len(common)) if common else None,
            }
        )
    return moves


def policy_lines(policy: dict[str, Any]) -> list[str]:
    """The traffic policy section, a line each, for people."""
    lines = []
    if "panic" in policy:
        periods = ", ".join(
            f"{row['from']:.3f}-{'end' if row['until'] is None else format(row['until'], '.3f')} s"
            for row in policy["panic"]
        )
        lines.append(f"Panic: {policy['panic_seconds']:.3f} s in panic ({periods})")
    if "ejected" in policy:
        for address, row in policy["ejected"].items():
            lengths = ", ".join(
                f"{ejection['at']:.3f} s for {ejection['until'] - ejection['at']:g} s"
                for ejection in policy["ejections"]
                if ejection["address"] == address
            )
            lines.append(
                f"Ejected: {address} {row['ejections']} times, {row['seconds']:.3f} s "
                f"in all ({lengths})"
            )
    if "redispatched" in policy:
        lines.append(
            f"Redispatched: {policy['redispatched']} pending connects moved off a backend "
            "judged bad"
        )
    if "queue" in policy:
        queue = policy["queue"]
        wait = queue.get("wait_ms")
        waited = (
            ""
            if wait is None
            else f" (wait p50 {wait['p50']:.3f} ms, p99 {wait['p99']:.3f} ms, "
            f"max {wait['max']:.3f} ms)"
        )
        lines.append(
            f"Queue: {queue['queued']} clients waited for a backend with room; "
            f"{queue['served']} were served{waited}, {queue['timed_out']} refused at "
            f"queue_timeout, {queue['refused_full']} refused with the queue full"
        )
    if "hashing" in policy:
        hashing = policy["hashing"]
        moves = "; ".join(
            f"v{row['from_version']}->v{row['to_version']} {row['moved']}/{row['clients']}"
            + ("" if row["share"] is None else f" ({row['share']:.1%})")
            for row in hashing["moves"]
        )
        lines.append(
            f"Hashing: {hashing['addresses_seen']} of {hashing['population']} addresses "
            f"seen; moved per new snapshot: {moves or 'none'}"
        )
    return lines


def _requests(simulation: Simulation) -> dict[str, Any]:
    """Requests on the connections that reached a backend: completed, lost, still open."""
    completed, lost = simulation.requests_completed, simulation.requests_lost
    open_at_end = simulation.requests_open
    return {
        "connections": simulation.requests_connections,
        "completed": completed,
        "lost": lost,
        "open_at_end": open_at_end,
    }


def fault_data(fault: Fault) -> dict[str, Any]:
    """A fault as plain data: when, where, what, and the parameter its behaviour reads."""
    data: dict[str, Any] = {
        "at": _round(fault.at),
        "until": None if fault.until is None else _round(fault.until),
        "backend": fault.backend,
        "behaviour": fault.behaviour,
    }
    for name, user in FAULT_PARAMETERS.items():
        if user == fault.behaviour:
            value = getattr(fault, name)
            data[name] = _round(value) if isinstance(value, float) else value
    return data


def _seen_rows(simulation: Simulation) -> list[dict[str, Any]]:
    """What clients saw, each way split by the outcome Loble logged, in :data:`SEEN` order."""
    outcomes = simulation.monitor.outcomes
    truncated = simulation.truncated_completed
    rows: list[dict[str, Any]] = []
    for saw in SEEN:
        if saw == "truncated":
            if truncated:
                rows.append({"saw": saw, "outcome": "completed", "connections": truncated})
            continue
        for outcome in Outcome:
            count = outcomes[outcome] - (truncated if outcome is Outcome.COMPLETED else 0)
            if count and client_saw(outcome) == saw:
                rows.append({"saw": saw, "outcome": outcome.value, "connections": count})
        if saw == "refused_by_kernel" and simulation.refused_after_stop:
            rows.append(
                {"saw": saw, "outcome": AFTER_STOP, "connections": simulation.refused_after_stop}
            )
    return rows


def run_warnings(scenario: Scenario, end: float) -> list[str]:
    """A line for each fault, or operation, outside the simulated time.

    Clients arrive until ``sim.duration``: a fault from then on meets none
    (it can still cut connections open then). A fault, or an operation, after
    the run's last event (``end``) never happened at all.
    """
    warnings = []
    duration = scenario.sim.duration
    drawn_from = len(scenario.sim.faults) - scenario.sim.drawn_faults
    for index, fault in enumerate(scenario.sim.faults):
        where = f"sim.faults[{index}].at: {fault.behaviour} at {fault.at:g} s"
        if index >= drawn_from:  # no line of the file: say which draw
            where = (
                f"sim.fault_processes: drawn fault {index - drawn_from + 1}, "
                f"{fault.behaviour} on {fault.backend} at {fault.at:g} s,"
            )
        if fault.at > end:
            warnings.append(f"{where} is after the run ended at {end:.3f} s: it never happened")
        elif fault.at >= duration:
            warnings.append(
                f"{where} is not before sim.duration ({duration:g} s): "
                "no client arrives while it is in force"
            )
    for index, operation in enumerate(scenario.sim.operations):
        if operation.at > end:
            warnings.append(
                f"sim.operations[{index}].at: {operation.action} at {operation.at:g} s is after "
                f"the run ended at {end:.3f} s: it never happened"
            )
    return warnings


def impact_line(row: dict[str, Any], arrived: int) -> str:
    """``clients refused (no backend) from 20.071 s to 33.071 s, 772 connections (...)``."""
    what = IMPACT_AFTER_STOP if row["outcome"] == AFTER_STOP else IMPACT[Outcome(row["outcome"])]
    count = row["connections"]
    when = (
        f"at {row['first']:.3f} s"
        if row["first"] == row["last"]
        else f"from {row['first']:.3f} s to {row['last']:.3f} s"
    )
    plural = "connection" if count == 1 else "connections"
    return f"{what} {when}, {count} {plural} ({count / arrived:.1%} of arrivals)"


def attempts_line(attempts: dict[str, Any]) -> str:
    """What clients' timeouts and retries did, and what the retries cost in load."""
    clients, connections = attempts["clients"], attempts["connections"]
    extra = f", +{attempts['retries'] / clients:.1%} load" if clients else ""
    line = (
        f"Clients: {clients} arrived, {connections} connections ({attempts['retries']} "
        f"retries{extra}); {attempts['gave_up']} gave up, {attempts['rescued']} "
        f"saved by a retry, {attempts['failed']} failed"
    )
    if attempts["retrying_at_end"]:
        line += f", {attempts['retrying_at_end']} still to retry at the end"
    return line


def requests_line(requests: dict[str, Any]) -> str:
    """``Requests: 9876 completed, 123 lost (1.2%) on 1000 connections``."""
    completed, lost = requests["completed"], requests["lost"]
    share = f" ({lost / (completed + lost):.1%})" if completed + lost else ""
    line = (
        f"Requests: {completed} completed, {lost} lost{share} on "
        f"{requests['connections']} connections that reached a backend"
    )
    if requests["open_at_end"]:
        line += f"; {requests['open_at_end']} on connections still open at the end"
    return line


_DRAWN_ROWS = 12
"""The rich report shows this many drawn failures; ``--json`` has every fault."""


def drawn_table(drawn: list[dict[str, Any]]) -> Table:
    """The faults the fault processes drew, a zone's failure on one row."""
    rows: list[tuple[float, float | None, str, list[str]]] = []
    for fault in drawn:
        last = rows[-1] if rows else None
        if last is not None and (last[0], last[1], last[2]) == (
            fault["at"],
            fault["until"],
            fault["behaviour"],
        ):
            last[3].append(fault["backend"])
        else:
            rows.append((fault["at"], fault["until"], fault["behaviour"], [fault["backend"]]))
    table = Table(
        title=f"Faults drawn from sim.fault_processes ({len(drawn)})", title_justify="left"
    )
    for column in ("from (s)", "to (s)", "behaviour", "backends"):
        table.add_column(column, justify="right" if column.endswith("(s)") else "left")
    for at, until, behaviour, addresses in rows[:_DRAWN_ROWS]:
        table.add_row(
            f"{at:.3f}", "" if until is None else f"{until:.3f}", behaviour, ", ".join(addresses)
        )
    if len(rows) > _DRAWN_ROWS:
        table.caption = f"{len(rows) - _DRAWN_ROWS} more failures in --json"
    return table


def _time_in_state(simulation: Simulation, address: str, end: float) -> dict[str, float]:
    seconds = dict.fromkeys((state.value for state in HealthState), 0.0)
    state, since = HealthState.HEALTHY, 0.0
    for change in simulation.monitor.timeline:
        if change.address == address:
            seconds[state.value] += change.at - since
            state, since = change.new, change.at
    seconds[state.value] += max(0.0, end - since)
    return {name: _round(value) for name, value in seconds.items()}


def render_report(report: dict[str, Any], console: Console) -> None:
    """Print a report for people."""
    verdict = "[green]every invariant held[/]" if report["ok"] else "[bold red]FAILED[/]"
    console.print(
        f"[bold]{report['scenario']}[/] seed {report['seed']}: "
        f"{report['simulated_seconds']:.3f} s simulated in {report['steps']} steps, {verdict}"
    )

    backends = Table(title="Backends", title_justify="left")
    requests = "requests" in report["clients"]
    columns = ["backend", "weight", "conns", "failed", "probes", "resets", "final"]
    if requests:
        columns[3:3] = ["requests"]
    for column in columns:
        backends.add_column(column, justify="left" if column in ("backend", "final") else "right")
    for state in HealthState:
        backends.add_column(f"{state.value} s", justify="right")
    for row in report["backends"]:
        served = []
        if requests:  # completed/all, as probes are successes/all
            completed = row["requests_completed"]
            served = [f"{completed}/{completed + row['requests_lost']}"]
        backends.add_row(
            row["address"],
            str(row["weight"]),
            str(row["connections"]),
            *served,
            str(row["connect_failures"]),
            f"{row['probes'] - row['probe_failures']}/{row['probes']}",
            str(row["resets"]),
            row["final_state"],
            *(f"{row['seconds_in_state'][state.value]:.1f}" for state in HealthState),
        )
    console.print(backends)

    timeline = Table(title="State timeline", title_justify="left")
    for column in ("t (s)", "backend", "change", "reason"):
        timeline.add_column(column, justify="right" if column == "t (s)" else "left")
    for change in report["timeline"][:_TIMELINE_ROWS]:
        timeline.add_row(
            f"{change['at']:.3f}",
            change["address"],
            f"{change['old']} -> {change['new']}",
            change["reason"],
        )
    hidden = len(report["timeline"]) - _TIMELINE_ROWS
    if hidden > 0:
        timeline.caption = f"{hidden} more in --json"
    if report["timeline"]:
        console.print(timeline)
    else:
        console.print("State timeline: every backend stayed healthy")

    clients = report["clients"]
    seen = Table(title="What clients saw", title_justify="left")
    seen.add_column("client saw")
    seen.add_column("connections", justify="right")
    seen.add_column("Loble's outcome")
    seen.add_row("arrived", str(clients["arrived"]), "")
    for row in clients["seen_rows"]:
        outcome = row["outcome"]
        seen.add_row(
            SEEN[row["saw"]],
            str(row["connections"]),
            "none: the process had stopped" if outcome == AFTER_STOP else outcome.replace("_", " "),
        )
    if clients["in_flight_at_end"]:
        seen.add_row("still open at the end", str(clients["in_flight_at_end"]), "")
    console.print(seen)
    for row in clients["impact"]:
        console.print(f"Impact: {impact_line(row, clients['arrived'])}")
    if "attempts" in clients:
        console.print(attempts_line(clients["attempts"]))
    if requests:
        console.print(requests_line(clients["requests"]))
    for line in policy_lines(report.get("traffic_policy", {})):
        console.print(line)
    drawn = report.get("drawn_faults", [])
    if drawn:
        console.print(drawn_table(drawn))
    latency = clients["connect_latency_ms"]
    if latency["count"]:
        console.print(
            f"Connect latency (ms): p50 {latency['p50']:.3f}  p90 {latency['p90']:.3f}  "
            f"p99 {latency['p99']:.3f}  max {latency['max']:.3f}  ({latency['count']} connects)"
        )
    shutdown = report["shutdown"]
    if shutdown is not None:
        console.print(
            f"Shutdown at {shutdown['at']:.3f} s with {shutdown['in_flight']} in flight, "
            f"deadline {shutdown['deadline']:.3f} s: finished at {shutdown['finished_at']} s, "
            f"{shutdown['cut']} cut"
        )

    for refusal in report["refused_operations"]:
        console.print(f"Refused at {refusal['at']:.3f} s: {refusal['action']}: {refusal['reason']}")

    invariants = Table(title="Invariants (checked at every step)", title_justify="left")
    invariants.add_column("invariant")
    invariants.add_column("held")
    invariants.add_column("first violation")
    for row in report["invariants"]:
        held = "[green]yes[/]" if row["held"] else f"[red]no ({row['violations']})[/]"
        invariants.add_row(row["name"], held, row["first"][0] if row["first"] else "")
    console.print(invariants)
