"""The watcher in-process against a real dockerd: every change, compared with Docker's own inspect.

Each test runs ``runtime.watcher.serve`` (from ``build_runtime``) in a task group and
waits, bounded, until the cache holds what ``docker inspect`` says. The outage tests
use a private engine that they stop (SIGTERM) or kill (SIGKILL) and start again.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import docker
import docker.errors
import pytest

from supervisor.access import resolve_endpoint
from supervisor.broadcast import ChangeFeed
from supervisor.cache import Cache
from supervisor.daemon import Runtime, build_runtime
from supervisor.gateway import DockerGateway, Gateway, Session
from supervisor.records import ContainerRecord, record_from_inspect
from supervisor.settings import (
    BackoffSettings,
    DockerSettings,
    MetricsSettings,
    Settings,
    WatchSettings,
)
from supervisor.state import Backoff, ConnectionMachine, ConnectionState, ErrorKind
from supervisor.watcher import Watcher
from tests.conftest import start_private_dockerd
from tests.dockerd import (
    TEST_LABEL,
    ContainerFactory,
    PrivateDockerd,
    docker_py_socket_leak_ignored,
)
from tests.fakes import apply_deltas, cache_state, wait_until

pytestmark = pytest.mark.docker

S = ConnectionState
T = TypeVar("T")

#: A pid 1 that exits at once on SIGTERM (busybox sleep as pid 1 ignores it for 10 s).
TERMINABLE = ("/bin/sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait")


def fast_settings(host: str) -> Settings:
    return Settings(
        docker=DockerSettings(
            host=host,
            ping_interval_seconds=1.0,
            ping_timeout_seconds=2.0,
            call_timeout_seconds=10.0,
        ),
        backoff=BackoffSettings(
            initial_seconds=0.05, factor=2.0, max_seconds=0.5, reset_after_seconds=5.0
        ),
        watch=WatchSettings(socket_poll_seconds=0.05),
        metrics=MetricsSettings(listen=""),
    )


async def call(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A blocking docker-py call, off the event loop."""
    return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs))


async def inspect(api: docker.APIClient, cid: str) -> dict[str, Any] | None:
    try:
        body: dict[str, Any] = await call(api.inspect_container, cid)
    except docker.errors.NotFound:
        return None
    return body


def assert_matches_inspect(record: ContainerRecord, body: Mapping[str, Any]) -> None:
    """The record's fields against Docker's raw inspect JSON, field by field."""
    state = body["State"]
    zero = "0001-01-01T00:00:00Z"
    assert record.id == body["Id"]
    assert record.name == body["Name"].lstrip("/")
    assert record.image == body["Config"]["Image"]
    assert record.image_id == body["Image"]
    assert record.state == state["Status"]
    assert record.health == (state.get("Health") or {}).get("Status")
    assert record.exit_code == state["ExitCode"]
    assert record.created == body["Created"]
    assert record.started_at == (None if state["StartedAt"] == zero else state["StartedAt"])
    assert record.finished_at == (None if state["FinishedAt"] == zero else state["FinishedAt"])
    assert record.restart_count == body["RestartCount"]
    assert record.oom_killed == state["OOMKilled"]
    assert dict(record.labels) == (body["Config"]["Labels"] or {})
    assert list(record.networks) == sorted(body["NetworkSettings"]["Networks"])
    assert record == record_from_inspect(body)


async def mirrored(
    runtime: Runtime,
    api: docker.APIClient,
    cid: str,
    until: Callable[[ContainerRecord], bool] = lambda r: True,
    limit: float = 10.0,
) -> ContainerRecord:
    """Wait until the cache holds exactly what Docker's inspect says, and ``until`` holds."""
    body: dict[str, Any] | None = None
    with anyio.fail_after(limit):
        while True:
            body = await inspect(api, cid)
            record = runtime.cache.get(cid)
            if (
                body is not None
                and record is not None
                and until(record)
                and record == record_from_inspect(body)
            ):
                assert_matches_inspect(record, body)
                return record
            await anyio.sleep(0.02)


