"""Readiness callbacks in an epoll set, and the event loop that polls them itself.

The callback data path (:mod:`._callbacks`) registers a few callbacks per
connection and is woken twice per proxied request, so what registering and
waking cost is a large part of Loble's CPU per request. asyncio's own
``add_reader``/``remove_reader`` spend several microseconds of Python per
call (transport checks, a selector key, a handle), and every wakeup goes
through its ready queue (a handle, ``Handle._run``, ``contextvars``).

:class:`Readiness` is the cheaper registry: registering is a dict update and
at most one ``epoll_ctl``; a wakeup is one call of the registered function.
It lives in one of two places:

* **in the loop's own epoll set** (:func:`new_event_loop`, what ``loble
  run`` uses on asyncio): :class:`ReadinessSelector` is the loop's selector;
  one ``epoll_wait`` per loop iteration returns the loop's events and
  Loble's, and Loble's callbacks run straight from ``select``. No second
  system call, no handle per wakeup. When only Loble's descriptors were
  ready, ``select`` polls again itself instead of returning, until the
  loop has work (a callback, a stop, a timer due) or one of its own
  descriptors is ready: a loop turn is a dozen Python calls (issue 16:
  ``bench/calls.py`` keep-alive 48.4 calls a request before, 26.3 after);
* **in a private epoll set** (:class:`PrivateEpoll`) whose descriptor is a
  single reader of any other loop (uvloop, or a loop someone else made, as
  in the test suite): two ``epoll_wait`` per wakeup, but still no
  per-callback registration cost.

Timers, signals and the metrics endpoint stay on the loop's usual API either
way.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import select
import selectors
from collections.abc import Callable
from time import monotonic as _monotonic
from typing import Any

__all__ = [
    "EPOLL_AVAILABLE",
    "PrivateEpoll",
    "Readiness",
    "ReadinessSelector",
    "new_event_loop",
    "readiness_for",
]

EPOLL_AVAILABLE = hasattr(select, "epoll")

_EPOLLIN = getattr(select, "EPOLLIN", 1)
_EPOLLOUT = getattr(select, "EPOLLOUT", 4)
_EPOLLERR = getattr(select, "EPOLLERR", 8)
_HANGUP = _EPOLLERR | getattr(select, "EPOLLHUP", 16)
_READABLE = _EPOLLIN | _HANGUP
_WRITABLE = _EPOLLOUT | _HANGUP

Callback = Callable[..., object]


class Readiness:
    """Readiness callbacks on an epoll set: the loop's ``add_reader`` API, cheaper.

    The same four methods as the loop's (``add_reader``...), plus
    :meth:`watch` for errors on a socket nobody reads or writes. Whoever
    polls the set hands the events to :meth:`dispatch`. A callback that
    raises is reported to the loop's exception handler (as a loop callback
    would be) and the rest of the batch still runs.
    """

    def __init__(self, epoll: select.epoll, loop: asyncio.AbstractEventLoop | None) -> None:
        self._epoll = epoll
        self.loop = loop
        """Where a failing callback is reported; set once the loop exists."""
        self._readers: dict[int, tuple[Callback, tuple[Any, ...]]] = {}
        self._writers: dict[int, tuple[Callback, tuple[Any, ...]]] = {}
        self._hangups: dict[int, tuple[Callback, tuple[Any, ...]]] = {}
        self._masks: dict[int, int] = {}
        """What each registered fd is registered for; 0 when only watched for hangups."""
        self._removed: set[int] = set()
        self.deferred: list[tuple[Callback, tuple[Any, ...]]] = []
        """Calls to make once the next batch's callbacks have run (:meth:`defer`)."""
        self.defers = False
        """Whether :meth:`defer` is honoured: only where the poller flushes (see
        :class:`ReadinessSelector`); elsewhere a caller does at once what it would defer."""

    def defer(self, callback: Callback, *args: Any) -> None:
        """Call ``callback(*args)`` after the callbacks of the next poll's batch.

        The poll after a deferral does not wait (its timeout is 0), so a
        deferred call runs within one loop turn. What it is for: the half-close
        of a side whose peer may close in the meantime (then the call finds the
        connection closed and does nothing, one system call less).
        """
        self.deferred.append((callback, args))

    def registered(self, fd: int) -> bool:
        return fd in self._masks

    def add_reader(self, fd: int, callback: Callback, *args: Any) -> None:
        self._readers[fd] = (callback, args)
        self._update(fd)

    def add_writer(self, fd: int, callback: Callback, *args: Any) -> None:
        self._writers[fd] = (callback, args)
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def watch(self, fd: int, callback: Callback, *args: Any) -> None:
        """Call ``callback(*args)`` once on EPOLLERR while no reader or writer is set.

        A socket nobody reads or writes (e.g. after its peer's half-close)
        stays in the set with an empty mask, so a reset still arrives. A
        hangup without an error (both directions shut down in order) ends
        the watch without a call.
        """
        self._hangups[fd] = (callback, args)
        if fd not in self._masks:
            self._update(fd)

    def unwatch(self, fd: int) -> None:
        if self._hangups.pop(fd, None) is not None:
            self._update(fd)

    def forget(self, fd: int) -> None:
        """Drop everything about ``fd``, which its owner closes next (closing unregisters)."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        self._hangups.pop(fd, None)
        if self._masks.pop(fd, None) is not None:
            self._removed.add(fd)

    def _update(self, fd: int) -> None:
        mask = (_EPOLLIN if fd in self._readers else 0) | (_EPOLLOUT if fd in self._writers else 0)
        old = self._masks.get(fd)
        if mask == old:
            return
        epoll = self._epoll
        if not mask and fd not in self._hangups:
            if old is None:
                return
            del self._masks[fd]
            self._removed.add(fd)  # its events already polled in this batch are stale
            with contextlib.suppress(OSError):  # already gone if it was closed first
                epoll.unregister(fd)
            return
        self._masks[fd] = mask
        try:
            if old is not None:
                epoll.modify(fd, mask)
            else:
                epoll.register(fd, mask)
        except FileNotFoundError:  # closed and reused while registered
            epoll.register(fd, mask)
        except FileExistsError:
            epoll.modify(fd, mask)

    def dispatch(self, events: list[tuple[int, int]]) -> None:
        """Run the callbacks of one batch of polled ``(fd, events)``, then the calls
        deferred before the batch was polled."""
        due = self.deferred
        if not due:
            self._dispatch(events)  # what it defers waits in that same list
            return
        self.deferred = []
        ran = 0
        try:
            self._dispatch(events)
            for callback, args in due:
                ran += 1
                try:
                    callback(*args)
                except Exception as error:  # a bug: report it, run the rest
                    if self.loop is None:
                        raise
                    self.loop.call_exception_handler(
                        {"message": "deferred readiness call failed", "exception": error}
                    )
        finally:
            if ran < len(due):  # interrupted: what has not run runs after the next batch
                self.deferred[:0] = due[ran:]

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        removed = self._removed
        if removed:
            removed.clear()
        readers, writers = self._readers, self._writers
        for fd, polled in events:
            if fd in removed:
                continue  # unregistered by an earlier callback of this batch
            try:
                if polled & _READABLE:
                    handler = readers.get(fd)
                    if handler is not None:
                        handler[0](*handler[1])
                        if fd in removed:
                            continue
                if polled & _WRITABLE:
                    handler = writers.get(fd)
                    if handler is not None:
                        handler[0](*handler[1])
                        if fd in removed:
                            continue
                if polled & _HANGUP and fd not in readers and fd not in writers:
                    handler = self._hangups.pop(fd, None)
                    if handler is not None:
                        self._update(fd)  # out of the set: level-triggered, it would fire again
                        if polled & _EPOLLERR:  # a reset; a bare HUP is both sides shut down
                            handler[0](*handler[1])
            except Exception as error:  # a bug: report it, run the rest of the batch
                if self.loop is None:
                    raise
                self.loop.call_exception_handler(
                    {"message": f"readiness callback for fd {fd} failed", "exception": error}
                )


class PrivateEpoll(Readiness):
    """A :class:`Readiness` with an epoll set of its own, polled as one reader of ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(select.epoll(), loop)
        self._fd = self._epoll.fileno()
        loop.add_reader(self._fd, self._poll)

    def _poll(self) -> None:
        self.dispatch(self._epoll.poll(0))

    def close(self) -> None:
        assert self.loop is not None
        self.loop.remove_reader(self._fd)
        self._epoll.close()


