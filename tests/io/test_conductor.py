"""The conductor on its own: a fake data path, a fake clock, no socket and no event loop.

The conductor turns a data path's reports into core calls and carries out
the core's outputs. These tests play the data path: they report what a
network would do and check what the conductor asked of the path, of the
lifecycle's hooks and of its listeners, and in which order.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from loble.core import (
    BackendStateChanged,
    CloseConnection,
    ConnectBackend,
    ConnectionClosed,
    HealthReport,
    HealthState,
    Outcome,
    Output,
    ProbeBackend,
    ProbeCheck,
    ProbeFailure,
    ProxyCore,
    ShutdownWrite,
    Side,
    SnapshotPublished,
    parse_config,
)
from loble.core._probe import CONNECT_ONLY
from loble.io._conductor import Conductor
from loble.io._copy import OneWay, Pumped
from loble.io._datapath import Attempt, ConnectionBudget, Link, Reports

GOOD, OTHER = "127.0.0.1:9101", "127.0.0.1:9102"


class FakeSocket:
    """Stands in for a client socket: the conductor never touches it."""

    def getpeername(self) -> tuple[str, int]:
        return ("127.0.0.1", 40000)


class FakeWay:
    """Stands in for a :class:`OneWay`: only its identity and byte count are read."""

    def __init__(self) -> None:
        self.total = 0
        self.reported = 0


class FakePath:
    """A data path that records what it is asked and does what a test tells it."""

    def __init__(self, reports: Reports[Link]) -> None:
        self.reports = reports
        self.calls: list[tuple[Any, ...]] = []
        self.attempts: dict[int, Attempt] = {}
        self.on_shutdown_write: Callable[[Link, Side], None] | None = None
        self.release_at_once = True
        """As the callbacks path: closing releases at once (tasks: a moment later)."""
        self.busy = 0
        """How many of this path's methods are on the stack: an order never runs inside one."""

    async def serve(self, listeners: Any) -> None:  # pragma: no cover - not served here
        raise AssertionError("not used")

    def connect(self, link: Link, action: ConnectBackend) -> None:
        assert not self.busy, "an order ran inside another"
        self.calls.append(("connect", link.connection_id, action.attempt, action.backend.address))
        attempt = self.attempts[link.connection_id] = Attempt(action, clock.now)
        attempt.sock = FakeSocket()  # type: ignore[assignment]

    def forward(self, link: Link, attempt: Attempt) -> None:
        self.calls.append(("forward", link.connection_id, attempt.number))
        link.backend_address = attempt.backend.address
        link.to_backend = FakeWay()  # type: ignore[assignment]
        link.to_client = FakeWay()  # type: ignore[assignment]

    def shutdown_write(self, link: Link, side: Side) -> None:
        assert not self.busy, "an order ran inside another"
        self.calls.append(("shutdown_write", link.connection_id, side))
        self.busy += 1
        try:
            if self.on_shutdown_write is not None:
                self.on_shutdown_write(link, side)
        finally:
            self.busy -= 1

    def close(self, link: Link, reset: bool) -> None:
        assert not self.busy, "an order ran inside another"
        self.calls.append(("close", link.connection_id, reset))
        if self.release_at_once:
            self.reports.released(link)

    def pause_accepting(self) -> None:
        self.calls.append(("pause_accepting",))

    def resume_accepting(self) -> None:
        self.calls.append(("resume_accepting",))

    def dispose(self) -> None:
        self.calls.append(("dispose",))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


clock = Clock()


