"""The metrics room without Docker: a runtime from build_runtime, a hand-filled cache and machine."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from supervisor.access import Endpoint
from supervisor.daemon import Runtime, build_runtime
from supervisor.metrics import MAX_ROUTES, PREFIX, label_name
from supervisor.records import CONTAINER_STATES, KNOWN_ACTIONS, ContainerRecord, record_from_inspect
from supervisor.settings import ConfigError, DockerSettings, MetricsSettings, Settings
from supervisor.state import TRANSITIONS, DockerFailure, ErrorKind

#: Every name the issue makes a contract of (counters without their _total).
CONTRACT = {
    "docker_connection_state": "gauge",
    "docker_up": "gauge",
    "docker_state_transitions": "counter",
    "docker_connect_attempts": "counter",
    "docker_backoff_seconds": "gauge",
    "docker_last_error_info": "gauge",
    "docker_events": "counter",
    "docker_events_malformed": "counter",
    "docker_endpoint_info": "gauge",
    "resyncs": "counter",
    "resync_duration_seconds": "histogram",
    "event_propagation_seconds": "histogram",
    "cache_revision": "gauge",
    "containers": "gauge",
    "container_running": "gauge",
    "container_health": "gauge",
    "container_restart_count": "gauge",
    "container_oom_killed": "gauge",
    "container_started_time_seconds": "gauge",
    "container_info": "gauge",
    "api_requests": "counter",
    "api_request_duration_seconds": "histogram",
    "subscribers": "gauge",
    "subscriber_overflows": "counter",
}

#: promtool's lint objects to a gauge named *_count; the issue fixes this name.
KNOWN_LINT = f'{PREFIX}container_restart_count non-histogram and non-summary metrics should not have "_count" suffix'

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def make_runtime(*, labels: tuple[str, ...] = (), now: float | None = None) -> Runtime:
    settings = Settings(
        docker=DockerSettings(host="unix:///nonexistent/docker.sock"),
        metrics=MetricsSettings(container_labels=labels),
    )
    runtime = build_runtime(settings, environ={})
    if now is not None:
        runtime.metrics.clock = lambda: now
    return runtime


def inspect_body(
    n: int,
    *,
    name: str | None = None,
    status: str = "running",
    health: str | None = None,
    project: str | None = "media",
    service: str | None = None,
    labels: Mapping[str, str] | None = None,
    restarts: int = 0,
    oom: bool = False,
    started: str = "2026-12-04T15:57:39.123456789Z",
    created: str = "2026-12-04T15:00:00Z",
    image: str = "hls-test/busybox:latest",
) -> dict[str, Any]:
    all_labels = dict(labels or {})
    if project is not None:
        all_labels["com.docker.compose.project"] = project
        all_labels["com.docker.compose.service"] = service or f"svc{n}"
    state: dict[str, Any] = {
        "Status": status,
        "Running": status == "running",
        "OOMKilled": oom,
        "StartedAt": started,
    }
    if health is not None:
        state["Health"] = {"Status": health}
    return {
        "Id": f"{n:064x}",
        "Name": "/" + (name or f"c{n}"),
        "Created": created,
        "RestartCount": restarts,
        "Config": {"Image": image, "Labels": all_labels},
        "State": state,
    }


def record(n: int, **kwargs: Any) -> ContainerRecord:
    return record_from_inspect(inspect_body(n, **kwargs))


def scrape(runtime: Runtime) -> Samples:
    body, content_type = runtime.metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return parse(body)


def parse(body: bytes) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(PREFIX + metric, frozenset(labels.items()))]


def series(samples: Samples, metric: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == PREFIX + metric}


def failure(kind: ErrorKind) -> DockerFailure:
    return DockerFailure(kind, "boom", "fix it", 0.0)


def families(body: bytes) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(body.decode())}


# -- the exposition as a whole -----------------------------------------------------------


def test_every_contract_metric_is_exposed_with_its_type() -> None:
    """A fresh runtime exposes every metric the issue names, with the right type."""
    runtime = make_runtime()
    found = families(runtime.metrics.render()[0])
    for name, kind in CONTRACT.items():
        assert found.get(PREFIX + name) == kind, name


def test_standard_process_and_python_collectors_are_registered() -> None:
    """The process, platform and GC collectors are part of the exposition."""
    samples = scrape(make_runtime())
    names = {name for name, _ in samples}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names
    assert "python_gc_objects_collected_total" in names


def test_each_instance_has_its_own_registry() -> None:
    """Two runtimes count separately and nothing lands in prometheus-client's global registry."""
    a, b = make_runtime(), make_runtime()
    a.metrics.event("start")
    assert value(scrape(a), "docker_events_total", action="start") == 1
    assert value(scrape(b), "docker_events_total", action="start") == 0
    assert REGISTRY.get_sample_value(PREFIX + "docker_events_total", {"action": "start"}) is None


