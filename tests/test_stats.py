"""Live stats, the pure part: Docker stats JSON → samples, the store beside the cache, metrics.

Real bodies come from tests/test_stats_bodies.json (captured from the test dockerd,
cgroup v1); cgroup v2 bodies are written by hand in the shape Docker gives them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from supervisor.cache import Cache
from supervisor.records import ContainerRecord, parse_rfc3339, record_from_inspect
from supervisor.stats import (
    STATS_FIELDS,
    StatsCollector,
    StatsSample,
    StatsStore,
    collect,
    describe,
    sample_from_stats,
)

BODIES: dict[str, Any] = json.loads(
    (Path(__file__).with_name("test_stats_bodies.json")).read_text(encoding="utf-8")
)
STARTED = "2026-12-04T16:00:00.000000Z"
MIB = 1024 * 1024


def body(name: str) -> dict[str, Any]:
    """A deep copy of one captured body."""
    return copy.deepcopy(BODIES[name])


def v2_body(
    *,
    read: str = "2026-12-04T16:00:10.000000000Z",
    cpu_ns: int = 2_000_000_000,
    system_ns: int = 100_000_000_000,
    online: int | None = 4,
) -> dict[str, Any]:
    """A cgroup v2 stats body in the shape Docker 20.10+ gives on a unified hierarchy."""
    cpu: dict[str, Any] = {
        "cpu_usage": {
            "total_usage": cpu_ns,
            "usage_in_kernelmode": 0,
            "usage_in_usermode": cpu_ns,
        },
        "system_cpu_usage": system_ns,
        "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0},
    }
    if online is not None:
        cpu["online_cpus"] = online
    return {
        "read": read,
        "preread": "0001-01-01T00:00:00Z",
        "pids_stats": {"current": 7, "limit": 4915},
        "blkio_stats": {
            "io_service_bytes_recursive": [
                {"major": 8, "minor": 0, "op": "read", "value": 4096},
                {"major": 8, "minor": 0, "op": "write", "value": 8192},
                {"major": 8, "minor": 16, "op": "read", "value": 100},
                {"major": 8, "minor": 16, "op": "write", "value": 1},
            ],
            "io_serviced_recursive": None,
        },
        "num_procs": 0,
        "storage_stats": {},
        "cpu_stats": cpu,
        "precpu_stats": {"cpu_usage": {"total_usage": 0}, "throttling_data": {}},
        "memory_stats": {
            "usage": 50 * MIB,
            "stats": {
                "anon": 30 * MIB,
                "file": 20 * MIB,
                "active_file": 8 * MIB,
                "inactive_file": 12 * MIB,
                "shmem": 0,
            },
            "limit": 200 * MIB,
        },
        "name": "/web",
        "id": "c" * 64,
        "networks": {
            "eth1": {"rx_bytes": 10, "tx_bytes": 20, "rx_packets": 1, "tx_packets": 1},
            "eth0": {"rx_bytes": 1000, "tx_bytes": 2000, "rx_packets": 9, "tx_packets": 9},
        },
    }


def record(
    container_id: str,
    name: str,
    *,
    status: str = "running",
    started_at: str = STARTED,
    labels: dict[str, str] | None = None,
) -> ContainerRecord:
    """A container record as the watcher would store it."""
    return record_from_inspect(
        {
            "Id": container_id,
            "Name": "/" + name,
            "State": {"Status": status, "StartedAt": started_at},
            "Config": {"Image": "busybox", "Labels": labels or {}},
        }
    )


# -- parsing: real cgroup v1 bodies --------------------------------------------------


def test_first_sample_has_no_cpu_percent() -> None:
    """The first sample of a container run has CPU % null, not 0 (one-shot has no precpu)."""
    sample = sample_from_stats(body("busy_1"), started_at=STARTED)
    assert sample is not None
    assert sample.cpu_percent is None
    assert sample.to_json()["cpu_percent"] is None
    assert sample.cpu_usage_ns == 1_389_854_958
    assert sample.cpu_seconds_total == pytest.approx(1.389854958)


def test_cpu_percent_from_two_real_samples() -> None:
    """CPU % = Δ usage / Δ system * online CPUs * 100 between two consecutive real samples."""
    first = sample_from_stats(body("busy_1"), started_at=STARTED)
    second = sample_from_stats(body("busy_2"), first, started_at=STARTED)
    assert second is not None
    expected = (1_749_029_440 - 1_389_854_958) / (2_631_710_000_000 - 2_628_670_000_000) * 2 * 100
    assert second.cpu_percent == pytest.approx(expected)
    assert 20 < expected < 30  # a busy loop on a loaded 2-CPU machine, as captured
    assert second.online_cpus == 2


def test_memory_excludes_page_cache_on_cgroup_v1() -> None:
    """cgroup v1: usage minus total_inactive_file, so 30 MB of file cache is not counted."""
    raw = body("page_cache")
    sample = sample_from_stats(raw)
    assert sample is not None
    memory = raw["memory_stats"]
    assert memory["usage"] > 30_000_000  # what Docker reports, cache included
    assert sample.memory_usage_bytes == memory["usage"] - memory["stats"]["total_inactive_file"]
    assert sample.memory_usage_bytes is not None and sample.memory_usage_bytes < 2 * MIB


def test_memory_limit_and_percent() -> None:
    """A 64 MiB limit is reported, and the percentage is usage over limit."""
    sample = sample_from_stats(body("limited"))
    assert sample is not None
    assert sample.memory_limit_bytes == 64 * MIB
    assert sample.memory_usage_bytes is not None and sample.memory_usage_bytes > 19 * MIB
    percent = sample.memory_percent
    assert percent is not None
    assert percent == pytest.approx(sample.memory_usage_bytes / (64 * MIB) * 100)
    assert sample.to_json()["memory_percent"] == round(percent, 3)


def test_network_pids_and_empty_block_io_from_real_body() -> None:
    """Per-interface counters and pids come through; an empty blkio list is zero, not missing."""
    sample = sample_from_stats(body("network"))
    assert sample is not None
    assert sample.network == (("eth0", 1380, 574),)
    assert sample.to_json()["network"] == {"eth0": {"rx_bytes": 1380, "tx_bytes": 574}}
    assert sample.pids == 2
    assert (sample.block_read_bytes, sample.block_write_bytes) == (0, 0)
    assert sample.read_at == pytest.approx(parse_rfc3339(BODIES["network"]["read"]))


def test_stopped_container_body_is_no_sample() -> None:
    """Docker's answer for a stopped container (zero read time, empty stats) gives None."""
    assert BODIES["stopped"]["read"].startswith("0001-01-01")
    assert sample_from_stats(body("stopped")) is None