async def gone(runtime: Runtime, cid: str, limit: float = 10.0) -> None:
    await wait_until(lambda: cid not in runtime.cache, limit)


async def truth(api: docker.APIClient) -> dict[str, ContainerRecord]:
    """Every container Docker has, as records, straight from its inspect."""
    records = {}
    for row in await call(api.containers, all=True, quiet=True):
        body = await inspect(api, row["Id"])
        if body is not None:
            records[row["Id"]] = record_from_inspect(body)
    return records


async def settled_to_truth(cache: Cache, api: docker.APIClient, limit: float = 15.0) -> None:
    """Wait until the cache equals all of Docker, twice in a row 0.1 s apart."""
    with anyio.fail_after(limit):
        matches = 0
        while matches < 2:
            matches = matches + 1 if cache_state(cache) == await truth(api) else 0
            await anyio.sleep(0.1)


@asynccontextmanager
async def serving(watcher: Watcher) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.serve)
        await wait_until(lambda: watcher.synced, 20)
        yield
        tg.cancel_scope.cancel()


@asynccontextmanager
async def watching(host: str) -> AsyncIterator[Runtime]:
    """A runtime from build_runtime() whose watcher serves the engine at ``host``."""
    runtime = build_runtime(fast_settings(host), environ={})
    async with serving(runtime.watcher):
        yield runtime


# -- lifecycle on the shared engine -----------------------------------------------------


async def test_initial_sync_equals_docker(
    docker_host: str, docker_api: docker.APIClient, make_container: ContainerFactory
) -> None:
    """Containers made before the watcher starts are all mirrored, equal to their inspect."""
    made = [
        make_container(start=False, name="hls-w-created"),
        make_container(name="hls-w-running", labels={"role": "db"}),
        make_container(["/bin/sh", "-c", "exit 5"], name="hls-w-exited"),
    ]
    await call(docker_api.wait, made[2], timeout=10)
    async with watching(docker_host) as runtime:
        await settled_to_truth(runtime.cache, docker_api)
        states = [await mirrored(runtime, docker_api, cid) for cid in made]
        assert runtime.machine.state is S.CONNECTED
    assert [(r.state, r.exit_code) for r in states] == [
        ("created", 0),
        ("running", 0),
        ("exited", 5),
    ]
    assert states[1].labels == {TEST_LABEL: "1", "role": "db"}


async def test_create_start_stop_start_kill_remove(
    docker_host: str, docker_api: docker.APIClient, make_container: ContainerFactory
) -> None:
    """create → start → stop → start → kill → remove, each mirrored as Docker inspects it."""
    async with watching(docker_host) as runtime:
        cid = make_container(TERMINABLE, start=False, name="hls-w-life")
        created = await mirrored(runtime, docker_api, cid, lambda r: r.state == "created")
        assert (created.started_at, created.finished_at) == (None, None)

        await call(docker_api.start, cid)
        first = await mirrored(runtime, docker_api, cid, lambda r: r.state == "running")
        assert first.started_at is not None

        await call(docker_api.stop, cid, timeout=5)
        stopped = await mirrored(runtime, docker_api, cid, lambda r: r.state == "exited")
        assert stopped.exit_code == 0 and stopped.finished_at is not None

        await call(docker_api.start, cid)
        second = await mirrored(
            runtime,
            docker_api,
            cid,
            lambda r: r.state == "running" and r.started_at != first.started_at,
        )
        assert second.restart_count == 0  # a manual start is not a policy restart

        await call(docker_api.kill, cid)
        killed = await mirrored(runtime, docker_api, cid, lambda r: r.state == "exited")
        assert killed.exit_code == 137

        rev = runtime.cache.revision
        await call(docker_api.remove_container, cid)
        await gone(runtime, cid)
        deltas = runtime.cache.deltas_since(rev)
        assert deltas is not None and [(d.type, d.container_id) for d in deltas] == [
            ("remove", cid)
        ]


