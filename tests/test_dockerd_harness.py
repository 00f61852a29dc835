"""The test harness itself: the private engine, the test image, the fixtures."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import docker
import pytest
import requests

from tests.conftest import UnprivilegedRuntime
from tests.dockerd import (
    TEST_LABEL,
    ContainerFactory,
    PrivateDockerd,
    docker_py_socket_leak_ignored,
)


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _wait_exit(api: docker.APIClient, container_id: str) -> int:
    status_code: int = api.wait(container_id, timeout=30)["StatusCode"]
    return status_code


def test_shared_engine_answers_ping_and_version(docker_api: docker.APIClient) -> None:
    """The shared engine answers /_ping and reports an API version."""
    assert docker_api.ping() is True
    version = docker_api.version()
    assert version["ApiVersion"]
    assert version["Os"] == "linux"


def test_image_runs_echo(docker_api: docker.APIClient, make_container: ContainerFactory) -> None:
    """A test-image container runs echo and its output is in the logs."""
    cid = make_container(["/bin/echo", "hello from busybox"])
    assert _wait_exit(docker_api, cid) == 0
    assert docker_api.logs(cid) == b"hello from busybox\n"


def test_image_has_busybox_applets(
    docker_api: docker.APIClient, make_container: ContainerFactory
) -> None:
    """The applets tests lean on (sh, yes, head, cat, dd, kill, id) work in the image."""
    script = (
        "yes x | head -n 2 | cat; "
        "dd if=/dev/zero bs=1k count=1 2>/dev/null | wc -c; "
        "sleep 1000 & kill $! && echo killed; "
        "id -u nobody"
    )
    cid = make_container(["/bin/sh", "-c", script])
    assert _wait_exit(docker_api, cid) == 0
    assert docker_api.logs(cid).decode().split() == ["x", "x", "1024", "killed", "65534"]


def test_make_container_defaults(
    docker_api: docker.APIClient, make_container: ContainerFactory
) -> None:
    """A default container sleeps, runs without a network and carries the test label."""
    cid = make_container(name="hls-test-defaults", labels={"role": "probe"})
    info = docker_api.inspect_container(cid)
    assert info["State"]["Running"] is True
    assert info["Name"] == "/hls-test-defaults"
    assert info["HostConfig"]["NetworkMode"] == "none"
    assert info["Config"]["Labels"] == {TEST_LABEL: "1", "role": "probe"}


def test_make_container_cleans_up(docker_api: docker.APIClient, test_image: str) -> None:
    """The container factory force-removes running and created containers."""
    factory = ContainerFactory(docker_api, test_image)
    ids = {factory(), factory(start=False)}
    listed = {c["Id"] for c in docker_api.containers(all=True, filters={"label": TEST_LABEL})}
    assert ids <= listed
    factory.cleanup()
    listed = {c["Id"] for c in docker_api.containers(all=True, filters={"label": TEST_LABEL})}
    assert not ids & listed
    factory.cleanup()  # a second call has nothing left to do


def test_private_engine_survives_kill_and_restart(
    private_dockerd: PrivateDockerd, make_container: ContainerFactory
) -> None:
    """After kill -9 and restart of dockerd a live-restore container still runs."""
    with private_dockerd.api() as api:
        assert api.info()["LiveRestoreEnabled"] is True
        cid = make_container(api=api)
        before = api.inspect_container(cid)["State"]
        old_pid = private_dockerd.pid

        private_dockerd.kill()
        assert private_dockerd.pid is None
        assert private_dockerd.socket_path.is_socket()  # stale, as in real life
        assert private_dockerd.pid_file.exists()

        private_dockerd.restart()
        assert private_dockerd.pid not in (None, old_pid)
        after = api.inspect_container(cid)["State"]
    assert after["Running"] is True
    assert (after["Pid"], after["StartedAt"]) == (before["Pid"], before["StartedAt"])


def test_stale_socket_refuses_connection(private_dockerd: PrivateDockerd) -> None:
    """After kill -9 a client of the stale socket gets ECONNREFUSED in the cause chain."""
    private_dockerd.kill()
    with docker_py_socket_leak_ignored():
        with (
            docker.APIClient(base_url=private_dockerd.host, version="1.41", timeout=5) as api,
            pytest.raises(requests.exceptions.ConnectionError) as excinfo,
        ):
            api.ping()
        # Keep only plain data: the exceptions' tracebacks hold the leaked socket.
        chain = [(type(e), getattr(e, "errno", None)) for e in _cause_chain(excinfo.value)]
        del excinfo
    assert (ConnectionRefusedError, errno.ECONNREFUSED) in chain


def test_closed_engine_leaves_nothing_behind(private_dockerd: PrivateDockerd) -> None:
    """close() after kill -9 ends containers, shims and daemons and removes the dir."""
    engine = private_dockerd
    with engine.api() as api:
        factory = ContainerFactory(api)
        factory()
        factory()
    assert len(engine.container_init_pids()) == 2
    engine.kill()
    engine.close()
    base = str(engine.dir)
    assert not engine.dir.exists()
    assert base not in Path("/proc/self/mounts").read_text()
    leftovers = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes()
        except OSError:
            continue
        if base.encode() in cmdline:
            leftovers.append(cmdline.replace(b"\0", b" ").decode())
    assert leftovers == []


def test_unprivileged_runtime_imports_as_nobody(
    unprivileged_runtime: UnprivilegedRuntime,
) -> None:
    """uid 65534 can import the package and its dependencies from the copied runtime."""
    probe = "import anyio, docker, h11, loguru, prometheus_client, supervisor; print('ok')"
    result = subprocess.run(
        [unprivileged_runtime.python, "-c", probe],
        user=65534,
        group=65534,
        env=unprivileged_runtime.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")
