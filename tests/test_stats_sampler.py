"""The sampler against a fake gateway: rounds, concurrency, failures, outages, pruning."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry

from supervisor.access import Endpoint
from supervisor.broadcast import ChangeFeed
from supervisor.cache import Cache
from supervisor.gateway import DockerCallError
from supervisor.records import ContainerRecord, record_from_inspect
from supervisor.sampler import Sampler
from supervisor.settings import BackoffSettings, StatsSettings
from supervisor.state import Backoff, ConnectionMachine, DockerFailure, ErrorKind
from supervisor.stats import StatsStore

STARTED = "2026-12-04T16:00:00.000000Z"
DURATION = "homelabarr_supervisor_stats_sample_duration_seconds"


def failure(kind: ErrorKind) -> DockerFailure:
    return DockerFailure(kind, kind.value, f"fix {kind.value}", time.time())


def stats_body(cpu_ns: int, system_ns: int, *, memory: int = 10_000_000) -> dict[str, Any]:
    """A minimal stats body of a running container."""
    return {
        "read": "2026-12-04T16:00:10.000000000Z",
        "cpu_stats": {
            "cpu_usage": {"total_usage": cpu_ns},
            "system_cpu_usage": system_ns,
            "online_cpus": 2,
        },
        "memory_stats": {"usage": memory, "stats": {"total_inactive_file": 0}, "limit": 10**9},
        "pids_stats": {"current": 1},
        "blkio_stats": {"io_service_bytes_recursive": []},
    }


class FakeStatsDocker:
    """Stats per container id, with knobs: a delay, per-id errors, a refused session."""

    def __init__(self) -> None:
        self.endpoint = Endpoint("fake://docker", None)
        self.ticks = 0
        self.delay = 0.0
        self.errors: dict[str, DockerFailure] = {}
        self.gone: set[str] = set()
        self.bodies: dict[str, object] = {}
        self.refuse: DockerFailure | None = None
        self.during_call: dict[str, Callable[[], object]] = {}
        self.calls: list[str] = []
        self.inflight = 0
        self.max_inflight = 0
        self.sessions_opened = 0
        self.sessions_closed = 0

    def gateway(self) -> FakeStatsGateway:
        return FakeStatsGateway(self)


class FakeStatsGateway:
    def __init__(self, docker: FakeStatsDocker) -> None:
        self._docker = docker
        self.endpoint = docker.endpoint

    async def open_session(self) -> FakeStatsSession:
        await anyio.lowlevel.checkpoint()
        if self._docker.refuse is not None:
            raise DockerCallError(self._docker.refuse)
        self._docker.sessions_opened += 1
        return FakeStatsSession(self._docker)


class FakeStatsSession:
    """Only what the sampler uses; the rest of the Session protocol is not called."""

    def __init__(self, docker: FakeStatsDocker) -> None:
        self._docker = docker
        self.version: Mapping[str, Any] = {"ApiVersion": "1.41"}

    async def ping(self) -> None:
        raise AssertionError("the sampler does not ping")

    async def list_ids(self) -> list[str]:
        raise AssertionError("the sampler does not list")

    async def inspect(self, container_id: str) -> Mapping[str, Any] | None:
        raise AssertionError("the sampler does not inspect")

    async def open_events(self) -> Any:
        raise AssertionError("the sampler does not subscribe")

    async def stats(self, container_id: str) -> Mapping[str, Any] | None:
        d = self._docker
        d.calls.append(container_id)
        d.inflight += 1
        d.max_inflight = max(d.max_inflight, d.inflight)
        try:
            await anyio.sleep(d.delay)
            hook = d.during_call.pop(container_id, None)
            if hook is not None:
                hook()
            if container_id in d.errors:
                raise DockerCallError(d.errors[container_id])
            if container_id in d.gone:
                return None
            if container_id in d.bodies:
                return d.bodies[container_id]  # type: ignore[return-value]
            # Every container burns a quarter of one of 2 CPUs per tick.
            return stats_body(250 * d.ticks, 1000 * d.ticks)
        finally:
            d.inflight -= 1

    async def aclose(self) -> None:
        self._docker.sessions_closed += 1


def record(
    cid: str, name: str, *, status: str = "running", started_at: str = STARTED
) -> ContainerRecord:
    return record_from_inspect(
        {"Id": cid, "Name": "/" + name, "State": {"Status": status, "StartedAt": started_at}}
    )


class Rig:
    """A cache, a connected state machine, a store and a sampler over the fake."""

    def __init__(
        self,
        *names: str,
        interval: float = 60.0,
        concurrency: int = 4,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.docker = FakeStatsDocker()
        self.synced = True
        self.cache = Cache(64, initial_revision=1)
        self.ids = [f"{i:02d}" + "f" * 62 for i in range(len(names))]
        for cid, name in zip(self.ids, names, strict=True):
            self.cache.upsert(record(cid, name))
        self.machine = ConnectionMachine(Backoff(BackoffSettings()), now=time.time())
        self.machine.begin_attempt(now=time.time(), cause="start")
        self.machine.succeeded(now=time.time())
        self.feed = ChangeFeed()
        self.store = StatsStore(self.cache)
        self.sampler = Sampler(
            store=self.store,
            cache=self.cache,
            machine=self.machine,
            make_gateway=self.docker.gateway,
            settings=StatsSettings(interval_seconds=interval, concurrency=concurrency),
            synced=lambda: self.synced,
            feed=self.feed,
            registry=registry,
        )

    async def round(self) -> None:
        self.docker.ticks += 1
        with anyio.fail_after(5):
            await self.sampler.sample_round()


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``predicate`` until true; fail after ``within`` seconds."""
    with anyio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - polling state the code under test owns
            await anyio.sleep(0.01)