def test_network_none_container_has_no_interfaces() -> None:
    """A container on network none has no networks key: an empty map, sums of 0."""
    sample = sample_from_stats(body("busy_1"))
    assert sample is not None
    assert sample.network == ()
    assert (sample.network_rx_bytes, sample.network_tx_bytes) == (0, 0)


# -- parsing: cgroup v2 and edge cases -----------------------------------------------


def test_cgroup_v2_memory_block_io_network() -> None:
    """cgroup v2: usage minus inactive_file; lower-case read/write summed over devices."""
    sample = sample_from_stats(v2_body())
    assert sample is not None
    assert sample.memory_usage_bytes == 38 * MIB
    assert sample.memory_limit_bytes == 200 * MIB
    assert sample.memory_percent == pytest.approx(19.0)
    assert (sample.block_read_bytes, sample.block_write_bytes) == (4196, 8193)
    assert sample.network == (("eth0", 1000, 2000), ("eth1", 10, 20))
    assert (sample.network_rx_bytes, sample.network_tx_bytes) == (1010, 2020)
    assert sample.pids == 7


def test_cgroup_v2_cpu_percent() -> None:
    """Two v2 samples: 1 s of CPU over 10 s of system time on 4 CPUs is 40 %."""
    first = sample_from_stats(v2_body(cpu_ns=2_000_000_000, system_ns=100_000_000_000))
    second = sample_from_stats(v2_body(cpu_ns=3_000_000_000, system_ns=110_000_000_000), first)
    assert second is not None
    assert second.cpu_percent == pytest.approx(40.0)


