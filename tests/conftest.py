"""Shared fixtures: a real Docker engine, a test image, containers, short paths.

Tests that need Docker fail loudly when it is missing: nothing here skips.
Set SUPERVISOR_TEST_DOCKER_HOST (e.g. unix:///var/run/docker.sock) to use an engine
that is already running instead of a private one.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from tests.dockerd import (
    TEST_IMAGE,
    ContainerFactory,
    DockerdError,
    DockerEngine,
    ExternalDockerd,
    PrivateDockerd,
    build_test_image,
    docker_py_socket_leak_ignored,
)

REPO = Path(__file__).resolve().parent.parent
DOCKER_HOST_ENV = "SUPERVISOR_TEST_DOCKER_HOST"
SYSTEM_PYTHON = "/usr/bin/python3"


def pytest_configure(config: pytest.Config) -> None:
    # Same as `anyio_mode = "auto"` in pyproject: every `async def` test runs on anyio.
    if getattr(config.option, "anyio_mode", None) is None:
        config.option.anyio_mode = "auto"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def _engine_dir() -> str:
    # Short on purpose: AF_UNIX paths are limited to about 107 bytes.
    return tempfile.mkdtemp(prefix="hd", dir="/tmp")


def start_private_dockerd(*, live_restore: bool = True) -> PrivateDockerd:
    """A started private engine with the test image, or a test failure that says why."""
    engine = PrivateDockerd(_engine_dir(), live_restore=live_restore)
    try:
        engine.start()
        with engine.api() as api:
            build_test_image(api)
    except (DockerdError, OSError, docker.errors.DockerException) as exc:
        engine.close()
        pytest.fail(f"cannot start a private Docker engine: {exc}", pytrace=False)
    except BaseException:
        engine.close()
        raise
    return engine


@pytest.fixture(scope="session")
def docker_daemon() -> Iterator[DockerEngine]:
    """The engine shared by the session: $SUPERVISOR_TEST_DOCKER_HOST or a private one."""
    host = os.environ.get(DOCKER_HOST_ENV)
    if host:
        external = ExternalDockerd(host)
        problem = None
        with docker_py_socket_leak_ignored():
            try:
                with external.api() as api:
                    api.ping()
            except Exception as exc:
                problem = str(exc)  # not the exception: it holds the leaked socket
        if problem is not None:
            pytest.fail(f"{DOCKER_HOST_ENV}={host} does not answer: {problem}", pytrace=False)
        yield external
        return
    engine = start_private_dockerd()
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def docker_host(docker_daemon: DockerEngine) -> str:
    """URL of the shared engine, e.g. unix:///tmp/hdXXXX/docker.sock."""
    return docker_daemon.host


@pytest.fixture(scope="session")
def docker_api(docker_daemon: DockerEngine) -> Iterator[docker.APIClient]:
    """A low-level docker-py client of the shared engine."""
    with docker_daemon.api() as api:
        yield api


@pytest.fixture(scope="session")
def test_image(docker_api: docker.APIClient) -> str:
    """Tag of the busybox test image, present on the shared engine."""
    return build_test_image(docker_api, TEST_IMAGE)


@pytest.fixture
def private_dockerd() -> Iterator[PrivateDockerd]:
    """A fresh engine of the test's own (live-restore on), with the test image."""
    engine = start_private_dockerd()
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def make_container(docker_api: docker.APIClient, test_image: str) -> Iterator[ContainerFactory]:
    """Factory of `hls.test=1` containers (network none), force-removed at teardown."""
    factory = ContainerFactory(docker_api, test_image)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path, for AF_UNIX sockets."""
    path = Path(tempfile.mkdtemp(prefix="ht", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class UnprivilegedRuntime:
    """How to run `python -m supervisor` as another uid (e.g. 65534)."""

    python: str
    env: dict[str, str]
    root: Path


def _open_up(root: Path) -> None:
    """Make everything under `root` readable by all, and folders traversable."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, stat.S_IMODE(mode) | 0o444 | (0o111 if mode & 0o100 else 0))


@pytest.fixture(scope="session")
def unprivileged_runtime() -> Iterator[UnprivilegedRuntime]:
    """The venv's packages and `supervisor/` copied where any uid can read them."""
    if sys.base_prefix != "/usr":
        pytest.fail(
            f"the test venv must be made from {SYSTEM_PYTHON} so that another uid can run"
            f" it; this one comes from {sys.base_prefix}. Remove .venv and run tests/run.sh.",
            pytrace=False,
        )
    system_version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.version)"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    if system_version != sys.version:
        pytest.fail(
            f"{SYSTEM_PYTHON} is {system_version}, the venv runs {sys.version}:"
            " remove .venv and run tests/run.sh.",
            pytrace=False,
        )
    root = Path(tempfile.mkdtemp(prefix="hu", dir="/tmp"))
    try:
        site = root / "site-packages"
        # Skip what a running daemon never imports: the tools, and the editable
        # install's hook that points back into the (possibly unreadable) checkout.
        shutil.copytree(
            sysconfig.get_path("purelib"),
            site,
            symlinks=True,
            ignore=shutil.ignore_patterns(
                "__editable__*", "pip", "pip-*", "setuptools",
                "setuptools-*", "mypy", "mypyc", "mypy-*", "*__mypyc*", "ruff", "ruff-*",
            ),
        )  # fmt: skip
        src = root / "src"
        shutil.copytree(
            REPO / "supervisor",
            src / "supervisor",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        _open_up(root)
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": "/nonexistent",
            "PYTHONPATH": f"{src}:{site}",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1",
        }
        yield UnprivilegedRuntime(python=SYSTEM_PYTHON, env=env, root=root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
