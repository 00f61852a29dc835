"""Live resource stats: Docker stats JSON in, samples kept beside the mirror. Pure.

Theory of operation
-------------------
The sampler (``sampler.py``) asks Docker for one stats body per running container
and round, and hands it to :meth:`StatsStore.update`, which turns it into an
immutable :class:`StatsSample` with :func:`sample_from_stats`. Everything derived
is computed the way ``docker stats`` computes it:

* **CPU %** is ``Δ container usage / Δ system usage * online CPUs * 100`` between
  two consecutive samples *of ours* (one-shot stats carry no usable
  ``precpu_stats``), so the first sample of a container run has ``null``, never
  0. A counter that went backwards (the container restarted in between) starts
  over; two samples of the same collection tick (Δ system = 0) keep the last
  value.
* **Memory** excludes the page cache: ``usage - total_inactive_file`` on cgroup
  v1, ``usage - inactive_file`` on cgroup v2 (``cache`` for daemons that report
  neither), as the docker CLI does; the percentage is of ``memory_stats.limit``.
* **Network** per interface (``rx_bytes``, ``tx_bytes``); **block I/O** read and
  written summed over devices from ``io_service_bytes_recursive`` (``Read``/
  ``Write`` on cgroup v1, ``read``/``write`` on v2); **pids** from ``pids_stats``.

Stats live beside the container records, not inside them: a new sample is not a
container change, so the cache's revision and delta history never see one. A
sample belongs to one *run* of a container (its ``started_at``); every read
(:meth:`StatsStore.get`, :meth:`StatsStore.json`, :func:`collect`) checks the
mirror, so stats of a container that was removed, stopped or restarted since its
sample are dropped at that moment and never served.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from supervisor.cache import Cache, dumps
from supervisor.records import ContainerRecord, parse_rfc3339, rfc3339

__all__ = [
    "STATS_FAMILIES",
    "STATS_FIELDS",
    "StatsCollector",
    "StatsSample",
    "StatsStore",
    "collect",
    "describe",
    "sample_from_stats",
]

#: The ``stats`` object of the API, in order. A contract: clients read these names.
STATS_FIELDS = (
    "cpu_percent",
    "memory_usage_bytes",
    "memory_limit_bytes",
    "memory_percent",
    "network",
    "block_read_bytes",
    "block_write_bytes",
    "pids",
    "sampled_at",
)

# The same prefix as supervisor.metrics.PREFIX; not imported, as metrics imports us.
_PREFIX = "homelabarr_supervisor_"
_ZERO_TIME_PREFIX = "0001-01-01"


@dataclass(frozen=True, slots=True)
class StatsSample:
    """One stats reading of one container run, with what is derived from it."""

    #: When dockerd collected it (its ``read`` time), seconds since the epoch.
    read_at: float
    #: ``started_at`` of the container record this sample belongs to (its run).
    started_at: str | None
    #: Cumulative CPU time of the container, nanoseconds (``cpu_usage.total_usage``).
    cpu_usage_ns: int
    #: Cumulative CPU time of the host, nanoseconds (``system_cpu_usage``).
    system_cpu_ns: int | None
    online_cpus: int | None
    cpu_percent: float | None
    memory_usage_bytes: int | None
    memory_limit_bytes: int | None
    #: ``(interface, rx_bytes, tx_bytes)``, sorted by interface.
    network: tuple[tuple[str, int, int], ...]
    block_read_bytes: int
    block_write_bytes: int
    pids: int | None

    @property
    def memory_percent(self) -> float | None:
        usage, limit = self.memory_usage_bytes, self.memory_limit_bytes
        if usage is None or not limit:
            return None
        return usage / limit * 100.0

    @property
    def cpu_seconds_total(self) -> float:
        return self.cpu_usage_ns / 1e9

    @property
    def network_rx_bytes(self) -> int:
        return sum(rx for _, rx, _ in self.network)

    @property
    def network_tx_bytes(self) -> int:
        return sum(tx for _, _, tx in self.network)

    def to_json(self) -> dict[str, object]:
        """The API's ``stats`` object: exactly :data:`STATS_FIELDS`."""
        memory_percent = self.memory_percent
        return {
            "cpu_percent": None if self.cpu_percent is None else round(self.cpu_percent, 3),
            "memory_usage_bytes": self.memory_usage_bytes,
            "memory_limit_bytes": self.memory_limit_bytes,
            "memory_percent": None if memory_percent is None else round(memory_percent, 3),
            "network": {name: {"rx_bytes": rx, "tx_bytes": tx} for name, rx, tx in self.network},
            "block_read_bytes": self.block_read_bytes,
            "block_write_bytes": self.block_write_bytes,
            "pids": self.pids,
            "sampled_at": rfc3339(self.read_at),
        }


