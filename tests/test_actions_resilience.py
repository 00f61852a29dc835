"""Actions while Docker hangs or dies: 504 or 409 with the reason, never a hang; the daemon stays up."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import SupervisorProcess, UnixHTTPConnection, request
from tests.dockerd import ContainerFactory, PrivateDockerd

pytestmark = pytest.mark.docker

STUBBORN = ["/bin/sh", "-c", 'trap "" TERM; while :; do sleep 1; done']


def call(sup: SupervisorProcess, method: str, path: str) -> tuple[int, Any, float]:
    """(status, JSON body, seconds taken)."""
    started = time.monotonic()
    status, _, body = request(sup.socket, method, path, timeout=30)
    return status, json.loads(body), time.monotonic() - started


def in_background(func: Callable[[], Any]) -> Callable[[], Any]:
    """Start ``func`` in a thread; the returned function waits (bounded) for its result."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(func()), daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(30)
        assert result, "the request did not end within 30 s"
        return result[0]

    return join


def test_docker_hanging_or_dying_mid_action(
    private_dockerd: PrivateDockerd, short_tmp: Path
) -> None:
    """SIGSTOP mid-stop: 504 within the bound, a follow ends, then 409 kind timeout; SIGKILL mid-stop: 409."""
    with private_dockerd.api() as api:
        factory = ContainerFactory(api)
        cid = factory(STUBBORN, name="stubborn")
    env = {
        "SUPERVISOR_ACTIONS_ALLOW": "start,stop,restart,logs",
        "SUPERVISOR_ACTIONS_TIMEOUT_SECONDS": "2",
        "SUPERVISOR_DOCKER_PING_INTERVAL_SECONDS": "0.5",
        "SUPERVISOR_DOCKER_PING_TIMEOUT_SECONDS": "1",
        "SUPERVISOR_DOCKER_CALL_TIMEOUT_SECONDS": "2",
        "SUPERVISOR_BACKOFF_MAX_SECONDS": "1",
        "SUPERVISOR_STATS_INTERVAL_SECONDS": "0",
    }
    dockerd = private_dockerd.pid
    assert dockerd is not None
    with SupervisorProcess(
        private_dockerd.host, short_tmp / "api.sock", metrics_listen="", extra_env=env
    ) as sup:
        sup.wait_synced()
        time.sleep(0.3)  # let the shell install its trap
        follower = UnixHTTPConnection(sup.socket, timeout=15)
        follower.request("GET", f"/v1/containers/{cid}/logs?follow=1")
        following = follower.getresponse()
        assert following.status == 200
        try:
            # Hung: Docker accepts the stop, then stops answering. Bound: 2 s + timeout 3 s.
            pending = in_background(
                lambda: call(sup, "POST", f"/v1/containers/{cid}/stop?timeout=3")
            )
            time.sleep(0.5)
            os.kill(dockerd, signal.SIGSTOP)
            assert sup.get_json("/v1/health")["status"] == "ok"  # the API is not held up
            status, body, seconds = pending()
            assert status == 504, body
            assert body["error"]["code"] == "timeout" and body["error"]["kind"] == "timeout"
            assert 4.0 <= seconds < 8.0, seconds

            sup.wait_for(lambda s: s["state"] != "connected", timeout=10)
            assert following.read() == b""  # the follow ends with the connection, cleanly
            status, body, seconds = call(sup, "POST", f"/v1/containers/{cid}/start")
            assert status == 409, body
            assert body["error"]["code"] == "not_connected"
            assert body["error"]["kind"] == "timeout"
            assert "nothing was done" in body["error"]["message"]
            assert seconds < 1.0  # refused at once, not queued
        finally:
            os.kill(dockerd, signal.SIGCONT)
            follower.close()

        sup.wait_synced(timeout=20)
        # Resumed, Docker finishes the stop it had accepted (SIGKILL after its 3 s): wait for
        # that, so it cannot kill the run started next.
        deadline = time.monotonic() + 15
        while sup.get_json(f"/v1/containers/{cid}")["container"]["state"] == "running":
            assert time.monotonic() < deadline, "the accepted stop never finished"
            time.sleep(0.05)
        status, body, _ = call(sup, "POST", f"/v1/containers/{cid}/start")
        assert status == 200, body
        assert body["container"]["state"] == "running"
        time.sleep(0.3)  # let the shell install its trap

        # Dead: the engine is killed while Docker waits out the stop's timeout.
        pending = in_background(lambda: call(sup, "POST", f"/v1/containers/{cid}/stop?timeout=5"))
        time.sleep(0.5)
        private_dockerd.kill()
        status, body, seconds = pending()
        assert status == 409, body
        assert body["error"]["code"] == "not_connected"
        assert body["error"]["kind"] in ("connection_lost", "connection_refused")
        assert seconds < 3.0, seconds

        sup.wait_for(lambda s: s["state"] != "connected", timeout=10)
        status, body, seconds = call(sup, "POST", f"/v1/containers/{cid}/start")
        assert status == 409, body
        assert body["error"]["kind"] == "connection_refused"
        assert body["error"]["remedy"]
        assert seconds < 1.0
        assert sup.get_json("/v1/health")["status"] == "ok"
        assert sup.stop() == 0