def test_render_equals_the_registry_rendered_by_prometheus_client() -> None:
    """render() (with its fast per-container path) says what generate_latest(registry) says."""
    runtime = make_runtime(labels=("com.example.team",))
    for n in range(5):
        runtime.cache.upsert(
            record(n, health="healthy" if n % 2 else None, labels={"com.example.team": "a"})
        )
    runtime.metrics.event("die")
    runtime.metrics.api_request("/v1/containers", 200, 0.002)
    fast = {k: v for k, v in scrape(runtime).items() if k[0].startswith(PREFIX)}
    slow = parse(generate_latest(runtime.metrics.registry))
    assert fast == {k: v for k, v in slow.items() if k[0].startswith(PREFIX)}


def test_per_container_text_is_byte_for_byte_what_prometheus_client_makes() -> None:
    """The hand-formatted container families equal generate_latest over ContainerCollector."""
    runtime = make_runtime(labels=("com.example.team", "a.b", "a1", "z"))
    odd = 'quote " backslash \\ newline \n ünïcode'
    records = [
        record(1, health="unhealthy", restarts=3, labels={"com.example.team": odd, "a1": "x"}),
        record(2, health="starting", project=None, status="exited", oom=True),
        record(3, health="healthy", name="odd" + "\\x", image=odd, started="0001-01-01T00:00:00Z"),
        record(4, status="created", labels={"z": "last", "a.b": "first"}),
    ]
    for r in records:
        runtime.cache.upsert(r)
    only = CollectorRegistry()
    only.register(runtime.metrics.containers)
    assert runtime.metrics.containers.exposition() == generate_latest(only)


def test_collectors_registered_by_other_rooms_are_scraped_with_the_same_labels() -> None:
    """A collector registered on metrics.registry is in render(); label_keys gives it the operator's labels."""
    runtime = make_runtime(labels=("com.example.team",))
    assert runtime.metrics.label_keys == (("com.example.team", "label_com_example_team"),)

    class Extra:
        def collect(self) -> list[Metric]:
            family = GaugeMetricFamily(PREFIX + "extra", "An extra family.", labels=["x"])
            family.add_metric(["y"], 2.0)
            return [family]

    runtime.metrics.registry.register(Extra())
    assert value(scrape(runtime), "extra", x="y") == 2


# -- connection state ----------------------------------------------------------------------


def test_connection_state_is_one_hot_and_up_follows_it() -> None:
    """Each of the four states is exposed, 1 for the current one; docker_up is 1 only when connected."""
    runtime = make_runtime(now=1000.0)
    machine = runtime.machine

    def check(expected: str) -> Samples:
        samples = scrape(runtime)
        got = {dict(k)["state"]: v for k, v in series(samples, "docker_connection_state").items()}
        assert got == {s: float(s == expected) for s in got}
        assert set(got) == {"connecting", "connected", "backing_off", "denied"}
        assert value(samples, "docker_up") == float(expected == "connected")
        return samples

    check("connecting")
    machine.begin_attempt(now=1000.0, cause="start")
    machine.succeeded(now=1000.0)
    check("connected")
    machine.lost(failure(ErrorKind.CONNECTION_REFUSED), now=1000.0)
    check("backing_off")
    machine.begin_attempt(now=1000.0, cause="timer")
    machine.failed(failure(ErrorKind.PERMISSION_DENIED), now=1000.0)
    check("denied")


