"""The daemon as a whole: `python -m supervisor run` in a child process, and the runtime in-process.

Shutdown (SIGTERM while Docker is missing, while a connect hangs, during a burst),
recovery from a socket closed to a non-root daemon without a restart, the repeated
failure log, and an in-process cancellation mid-burst that must leave no thread.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import docker

from supervisor.daemon import build_runtime, join_threads
from supervisor.settings import (
    BackoffSettings,
    DockerSettings,
    MetricsSettings,
    Settings,
    WatchSettings,
)
from tests.conftest import UnprivilegedRuntime
from tests.daemon_proc import SupervisorProcess, request
from tests.dockerd import ContainerFactory, PrivateDockerd
from tests.fakes import apply_deltas, cache_state, wait_until

FAST_ENV = {
    "SUPERVISOR_BACKOFF_INITIAL_SECONDS": "0.05",
    "SUPERVISOR_BACKOFF_MAX_SECONDS": "0.3",
    "SUPERVISOR_WATCH_SOCKET_POLL_SECONDS": "0.1",
}


def stop_timed(sup: SupervisorProcess) -> tuple[int, float]:
    """SIGTERM; the exit code and how long the daemon took to exit."""
    started = time.monotonic()
    code = sup.stop(timeout=10)
    return code, time.monotonic() - started


def warnings_with_remedy(sup: SupervisorProcess) -> list[dict[str, Any]]:
    return [r for r in sup.log_records() if r["level"] == "WARNING" and "remedy:" in r["message"]]


# -- shutdown ---------------------------------------------------------------------------


def test_sigterm_while_docker_is_missing_exits_0_within_2s(short_tmp: Path) -> None:
    """Backing off from a missing socket, SIGTERM stops the daemon with 0 in under 2 s."""
    missing = short_tmp / "docker.sock"
    with SupervisorProcess(
        f"unix://{missing}", short_tmp / "api.sock", metrics_listen="", extra_env=FAST_ENV
    ) as sup:
        status = sup.wait_for(lambda s: s["attempts"] >= 3 or s["error"] is not None)
        assert status["state"] in ("backing_off", "connecting")
        sup.wait_for(lambda s: s["error"] is not None and s["error"]["kind"] == "socket_missing")
        code, seconds = stop_timed(sup)
        assert code == 0, sup.logs()
        assert seconds < 2, sup.logs()
        assert "threads still running" not in sup.logs()


def test_repeated_failure_is_logged_in_full_once_then_summarised(short_tmp: Path) -> None:
    """Every attempt fails the same way: one full warning with the remedy, then short lines."""
    stale = short_tmp / "docker.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # a crashed daemon's socket: refuses
    with SupervisorProcess(
        f"unix://{stale}",
        short_tmp / "api.sock",
        metrics_listen="",
        extra_env=FAST_ENV,
        extra_args=["--log-level", "DEBUG"],
    ) as sup:
        deadline = time.monotonic() + 10
        while sum(r["message"].startswith("still ") for r in sup.log_records()) < 5:
            assert time.monotonic() < deadline, sup.logs()
            time.sleep(0.05)
        assert sup.stop() == 0
        full = warnings_with_remedy(sup)
        records = sup.log_records()
    assert len(full) == 1, full
    assert "connection_refused" in full[0]["message"]
    assert "Docker is stopped or restarting" in full[0]["message"]
    summaries = [r["message"] for r in records if r["message"].startswith("still ")]
    assert all("still backing_off (connection_refused)" in m for m in summaries)
    assert all("attempts since" in m and "remedy" not in m for m in summaries)


def test_sigterm_while_a_connect_hangs_exits_0_within_2s(short_tmp: Path) -> None:
    """A Docker that accepts but never answers holds a connect; SIGTERM still exits 0 in 2 s."""
    hung = short_tmp / "docker.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(hung))
        server.listen(16)
        with SupervisorProcess(f"unix://{hung}", short_tmp / "api.sock", metrics_listen="") as sup:
            sup.wait_for(lambda s: s["state"] == "connecting" and s["attempts"] == 1)
            time.sleep(0.3)  # the attempt is now blocked in Docker's /version
            code, seconds = stop_timed(sup)
    assert code == 0, sup.logs()
    assert seconds < 2, sup.logs()


@contextlib.contextmanager
def burst(
    api: docker.APIClient, factory: ContainerFactory, stop: threading.Event
) -> Iterator[None]:
    """A thread making events as fast as Docker allows: pause/unpause, create/remove."""
    cids = [factory(name=f"hls-d-burst{i}") for i in range(3)]
    errors: list[BaseException] = []

    def run() -> None:
        n = 0
        try:
            while not stop.is_set():
                cid = cids[n % len(cids)]
                api.pause(cid)
                api.unpause(cid)
                extra = factory(start=False)
                api.remove_container(extra)
                n += 1
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="test burst")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors


def test_sigterm_during_a_burst_exits_0_within_2s(
    docker_host: str,
    docker_api: docker.APIClient,
    make_container: ContainerFactory,
    short_tmp: Path,
) -> None:
    """Events pouring in, inspects in flight: SIGTERM exits 0 within 2 s."""
    stop = threading.Event()
    with (
        SupervisorProcess(docker_host, short_tmp / "api.sock", metrics_listen="") as sup,
        burst(docker_api, make_container, stop),
    ):
        sup.wait_synced()
        before = sup.get_json("/v1/status")["revision"]
        sup.wait_for(lambda s: s["revision"] > before + 20)
        code, seconds = stop_timed(sup)
        stop.set()
    assert code == 0, sup.logs()
    assert seconds < 2, sup.logs()
    assert "threads still running" not in sup.logs()


def test_cancel_mid_burst_in_process_leaves_no_threads_and_a_consistent_cache(
    docker_host: str, docker_api: docker.APIClient, make_container: ContainerFactory
) -> None:
    """The watcher cancelled mid-burst: worker threads end, and the cache replays and matches."""
    settings = Settings(
        docker=DockerSettings(host=docker_host, ping_interval_seconds=0.2),
        backoff=BackoffSettings(initial_seconds=0.05, max_seconds=0.5),
        watch=WatchSettings(socket_poll_seconds=0.05),
        metrics=MetricsSettings(listen=""),
    )
    runtime = build_runtime(settings, environ={})
    before = {t.ident for t in threading.enumerate()}
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(runtime.watcher.serve)
            await wait_until(lambda: runtime.watcher.synced, 15)
            seen["old"] = cache_state(runtime.cache)
            seen["rev"] = runtime.cache.revision
            await wait_until(lambda: runtime.cache.revision >= seen["rev"] + 20, 15)
            tg.cancel_scope.cancel()  # mid-burst: inspects and the event read in flight

    stop = threading.Event()
    with burst(docker_api, make_container, stop):
        anyio.run(scenario, backend="asyncio")
        stop.set()
    leftover = join_threads()  # only non-daemon threads can hold the process at exit
    lingering = [t for t in threading.enumerate() if t.ident not in before and not t.daemon]
    assert lingering == [], leftover
    cache = runtime.cache
    deltas = cache.deltas_since(seen["rev"])
    assert deltas is not None
    assert apply_deltas(seen["old"], deltas) == cache_state(cache)
    assert json.loads(cache.containers_json()) == [r.to_json() for r in cache.records()]
    # Nothing invented: every record is a container Docker has or the burst made.
    known = {row["Id"] for row in docker_api.containers(all=True)}
    assert cache.ids() <= known | {cid for _, cid in make_container.created}


# -- a socket closed to a non-root daemon, and opened again ------------------------------


def run_as_nobody(
    runtime: UnprivilegedRuntime,
    docker_host: str,
    api_socket: Path,
    extra_groups: list[int],
) -> subprocess.Popen[bytes]:
    log = open(api_socket.parent / "daemon.log", "wb")  # noqa: SIM115 - closed below
    try:
        return subprocess.Popen(
            [
                runtime.python, "-m", "supervisor", "run",
                "--docker-host", docker_host,
                "--socket", str(api_socket),
                "--metrics-listen", "",
                "--log-format", "json",
                "--log-level", "DEBUG",
            ],
            env={**runtime.env, **FAST_ENV, "SUPERVISOR_BACKOFF_MAX_SECONDS": "30"},
            user=65534,
            group=65534,
            extra_groups=extra_groups,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd="/",
            start_new_session=True,
        )  # fmt: skip
    finally:
        log.close()


def status_of(api_socket: Path) -> dict[str, Any] | None:
    try:
        code, _, body = request(api_socket, "GET", "/v1/status", timeout=1)
    except OSError:
        return None
    return json.loads(body) if code == 200 else None


def wait_status(
    proc: subprocess.Popen[bytes],
    api_socket: Path,
    predicate: Callable[[dict[str, Any]], bool],
    limit: float,
) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    last: dict[str, Any] | None = None
    while True:
        assert proc.poll() is None, (api_socket.parent / "daemon.log").read_text()
        last = status_of(api_socket) or last
        if last is not None and predicate(last):
            return last
        assert time.monotonic() < deadline, (last, (api_socket.parent / "daemon.log").read_text())
        time.sleep(0.02)


def test_socket_closed_to_nobody_is_denied_then_recovers_without_restart(
    private_dockerd: PrivateDockerd,
    unprivileged_runtime: UnprivilegedRuntime,
    short_tmp: Path,
) -> None:
    """As uid 65534 with the socket's group: mode 0600 → denied/permission_denied; 0660 → connected."""
    engine = private_dockerd
    os.chmod(engine.dir, 0o711)  # let uid 65534 reach the socket
    os.chmod(short_tmp, 0o777)  # and make its API socket here
    sock = engine.socket_path
    gid = os.stat(sock).st_gid
    assert gid == grp.getgrnam("docker").gr_gid and oct(os.stat(sock).st_mode & 0o777) == "0o660"
    api_socket = short_tmp / "api.sock"
    proc = run_as_nobody(unprivileged_runtime, engine.host, api_socket, [gid])
    try:
        first = wait_status(
            proc, api_socket, lambda s: s["state"] == "connected" and s["synced"], 20
        )
        os.chmod(sock, 0o600)
        denied = wait_status(proc, api_socket, lambda s: s["state"] == "denied", 5)
        error = denied["error"]
        assert error["kind"] == "permission_denied"
        assert error["message"] == f"permission denied on {sock}"
        remedy = error["remedy"]
        assert f"{sock} is root:docker (uid 0, gid {gid}) mode 0600" in remedy
        assert f"this process runs as uid 65534 gid 65534 with groups [{gid}]" in remedy
        assert f"chmod 660 {sock}" in remedy
        assert denied["retry_in"] is not None and denied["retry_in"] > 5  # at the cap

        os.chmod(sock, 0o660)
        fixed = time.monotonic()
        back = wait_status(proc, api_socket, lambda s: s["state"] == "connected", 5)
        assert time.monotonic() - fixed < 2
        assert back["error"] is None
        wait_status(proc, api_socket, lambda s: s["synced"], 5)
        assert proc.poll() is None  # the same process all along
        assert back["revision"] >= first["revision"]
    finally:
        os.chmod(sock, 0o660)
        proc.terminate()
        code = proc.wait(10)
    assert code == 0
    log = (api_socket.parent / "daemon.log").read_text()
    assert log.count('"docker denied (permission_denied)') == 1
