"""Prometheus metrics of one daemon, and the small HTTP endpoint that serves them.

:class:`Metrics` is one of the conductor's listeners
(:class:`~._conductor.Listener`): counters and histograms are updated as the
core's outputs go by, and a connection's bytes are counted when its record
is dropped (and, for the open ones, just before a scrape). Gauges (active
connections, backend state, snapshot version, draining) are read from the
core's ``statistics()`` at scrape time by a collector, so they can never
drift from the truth. Each daemon owns a private :class:`CollectorRegistry`, so several can
run in one process. Every metric is documented in ``docs/metrics.md``.

The metrics updated for every connection (connections by outcome, bytes,
the two duration histograms) are plain numbers (:class:`_Counters`,
:class:`_Histograms`) that the registry turns into metric families when
scraped: an update is an attribute increment, where a prometheus_client
child takes a lock and a few method calls. Those cost about 7 us of CPU per
proxied connection, some 8% of the new-connections rate
(``docs/performance.md``). The rarer metrics (retries, probes, health
transitions) stay prometheus_client objects.

The endpoint (:func:`metrics_app`, served by :mod:`._http`) runs on the
daemon's own event loop (no thread): a scrape reads the core from the only
thread that touches it.
"""

from __future__ import annotations

import asyncio
import math
import platform
import sys
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from loble import __version__
from loble.core import (
    AdminState,
    BackendEjected,
    BackendStateChanged,
    ConnectBackend,
    ConnectFailed,
    ConnectionClosed,
    ConnectionQueued,
    ConnectRedispatched,
    FirstByteTimeout,
    HealthState,
    Outcome,
    ProbeFailure,
    ProcessState,
    ProxyCore,
    Reconfigured,
)

from ._datapath import HEADER_ERROR_REASONS, Link

__all__ = ["TO_BACKEND", "TO_CLIENT", "Metrics", "metrics_app"]

TO_BACKEND = "to_backend"
TO_CLIENT = "to_client"

_CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_WITHOUT_BACKEND = (
    Outcome.NO_BACKEND,
    Outcome.REFUSED_SHUTTING_DOWN,
    Outcome.QUEUE_FULL,
    Outcome.QUEUE_TIMEOUT,
)
_DURATION_BUCKETS = (0.001, 0.01, 0.1, 1, 10, 60, 300, 1800, 3600)