def test_backoff_and_last_error_are_read_while_not_connected_only() -> None:
    """backoff_seconds is the wait left (0 when connected); last_error_info names the kind until connected."""
    runtime = make_runtime(now=1000.0)
    machine = runtime.machine
    samples = scrape(runtime)
    assert value(samples, "docker_backoff_seconds") == 0
    assert series(samples, "docker_last_error_info") == {}

    machine.begin_attempt(now=1000.0, cause="start")
    delay = machine.failed(failure(ErrorKind.SOCKET_MISSING), now=1000.0)
    samples = scrape(runtime)
    assert value(samples, "docker_backoff_seconds") == pytest.approx(delay)
    assert series(samples, "docker_last_error_info") == {
        frozenset({("kind", "socket_missing")}): 1.0
    }

    runtime.metrics.clock = lambda: 1000.0 + delay + 5  # overdue: never negative
    assert value(scrape(runtime), "docker_backoff_seconds") == 0

    machine.begin_attempt(now=1001.0, cause="timer")
    machine.failed(failure(ErrorKind.FORBIDDEN), now=1001.0)
    runtime.metrics.clock = lambda: 1001.0
    samples = scrape(runtime)
    assert value(samples, "docker_backoff_seconds") == runtime.settings.backoff.max_seconds
    assert set(series(samples, "docker_last_error_info")) == {frozenset({("kind", "forbidden")})}

    machine.begin_attempt(now=1002.0, cause="socket changed")
    machine.succeeded(now=1002.0)
    samples = scrape(runtime)
    assert value(samples, "docker_backoff_seconds") == 0
    assert series(samples, "docker_last_error_info") == {}


def test_transitions_and_attempts_are_preinitialised_and_read_from_the_machine() -> None:
    """Every allowed transition and every attempt result is exposed from the start, then counts."""
    runtime = make_runtime()
    samples = scrape(runtime)
    moves = series(samples, "docker_state_transitions_total")
    assert set(moves) == {frozenset({("from", a.value), ("to", b.value)}) for a, b in TRANSITIONS}
    assert set(moves.values()) == {0.0}
    results = series(samples, "docker_connect_attempts_total")
    assert {dict(k)["result"] for k in results} == {"success", *(k.value for k in ErrorKind)}
    assert set(results.values()) == {0.0}

    machine = runtime.machine
    machine.begin_attempt(now=1.0, cause="start")
    machine.failed(failure(ErrorKind.TIMEOUT), now=1.0)
    machine.begin_attempt(now=2.0, cause="timer")
    machine.succeeded(now=2.0)
    samples = scrape(runtime)
    assert value(samples, "docker_connect_attempts_total", result="timeout") == 1
    assert value(samples, "docker_connect_attempts_total", result="success") == 1
    for source, target in [("connecting", "backing_off"), ("backing_off", "connecting")]:
        assert (
            value(samples, "docker_state_transitions_total", **{"from": source, "to": target}) == 1
        )
    assert (
        value(
            samples, "docker_state_transitions_total", **{"from": "connecting", "to": "connected"}
        )
        == 1
    )
    assert (
        value(samples, "docker_state_transitions_total", **{"from": "connected", "to": "denied"})
        == 0
    )


def test_endpoint_info_names_the_endpoint_in_use() -> None:
    """docker_endpoint_info appears once the watcher has an endpoint, labelled with its URL."""
    runtime = make_runtime()
    assert series(scrape(runtime), "docker_endpoint_info") == {}
    runtime.watcher.endpoint = Endpoint("unix:///run/docker.sock", "/run/docker.sock")
    assert value(scrape(runtime), "docker_endpoint_info", host="unix:///run/docker.sock") == 1


# -- the mirror ------------------------------------------------------------------------------


def test_containers_by_state_list_every_state_even_at_zero() -> None:
    """containers{state} has every Docker state, counted from the cache; cache_revision follows."""
    runtime = make_runtime()
    samples = scrape(runtime)
    assert {dict(k)["state"]: v for k, v in series(samples, "containers").items()} == dict.fromkeys(
        CONTAINER_STATES, 0.0
    )
    runtime.cache.upsert(record(1))
    runtime.cache.upsert(record(2))
    runtime.cache.upsert(record(3, status="exited"))
    samples = scrape(runtime)
    assert value(samples, "containers", state="running") == 2
    assert value(samples, "containers", state="exited") == 1
    assert value(samples, "containers", state="paused") == 0
    assert value(samples, "cache_revision") == runtime.cache.revision