async def test_pause_unpause_and_rename(
    docker_host: str, docker_api: docker.APIClient, make_container: ContainerFactory
) -> None:
    """pause, unpause and rename are mirrored; the name has no leading slash."""
    cid = make_container(name="hls-w-before")
    async with watching(docker_host) as runtime:
        await mirrored(runtime, docker_api, cid, lambda r: r.state == "running")
        await call(docker_api.pause, cid)
        await mirrored(runtime, docker_api, cid, lambda r: r.state == "paused")
        await call(docker_api.unpause, cid)
        await mirrored(runtime, docker_api, cid, lambda r: r.state == "running")
        await call(docker_api.rename, cid, "hls-w-after")
        renamed = await mirrored(runtime, docker_api, cid, lambda r: r.name == "hls-w-after")
        assert runtime.cache.find("hls-w-after") == [renamed]
        assert runtime.cache.find("/hls-w-after") == [renamed]
        assert runtime.cache.find("hls-w-before") == []


async def test_healthcheck_goes_healthy_then_unhealthy(
    docker_host: str, docker_api: docker.APIClient, make_container: ContainerFactory
) -> None:
    """A healthcheck on a file: starting/healthy while it exists, unhealthy once removed."""
    healthcheck = {
        "test": ["CMD", "/bin/sh", "-c", "test -f /tmp/ok"],
        "interval": 200_000_000,
        "timeout": 1_000_000_000,
        "retries": 1,
        "start_period": 0,
    }
    async with watching(docker_host) as runtime:
        cid = make_container(
            ["/bin/sh", "-c", "touch /tmp/ok; exec sleep 1000"],
            name="hls-w-health",
            healthcheck=healthcheck,
        )
        healthy = await mirrored(runtime, docker_api, cid, lambda r: r.health == "healthy")
        assert healthy.state == "running"
        exec_id = await call(docker_api.exec_create, cid, ["/bin/rm", "/tmp/ok"])
        await call(docker_api.exec_start, exec_id["Id"])
        await mirrored(runtime, docker_api, cid, lambda r: r.health == "unhealthy")
        exec_id = await call(docker_api.exec_create, cid, ["/bin/touch", "/tmp/ok"])
        await call(docker_api.exec_start, exec_id["Id"])
        await mirrored(runtime, docker_api, cid, lambda r: r.health == "healthy")


async def test_restart_policy_restarts_a_crashing_container(
    docker_host: str, docker_api: docker.APIClient, make_container: ContainerFactory
) -> None:
    """on-failure:2 restarts a crashing container twice: restart_count and started_at follow."""
    async with watching(docker_host) as runtime:
        cid = make_container(
            ["/bin/sh", "-c", "sleep 0.2; exit 3"],
            name="hls-w-crash",
            restart_policy={"Name": "on-failure", "MaximumRetryCount": 2},
        )
        started: set[str] = set()

        def note(r: ContainerRecord) -> bool:
            if r.started_at:
                started.add(r.started_at)
            return r.restart_count == 2 and r.state == "exited"

        final = await mirrored(runtime, docker_api, cid, note, limit=20)
        assert final.exit_code == 3
        assert len(started) >= 2  # the mirror saw the container start more than once
        deltas = runtime.cache.deltas_since(runtime.cache.oldest_resumable)
        assert deltas is not None
        counts = [d.record.restart_count for d in deltas if d.record and d.container_id == cid]
        assert counts == sorted(counts) and counts[-1] == 2


async def test_compose_labels_network_and_published_port(
    docker_host: str, docker_api: docker.APIClient, make_container: ContainerFactory
) -> None:
    """A compose-style container on its own network with a published port, as inspect shows it."""
    network = await call(docker_api.create_network, "hls-w-net", labels={TEST_LABEL: "1"})
    cid = ""
    try:
        host_config = docker_api.create_host_config(
            network_mode="hls-w-net", port_bindings={8080: ("127.0.0.1", None)}
        )
        cid = make_container(
            name="hls-w-web",
            labels={"com.docker.compose.project": "media", "com.docker.compose.service": "web"},
            host_config=host_config,
            ports=[8080],
        )
        async with watching(docker_host) as runtime:
            record = await mirrored(runtime, docker_api, cid, lambda r: r.state == "running")
            assert record.compose is not None
            assert (record.compose.project, record.compose.service) == ("media", "web")
            assert record.networks == ("hls-w-net",)
            [port] = record.ports
            assert (port.container_port, port.protocol, port.host_ip) == (8080, "tcp", "127.0.0.1")
            body = await inspect(docker_api, cid)
            assert body is not None
            live = body["NetworkSettings"]["Ports"]["8080/tcp"][0]
            assert port.host_port == int(live["HostPort"]) > 0
            await call(docker_api.kill, cid)
            stopped = await mirrored(runtime, docker_api, cid, lambda r: r.state == "exited")
            # Stopped: no live binding, the configured one still shows the claim.
            assert [(p.container_port, p.host_ip) for p in stopped.ports] == [(8080, "127.0.0.1")]
    finally:
        if cid:
            await call(docker_api.remove_container, cid, force=True)
        await call(docker_api.remove_network, network["Id"])


