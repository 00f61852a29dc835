"""The command-line clients (status, containers, watch, healthcheck) against a live daemon."""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from supervisor.client import table
from tests.daemon_proc import REPO, SupervisorProcess
from tests.dockerd import ContainerFactory
from tests.test_api_docker import settle

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def supervisor(docker_host: str) -> Iterator[SupervisorProcess]:
    tmp = Path(tempfile.mkdtemp(prefix="hc", dir="/tmp"))
    try:
        with SupervisorProcess(docker_host, tmp / "api.sock", metrics_listen="") as sup:
            sup.wait_synced()
            yield sup
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPERVISOR_", "DOCKER_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env or cli_env(),
        check=False,
    )


def test_table_aligns_columns() -> None:
    """Columns are padded to their widest cell, two spaces apart, without trailing blanks."""
    assert table(("A", "BB"), [("xxx", "y"), ("z", "")]).splitlines() == [
        "A    BB",
        "xxx  y",
        "z",
    ]


def test_status_prints_a_table_or_json(supervisor: SupervisorProcess) -> None:
    """status prints aligned key/value lines, or the API's JSON with --json."""
    done = cli("status", "--socket", str(supervisor.socket))
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()
    column = len("docker version  ")  # the longest key, two spaces
    lines = {row[:column].strip(): row[column:] for row in rows}
    assert all(row[column - 2 : column] == "  " and row[column] != " " for row in rows)
    assert lines["state"].startswith("connected since ")
    assert lines["synced"] == "yes"
    assert lines["docker"] == supervisor.docker_host
    assert lines["error"] == "-"
    done = cli("status", "--socket", str(supervisor.socket), "--json")
    assert done.returncode == 0
    status = json.loads(done.stdout)
    assert (status["state"], status["synced"]) == ("connected", True)
    assert set(status) == set(supervisor.get_json("/v1/status"))


def test_containers_table_filters_and_json(
    supervisor: SupervisorProcess,
    docker_api: docker.APIClient,
    make_container: ContainerFactory,
) -> None:
    """containers prints an aligned table; --state/--label/--name filter as the API does."""
    tag = uuid.uuid4().hex[:8]
    web = make_container(name=f"hls-{tag}-web", labels={"hls.cli": tag, "role": "web"})
    job = make_container(name=f"hls-{tag}-job", labels={"hls.cli": tag}, start=False)
    settle(supervisor, docker_api)
    sock = ["--socket", str(supervisor.socket)]

    done = cli("containers", *sock, "--label", f"hls.cli={tag}")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["NAME", "STATE", "HEALTH", "IMAGE", "ID"]
    assert [row.split() for row in rows] == [
        [f"hls-{tag}-job", "created", "-", "hls-test/busybox:latest", job[:12]],
        [f"hls-{tag}-web", "running", "-", "hls-test/busybox:latest", web[:12]],
    ]
    for title in ("STATE", "HEALTH", "IMAGE", "ID"):  # cells start under their title
        column = header.index(title)
        assert all(row[column - 2 : column] == "  " and row[column] != " " for row in rows)

    done = cli("containers", *sock, "--label", f"hls.cli={tag}", "--state", "running")
    assert [row.split()[0] for row in done.stdout.splitlines()[1:]] == [f"hls-{tag}-web"]
    done = cli("containers", *sock, "--name", f"{tag}-jo", "--label", "hls.cli")
    assert [row.split()[0] for row in done.stdout.splitlines()[1:]] == [f"hls-{tag}-job"]
    done = cli("containers", *sock, "--label", f"hls.cli={tag}", "--label", "role=web", "--json")
    body = json.loads(done.stdout)
    assert [c["id"] for c in body["containers"]] == [web]
    assert body == supervisor.get_json(f"/v1/containers?label=hls.cli={tag}&label=role=web")
    done = cli("containers", *sock, "--state", "sleeping")
    assert done.returncode == 2  # argparse refuses an unknown state


def test_socket_defaults_to_the_environment(supervisor: SupervisorProcess) -> None:
    """Without --socket the clients use SUPERVISOR_API_SOCKET, as the daemon does."""
    done = cli("healthcheck", env=cli_env(SUPERVISOR_API_SOCKET=str(supervisor.socket)))
    assert (done.returncode, done.stdout) == (0, "ok: docker connected\n")