def test_per_container_series_and_their_labels() -> None:
    """Each container gets running, health, restarts, OOM, start time and info, with only the allowed labels."""
    runtime = make_runtime()
    runtime.cache.upsert(
        record(1, name="sonarr", service="sonarr", health="unhealthy", restarts=4, oom=True)
    )
    runtime.cache.upsert(record(2, name="loose", project=None, status="exited", started=""))
    samples = scrape(runtime)
    sonarr = {"name": "sonarr", "compose_project": "media", "compose_service": "sonarr"}
    loose = {"name": "loose", "compose_project": "", "compose_service": ""}
    assert value(samples, "container_running", **sonarr) == 1
    assert value(samples, "container_running", **loose) == 0
    assert value(samples, "container_restart_count", **sonarr) == 4
    assert value(samples, "container_oom_killed", **sonarr) == 1
    assert value(samples, "container_oom_killed", **loose) == 0
    started = value(samples, "container_started_time_seconds", **sonarr)
    assert started == pytest.approx(1796399859.123456)
    health = series(samples, "container_health")
    assert health == {
        frozenset({**sonarr, "status": s}.items()): float(s == "unhealthy")
        for s in ("starting", "healthy", "unhealthy")
    }, "one-hot for sonarr, absent for a container without a healthcheck"
    assert set(series(samples, "container_started_time_seconds")) == {frozenset(sonarr.items())}, (
        "no start time for a container that never started"
    )
    assert value(
        samples, "container_info", **sonarr, image="hls-test/busybox:latest", id=f"{1:064x}"
    )
    for name in ("container_running", "container_restart_count", "container_oom_killed"):
        for labels in series(samples, name):
            assert {k for k, _ in labels} == {"name", "compose_project", "compose_service"}


def test_a_removed_container_leaves_no_series() -> None:
    """After a container leaves the cache, the next scrape has no series naming it."""
    runtime = make_runtime()
    runtime.cache.upsert(record(1, name="stays", health="healthy"))
    runtime.cache.upsert(record(2, name="goes", health="healthy"))
    body = runtime.metrics.render()[0]
    assert b'name="goes"' in body
    runtime.cache.remove(f"{2:064x}")
    body = runtime.metrics.render()[0]
    assert b'name="goes"' not in body
    assert b'name="stays"' in body
    assert value(parse(body), "containers", state="running") == 1


def test_changes_show_in_the_next_scrape_and_unchanged_scrapes_reuse_the_text() -> None:
    """A changed record is re-rendered at once; with no change the container text is reused."""
    runtime = make_runtime()
    original = record(1, name="app")
    runtime.cache.upsert(original)
    runtime.cache.upsert(record(2, name="other"))
    first = runtime.metrics.containers.exposition()
    assert runtime.metrics.containers.exposition() is first
    runtime.cache.upsert(dataclasses.replace(original, state="paused", restart_count=7))
    samples = scrape(runtime)
    app = {"name": "app", "compose_project": "media", "compose_service": "svc1"}
    assert value(samples, "container_running", **app) == 0
    assert value(samples, "container_restart_count", **app) == 7
    assert value(samples, "containers", state="paused") == 1


def test_two_records_with_one_name_give_one_series() -> None:
    """While a recreate is in flight the mirror may hold a name twice: the running record wins."""
    runtime = make_runtime()
    runtime.cache.upsert(record(1, name="app", status="exited", created="2026-12-04T15:00:00Z"))
    runtime.cache.upsert(record(2, name="app", status="running", created="2026-12-04T14:00:00Z"))
    samples = scrape(runtime)  # parse() fails on a duplicate series
    assert [dict(k)["id"] for k in series(samples, "container_info")] == [f"{2:064x}"]
    assert value(samples, "containers", state="running") == 1


def test_operator_listed_docker_labels_become_sanitised_metric_labels() -> None:
    """metrics.container_labels adds label_<key> with invalid characters replaced; others stay out."""
    runtime = make_runtime(labels=("com.example.team", "tier-2"))
    runtime.cache.upsert(record(1, name="a", labels={"com.example.team": 'x"y', "secret": "s"}))
    samples = scrape(runtime)
    [labels] = series(samples, "container_running")
    assert dict(labels) == {
        "name": "a",
        "compose_project": "media",
        "compose_service": "svc1",
        "label_com_example_team": 'x"y',
        "label_tier_2": "",
    }
    assert label_name("9.x") == "label_9_x"


def test_docker_labels_that_collide_after_sanitising_are_a_configuration_error() -> None:
    """Two label keys that map to one metric label are refused at start, naming the setting."""
    with pytest.raises(ConfigError) as error:
        make_runtime(labels=("team.name", "team-name"))
    assert error.value.key == "metrics.container_labels"
    assert "label_team_name" in str(error.value)


# -- things that happen ----------------------------------------------------------------------


