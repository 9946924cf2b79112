"""`loble demo`'s live view, rendered from a state to a recording console, and its pure parts."""

from __future__ import annotations

import itertools
import re

from rich.console import Console

from loble.core import (
    AdminState,
    AdminStateChanged,
    BackendStateChanged,
    HealthState,
    ShutdownFinished,
    SnapshotPublished,
    StopAccepting,
    WeightChanged,
)
from loble.io._demo import PerSecond, plan
from loble.io._demo_view import (
    EVENT_LINES,
    HISTORY_SECONDS,
    BackendView,
    ClientView,
    DemoState,
    Happening,
    describe,
    render,
    sparkline,
)

NAMES = {"127.0.0.1:9101": "backend-1", "127.0.0.1:9102": "backend-2"}


def screen(state: DemoState, width: int = 120) -> str:
    console = Console(record=True, width=width, height=50, color_system=None)
    console.print(render(state))
    return console.export_text()


def backend(name: str, **fields: object) -> BackendView:
    values: dict[str, object] = {
        "name": name,
        "address": f"127.0.0.1:910{name[-1]}",
        "health": "healthy",
        "admin": "ready",
        "weight": 5,
        "active": 0,
        "total": 0,
        **fields,
    }
    return BackendView(**values)  # type: ignore[arg-type]


def state(**fields: object) -> DemoState:
    values: dict[str, object] = {
        "uptime": 12.4,
        "listen": "127.0.0.1:9000",
        "algorithm": "round_robin",
        "process": "running",
        "snapshot_version": 2,
        "eligible": ("backend-1", "backend-3"),
        "in_flight": 3,
        "backends": (
            backend("backend-1", weight=10, active=2, total=120, rates=(4, 5, 6)),
            backend("backend-2", health="unhealthy", total=40, rates=(3, 0, 0), server_up=False),
            backend("backend-3", admin="drain", total=41, rates=(2, 3, 1)),
        ),
        "client": ClientView(
            rate=10,
            answered=201,
            failed=2,
            by_backend=(("backend-1", 120), ("backend-2", 40), ("backend-3", 41)),
            answered_rates=(9, 10, 10),
            failed_rates=(0, 2, 0),
        ),
        "happenings": (
            Happening(at=5.0, text="demo stops backend-2's server (1 connections reset)"),
            Happening(at=5.9, text="backend-2 healthy → unhealthy: 3 consecutive failures"),
            Happening(at=5.9, text="snapshot v2: backend-1, backend-3"),
        ),
        "next_step": "start backend-2's server in 3 s",
        "admin_url": "http://127.0.0.1:9091/",
        "metrics_url": "http://127.0.0.1:9090/metrics",
        **fields,
    }
    return DemoState(**values)  # type: ignore[arg-type]


def row(text: str, name: str) -> list[str]:
    """The cells of a backend's row, split on runs of spaces."""
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return re.split(r"\s{1,}", line.strip())


def test_sparkline_heights() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7, 8]) == " ▁▂▃▄▅▆▇█"
    assert sparkline([1, 2], top=8) == "▁▂"
    assert sparkline([9, 16], top=8) == "██"  # above the top: the top
    assert sparkline([0.1]) == "█"
    assert sparkline([]) == ""
    assert sparkline([0, 0]) == "  "  # no traffic draws nothing
    assert sparkline([3, -1], top=0) == "  "


def test_every_backend_row_shows_server_health_admin_and_figures() -> None:
    text = screen(state())
    assert row(text, "backend-1")[:9] == [
        "backend-1",
        "127.0.0.1:9101",
        "up",
        "healthy",
        "ready",
        "10",
        "2",
        "120",
        "6",
    ]
    assert row(text, "backend-2")[2:5] == ["down", "unhealthy", "ready"]
    assert row(text, "backend-3")[2:5] == ["up", "healthy", "drain"]


def test_sparklines_share_one_scale_newest_at_the_right() -> None:
    text = screen(state())
    # backend-1's 6 is the highest of every backend: a full block, last.
    assert row(text, "backend-1")[-1] == "▆▇█"  # 4, 5, 6 of 6
    assert row(text, "backend-2")[-1] == "▄"  # then two seconds of nothing
    line = next(line for line in text.splitlines() if line.startswith("backend-2 "))
    assert line.rstrip().endswith("▄")  # the blanks are there, trailing
    assert f"last {HISTORY_SECONDS} s" in text


def test_header_says_where_to_look_and_what_comes_next() -> None:
    text = screen(state())
    assert "127.0.0.1:9000 · round_robin · running, up 12 s · 3 in flight" in text
    assert "v2: backend-1, backend-3 (2 of 3 eligible)" in text
    assert "curl http://127.0.0.1:9000/" in text
    assert "status page http://127.0.0.1:9091/" in text
    assert "start backend-2's server in 3 s · Ctrl-C drains and exits" in text
    assert "drains in" not in text
    assert "drains in 7 s" in screen(state(ends_in=7.2))
    assert "no backend eligible (0 of 3" in screen(state(eligible=()))