async def test_round_samples_running_containers_cpu_null_then_computed() -> None:
    """First round: every running container has stats with CPU null; second: CPU computed."""
    rig = Rig("web", "db", "cron")
    rig.cache.upsert(record(rig.ids[2], "cron", status="exited"))
    await rig.round()
    assert sorted(rig.docker.calls) == sorted(rig.ids[:2])
    for cid in rig.ids[:2]:
        doc = rig.store.json(cid)
        assert doc is not None and doc["cpu_percent"] is None
    assert rig.store.json(rig.ids[2]) is None
    await rig.round()
    for cid in rig.ids[:2]:
        doc = rig.store.json(cid)
        assert doc is not None and doc["cpu_percent"] == pytest.approx(50.0)  # 250/1000 * 2 * 100
    assert (rig.sampler.rounds, rig.sampler.samples) == (2, 4)
    assert rig.docker.sessions_opened == rig.docker.sessions_closed == 2


async def test_round_does_not_touch_the_mirror() -> None:
    """Rounds leave the cache revision and its history alone."""
    rig = Rig("web", "db")
    revision = rig.cache.revision
    await rig.round()
    await rig.round()
    assert rig.cache.revision == revision
    assert rig.cache.deltas_since(revision) == []


async def test_concurrency_is_bounded() -> None:
    """With 12 containers and concurrency 3, at most 3 stats calls are in flight, all done."""
    rig = Rig(*(f"c{i}" for i in range(12)), concurrency=3)
    rig.docker.delay = 0.02
    await rig.round()
    assert rig.docker.max_inflight == 3
    assert len(rig.docker.calls) == 12
    assert len(rig.store) == 12


async def test_one_failing_container_does_not_fail_the_others() -> None:
    """An API error for one container skips it; the other containers are sampled."""
    rig = Rig("web", "db", "cron")
    rig.docker.errors[rig.ids[1]] = failure(ErrorKind.API_ERROR)
    await rig.round()
    assert rig.store.json(rig.ids[0]) is not None
    assert rig.store.json(rig.ids[1]) is None
    assert rig.store.json(rig.ids[2]) is not None
    assert (rig.sampler.failures, rig.sampler.rounds, rig.sampler.aborted) == (1, 1, 0)


async def test_gone_container_is_dropped() -> None:
    """A 404/409 (the gateway's None) drops the stats the store held for that container."""
    rig = Rig("web", "db")
    await rig.round()
    assert len(rig.store) == 2
    rig.docker.gone.add(rig.ids[0])
    await rig.round()
    assert len(rig.store) == 1 and rig.store.json(rig.ids[0]) is None


