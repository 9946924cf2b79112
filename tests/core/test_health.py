"""The health state machine: every row of its table, then properties over random inputs."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loble.core import HealthInput, HealthState, StateMachineError
from loble.core._health import TRANSITIONS, BackendHealth, Thresholds

H, D, U = HealthState.HEALTHY, HealthState.DRAINING, HealthState.UNHEALTHY
In = HealthInput


def make(
    state: HealthState = H,
    *,
    active: int = 0,
    failures: int = 0,
    successes: int = 0,
    failure_threshold: int = 3,
    success_threshold: int = 2,
) -> BackendHealth:
    health = BackendHealth(
        "10.0.0.1:80",
        Thresholds(failure_threshold=failure_threshold, success_threshold=success_threshold),
    )
    health.state = state
    health.active_connections = active
    health.consecutive_failures = failures
    health.consecutive_successes = successes
    return health


# -- every row of the table ---------------------------------------------------------

# (state, input, setup, expected state, expected (active, failures, successes))
ROWS = [
    (H, In.CONNECTION_STARTED, {}, H, (1, 0, 0)),
    (H, In.CONNECTION_FINISHED, {"active": 2}, H, (1, 0, 0)),
    (H, In.PASSIVE_SUCCESS, {"failures": 2}, H, (0, 0, 1)),
    (H, In.PASSIVE_FAILURE, {"successes": 5}, H, (0, 1, 0)),
    (H, In.PROBE_SUCCESS, {"failures": 2}, H, (0, 0, 1)),
    (H, In.PROBE_FAILURE, {"failures": 1}, H, (0, 2, 0)),
    (D, In.CONNECTION_FINISHED, {"active": 2}, D, (1, 0, 0)),
    # A passive success while draining neither counts nor breaks the probe run.
    (D, In.PASSIVE_SUCCESS, {"active": 1, "failures": 3, "successes": 1}, D, (1, 3, 1)),
    (D, In.PASSIVE_FAILURE, {"active": 1, "successes": 1}, D, (1, 1, 0)),
    (D, In.PROBE_SUCCESS, {"active": 1, "failures": 3}, D, (1, 0, 1)),
    (D, In.PROBE_FAILURE, {"active": 1}, D, (1, 1, 0)),
    # In panic ([balancer] panic_threshold) every backend takes connections:
    # they count, and a success there is no evidence either way.
    (D, In.CONNECTION_STARTED, {"active": 1}, D, (2, 0, 0)),
    (U, In.CONNECTION_STARTED, {}, U, (1, 0, 0)),
    (U, In.CONNECTION_FINISHED, {"active": 2}, U, (1, 0, 0)),
    (U, In.PASSIVE_SUCCESS, {"active": 1, "failures": 1, "successes": 1}, U, (1, 1, 1)),
    (U, In.PASSIVE_FAILURE, {"successes": 1}, U, (0, 1, 0)),
    (U, In.PROBE_SUCCESS, {}, U, (0, 0, 1)),
    (U, In.PROBE_FAILURE, {"successes": 1}, U, (0, 1, 0)),
]


@pytest.mark.parametrize(("state", "health_input", "setup", "expected", "counters"), ROWS)
def test_row_without_transition(
    state: HealthState,
    health_input: HealthInput,
    setup: dict[str, int],
    expected: HealthState,
    counters: tuple[int, int, int],
) -> None:
    health = make(state, **setup)
    assert health.handle(health_input) is None
    assert health.state is expected
    assert (
        health.active_connections,
        health.consecutive_failures,
        health.consecutive_successes,
    ) == counters


def test_rows_cover_the_whole_table() -> None:
    assert {(state, health_input) for state, health_input, *_ in ROWS} | {
        (D, In.CONNECTION_FINISHED),
        (D, In.PROBE_SUCCESS),
        (U, In.PROBE_SUCCESS),
    } == set(TRANSITIONS)


@pytest.mark.parametrize("health_input", [In.PASSIVE_FAILURE, In.PROBE_FAILURE])
def test_healthy_with_connections_drains_at_the_threshold(health_input: HealthInput) -> None:
    health = make(active=2, failures=2)
    transition = health.handle(health_input)
    assert transition is not None
    assert (transition.old, transition.new) == (H, D)
    assert "3 consecutive failures, 2 active" in transition.reason
    assert health.active_connections == 2


@pytest.mark.parametrize("health_input", [In.PASSIVE_FAILURE, In.PROBE_FAILURE])
def test_healthy_without_connections_goes_straight_to_unhealthy(
    health_input: HealthInput,
) -> None:
    health = make(failures=2)
    transition = health.handle(health_input)
    assert transition is not None
    assert (transition.old, transition.new) == (H, U)
    # Entering UNHEALTHY resets both counts: recovery starts from scratch.
    assert (health.consecutive_failures, health.consecutive_successes) == (0, 0)


def test_draining_becomes_unhealthy_when_the_last_connection_finishes() -> None:
    health = make(D, active=1, failures=4, successes=1)
    transition = health.handle(In.CONNECTION_FINISHED)
    assert transition is not None
    assert (transition.old, transition.new, transition.reason) == (
        D,
        U,
        "drained: last active connection finished",
    )
    assert (health.consecutive_failures, health.consecutive_successes) == (0, 0)


def test_draining_recovers_after_success_threshold_probe_successes_keeping_its_connections() -> (
    None
):
    health = make(D, active=3, failures=3, successes=1)
    transition = health.handle(In.PROBE_SUCCESS)
    assert transition is not None
    assert (transition.old, transition.new, transition.reason) == (
        D,
        H,
        "2 consecutive probe successes while draining, 3 active kept",
    )
    assert (health.active_connections, health.consecutive_failures) == (3, 0)
    # Back in the snapshot with its connections: they finish there as any others.
    assert health.handle(In.CONNECTION_FINISHED) is None
    assert (health.state, health.active_connections) == (H, 2)


def test_a_failure_while_draining_breaks_the_probe_run() -> None:
    health = make(D, active=1, success_threshold=2)
    for health_input in (In.PROBE_SUCCESS, In.PASSIVE_FAILURE, In.PROBE_SUCCESS):
        assert health.handle(health_input) is None
    assert health.handle(In.PASSIVE_SUCCESS) is None  # no evidence: no count
    transition = health.handle(In.PROBE_SUCCESS)
    assert transition is not None
    assert (transition.old, transition.new) == (D, H)


def test_unhealthy_recovers_after_success_threshold_probe_successes() -> None:
    health = make(U, successes=1)
    transition = health.handle(In.PROBE_SUCCESS)
    assert transition is not None
    assert (transition.old, transition.new) == (U, H)
    assert transition.reason == "2 consecutive probe successes"


# -- no illegal pairs --------------------------------------------------------------------


def test_every_state_takes_every_input() -> None:
    # Once, a draining or unhealthy backend could not start a connection (it
    # is out of the snapshot); panic mode puts it back in, so the table is
    # whole, and the connection machine's table is where an input can be
    # out of place.
    assert set(TRANSITIONS) == set(itertools.product(HealthState, HealthInput))


def test_an_unhealthy_backend_in_panic_comes_back_by_probes_only() -> None:
    health = make(U, success_threshold=1)
    assert health.handle(In.CONNECTION_STARTED) is None
    assert health.handle(In.PASSIVE_SUCCESS) is None
    assert health.state is U
    transition = health.handle(In.PROBE_SUCCESS)
    assert transition is not None and (transition.old, transition.new) == (U, H)
    assert health.active_connections == 1  # its panic connection kept


def test_finishing_a_connection_that_never_started_is_an_error() -> None:
    with pytest.raises(StateMachineError, match="no active connection"):
        make(H).handle(In.CONNECTION_FINISHED)


def test_thresholds_below_one_are_rejected() -> None:
    with pytest.raises(ValueError):
        Thresholds(failure_threshold=0)


def test_repr_shows_the_counters() -> None:
    assert "state=DRAINING, active=1, failures=2" in repr(make(D, active=1, failures=2))


# -- properties over random input sequences -------------------------------------------

LEGAL_STEPS = st.lists(st.sampled_from(list(HealthInput)), max_size=200)


def run_legal(health: BackendHealth, inputs: list[HealthInput]) -> list[tuple[object, ...]]:
    """Feed the inputs a real driver could send; skip the ones the design forbids.

    Returns (input, transition, (state, active, failures, successes) before, active
    after) for each applied step.
    """
    trace: list[tuple[object, ...]] = []
    for health_input in inputs:
        if (health.state, health_input) not in TRANSITIONS:
            continue
        if health_input is In.CONNECTION_FINISHED and health.active_connections == 0:
            continue
        before = (
            health.state,
            health.active_connections,
            health.consecutive_failures,
            health.consecutive_successes,
        )
        transition = health.handle(health_input)
        trace.append((health_input, transition, before, health.active_connections))
        assert health.active_connections >= 0
    return trace


@given(
    LEGAL_STEPS,
    st.integers(min_value=1, max_value=5),
    st.integers(min_value=1, max_value=5),
)
def test_no_transition_without_a_full_run_of_consecutive_outcomes(
    inputs: list[HealthInput], failure_threshold: int, success_threshold: int
) -> None:
    health = make(failure_threshold=failure_threshold, success_threshold=success_threshold)
    # The last `threshold` outcome inputs before each transition out of HEALTHY
    # must all be failures; back into it, from DRAINING or UNHEALTHY, the last
    # `success_threshold` outcomes seen since it went out must all be probe
    # successes (a passive success while out is no evidence: not an outcome).
    outcomes: list[HealthInput] = []
    since_out: list[HealthInput] = []
    for health_input, transition, (old, *_rest), _after in run_legal(health, inputs):
        if health_input in (
            In.PASSIVE_SUCCESS,
            In.PASSIVE_FAILURE,
            In.PROBE_SUCCESS,
            In.PROBE_FAILURE,
        ):
            outcomes.append(health_input)
            if old is not H and health_input is not In.PASSIVE_SUCCESS:
                since_out.append(health_input)
        if transition is None:
            continue
        if transition.old is H:
            tail = outcomes[-failure_threshold:]
            assert len(tail) == failure_threshold
            assert all(o in (In.PASSIVE_FAILURE, In.PROBE_FAILURE) for o in tail)
        if transition.new is H:
            tail = since_out[-success_threshold:]
            assert len(tail) == success_threshold
            assert all(o is In.PROBE_SUCCESS for o in tail)
            assert transition.old in (D, U)
        if transition.old is H or transition.new is U:
            since_out = []  # gone out, or drained: the run starts again


@given(
    st.lists(st.sampled_from([*HealthInput, *[In.PROBE_SUCCESS] * 3]), max_size=200),
    st.integers(min_value=1, max_value=5),
)
def test_draining_recovers_exactly_at_the_run_and_keeps_every_connection(
    inputs: list[HealthInput], success_threshold: int
) -> None:
    # Probe successes weighted up, so runs long enough to recover happen often.
    health = make(failure_threshold=1, success_threshold=success_threshold)
    run = 0  # probe successes since the last failure, while DRAINING
    for health_input, transition, (old, active, *_rest), active_after in run_legal(health, inputs):
        if old is D and health_input is In.PROBE_SUCCESS:
            run += 1
        elif health_input in (In.PASSIVE_FAILURE, In.PROBE_FAILURE) or old is not D:
            run = 0
        recovered = transition is not None and (transition.old, transition.new) == (D, H)
        assert recovered is (old is D and run == success_threshold)
        if recovered:
            assert active_after == active > 0
            run = 0


@given(LEGAL_STEPS)
def test_never_leaves_draining_with_active_connections(inputs: list[HealthInput]) -> None:
    health = make()
    for _input, transition, (_old, active, *_rest), active_after in run_legal(health, inputs):
        if transition is not None and transition.old is D:
            # Drained, or recovered with every connection it had.
            if transition.new is U:
                assert (active, active_after) == (1, 0)
            else:
                assert (transition.new, active_after) == (H, active)
        if transition is not None and transition.new is U:
            assert active_after == 0


@given(LEGAL_STEPS)
def test_active_count_returns_to_zero_when_every_connection_finishes(
    inputs: list[HealthInput],
) -> None:
    health = make()
    run_legal(health, inputs)
    while health.active_connections:
        health.handle(In.CONNECTION_FINISHED)
    assert health.state in (H, U)