# -- Docker going away and coming back ----------------------------------------------------


class Gate:
    """Holds the watcher's reconnect attempts (not its liveness probes) until opened.

    It lets a test change containers after Docker is back but before the watcher
    reconnects, the only way to make changes nobody is subscribed to.
    """

    def __init__(self, machine: ConnectionMachine, make: Callable[[], DockerGateway]) -> None:
        self._machine = machine
        self._make = make
        self.opened = anyio.Event()
        self.opened.set()
        #: (state, last error kind) each time the watcher starts an attempt or a probe.
        self.seen: list[tuple[ConnectionState, ErrorKind | None]] = []

    def close(self) -> None:
        self.opened = anyio.Event()

    def __call__(self) -> Gateway:
        m = self._machine
        self.seen.append((m.state, m.last_error.kind if m.last_error else None))
        inner = self._make()
        gate = self

        class Gated:
            endpoint = inner.endpoint

            async def open_session(self) -> Session:
                if m.state is not S.CONNECTED:  # a reconnect, not a probe
                    await gate.opened.wait()
                return await inner.open_session()

        return Gated()


def gated_watcher(host: str) -> tuple[Watcher, Gate]:
    settings = fast_settings(host)
    machine = ConnectionMachine(Backoff(settings.backoff), now=time.time())
    gate = Gate(
        machine, lambda: DockerGateway(settings.docker, resolve_endpoint(settings.docker, {}))
    )
    watcher = Watcher(
        make_gateway=gate,
        machine=machine,
        cache=Cache(settings.watch.history_size, initial_revision=1),
        feed=ChangeFeed(),
        docker_settings=settings.docker,
        watch_settings=settings.watch,
    )
    return watcher, gate


async def wait_for_loss(watcher: Watcher, limit: float = 15.0) -> None:
    await wait_until(
        lambda: watcher.machine.transition_counts[(S.CONNECTED, S.BACKING_OFF)] > 0, limit
    )


@pytest.fixture
def dockerd_without_live_restore() -> Iterator[PrivateDockerd]:
    """A private engine that stops its containers when it stops, as most hosts run it."""
    engine = start_private_dockerd(live_restore=False)
    try:
        yield engine
    finally:
        engine.close()