def test_watch_observer_counts_events_resyncs_and_propagation() -> None:
    """The watcher's reports become counters and histograms; unknown actions count as other."""
    runtime = make_runtime()
    m = runtime.metrics
    for action in ("start", "start", "health_status", "made-up", "other"):
        m.event(action)
    m.malformed()
    m.inspected()
    m.inspected()
    m.resynced(0.3)
    m.propagated(0.004)
    m.propagated(0.2)
    samples = scrape(runtime)
    events = {dict(k)["action"]: v for k, v in series(samples, "docker_events_total").items()}
    assert set(events) == {*KNOWN_ACTIONS, "other"}
    assert (events["start"], events["health_status"], events["other"], events["die"]) == (
        2,
        1,
        2,
        0,
    )
    assert value(samples, "docker_events_malformed_total") == 1
    assert value(samples, "docker_inspects_total") == 2
    assert value(samples, "resyncs_total") == 1
    assert value(samples, "resync_duration_seconds_count") == 1
    assert value(samples, "resync_duration_seconds_sum") == pytest.approx(0.3)
    assert value(samples, "resync_duration_seconds_bucket", le="0.25") == 0
    assert value(samples, "resync_duration_seconds_bucket", le="0.5") == 1
    assert value(samples, "event_propagation_seconds_count") == 2
    assert value(samples, "event_propagation_seconds_bucket", le="0.005") == 1


def test_api_requests_by_route_and_code_with_a_bounded_route_label() -> None:
    """api_request counts by route template and code; routes beyond the cap count as other."""
    runtime = make_runtime()
    m = runtime.metrics
    m.api_request("/v1/containers", 200, 0.001)
    m.api_request("/v1/containers", 200, 0.003)
    m.api_request("/v1/containers/{ref}", 404, 0.002)
    for n in range(MAX_ROUTES + 5):
        m.api_request(f"/bug/{n}", 500, 0.001)
    samples = scrape(runtime)
    assert value(samples, "api_requests_total", route="/v1/containers", code="200") == 2
    assert value(samples, "api_requests_total", route="/v1/containers/{ref}", code="404") == 1
    assert value(samples, "api_request_duration_seconds_count", route="/v1/containers") == 2
    routes = {dict(k)["route"] for k in series(samples, "api_requests_total")}
    assert len(routes) == MAX_ROUTES + 1
    assert value(samples, "api_requests_total", route="other", code="500") == 5 + 2


def test_subscribers_and_overflows_are_read_from_the_change_feed() -> None:
    """subscribers and subscriber_overflows_total are the feed's own counts at scrape time."""
    runtime = make_runtime()
    runtime.feed.subscribers = 3
    runtime.feed.overflows = 2
    samples = scrape(runtime)
    assert value(samples, "subscribers") == 3
    assert value(samples, "subscriber_overflows_total") == 2


# -- speed and promtool ----------------------------------------------------------------------


def test_rendering_1000_containers_follows_each_change() -> None:
    """1,000 mirrored containers: every one exposed, and a single change shows in the next scrape.

    (How fast this is lives in bench/bench_metrics.py, not in a test.)
    """
    runtime = make_runtime()
    for n in range(1000):
        runtime.cache.upsert(record(n, health="healthy" if n % 3 else None, restarts=n % 5))
    body = runtime.metrics.render()[0]
    assert body.count(b"\n" + PREFIX.encode() + b"container_info{") == 1000
    for n in range(20):
        runtime.cache.upsert(record(n, restarts=100 + n))  # one change per scrape
        lines = runtime.metrics.render()[0].decode().splitlines()
        restarts = [line for line in lines if line.startswith(PREFIX + "container_restart_count{")]
        assert len(restarts) == 1000
        assert sum(line.endswith(f" {100 + n}.0") for line in restarts) == 1


def promtool_problems(body: bytes) -> list[str]:
    """promtool check metrics' findings; a parse error fails the test."""
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: run tests/run.sh (it installs Debian's prometheus)")
    done = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30, check=False
    )
    output = (done.stdout + done.stderr).decode()
    assert done.returncode in (0, 3), f"promtool check metrics failed ({done.returncode}): {output}"
    return [line for line in output.splitlines() if line.strip()]


def test_promtool_accepts_a_hand_filled_exposition() -> None:
    """promtool check metrics parses a scrape with every kind of series; the one lint is the contract's name."""
    runtime = make_runtime(labels=("com.example.team",))
    runtime.cache.upsert(record(1, health="starting", labels={"com.example.team": 'q"\\'}))
    runtime.cache.upsert(record(2, project=None, status="exited", oom=True))
    runtime.metrics.event("start")
    runtime.metrics.resynced(0.1)
    runtime.metrics.api_request("/metrics", 200, 0.001)
    runtime.machine.begin_attempt(now=1.0, cause="start")
    runtime.machine.failed(failure(ErrorKind.CONNECTION_REFUSED), now=1.0)
    assert promtool_problems(runtime.metrics.render()[0]) == [KNOWN_LINT]
