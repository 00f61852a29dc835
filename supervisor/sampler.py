"""The loop that samples live stats of the running containers into the stats store.

Theory of operation
-------------------
Every ``stats.interval_seconds`` (0 disables the sampler), while the connection
state machine says ``connected`` and the mirror is synced (so that the first round
after a connect sees every container, not the part the resync has inspected so
far), one **round** samples every container the mirror shows as running:

1. the round takes the running records of the cache (id and ``started_at``: the
   run a sample belongs to) and opens a **short-lived session** through the
   gateway factory, so the watcher's connection and its event stream are never
   shared or held up;
2. ``stats.concurrency`` workers take containers one by one and ask for one-shot
   stats (no stream, no thread per container). Docker answers a one-shot call at
   its stats collector's next tick, about once a second, whatever the load, so a
   round over N containers takes about ``N / concurrency`` seconds and costs the
   supervisor almost nothing but waiting;
3. each answer goes to :meth:`~supervisor.stats.StatsStore.update` unless the
   container is gone, stopped or restarted meanwhile (the record is checked before
   and after the call); 404/409 (Docker: no such container, or not running) and an
   empty body drop its stats;
4. the round ends by pruning the store and recording its duration in the
   ``homelabarr_supervisor_stats_sample_duration_seconds`` histogram.

Failures: an API error for one container (it stopped in between, a 500) skips
that container and is counted, never failing the others. A failure that means
Docker is away (refused, socket missing, timeout, access denied) ends the round;
sampling then waits until the state machine is ``connected`` again. The watcher
owns reconnection and its reporting: the sampler only logs at debug level.

Between rounds the sampler wakes on every change of the mirror (the change feed)
and prunes the store, so the stats of a container that stopped or was removed are
gone at once, not a round later; the store also checks the mirror on every read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import anyio
from anyio.abc import TaskStatus
from loguru import logger
from prometheus_client import CollectorRegistry, Histogram

from supervisor.broadcast import ChangeFeed
from supervisor.cache import Cache
from supervisor.gateway import DockerCallError, Gateway, Session
from supervisor.settings import StatsSettings
from supervisor.state import ConnectionMachine, DockerFailure, ErrorKind
from supervisor.stats import StatsStore

__all__ = ["SAMPLE_BUCKETS", "Sampler"]

#: Round durations: about a second per ``concurrency`` containers (Docker's stats tick).
SAMPLE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

#: How often the connection state is looked at while not connected, at most.
_IDLE_POLL_SECONDS = 0.5


class _RoundAborted(Exception):
    def __init__(self, failure: DockerFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class Sampler:
    """Samples the running containers' stats into ``store``, forever, until cancelled."""

    def __init__(
        self,
        *,
        store: StatsStore,
        cache: Cache,
        machine: ConnectionMachine,
        make_gateway: Callable[[], Gateway],
        settings: StatsSettings,
        synced: Callable[[], bool] = lambda: True,
        feed: ChangeFeed | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """``synced`` tells whether the mirror is reconciled (the watcher's ``synced``);
        ``feed`` wakes the sampler on mirror changes; ``registry`` receives the histogram."""
        self.store = store
        self._cache = cache
        self._machine = machine
        self._make_gateway = make_gateway
        self._settings = settings
        self._synced = synced
        self._feed = feed
        #: Time per complete round; registered on ``registry`` when one is given.
        self.duration = Histogram(
            "homelabarr_supervisor_stats_sample_duration_seconds",
            "Time to sample the stats of every running container once (one round).",
            buckets=SAMPLE_BUCKETS,
            registry=registry,
        )
        #: Complete rounds, samples stored, and per-container failures (skipped).
        self.rounds = 0
        self.samples = 0
        self.failures = 0
        #: Rounds cut short because Docker was away.
        self.aborted = 0
        self.last_round_seconds: float | None = None

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Sample until cancelled; returns at once when ``stats.interval_seconds`` is 0."""
        task_status.started()
        interval = self._settings.interval_seconds
        if interval == 0:
            logger.info("live stats disabled (stats.interval_seconds = 0)")
            return
        while True:
            while not (self._machine.connected and self._synced()):
                await self._wait(_IDLE_POLL_SECONDS)
            started = time.monotonic()
            await self.sample_round()
            deadline = started + interval
            while (remaining := deadline - time.monotonic()) > 0:
                await self._wait(remaining)
                self.store.prune()

    async def _wait(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when the mirror or the connection changes."""
        if self._feed is not None:
            await self._feed.wait(seconds)
        else:
            await anyio.sleep(seconds)

    async def sample_round(self) -> None:
        """Sample every running container once (see the module docstring)."""
        targets = [(r.id, r.started_at) for r in self._cache.records() if r.running]
        self.store.retain(cid for cid, _ in targets)
        if not targets:
            return
        started = time.perf_counter()
        try:
            session = await self._make_gateway().open_session()
        except DockerCallError as exc:
            self._aborted(exc.failure)
            return
        try:
            await self._sample_all(session, targets)
        except _RoundAborted as exc:
            self._aborted(exc.failure)
            return
        finally:
            with anyio.move_on_after(2, shield=True):
                await session.aclose()
        self.store.prune()
        seconds = time.perf_counter() - started
        self.duration.observe(seconds)
        self.rounds += 1
        self.last_round_seconds = seconds

    def _aborted(self, failure: DockerFailure) -> None:
        self.aborted += 1
        logger.debug("stats round stopped: {} ({})", failure.message, failure.kind.value)

    async def _sample_all(self, session: Session, targets: list[tuple[str, str | None]]) -> None:
        pending: Iterator[tuple[str, str | None]] = iter(targets)
        aborted: DockerFailure | None = None

        async def worker() -> None:
            nonlocal aborted
            # One shared iterator: each container is taken by exactly one worker.
            for container_id, started_at in pending:
                if not self._machine.connected:
                    aborted = aborted or DockerFailure(
                        ErrorKind.API_ERROR, "Docker connection lost", "", time.time()
                    )
                    tg.cancel_scope.cancel()
                    return
                try:
                    await self._sample_one(session, container_id, started_at)
                except _RoundAborted as exc:
                    aborted = aborted or exc.failure
                    tg.cancel_scope.cancel()
                    return

        async with anyio.create_task_group() as tg:
            for _ in range(min(self._settings.concurrency, len(targets))):
                tg.start_soon(worker)
        if aborted is not None:
            raise _RoundAborted(aborted)

    def _still_running(self, container_id: str, started_at: str | None) -> bool:
        record = self._cache.get(container_id)
        return record is not None and record.running and record.started_at == started_at

    async def _sample_one(
        self, session: Session, container_id: str, started_at: str | None
    ) -> None:
        if not self._still_running(container_id, started_at):
            self.store.drop(container_id)
            return
        try:
            body = await session.stats(container_id)
        except DockerCallError as exc:
            if exc.failure.kind is not ErrorKind.API_ERROR:
                raise _RoundAborted(exc.failure) from exc
            self.failures += 1
            logger.debug("stats of {} skipped: {}", container_id[:12], exc.failure.message)
            return
        # The call takes up to a second: the container may have stopped or restarted.
        if body is None or not self._still_running(container_id, started_at):
            self.store.drop(container_id)
            return
        try:
            sample = self.store.update(container_id, body, started_at=started_at)
        except (ValueError, TypeError) as exc:
            self.failures += 1
            self.store.drop(container_id)
            logger.warning("unusable stats for {}: {}", container_id[:12], exc)
            return
        if sample is not None:
            self.samples += 1
