"""Metrics against a real dockerd, checked by promtool and by a real Prometheus server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import anyio
import docker
import pytest

from supervisor.api import serve_metrics
from supervisor.daemon import Runtime, build_runtime
from supervisor.metrics import PREFIX
from supervisor.settings import (
    BackoffSettings,
    DockerSettings,
    MetricsSettings,
    Settings,
    WatchSettings,
)
from tests.daemon_proc import SupervisorProcess
from tests.dockerd import RUNDIR_ENV, TEST_IMAGE, ContainerFactory, PrivateDockerd
from tests.test_metrics import KNOWN_LINT, parse, promtool_problems, series
from tests.test_metrics_rules import ALERT_NAMES

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "config" / "prometheus" / "alerts.yml"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def live_settings(host: str, *, metrics_listen: str = "") -> Settings:
    return Settings(
        docker=DockerSettings(host=host, ping_interval_seconds=1.0, ping_timeout_seconds=1.0),
        backoff=BackoffSettings(initial_seconds=0.1, max_seconds=0.5, reset_after_seconds=1.0),
        watch=WatchSettings(socket_poll_seconds=0.1),
        metrics=MetricsSettings(listen=metrics_listen),
    )


async def eventually(check: Callable[[], Awaitable[T]], what: str, seconds: float = 20.0) -> T:
    """The first truthy result of ``check``, or a test failure after ``seconds``."""
    result: T | None = None
    with anyio.move_on_after(seconds):
        while True:
            result = await check()
            if result:
                return result
            await anyio.sleep(0.1)
    pytest.fail(f"{what}: not within {seconds:g} s (last: {result!r})")


@asynccontextmanager
async def watching(runtime: Runtime, *, metrics: bool = False) -> AsyncIterator[None]:
    """The watcher (and the TCP metrics listener) running in a task group, synced once."""
    async with anyio.create_task_group() as tg:
        if metrics:
            await tg.start(serve_metrics, runtime)
        await tg.start(runtime.watcher.serve)

        async def synced() -> bool:
            return runtime.machine.connected and runtime.watcher.synced

        await eventually(synced, "the watcher connects and syncs", 15)
        yield
        tg.cancel_scope.cancel()


def in_cache(
    runtime: Runtime, name: str, state: str | None = None
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        found = [r for r in runtime.cache.records() if r.name == name]
        return bool(found) and (state is None or found[0].state == state)

    return check


# -- in-process scrapes of a live mirror ---------------------------------------------------


@pytest.mark.anyio
async def test_promtool_accepts_a_live_scrape(
    docker_host: str, make_container: ContainerFactory
) -> None:
    """GET /metrics from the TCP listener of a runtime mirroring the test dockerd passes promtool."""
    labels = {"com.docker.compose.project": "mt", "com.docker.compose.service": "web"}
    health = {"test": ["CMD", "/bin/true"], "interval": 1_000_000_000}
    await anyio.to_thread.run_sync(
        lambda: make_container(name="mt-live-web", labels=labels, healthcheck=health)
    )
    await anyio.to_thread.run_sync(lambda: make_container(name="mt-live-created", start=False))
    listen = f"127.0.0.1:{free_port()}"
    runtime = build_runtime(live_settings(docker_host, metrics_listen=listen))
    async with watching(runtime, metrics=True):
        await eventually(in_cache(runtime, "mt-live-web", "running"), "mt-live-web mirrored")
        await eventually(in_cache(runtime, "mt-live-created", "created"), "mt-live-created")

        def get() -> tuple[bytes, str]:
            with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as reply:
                return reply.read(), reply.headers["Content-Type"]

        body, content_type = await anyio.to_thread.run_sync(get)
    assert content_type.startswith("text/plain; version=0.0.4")
    problems = await anyio.to_thread.run_sync(promtool_problems, body)
    assert problems == [KNOWN_LINT]
    samples = parse(body)
    web = {"name": "mt-live-web", "compose_project": "mt", "compose_service": "web"}
    assert samples[(PREFIX + "container_running", frozenset(web.items()))] == 1
    assert samples[(PREFIX + "docker_up", frozenset())] == 1
    assert samples[(PREFIX + "resyncs_total", frozenset())] == 1
    assert samples[(PREFIX + "docker_endpoint_info", frozenset({("host", docker_host)}))] == 1


@pytest.mark.anyio
async def test_a_removed_container_is_gone_from_the_next_scrape(
    docker_host: str, docker_api: docker.APIClient, make_container: ContainerFactory
) -> None:
    """Once Docker destroys a container, the first scrape after the mirror follows has no series of it."""
    cid = await anyio.to_thread.run_sync(lambda: make_container(name="mt-goes"))
    runtime = build_runtime(live_settings(docker_host))
    async with watching(runtime):
        await eventually(in_cache(runtime, "mt-goes", "running"), "mt-goes mirrored")
        assert b'name="mt-goes"' in runtime.metrics.render()[0]
        await anyio.to_thread.run_sync(lambda: docker_api.remove_container(cid, force=True))

        async def gone() -> bool:
            return not await in_cache(runtime, "mt-goes")()

        await eventually(gone, "the destroy reaches the mirror", 10)
        body = runtime.metrics.render()[0]
        events = series(parse(body), "docker_events_total")
    assert b"mt-goes" not in body
    assert events[frozenset({("action", "destroy")})] >= 1


# -- a real Prometheus server ---------------------------------------------------------------


def _record_for_reaper(kind: str, value: object) -> None:
    """Tell tests/run.sh about a process or folder to clean up if this run crashes."""
    rundir = os.environ.get(RUNDIR_ENV)
    if rundir:
        with open(os.path.join(rundir, kind), "a") as f:
            f.write(f"{value}\n")


class PrometheusServer:
    """A Prometheus on loopback, scraping one target every second."""

    def __init__(self, base: Path, target: str) -> None:
        if shutil.which("prometheus") is None:
            pytest.fail("prometheus is missing: run tests/run.sh (it installs Debian's prometheus)")
        self.dir = base / "prometheus"
        self.dir.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.dir / "prometheus.log"
        config = self.dir / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [
                        {
                            "job_name": "homelabarr-supervisor",
                            "scrape_timeout": "1s",
                            "static_configs": [{"targets": [target]}],
                        }
                    ],
                }
            )
        )
        _record_for_reaper("dirs", self.dir)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _record_for_reaper("pids", self.proc.pid)

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.load(reply)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited: {self.log.read_text()[-2000:]}")
            with suppress(OSError), urllib.request.urlopen(f"{self.url}/-/ready", timeout=1):
                return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"prometheus not ready in {timeout:g} s: {self.log.read_text()[-2000:]}"
                )
            time.sleep(0.05)

    def query(self, promql: str) -> list[dict[str, Any]]:
        reply = self.get("/api/v1/query", query=promql)
        assert reply["status"] == "success", reply
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(5)


@contextmanager
def prometheus_server(base: Path, target: str) -> Iterator[PrometheusServer]:
    server = PrometheusServer(base, target)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def until(check: Callable[[], T], what: str, seconds: float = 20.0) -> T:
    """The first truthy result of ``check``, polled; a test failure after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {seconds:g} s (last: {result!r})")
        time.sleep(0.1)