class Recorder:
    """A listener that keeps every output it is given, the hooks' calls, and nesting depth."""

    def __init__(self) -> None:
        self.outputs: list[Output] = []
        self.connected: list[tuple[str, float]] = []
        self.dropped: list[tuple[int, Outcome]] = []
        self.probe_results: list[tuple[str, ProbeFailure | None]] = []
        self.accepted: list[int] = []

    def _record(self, output: Output) -> None:
        self.outputs.append(output)

    def handlers(self) -> Mapping[type, Callable[[Any], object]]:
        kinds = (
            ConnectBackend,
            ShutdownWrite,
            CloseConnection,
            ConnectionClosed,
            BackendStateChanged,
            HealthReport,
            ProbeBackend,
            SnapshotPublished,
        )
        return dict.fromkeys(kinds, self._record)

    def backend_connected(self, address: str, seconds: float) -> None:
        self.connected.append((address, seconds))

    def link_dropped(self, link: Link, closed: ConnectionClosed) -> None:
        self.dropped.append((link.connection_id, closed.outcome))

    def link_accepted(self, link: Link) -> None:
        self.accepted.append(link.connection_id)

    def probed(self, address: str, failure: ProbeFailure | None) -> None:
        self.probe_results.append((address, failure))


class Timer:
    def __init__(self) -> None:
        self.deadline = math.inf


class Rig:
    """A conductor on a fresh core, with everything it calls out to recorded."""

    def __init__(self, budget: ConnectionBudget | None = None, **sections: Any) -> None:
        clock.now = 1000.0
        document = {
            "listener": {"address": "127.0.0.1:0"},
            "backends": [{"address": GOOD}, {"address": OTHER}],
            **sections,
        }
        self.core = ProxyCore(parse_config(document), random.Random(0))
        self.recorder = Recorder()
        self.probes: list[tuple[str, float]] = []
        self.probe_checks: list[ProbeCheck] = []
        self.stopped_accepting = 0
        self.stopped = 0
        self.logger = logging.getLogger("loble.test.conductor")
        self.conductor: Conductor[Link] = Conductor(
            self.core,
            FakePath,
            now=clock,
            logger=self.logger,
            listeners=(self.recorder,),
            probe=self._probe,
            stop_accepting=self._stop_accepting,
            stopped=self._stopped,
            budget=budget,
        )
        path = self.conductor.path
        assert isinstance(path, FakePath)
        self.path = path

    def _probe(self, action: ProbeBackend) -> None:
        self.probes.append((action.backend.address, action.timeout))
        self.probe_checks.append(action.check)

    def _stop_accepting(self) -> None:
        self.stopped_accepting += 1

    def _stopped(self) -> None:
        self.stopped += 1

    def accept(self) -> Link:
        link = Link(FakeSocket(), ("127.0.0.1", 40000))  # type: ignore[arg-type]
        self.conductor.accepted(link)
        return link

    def connect(self, link: Link) -> Attempt:
        """The path's connect for ``link`` succeeds; the conductor has it forwarded."""
        attempt = self.path.attempts[link.connection_id]
        assert self.conductor.connected(link, attempt)
        return attempt


def way(link: Link, from_client: bool) -> OneWay:
    found = link.to_backend if from_client else link.to_client
    assert found is not None
    return found


def test_a_connection_from_accept_to_close_goes_through_the_path_in_order() -> None:
    rig = Rig()
    link = rig.accept()
    assert rig.path.calls == [("connect", link.connection_id, 1, GOOD)]
    assert rig.recorder.accepted == [link.connection_id]
    assert rig.conductor.links == {link.connection_id: link}
    clock.now += 0.002
    before = len(rig.recorder.outputs)
    rig.connect(link)
    assert rig.path.calls[-1] == ("forward", link.connection_id, 1)
    assert len(rig.recorder.outputs) > before  # the core's outputs ran after forward
    assert rig.recorder.connected == [(GOOD, pytest.approx(0.002))]
    rig.conductor.copy_ended(link, way(link, from_client=True), Pumped.EOF)
    assert rig.path.calls[-1] == ("shutdown_write", link.connection_id, Side.BACKEND)
    rig.conductor.copy_ended(link, way(link, from_client=False), Pumped.EOF)
    assert rig.path.calls[-1] == ("close", link.connection_id, False)
    # Dropped when the core said it closed, after the listeners saw it.
    assert rig.conductor.links == {}
    assert rig.recorder.dropped == [(link.connection_id, Outcome.COMPLETED)]
    assert rig.core.in_flight == 0


