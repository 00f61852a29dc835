"""Wires the rooms together in one task group, and shuts them down on a signal.

Start order matters: the API socket is bound (and the metrics listener opened)
before the watcher starts, so a client that sees the socket can use it at once;
what it reads while Docker is still being reached is an empty, ``stale`` mirror
in state ``connecting``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus
from loguru import logger

from supervisor.access import resolve_endpoint
from supervisor.actions import Actions, detect_own_container
from supervisor.broadcast import ChangeFeed
from supervisor.cache import Cache
from supervisor.gateway import DockerGateway
from supervisor.metrics import Metrics
from supervisor.sampler import Sampler
from supervisor.settings import Settings
from supervisor.state import Backoff, ConnectionMachine
from supervisor.stats import StatsCollector, StatsStore
from supervisor.watcher import Watcher

__all__ = [
    "SHUTDOWN_GRACE_SECONDS",
    "Runtime",
    "StartupError",
    "build_runtime",
    "join_threads",
    "run_daemon",
    "serve",
]

#: How long the services get to finish after SIGTERM/SIGINT before they are cancelled.
SHUTDOWN_GRACE_SECONDS = 1.5


class StartupError(Exception):
    """The daemon cannot start (for example, another instance owns the API socket): exit 2."""


@dataclass
class Runtime:
    """Everything the services share. Built once; read by the API and metrics."""

    settings: Settings
    cache: Cache
    machine: ConnectionMachine
    feed: ChangeFeed
    watcher: Watcher
    metrics: Metrics
    started_at: float
    stats: StatsStore
    sampler: Sampler
    actions: Actions


def build_runtime(settings: Settings, *, environ: Mapping[str, str] | None = None) -> Runtime:
    env = os.environ if environ is None else environ
    now = time.time()
    cache = Cache(settings.watch.history_size, initial_revision=int(now * 1000))
    machine = ConnectionMachine(Backoff(settings.backoff), now=now)
    feed = ChangeFeed()
    metrics = Metrics()

    def make_gateway() -> DockerGateway:
        # Re-resolved on every attempt: with auto-detection, a socket that appears
        # later (or elsewhere) is found without a restart.
        return DockerGateway(settings.docker, resolve_endpoint(settings.docker, env))

    watcher = Watcher(
        make_gateway=make_gateway,
        machine=machine,
        cache=cache,
        feed=feed,
        docker_settings=settings.docker,
        watch_settings=settings.watch,
        observer=metrics,
    )
    stats = StatsStore(cache)
    sampler = Sampler(
        store=stats,
        cache=cache,
        machine=machine,
        make_gateway=make_gateway,
        settings=settings.stats,
        synced=lambda: watcher.synced,
        feed=feed,
        registry=metrics.registry,
    )
    actions = Actions(
        settings=settings.actions,
        cache=cache,
        machine=machine,
        feed=feed,
        synced=lambda: watcher.synced,
        make_gateway=make_gateway,
        registry=metrics.registry,
        own=detect_own_container(env),
    )
    runtime = Runtime(
        settings, cache, machine, feed, watcher, metrics, now, stats, sampler, actions
    )
    metrics.bind(runtime)
    metrics.registry.register(StatsCollector(stats, cache, lambda: metrics.label_keys))
    return runtime


async def serve(
    runtime: Runtime, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Run every service until cancelled; ready once the API socket is bound."""
    from supervisor.api import serve_api, serve_metrics

    async with anyio.create_task_group() as tg:
        await tg.start(serve_api, runtime)
        if runtime.settings.metrics.listen:
            await tg.start(serve_metrics, runtime)
        await tg.start(runtime.watcher.serve)
        await tg.start(runtime.sampler.serve)
        task_status.started()


async def run_daemon(
    settings: Settings, *, on_ready: Callable[[Runtime], None] | None = None
) -> None:
    """The ``run`` command: serve until SIGTERM or SIGINT, then stop within the grace period."""
    runtime = build_runtime(settings)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(serve, runtime)
            logger.info(
                "homelabarr-supervisor ready: api {}, metrics {}",
                settings.api.socket,
                settings.metrics.listen or "off",
            )
            logger.info("{}", runtime.actions.describe())
            if on_ready is not None:
                on_ready(runtime)
            async for signum in signals:
                logger.info("{} received: shutting down", signal.Signals(signum).name)
                break
            tg.cancel_scope.cancel()


def join_threads(seconds: float = SHUTDOWN_GRACE_SECONDS) -> list[str]:
    """After the event loop has closed: wait for the threads that would hold the process.

    Returns the names of non-daemon threads still alive after ``seconds``. Docker
    calls run in daemon threads (see ``supervisor.gateway``), which cannot hold the
    process at exit, so they are neither waited for nor reported; anyio's idle
    worker threads stop when the loop closes.
    """
    deadline = time.monotonic() + seconds

    def holding() -> list[threading.Thread]:
        me = threading.current_thread()
        return [t for t in threading.enumerate() if t is not me and not t.daemon]

    for thread in holding():
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in holding()]
