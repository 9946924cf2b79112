"""Process draining: how a load balancer stops without dropping what it carries.

Theory of operation
===================

::

    RUNNING --SHUTDOWN, nothing in flight--> STOPPED
    RUNNING --SHUTDOWN--> DRAINING          (stop accepting; deadline = now + drain)
    DRAINING --IDLE (last connection ended)--> STOPPED
    DRAINING --DEADLINE or a second SHUTDOWN--> STOPPED (cut what remains)

On the first shutdown request (SIGTERM or SIGINT) the listener closes at once
so new connects are refused by the kernel, and connections in flight run on.
The process stops when the last one ends, or at the drain deadline, when the
rest are cut and counted. A second request cuts them at once: an operator who
asks twice means it. Shutdown requests once stopped change nothing.

Each rule also says what it emits (a :class:`ProcessStep`): the first
request stops accepting and announces the drain (``ShutdownStarted``), and
the stop is announced (``ShutdownFinished``, with the count cut) when it
happens.

The machine is :data:`TRANSITIONS`; a pair missing from it raises
:class:`StateMachineError`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from ._errors import StateMachineError
from ._events import Output, ShutdownFinished, ShutdownStarted, StopAccepting

__all__ = ["TRANSITIONS", "ProcessInput", "ProcessLifecycle", "ProcessState", "ProcessStep"]


class ProcessState(enum.Enum):
    __hash__ = object.__hash__  # identity hashing in C; see _health.HealthState

    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class ProcessInput(enum.Enum):
    __hash__ = object.__hash__

    SHUTDOWN = "shutdown"
    IDLE = "idle"
    """Nothing is in flight any more."""
    DEADLINE = "deadline"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessStep:
    """What one rule of :data:`TRANSITIONS` did.

    ``cut``: the owner must close every connection still open, *then* carry
    out ``outputs`` (a ``ShutdownFinished`` that counts the cut comes after
    their closes).
    """

    cut: bool
    outputs: tuple[Output, ...]


class ProcessLifecycle:
    """The process-level state; ``ProxyCore`` feeds it and carries out the result."""

    __slots__ = ("deadline", "drain_timeout", "state")

    def __init__(self, drain_timeout: float) -> None:
        self.drain_timeout = drain_timeout
        self.state = ProcessState.RUNNING
        self.deadline: float | None = None

    @property
    def accepting(self) -> bool:
        return self.state is ProcessState.RUNNING

    def handle(self, process_input: ProcessInput, now: float, in_flight: int) -> ProcessStep:
        """Apply an input with ``in_flight`` connections open; return what to do."""
        rule = TRANSITIONS.get((self.state, process_input))
        if rule is None:
            raise StateMachineError(
                f"process: can't handle {process_input.name} when state={self.state.name}"
            )
        return rule(self, now, in_flight)


Rule = Callable[[ProcessLifecycle, float, int], ProcessStep]

_NOTHING = ProcessStep(cut=False, outputs=())


def _begin(process: ProcessLifecycle, now: float, in_flight: int) -> ProcessStep:
    if in_flight == 0:
        process.state = ProcessState.STOPPED
        return ProcessStep(
            cut=False,
            outputs=(
                StopAccepting(),
                ShutdownStarted(at=now, in_flight=0, deadline=now),
                ShutdownFinished(at=now, cut=0),
            ),
        )
    process.state = ProcessState.DRAINING
    process.deadline = deadline = now + process.drain_timeout
    return ProcessStep(
        cut=False,
        outputs=(StopAccepting(), ShutdownStarted(at=now, in_flight=in_flight, deadline=deadline)),
    )


def _drained(process: ProcessLifecycle, now: float, in_flight: int) -> ProcessStep:
    process.state = ProcessState.STOPPED
    process.deadline = None
    return ProcessStep(cut=False, outputs=(ShutdownFinished(at=now, cut=0),))


def _cut(process: ProcessLifecycle, now: float, in_flight: int) -> ProcessStep:
    process.state = ProcessState.STOPPED
    process.deadline = None
    return ProcessStep(cut=True, outputs=(ShutdownFinished(at=now, cut=in_flight),))


def _ignore(process: ProcessLifecycle, now: float, in_flight: int) -> ProcessStep:
    return _NOTHING


_R, _D, _S = ProcessState.RUNNING, ProcessState.DRAINING, ProcessState.STOPPED
_I = ProcessInput

TRANSITIONS: dict[tuple[ProcessState, ProcessInput], Rule] = {
    (_R, _I.SHUTDOWN): _begin,
    (_D, _I.IDLE): _drained,
    (_D, _I.DEADLINE): _cut,
    (_D, _I.SHUTDOWN): _cut,
    (_S, _I.SHUTDOWN): _ignore,
}
"""Every legal ``(state, input)`` pair and the rule it runs."""