def test_healthcheck_exit_codes(supervisor: SupervisorProcess, short_tmp: Path) -> None:
    """healthcheck is 0 while the daemon answers; --ready only when Docker is connected and synced."""
    assert cli("healthcheck", "--socket", str(supervisor.socket)).returncode == 0
    ready = cli("healthcheck", "--ready", "--socket", str(supervisor.socket))
    assert (ready.returncode, ready.stdout) == (0, "ok: docker connected\n")
    with SupervisorProcess(
        "unix:///nonexistent/docker.sock", short_tmp / "api.sock", metrics_listen=""
    ) as away:
        away.wait_for(lambda s: s["error"] is not None)
        assert cli("healthcheck", "--socket", str(away.socket)).returncode == 0
        done = cli("healthcheck", "--ready", "--socket", str(away.socket))
        assert done.returncode == 1
        assert done.stdout.startswith("not ready: docker ")
        assert "socket_missing" in done.stdout
        done = cli("healthcheck", "--ready", "--json", "--socket", str(away.socket))
        assert done.returncode == 1
        assert json.loads(done.stdout)["synced"] is False
        done = cli("containers", "--socket", str(away.socket))
        assert done.returncode == 0
        assert "stale" in done.stderr


def test_clients_without_a_daemon_fail_with_one_line(short_tmp: Path) -> None:
    """No socket, or a socket nobody listens on: one line on stderr, exit 1, no traceback."""
    stale = short_tmp / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    for path, words in ((short_tmp / "none.sock", "no socket at"), (stale, "nothing listens")):
        for command in ("status", "containers", "watch", "healthcheck"):
            done = cli(command, "--socket", str(path))
            assert done.returncode == 1, (command, done)
            assert done.stdout == ""
            assert len(done.stderr.splitlines()) == 1, done.stderr
            assert words in done.stderr and str(path) in done.stderr
            assert "Traceback" not in done.stderr


def test_watch_prints_one_line_per_change(
    supervisor: SupervisorProcess,
    docker_api: docker.APIClient,
    make_container: ContainerFactory,
) -> None:
    """watch prints the snapshot, then one line per change; --json prints the event objects."""
    tag = uuid.uuid4().hex[:8]
    cid = make_container(name=f"hls-{tag}-w")
    settle(supervisor, docker_api)
    for extra in ([], ["--json"]):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "supervisor",
                "watch",
                "--socket",
                str(supervisor.socket),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        lines: queue.Queue[str] = queue.Queue()

        def read(proc: subprocess.Popen[str] = proc, lines: queue.Queue[str] = lines) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line.rstrip("\n"))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            first = lines.get(timeout=15)
            docker_api.pause(cid)
            change = lines.get(timeout=15)
            docker_api.unpause(cid)
            back = lines.get(timeout=15)
        finally:
            proc.terminate()
            proc.wait(10)
            reader.join(5)
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.close()
            proc.stderr.close()
        if extra:
            assert json.loads(first)["type"] == "snapshot"
            event = json.loads(change)
            assert (event["type"], event["container"]["id"]) == ("upsert", cid)
            assert event["container"]["state"] == "paused"
            assert json.loads(back)["container"]["state"] == "running"
        else:
            assert " snapshot " in first and "docker connected" in first
            assert change.split()[2:6] == ["upsert", f"hls-{tag}-w", "paused", "-"]
            assert change.split()[-1] == cid[:12]
            assert back.split()[2:5] == ["upsert", f"hls-{tag}-w", "running"]
            assert int(back.split()[1]) == int(change.split()[1]) + 1


def test_watch_resumes_after_a_resync_from_what_it_has_seen(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a resync line, watch reconnects with since = the last revision it printed."""
    record = {"id": "a" * 64, "name": "web", "state": "running", "health": None}
    streams = [
        [
            {"type": "snapshot", "revision": 10, "state": "connected", "containers": []},
            {"type": "upsert", "revision": 11, "container": record},
            {"type": "resync", "revision": 20, "reason": "fell behind"},
        ],
        [{"type": "upsert", "revision": 12, "container": {**record, "state": "paused"}}],
    ]
    calls: list[int | None] = []

    def events(self: object, since: int | None) -> Iterator[dict[str, object]]:
        calls.append(since)
        yield from streams.pop(0)

    monkeypatch.setattr("supervisor.client.ApiClient.events", events)
    from supervisor.cli import main

    assert main(["watch", "--socket", "/nonexistent"]) == 1
    assert calls == [None, 11]
    out, err = capsys.readouterr()
    kinds = [line.split()[2] for line in out.splitlines()]
    assert kinds == ["snapshot", "upsert", "resync", "upsert"]
    assert err.strip() == "homelabarr-supervisor: the supervisor closed the event stream"
