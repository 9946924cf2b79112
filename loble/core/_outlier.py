"""Outlier ejection: per-backend tallies of how established connections end.

Theory of operation
===================

Health (``_health``) judges a backend by its connects and probes. A backend
that accepts connections and then resets them (a crashing worker, a full
pool, a bad deploy behind a healthy port) passes both: its connects succeed,
so it stays healthy forever. This module judges what happens *after* the
connect, as Envoy's outlier detection does for requests, adapted to L4: the
end of each established connection is a verdict on its backend,

* a **failure** when the backend ended it with a reset (``BACKEND_RESET``),
  or, with ``first_byte_timeout``, sent nothing within that long of the
  client's first bytes (one verdict per connection: that one, not its end);
* a **success** when it completed (both sides sent EOF);
* nothing otherwise: a client's reset, an idle timeout, a cut or a local
  shortage say nothing about the backend.

Two rules eject, each off at 0:

* ``consecutive_resets`` failures in a row eject at once (Envoy's
  ``consecutive_5xx``); a success breaks the run;
* at each ``interval``, a backend with at least ``minimum_connections``
  verdicts in it and a share of failures of at least ``failure_rate`` is
  ejected (Envoy's failure percentage), the worst first; the window's
  tallies then start again.

The n-th ejection in a row lasts ``n * base_ejection_time``, at most
``max_ejection_time``. Each interval a backend spends back in rotation, a
full interval after its return, without being ejected again takes one off
``n`` (Envoy's back-off). While ejected a backend's verdicts are not kept
(its running connections tell of the time before), and it starts from clean
tallies on its return; only its time brings it back, never a probe.

Never more than ``max_ejection_percent`` of the backends are ejected at once,
rounded down but at least one (so a small fleet may eject one: 10% of 5 is
one), and never the last backend in rotation (``may_eject``, the control
plane's say: an ejection that would leave nobody to take a client is not
made). An ejection refused for room is tried again on the next verdict.

The detector is pure: it never reads a clock (``now`` comes in), and the
control plane applies what it decides (``ControlPlane.eject`` and
``restore``, which take the backend out of the snapshot and put it back).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ._config import OutlierConfig

__all__ = ["Ejection", "OutlierDetector", "Tally", "run_reason"]


def run_reason(run: int, silences: int) -> str:
    """The reason of an ejection by ``consecutive_resets``: ``run`` failures in a
    row, ``silences`` of them first-byte timeouts."""
    if not silences:
        return f"{run} consecutive resets"
    if silences == run:
        return f"{run} consecutive first-byte timeouts"
    resets = run - silences
    return (
        f"{run} consecutive failures ({resets} reset{'s' * (resets != 1)}, "
        f"{silences} first-byte timeout{'s' * (silences != 1)})"
    )


class Tally:
    """What one backend's connections said lately."""

    __slots__ = ("ejections", "failed", "judged", "resets_in_a_row", "returned_at", "silences")

    def __init__(self) -> None:
        self.resets_in_a_row = 0
        """Failures since the last success (or return)."""
        self.silences = 0
        """How many of them were first-byte timeouts, not resets."""
        self.judged = 0
        """Verdicts in the current interval."""
        self.failed = 0
        """Failures among them."""
        self.ejections = 0
        """Ejections in a row: the next lasts one more times the base."""
        self.returned_at: float | None = None
        """When it last came back from an ejection (None: never ejected)."""

    def __repr__(self) -> str:
        return (
            f"Tally(resets_in_a_row={self.resets_in_a_row}, judged={self.judged}, "
            f"failed={self.failed}, ejections={self.ejections})"
        )

    def clear(self) -> None:
        self.resets_in_a_row = self.silences = self.judged = self.failed = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Ejection:
    """A decision to eject ``address`` until ``until`` (the ``ejections``-th in a row)."""

    address: str
    until: float
    reason: str
    ejections: int


