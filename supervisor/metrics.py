"""Prometheus metrics: definitions, the watcher observer, and the scrape-time collectors.

Theory of operation
-------------------
Two kinds of numbers, two mechanisms:

* **Things that happen** (a Docker event, a resync, an API request) are counted as
  they happen, in prometheus-client ``Counter``/``Histogram`` objects that the watcher
  (through the :class:`~supervisor.watcher.WatchObserver` methods) and the API
  (:meth:`Metrics.api_request`) feed.
* **Things that are** (the connection state, the containers and their health) are
  never copied into metric objects: collectors read the runtime (cache, state
  machine, change feed) at scrape time. A removed container therefore leaves no
  stale series, and nothing has to be kept in step with the mirror. Counters that
  the state machine already keeps (``transition_counts``, ``attempt_results``) and
  the feed's overflow count are read the same way.

Everything lives in one explicit :class:`~prometheus_client.CollectorRegistry` per
:class:`Metrics` (``Metrics.registry``), next to the standard process, platform
and GC collectors; there is no global state. Another room's collector registered
on that registry is part of every scrape; per-container ones should label their
series from :attr:`Metrics.label_keys`, as the container families do.

Speed: per-container series are most of a scrape (about seven lines per
container). prometheus-client formats a sample in about 10 µs, which is 80 ms at
1,000 containers, so :meth:`Metrics.render` formats the per-container families
itself: each record's lines are built once, when the record changes (records are
immutable and replaced on change, so identity tells), and the whole block is
reused while the cache revision stays the same. The families are the same ones
:class:`ContainerCollector` yields to the registry (except during ``render``,
which formats them itself); the tests hold the two renderings byte-for-byte equal.

Labels: per-container series carry only ``name``, ``compose_project`` and
``compose_service`` (``container_info`` adds ``image`` and ``id``), plus one
``label_<key>`` label per Docker label key the operator lists in
``metrics.container_labels``: ``com.example.team`` becomes ``label_com_example_team``
(every character outside ``[a-zA-Z0-9_]`` becomes ``_``, and the prefix keeps the
result clear of the fixed labels and of Prometheus' reserved ``__`` names).

:meth:`Metrics.render` must be called from the thread that runs the watcher (the
event loop): it reads the cache without a lock.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from supervisor.records import (
    CONTAINER_STATES,
    HEALTH_STATES,
    KNOWN_ACTIONS,
    ContainerRecord,
    parse_rfc3339,
)
from supervisor.settings import ConfigError
from supervisor.state import TRANSITIONS, ConnectionState, ErrorKind

if TYPE_CHECKING:
    from supervisor.daemon import Runtime

__all__ = [
    "CONTENT_TYPE",
    "PREFIX",
    "ContainerCollector",
    "Metrics",
    "RuntimeCollector",
    "label_name",
]

PREFIX = "homelabarr_supervisor_"

#: The exposition is the classic text format with legacy (ASCII) names, which is what
#: version 0.0.4 describes; prometheus-client's own handlers label it so too.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: Distinct ``route`` label values accepted from the API; later ones count as ``other``.
#: Routes are templates (``/v1/containers/{ref}``), so this only bites on a bug.
MAX_ROUTES = 32

RESYNC_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PROPAGATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
API_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

#: prometheus-client's float formatting (Go's), typed.
_go_float: Callable[[float], str] = floatToGoString

_NOT_LABEL_CHAR = re.compile(r"[^a-zA-Z0-9_]")


def label_name(docker_label: str) -> str:
    """The Prometheus label for a Docker label key: ``a.b-c`` → ``label_a_b_c``."""
    return "label_" + _NOT_LABEL_CHAR.sub("_", docker_label)


def _label_names(keys: Sequence[str], source: str) -> tuple[tuple[str, str], ...]:
    """``(docker key, prometheus label)`` pairs; two keys may not map to one label."""
    seen: dict[str, str] = {}
    for key in keys:
        name = label_name(key)
        if name in seen:
            raise ConfigError(
                "metrics.container_labels",
                source,
                f"{seen[name]!r} and {key!r} both become the metric label {name!r}",
            )
        seen[name] = key
    return tuple((key, name) for name, key in seen.items())


# -- state read at scrape time -------------------------------------------------------

_ATTEMPT_RESULTS = ("success", *(kind.value for kind in ErrorKind))
_STATES = tuple(ConnectionState)
_TRANSITIONS = sorted(TRANSITIONS, key=lambda t: (_STATES.index(t[0]), _STATES.index(t[1])))


class RuntimeCollector(Collector):
    """Connection state, cache and subscriber figures, read from the runtime per scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        runtime = self._metrics.runtime
        if runtime is None:
            return ()
        return self._families(runtime)

    def _families(self, runtime: Runtime | None = None) -> list[Metric]:
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        state = gauge(
            PREFIX + "docker_connection_state",
            "Connection to Docker: 1 for the current state, 0 for the others.",
            labels=["state"],
        )
        up = gauge(PREFIX + "docker_up", "1 when connected to Docker, else 0.")
        transitions = counter(
            PREFIX + "docker_state_transitions",
            "Moves of the connection state machine.",
            labels=["from", "to"],
        )
        attempts = counter(
            PREFIX + "docker_connect_attempts",
            "Attempts to connect to Docker, by result (success or the error kind).",
            labels=["result"],
        )
        backoff = gauge(
            PREFIX + "docker_backoff_seconds",
            "Seconds until the next connection attempt (0 when connected).",
        )
        last_error = gauge(
            PREFIX + "docker_last_error_info",
            "1 for the kind of the last connection error, while not connected.",
            labels=["kind"],
        )
        endpoint = gauge(
            PREFIX + "docker_endpoint_info",
            "1 for the Docker endpoint in use (the last one tried).",
            labels=["host"],
        )
        synced = gauge(
            PREFIX + "mirror_synced",
            "1 when the mirror has been reconciled with Docker since the last connect.",
        )
        revision = gauge(PREFIX + "cache_revision", "Revision of the container mirror.")
        containers = gauge(
            PREFIX + "containers", "Containers in the mirror, by state.", labels=["state"]
        )
        subscribers = gauge(PREFIX + "subscribers", "Clients following the event stream.")
        overflows = counter(
            PREFIX + "subscriber_overflows",
            "Event-stream subscribers cut off for falling behind.",
        )
        families: list[Metric] = [
            state,
            up,
            transitions,
            attempts,
            backoff,
            last_error,
            endpoint,
            synced,
            revision,
            containers,
            subscribers,
            overflows,
        ]
        if runtime is None:
            return families

        machine = runtime.machine
        connected = machine.connected
        for s in _STATES:
            state.add_metric([s.value], 1.0 if machine.state is s else 0.0)
        up.add_metric([], 1.0 if connected else 0.0)
        moves = machine.transition_counts
        for source, target in _TRANSITIONS:
            transitions.add_metric([source.value, target.value], moves[(source, target)])
        for (source, target), count in moves.items():  # pragma: no cover - table is closed
            if (source, target) not in TRANSITIONS:
                transitions.add_metric([source.value, target.value], count)
        results = machine.attempt_results
        for result in (*_ATTEMPT_RESULTS, *sorted(set(results) - set(_ATTEMPT_RESULTS))):
            attempts.add_metric([result], results[result])
        wait = None if connected else machine.retry_in(self._metrics.clock())
        backoff.add_metric([], wait or 0.0)
        if not connected and machine.last_error is not None:
            last_error.add_metric([machine.last_error.kind.value], 1.0)
        if runtime.watcher.endpoint is not None:
            endpoint.add_metric([runtime.watcher.endpoint.url], 1.0)
        synced.add_metric([], 1.0 if runtime.watcher.synced else 0.0)
        revision.add_metric([], runtime.cache.revision)
        by_state = Tally(r.state for r in self._metrics.current_records())
        for name in (*CONTAINER_STATES, *sorted(set(by_state) - set(CONTAINER_STATES))):
            containers.add_metric([name], by_state[name])
        subscribers.add_metric([], runtime.feed.subscribers)
        overflows.add_metric([], runtime.feed.overflows)
        return families