@pytest.mark.parametrize(
    ("report", "outcome"),
    [
        (lambda c, link: c.socket_failed(link, Side.BACKEND), Outcome.BACKEND_RESET),
        (lambda c, link: c.socket_failed(link, Side.CLIENT), Outcome.CLIENT_RESET),
        (
            lambda c, link: c.copy_ended(link, way(link, True), Pumped.SINK_ERROR),
            Outcome.BACKEND_RESET,
        ),
        (
            lambda c, link: c.copy_ended(link, way(link, False), Pumped.SOURCE_ERROR),
            Outcome.BACKEND_RESET,
        ),
        (
            lambda c, link: c.copy_ended(link, way(link, True), Pumped.SOURCE_ERROR),
            Outcome.CLIENT_RESET,
        ),
    ],
)
def test_a_broken_side_closes_with_a_reset_blamed_on_that_side(
    report: Callable[[Conductor[Link], Link], None], outcome: Outcome
) -> None:
    rig = Rig()
    link = rig.accept()
    rig.connect(link)
    report(rig.conductor, link)
    assert rig.path.calls[-1] == ("close", link.connection_id, True)
    assert rig.recorder.dropped == [(link.connection_id, outcome)]


def test_a_connect_that_completes_after_the_core_gave_up_is_stale() -> None:
    rig = Rig(timeouts={"connect": 0.5})
    link = rig.accept()
    first = rig.path.attempts[link.connection_id]
    clock.now += 0.6
    rig.conductor.handle_timer()  # the connect timed out: the core retries elsewhere
    assert rig.path.calls[-1] == ("connect", link.connection_id, 2, OTHER)
    second = rig.path.attempts[link.connection_id]
    assert rig.conductor.connected(link, first) is False  # the path closes that socket
    assert ("forward", link.connection_id, 1) not in rig.path.calls
    assert rig.conductor.connected(link, second) is True
    assert rig.path.calls[-1] == ("forward", link.connection_id, 2)
    assert [address for address, _ in rig.recorder.connected] == [OTHER]


def test_a_report_made_while_carrying_out_runs_after_what_is_queued() -> None:
    rig = Rig()
    link = rig.accept()
    rig.connect(link)
    # The half-close fails at once, as shutdown() on a reset socket does.
    rig.path.on_shutdown_write = lambda link, side: rig.conductor.socket_failed(link, side)
    before = len(rig.recorder.outputs)
    rig.conductor.copy_ended(link, way(link, from_client=True), Pumped.EOF)
    kinds = [type(output).__name__ for output in rig.recorder.outputs[before:]]
    # The ShutdownWrite ran whole before the failure's outputs: the close came
    # after shutdown_write returned (FakePath asserts no order runs inside another).
    assert kinds[0] == "ShutdownWrite"
    assert "CloseConnection" in kinds[1:]
    assert rig.path.calls[-2:] == [
        ("shutdown_write", link.connection_id, Side.BACKEND),
        ("close", link.connection_id, True),
    ]
    assert rig.recorder.dropped == [(link.connection_id, Outcome.BACKEND_RESET)]


def test_a_failing_action_leaves_nothing_queued_to_replay() -> None:
    rig = Rig()
    link = rig.accept()
    rig.connect(link)

    def broken(link: Link, side: Side) -> None:
        raise RuntimeError("a bug in the path")

    rig.path.on_shutdown_write = broken
    with pytest.raises(RuntimeError):
        rig.conductor.copy_ended(link, way(link, from_client=True), Pumped.EOF)
    # The path's handler reports the bug; the connection ends, the next one is served.
    rig.conductor.driver_failed(link)
    assert rig.path.calls[-1] == ("close", link.connection_id, True)
    assert rig.conductor.links == {}
    assert rig.core.in_flight == 0
    rig.path.on_shutdown_write = None
    again = rig.accept()
    assert rig.path.calls[-1] == ("connect", again.connection_id, 1, OTHER)


