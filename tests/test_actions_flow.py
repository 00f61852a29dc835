"""The steps of an action against a fake gateway: connection check, deadline, Docker's refusals,
the wait for the mirror, cancellation, and the audit line of each."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from loguru import logger
from prometheus_client import CollectorRegistry

from supervisor.access import Endpoint
from supervisor.actions import ActionError, Actions, OwnContainer
from supervisor.broadcast import ChangeFeed
from supervisor.cache import Cache
from supervisor.gateway import DockerCallError
from supervisor.records import record_from_inspect
from supervisor.settings import ActionsSettings, BackoffSettings
from supervisor.state import Backoff, ConnectionMachine, ErrorKind
from tests.fakes import failure, inspect_body

CID = "c0" * 32
T0 = "2026-12-04T15:00:00.000000001Z"
T1 = "2026-12-04T15:00:05.000000001Z"

Handler = Callable[[str, str], Awaitable[bool]]


@dataclass(frozen=True)
class FakePeer:
    pid: int = 321
    uid: int = 0
    gid: int = 0


@dataclass
class FakeGateway:
    """Sessions whose actions run ``handler(action, container_id)``; counts opens and closes."""

    handler: Handler
    endpoint: Endpoint = field(default_factory=lambda: Endpoint("unix:///f.sock", "/f.sock"))
    opened: int = 0
    closed: int = 0
    calls: list[tuple[str, str]] = field(default_factory=list)

    async def open_session(self) -> FakeSession:
        self.opened += 1
        return FakeSession(self)


class FakeSession:
    def __init__(self, gateway: FakeGateway) -> None:
        self.gateway = gateway
        self.version: dict[str, Any] = {}

    async def _do(self, action: str, container_id: str) -> bool:
        self.gateway.calls.append((action, container_id))
        return await self.gateway.handler(action, container_id)

    async def start(self, container_id: str) -> bool:
        return await self._do("start", container_id)

    async def stop(self, container_id: str, timeout_seconds: int) -> bool:
        return await self._do("stop", container_id)

    async def restart(self, container_id: str, timeout_seconds: int) -> bool:
        return await self._do("restart", container_id)

    async def remove(self, container_id: str, *, force: bool, volumes: bool) -> bool:
        return await self._do("remove", container_id)

    async def aclose(self) -> None:
        self.gateway.closed += 1

    async def ping(self) -> None:
        raise AssertionError("an action must not call ping")

    async def list_ids(self) -> list[str]:
        raise AssertionError("an action must not call list_ids")

    async def inspect(self, container_id: str) -> None:
        raise AssertionError("an action must not call inspect")

    async def stats(self, container_id: str) -> None:
        raise AssertionError("an action must not call stats")

    async def open_events(self) -> Any:
        raise AssertionError("an action must not call open_events")

    async def open_logs(self, container_id: str, **options: Any) -> Any:
        raise AssertionError("an action must not call open_logs")


@dataclass
class World:
    actions: Actions
    cache: Cache
    machine: ConnectionMachine
    feed: ChangeFeed
    gateway: FakeGateway
    registry: CollectorRegistry
    synced: bool = True

    def put(self, status: str, started_at: str) -> None:
        body = inspect_body(CID, "web", status=status, started_at=started_at)
        self.cache.upsert(record_from_inspect(body))
        self.feed.notify()

    def count(self, action: str, result: str) -> float:
        value = self.registry.get_sample_value(
            "homelabarr_supervisor_actions_total", {"action": action, "result": result}
        )
        return value or 0.0


async def succeed(action: str, container_id: str) -> bool:
    return True


def world(handler: Handler = succeed, **settings: Any) -> World:
    machine = ConnectionMachine(Backoff(BackoffSettings()), now=time.time())
    machine.begin_attempt(now=time.time(), cause="start")
    machine.succeeded(now=time.time())
    cache, feed, registry = Cache(64), ChangeFeed(), CollectorRegistry()
    gateway = FakeGateway(handler)
    options = {"allow": ("start", "stop", "restart", "remove"), "timeout_seconds": 0.5, **settings}
    holder: list[World] = []
    actions = Actions(
        settings=ActionsSettings(**options),
        cache=cache,
        machine=machine,
        feed=feed,
        synced=lambda: holder[0].synced,
        make_gateway=lambda: gateway,  # type: ignore[arg-type,return-value]
        registry=registry,
        own=OwnContainer(),
    )
    w = World(actions, cache, machine, feed, gateway, registry)
    holder.append(w)
    w.put("running", T0)
    return w


@contextmanager
def audit_lines() -> Iterator[list[dict[str, Any]]]:
    """The ``extra`` fields and message of every audit line logged meanwhile."""
    lines: list[dict[str, Any]] = []

    def sink(message: Any) -> None:
        record = message.record
        if record["extra"].get("audit") == "action":
            lines.append(
                {**record["extra"], "message": record["message"], "level": record["level"].name}
            )

    handle = logger.add(sink, level="DEBUG")
    try:
        yield lines
    finally:
        logger.remove(handle)


@asynccontextmanager
async def bounded(seconds: float = 10) -> AsyncIterator[None]:
    with anyio.fail_after(seconds):
        yield


async def test_not_connected_is_409_with_the_reason_and_no_call() -> None:
    """Docker away: 409 not_connected, kind from the last error, and no session opened."""
    w = world()
    w.machine.lost(failure(ErrorKind.CONNECTION_REFUSED), now=time.time())
    with pytest.raises(ActionError) as caught:
        await w.actions.run("stop", "web", FakePeer())
    assert (caught.value.status, caught.value.code) == (409, "not_connected")
    assert caught.value.detail["kind"] == "connection_refused"
    assert caught.value.detail["remedy"] == "fix connection_refused"
    assert w.gateway.opened == 0
    assert w.count("stop", "not_connected") == 1


async def test_connected_but_not_synced_is_409_syncing() -> None:
    """Connected while the mirror is being reconciled: 409 with kind syncing."""
    w = world()
    w.synced = False
    with pytest.raises(ActionError) as caught:
        await w.actions.run("start", "web", FakePeer())
    assert caught.value.detail["kind"] == "syncing"


async def test_docker_that_never_answers_is_504_within_the_bound() -> None:
    """A call that hangs: 504 after timeout_seconds (plus the stop timeout), the session closed."""
    w = world(lambda action, cid: anyio.sleep_forever())  # type: ignore[arg-type,return-value]
    started = time.monotonic()
    async with bounded():
        with pytest.raises(ActionError) as caught:
            await w.actions.run("stop", "web", FakePeer(), timeout_seconds=1)
    assert 1.5 <= time.monotonic() - started < 3.0
    assert (caught.value.status, caught.value.code, caught.value.result) == (
        504,
        "timeout",
        "timeout",
    )
    assert w.gateway.closed == w.gateway.opened == 1


@pytest.mark.parametrize(
    ("status", "kind", "want"),
    [
        (404, ErrorKind.API_ERROR, (404, "not_found")),
        (409, ErrorKind.API_ERROR, (409, "conflict")),
        (500, ErrorKind.API_ERROR, (502, "docker_error")),
        (403, ErrorKind.FORBIDDEN, (502, "docker_error")),
        (None, ErrorKind.TIMEOUT, (504, "timeout")),
        (None, ErrorKind.CONNECTION_REFUSED, (409, "not_connected")),
        (None, ErrorKind.API_ERROR, (409, "not_connected")),
    ],
)
async def test_docker_failures_keep_their_meaning(
    status: int | None, kind: ErrorKind, want: tuple[int, str]
) -> None:
    """Docker's 404/409/5xx, a proxy's 403, a timeout, a refused or broken connection."""

    async def refuse(action: str, cid: str) -> bool:
        raise DockerCallError(failure(kind, "nope"), status=status, explanation="Docker says no")

    w = world(refuse)
    with pytest.raises(ActionError) as caught:
        await w.actions.run("remove", "web", FakePeer())
    assert (caught.value.status, caught.value.code) == want
    if status == 409:
        assert "Docker says no" in caught.value.message
        assert caught.value.detail["kind"] == "container_state"
    if status == 403:
        assert "POST=1" in str(caught.value.detail["remedy"])
    if status is None and kind is ErrorKind.API_ERROR:
        assert caught.value.detail["kind"] == "connection_lost"
    assert w.gateway.closed == 1


async def test_answer_waits_for_the_mirror() -> None:
    """A restart answers once the mirror shows the new run, with that record."""

    async def restart(action: str, cid: str) -> bool:
        async def later() -> None:
            await anyio.sleep(0.1)
            w.put("exited", T0)
            await anyio.sleep(0.1)
            w.put("running", T1)

        tg.start_soon(later)
        return True

    w = world(restart, timeout_seconds=5)
    async with bounded(), anyio.create_task_group() as tg:
        outcome = await w.actions.run("restart", "web", FakePeer())
    assert outcome.changed and outcome.settled
    assert outcome.record is not None and outcome.record.started_at == T1


async def test_already_so_answers_at_once_and_an_unseen_change_is_not_settled() -> None:
    """Docker's 304: changed false without waiting; a change the mirror never shows: settled false."""

    async def unchanged(action: str, cid: str) -> bool:
        return False

    w = world(unchanged, timeout_seconds=5)
    started = time.monotonic()
    outcome = await w.actions.run("start", "web", FakePeer())
    assert (outcome.changed, outcome.settled) == (False, True)
    assert time.monotonic() - started < 0.5

    w = world(timeout_seconds=0.3)
    outcome = await w.actions.run("stop", "web", FakePeer())
    assert (outcome.changed, outcome.settled) == (True, False)
    assert outcome.record is not None and outcome.record.state == "running"


