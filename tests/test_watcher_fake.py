"""The watcher against the fake gateway: ordering, coalescing, reconnects, reconciliation."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loguru import logger

from supervisor.settings import BackoffSettings
from supervisor.state import ConnectionState, ErrorKind
from supervisor.watcher import Watcher
from tests.fakes import (
    FakeDocker,
    apply_deltas,
    cache_state,
    failure,
    make_watcher,
    quiesce,
    wait_until,
)

S = ConnectionState


@asynccontextmanager
async def running(watcher: Watcher) -> AsyncIterator[None]:
    """The watcher serving in a task group, cancelled on exit."""
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.serve)
        yield
        tg.cancel_scope.cancel()


def populated(n: int = 4) -> FakeDocker:
    docker = FakeDocker()
    ids = [docker.create(f"svc{i}", labels={"i": str(i)}) for i in range(n)]
    for cid in ids[1:]:
        docker.start(cid)
    docker.die(ids[2], exit_code=3)
    docker.pause(ids[3])
    docker.health(ids[1], "healthy")
    return docker


@pytest.fixture
def logs() -> Any:
    """Loguru messages as (level, text), captured for the test."""
    captured: list[tuple[str, str]] = []
    handler = logger.add(
        lambda m: captured.append((m.record["level"].name, m.record["message"])),
        level="DEBUG",
        format="{message}",
    )
    yield captured
    logger.remove(handler)


# -- connecting and mirroring ------------------------------------------------------------


async def test_subscribes_before_listing_then_inspects() -> None:
    """A connect opens the event subscription before it lists, and inspects after the list."""
    docker = populated()
    watcher, _ = make_watcher(docker)
    async with running(watcher):
        await quiesce(watcher, docker)
    names = [c[0] for c in docker.calls]
    assert names[:3] == ["open_session", "subscribe", "list"]
    assert sorted(c[1] for c in docker.calls if c[0] == "inspect") == sorted(docker.containers)


async def test_initial_sync_mirrors_every_container() -> None:
    """After the first sync the cache equals the truth and status() says connected, synced."""
    docker = populated()
    watcher, observer = make_watcher(docker)
    async with running(watcher):
        await quiesce(watcher, docker)
        assert cache_state(watcher.cache) == docker.truth()
        status = watcher.status()
    assert {k: status[k] for k in ("state", "attempts", "error", "containers", "synced")} == {
        "state": "connected",
        "attempts": 0,
        "error": None,
        "containers": 4,
        "synced": True,
    }
    assert status["docker"] == {
        "host": "fake://docker",
        "version": "20.10.24-fake",
        "api_version": "1.41",
    }
    assert status["revision"] == 1004  # one delta per container
    assert observer.resyncs == 1
    assert {r.state for r in watcher.cache.records()} == {"created", "running", "exited", "paused"}


async def test_live_changes_are_mirrored_as_deltas() -> None:
    """start, die, restart, pause, rename, health, create, destroy: each ends up in the cache."""
    docker = populated()
    watcher, observer = make_watcher(docker)
    async with running(watcher):
        await quiesce(watcher, docker)
        old, rev0 = cache_state(watcher.cache), watcher.cache.revision
        ids = sorted(docker.containers)
        steps: list[Callable[[], object]] = [
            lambda: docker.start(ids[0]),
            lambda: docker.die(ids[1], 0),
            lambda: docker.restart(ids[2]),
            lambda: docker.unpause(ids[3]),
            lambda: docker.rename(ids[0], "renamed"),
            lambda: docker.health(ids[3], "unhealthy"),
            lambda: docker.create("fresh"),
            lambda: docker.destroy(ids[1]),
        ]
        for step in steps:
            step()
            await quiesce(watcher, docker)
            assert cache_state(watcher.cache) == docker.truth()
        deltas = watcher.cache.deltas_since(rev0)
    assert deltas is not None and len(deltas) == len(steps)
    assert apply_deltas(old, deltas) == docker.truth()
    assert observer.events["health_status"] == 1
    assert observer.events["destroy"] == 1


# -- coalescing ----------------------------------------------------------------------------


async def test_burst_for_one_container_costs_two_inspects() -> None:
    """100 events for one container while its inspect is in flight: one more inspect, not 100."""
    docker = populated()
    watcher, observer = make_watcher(docker)
    async with running(watcher):
        await quiesce(watcher, docker)
        cid = sorted(docker.containers)[3]  # paused
        before = docker.inspect_counts[cid]
        docker.inspect_gate = anyio.Event()
        docker.unpause(cid)  # first event: an inspect starts and is held
        await wait_until(lambda: docker.inflight[cid] == 1)
        for n in range(99):
            (docker.pause if n % 2 else docker.unpause)(cid)
        await wait_until(lambda: not docker.streams[0].pending)
        docker.inspect_gate.set()
        docker.inspect_gate = None
        await quiesce(watcher, docker)
        assert docker.inspect_counts[cid] - before == 2
        assert docker.max_inflight[cid] == 1
        assert cache_state(watcher.cache) == docker.truth()
        assert watcher.cache.get(cid).state == "running"  # type: ignore[union-attr]
    assert observer.events["pause"] + observer.events["unpause"] == 100


async def test_burst_over_many_containers_is_coalesced_per_container() -> None:
    """A burst over 20 containers: at most two inspects each, never two at once for one."""
    docker = FakeDocker()
    ids = [docker.create(f"b{i}") for i in range(20)]
    watcher, _ = make_watcher(docker)
    async with running(watcher):
        await quiesce(watcher, docker)
        before = dict(docker.inspect_counts)
        docker.inspect_gate = anyio.Event()  # Docker is slower than the burst
        for _ in range(10):
            for cid in ids:
                docker.start(cid)
                docker.die(cid, 1)
        await wait_until(lambda: not docker.streams[0].pending)
        assert sum(docker.inflight.values()) == 8  # inspect_concurrency
        docker.inspect_gate.set()
        docker.inspect_gate = None
        await quiesce(watcher, docker)
        assert cache_state(watcher.cache) == docker.truth()
    assert all(docker.inspect_counts[cid] - before[cid] <= 2 for cid in ids)
    assert all(docker.max_inflight[cid] == 1 for cid in ids)


async def test_destroy_removes_without_an_inspect() -> None:
    """A destroy event drops the record at once; Docker is not asked about it."""
    docker = populated()
    watcher, _ = make_watcher(docker)
    async with running(watcher):
        await quiesce(watcher, docker)
        cid = sorted(docker.containers)[0]
        before = sum(docker.inspect_counts.values())
        docker.destroy(cid)
        await quiesce(watcher, docker)
        assert cid not in watcher.cache
        assert sum(docker.inspect_counts.values()) == before
        assert cache_state(watcher.cache) == docker.truth()


async def test_stale_inspect_after_destroy_is_dropped() -> None:
    """An inspect answered before a destroy but delivered after it does not bring the record back."""
    docker = populated()
    watcher, _ = make_watcher(docker)
    async with running(watcher):
        await quiesce(watcher, docker)
        cid = sorted(docker.containers)[1]
        docker.inspect_gate = anyio.Event()
        docker.die(cid, 1)  # the inspect snapshots the container, then is held
        await wait_until(lambda: docker.inflight[cid] == 1)
        rev = watcher.cache.revision
        docker.destroy(cid)
        await wait_until(lambda: cid not in watcher.cache)
        docker.inspect_gate.set()  # the stale "exited" body now arrives
        docker.inspect_gate = None
        await quiesce(watcher, docker)
        assert cid not in watcher.cache
        deltas = watcher.cache.deltas_since(rev)
        assert deltas is not None and [(d.type, d.container_id) for d in deltas] == [
            ("remove", cid)
        ]


async def test_container_gone_before_its_inspect_is_removed() -> None:
    """An event whose container no longer exists (inspect says none) removes the record."""
    docker = populated()
    watcher, _ = make_watcher(docker)
    async with running(watcher):
        await quiesce(watcher, docker)
        cid = sorted(docker.containers)[0]
        del docker.containers[cid]  # gone, and the destroy event never came
        docker.emit(cid, "die")
        await quiesce(watcher, docker)
        assert cid not in watcher.cache


async def test_events_without_effect_and_unknown_actions() -> None:
    """exec events change nothing and cost no inspect; unknown verbs count as other and inspect."""
    docker = populated()
    watcher, observer = make_watcher(docker)
    async with running(watcher):
        await quiesce(watcher, docker)
        cid = sorted(docker.containers)[1]
        before = docker.inspect_counts[cid]
        docker.emit(cid, "exec_create: sh -c 'date'")
        docker.emit(cid, "exec_start: sh -c 'date'")
        docker.emit(cid, "exec_die")
        await quiesce(watcher, docker)
        assert docker.inspect_counts[cid] == before
        docker.emit(cid, "teleport")
        await quiesce(watcher, docker)
        assert docker.inspect_counts[cid] == before + 1
    assert observer.events["exec_start"] == observer.events["exec_create"] == 1
    assert observer.events["other"] == 1


async def test_malformed_events_are_counted_and_not_fatal(logs: list[tuple[str, str]]) -> None:
    """Garbage on the event stream is counted and logged; the connection and mirror carry on."""
    docker = populated()
    watcher, observer = make_watcher(docker)
    async with running(watcher):
        await quiesce(watcher, docker)
        sessions = docker.sessions_opened
        for raw in (b"{not json", "text", 17, {"Type": "container"}, {"Action": "start"}):
            docker.push_raw(raw)
        docker.push_raw({"Type": "network", "Action": "connect", "Actor": {"ID": "n"}})
        cid = sorted(docker.containers)[0]
        docker.start(cid)
        await quiesce(watcher, docker)
        assert watcher.machine.state is S.CONNECTED
        assert docker.sessions_opened == sessions
        assert watcher.cache.get(cid).state == "running"  # type: ignore[union-attr]
    assert observer.malformed_count == 5
    assert sum(1 for level, text in logs if level == "WARNING" and "malformed" in text) == 5


# -- losing and regaining Docker -------------------------------------------------------------


async def test_stream_end_goes_backing_off_then_reconnects() -> None:
    """Docker ends the stream and refuses: backing_off/connection_refused, then back connected."""
    docker = populated()
    watcher, _ = make_watcher(docker)
    async with running(watcher):
        await quiesce(watcher, docker)
        docker.refuse = failure(ErrorKind.CONNECTION_REFUSED)
        docker.end_streams()
        await wait_until(lambda: watcher.machine.state is not S.CONNECTED)
        assert watcher.machine.state in (S.BACKING_OFF, S.CONNECTING)
        assert watcher.machine.last_error is not None
        assert watcher.machine.last_error.kind is ErrorKind.CONNECTION_REFUSED
        assert not watcher.synced
        docker.refuse = None
        await quiesce(watcher, docker)
        assert cache_state(watcher.cache) == docker.truth()
    counts = watcher.machine.transition_counts
    assert counts[(S.CONNECTED, S.BACKING_OFF)] == 1
    assert counts[(S.CONNECTING, S.CONNECTED)] == 2
    assert all(s.closed for s in docker.all_streams)


async def test_stream_closed_by_a_healthy_docker_resubscribes() -> None:
    """A stream ended while Docker still answers counts as a loss (api_error) and resubscribes."""
    docker = populated()
    watcher, _ = make_watcher(docker)
    async with running(watcher):
        await quiesce(watcher, docker)
        docker.end_streams()
        await wait_until(
            lambda: watcher.machine.transition_counts[(S.CONNECTED, S.BACKING_OFF)] == 1
        )
        await quiesce(watcher, docker)
    t = [c for c in docker.calls if c[0] == "subscribe"]
    assert len(t) == 2
    assert watcher.machine.transition_counts[(S.CONNECTING, S.CONNECTED)] == 2


async def test_ping_timeout_goes_backing_off_with_kind_timeout() -> None:
    """A Docker that stops answering pings is lost with kind timeout; its stream is closed."""
    docker = populated()
    watcher, _ = make_watcher(docker, ping_interval_seconds=0.02)
    async with running(watcher):
        await quiesce(watcher, docker)
        stream = docker.streams[0]
        docker.ping_hangs = True
        docker.refuse = failure(ErrorKind.TIMEOUT)  # the reconnect does not get through either
        await wait_until(lambda: watcher.machine.state is not S.CONNECTED, limit=2)
        lost = watcher.machine.last_error
        assert lost is not None and lost.kind is ErrorKind.TIMEOUT
        assert "ping" in lost.message
        assert stream.closed
        docker.ping_hangs = False
        docker.refuse = None
        await quiesce(watcher, docker)


async def test_ping_failure_loses_the_connection() -> None:
    """A ping answered with an error (Docker shutting down) is a loss with that failure."""
    docker = populated()
    watcher, _ = make_watcher(docker, ping_interval_seconds=0.02)
    async with running(watcher):
        await quiesce(watcher, docker)
        docker.ping_failure = failure(ErrorKind.CONNECTION_REFUSED, "gone")
        docker.refuse = failure(ErrorKind.CONNECTION_REFUSED, "gone")
        await wait_until(lambda: watcher.machine.state is not S.CONNECTED, limit=2)
        assert watcher.machine.last_error is not None
        assert watcher.machine.last_error.kind is ErrorKind.CONNECTION_REFUSED
        docker.ping_failure = docker.refuse = None
        await quiesce(watcher, docker)


async def test_inspect_failure_loses_the_connection_then_resyncs() -> None:
    """An inspect that fails at the Docker edge is a loss; the reconnect resyncs."""
    docker = populated()
    watcher, _ = make_watcher(docker)
    async with running(watcher):
        await quiesce(watcher, docker)
        docker.inspect_failure = failure(ErrorKind.API_ERROR, "500 from Docker")
        docker.start(sorted(docker.containers)[0])
        await wait_until(lambda: watcher.machine.state is not S.CONNECTED)
        assert watcher.machine.last_error is not None
        assert watcher.machine.last_error.message == "500 from Docker"
        docker.inspect_failure = None
        await quiesce(watcher, docker)
        assert cache_state(watcher.cache) == docker.truth()


async def test_call_cut_off_by_a_vanished_docker_says_why() -> None:
    """An inspect garbled by Docker dying mid-answer is reported as what a fresh connect finds."""
    docker = populated()
    watcher, _ = make_watcher(docker)
    async with running(watcher):
        await quiesce(watcher, docker)
        docker.inspect_failure = failure(ErrorKind.API_ERROR, "Connection broken: IncompleteRead")
        docker.refuse = failure(ErrorKind.CONNECTION_REFUSED, "connection refused by /x")
        docker.start(sorted(docker.containers)[0])
        await wait_until(lambda: watcher.machine.state is not S.CONNECTED)
        assert watcher.machine.last_error is not None
        assert watcher.machine.last_error.kind is ErrorKind.CONNECTION_REFUSED
        assert watcher.machine.transition_counts[(S.CONNECTED, S.BACKING_OFF)] == 1
        docker.inspect_failure = docker.refuse = None
        await quiesce(watcher, docker)


async def test_list_failure_is_a_failed_attempt() -> None:
    """A list that fails after the subscription is a failed attempt; the subscription is closed."""
    docker = populated()
    docker.list_failure = failure(ErrorKind.TIMEOUT)
    watcher, _ = make_watcher(docker)
    async with running(watcher):
        await wait_until(lambda: len(docker.all_streams) >= 2)
        assert watcher.machine.transition_counts[(S.CONNECTING, S.CONNECTED)] == 0
        assert watcher.machine.attempt_results["timeout"] >= 2
        docker.list_failure = None
        await quiesce(watcher, docker)
    assert all(s.closed for s in docker.all_streams)
    assert docker.sessions_closed == docker.sessions_opened


async def test_denied_retries_at_the_cap() -> None:
    """permission_denied: state denied, and attempts come one cap apart, not faster."""
    cap = 0.15
    docker = populated()
    docker.refuse = failure(ErrorKind.PERMISSION_DENIED)
    backoff = BackoffSettings(
        initial_seconds=0.001, factor=2, max_seconds=cap, reset_after_seconds=1
    )
    watcher, _ = make_watcher(docker, backoff=backoff)
    async with running(watcher):
        await wait_until(lambda: len(docker.session_times) >= 4, limit=3)
        assert watcher.machine.state in (S.DENIED, S.CONNECTING)
        status = watcher.status()
        docker.refuse = None
        await quiesce(watcher, docker)
    gaps = [b - a for a, b in zip(docker.session_times, docker.session_times[1:], strict=False)]
    assert all(g >= cap * 0.9 for g in gaps[:3]), gaps
    assert status["error"]["kind"] == "permission_denied"  # type: ignore[index]


async def test_socket_file_change_triggers_an_immediate_attempt(short_tmp: Path) -> None:
    """With a 30 s backoff, the socket appearing (and changing mode) starts an attempt at once."""
    sock = str(short_tmp / "docker.sock")
    docker = FakeDocker(socket_path=sock)
    docker.containers = populated().containers
    docker.refuse = failure(ErrorKind.SOCKET_MISSING)
    slow = BackoffSettings(initial_seconds=30, factor=2, max_seconds=30, reset_after_seconds=30)
    watcher, _ = make_watcher(docker, backoff=slow, socket_poll_seconds=0.01)
    async with running(watcher):
        await wait_until(lambda: watcher.machine.state is S.BACKING_OFF)
        assert len(docker.session_times) == 1
        assert (watcher.machine.retry_in(time.time()) or 0) > 1  # would wait a long time
        docker.refuse = failure(ErrorKind.PERMISSION_DENIED)
        await anyio.Path(sock).touch(mode=0o600)  # the socket appears, but is closed to us
        created = time.monotonic()
        await wait_until(lambda: watcher.machine.state is S.DENIED, limit=1)
        assert docker.session_times[-1] - created < 0.2
        docker.refuse = None
        os.chmod(sock, 0o660)  # an operator fixes the mode
        fixed = time.monotonic()
        await quiesce(watcher, docker, limit=1)
        assert docker.session_times[-1] - fixed < 0.2
        assert watcher.machine.state is S.CONNECTED


async def test_failure_logged_in_full_once_then_summarised(logs: list[tuple[str, str]]) -> None:
    """The same failure on every attempt: one full warning with the remedy, then short lines."""
    docker = populated()
    docker.refuse = failure(ErrorKind.SOCKET_MISSING, "/x/docker.sock does not exist")
    watcher, _ = make_watcher(docker)
    async with running(watcher):
        await wait_until(lambda: len(docker.session_times) >= 6)
        docker.refuse = failure(ErrorKind.CONNECTION_REFUSED, "connection refused by /x")
        await wait_until(lambda: watcher.machine.attempt_results["connection_refused"] >= 3)
        docker.refuse = None
        await quiesce(watcher, docker)
    full = [t for lvl, t in logs if lvl == "WARNING" and "remedy" in t]
    assert len(full) == 2
    assert "socket_missing" in full[0] and "fix socket_missing" in full[0]
    assert "connection_refused" in full[1]
    summaries = [t for lvl, t in logs if t.startswith("still ")]
    assert sum("socket_missing" in t for t in summaries) >= 4
    assert all("attempts since" in t and "remedy" not in t for t in summaries)
    assert any("-> connected" in t for _, t in logs)


async def test_cancelled_mid_burst_leaves_a_consistent_cache() -> None:
    """Cancelling the watcher with inspects held mid-burst closes everything; the cache replays."""
    docker = populated(8)
    watcher, _ = make_watcher(docker)
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.serve)
        await quiesce(watcher, docker)
        old, rev0 = cache_state(watcher.cache), watcher.cache.revision
        docker.inspect_gate = anyio.Event()
        for cid in sorted(docker.containers):
            docker.restart(cid)
        await wait_until(lambda: sum(docker.inflight.values()) >= 1)
        tg.cancel_scope.cancel()
    assert docker.sessions_closed == docker.sessions_opened
    assert all(s.closed for s in docker.all_streams)
    deltas = watcher.cache.deltas_since(rev0)
    assert deltas is not None
    assert apply_deltas(old, deltas) == cache_state(watcher.cache)
    assert all(watcher.cache.record_json(r.id) for r in watcher.cache.records())


# -- property: reconnect reconciliation ------------------------------------------------------

OPS = ("create", "destroy", "start", "die", "restart", "pause", "rename", "health")
POINTS = ("outage", "after_subscribe", "after_list", "inspect", "live")

initial = st.lists(st.sampled_from(["created", "running", "exited", "paused"]), max_size=6)
mutation = st.tuples(st.sampled_from(POINTS), st.sampled_from(OPS), st.integers(0, 20))


def _mutate(docker: FakeDocker, op: str, pick: int) -> None:
    ids = sorted(docker.containers)
    if op == "create" or not ids:
        docker.create()
        return
    cid = ids[pick % len(ids)]
    if op == "destroy":
        docker.destroy(cid)
    elif op == "start":
        docker.start(cid)
    elif op == "die":
        docker.die(cid, pick)
    elif op == "restart":
        docker.restart(cid)
    elif op == "pause":
        docker.pause(cid)
    elif op == "rename":
        docker.rename(cid, f"renamed{pick}")
    else:
        docker.health(cid, ("starting", "healthy", "unhealthy")[pick % 3])


def _setup(states: list[str]) -> FakeDocker:
    docker = FakeDocker()
    for status in states:
        cid = docker.create()
        if status != "created":
            docker.start(cid)
        if status == "exited":
            docker.die(cid, 0)
        elif status == "paused":
            docker.pause(cid)
    return docker


async def _reconnect_scenario(
    states: list[str], mutations: list[tuple[str, str, int]], end_with_refusal: bool
) -> None:
    docker = _setup(states)
    watcher, _ = make_watcher(docker)
    async with running(watcher):
        await quiesce(watcher, docker)
        old, rev0 = cache_state(watcher.cache), watcher.cache.revision
        assert old == docker.truth()
        # Docker goes away; changes made meanwhile produce no event we can see.
        docker.refuse = failure(
            ErrorKind.CONNECTION_REFUSED if end_with_refusal else ErrorKind.SOCKET_MISSING
        )
        docker.end_streams()
        await wait_until(lambda: not watcher.machine.connected)
        late: list[tuple[str, int]] = []
        for point, op, pick in mutations:
            if point == "outage":
                _mutate(docker, op, pick)
            elif point == "live":
                late.append((op, pick))
            else:
                docker.at(point, functools.partial(_mutate, docker, op, pick))
        docker.refuse = None
        await quiesce(watcher, docker)
        for op, pick in late:
            _mutate(docker, op, pick)
        await quiesce(watcher, docker)
        for point in ("after_subscribe", "after_list", "inspect"):
            docker.run_hooks(point)  # any hook the reconnect did not reach
        await quiesce(watcher, docker)
        assert cache_state(watcher.cache) == docker.truth()
        deltas = watcher.cache.deltas_since(rev0)
        assert deltas is not None
        assert [d.revision for d in deltas] == list(range(rev0 + 1, watcher.cache.revision + 1))
        assert apply_deltas(old, deltas) == docker.truth()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states=initial, mutations=st.lists(mutation, max_size=12), refusal=st.booleans())
def test_reconnect_reconciles_to_the_truth_with_deltas(
    states: list[str], mutations: list[tuple[str, str, int]], refusal: bool
) -> None:
    """Any containers, any changes during the outage and around the resync: cache = truth, deltas replay."""
    anyio.run(_reconnect_scenario, states, mutations, refusal, backend="asyncio")
