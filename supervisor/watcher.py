"""The loop that keeps the mirror equal to Docker, and drives the connection state machine.

Theory of operation: list-then-watch without gaps
--------------------------------------------------
On every (re)connect the watcher

1. opens a client (negotiating the API version) and **subscribes to container
   events first**;
2. **lists** every container id; only now is the state ``connected``;
3. **inspects** every listed id while events keep flowing in, then **reconciles**:
   records of containers that Docker no longer has (and that no event has
   mentioned since the subscription) are removed; the cache is never cleared.

Because the subscription is open before the list is taken, every change after
the list shows up as an event, and every change before it shows up in the list:
nothing falls between the two. Each change found while reconciling (a container
created, removed, restarted — a new ``StartedAt`` — while we were away) becomes
an ordinary delta, so a consumer cannot tell a reconnect from a live stream
except by the connection state. ``since`` on Docker's side is never used: Docker
keeps only 256 events and counts in whole seconds.

Coalescing: each container has at most one inspect in flight. Events that arrive
for it meanwhile mark it dirty; the result of a superseded inspect is dropped and
the container is inspected once more, so a burst costs about two inspects per
container however many events it makes. ``destroy`` removes without an inspect.

Liveness: docker-py's event stream has no read timeout, so while connected a
ping every ``docker.ping_interval_seconds`` (bounded by ``ping_timeout_seconds``)
proves Docker still answers; when it does not, the stream is closed and the
connection counts as lost. A stream that simply ends is a loss too.

While not connected, the socket file is polled (``watch.socket_poll_seconds``);
any change of its existence, inode, owner, group or mode starts an attempt at
once instead of waiting for the backoff, so Docker coming back or an operator
fixing permissions is noticed within a poll interval. While connected, the same
poll notices a changed socket and checks access with a fresh connection, since an
open connection outlives a change of the socket's group or mode.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup, TaskStatus
from loguru import logger

from supervisor.access import Endpoint
from supervisor.broadcast import ChangeFeed
from supervisor.cache import Cache, Delta
from supervisor.gateway import DockerCallError, EventStream, Gateway, Session
from supervisor.records import Effect, MalformedEvent, parse_event, record_from_inspect, rfc3339
from supervisor.settings import DockerSettings, WatchSettings
from supervisor.state import ConnectionMachine, DockerFailure, ErrorKind

__all__ = ["NullObserver", "WatchObserver", "Watcher"]


class WatchObserver(Protocol):
    """What the watcher reports for metrics; the metrics room implements it."""

    def event(self, action: str) -> None: ...
    def malformed(self) -> None: ...
    def inspected(self) -> None: ...
    def resynced(self, seconds: float) -> None: ...
    def propagated(self, seconds: float) -> None: ...


class NullObserver:
    def event(self, action: str) -> None:
        pass

    def malformed(self) -> None:
        pass

    def inspected(self) -> None:
        pass

    def resynced(self, seconds: float) -> None:
        pass

    def propagated(self, seconds: float) -> None:
        pass


def _fingerprint(paths: Iterable[str]) -> tuple[object, ...]:
    """What identifies the socket files right now: gone, or (inode, owner, group, mode, ctime).

    The change time is what tells a replaced socket apart: a dockerd restarted after
    ``kill -9`` unlinks the stale file and binds a new one, which often gets the same
    inode number back, with the same owner, group and mode.
    """
    prints: list[object] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            prints.append(exc.errno)
        else:
            prints.append((st.st_dev, st.st_ino, st.st_uid, st.st_gid, st.st_mode, st.st_ctime_ns))
    return tuple(prints)


class _ConnectionLost(Exception):
    def __init__(self, failure: DockerFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


@dataclass
class _Inspector:
    """Coalesced inspects: at most one in flight per container (see the module docstring)."""

    session: Session
    cache: Cache
    publish: Callable[[Delta | None, float | None], None]
    on_error: Callable[[DockerFailure], None]
    observer: WatchObserver
    limiter: anyio.CapacityLimiter
    task_group: TaskGroup
    inflight: set[str] = field(default_factory=set)
    dirty: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    #: Time of the oldest event not yet reflected, per container (for propagation).
    pending_since: dict[str, float] = field(default_factory=dict)
    #: Ids mentioned by any event since the subscription (kept by reconciliation).
    touched: set[str] = field(default_factory=set)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def request(self, container_id: str, event_time: float | None = None) -> None:
        if event_time is not None:
            self.pending_since.setdefault(container_id, event_time)
        if container_id in self.inflight:
            self.dirty.add(container_id)
            return
        self.inflight.add(container_id)
        self.task_group.start_soon(self._inspect, container_id, name=f"inspect {container_id[:12]}")

    def remove(self, container_id: str, event_time: float | None) -> None:
        if container_id in self.inflight:
            self.removed.add(container_id)  # drop the result of the inspect under way
        self.dirty.discard(container_id)
        self.pending_since.pop(container_id, None)
        self.publish(self.cache.remove(container_id), event_time)

    async def settle(self, ids: set[str]) -> None:
        """Wait until none of ``ids`` has an inspect in flight."""
        while ids & self.inflight:
            await self._changed.wait()

    async def _inspect(self, container_id: str) -> None:
        try:
            while True:
                self.dirty.discard(container_id)
                async with self.limiter:
                    try:
                        body = await self.session.inspect(container_id)
                    except DockerCallError as exc:
                        self.on_error(exc.failure)
                        return
                self.observer.inspected()
                if container_id in self.dirty and container_id not in self.removed:
                    continue  # superseded by a newer event: look again
                break
            if container_id in self.removed:
                return
            since = self.pending_since.pop(container_id, None)
            self._apply(container_id, body, since)
        finally:
            self.inflight.discard(container_id)
            self.removed.discard(container_id)
            self._changed.set()
            self._changed = anyio.Event()

    def _apply(
        self, container_id: str, body: Mapping[str, Any] | None, since: float | None
    ) -> None:
        if body is None:
            self.publish(self.cache.remove(container_id), since)
            return
        try:
            record = record_from_inspect(body)
        except (ValueError, TypeError, AttributeError) as exc:
            self.observer.malformed()
            logger.warning("unusable inspect result for {}: {}", container_id[:12], exc)
            return
        self.publish(self.cache.upsert(record), since)


class Watcher:
    """Connects, mirrors, reconnects; forever, until cancelled."""

    def __init__(
        self,
        *,
        make_gateway: Callable[[], Gateway],
        machine: ConnectionMachine,
        cache: Cache,
        feed: ChangeFeed,
        docker_settings: DockerSettings,
        watch_settings: WatchSettings,
        observer: WatchObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._make_gateway = make_gateway
        self.machine = machine
        self.cache = cache
        self.feed = feed
        self._docker = docker_settings
        self._watch = watch_settings
        self.observer: WatchObserver = observer or NullObserver()
        self._clock = clock
        self.synced = False
        self.endpoint: Endpoint | None = None
        self.docker_version: Mapping[str, Any] | None = None
        self._repeats = _RepeatedFailureLog()
        self._attempt_print: tuple[object, ...] = ()

    # -- status --------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """The ``/v1/status`` body."""
        m = self.machine
        now = self._clock()
        retry_in = m.retry_in(now)
        docker: dict[str, object] | None = None
        if self.docker_version is not None or self.endpoint is not None:
            version = self.docker_version or {}
            docker = {
                "host": self.endpoint.url if self.endpoint else None,
                "version": version.get("Version"),
                "api_version": version.get("ApiVersion"),
            }
        return {
            "state": m.state.value,
            "since": rfc3339(m.since),
            "attempts": m.attempts,
            "retry_in": round(retry_in, 3) if retry_in is not None else None,
            "error": m.last_error.to_json() if m.last_error else None,
            "docker": docker,
            "revision": self.cache.revision,
            "containers": len(self.cache),
            "synced": self.synced,
        }

    # -- the loop ------------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        cause = "start"
        while True:
            delay = await self._attempt(cause)
            cause = await self._wait_for_retry(delay, self._attempt_print)

    async def _attempt(self, cause: str) -> float:
        """One attempt and, if it connects, the whole connected period; returns the delay."""
        gateway = self._make_gateway()
        self.endpoint = gateway.endpoint
        # The socket as this attempt found it: a change from here on is worth a retry.
        # Taken only now that the endpoint (re-resolved on every attempt) is known.
        self._attempt_print = self._socket_print()
        self.machine.begin_attempt(now=self._clock(), cause=cause)
        self._transitioned(cause)
        session: Session | None = None
        stream: EventStream | None = None
        try:
            try:
                session = await gateway.open_session()
                stream = await session.open_events()
                listed = await session.list_ids()
            except DockerCallError as exc:
                delay = self.machine.failed(exc.failure, now=self._clock())
                self._failed(exc.failure)
                return delay
            self.docker_version = session.version
            self.machine.succeeded(now=self._clock())
            self._repeats.reset()
            self._transitioned("connected")
            failure = await self._connected(session, stream, listed)
            if failure.kind is ErrorKind.API_ERROR:
                # A stream that ended, or a call cut off mid-answer (Docker killed while
                # replying reads as a garbled response), says little: a fresh connection
                # tells whether Docker is gone or refusing us, and the remedy follows.
                failure = await self._ask_docker(failure)
            self.synced = False
            delay = self.machine.lost(failure, now=self._clock())
            self._failed(failure)
            return delay
        finally:
            with anyio.move_on_after(2, shield=True):
                if stream is not None:
                    await stream.aclose()
                if session is not None:
                    await session.aclose()

    async def _connected(
        self, session: Session, stream: EventStream, listed: list[str]
    ) -> DockerFailure:
        """Run until the connection is lost; returns why."""
        lost: DockerFailure | None = None
        async with anyio.create_task_group() as tg:

            def lose(failure: DockerFailure) -> None:
                nonlocal lost
                lost = lost or failure
                tg.cancel_scope.cancel()

            inspector = _Inspector(
                session=session,
                cache=self.cache,
                publish=self._publish,
                on_error=lose,
                observer=self.observer,
                limiter=anyio.CapacityLimiter(self._docker.inspect_concurrency),
                task_group=tg,
            )

            async def guard(func: Callable[[], Any]) -> None:
                try:
                    await func()
                except (_ConnectionLost, DockerCallError) as exc:
                    lose(exc.failure)
                except Exception as exc:  # a bug must not end the process: reconnect instead
                    logger.exception("watcher task failed")
                    lose(
                        DockerFailure(
                            ErrorKind.API_ERROR, repr(exc), "report this bug", self._clock()
                        )
                    )

            async def pump() -> None:
                await self._pump(stream, inspector)

            async def ping() -> None:
                await self._ping(session)

            async def resync() -> None:
                await self._resync(inspector, set(listed))
                await anyio.sleep_forever()

            tg.start_soon(guard, pump, name="docker events")
            tg.start_soon(guard, ping, name="docker ping")
            tg.start_soon(guard, resync, name="docker resync")
        if lost is None:  # pragma: no cover - the task group only ends through guard()
            lost = DockerFailure(ErrorKind.API_ERROR, "connection ended", "", self._clock())
        return lost

    async def _pump(self, stream: EventStream, inspector: _Inspector) -> None:
        while True:
            raw = await stream.next()
            if raw is None:
                raise _ConnectionLost(
                    DockerFailure(
                        ErrorKind.API_ERROR,
                        "Docker closed the event stream",
                        "none needed: the supervisor resubscribes by itself",
                        self._clock(),
                    )
                )
            try:
                event = parse_event(raw)
            except MalformedEvent as exc:
                self.observer.malformed()
                logger.warning("malformed Docker event: {}", exc)
                continue
            if event is None:
                continue
            self.observer.event(event.action if event.known else "other")
            inspector.touched.add(event.container_id)
            if event.effect is Effect.REMOVE:
                inspector.remove(event.container_id, event.time)
            elif event.effect is Effect.INSPECT:
                inspector.request(event.container_id, event.time)

    async def _ask_docker(self, failure: DockerFailure) -> DockerFailure:
        """``failure``, unless a fresh connection shows Docker is gone or refuses us."""
        try:
            session = await self._make_gateway().open_session()
        except DockerCallError as exc:
            return exc.failure
        with anyio.CancelScope(shield=True):
            await session.aclose()
        return failure

    async def _ping(self, session: Session) -> None:
        """Prove Docker still answers; re-check access when the socket file changes.

        An open connection survives a change of the socket's group or mode, and
        even a restarted daemon can leave a stream looking alive for a moment, so
        a change of the socket file is checked with a fresh connection at once.
        """
        baseline = self._socket_print()
        next_ping = time.monotonic() + self._docker.ping_interval_seconds
        while True:
            await anyio.sleep(
                min(self._watch.socket_poll_seconds, self._docker.ping_interval_seconds)
            )
            current = self._socket_print()
            if current != baseline:
                baseline = current
                fresh = await self._make_gateway().open_session()  # DockerCallError: lost
                with anyio.CancelScope(shield=True):
                    await fresh.aclose()
            if time.monotonic() < next_ping:
                continue
            next_ping = time.monotonic() + self._docker.ping_interval_seconds
            try:
                await session.ping()
            except TimeoutError:
                raise _ConnectionLost(
                    DockerFailure(
                        ErrorKind.TIMEOUT,
                        f"Docker did not answer a ping within {self._docker.ping_timeout_seconds:g} s",
                        "Docker may be hung or overloaded; check systemctl status docker",
                        self._clock(),
                    )
                ) from None

    async def _resync(self, inspector: _Inspector, listed: set[str]) -> None:
        started = time.monotonic()
        for container_id in listed:
            inspector.request(container_id)
        await inspector.settle(listed)
        for delta in self.cache.remove_absent(listed | inspector.touched):
            self._publish(delta, None)
        self.synced = True
        seconds = time.monotonic() - started
        self.observer.resynced(seconds)
        self.feed.notify()
        logger.info(
            "mirror synced: {} containers, revision {}, in {:.3f} s",
            len(self.cache),
            self.cache.revision,
            seconds,
        )

    def _publish(self, delta: Delta | None, since: float | None) -> None:
        if delta is None:
            return
        if since is not None:
            self.observer.propagated(max(0.0, self._clock() - since))
        self.feed.notify()

    # -- while not connected -------------------------------------------------------

    def _socket_print(self) -> tuple[object, ...]:
        paths = self.endpoint.watch_paths if self.endpoint else ()
        return _fingerprint(paths)

    async def _wait_for_retry(self, delay: float, baseline: tuple[object, ...]) -> str:
        """Sleep until the backoff expires or the socket file changes; returns the cause."""
        paths = self.endpoint.watch_paths if self.endpoint else ()
        deadline = time.monotonic() + delay
        poll = self._watch.socket_poll_seconds
        while True:
            if paths and _fingerprint(paths) != baseline:
                return "socket file changed"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "backoff expired"
            await anyio.sleep(min(poll, remaining) if paths else remaining)

    # -- logging -------------------------------------------------------------------

    def _transitioned(self, cause: str) -> None:
        self.feed.notify()
        t = self.machine.last_transition
        if t is not None and t.target.value == "connected":
            version = self.docker_version or {}
            logger.info(
                "docker {} -> {}: {} (Docker {}, API {})",
                t.source.value,
                t.target.value,
                self.endpoint.url if self.endpoint else "?",
                version.get("Version"),
                version.get("ApiVersion"),
            )
        elif t is not None and t.at == self.machine.since:
            logger.debug("docker {} -> {}: {}", t.source.value, t.target.value, cause)

    def _failed(self, failure: DockerFailure) -> None:
        self.feed.notify()
        m = self.machine
        self._repeats.log(
            failure,
            state=m.state.value,
            retry_in=m.retry_in(self._clock()) or 0.0,
            attempts=m.failures,
        )


class _RepeatedFailureLog:
    """Log a failure in full once, then one short line per further attempt."""

    def __init__(self) -> None:
        self._key: tuple[str, str] | None = None
        self._first_at = 0.0

    def reset(self) -> None:
        self._key = None

    def log(self, failure: DockerFailure, *, state: str, retry_in: float, attempts: int) -> None:
        key = (failure.kind.value, failure.message)
        if key != self._key:
            self._key = key
            self._first_at = failure.at
            logger.warning(
                "docker {} ({}): {}; remedy: {}; next attempt in {:.1f} s",
                state,
                failure.kind.value,
                failure.message,
                failure.remedy,
                retry_in,
            )
            return
        since = datetime.fromtimestamp(self._first_at, UTC).strftime("%H:%M:%S")
        logger.info(
            "still {} ({}), {} attempts since {} UTC; next in {:.1f} s",
            state,
            failure.kind.value,
            attempts,
            since,
            retry_in,
        )