def test_cgroup_v1_block_io_counts_read_and_write_only() -> None:
    """cgroup v1 lists Read, Write, Sync, Async and Total per device: only Read and Write count."""
    raw = body("limited")
    raw["blkio_stats"]["io_service_bytes_recursive"] = [
        {"major": 253, "minor": 0, "op": op, "value": value}
        for op, value in (("Read", 1000), ("Write", 500), ("Sync", 1500), ("Async", 0))
    ] + [{"major": 253, "minor": 0, "op": "Total", "value": 1500}]
    raw["blkio_stats"]["io_service_bytes_recursive"].append(
        {"major": 7, "minor": 1, "op": "Read", "value": 24}
    )
    sample = sample_from_stats(raw)
    assert sample is not None
    assert (sample.block_read_bytes, sample.block_write_bytes) == (1024, 500)


def test_online_cpus_falls_back_to_percpu_length() -> None:
    """Without online_cpus (older daemons), the number of per-CPU counters is used."""
    first = sample_from_stats(v2_body(cpu_ns=0, system_ns=0, online=None))
    raw = v2_body(cpu_ns=1_000_000_000, system_ns=10_000_000_000, online=None)
    raw["cpu_stats"]["cpu_usage"]["percpu_usage"] = [1, 2]
    second = sample_from_stats(raw, first)
    assert second is not None
    assert second.online_cpus == 2
    assert second.cpu_percent == pytest.approx(20.0)


def test_cpu_percent_restarts_after_a_new_run() -> None:
    """A previous sample of another run (other started_at) is no base: CPU % is null again."""
    first = sample_from_stats(v2_body(), started_at="2026-12-04T10:00:00.000000Z")
    second = sample_from_stats(
        v2_body(cpu_ns=3_000_000_000, system_ns=110_000_000_000), first, started_at=STARTED
    )
    assert second is not None and second.cpu_percent is None


def test_cpu_counter_going_backwards_gives_null() -> None:
    """A container usage counter lower than before (restarted unseen) gives null, not < 0."""
    first = sample_from_stats(v2_body(cpu_ns=5_000_000_000))
    second = sample_from_stats(v2_body(cpu_ns=1_000_000_000, system_ns=110_000_000_000), first)
    assert second is not None and second.cpu_percent is None


def test_same_collection_tick_keeps_the_last_percent() -> None:
    """Two samples from one dockerd tick (Δ system = 0) keep the previous CPU %."""
    a = sample_from_stats(v2_body(cpu_ns=2_000_000_000, system_ns=100_000_000_000))
    b = sample_from_stats(v2_body(cpu_ns=3_000_000_000, system_ns=110_000_000_000), a)
    c = sample_from_stats(v2_body(cpu_ns=3_000_000_000, system_ns=110_000_000_000), b)
    assert b is not None and c is not None
    assert c.cpu_percent == b.cpu_percent == pytest.approx(40.0)


def test_memory_without_inactive_file_falls_back_to_cache_then_usage() -> None:
    """Old daemons report only cache; without either, usage is taken as is."""
    raw = v2_body()
    raw["memory_stats"]["stats"] = {"cache": 10 * MIB}
    sample = sample_from_stats(raw)
    assert sample is not None and sample.memory_usage_bytes == 40 * MIB
    raw["memory_stats"]["stats"] = {}
    sample = sample_from_stats(raw)
    assert sample is not None and sample.memory_usage_bytes == 50 * MIB