async def test_container_stopping_during_its_call_is_not_stored() -> None:
    """The record is checked again after the call: a stop meanwhile discards the answer."""
    rig = Rig("web", "db")
    rig.docker.during_call[rig.ids[0]] = lambda: rig.cache.upsert(
        record(rig.ids[0], "web", status="exited")
    )
    await rig.round()
    assert rig.ids[0] not in rig.store
    assert rig.ids[1] in rig.store


async def test_container_restarting_during_its_call_is_not_stored() -> None:
    """A new StartedAt during the call means the answer may be of either run: discarded."""
    rig = Rig("web")
    await rig.round()
    rig.docker.during_call[rig.ids[0]] = lambda: rig.cache.upsert(
        record(rig.ids[0], "web", started_at="2026-12-04T17:00:00.000000Z")
    )
    await rig.round()
    assert len(rig.store) == 0


@pytest.mark.parametrize(
    "kind", [ErrorKind.CONNECTION_REFUSED, ErrorKind.TIMEOUT, ErrorKind.PERMISSION_DENIED]
)
async def test_outage_during_a_round_stops_it(kind: ErrorKind) -> None:
    """A failure that means Docker is away ends the round; no duration is recorded."""
    registry = CollectorRegistry()
    rig = Rig(*(f"c{i}" for i in range(8)), concurrency=1, registry=registry)
    rig.docker.errors[rig.ids[2]] = failure(kind)
    await rig.round()
    assert len(rig.docker.calls) == 3  # sequential: the rest were not asked
    assert (rig.sampler.aborted, rig.sampler.rounds) == (1, 0)
    assert registry.get_sample_value(DURATION + "_count") == 0
    assert rig.docker.sessions_closed == rig.docker.sessions_opened == 1


async def test_refused_session_skips_the_round() -> None:
    """When no session can be opened the round is skipped, the store kept as it was."""
    rig = Rig("web")
    await rig.round()
    rig.docker.refuse = failure(ErrorKind.CONNECTION_REFUSED)
    await rig.round()
    assert rig.sampler.aborted == 1
    assert rig.ids[0] in rig.store


async def test_no_running_containers_no_session() -> None:
    """With nothing running, a round opens no session and records nothing."""
    rig = Rig("web")
    rig.cache.upsert(record(rig.ids[0], "web", status="exited"))
    await rig.round()
    assert rig.docker.sessions_opened == 0
    assert rig.sampler.rounds == 0


async def test_duration_histogram_counts_complete_rounds() -> None:
    """Each complete round adds one observation to the histogram on the given registry."""
    registry = CollectorRegistry()
    rig = Rig("web", "db", registry=registry)
    rig.docker.delay = 0.05
    await rig.round()
    await rig.round()
    assert registry.get_sample_value(DURATION + "_count") == 2
    total = registry.get_sample_value(DURATION + "_sum")
    assert total is not None and 0.1 <= total < 5
    assert registry.get_sample_value(DURATION + "_bucket", {"le": "0.05"}) == 0
    assert rig.sampler.last_round_seconds is not None and rig.sampler.last_round_seconds >= 0.05


async def test_interval_zero_disables_sampling() -> None:
    """stats.interval_seconds = 0: serve() returns at once and never asks Docker."""
    rig = Rig("web", interval=0)
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            await tg.start(rig.sampler.serve)
    assert rig.docker.sessions_opened == 0 and rig.docker.calls == []


async def test_serve_samples_every_interval() -> None:
    """serve() runs a round per interval while connected (0.1 s interval, ≥ 3 rounds)."""
    rig = Rig("web", interval=0.1)
    async with anyio.create_task_group() as tg:
        await tg.start(rig.sampler.serve)
        await wait_until(lambda: rig.sampler.rounds >= 3)
        tg.cancel_scope.cancel()
    assert rig.docker.sessions_opened == rig.docker.sessions_closed