class OutlierDetector:
    """The tallies of every backend, the ejected and when each returns, the interval tick."""

    def __init__(
        self,
        config: OutlierConfig,
        *,
        may_eject: Callable[[str, Iterable[str]], bool] = lambda address, decided: True,
        fleet: int = 0,
    ) -> None:
        self.config = config
        self.may_eject = may_eject
        """Whether ejecting this backend, with the ejections already decided, leaves
        somebody in rotation (the control plane's)."""
        self.fleet = fleet
        """How many backends there are (removed ones not counted): what the cap is a share of."""
        self.tallies: dict[str, Tally] = {}
        self.ejected: dict[str, float] = {}
        """Ejected backends and when each returns."""
        self._returns: list[tuple[float, str]] = []
        self.next_tick: float | None = None
        """When the next interval ends (None: no verdicts are made)."""
        self.deadline: float | None = None
        """The earliest of :attr:`next_tick` and the next return (None: neither)."""

    # -- reading -------------------------------------------------------------------

    @property
    def room(self) -> int:
        """How many more backends may be ejected now."""
        allowed = max(1, self.fleet * self.config.max_ejection_percent // 100)
        return allowed - len(self.ejected)

    def ejection_time(self, ejections: int) -> float:
        """How long the ``ejections``-th ejection in a row lasts."""
        config = self.config
        return min(config.base_ejection_time * ejections, config.max_ejection_time)

    # -- inputs ----------------------------------------------------------------------

    def start(self, now: float) -> None:
        self.next_tick = now + self.config.interval if self.config.detecting else None
        self._refresh()

    def configure(self, config: OutlierConfig, now: float) -> None:
        """A reload's settings, for what follows: ejections made keep their time."""
        old, self.config = self.config, config
        if not config.detecting:
            self.next_tick = None
        elif self.next_tick is None or config.interval != old.interval:
            self.next_tick = now + config.interval
        self._refresh()

    def record(
        self, address: str, failed: bool, now: float, *, silent: bool = False
    ) -> Ejection | None:
        """One verdict on ``address``; an ejection if it makes one (by count).

        ``silent``: the failure is a first-byte timeout, not a reset (the
        ejection's reason says which failures made the run)."""
        if address in self.ejected:
            return None
        tally = self.tallies.get(address)
        if tally is None:
            tally = self.tallies[address] = Tally()
        tally.judged += 1
        if not failed:
            tally.resets_in_a_row = tally.silences = 0
            return None
        tally.failed += 1
        run = tally.resets_in_a_row = tally.resets_in_a_row + 1
        if silent:
            tally.silences += 1
        threshold = self.config.consecutive_resets
        if not threshold or run < threshold:
            return None
        return self._eject(address, tally, run_reason(run, tally.silences), now)

    def tick(self, now: float, order: Iterable[str]) -> list[Ejection]:
        """The interval is over: verdicts by rate, back-off, a fresh window.

        ``order`` is the backends in config order, which breaks ties between
        equal rates (so the choice never depends on the tallies' history).
        """
        config = self.config
        ejections: list[Ejection] = []
        rate = config.failure_rate
        if rate:
            minimum = config.minimum_connections
            rank = {address: index for index, address in enumerate(order)}
            candidates = sorted(
                (
                    (-tally.failed / tally.judged, rank.get(address, len(rank)), address)
                    for address, tally in self.tallies.items()
                    if tally.judged >= minimum
                    and tally.failed >= rate * tally.judged
                    and address not in self.ejected
                ),
            )
            for share, _, address in candidates:
                tally = self.tallies[address]
                reason = (
                    f"failure rate {-share:.0%} of {tally.judged} connections "
                    f"in {config.interval:g} s >= {rate:.0%}"
                )
                ejection = self._eject(address, tally, reason, now)
                if ejection is not None:
                    ejections.append(ejection)
        for address, tally in self.tallies.items():
            if (
                tally.ejections
                and address not in self.ejected
                and tally.returned_at is not None
                and now - tally.returned_at >= config.interval
            ):
                tally.ejections -= 1  # an interval back in rotation, behaving
            tally.judged = tally.failed = 0
        if self.next_tick is not None:
            tick = self.next_tick + config.interval
            if tick <= now:  # woken late by more than an interval: skip the lost ones
                tick = now + config.interval
            self.next_tick = tick if tick > now else math.nextafter(now, math.inf)
        self._refresh()
        return ejections

    def due(self, now: float) -> list[str]:
        """The ejected backends whose time is up at ``now``, in return order."""
        returned: list[str] = []
        returns = self._returns
        while returns and returns[0][0] <= now:
            until, address = heapq.heappop(returns)
            if self.ejected.get(address) != until:
                continue  # forgotten (a reload removed it)
            del self.ejected[address]
            tally = self.tallies[address]
            tally.clear()
            tally.returned_at = now
            returned.append(address)
        if returned:
            self._refresh()
        return returned

    def forget(self, address: str) -> None:
        """A reload removed the backend: its tallies and ejection go with it."""
        self.tallies.pop(address, None)
        if self.ejected.pop(address, None) is not None:
            self._refresh()

    # -- internals ---------------------------------------------------------------------

    def _eject(self, address: str, tally: Tally, reason: str, now: float) -> Ejection | None:
        # The ejections decided before this one count, applied or not: an
        # interval's verdicts are all decided before the first is applied.
        if self.room <= 0 or not self.may_eject(address, self.ejected):
            return None  # no room: the next verdict tries again
        tally.ejections += 1
        until = now + self.ejection_time(tally.ejections)
        if until <= now:  # a time lost in float rounding: never return at once
            until = math.nextafter(now, math.inf)
        tally.clear()
        self.ejected[address] = until
        heapq.heappush(self._returns, (until, address))
        self._refresh()
        return Ejection(address=address, until=until, reason=reason, ejections=tally.ejections)

    def _refresh(self) -> None:
        returns = self._returns
        while returns and self.ejected.get(returns[0][1]) != returns[0][0]:
            heapq.heappop(returns)
        candidates = [
            due for due in (self.next_tick, returns[0][0] if returns else None) if due is not None
        ]
        self.deadline = min(candidates) if candidates else None