# -- parsing -------------------------------------------------------------------------


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _count(value: object) -> int | None:
    """A non-negative integer from Docker's JSON, or None (bools and junk are not counts)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _memory_usage(memory: Mapping[str, Any]) -> int | None:
    usage = _count(memory.get("usage"))
    if usage is None:
        return None
    stats = _mapping(memory.get("stats"))
    # cgroup v1 has both total_inactive_file and inactive_file: the total comes first.
    for key in ("total_inactive_file", "inactive_file", "total_cache", "cache"):
        if key in stats:
            cache = _count(stats[key])
            if cache is not None and cache < usage:
                return usage - cache
            return usage
    return usage


def _block_io(blkio: Mapping[str, Any]) -> tuple[int, int]:
    read = written = 0
    entries = blkio.get("io_service_bytes_recursive")
    for entry in entries if isinstance(entries, list) else ():
        entry = _mapping(entry)
        op = entry.get("op")
        value = _count(entry.get("value"))
        if not isinstance(op, str) or value is None:
            continue
        if op.lower() == "read":
            read += value
        elif op.lower() == "write":
            written += value
    return read, written


def _network(body: Mapping[str, Any]) -> tuple[tuple[str, int, int], ...]:
    interfaces = []
    for name, counters in _mapping(body.get("networks")).items():
        counters = _mapping(counters)
        interfaces.append(
            (
                str(name),
                _count(counters.get("rx_bytes")) or 0,
                _count(counters.get("tx_bytes")) or 0,
            )
        )
    return tuple(sorted(interfaces))


def _cpu_percent(
    previous: StatsSample | None, usage_ns: int, system_ns: int | None, online: int | None
) -> float | None:
    if previous is None or system_ns is None or previous.system_cpu_ns is None or not online:
        return None
    usage_delta = usage_ns - previous.cpu_usage_ns
    system_delta = system_ns - previous.system_cpu_ns
    if usage_delta < 0 or system_delta < 0:
        return None  # a counter went backwards: a new run, start over
    if system_delta == 0:
        return previous.cpu_percent  # the same collection tick: nothing new to say
    return usage_delta / system_delta * online * 100.0


def sample_from_stats(
    body: Mapping[str, Any],
    previous: StatsSample | None = None,
    *,
    started_at: str | None = None,
) -> StatsSample | None:
    """The sample in a ``GET /containers/{id}/stats`` body; None if it says "not running".

    ``previous`` is the last sample of the same container run (same ``started_at``),
    the base for the CPU percentage; pass None for the first one. Docker answers
    for a stopped container with an empty body whose ``read`` is its zero time.
    Raises ``ValueError`` for a body that is not a JSON object.
    """
    if not isinstance(body, Mapping):
        raise ValueError(f"stats body is not an object: {body!r:.200}")
    read = body.get("read")
    if not isinstance(read, str) or not read or read.startswith(_ZERO_TIME_PREFIX):
        return None
    read_at = parse_rfc3339(read)
    cpu = _mapping(body.get("cpu_stats"))
    usage = _mapping(cpu.get("cpu_usage"))
    usage_ns = _count(usage.get("total_usage")) or 0
    system_ns = _count(cpu.get("system_cpu_usage"))
    online = _count(cpu.get("online_cpus"))
    if not online:
        percpu = usage.get("percpu_usage")
        online = len(percpu) if isinstance(percpu, list) and percpu else None
    if previous is not None and previous.started_at != started_at:
        previous = None
    memory = _mapping(body.get("memory_stats"))
    block_read, block_write = _block_io(_mapping(body.get("blkio_stats")))
    return StatsSample(
        read_at=read_at,
        started_at=started_at,
        cpu_usage_ns=usage_ns,
        system_cpu_ns=system_ns,
        online_cpus=online,
        cpu_percent=_cpu_percent(previous, usage_ns, system_ns, online),
        memory_usage_bytes=_memory_usage(memory),
        memory_limit_bytes=_count(memory.get("limit")) or None,
        network=_network(body),
        block_read_bytes=block_read,
        block_write_bytes=block_write,
        pids=_count(_mapping(body.get("pids_stats")).get("current")),
    )


# -- the store -----------------------------------------------------------------------


class StatsStore:
    """The latest sample of every running container, by id, beside the cache.

    Written by the sampler, read by the API and the metrics collector, all on the
    event loop's thread (no lock). Reads consult the cache: a sample whose
    container is gone, not running, or running again since (another
    ``started_at``) is dropped instead of returned.
    """

    def __init__(self, cache: Cache) -> None:
        self._cache = cache
        self._samples: dict[str, StatsSample] = {}
        self._json: dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def __contains__(self, container_id: object) -> bool:
        return isinstance(container_id, str) and self.get(container_id) is not None

    def update(
        self, container_id: str, body: Mapping[str, Any], *, started_at: str | None
    ) -> StatsSample | None:
        """Store the sample in ``body`` for the run ``started_at``; None (and dropped) if
        the body says the container is not running. ``ValueError`` for a malformed body."""
        previous = self._samples.get(container_id)
        sample = sample_from_stats(body, previous, started_at=started_at)
        if sample is None:
            self.drop(container_id)
            return None
        self._samples[container_id] = sample
        self._json.pop(container_id, None)
        return sample

    def get(self, container_id: str) -> StatsSample | None:
        """The latest sample, if its container is still running the same run."""
        sample = self._samples.get(container_id)
        if sample is None:
            return None
        record = self._cache.get(container_id)
        if record is None or not record.running or record.started_at != sample.started_at:
            self.drop(container_id)
            return None
        return sample

    def drop(self, container_id: str) -> None:
        self._samples.pop(container_id, None)
        self._json.pop(container_id, None)

    def retain(self, ids: Iterable[str]) -> None:
        """Drop every sample whose id is not in ``ids``."""
        keep = set(ids)
        for container_id in [cid for cid in self._samples if cid not in keep]:
            self.drop(container_id)

    def prune(self) -> None:
        """Drop the samples :meth:`get` would no longer return."""
        for container_id in list(self._samples):
            self.get(container_id)

    def json(self, container_id: str) -> dict[str, object] | None:
        """The API's ``stats`` object for one container, or None (not running, not sampled yet)."""
        sample = self.get(container_id)
        return None if sample is None else sample.to_json()

    def json_bytes(self, container_id: str) -> bytes:
        """:meth:`json` encoded (``null`` when None), built once per sample."""
        if self.get(container_id) is None:
            return b"null"
        encoded = self._json.get(container_id)
        if encoded is None:
            encoded = self._json[container_id] = dumps(self.json(container_id))
        return encoded

    def container_json(self, container_id: str) -> bytes:
        """The cache's JSON of one record with ``"stats": {...}`` (or null) added at the end."""
        record_json = self._cache.record_json(container_id)
        return record_json[:-1] + b',"stats":' + self.json_bytes(container_id) + b"}"

    def containers_json(self, records: Iterable[ContainerRecord]) -> bytes:
        """The JSON array of :meth:`container_json` for ``records`` (``?stats=1``)."""
        return b"[" + b",".join(self.container_json(r.id) for r in records) + b"]"