async def test_serve_pauses_while_disconnected_and_resumes() -> None:
    """Not connected: no session is opened; once connected again, sampling resumes."""
    rig = Rig("web", interval=0.05)
    rig.machine.lost(failure(ErrorKind.CONNECTION_REFUSED), now=time.time())
    async with anyio.create_task_group() as tg:
        await tg.start(rig.sampler.serve)
        await anyio.sleep(0.3)
        assert rig.docker.sessions_opened == 0
        rig.machine.begin_attempt(now=time.time(), cause="test")
        rig.machine.succeeded(now=time.time())
        rig.feed.notify()
        await wait_until(lambda: rig.sampler.rounds >= 1)
        tg.cancel_scope.cancel()


async def test_serve_waits_for_the_mirror_to_be_synced() -> None:
    """Connected but not yet synced (resync under way): the first round waits for it."""
    rig = Rig("web", interval=600)
    rig.synced = False
    async with anyio.create_task_group() as tg:
        await tg.start(rig.sampler.serve)
        await anyio.sleep(0.2)
        assert rig.docker.sessions_opened == 0
        rig.synced = True
        rig.feed.notify()  # the watcher notifies when the resync ends
        await wait_until(lambda: rig.sampler.rounds == 1, within=2)
        tg.cancel_scope.cancel()


async def test_connection_lost_mid_round_stops_the_round() -> None:
    """The state machine leaving connected mid-round stops the remaining calls."""
    rig = Rig(*(f"c{i}" for i in range(6)), concurrency=1)
    rig.docker.during_call[rig.ids[1]] = lambda: rig.machine.lost(
        failure(ErrorKind.CONNECTION_REFUSED), now=time.time()
    )
    await rig.round()
    assert len(rig.docker.calls) == 2
    assert rig.sampler.aborted == 1


async def test_removed_container_dropped_at_once_between_rounds() -> None:
    """Between rounds, a mirror change prunes the store at once, not at the next round."""
    rig = Rig("web", "db", interval=600)
    async with anyio.create_task_group() as tg:
        await tg.start(rig.sampler.serve)
        await wait_until(lambda: len(rig.store) == 2)
        rig.cache.remove(rig.ids[0])
        rig.cache.upsert(record(rig.ids[1], "db", status="exited"))
        rig.feed.notify()
        # len() counts what is held, without the read-time check of get()/json().
        await wait_until(lambda: len(rig.store) == 0, within=2)
        assert rig.sampler.rounds == 1
        tg.cancel_scope.cancel()


async def test_malformed_body_is_skipped() -> None:
    """A body that is not an object counts as a failure for that container only."""
    rig = Rig("web", "db")
    rig.docker.bodies[rig.ids[0]] = ["not", "an", "object"]
    await rig.round()
    assert rig.ids[0] not in rig.store and rig.ids[1] in rig.store
    assert rig.sampler.failures == 1


async def test_with_the_watcher_over_the_shared_fake() -> None:
    """The watcher mirrors the shared FakeDocker; the sampler follows starts, stops, removals."""
    from tests.fakes import FakeDocker, make_watcher

    docker = FakeDocker()
    web, db = docker.create("web"), docker.create("db")
    docker.start(web)
    docker.start(db)
    for cid in (web, db):
        docker.stats_bodies[cid] = stats_body(1, 1)
    watcher, _ = make_watcher(docker)
    store = StatsStore(watcher.cache)
    sampler = Sampler(
        store=store,
        cache=watcher.cache,
        machine=watcher.machine,
        make_gateway=docker.gateway,
        settings=StatsSettings(interval_seconds=0.05, concurrency=2),
        synced=lambda: watcher.synced,
        feed=watcher.feed,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.serve)
        await tg.start(sampler.serve)
        await wait_until(lambda: store.json(web) is not None and store.json(db) is not None)
        revision = watcher.cache.revision
        cron = docker.create("cron")
        docker.stats_bodies[cron] = stats_body(1, 1)
        docker.start(cron)  # sampled at a later round
        await wait_until(lambda: store.json(cron) is not None)
        # Rounds ran all along, yet the only changes of the mirror are cron's.
        deltas = watcher.cache.deltas_since(revision)
        assert deltas and {d.container_id for d in deltas} == {cron}
        docker.die(db)
        docker.destroy(web)
        await wait_until(lambda: len(store) == 1, within=2)
        assert store.json(cron) is not None
        tg.cancel_scope.cancel()
