"""A timer queue for many deadlines that mostly arrive in order.

A connection's deadlines are ``now + constant``: the connect timeout while it
connects, the idle timeout after that. Filed as they happen, each kind comes
in nondecreasing order, so a FIFO *lane* per kind holds it with O(1) push and
pop, where one heap for all would pay O(log n) tuple comparisons on every
operation (with a busy simulator, ``heappop`` on a heap of stale entries was
its single largest cost). An entry that arrives out of order for its lane (an
idle deadline re-filed from older activity, a driver clock that stepped back)
goes to a small heap instead, so order is always exact.

Entries are ``(due, key)``; whether an entry is still wanted is the owner's
business (lazy deletion): it peeks, drops the stale heads, and pops the rest.
"""

from __future__ import annotations

import heapq
from collections import deque

__all__ = ["TimerQueue"]


class TimerQueue:
    __slots__ = ("_head", "_heap", "_lanes", "_sequence")

    def __init__(self, lanes: int) -> None:
        self._lanes: tuple[deque[tuple[float, int]], ...] = tuple(deque() for _ in range(lanes))
        self._heap: list[tuple[float, int, int]] = []
        self._sequence = 0
        self._head: deque[tuple[float, int]] | None = None
        """The lane whose head :meth:`peek` last found earliest (None: the heap
        or unknown), so the :meth:`pop` that usually follows needs no search."""

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes) + len(self._heap)

    def push(self, due: float, key: int, lane: int) -> None:
        self._head = None
        queue = self._lanes[lane]
        if not queue or queue[-1][0] <= due:
            queue.append((due, key))
        else:
            self._sequence += 1
            heapq.heappush(self._heap, (due, self._sequence, key))

    def peek(self) -> tuple[float, int] | None:
        """The earliest ``(due, key)``, or None when empty."""
        best: tuple[float, int] | None = None
        source: deque[tuple[float, int]] | None = None
        for queue in self._lanes:
            if queue and (best is None or queue[0][0] < best[0]):
                best = queue[0]
                source = queue
        heap = self._heap
        if heap and (best is None or heap[0][0] < best[0]):
            best = (heap[0][0], heap[0][2])
            source = None
        self._head = source
        return best

    def pop(self) -> tuple[float, int]:
        """Remove and return the earliest ``(due, key)``; IndexError when empty."""
        head = self._head
        if head is not None:
            self._head = None
            return head.popleft()
        source: deque[tuple[float, int]] | None = None
        due = 0.0
        for queue in self._lanes:
            if queue and (source is None or queue[0][0] < due):
                source, due = queue, queue[0][0]
        heap = self._heap
        if heap and (source is None or heap[0][0] < due):
            entry = heapq.heappop(heap)
            return entry[0], entry[2]
        if source is None:
            raise IndexError("pop from an empty TimerQueue")
        return source.popleft()