class ReadinessSelector(selectors.EpollSelector):
    """The loop's selector, whose epoll set also holds :attr:`readiness`'s callbacks.

    :meth:`select` polls once and runs the callbacks of Loble's descriptors
    at once; it returns only the loop's own events. The two never share a
    descriptor: each socket belongs either to the loop (anyio streams, the
    loop's self-pipe) or to the callback data path.
    """

    def __init__(self) -> None:
        super().__init__()
        # EpollSelector's own epoll set and key map (private, stable since 3.4).
        self._epoll: select.epoll = vars(self)["_selector"]
        self._keys: dict[int, selectors.SelectorKey] = vars(self)["_fd_to_key"]
        self.readiness = Readiness(self._epoll, None)
        self.readiness.defers = True
        self._loop_state: dict[str, Any] | None = None
        self._clock: Callable[[], float] = _monotonic

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        epoll, keys, readiness = self._epoll, self._keys, self.readiness
        wait = 0.0 if readiness.deferred else _epoll_wait(timeout)
        while True:
            try:
                polled = epoll.poll(wait)
            except InterruptedError:
                return []
            ready: list[tuple[selectors.SelectorKey, int]] = []
            ours: list[tuple[int, int]] = []
            for fd, polled_events in polled:
                key = keys.get(fd)
                if key is None:
                    ours.append((fd, polled_events))
                    continue
                events = 0
                if polled_events & ~select.EPOLLIN:
                    events |= selectors.EVENT_WRITE
                if polled_events & ~select.EPOLLOUT:
                    events |= selectors.EVENT_READ
                events &= key.events
                if events:
                    ready.append((key, events))
            if not ours:
                if readiness.deferred:
                    readiness.dispatch(ours)  # nothing else came: run them now
                return ready
            readiness.dispatch(ours)
            if ready:
                return ready
            # Only Loble's descriptors were ready, and their callbacks have
            # run. Unless they gave the loop something to do, poll again
            # here: a turn of the loop (its timers, its ready queue, the
            # clock read twice) is a dozen Python calls for nothing.
            again = self._next_wait()
            if again is None:
                return ready
            wait = 0.0 if readiness.deferred else again

    def _next_wait(self) -> float | None:
        """How long to poll again without returning to the loop; None: return.

        Return when a callback left the loop work: a callback to run, a
        stop, or a timer due (within the loop's clock resolution, as its own
        turn counts them). A cancelled timer at the top only makes this
        return sooner than needed.
        """
        state = self._loop_state
        if state is None:
            loop = self.readiness.loop
            if loop is None:
                return None
            # asyncio's BaseEventLoop internals, stable since 3.4 (as _selector).
            state = self._loop_state = vars(loop)
            # Timers are due in the loop's time(): monotonic unless overridden.
            overridden = type(loop).time is not asyncio.BaseEventLoop.time
            self._clock = loop.time if overridden else _monotonic
        if state["_ready"] or state["_stopping"]:
            return None
        scheduled = state["_scheduled"]
        if not scheduled:
            return -1.0
        left = scheduled[0]._when - self._clock()
        if left <= state["_clock_resolution"]:
            return None
        # epoll.poll rounds a timeout up to its milliseconds itself.
        return left if left < MAXIMUM_WAIT else MAXIMUM_WAIT