async def test_ambiguous_prefix_is_409_with_the_matches() -> None:
    """An id prefix shared by two containers: 409 listing both, nothing done."""
    w = world()
    other = "c0c0" + "f" * 60
    w.cache.upsert(record_from_inspect(inspect_body(other, "db", status="running")))
    with pytest.raises(ActionError) as caught:
        await w.actions.run("stop", "c0c0", FakePeer())
    assert caught.value.status == 409
    assert {m["name"] for m in caught.value.detail["matches"]} == {"web", "db"}  # type: ignore[attr-defined]
    assert w.gateway.opened == 0


async def test_each_attempt_is_one_audit_line() -> None:
    """ok, refused and cancelled attempts each log one line with who, what, on what, and how it ended."""
    gate = anyio.Event()

    async def slow(action: str, cid: str) -> bool:
        await gate.wait()
        return True

    w = world(slow, allow=("stop",), timeout_seconds=5)
    with audit_lines() as lines:
        with pytest.raises(ActionError):
            await w.actions.run("restart", "web", FakePeer(uid=1000, pid=77))
        async with bounded(), anyio.create_task_group() as tg:
            tg.start_soon(w.actions.run, "stop", "web", FakePeer())
            await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
        assert w.gateway.closed == 1
    refused, cancelled = lines
    assert refused["result"] == "refused" and refused["level"] == "WARNING"
    assert (refused["peer_uid"], refused["peer_pid"], refused["container_id"]) == (1000, 77, CID)
    assert refused["params"] == {"timeout": 10}
    assert refused["message"].startswith(f"audit: restart web ({CID[:12]}) by uid 1000 pid 77")
    assert "actions.allow" in refused["reason"]
    assert cancelled["result"] == "cancelled"
    assert w.count("restart", "refused") == 1 and w.count("stop", "cancelled") == 1
