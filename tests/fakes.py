"""A fake Docker behind the Gateway/Session/EventStream protocols of supervisor.gateway.

The fake keeps a "truth" (inspect bodies by id) that tests mutate through verbs
(create, start, stop, destroy, ...). Each verb emits the event Docker would, to the
event streams open at that moment, exactly as a subscription only sees what
happens after it. Knobs make the next connection fail, hold inspects, hang pings,
and run hooks at precise points of a (re)connect (after the subscription, after
the list, inside an inspect), so tests can place changes where races live.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.lowlevel

from supervisor.access import Endpoint
from supervisor.broadcast import ChangeFeed
from supervisor.cache import Cache, Delta
from supervisor.gateway import DockerCallError
from supervisor.records import ContainerRecord, record_from_inspect, rfc3339
from supervisor.settings import BackoffSettings, DockerSettings, WatchSettings
from supervisor.state import Backoff, ConnectionMachine, DockerFailure, ErrorKind
from supervisor.watcher import Watcher

ZERO_TIME = "0001-01-01T00:00:00Z"
IMAGE_ID = "sha256:" + "ab" * 32

#: Hook points of a (re)connect, in the order a correct watcher reaches them.
HOOK_POINTS = ("open_session", "after_subscribe", "after_list", "inspect")


def failure(kind: ErrorKind, message: str = "") -> DockerFailure:
    """A classified failure as the real gateway would produce it."""
    return DockerFailure(kind, message or kind.value, f"fix {kind.value}", time.time())


def inspect_body(
    container_id: str,
    name: str,
    *,
    status: str = "created",
    started_at: str = ZERO_TIME,
    finished_at: str = ZERO_TIME,
    exit_code: int = 0,
    restart_count: int = 0,
    health: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A hand-written ``GET /containers/{id}/json`` body of the shape Docker 20.10 returns."""
    state: dict[str, Any] = {
        "Status": status,
        "Running": status in ("running", "paused", "restarting"),
        "Paused": status == "paused",
        "Restarting": status == "restarting",
        "OOMKilled": False,
        "Dead": status == "dead",
        "Pid": 4242 if status in ("running", "paused") else 0,
        "ExitCode": exit_code,
        "Error": "",
        "StartedAt": started_at,
        "FinishedAt": finished_at,
    }
    if health is not None:
        state["Health"] = {"Status": health, "FailingStreak": 0, "Log": []}
    return {
        "Id": container_id,
        "Created": "2026-12-04T15:00:00.123456789Z",
        "Path": "/bin/sleep",
        "Args": ["1000"],
        "State": state,
        "Image": IMAGE_ID,
        "Name": "/" + name,
        "RestartCount": restart_count,
        "HostConfig": {"NetworkMode": "none", "PortBindings": {}},
        "Config": {
            "Image": "hls-test/busybox:latest",
            "Labels": dict(labels or {}),
            "ExposedPorts": None,
        },
        "NetworkSettings": {"Ports": {}, "Networks": {"none": {"NetworkID": "n0"}}},
    }


class FakeEventStream:
    """One subscription: events emitted after it was opened, until closed or ended."""

    def __init__(self, docker: FakeDocker) -> None:
        self._docker = docker
        self._queue: deque[object] = deque()
        self._wakeup = anyio.Event()
        self.ended = False
        self.closed = False

    @property
    def pending(self) -> int:
        return len(self._queue)

    def push(self, event: object) -> None:
        self._queue.append(event)
        self._wakeup.set()

    def end(self) -> None:
        """Docker closed the stream (daemon stopping, connection dropped)."""
        self.ended = True
        self._wakeup.set()

    async def next(self) -> object:
        await anyio.lowlevel.checkpoint()
        while not self._queue:
            if self.ended or self.closed:
                return None
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        return self._queue.popleft()

    async def aclose(self) -> None:
        self.closed = True
        self._wakeup.set()
        if self in self._docker.streams:
            self._docker.streams.remove(self)