# -- Prometheus ----------------------------------------------------------------------

#: (suffix, help, counter?) of every stats family, in exposition order.
STATS_FAMILIES: tuple[tuple[str, str, bool], ...] = (
    ("container_cpu_seconds", "CPU time used by the container, seconds (live stats).", True),
    (
        "container_memory_usage_bytes",
        "Memory used by the container without the page cache, as docker stats shows it.",
        False,
    ),
    ("container_memory_limit_bytes", "Memory limit of the container (host memory if none).", False),
    (
        "container_network_receive_bytes",
        "Bytes received by the container, summed over its interfaces.",
        True,
    ),
    (
        "container_network_transmit_bytes",
        "Bytes sent by the container, summed over its interfaces.",
        True,
    ),
)


def describe() -> list[Metric]:
    """The stats families without samples (a collector's ``describe()``)."""
    return [
        CounterMetricFamily(_PREFIX + suffix, doc)
        if counter
        else GaugeMetricFamily(_PREFIX + suffix, doc)
        for suffix, doc, counter in STATS_FAMILIES
    ]


def _labels(record: ContainerRecord, label_keys: Sequence[tuple[str, str]]) -> dict[str, str]:
    compose = record.compose
    labels = {
        "name": record.name,
        "compose_project": compose.project if compose else "",
        "compose_service": (compose.service or "") if compose else "",
    }
    for key, name in label_keys:
        labels[name] = record.labels.get(key, "")
    return labels