def test_header_while_draining_and_stopped() -> None:
    draining = screen(state(process="draining"))
    assert "draining: waiting for the connections in flight" in draining
    assert "Ctrl-C" not in draining
    assert "stopped" in screen(state(process="stopped"))


def test_events_panel_shows_the_latest_in_order() -> None:
    text = screen(state())
    for happening in state().happenings:
        assert happening.text in text
    assert text.index("5.0 s demo stops") < text.index("5.9 s backend-2 healthy → unhealthy")
    many = tuple(Happening(at=float(n), text=f"event #{n:02d}") for n in range(20))
    text = screen(state(happenings=many))
    shown = [n for n in range(20) if f"event #{n:02d}" in text]
    assert shown == list(range(20 - EVENT_LINES, 20))
    assert "no event yet" in screen(state(happenings=()))


def test_clients_panel_counts_answers_failures_and_shares() -> None:
    text = screen(state())
    assert re.search(r"answered\s+201", text)
    assert re.search(r"failed\s+2", text)
    assert re.search(r"backend-1\s+120\s+60%", text)
    assert "clients, 10 requests/s" in text
    idle = screen(state(client=ClientView(rate=0)))
    assert re.search(r"answered\s+0", idle)


def test_a_narrow_terminal_keeps_names_and_states_whole() -> None:
    text = screen(state(), width=80)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert row(text, "backend-2")[:5] == [
        "backend-2",
        "127.0.0.1:9102",
        "down",
        "unhealthy",
        "ready",
    ]
    # the traffic column gives way, and the newest second stays
    assert row(text, "backend-1")[-1].endswith("█")


def test_describe_the_core_events() -> None:
    changed = BackendStateChanged(
        at=105.9,
        address="127.0.0.1:9102",
        old=HealthState.HEALTHY,
        new=HealthState.UNHEALTHY,
        reason="3 consecutive failures",
    )
    happening = describe(changed, NAMES, started=100.0)
    assert happening is not None
    assert happening.text == "backend-2 healthy → unhealthy: 3 consecutive failures"
    assert abs(happening.at - 5.9) < 1e-9 and "red" in happening.style
    snapshot = SnapshotPublished(at=100.0, version=3, addresses=("127.0.0.1:9101", "10.0.0.9:80"))
    assert _text(snapshot) == "snapshot v3: backend-1, 10.0.0.9:80"
    assert _text(SnapshotPublished(at=100.0, version=4, addresses=())) == (
        "snapshot v4: no backend eligible"
    )
    drain = AdminStateChanged(
        at=101.0, address="127.0.0.1:9101", old=AdminState.READY, new=AdminState.DRAIN
    )
    assert _text(drain) == "backend-1 admin ready → drain"
    weight = WeightChanged(at=101.0, address="127.0.0.1:9101", old=10, new=1)
    assert _text(weight) == "backend-1 weight 10 → 1"
    assert _text(ShutdownFinished(at=109.0, cut=0)) == "shutdown finished, 0 connections cut"
    assert describe(StopAccepting(), NAMES, 100.0) is None


def _text(output: object) -> str:
    happening = describe(output, NAMES, 100.0)  # type: ignore[arg-type]
    assert happening is not None
    return happening.text


def test_per_second_counts_whole_seconds_and_forgets_old_ones() -> None:
    counts = PerSecond(start=10.0, keep=3)
    assert counts.series(10.5) == ()
    counts.add(10.2)
    counts.add(10.9, 2)
    counts.add(11.1)
    assert counts.series(11.5) == (3,)  # the second under way is not shown
    assert counts.series(13.0) == (3, 1, 0)
    assert counts.series(100.0) == (0, 0, 0)
    counts.add(100.2)
    assert counts.series(101.0) == (0, 0, 1)


def test_plan_breaks_then_drains_a_different_backend_each_round() -> None:
    steps = list(itertools.islice(plan(every=10.0, first=5.0, backends=3), 8))
    assert [(step.at, step.action, step.backend) for step in steps] == [
        (5.0, "stop", 1),
        (8.0, "start", 1),
        (10.0, "drain", 2),
        (12.5, "ready", 2),
        (15.0, "stop", 2),
        (18.0, "start", 2),
        (20.0, "drain", 0),
        (22.5, "ready", 0),
    ]
    assert list(plan(every=0.0, first=5.0, backends=3)) == []
    assert list(plan(every=10.0, first=5.0, backends=0)) == []
    one = list(itertools.islice(plan(every=4.0, first=0.0, backends=1), 4))
    assert {step.backend for step in one} == {0}