# -- per-container series ------------------------------------------------------------

#: (suffix, help) of every per-container family, in exposition order. All gauges.
CONTAINER_FAMILIES: tuple[tuple[str, str], ...] = (
    ("container_running", "1 when the container is running, else 0."),
    (
        "container_health",
        "Healthcheck status, one-hot (absent when the container has no healthcheck).",
    ),
    ("container_restart_count", "Restarts by Docker's restart policy (RestartCount)."),
    ("container_oom_killed", "1 when the container's last exit was an OOM kill, else 0."),
    ("container_started_time_seconds", "When the container last started, since the epoch."),
    ("container_info", "Image and id of each container; always 1."),
)
_RUNNING, _HEALTH, _RESTARTS, _OOM, _STARTED, _INFO = range(len(CONTAINER_FAMILIES))

_Sample = tuple[int, dict[str, str], float]


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class ContainerCollector(Collector):
    """The per-container families, read from the cache at scrape time."""

    def __init__(self, metrics: Metrics, label_keys: Sequence[tuple[str, str]] = ()) -> None:
        self._metrics = metrics
        # Sorted by label name, as the exposition sorts labels; all sort before "name".
        self._label_keys = tuple(sorted(label_keys, key=lambda pair: pair[1]))
        self._separately = False
        # id -> (record, its lines per family); rebuilt on each render, so it holds
        # only containers still in the mirror.
        self._lines: dict[str, tuple[ContainerRecord, tuple[str, ...]]] = {}
        self._block: tuple[object, int, bytes] | None = None
        self._names = tuple(PREFIX + suffix for suffix, _ in CONTAINER_FAMILIES)
        self._headers = tuple(
            f"# HELP {PREFIX}{suffix} {doc}\n# TYPE {PREFIX}{suffix} gauge\n"
            for suffix, doc in CONTAINER_FAMILIES
        )

    @property
    def label_keys(self) -> tuple[tuple[str, str], ...]:
        return self._label_keys

    def describe(self) -> Iterable[Metric]:
        return self._empty_families()

    @contextlib.contextmanager
    def formatted_separately(self) -> Iterator[None]:
        """Within: :meth:`collect` yields nothing, as :meth:`exposition` supplies the text."""
        self._separately = True
        try:
            yield
        finally:
            self._separately = False

    def _empty_families(self) -> list[Metric]:
        return [GaugeMetricFamily(PREFIX + suffix, doc) for suffix, doc in CONTAINER_FAMILIES]

    def samples(self, record: ContainerRecord) -> list[_Sample]:
        """Every sample of one container: (family index, labels, value)."""
        compose = record.compose
        base = {
            "name": record.name,
            "compose_project": compose.project if compose else "",
            "compose_service": (compose.service or "") if compose else "",
        }
        for key, name in self._label_keys:
            base[name] = record.labels.get(key, "")
        out: list[_Sample] = [(_RUNNING, base, 1.0 if record.running else 0.0)]
        if record.health is not None:
            for status in HEALTH_STATES:
                value = 1.0 if record.health == status else 0.0
                out.append((_HEALTH, {**base, "status": status}, value))
        out.append((_RESTARTS, base, float(record.restart_count)))
        out.append((_OOM, base, 1.0 if record.oom_killed else 0.0))
        if record.started_at is not None:
            with contextlib.suppress(ValueError):  # omitted rather than wrong
                out.append((_STARTED, base, parse_rfc3339(record.started_at)))
        out.append((_INFO, {**base, "image": record.image, "id": record.id}, 1.0))
        return out

    def collect(self) -> Iterable[Metric]:
        if self._separately:
            return []
        families = self._empty_families()
        if self._metrics.runtime is None:
            return families
        for record in self._metrics.current_records():
            for index, labels, value in self.samples(record):
                families[index].add_sample(families[index].name, labels, value)
        return families

    def _render_record(self, record: ContainerRecord) -> tuple[str, ...]:
        """The lines of :meth:`samples`, formatted as generate_latest would (labels sorted).

        Written out rather than generic because it runs for every container on the
        first scrape: in sorted order, ``id`` and ``image`` fall between
        ``compose_service`` and the ``label_*``/``name`` labels, and ``status`` after all.
        """
        compose = record.compose
        project = _escape(compose.project) if compose else ""
        service = _escape(compose.service or "") if compose else ""
        head = f'compose_project="{project}",compose_service="{service}"'
        extra = "".join(
            f',{name}="{_escape(record.labels.get(key, ""))}"' for key, name in self._label_keys
        )
        tail = f'{extra},name="{_escape(record.name)}"'
        labels = "{" + head + tail
        names = self._names
        health = ""
        if record.health is not None:
            health = "".join(
                f'{names[_HEALTH]}{labels},status="{status}"}} '
                f"{'1.0' if record.health == status else '0.0'}\n"
                for status in HEALTH_STATES
            )
        started = ""
        if record.started_at is not None:
            with contextlib.suppress(ValueError):
                seconds = _go_float(parse_rfc3339(record.started_at))
                started = f"{names[_STARTED]}{labels}}} {seconds}\n"
        info = f'{{{head},id="{_escape(record.id)}",image="{_escape(record.image)}"{tail}}}'
        return (
            f"{names[_RUNNING]}{labels}}} {'1.0' if record.running else '0.0'}\n",
            health,
            f"{names[_RESTARTS]}{labels}}} {_go_float(float(record.restart_count))}\n",
            f"{names[_OOM]}{labels}}} {'1.0' if record.oom_killed else '0.0'}\n",
            started,
            f"{names[_INFO]}{info} 1.0\n",
        )

    def exposition(self) -> bytes:
        """The text of every per-container family; the same as generate_latest would make."""
        runtime = self._metrics.runtime
        if runtime is None:
            return "".join(self._headers).encode()
        cache = runtime.cache
        block = self._block
        if block is not None and block[0] is cache and block[1] == cache.revision:
            return block[2]
        old, new = self._lines, {}
        rows: list[tuple[str, ...]] = []
        for record in self._metrics.current_records():
            hit = old.get(record.id)
            if hit is None or hit[0] is not record:
                hit = (record, self._render_record(record))
            new[record.id] = hit
            rows.append(hit[1])
        self._lines = new
        text: list[str] = []
        for index, header in enumerate(self._headers):
            text.append(header)
            text.extend(row[index] for row in rows)
        body = "".join(text).encode()
        self._block = (cache, cache.revision, body)
        return body


