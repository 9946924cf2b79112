"""The timer queue: exact order whichever lane or heap an entry lands in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loble.core._timers import TimerQueue


def test_lanes_and_heap_merge_in_due_order() -> None:
    queue = TimerQueue(lanes=2)
    queue.push(5.0, 1, lane=0)
    queue.push(300.0, 2, lane=1)
    queue.push(6.0, 3, lane=0)
    queue.push(4.0, 4, lane=0)  # out of order for its lane: goes to the heap
    assert len(queue) == 4
    assert queue.peek() == (4.0, 4)
    assert [queue.pop() for _ in range(4)] == [(4.0, 4), (5.0, 1), (6.0, 3), (300.0, 2)]
    assert queue.peek() is None
    with pytest.raises(IndexError):
        queue.pop()


@given(st.lists(st.tuples(st.floats(0, 1e6), st.integers(0, 2)), max_size=200))
def test_pops_come_out_sorted(entries: list[tuple[float, int]]) -> None:
    queue = TimerQueue(lanes=3)
    for key, (due, lane) in enumerate(entries):
        queue.push(due, key, lane)
    popped = [queue.pop()[0] for _ in range(len(entries))]
    assert popped == sorted(due for due, _ in entries)


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.floats(0, 1e3), st.integers(0, 1)),
            st.tuples(st.just("peek"), st.just(0.0), st.just(0)),
            st.tuples(st.just("pop"), st.just(0.0), st.just(0)),
        ),
        max_size=200,
    )
)
def test_interleaved_peek_push_pop_keep_order(operations: list[tuple[str, float, int]]) -> None:
    # pop() trusts the lane peek() found earliest unless a push came between:
    # check it against a plain sorted list under any interleaving.
    queue = TimerQueue(lanes=2)
    model: list[float] = []
    for key, (operation, due, lane) in enumerate(operations):
        if operation == "push":
            queue.push(due, key, lane)
            model.append(due)
            model.sort()
        elif operation == "peek":
            head = queue.peek()
            assert (head[0] if head else None) == (model[0] if model else None)
        elif model:
            assert queue.pop()[0] == model.pop(0)
        else:
            with pytest.raises(IndexError):
                queue.pop()
    assert len(queue) == len(model)