class Metrics:
    """The metric families of one daemon, in a registry of its own."""

    def __init__(self, core: ProxyCore) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.connections = _Counters(
            "loble_connections",
            "Client connections ended, by the backend of their last attempt and outcome.",
            ("backend", "outcome"),
            registry=registry,
        )
        self.no_backend = Counter(
            "loble_no_backend_refusals",
            "Clients closed at once because no backend was eligible.",
            registry=registry,
        )
        self.retries = Counter(
            "loble_connect_retries",
            "Connect attempts after the first, by the backend retried on.",
            ("backend",),
            registry=registry,
        )
        self.connect_failures = Counter(
            "loble_connect_failures",
            "Connect attempts that failed, by backend and reason (refused or timeout).",
            ("backend", "reason"),
            registry=registry,
        )
        self.ejections = Counter(
            "loble_outlier_ejections",
            "Outlier ejections ([outlier]), by backend.",
            ("backend",),
            registry=registry,
        )
        self.first_byte_timeouts = Counter(
            "loble_first_byte_timeouts",
            "Connections whose backend sent nothing within [outlier] first_byte_timeout "
            "of the client's first bytes, by backend: each a failure for outlier ejection.",
            ("backend",),
            registry=registry,
        )
        self.queued = Counter(
            "loble_queued",
            "Clients that waited in the queue because every eligible backend was at its "
            "max_connections (each ends served, or refused: queue_timeout).",
            registry=registry,
        )
        self.redispatched = Counter(
            "loble_connect_redispatched",
            "Pending connects given up because their backend was judged bad, by that "
            "backend ([outlier] redispatch_pending): each is retried on another.",
            ("backend",),
            registry=registry,
        )
        self.accepted = Counter(
            "loble_listener_connections",
            "Client connections accepted, by listening address.",
            ("listener",),
            registry=registry,
        )
        self.build_info = Gauge(
            "loble_build_info",
            "Always 1: the Loble version and the Python that runs it, as labels.",
            ("version", "python"),
            registry=registry,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        # Open descriptors, memory, CPU: prometheus_client's own collector.
        ProcessCollector(registry=registry)
        self.bytes = _Counters(
            "loble_backend_bytes",
            "Bytes proxied, by backend and direction (to_backend or to_client).",
            ("backend", "direction"),
            unit="bytes",
            registry=registry,
        )
        self.transitions = Counter(
            "loble_health_transitions",
            "Backend health state changes.",
            ("backend", "from", "to"),
            registry=registry,
        )
        self.probes = Counter(
            "loble_probes",
            "Health probes (TCP connects, with payload checks an exchange) by backend and result.",
            ("backend", "result"),
            registry=registry,
        )
        self.probe_failures = Counter(
            "loble_probe_failures",
            "Failed health probes by backend and reason.",
            ("backend", "reason"),
            registry=registry,
        )
        self.connect_time = _Histograms(
            "loble_backend_connect_duration_seconds",
            "Time to establish a backend connection (successful attempts).",
            ("backend",),
            buckets=_CONNECT_BUCKETS,
            registry=registry,
        )
        self.duration = _Histograms(
            "loble_connection_duration_seconds",
            "Client connection lifetime, accept to close.",
            ("backend",),
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        # Every documented series exists from the start, at zero, so a rate()
        # over a fresh daemon and an absent series never mean different things.
        for backend in core.config.backends:
            self._start_series(backend.address)
        for outcome in _WITHOUT_BACKEND:
            self.connections.labels("", outcome.value)
        self.now: Callable[[], float] | None = None
        """The core's clock, once the daemon runs (for the seconds since a state change)."""
        self.started = 0.0
        """When the daemon started, on that clock."""
        self.admission: Admission | None = None
        """The connection limit and whether accepting is paused (the conductor), once running."""
        self.pipes: Pipes | None = None
        """The daemon's pool of splice pipes, for the pipe gauges."""
        self.proxy_header_errors: Mapping[str, int] = dict.fromkeys(HEADER_ERROR_REASONS, 0)
        """Clients closed for their PROXY protocol header, by reason (the conductor's count)."""
        registry.register(_CoreCollector(core, self))
        self._closed: dict[tuple[str, Outcome], Any] = {}
        self._durations: dict[str, Any] = {}
        self._connect_times: dict[str, Any] = {}
        self._recorders: dict[type, Callable[[Any], object]] = {
            ConnectionClosed: self._record_closed,
            ConnectFailed: self._record_connect_failure,
            ConnectBackend: self._record_connect,
            BackendStateChanged: self._record_transition,
            Reconfigured: self._record_reload,
            BackendEjected: self._record_ejection,
            ConnectRedispatched: self._record_redispatch,
            ConnectionQueued: self._record_queued,
            FirstByteTimeout: self._record_first_byte_timeout,
        }
        self._byte_counters: dict[str, tuple[_Count, _Count]] = {}
        self._accepted: dict[str, Any] = {}
        self.before_render: Callable[[], None] = lambda: None
        """Called before each scrape: the daemon adds the bytes of open connections."""

    def _start_series(self, address: str) -> None:
        self.retries.labels(address)
        self.ejections.labels(address)
        self.redispatched.labels(address)
        self.first_byte_timeouts.labels(address)
        for reason in ("refused", "timeout"):
            self.connect_failures.labels(address, reason)
        for result in ("success", "failure"):
            self.probes.labels(address, result)
        for failure in ProbeFailure:
            self.probe_failures.labels(address, failure.value)
        for old in HealthState:
            for new in HealthState:
                if old is not new:
                    self.transitions.labels(address, old.value, new.value)
        self.bytes.labels(address, TO_BACKEND)
        self.bytes.labels(address, TO_CLIENT)
        for outcome in Outcome:
            if outcome not in _WITHOUT_BACKEND:
                self.connections.labels(address, outcome.value)

    # -- a listener of the core's outputs (see _conductor.Listener) -------------------

    def handlers(self) -> Mapping[type, Callable[[Any], object]]:
        # Most outputs (health reports other than failures, connect orders
        # on a first attempt) need nothing: the conductor calls only these.
        return self._recorders

    def backend_connected(self, address: str, seconds: float) -> None:
        self.connect_duration(address).observe(seconds)

    def link_accepted(self, link: Link) -> None:
        counter = self._accepted.get(link.listener)
        if counter is None:
            counter = self._accepted[link.listener] = self.accepted.labels(link.listener)
        counter.inc()

    def listening(self, listeners: Iterable[str]) -> None:
        """The addresses the daemon accepts on now: their series exist from now on."""
        for listener in listeners:
            self._accepted.setdefault(listener, self.accepted.labels(listener))

    def link_dropped(self, link: Link, closed: ConnectionClosed) -> None:
        """Count the last bytes of a connection that ended."""
        self.count_bytes(link)

    def count_bytes(self, link: Link) -> None:
        """Add what ``link`` moved since it was last counted.

        Bytes are counted into the metric when a connection closes and, for
        the open ones, just before a scrape: one counter update per scrape
        instead of one per read.
        """
        if not link.backend_address:
            return  # never connected: nothing moved
        counters = self._byte_counters.get(link.backend_address)
        if counters is None:
            labels = self.bytes.labels
            address = link.backend_address
            counters = self._byte_counters[address] = (
                labels(address, TO_BACKEND),
                labels(address, TO_CLIENT),
            )
        for way, counter in ((link.to_backend, counters[0]), (link.to_client, counters[1])):
            if way is not None and way.total != way.reported:
                counter.inc(way.total - way.reported)
                way.reported = way.total

    def _record_closed(self, output: ConnectionClosed) -> None:
        backend = output.backend or ""
        key = (backend, output.outcome)
        counter = self._closed.get(key)
        if counter is None:
            counter = self._closed[key] = self.connections.labels(backend, output.outcome.value)
        counter.inc()
        if output.outcome is Outcome.NO_BACKEND:
            self.no_backend.inc()
        if output.backend is not None:
            self.connection_duration(backend).observe(output.at - output.opened_at)

    def _record_connect_failure(self, output: ConnectFailed) -> None:
        reason = "timeout" if output.timed_out else "refused"
        self.connect_failures.labels(output.backend, reason).inc()

    def _record_reload(self, output: Reconfigured) -> None:
        for address in output.added:
            self._start_series(address)

    def _record_ejection(self, output: BackendEjected) -> None:
        self.ejections.labels(output.address).inc()

    def _record_first_byte_timeout(self, output: FirstByteTimeout) -> None:
        self.first_byte_timeouts.labels(output.backend).inc()

    def _record_queued(self, output: ConnectionQueued) -> None:
        self.queued.inc()

    def _record_redispatch(self, output: ConnectRedispatched) -> None:
        self.redispatched.labels(output.backend).inc()

    def _record_connect(self, output: ConnectBackend) -> None:
        if output.attempt > 1:
            self.retries.labels(output.backend.address).inc()

    def _record_transition(self, output: BackendStateChanged) -> None:
        self.transitions.labels(output.address, output.old.value, output.new.value).inc()

    def connection_duration(self, backend: str) -> Any:
        histogram = self._durations.get(backend)
        if histogram is None:
            histogram = self._durations[backend] = self.duration.labels(backend)
        return histogram

    def connect_duration(self, backend: str) -> Any:
        """The connect-time histogram of ``backend`` (label lookups cached)."""
        histogram = self._connect_times.get(backend)
        if histogram is None:
            histogram = self._connect_times[backend] = self.connect_time.labels(backend)
        return histogram

    def figures(self, address: str) -> dict[str, object]:
        """A backend's totals for the status page: connections by outcome, bytes each way.

        Call :attr:`before_render` first to include the bytes of open connections.
        """
        outcomes = {
            values[1]: int(count)
            for values, count in self.connections.items()
            if values[0] == address and count
        }
        return {
            "connections": outcomes,
            "bytes_to_backend": int(self.bytes.value(address, TO_BACKEND)),
            "bytes_to_client": int(self.bytes.value(address, TO_CLIENT)),
        }

    def probed(self, address: str, failure: ProbeFailure | None) -> None:
        if failure is None:
            self.probes.labels(address, "success").inc()
        else:
            self.probes.labels(address, "failure").inc()
            self.probe_failures.labels(address, failure.value).inc()

    def render(self) -> bytes:
        self.before_render()
        return generate_latest(self.registry)


class _Count:
    """One series of a :class:`_Counters`: a number, incremented without a lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class _Counters:
    """A labelled counter as plain numbers, read by the registry when scraped.

    ``labels(...)`` and ``inc()`` as prometheus_client's ``Counter``. Only
    the event loop's thread touches it (the scrape runs there too), so no
    lock is needed.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        unit: str = "",
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = list(labelnames)
        self._unit = unit
        self._series: dict[tuple[str, ...], _Count] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Count:
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = _Count()
        return series

    def value(self, *values: str) -> float:
        """The series' count now (0 if it never existed)."""
        series = self._series.get(values)
        return series.value if series is not None else 0.0

    def items(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for values, series in self._series.items():
            yield values, series.value

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            self._name, self._documentation, labels=self._labelnames, unit=self._unit
        )
        for values, series in self._series.items():
            family.add_metric(values, series.value)
        yield family


class _Distribution:
    """One series of a :class:`_Histograms`: a count per bucket and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # Buckets are "less than or equal": the first bound >= amount.
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Histograms:
    """A labelled histogram as plain numbers, read by the registry when scraped.

    ``labels(...)`` and ``observe()`` as prometheus_client's ``Histogram``,
    the same buckets and series (``_bucket``, ``_count``, ``_sum``).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = list(labelnames)
        self._bounds = tuple(float(bound) for bound in buckets)
        # The le labels as prometheus_client writes them ("0.005", "1.0", "+Inf").
        le: Callable[[float], str] = floatToGoString
        self._les = [le(bound) for bound in self._bounds] + ["+Inf"]
        self._series: dict[tuple[str, ...], _Distribution] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Distribution:
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = _Distribution(self._bounds)
        return series

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, series in self._series.items():
            cumulative = 0
            buckets = []
            for le, count in zip(self._les, series.counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(values), buckets, series.sum)
        yield family


class Admission(Protocol):
    """What the accepting gauges read (a :class:`~._conductor.Conductor` is one)."""

    @property
    def connection_limit(self) -> float: ...

    @property
    def accepting_paused(self) -> bool: ...


class Pipes(Protocol):
    """What the pipe gauges read (a :class:`~._copy.BufferPool` is one)."""

    @property
    def open_pipes(self) -> int: ...

    @property
    def pooled_pipes(self) -> int: ...


class _CoreCollector:
    """Gauges read from the core's statistics when scraped."""

    def __init__(self, core: ProxyCore, metrics: Metrics) -> None:
        self._core = core
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        stats = self._core.statistics()
        weight = GaugeMetricFamily(
            "loble_backend_weight",
            "Each backend's weight now (configured, or set through the admin API).",
            labels=("backend",),
        )
        admin = GaugeMetricFamily(
            "loble_backend_admin_state",
            "1 for the admin state each backend is in (ready, drain, maint), 0 for the others.",
            labels=("backend", "state"),
        )
        ejected = GaugeMetricFamily(
            "loble_backend_ejected",
            "1 while outlier ejection keeps each backend out of rotation ([outlier]), else 0.",
            labels=("backend",),
        )
        limit = GaugeMetricFamily(
            "loble_backend_max_connections",
            "Each backend's max_connections ([[backends]]), 0 for none.",
            labels=("backend",),
        )
        age = GaugeMetricFamily(
            "loble_backend_state_age_seconds",
            "Seconds since each backend's health state last changed (since start if never).",
            labels=("backend",),
        )
        clock = self._metrics.now
        now = clock() if clock is not None else None
        for backend in stats.backends:
            weight.add_metric((backend.address,), backend.weight)
            ejected.add_metric((backend.address,), float(backend.ejected_until is not None))
            limit.add_metric((backend.address,), backend.max_connections)
            for admin_state in AdminState:
                admin.add_metric(
                    (backend.address, admin_state.value), float(backend.admin is admin_state)
                )
            if now is not None:
                since = backend.since if backend.since is not None else self._metrics.started
                age.add_metric((backend.address,), max(0.0, now - since))
        yield weight
        yield admin
        yield ejected
        yield limit
        yield age
        active = GaugeMetricFamily(
            "loble_backend_active_connections",
            "Connections on each backend, connecting or established.",
            labels=("backend",),
        )
        state = GaugeMetricFamily(
            "loble_backend_state",
            "1 for the state each backend is in, 0 for the others.",
            labels=("backend", "state"),
        )
        for backend in stats.backends:
            active.add_metric((backend.address,), backend.active_connections)
            for health_state in HealthState:
                state.add_metric(
                    (backend.address, health_state.value), float(backend.state is health_state)
                )
        yield active
        yield state
        yield GaugeMetricFamily(
            "loble_connections_in_flight",
            "Client connections open now, from accept to close.",
            value=stats.in_flight,
        )
        yield GaugeMetricFamily(
            "loble_queue_length",
            "Clients waiting now for a backend with room (part of the connections in flight).",
            value=stats.queued,
        )
        yield GaugeMetricFamily(
            "loble_snapshot_version",
            "Version of the published snapshot; it changes only when membership does.",
            value=stats.snapshot_version,
        )
        yield GaugeMetricFamily(
            "loble_snapshot_backends",
            "Backends eligible for new connections (in the snapshot).",
            value=len(stats.eligible),
        )
        yield GaugeMetricFamily(
            "loble_panic",
            "1 while in panic mode ([balancer] panic_threshold): too few backends "
            "healthy, new connections spread over all of them.",
            value=1.0 if self._core.control.panic else 0.0,
        )
        admission = self._metrics.admission
        yield GaugeMetricFamily(
            "loble_connection_limit",
            "Client connections carried at once, from the descriptor limit (+Inf: none).",
            value=float(admission.connection_limit) if admission is not None else math.inf,
        )
        yield GaugeMetricFamily(
            "loble_accepting_paused",
            "1 while accepting is paused: at the connection limit, or accepts failing.",
            value=float(admission is not None and admission.accepting_paused),
        )
        yield GaugeMetricFamily(
            "loble_draining",
            "1 once shutdown has begun: not accepting, waiting for connections to finish.",
            value=float(stats.process is not ProcessState.RUNNING),
        )
        errors = CounterMetricFamily(
            "loble_proxy_protocol_errors",
            "Clients from [listener] accept_proxy_from closed for their PROXY protocol header, "
            "by reason (missing, malformed, timeout, closed).",
            labels=("reason",),
        )
        for reason, count in self._metrics.proxy_header_errors.items():
            errors.add_metric((reason,), count)
        yield errors
        pipes = self._metrics.pipes
        if pipes is not None:
            family = GaugeMetricFamily(
                "loble_splice_pipes",
                "Splice pipes open: in use by a connection, or pooled (empty, kept for reuse).",
                labels=("state",),
            )
            family.add_metric(("in_use",), pipes.open_pipes - pipes.pooled_pipes)
            family.add_metric(("pooled",), pipes.pooled_pipes)
            yield family
        tasks = living_tasks()
        if tasks is not None:
            yield GaugeMetricFamily(
                "loble_tasks",
                "Tasks alive on the daemon's event loop now (a leak shows as growth at rest).",
                value=tasks,
            )


def living_tasks() -> int | None:
    """Tasks alive on the event loop of this thread (asyncio's, or trio's); None outside one."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        pass  # no asyncio loop running here: trio, or none
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return int(trio.lowlevel.current_statistics().tasks_living)
        except RuntimeError:
            pass
    return None


# -- the endpoint ------------------------------------------------------------------


def metrics_app(metrics: Metrics) -> Starlette:
    """The metrics endpoint: ``GET /metrics`` (and ``HEAD``); any other path is a 404."""

    async def scrape(request: Request) -> Response:
        return Response(metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return Starlette(routes=[Route("/metrics", scrape, methods=["GET", "HEAD"])])