def test_inactive_file_above_usage_is_not_subtracted() -> None:
    """An inactive_file not below usage (a racy read) leaves usage as is, never negative."""
    raw = v2_body()
    raw["memory_stats"]["stats"]["inactive_file"] = 60 * MIB
    sample = sample_from_stats(raw)
    assert sample is not None and sample.memory_usage_bytes == 50 * MIB


def test_missing_and_junk_fields_become_null_or_zero() -> None:
    """Missing sections, bools and negative numbers never become values; limit 0 has no %."""
    raw = {
        "read": "2026-12-04T16:00:10Z",
        "cpu_stats": {"cpu_usage": {"total_usage": True}},
        "memory_stats": {"usage": -1, "limit": 0},
        "pids_stats": {"current": "7"},
        "blkio_stats": {"io_service_bytes_recursive": None},
        "networks": {"eth0": {"rx_bytes": None}},
    }
    sample = sample_from_stats(raw)
    assert sample is not None
    assert sample.to_json() == {
        "cpu_percent": None,
        "memory_usage_bytes": None,
        "memory_limit_bytes": None,
        "memory_percent": None,
        "network": {"eth0": {"rx_bytes": 0, "tx_bytes": 0}},
        "block_read_bytes": 0,
        "block_write_bytes": 0,
        "pids": None,
        "sampled_at": "2026-12-04T16:00:10.000000Z",
    }


def test_body_that_is_not_an_object_is_an_error() -> None:
    """A stats body that is not a JSON object raises ValueError (the sampler skips it)."""
    with pytest.raises(ValueError, match="not an object"):
        sample_from_stats([1, 2])  # type: ignore[arg-type]


