"""The image and compose.yaml, built and run for real against the test engine.

No registry is reachable: the base image is made with debootstrap (cached on the
machine between runs when possible, never required), the wheels are built on the
host, and the image is built offline (--network none) from both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

REPO = Path(__file__).resolve().parent.parent
BASE_TAG = "hls-base/debian-python:bookworm"
IMAGE_TAG = "homelabarr-supervisor:e2e"
CACHE_DIR = Path(os.environ.get("SUPERVISOR_TEST_CACHE", "/var/cache/homelabarr-supervisor-test"))
DEBOOTSTRAP = ["--variant=minbase", "--include=python3,python3-venv", "bookworm"]

pytestmark = pytest.mark.slow


def _run(
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    cwd: Path | None = None,
) -> str:
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout


def _docker_env(host: str) -> dict[str, str]:
    return {**os.environ, "DOCKER_HOST": host, "DOCKER_BUILDKIT": "0"}


def _ensure_base_image(host: str, api: docker.APIClient) -> None:
    """A Debian 12 image with python3, from the engine, the machine's cache, or debootstrap."""
    try:
        api.inspect_image(BASE_TAG)
        return
    except docker.errors.ImageNotFound:
        pass
    key = hashlib.sha256(" ".join(DEBOOTSTRAP).encode()).hexdigest()[:12]
    cached = CACHE_DIR / f"base-{key}.tar"
    if not cached.exists():
        root = Path(tempfile.mkdtemp(prefix="hls-base-", dir="/var/tmp"))
        try:
            _run(["debootstrap", *DEBOOTSTRAP, str(root / "fs")], timeout=900)
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(".partial")
            _run(["tar", "-C", str(root / "fs"), "-cf", str(partial), "."], timeout=300)
            partial.replace(cached)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    _run(
        ["sh", "-c", f'docker import - {BASE_TAG} < "{cached}"'], env=_docker_env(host), timeout=300
    )


@dataclass(frozen=True)
class BuiltImage:
    host: str
    tag: str
    size_bytes: int


@pytest.fixture(scope="module")
def supervisor_image(docker_host: str, docker_api: docker.APIClient) -> Iterator[BuiltImage]:
    """The supervisor image, built offline from host-built wheels on the local base."""
    _ensure_base_image(docker_host, docker_api)
    context = Path(tempfile.mkdtemp(prefix="hls-ctx-"))
    try:
        for name in ("Dockerfile", "pyproject.toml", "README.md", ".dockerignore"):
            shutil.copy(REPO / name, context / name)
        shutil.copytree(
            REPO / "supervisor",
            context / "supervisor",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        (context / "wheelhouse").mkdir()
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                str(context),
                "-w",
                str(context / "wheelhouse"),
            ],
            timeout=600,
        )
        _run(
            [
                "docker",
                "build",
                "--network",
                "none",
                "--build-arg",
                f"BASE_IMAGE={BASE_TAG}",
                "-t",
                IMAGE_TAG,
                str(context),
            ],
            env=_docker_env(docker_host),
            timeout=900,
        )
    finally:
        shutil.rmtree(context, ignore_errors=True)
    size = int(docker_api.inspect_image(IMAGE_TAG)["Size"])
    print(f"\nimage {IMAGE_TAG}: {size / 1e6:.1f} MB")
    yield BuiltImage(docker_host, IMAGE_TAG, size)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ComposeProject:
    """docker-compose (v1, Debian's) on a copy of the repo's compose files."""

    def __init__(
        self, image: BuiltImage, socket_path: str, files: list[str], env: dict[str, str]
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hls-compose-"))
        for name in ("compose.yaml", "compose.adaptive.yaml", "compose.proxy.yaml"):
            shutil.copy(REPO / name, self.dir / name)
        self.name = "hls" + uuid.uuid4().hex[:8]
        self.metrics_port = _free_port()
        self.files = files
        self.env = {
            **_docker_env(image.host),
            "COMPOSE_PROJECT_NAME": self.name,
            "SUPERVISOR_TAG": image.tag.split(":", 1)[1],
            "DOCKER_SOCKET": socket_path,
            "METRICS_PUBLISH": f"127.0.0.1:{self.metrics_port}",
            **env,
        }
        if "DOCKER_GID" not in env:
            self.env.pop("DOCKER_GID", None)

    def compose(self, *args: str, timeout: float = 180) -> str:
        command = ["docker-compose"]
        for name in self.files:
            command += ["-f", name]
        return _run([*command, *args], env=self.env, timeout=timeout, cwd=self.dir)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).strip()

    def exec_json(self, service: str, *command: str) -> dict[str, object]:
        out = _run(["docker", "exec", self.container(service), *command], env=self.env, timeout=60)
        return json.loads(out)

    def wait(self, check: Callable[[], bool], what: str, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except (AssertionError, ValueError):
                pass
            time.sleep(0.5)
        logs = self.compose("logs", "--no-color", "--tail", "50")
        raise AssertionError(f"timed out waiting for {what}; logs:\n{logs}")

    def status(self) -> dict[str, object]:
        return self.exec_json("supervisor", "homelabarr-supervisor", "status", "--json")

    def close(self) -> None:
        try:
            self.compose("down", "-v", "--remove-orphans", "-t", "5")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def compose_project(
    supervisor_image: BuiltImage, docker_daemon: object
) -> Iterator[Callable[..., ComposeProject]]:
    """Factory of compose projects on the test engine, each taken down (with volumes) afterwards."""
    projects: list[ComposeProject] = []
    socket_path = supervisor_image.host.removeprefix("unix://")

    def make(files: list[str], **env: str) -> ComposeProject:
        project = ComposeProject(supervisor_image, socket_path, files, env)
        projects.append(project)
        return project

    try:
        yield make
    finally:
        for project in projects:
            project.close()


def _socket_gid(image: BuiltImage) -> int:
    return os.stat(image.host.removeprefix("unix://")).st_gid


def test_image_runs_as_non_root_with_healthcheck(
    supervisor_image: BuiltImage, docker_api: docker.APIClient
) -> None:
    """The image: non-root user, healthcheck, SIGTERM stop signal, OCI labels, no compiler."""
    config = docker_api.inspect_image(supervisor_image.tag)["Config"]
    assert config["User"] == "10001:10001"
    assert config["Healthcheck"]["Test"][-1] == "healthcheck"
    assert config["StopSignal"] == "SIGTERM"
    assert config["Labels"]["org.opencontainers.image.title"] == "homelabarr-supervisor"
    out = _run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", supervisor_image.tag, "-c",
         "command -v gcc cc || echo no-compiler"],
        env=_docker_env(supervisor_image.host),
    )  # fmt: skip
    assert out.strip() == "no-compiler"