@pytest.mark.slow
def test_prometheus_follows_docker_and_a_container(
    private_dockerd: PrivateDockerd, short_tmp: Path
) -> None:
    """A real Prometheus scraping a supervisor daemon sees connected, a container stop/start/remove, dockerd down and back."""
    api = private_dockerd.api()
    containers = ContainerFactory(api, TEST_IMAGE)
    fast_retries = {
        "SUPERVISOR_BACKOFF_INITIAL_SECONDS": "0.1",
        "SUPERVISOR_BACKOFF_MAX_SECONDS": "1",
    }
    try:
        cid = containers(name="mt-prom")
        with (
            SupervisorProcess(
                private_dockerd.host, short_tmp / "api.sock", extra_env=fast_retries
            ) as daemon,
            prometheus_server(short_tmp, daemon.metrics_listen) as prom,
        ):

            def values(promql: str) -> list[str]:
                return [r["value"][1] for r in prom.query(promql)]

            def state() -> list[str]:
                return [
                    r["metric"]["state"]
                    for r in prom.query(f"{PREFIX}docker_connection_state == 1")
                ]

            def running() -> list[str]:
                return values(f'{PREFIX}container_running{{name="mt-prom"}}')

            until(lambda: state() == ["connected"], "Prometheus sees connected")
            assert values(f"{PREFIX}docker_up") == ["1"]
            assert values('up{job="homelabarr-supervisor"}') == ["1"]
            rules = prom.get("/api/v1/rules")["data"]["groups"]
            assert {r["name"] for g in rules for r in g["rules"]} == ALERT_NAMES

            until(lambda: running() == ["1"], "mt-prom running")
            api.stop(cid, timeout=0)
            until(lambda: running() == ["0"], "mt-prom stopped")
            api.start(cid)
            until(lambda: running() == ["1"], "mt-prom started again")
            api.remove_container(cid, force=True)
            until(lambda: running() == [], "mt-prom's series gone after its removal")

            private_dockerd.stop()
            until(lambda: state() == ["backing_off"], "Prometheus sees backing_off")
            assert values(f"{PREFIX}docker_up") == ["0"]
            private_dockerd.start()
            until(lambda: state() == ["connected"], "Prometheus sees connected again")
            assert values(f"{PREFIX}docker_up") == ["1"]
    finally:
        containers.cleanup()
        api.close()