# -- the facade ----------------------------------------------------------------------


class Metrics:
    """The metrics of one supervisor: observer of the watcher and the API, and exposition."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.runtime: Runtime | None = None
        self.clock = clock
        self.registry = CollectorRegistry()
        self._records_key: tuple[object, int] | None = None
        self._records: list[ContainerRecord] = []

        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

        self._events = Counter(
            PREFIX + "docker_events_total",
            "Docker container events received, by normalised action (unknown ones: other).",
            ["action"],
            registry=self.registry,
        )
        for action in (*KNOWN_ACTIONS, "other"):
            self._events.labels(action)
        self._malformed = Counter(
            PREFIX + "docker_events_malformed_total",
            "Unusable objects on the event stream, and unusable inspect results.",
            registry=self.registry,
        )
        self._inspects = Counter(
            PREFIX + "docker_inspects_total",
            "Container inspects completed (a measure of event coalescing).",
            registry=self.registry,
        )
        self._resyncs = Counter(
            PREFIX + "resyncs_total",
            "Full reconciliations of the mirror with Docker (one per connect).",
            registry=self.registry,
        )
        self._resync_seconds = Histogram(
            PREFIX + "resync_duration_seconds",
            "Time to list, inspect and reconcile every container after a connect.",
            buckets=RESYNC_BUCKETS,
            registry=self.registry,
        )
        self._propagation = Histogram(
            PREFIX + "event_propagation_seconds",
            "From Docker's event time (timeNano) to the change being published.",
            buckets=PROPAGATION_BUCKETS,
            registry=self.registry,
        )
        self._requests = Counter(
            PREFIX + "api_requests_total",
            "API requests answered, by route template and status code.",
            ["route", "code"],
            registry=self.registry,
        )
        self._request_seconds = Histogram(
            PREFIX + "api_request_duration_seconds",
            "Time to answer an API request (event streams: to the response head), by route.",
            ["route"],
            buckets=API_BUCKETS,
            registry=self.registry,
        )
        self._routes: set[str] = set()
        self.registry.register(RuntimeCollector(self))
        self.containers = ContainerCollector(self)
        self.registry.register(self.containers)

    def bind(self, runtime: Runtime) -> None:
        """Read this runtime from now on; checks ``metrics.container_labels``."""
        settings = runtime.settings
        keys = settings.metrics.container_labels
        source = settings.sources()["metrics.container_labels"]
        self.registry.unregister(self.containers)
        self.containers = ContainerCollector(self, _label_names(keys, source))
        self.registry.register(self.containers)
        self.runtime = runtime
        self._records_key = None

    def current_records(self) -> list[ContainerRecord]:
        """The mirror's records, one per name, computed at most once per cache revision.

        Docker names are unique, but the mirror may briefly hold two records of one
        name (a compose recreate whose rename is still being inspected); the same
        series twice would spoil the scrape, so the running, then newest, one wins.
        """
        runtime = self.runtime
        if runtime is None:
            return []
        cache = runtime.cache
        if self._records_key == (cache, cache.revision):
            return self._records
        records = cache.records()  # sorted by name, then id: duplicates are adjacent
        unique: list[ContainerRecord] = []
        for record in records:
            if unique and unique[-1].name == record.name:
                if _precedence(record) > _precedence(unique[-1]):
                    unique[-1] = record
                continue
            unique.append(record)
        self._records_key, self._records = (cache, cache.revision), unique
        return unique

    # -- WatchObserver -------------------------------------------------------------

    def event(self, action: str) -> None:
        self._events.labels(action if action in KNOWN_ACTIONS else "other").inc()

    def malformed(self) -> None:
        self._malformed.inc()

    def inspected(self) -> None:
        self._inspects.inc()

    def resynced(self, seconds: float) -> None:
        self._resyncs.inc()
        self._resync_seconds.observe(seconds)

    def propagated(self, seconds: float) -> None:
        self._propagation.observe(seconds)

    # -- API -----------------------------------------------------------------------

    def api_request(self, route: str, code: int, seconds: float) -> None:
        """Count one answered request; ``route`` is the route template, not the path."""
        if route not in self._routes:
            if len(self._routes) >= MAX_ROUTES:
                route = "other"
            else:
                self._routes.add(route)
        self._requests.labels(route, str(code)).inc()
        self._request_seconds.labels(route).observe(seconds)

    @property
    def label_keys(self) -> tuple[tuple[str, str], ...]:
        """``(Docker label key, metric label)`` per ``metrics.container_labels`` entry.

        For other rooms' per-container collectors, so that every per-container
        series carries the same labels.
        """
        return self.containers.label_keys

    def render(self) -> tuple[bytes, str]:
        """The text exposition of the whole registry, and its content type.

        Everything registered on :attr:`registry` is included; the per-container
        families are formatted by :meth:`ContainerCollector.exposition` instead of
        prometheus-client (see the module docstring).
        """
        with self.containers.formatted_separately():
            head = generate_latest(self.registry)
        return head + self.containers.exposition(), CONTENT_TYPE


def _precedence(record: ContainerRecord) -> tuple[bool, float]:
    created = 0.0
    if record.created is not None:
        with contextlib.suppress(ValueError):
            created = parse_rfc3339(record.created)
    return (record.running, created)