def test_without_the_socket_group_is_denied_with_the_remedy(
    compose_project: Callable[..., ComposeProject], supervisor_image: BuiltImage
) -> None:
    """The original failure: non-root without the socket's group is up, denied, and logs the group_add fix."""
    project = compose_project(["compose.yaml"])
    project.compose("up", "-d", "--no-build")
    project.wait(lambda: project.status()["state"] == "denied", "state denied")
    status = project.status()
    assert status["error"]["kind"] == "permission_denied"  # type: ignore[index]
    gid = _socket_gid(supervisor_image)
    project.wait(lambda: f'group_add: [\\"{gid}\\"]' in project.compose("logs", "--no-color", "supervisor")
                 or f'group_add: ["{gid}"]' in project.compose("logs", "--no-color", "supervisor"),
                 "the remedy in the log")  # fmt: skip


def test_group_add_connects_and_serves_the_consumer(
    compose_project: Callable[..., ComposeProject],
    supervisor_image: BuiltImage,
    make_container: Callable[..., str],
) -> None:
    """The fix: group_add with the socket's GID connects; the consumer lists containers; healthy; metrics served."""
    name = f"marker-{uuid.uuid4().hex[:6]}"
    make_container(name=name)
    project = compose_project(
        ["compose.yaml"], DOCKER_GID=str(_socket_gid(supervisor_image)), COMPOSE_PROFILES="example"
    )
    project.compose("up", "-d", "--no-build", timeout=240)
    project.wait(
        lambda: project.status()["state"] == "connected" and project.status()["synced"] is True,
        "connected",
    )
    project.wait(
        lambda: (
            _run(
                [
                    "docker",
                    "inspect",
                    "-f",
                    "{{.State.Health.Status}}",
                    project.container("supervisor"),
                ],
                env=project.env,
            ).strip()
            == "healthy"
        ),
        "healthy",
        seconds=90,
    )
    project.wait(
        lambda: name in project.compose("logs", "--no-color", "backend-example"),
        "the consumer's listing",
        90,
    )
    with urllib.request.urlopen(
        f"http://127.0.0.1:{project.metrics_port}/metrics", timeout=5
    ) as response:
        assert b"homelabarr_supervisor_docker_up 1.0" in response.read()


def test_adaptive_mode_drops_to_non_root_with_the_socket_group(
    compose_project: Callable[..., ComposeProject], supervisor_image: BuiltImage
) -> None:
    """Adaptive mode with no DOCKER_GID: connected, running as uid 10001 with the socket's GID and no capabilities."""
    project = compose_project(["compose.yaml", "compose.adaptive.yaml"])
    project.compose("up", "-d", "--no-build")
    project.wait(lambda: project.status()["state"] == "connected", "connected")
    status = _run(
        ["docker", "exec", project.container("supervisor"), "cat", "/proc/1/status"],
        env=project.env,
    )
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["Uid"].split() == ["10001"] * 4
    assert str(_socket_gid(supervisor_image)) in fields["Groups"].split()
    assert int(fields["CapEff"], 16) == 0
    assert int(fields["CapPrm"], 16) == 0


def test_down_leaves_nothing_behind(
    compose_project: Callable[..., ComposeProject], docker_api: docker.APIClient
) -> None:
    """docker-compose down -v removes every container, volume and network of the project."""
    project = compose_project(["compose.yaml"])
    project.compose("up", "-d", "--no-build")
    project.wait(lambda: project.status()["state"] in ("denied", "connected"), "the supervisor up")
    project.compose("down", "-v", "-t", "5")
    label = f"com.docker.compose.project={project.name}"
    assert docker_api.containers(all=True, filters={"label": label}) == []
    assert (docker_api.volumes(filters={"label": label}).get("Volumes") or []) == []
    assert docker_api.networks(filters={"label": label}) == []


def test_compose_files_are_valid(
    supervisor_image: BuiltImage, compose_project: Callable[..., ComposeProject]
) -> None:
    """Every documented combination of compose files passes docker-compose config."""
    for files, env in (
        (["compose.yaml"], {}),
        (["compose.yaml", "compose.adaptive.yaml"], {}),
        (["compose.yaml", "compose.proxy.yaml"], {"COMPOSE_PROFILES": "proxy"}),
    ):
        project = compose_project(files, **env)
        config = project.compose("config")
        assert "supervisor" in config
