"""The daemon's log lines about what the core decided: a listener of its outputs.

A :class:`Journal` is one of the conductor's listeners (:class:`~._conductor.Listener`):
it writes a line when a backend changes state, a snapshot is published,
shutdown starts and finishes, and, with ``[logging] access_log``, one line
per connection as its record is dropped. What the network did wrong (an
accept that failed, no socket for a connect) is the conductor's to log;
what the lifecycle does (listening, signals), the lifecycle's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from loble.core import (
    AdminState,
    AdminStateChanged,
    BackendEjected,
    BackendReturned,
    BackendStateChanged,
    ConnectionClosed,
    ConnectionQueued,
    ConnectRedispatched,
    FirstByteTimeout,
    HealthState,
    LoggingConfig,
    MaxConnectionsChanged,
    Outcome,
    PanicChanged,
    ProbeFailure,
    Reconfigured,
    ShutdownFinished,
    ShutdownStarted,
    SnapshotPublished,
    WeightChanged,
)

from ._datapath import Link, format_address
from ._logging import log

__all__ = ["NO_BACKEND_LOG_INTERVAL", "Journal"]

NO_BACKEND_LOG_INTERVAL = 1.0
"""Seconds between two "no backend eligible" lines (each counts the clients since the last)."""

Handler = Callable[[Any], object]

_NO_BACKEND = Outcome.NO_BACKEND
_QUEUE_REFUSALS = (Outcome.QUEUE_FULL, Outcome.QUEUE_TIMEOUT)


class _Tally:
    """A line about clients that may come by thousands a second, once a second at
    most (``NO_BACKEND_LOG_INTERVAL``), counting the ones since the last line."""

    __slots__ = ("count", "logged")

    def __init__(self) -> None:
        self.count = 0
        self.logged = -math.inf

    def due(self, at: float) -> int:
        """Count one; the count to log if a line is due now, else 0."""
        self.count += 1
        if at - self.logged < NO_BACKEND_LOG_INTERVAL:
            return 0
        count, self.count, self.logged = self.count, 0, at
        return count


class Journal:
    """Log lines for the core's events; see the module doc."""

    def __init__(self, logger: logging.Logger, config: LoggingConfig, drain_timeout: float) -> None:
        self.logger = logger
        self._access_log = config.access_log
        self._drain_timeout = drain_timeout
        self._shutdown_began = 0.0
        self._probes: dict[str, bool] = {}
        self._refused = _Tally()
        self._queued = _Tally()
        self._queue_refused = {outcome: _Tally() for outcome in _QUEUE_REFUSALS}

    def reconfigure(self, config: LoggingConfig, drain_timeout: float) -> None:
        """A reload: the access log and the drain timeout may have changed."""
        self._access_log = config.access_log
        self._drain_timeout = drain_timeout

    def handlers(self) -> Mapping[type, Handler]:
        return {
            Reconfigured: self._reconfigured,
            AdminStateChanged: self._admin_changed,
            WeightChanged: self._weight_changed,
            MaxConnectionsChanged: self._limit_changed,
            BackendStateChanged: self._state_changed,
            SnapshotPublished: self._snapshot,
            PanicChanged: self._panic,
            BackendEjected: self._ejected,
            BackendReturned: self._returned,
            ConnectRedispatched: self._redispatched,
            ConnectionQueued: self._queued_line,
            FirstByteTimeout: self._first_byte_timeout,
            ShutdownStarted: self._shutdown_started,
            ShutdownFinished: self._shutdown_finished,
        }

    def link_accepted(self, link: Link) -> None:
        pass  # the access log writes one line per connection, when it ends

    def backend_connected(self, address: str, seconds: float) -> None:
        pass  # the access log line has the connect time, from the core's event

    def probed(self, address: str, failure: ProbeFailure | None) -> None:
        # A probe that answers as the last one did is routine (debug); one
        # whose answer changed is news (info). A failure says why: a frozen
        # backend times out awaiting the reply, a dead one refuses the connect.
        ok = failure is None
        changed = self._probes.get(address) is not ok
        self._probes[address] = ok
        reason = {} if failure is None else {"reason": failure.description}
        log(
            self.logger,
            logging.INFO if changed else logging.DEBUG,
            "probe",
            backend=address,
            ok=ok,
            **reason,
        )

    def link_dropped(self, link: Link, closed: ConnectionClosed) -> None:
        if closed.outcome is _NO_BACKEND:
            self._no_backend(closed.at)
        elif closed.outcome in _QUEUE_REFUSALS:
            self._queue_refusal(closed)
        if not self._access_log:
            return
        connected_at = closed.connected_at
        connect_time = None if connected_at is None else round(connected_at - closed.opened_at, 6)
        # The client a PROXY protocol header named, and the proxy that sent it.
        state = link.proxy_protocol
        via = {} if state is None or state.proxy is None else {"via": _peer(state.proxy)}
        log(
            self.logger,
            logging.INFO,
            "connection",
            client=link.peer,
            **via,
            backend=closed.backend or "",
            tried=",".join(closed.tried),
            outcome=closed.outcome.value,
            bytes_to_backend=link.bytes_to_backend,
            bytes_to_client=link.bytes_to_client,
            duration=round(closed.at - closed.opened_at, 6),
            connect_time=connect_time,
            attempts=closed.attempts,
        )

    def _no_backend(self, at: float) -> None:
        # Every client is being turned away: an error, but one line a second
        # at most, however many clients arrive.
        clients = self._refused.due(at)
        if clients:
            log(
                self.logger,
                logging.ERROR,
                "no backend eligible: closing clients at once",
                clients=clients,
            )

    def _first_byte_timeout(self, output: FirstByteTimeout) -> None:
        # One line per connection (debug), as a redispatch: the warning is the
        # ejection it may cause; the count is a metric.
        log(
            self.logger,
            logging.DEBUG,
            "backend silent past first_byte_timeout",
            connection=output.connection_id,
            backend=output.backend,
        )

    def _queued_line(self, output: ConnectionQueued) -> None:
        clients = self._queued.due(output.at)
        if clients:
            log(
                self.logger,
                logging.WARNING,
                "backends at max_connections: clients queued",
                clients=clients,
                waiting=output.queued,
            )

    def _queue_refusal(self, closed: ConnectionClosed) -> None:
        clients = self._queue_refused[closed.outcome].due(closed.at)
        if clients:
            full = closed.outcome is Outcome.QUEUE_FULL
            log(
                self.logger,
                logging.ERROR,
                "queue full: refusing clients at once"
                if full
                else "queue timeout: refusing clients that waited too long",
                clients=clients,
                outcome=closed.outcome.value,
            )

    def _reconfigured(self, output: Reconfigured) -> None:
        log(
            self.logger,
            logging.INFO,
            "configuration reloaded",
            added=",".join(output.added),
            removed=",".join(output.removed),
            reweighted=",".join(output.reweighted),
            changed=",".join(output.changed),
        )

    def _admin_changed(self, output: AdminStateChanged) -> None:
        log(
            self.logger,
            logging.WARNING if output.new is not AdminState.READY else logging.INFO,
            "backend admin state changed",
            backend=output.address,
            old=output.old.value,
            new=output.new.value,
        )

    def _weight_changed(self, output: WeightChanged) -> None:
        log(
            self.logger,
            logging.INFO,
            "backend weight changed",
            backend=output.address,
            old=output.old,
            new=output.new,
        )

    def _limit_changed(self, output: MaxConnectionsChanged) -> None:
        log(
            self.logger,
            logging.INFO,
            "backend max_connections changed",
            backend=output.address,
            old=output.old,
            new=output.new,
        )

    def _state_changed(self, output: BackendStateChanged) -> None:
        log(
            self.logger,
            logging.INFO if output.new is HealthState.HEALTHY else logging.WARNING,
            "backend state changed",
            backend=output.address,
            old=output.old.value,
            new=output.new.value,
            reason=output.reason,
        )

    def _ejected(self, output: BackendEjected) -> None:
        log(
            self.logger,
            logging.WARNING,
            "backend ejected: outlier",
            backend=output.address,
            reason=output.reason,
            until_seconds=round(output.until - output.at, 3),
            ejections=output.ejections,
        )

    def _returned(self, output: BackendReturned) -> None:
        log(self.logger, logging.INFO, "backend returned from ejection", backend=output.address)

    def _redispatched(self, output: ConnectRedispatched) -> None:
        # One line per client moved (debug): the warning is the ejection or
        # the health change that caused it; the count is a metric, and the
        # access log's attempts and tried fields show it per connection.
        log(
            self.logger,
            logging.DEBUG,
            "connect redispatched",
            connection=output.connection_id,
            backend=output.backend,
            attempt=output.attempt,
        )

    def _snapshot(self, output: SnapshotPublished) -> None:
        log(
            self.logger,
            logging.INFO,
            "snapshot published",
            version=output.version,
            eligible=len(output.addresses),
            backends=",".join(output.addresses),
        )

    def _panic(self, output: PanicChanged) -> None:
        if output.panic:
            log(
                self.logger,
                logging.WARNING,
                "panic: too few backends healthy, spreading over all of them",
                healthy=output.healthy,
                backends=output.total,
            )
        else:
            log(
                self.logger,
                logging.INFO,
                "panic over: enough backends healthy",
                healthy=output.healthy,
                backends=output.total,
            )

    def _shutdown_started(self, output: ShutdownStarted) -> None:
        self._shutdown_began = output.at
        log(
            self.logger,
            logging.INFO,
            "shutdown started: not accepting, draining",
            in_flight=output.in_flight,
            drain_timeout=self._drain_timeout,
        )

    def _shutdown_finished(self, output: ShutdownFinished) -> None:
        log(
            self.logger,
            logging.WARNING if output.cut else logging.INFO,
            "shutdown finished",
            cut=output.cut,
            took=round(output.at - self._shutdown_began, 3),
        )


def _peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return format_address(str(address[0]), int(address[1]))
    return ""