async def test_dockerd_killed_and_restarted_live_restore(private_dockerd: PrivateDockerd) -> None:
    """SIGKILL (stale socket, pid file), a container dying and changes before the reconnect: all mirrored."""
    engine = private_dockerd
    api = engine.api()
    factory = ContainerFactory(api)
    try:
        keep = factory(name="keep")
        victim = factory(name="victim")
        doomed = factory(start=False, name="doomed")
        starter = factory(start=False, name="starter")
        stopped_late = factory(TERMINABLE, name="stopped-late")
        watcher, gate = gated_watcher(engine.host)
        # Calls of the watcher's old session that hit the dead engine leak docker-py's
        # socket until it is collected (see docker_py_socket_leak_ignored).
        with docker_py_socket_leak_ignored():
            async with serving(watcher):
                await settled_to_truth(watcher.cache, api)
                old, rev0 = cache_state(watcher.cache), watcher.cache.revision
                victim_pid = (await inspect(api, victim) or {})["State"]["Pid"]

                gate.close()
                await call(api.stop, stopped_late, timeout=5)  # right before the crash
                engine.kill()
                assert engine.socket_path.is_socket() and engine.pid_file.exists()
                await wait_for_loss(watcher)
                assert watcher.machine.last_error is not None
                assert watcher.machine.last_error.kind is ErrorKind.CONNECTION_REFUSED
                assert not watcher.synced
                os.kill(victim_pid, signal.SIGKILL)  # dies while nobody watches

                await call(engine.restart)
                fresh = engine.api()
                await call(fresh.remove_container, doomed)
                newcomer = await call(
                    fresh.create_container,
                    factory.image,
                    ["/bin/true"],
                    name="newcomer",
                    labels={TEST_LABEL: "1"},
                )
                await call(fresh.start, starter)
                await call(fresh.rename, keep, "kept")
                assert watcher.machine.state is not S.CONNECTED
                gate.opened.set()

                await settled_to_truth(watcher.cache, fresh)
                assert watcher.machine.connected and watcher.synced
                now = cache_state(watcher.cache)
                assert now[victim].state == "exited" and now[victim].exit_code == 137
                assert now[stopped_late].state == "exited"
                assert doomed not in now and newcomer["Id"] in now
                assert now[starter].state == "running" and now[keep].name == "kept"
                deltas = watcher.cache.deltas_since(rev0)
                assert deltas is not None
                assert apply_deltas(old, deltas) == now
                assert {d.container_id for d in deltas} >= {
                    victim,
                    doomed,
                    newcomer["Id"],
                    starter,
                    keep,
                }
                assert (S.BACKING_OFF, ErrorKind.CONNECTION_REFUSED) in gate.seen
                assert watcher.machine.transition_counts[(S.CONNECTING, S.CONNECTED)] == 2
                fresh.close()
    finally:
        factory.cleanup()
        api.close()


async def test_dockerd_stopped_and_started_without_live_restore(
    dockerd_without_live_restore: PrivateDockerd,
) -> None:
    """SIGTERM stops the containers; a restart policy brings one back; changes before the reconnect."""
    engine = dockerd_without_live_restore
    api = engine.api()
    factory = ContainerFactory(api)
    try:
        plain = factory(TERMINABLE, name="plain")
        always = factory(TERMINABLE, name="always", restart_policy={"Name": "always"})
        doomed = factory(start=False, name="doomed")
        watcher, gate = gated_watcher(engine.host)
        # Calls of the watcher's old session that hit the dead engine leak docker-py's
        # socket until it is collected (see docker_py_socket_leak_ignored).
        with docker_py_socket_leak_ignored():
            async with serving(watcher):
                await settled_to_truth(watcher.cache, api)
                old, rev0 = cache_state(watcher.cache), watcher.cache.revision
                before_always = old[always]

                gate.close()
                doomed2 = factory(start=False, name="doomed2")  # right before the stop
                await call(engine.stop)
                assert not engine.socket_path.exists()
                await wait_for_loss(watcher)
                assert watcher.machine.last_error is not None
                assert watcher.machine.last_error.kind in (
                    ErrorKind.SOCKET_MISSING,
                    ErrorKind.CONNECTION_REFUSED,
                )

                await call(engine.start)
                fresh = engine.api()
                await call(fresh.remove_container, doomed)
                await call(fresh.remove_container, doomed2)
                newcomer = await call(
                    fresh.create_container,
                    factory.image,
                    ["/bin/true"],
                    name="newcomer",
                    labels={TEST_LABEL: "1"},
                )
                gate.opened.set()

                await settled_to_truth(watcher.cache, fresh)
                now = cache_state(watcher.cache)
                assert now[plain].state == "exited"
                assert now[always].state == "running"
                assert now[always].started_at != before_always.started_at  # a restart, revealed
                assert doomed not in now and doomed2 not in now and newcomer["Id"] in now
                deltas = watcher.cache.deltas_since(rev0)
                assert deltas is not None
                assert apply_deltas(old, deltas) == now
                assert watcher.machine.transition_counts[(S.CONNECTING, S.CONNECTED)] == 2
                fresh.close()
    finally:
        factory.cleanup()
        api.close()