def test_driver_failed_is_logged_and_the_core_counts_the_connection_gone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    link = rig.accept()
    with caplog.at_level(logging.ERROR, logger=rig.logger.name):
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            rig.conductor.driver_failed(link)
    assert f"connection {link.connection_id} failed" in caplog.text
    assert rig.recorder.dropped == [(link.connection_id, Outcome.CLIENT_RESET)]
    assert rig.core.statistics().backends[0].active_connections == 0


def test_no_backend_closes_at_once_and_drops_the_record() -> None:
    rig = Rig(backends=[{"address": GOOD}], health={"failure_threshold": 1})
    link = rig.accept()
    rig.conductor.connect_failed(link, rig.path.attempts[link.connection_id])
    assert rig.core.statistics().backends[0].state is HealthState.UNHEALTHY
    refused = rig.accept()
    assert rig.path.calls[-1] == ("close", refused.connection_id, False)
    assert rig.recorder.dropped[-1] == (refused.connection_id, Outcome.NO_BACKEND)
    assert rig.conductor.links == {}


def test_out_of_resources_ends_the_client_without_blaming_the_backend_and_warns_once_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(health={"failure_threshold": 1})
    with caplog.at_level(logging.WARNING, logger=rig.logger.name):
        for _ in range(3):
            link = rig.accept()
            rig.conductor.out_of_resources(link, OSError(24, "Too many open files"))
            assert rig.path.calls[-1] == ("close", link.connection_id, True)
        clock.now += 1.0
        link = rig.accept()
        rig.conductor.out_of_resources(link, OSError(24, "Too many open files"))
    warnings = [r for r in caplog.records if "no socket" in r.getMessage()]
    assert [r.fields["connections"] for r in warnings] == [1, 3]  # type: ignore[attr-defined]
    assert all(b.state is HealthState.HEALTHY for b in rig.core.statistics().backends)
    assert {outcome for _, outcome in rig.recorder.dropped} == {Outcome.RESOURCE_EXHAUSTED}


def budget_of(connections: int) -> ConnectionBudget:
    return ConnectionBudget(
        descriptor_limit=256, reserved=40, per_connection=6, connections=connections
    )


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("accepting")]


def test_at_the_connection_limit_accepting_pauses_and_resumes_with_one_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(budget=budget_of(4))
    path = rig.path
    pauses = [("pause_accepting",)]
    with caplog.at_level(logging.INFO, logger=rig.logger.name):
        links = [rig.accept() for _ in range(4)]
        # Paused by the client that reached the limit, before the core saw it.
        assert [c for c in path.calls if c[0].endswith("accepting")] == pauses
        assert rig.conductor.accepting_paused
        for link in links:
            rig.connect(link)
        clock.now += 2.5
        # A close makes room: resume; the next waiting client fills it: pause again.
        rig.conductor.socket_failed(links[0], Side.CLIENT)
        assert path.calls[-1] == ("resume_accepting",)
        assert not rig.conductor.accepting_paused
        links[0] = rig.accept()
        assert path.calls[-2] == ("pause_accepting",)  # then its connect
        # Still one stretch: no second line until three quarters of the limit.
        assert messages(caplog) == ["accepting paused: connection limit reached"]
        for link in links[:2]:
            rig.conductor.socket_failed(link, Side.CLIENT)
    assert messages(caplog) == [
        "accepting paused: connection limit reached",
        "accepting resumed: below the connection limit",
    ]
    paused, resumed = (r for r in caplog.records if r.getMessage().startswith("accepting"))
    assert (paused.fields["open"], paused.fields["limit"]) == (4, 4)  # type: ignore[attr-defined]
    fields = resumed.fields  # type: ignore[attr-defined]
    assert (fields["seconds"], fields["pauses"], fields["accepted"], fields["open"]) == (
        2.5,
        2,
        1,
        2,
    )
    assert [c for c in path.calls if c[0].endswith("accepting")] == [
        ("pause_accepting",),
        ("resume_accepting",),
        ("pause_accepting",),
        ("resume_accepting",),
    ]