MAXIMUM_WAIT = 24 * 3600.0
"""Seconds: the longest poll, as asyncio's own ``MAXIMUM_SELECT_TIMEOUT``."""


def _epoll_wait(timeout: float | None) -> float:
    """``epoll.poll``'s argument for a selector timeout, as EpollSelector makes it."""
    if timeout is None:
        return -1.0
    if timeout <= 0:
        return 0.0
    # Round up to the millisecond epoll_wait counts in.
    return math.ceil(timeout * 1e3) * 1e-3


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop whose selector is a :class:`ReadinessSelector` (Linux).

    Elsewhere, asyncio's default loop: the data path then uses the loop's own
    ``add_reader``.
    """
    if not EPOLL_AVAILABLE:
        return asyncio.new_event_loop()
    selector = ReadinessSelector()
    loop = asyncio.SelectorEventLoop(selector)
    selector.readiness.loop = loop
    return loop


def readiness_for(loop: asyncio.AbstractEventLoop) -> tuple[Readiness | None, PrivateEpoll | None]:
    """Where the data path registers on ``loop``: ``(readiness, private set to close)``.

    The loop's own selector when it is a :class:`ReadinessSelector`; else a
    new private epoll set (to close when done); ``(None, None)`` without
    epoll, where the loop's ``add_reader`` is all there is.
    """
    selector = getattr(loop, "_selector", None)  # asyncio's; uvloop has none
    if isinstance(selector, ReadinessSelector):
        return selector.readiness, None
    if not EPOLL_AVAILABLE:
        return None, None
    private = PrivateEpoll(loop)
    return private, private