def collect(
    store: StatsStore, cache: Cache, label_keys: Sequence[tuple[str, str]] = ()
) -> list[Metric]:
    """The stats families, read from the store at scrape time.

    ``label_keys`` are ``(docker label key, prometheus label)`` pairs, as the metrics
    room derives them from ``metrics.container_labels``. Only running containers
    with a sample appear, so a removed or stopped container leaves no series; one
    series per name (the first record of a name wins, as names are unique while
    running).
    """
    cpu, usage, limit, rx, tx = families = describe()
    seen: set[str] = set()
    for record in _running(cache):
        sample = store.get(record.id)
        if sample is None or record.name in seen:
            continue
        seen.add(record.name)
        labels = _labels(record, label_keys)
        # Counter families are named without "_total"; their samples carry it.
        cpu.add_sample(cpu.name + "_total", labels, sample.cpu_seconds_total)
        if sample.memory_usage_bytes is not None:
            usage.add_sample(usage.name, labels, float(sample.memory_usage_bytes))
        if sample.memory_limit_bytes is not None:
            limit.add_sample(limit.name, labels, float(sample.memory_limit_bytes))
        rx.add_sample(rx.name + "_total", labels, float(sample.network_rx_bytes))
        tx.add_sample(tx.name + "_total", labels, float(sample.network_tx_bytes))
    return families


class StatsCollector(Collector):
    """:func:`collect` for a registry: the store read at scrape time.

    ``label_keys`` is called at each scrape (the metrics room settles them when it
    binds the runtime), so the stats series carry the same labels as the other
    per-container series.
    """

    def __init__(
        self,
        store: StatsStore,
        cache: Cache,
        label_keys: Callable[[], Sequence[tuple[str, str]]] = tuple,
    ) -> None:
        self._store = store
        self._cache = cache
        self._label_keys = label_keys

    def describe(self) -> Iterable[Metric]:
        return describe()

    def collect(self) -> Iterable[Metric]:
        return collect(self._store, self._cache, self._label_keys())


def _running(cache: Cache) -> Iterator[ContainerRecord]:
    for record in cache.records():
        if record.running:
            yield record