def test_a_connection_counts_until_the_path_releases_it_not_until_the_core_closes_it() -> None:
    # The tasks path closes a connection's sockets a moment after the core
    # closed it: until then its descriptors are still in use.
    rig = Rig(budget=budget_of(1))
    rig.path.release_at_once = False
    link = rig.accept()
    assert rig.path.calls[0] == ("pause_accepting",)
    rig.conductor.socket_failed(link, Side.CLIENT)
    assert rig.conductor.links == {}
    assert rig.path.calls[-1] != ("resume_accepting",)
    rig.conductor.released(link)
    assert rig.path.calls[-1] == ("resume_accepting",)
    rig.conductor.released(link)  # twice (after a bug): counted once
    assert rig.conductor.holding == 0


def test_failing_accepts_are_one_line_as_they_begin_and_one_as_accepts_work_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()  # no budget: the limit lowered from outside, descriptors used elsewhere
    with caplog.at_level(logging.INFO, logger=rig.logger.name):
        for _ in range(30):  # the path retries every ACCEPT_BACKOFF
            rig.conductor.accept_failed(OSError(24, "Too many open files"))
            clock.now += 0.1
        assert rig.conductor.accepting_paused
        rig.accept()
        rig.accept()
    assert messages(caplog) == [
        "accepting paused: accept failed",
        "accepting resumed: accepts work again",
    ]
    resumed = caplog.records[-1].fields  # type: ignore[attr-defined]
    assert (resumed["failures"], resumed["seconds"]) == (30, pytest.approx(3.0))
    assert not rig.conductor.accepting_paused
    assert rig.conductor.connection_limit == math.inf
    assert not [c for c in rig.path.calls if c[0].endswith("accepting")]


def limited(max_connections: int) -> dict[str, Any]:
    """The ``[listener]`` section with ``max_connections`` set."""
    return {"address": "127.0.0.1:0", "max_connections": max_connections}


def accepting_calls(rig: Rig) -> list[tuple[object, ...]]:
    return [c for c in rig.path.calls if c[0].endswith("accepting")]