class FakeSession:
    def __init__(self, docker: FakeDocker) -> None:
        self._docker = docker
        self.version: Mapping[str, Any] = {"Version": "20.10.24-fake", "ApiVersion": "1.41"}
        self.closed = False

    async def ping(self) -> None:
        d = self._docker
        d.calls.append(("ping",))
        await anyio.lowlevel.checkpoint()
        if d.ping_hangs:
            # The real session bounds its ping with ping_timeout_seconds.
            await anyio.sleep(d.ping_timeout_seconds)
            raise TimeoutError
        if d.ping_failure is not None:
            raise DockerCallError(d.ping_failure)

    async def list_ids(self) -> list[str]:
        d = self._docker
        d.calls.append(("list",))
        await anyio.lowlevel.checkpoint()
        if d.list_failure is not None:
            raise DockerCallError(d.list_failure)
        ids = list(d.containers)
        d.run_hooks("after_list")
        return ids

    async def inspect(self, container_id: str) -> Mapping[str, Any] | None:
        d = self._docker
        d.calls.append(("inspect", container_id))
        d.inspect_counts[container_id] += 1
        d.inflight[container_id] += 1
        d.max_inflight[container_id] = max(d.max_inflight[container_id], d.inflight[container_id])
        try:
            # The answer is Docker's state now; it reaches the caller a little later.
            body = copy.deepcopy(d.containers.get(container_id))
            d.run_hooks("inspect")
            await anyio.lowlevel.checkpoint()
            if d.inspect_gate is not None:
                await d.inspect_gate.wait()
            if d.inspect_failure is not None:
                raise DockerCallError(d.inspect_failure)
            return body
        finally:
            d.inflight[container_id] -= 1

    async def stats(self, container_id: str) -> Mapping[str, Any] | None:
        d = self._docker
        d.calls.append(("stats", container_id))
        await anyio.lowlevel.checkpoint()
        return copy.deepcopy(d.stats_bodies.get(container_id))

    async def open_events(self) -> FakeEventStream:
        d = self._docker
        d.calls.append(("subscribe",))
        await anyio.lowlevel.checkpoint()
        stream = FakeEventStream(d)
        d.streams.append(stream)
        d.all_streams.append(stream)
        d.run_hooks("after_subscribe")
        return stream

    async def aclose(self) -> None:
        self.closed = True
        self._docker.sessions_closed += 1


class FakeGateway:
    def __init__(self, docker: FakeDocker) -> None:
        self._docker = docker
        self.endpoint = docker.endpoint

    async def open_session(self) -> FakeSession:
        d = self._docker
        d.calls.append(("open_session",))
        d.session_times.append(time.monotonic())
        await anyio.lowlevel.checkpoint()
        d.run_hooks("open_session")
        if d.session_gate is not None:
            await d.session_gate.wait()
        if d.refuse is not None:
            raise DockerCallError(d.refuse)
        d.sessions_opened += 1
        return FakeSession(d)


class FakeDocker:
    """The truth the watcher should mirror, and the knobs to misbehave."""

    def __init__(self, *, socket_path: str | None = None) -> None:
        url = f"unix://{socket_path}" if socket_path else "fake://docker"
        self.endpoint = Endpoint(url, socket_path)
        self.containers: dict[str, dict[str, Any]] = {}
        self.streams: list[FakeEventStream] = []
        self.all_streams: list[FakeEventStream] = []
        self.calls: list[tuple[str, ...]] = []
        self.session_times: list[float] = []
        self.sessions_opened = 0
        self.sessions_closed = 0
        self.inspect_counts: Counter[str] = Counter()
        self.inflight: Counter[str] = Counter()
        self.max_inflight: Counter[str] = Counter()
        #: When set, open_session raises DockerCallError(refuse).
        self.refuse: DockerFailure | None = None
        self.list_failure: DockerFailure | None = None
        self.inspect_failure: DockerFailure | None = None
        self.ping_failure: DockerFailure | None = None
        self.ping_hangs = False
        self.ping_timeout_seconds = 0.05
        self.session_gate: anyio.Event | None = None
        self.inspect_gate: anyio.Event | None = None
        #: Stats bodies served by FakeSession.stats; an id not here answers None (gone).
        self.stats_bodies: dict[str, dict[str, Any]] = {}
        self._hooks: dict[str, list[Callable[[], None]]] = {p: [] for p in HOOK_POINTS}
        self._ids = itertools.count(1)
        self._time = 1_796_000_000.0

    def gateway(self) -> FakeGateway:
        return FakeGateway(self)

    # -- hooks ---------------------------------------------------------------------

    def at(self, point: str, action: Callable[[], None]) -> None:
        """Run ``action`` once, the next time a connect reaches ``point``."""
        self._hooks[point].append(action)

    def run_hooks(self, point: str) -> None:
        actions, self._hooks[point] = self._hooks[point], []
        for action in actions:
            action()

    # -- the truth -----------------------------------------------------------------

    def truth(self) -> dict[str, ContainerRecord]:
        return {cid: record_from_inspect(body) for cid, body in self.containers.items()}

    def _now(self) -> str:
        self._time += 1.5
        return rfc3339(self._time)

    def emit(self, container_id: str, action: str, **attributes: str) -> None:
        """Send the event Docker would send for ``action`` to every open subscription."""
        self._time += 0.001
        event = {
            "status": action,
            "id": container_id,
            "Type": "container",
            "Action": action,
            "Actor": {"ID": container_id, "Attributes": dict(attributes)},
            "scope": "local",
            "time": int(self._time),
            "timeNano": int(self._time * 1e9),
        }
        self.push_raw(event)

    def push_raw(self, raw: object) -> None:
        for stream in self.streams:
            stream.push(raw)

    def end_streams(self) -> None:
        for stream in list(self.streams):
            stream.end()

    def create(self, name: str | None = None, *, labels: Mapping[str, str] | None = None) -> str:
        n = next(self._ids)
        container_id = f"{n:04x}" + "c0ffee" * 10
        name = name or f"c{n}"
        self.containers[container_id] = inspect_body(container_id, name, labels=labels)
        self.emit(container_id, "create", name=name)
        return container_id

    def _state(self, container_id: str) -> dict[str, Any]:
        state: dict[str, Any] = self.containers[container_id]["State"]
        return state

    def _set_status(self, container_id: str, status: str) -> None:
        state = self._state(container_id)
        state["Status"] = status
        state["Running"] = status in ("running", "paused", "restarting")
        state["Paused"] = status == "paused"
        state["Pid"] = 4242 if state["Running"] else 0

    def start(self, container_id: str) -> None:
        self._set_status(container_id, "running")
        self._state(container_id)["StartedAt"] = self._now()
        self.emit(container_id, "start")

    def die(self, container_id: str, exit_code: int = 137) -> None:
        self._set_status(container_id, "exited")
        state = self._state(container_id)
        state["ExitCode"] = exit_code
        state["FinishedAt"] = self._now()
        self.emit(container_id, "die", exitCode=str(exit_code))

    def restart(self, container_id: str) -> None:
        """A restart policy bringing a container back: new StartedAt, count + 1."""
        self.containers[container_id]["RestartCount"] += 1
        self.start(container_id)
        self.emit(container_id, "restart")

    def pause(self, container_id: str) -> None:
        self._set_status(container_id, "paused")
        self.emit(container_id, "pause")

    def unpause(self, container_id: str) -> None:
        self._set_status(container_id, "running")
        self.emit(container_id, "unpause")

    def rename(self, container_id: str, new_name: str) -> None:
        self.containers[container_id]["Name"] = "/" + new_name
        self.emit(container_id, "rename", name=new_name)

    def health(self, container_id: str, status: str) -> None:
        self._state(container_id)["Health"] = {"Status": status, "FailingStreak": 0, "Log": []}
        self.emit(container_id, f"health_status: {status}")

    def destroy(self, container_id: str) -> None:
        del self.containers[container_id]
        self.emit(container_id, "destroy")