def test_json_has_exactly_the_contract_fields() -> None:
    """The stats object has exactly the issue's fields, in order, sampled_at in RFC 3339."""
    sample = sample_from_stats(body("network"))
    assert sample is not None
    doc = sample.to_json()
    assert (
        tuple(doc)
        == STATS_FIELDS
        == (
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
    )
    # Docker's read time (nanoseconds) in the API's RFC 3339 form (microseconds, UTC).
    assert BODIES["network"]["read"] == "2026-12-04T16:19:04.836379142Z"
    assert doc["sampled_at"] == "2026-12-04T16:19:04.836379Z"


# -- the store -----------------------------------------------------------------------


def make_store(*records: ContainerRecord) -> tuple[Cache, StatsStore]:
    cache = Cache(16, initial_revision=100)
    for r in records:
        cache.upsert(r)
    return cache, StatsStore(cache)


def test_store_keeps_a_sample_per_container_and_computes_cpu() -> None:
    """update() stores the sample; the second update of the same run has a CPU %."""
    _, store = make_store(record("a" * 64, "web"))
    first = store.update("a" * 64, body("busy_1"), started_at=STARTED)
    assert first is not None and first.cpu_percent is None
    second = store.update("a" * 64, body("busy_2"), started_at=STARTED)
    assert second is not None and second.cpu_percent == pytest.approx(23.63, abs=0.01)
    assert store.get("a" * 64) is second
    assert store.json("a" * 64) == second.to_json()


def test_store_never_bumps_the_cache_revision() -> None:
    """A stats change is not a container change: revision and history stay as they were."""
    cache, store = make_store(record("a" * 64, "web"))
    revision, history = cache.revision, cache.deltas_since(100)
    for name in ("busy_1", "busy_2", "limited"):
        store.update("a" * 64, body(name), started_at=STARTED)
        store.json_bytes("a" * 64)
    assert cache.revision == revision
    assert cache.deltas_since(100) == history


@pytest.mark.parametrize("change", ["removed", "stopped", "restarted"])
def test_store_drops_stats_of_a_container_that_is_no_longer_that_run(change: str) -> None:
    """Removed, stopped or restarted since the sample: get/json answer None and forget it."""
    cid = "a" * 64
    cache, store = make_store(record(cid, "web"))
    store.update(cid, body("limited"), started_at=STARTED)
    assert store.json(cid) is not None
    if change == "removed":
        cache.remove(cid)
    elif change == "stopped":
        cache.upsert(record(cid, "web", status="exited"))
    else:
        cache.upsert(record(cid, "web", started_at="2026-12-04T17:00:00.000000Z"))
    assert store.json(cid) is None
    assert store.get(cid) is None
    assert len(store) == 0


def test_store_update_with_a_stopped_body_drops() -> None:
    """A body that says "not running" removes what the store held."""
    cid = "a" * 64
    _, store = make_store(record(cid, "web"))
    store.update(cid, body("limited"), started_at=STARTED)
    assert store.update(cid, body("stopped"), started_at=STARTED) is None
    assert len(store) == 0


def test_store_retain_prune_and_drop() -> None:
    """retain() keeps the given ids, prune() what is still current, drop() removes one."""
    ids = ["a" * 64, "b" * 64, "c" * 64]
    cache, store = make_store(*(record(cid, f"c{i}") for i, cid in enumerate(ids)))
    for cid in ids:
        store.update(cid, body("limited"), started_at=STARTED)
    store.retain(ids[:2])
    assert len(store) == 2 and ids[2] not in store
    cache.upsert(record(ids[1], "c1", status="exited"))
    store.prune()
    assert len(store) == 1 and ids[0] in store
    store.drop(ids[0])
    assert len(store) == 0
    store.drop("unknown")  # dropping what is not there is fine


def test_store_json_bytes_and_record_splice() -> None:
    """json_bytes() is json() encoded; container_json() adds "stats" to the record's JSON."""
    a, b = "a" * 64, "b" * 64
    cache, store = make_store(record(a, "web"), record(b, "db", status="exited"))
    store.update(a, body("network"), started_at=STARTED)
    assert json.loads(store.json_bytes(a)) == store.json(a)
    assert store.json_bytes(b) == b"null"
    assert store.json_bytes(a) is store.json_bytes(a)  # built once per sample
    doc = json.loads(store.container_json(a))
    assert doc == {**json.loads(cache.record_json(a)), "stats": store.json(a)}
    listing = json.loads(store.containers_json(cache.records()))
    assert [c["name"] for c in listing] == ["db", "web"]
    assert listing[0]["stats"] is None
    assert listing[1]["stats"]["network"] == {"eth0": {"rx_bytes": 1380, "tx_bytes": 574}}


def test_store_json_bytes_follows_a_new_sample() -> None:
    """The cached encoding is replaced when a new sample arrives."""
    cid = "a" * 64
    _, store = make_store(record(cid, "web"))
    store.update(cid, body("busy_1"), started_at=STARTED)
    before = store.json_bytes(cid)
    store.update(cid, body("busy_2"), started_at=STARTED)
    assert store.json_bytes(cid) != before
    assert json.loads(store.json_bytes(cid))["cpu_percent"] is not None


# -- Prometheus ----------------------------------------------------------------------


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def exposition(families: Iterable[Metric]) -> str:
    registry = CollectorRegistry()
    registry.register(_Families(families))
    return generate_latest(registry).decode()


def samples_by_name(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_collect_families_and_values() -> None:
    """The five families carry the store's values, network summed over interfaces."""
    web = "a" * 64
    cache, store = make_store(
        record(
            web,
            "web",
            labels={
                "com.docker.compose.project": "media",
                "com.docker.compose.service": "web",
                "team": "ops",
            },
        )
    )
    raw = v2_body()
    store.update(web, raw, started_at=STARTED)
    text = exposition(collect(store, cache, [("team", "label_team")]))
    got = samples_by_name(text)
    labels = {
        "name": "web",
        "compose_project": "media",
        "compose_service": "web",
        "label_team": "ops",
    }
    p = "homelabarr_supervisor_container_"
    assert got[p + "cpu_seconds_total"] == [(labels, 2.0)]
    assert got[p + "memory_usage_bytes"] == [(labels, float(38 * MIB))]
    assert got[p + "memory_limit_bytes"] == [(labels, float(200 * MIB))]
    assert got[p + "network_receive_bytes_total"] == [(labels, 1010.0)]
    assert got[p + "network_transmit_bytes_total"] == [(labels, 2020.0)]
    assert f"# TYPE {p}cpu_seconds_total counter" in text
    assert f"# TYPE {p}memory_usage_bytes gauge" in text
    assert f"# TYPE {p}network_receive_bytes_total counter" in text


def test_collect_leaves_out_stopped_unsampled_and_duplicate_names() -> None:
    """Only running, sampled containers appear, one series per name; none leaves no series."""
    a, b, c, d = "a" * 64, "b" * 64, "c" * 64, "d" * 64
    cache, store = make_store(
        record(a, "web"), record(b, "db"), record(c, "cron"), record(d, "web")
    )
    for cid in (a, b, d):
        store.update(cid, body("limited"), started_at=STARTED)
    cache.upsert(record(b, "db", status="exited"))
    got = samples_by_name(exposition(collect(store, cache)))
    names = [
        labels["name"] for labels, _ in got["homelabarr_supervisor_container_cpu_seconds_total"]
    ]
    assert names == ["web"]
    cache.remove(a)
    cache.remove(d)
    text = exposition(collect(store, cache))
    assert "homelabarr_supervisor_container_cpu_seconds_total{" not in text
    assert "# TYPE homelabarr_supervisor_container_cpu_seconds_total counter" in text


def test_collect_omits_unknown_memory() -> None:
    """A sample without memory figures has no memory series, but still its counters."""
    cid = "a" * 64
    cache, store = make_store(record(cid, "web"))
    raw = v2_body()
    raw["memory_stats"] = {}
    store.update(cid, raw, started_at=STARTED)
    got = samples_by_name(exposition(collect(store, cache)))
    assert "homelabarr_supervisor_container_memory_usage_bytes" not in got
    assert "homelabarr_supervisor_container_memory_limit_bytes" not in got
    assert len(got["homelabarr_supervisor_container_cpu_seconds_total"]) == 1


def test_sample_is_immutable() -> None:
    """Samples are frozen: a reader can keep one without it changing underneath."""
    sample = sample_from_stats(v2_body())
    assert isinstance(sample, StatsSample)
    with pytest.raises(AttributeError):
        sample.pids = 1  # type: ignore[misc]


def test_describe_names_the_families_collect_fills() -> None:
    """describe() gives the same five families as collect(), empty, for registry checks."""
    cid = "a" * 64
    cache, store = make_store(record(cid, "web"))
    store.update(cid, v2_body(), started_at=STARTED)
    described = describe()
    collected = collect(store, cache)
    assert [(m.name, m.type) for m in described] == [(m.name, m.type) for m in collected]
    assert all(not m.samples for m in described)
    assert all(m.samples for m in collected)


def test_stats_collector_on_a_registry() -> None:
    """StatsCollector registers (describe) and scrapes the store with the labels it is given."""
    cid = "a" * 64
    cache, store = make_store(record(cid, "web", labels={"team": "ops"}))
    registry = CollectorRegistry()
    keys: list[tuple[str, str]] = []
    registry.register(StatsCollector(store, cache, lambda: keys))
    assert (
        "homelabarr_supervisor_container_cpu_seconds_total{"
        not in generate_latest(registry).decode()
    )
    store.update(cid, v2_body(), started_at=STARTED)
    keys.append(("team", "label_team"))  # read at every scrape
    got = samples_by_name(generate_latest(registry).decode())
    assert got["homelabarr_supervisor_container_memory_usage_bytes"] == [
        (
            {"name": "web", "compose_project": "", "compose_service": "", "label_team": "ops"},
            float(38 * MIB),
        )
    ]
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(StatsCollector(store, cache))