def limit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The fields of each ``connection limit`` line."""
    return [
        getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "connection limit"
    ]


@pytest.mark.parametrize(
    ("budget", "max_connections", "limit", "limited_by"),
    [
        (None, 0, math.inf, ""),
        (None, 3, 3, "max_connections"),
        (budget_of(4), 0, 4, "descriptors"),
        (budget_of(4), 3, 3, "max_connections"),
        (budget_of(4), 4, 4, "max_connections"),  # a tie: the operator's limit is named
        (budget_of(4), 5, 4, "descriptors"),
    ],
)
def test_the_connection_limit_is_the_smaller_of_max_connections_and_the_budget(
    budget: ConnectionBudget | None, max_connections: int, limit: float, limited_by: str
) -> None:
    rig = Rig(budget=budget, listener=limited(max_connections))
    assert (rig.conductor.connection_limit, rig.conductor.limited_by) == (limit, limited_by)


def test_at_max_connections_accepting_pauses_and_the_lines_name_that_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(budget=budget_of(40), listener=limited(4))
    with caplog.at_level(logging.INFO, logger=rig.logger.name):
        rig.conductor.start()
        links = [rig.accept() for _ in range(4)]
        assert accepting_calls(rig) == [("pause_accepting",)]
        for link in links:
            rig.connect(link)
        for link in links[:2]:
            rig.conductor.socket_failed(link, Side.CLIENT)
    assert limit_lines(caplog) == [
        {
            "connections": 4,
            "limited_by": "max_connections",
            "max_connections": 4,
            "descriptor_connections": 40,
            "descriptor_limit": 256,
            "reserved": 40,
            "per_connection": 6,
        }
    ]
    paused, resumed = (r for r in caplog.records if r.getMessage().startswith("accepting"))
    assert paused.getMessage() == "accepting paused: connection limit reached"
    assert paused.fields == {  # type: ignore[attr-defined]
        "open": 4,
        "limit": 4,
        "limited_by": "max_connections",
        "max_connections": 4,
        "descriptor_limit": 256,
    }
    assert resumed.getMessage() == "accepting resumed: below the connection limit"
    assert resumed.fields["limited_by"] == "max_connections"  # type: ignore[attr-defined]
    assert accepting_calls(rig) == [("pause_accepting",), ("resume_accepting",)]


def test_at_the_descriptor_budget_the_lines_name_the_descriptors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(budget=budget_of(2), listener=limited(10))
    with caplog.at_level(logging.INFO, logger=rig.logger.name):
        rig.accept()
        rig.accept()
    (paused,) = (r for r in caplog.records if r.getMessage().startswith("accepting"))
    assert paused.fields["limited_by"] == "descriptors"  # type: ignore[attr-defined]
    assert paused.fields["max_connections"] == 10  # type: ignore[attr-defined]


def reload_max_connections(rig: Rig, max_connections: int) -> None:
    rig.conductor.reconfigure(
        parse_config(
            {
                "listener": limited(max_connections),
                "backends": [{"address": GOOD}, {"address": OTHER}],
            }
        )
    )


def test_a_reload_lowering_max_connections_pauses_at_once_and_cuts_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(budget=budget_of(40))
    links = [rig.accept() for _ in range(5)]
    for link in links:
        rig.connect(link)
    with caplog.at_level(logging.INFO, logger=rig.logger.name):
        reload_max_connections(rig, 3)  # fewer than are open
    assert (rig.conductor.connection_limit, rig.conductor.limited_by) == (3, "max_connections")
    assert rig.conductor.accepting_paused and accepting_calls(rig) == [("pause_accepting",)]
    assert len(rig.conductor.links) == 5, "lowering the limit cuts no connection"
    assert not [c for c in rig.path.calls if c[0] == "close"]
    assert messages(caplog) == ["accepting paused: connection limit reached"]
    # Still at or above the new limit: closes do not resume accepting...
    rig.conductor.socket_failed(links[0], Side.CLIENT)
    rig.conductor.socket_failed(links[1], Side.CLIENT)
    assert accepting_calls(rig) == [("pause_accepting",)]
    # ...below it, they do.
    rig.conductor.socket_failed(links[2], Side.CLIENT)
    assert accepting_calls(rig)[-1] == ("resume_accepting",)


def test_a_reload_raising_or_removing_max_connections_resumes_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(budget=budget_of(40), listener=limited(2))
    for _ in range(2):
        rig.connect(rig.accept())
    assert rig.conductor.accepting_paused
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=rig.logger.name):
        reload_max_connections(rig, 0)  # back to the descriptors' limit
    assert (rig.conductor.connection_limit, rig.conductor.limited_by) == (40, "descriptors")
    assert not rig.conductor.accepting_paused
    assert accepting_calls(rig) == [("pause_accepting",), ("resume_accepting",)]
    assert messages(caplog) == ["accepting resumed: below the connection limit"]
    # The new limit is logged, and a reload that leaves it alone says nothing.
    assert [fields["connections"] for fields in limit_lines(caplog)] == [40]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=rig.logger.name):
        reload_max_connections(rig, 0)
    assert limit_lines(caplog) == []


def test_the_timer_is_moved_no_later_than_the_core_s_lead() -> None:
    rig = Rig(timeouts={"connect": 0.25})
    timer = Timer()
    rig.conductor.timer = timer
    rig.accept()
    assert timer.deadline == pytest.approx(clock.now + rig.core.timer_lead())
    timer.deadline = clock.now + 0.01  # already sooner: left alone
    rig.accept()
    assert timer.deadline == pytest.approx(clock.now + 0.01)


def test_probes_and_stopping_go_to_the_lifecycle_s_hooks() -> None:
    rig = Rig(health={"active": True, "probe_interval": 1.0, "probe_timeout": 0.5})
    rig.conductor.start()
    clock.now += 1.0
    rig.conductor.handle_timer()
    assert sorted(rig.probes) == [(GOOD, 0.5), (OTHER, 0.5)]
    assert rig.probe_checks == [CONNECT_ONLY, CONNECT_ONLY]
    rig.conductor.probe_result(GOOD, ProbeFailure.REPLY_TIMEOUT)
    rig.conductor.probe_result(OTHER, None)
    assert rig.recorder.probe_results == [(GOOD, ProbeFailure.REPLY_TIMEOUT), (OTHER, None)]
    assert rig.core.statistics().backends[0].last_probe_ok is False
    link = rig.accept()
    rig.conductor.shutdown()
    assert rig.stopped_accepting == 1
    assert rig.stopped == 0  # one connection still in flight
    rig.connect(link)
    rig.conductor.socket_failed(link, Side.CLIENT)
    assert rig.stopped == 1


def test_second_shutdown_cuts_what_remains() -> None:
    rig = Rig()
    links = [rig.accept() for _ in range(2)]
    for link in links:
        rig.connect(link)
    rig.conductor.shutdown()
    rig.conductor.shutdown()
    assert rig.stopped == 1
    assert sorted(rig.recorder.dropped) == [(link.connection_id, Outcome.CUT) for link in links]
    assert rig.conductor.links == {}


def busy_then_quiet(
    idle: float, every: float, busy_for: float
) -> tuple[list[tuple[float, Outcome]], float]:
    """Move bytes every ``every`` s for ``busy_for`` s, then nothing.

    Returns when and how the connection closed, and when bytes last moved.
    """
    rig = Rig(backends=[{"address": GOOD}], timeouts={"idle": idle})
    link = rig.accept()
    rig.connect(link)
    start = clock.now
    step = every / 4  # the timer task wakes more often than bytes move
    ticks = 0
    last = 0.0
    while not rig.recorder.dropped and clock.now < start + busy_for + 2 * idle:
        ticks += 1
        clock.now = start + ticks * step
        rig.conductor.handle_timer()
        if not rig.recorder.dropped and clock.now <= start + busy_for and ticks % 4 == 0:
            rig.conductor.active(link)
            last = round(clock.now - start, 6)
    closed = [
        (round(output.at - start, 6), output.outcome)
        for output in rig.recorder.outputs
        if isinstance(output, ConnectionClosed)
    ]
    return closed, last


@pytest.mark.parametrize("idle", [0.001, 0.002, 0.05, 1.0])
def test_a_connection_moving_bytes_more_often_than_idle_stays_open(idle: float) -> None:
    every = 0.4 * idle
    closed, last = busy_then_quiet(idle, every=every, busy_for=5 * idle)
    # Open while bytes move; closed by the idle timeout once they stop, at
    # most the touch resolution early and one timer step late.
    assert len(closed) == 1
    at, outcome = closed[0]
    assert outcome is Outcome.IDLE_TIMEOUT
    assert last + idle - min(0.001, idle / 100) - 1e-9 <= at <= last + idle + every / 4 + 1e-9


def test_activity_is_told_to_the_core_once_per_touch_resolution() -> None:
    rig = Rig(timeouts={"idle": 10.0})
    link = rig.accept()
    rig.connect(link)
    touches: list[float] = []
    real_touch = rig.core.touch
    rig.core.touch = lambda connection_id, now: (
        touches.append(now),
        real_touch(connection_id, now),
    )  # type: ignore[method-assign]
    for _ in range(5):
        rig.conductor.active(link)  # the same instant: told once
    clock.now += rig.core.touch_resolution
    rig.conductor.active(link)
    assert touches == [pytest.approx(1000.0), pytest.approx(1000.0 + rig.core.touch_resolution)]


def test_final_figures_wait_for_both_the_core_and_the_path() -> None:
    # On the tasks path the sockets close a moment after the core's close:
    # the listeners get the record once both have happened, whichever is last.
    rig = Rig()
    rig.path.release_at_once = False
    link = rig.accept()
    rig.connect(link)
    rig.conductor.socket_failed(link, Side.CLIENT)
    assert rig.conductor.links == {}  # out of the table at once
    assert rig.recorder.dropped == []  # but a copy may still move its last bytes
    rig.conductor.released(link)
    rig.conductor.released(link)  # a second release (a close after a bug) counts once
    assert rig.recorder.dropped == [(link.connection_id, Outcome.CLIENT_RESET)]