class RecordingObserver:
    """A WatchObserver that counts what the watcher reports."""

    def __init__(self) -> None:
        self.events: Counter[str] = Counter()
        self.malformed_count = 0
        self.inspected_count = 0
        self.resyncs = 0

    def event(self, action: str) -> None:
        self.events[action] += 1

    def malformed(self) -> None:
        self.malformed_count += 1

    def inspected(self) -> None:
        self.inspected_count += 1

    def resynced(self, seconds: float) -> None:
        self.resyncs += 1

    def propagated(self, seconds: float) -> None:
        pass


def make_watcher(
    docker: FakeDocker,
    *,
    backoff: BackoffSettings | None = None,
    ping_interval_seconds: float = 3600.0,
    socket_poll_seconds: float = 0.005,
    history_size: int = 4096,
    seed: int = 7,
) -> tuple[Watcher, RecordingObserver]:
    """A Watcher over the fake, with fast timings."""
    import random

    backoff = backoff or BackoffSettings(
        initial_seconds=0.001, factor=2.0, max_seconds=0.01, reset_after_seconds=30.0
    )
    docker_settings = DockerSettings(
        ping_interval_seconds=ping_interval_seconds,
        ping_timeout_seconds=docker.ping_timeout_seconds,
        inspect_concurrency=8,
    )
    machine = ConnectionMachine(Backoff(backoff, random.Random(seed)), now=time.time())
    observer = RecordingObserver()
    watcher = Watcher(
        make_gateway=docker.gateway,
        machine=machine,
        cache=Cache(history_size, initial_revision=1000),
        feed=ChangeFeed(),
        docker_settings=docker_settings,
        watch_settings=WatchSettings(socket_poll_seconds=socket_poll_seconds),
        observer=observer,
    )
    return watcher, observer


async def quiesce(watcher: Watcher, docker: FakeDocker, limit: float = 5.0) -> None:
    """Wait until the watcher is connected, synced, and nothing moves for a while."""
    quiet = 0
    with anyio.fail_after(limit):
        while quiet < 30:
            busy = (
                not watcher.machine.connected
                or not watcher.synced
                or any(s.pending for s in docker.streams)
                or any(docker.inflight.values())
            )
            quiet = 0 if busy else quiet + 1
            await anyio.sleep(0 if quiet else 0.001)


async def wait_until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``limit`` seconds."""
    with anyio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - polling state that has no event to wait on
            await anyio.sleep(0.001)


def apply_deltas(
    old: Mapping[str, ContainerRecord], deltas: list[Delta]
) -> dict[str, ContainerRecord]:
    """What a client holding ``old`` has after applying ``deltas``."""
    state = dict(old)
    for delta in deltas:
        if delta.type == "upsert":
            assert delta.record is not None
            state[delta.container_id] = delta.record
        else:
            state.pop(delta.container_id, None)
    return state


def cache_state(cache: Cache) -> dict[str, ContainerRecord]:
    return {r.id: r for r in cache.records()}
