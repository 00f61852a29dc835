"""Container actions through a real daemon (``python -m supervisor run``) against a real dockerd.

Two daemons serve the module: ``acting`` allows every action on containers that carry
the label ``hls.actions`` and belong to the compose project ``hlsact``, for uid 0
only; ``refusing`` has the default policy (nothing allowed). Every answer is checked
against Docker's own view.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon_proc import SupervisorProcess, UnixHTTPConnection, request
from tests.dockerd import ContainerFactory

pytestmark = pytest.mark.docker

NOBODY = 65534
ACTING_LABELS = {"hls.actions": "1", "com.docker.compose.project": "hlsact"}
#: A container that ignores SIGTERM: only SIGKILL ends it.
STUBBORN = ["/bin/sh", "-c", 'trap "" TERM; while :; do sleep 1; done']


def _daemon(docker_host: str, env: dict[str, str]) -> Iterator[SupervisorProcess]:
    tmp = Path(tempfile.mkdtemp(prefix="hx", dir="/tmp"))
    os.chmod(tmp, 0o755)  # let uid 65534 reach the socket
    base = {"SUPERVISOR_API_MODE": "0666", "SUPERVISOR_STATS_INTERVAL_SECONDS": "0"}
    try:
        with SupervisorProcess(
            docker_host, tmp / "api.sock", metrics_listen="", extra_env={**base, **env}
        ) as sup:
            sup.wait_synced()
            yield sup
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def acting(docker_host: str) -> Iterator[SupervisorProcess]:
    """A daemon allowing every action, on selected containers, to uid 0."""
    yield from _daemon(
        docker_host,
        {
            "SUPERVISOR_ACTIONS_ALLOW": "start,stop,restart,remove,logs",
            "SUPERVISOR_ACTIONS_SELECTOR_LABELS": "hls.actions",
            "SUPERVISOR_ACTIONS_SELECTOR_COMPOSE_PROJECTS": "hlsact",
            "SUPERVISOR_ACTIONS_ALLOWED_UIDS": "0",
            "SUPERVISOR_ACTIONS_TIMEOUT_SECONDS": "15",
        },
    )


@pytest.fixture(scope="module")
def refusing(docker_host: str) -> Iterator[SupervisorProcess]:
    """A daemon with the default policy: no action allowed."""
    yield from _daemon(docker_host, {})


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:10]


def call(sup: SupervisorProcess, method: str, path: str, timeout: float = 40.0) -> tuple[int, Any]:
    """One request; (status, decoded JSON body)."""
    status, _, body = request(sup.socket, method, path, timeout)
    return status, json.loads(body)


def get_logs(sup: SupervisorProcess, ref: str, query: str = "") -> list[dict[str, Any]]:
    status, headers, body = request(sup.socket, "GET", f"/v1/containers/{ref}/logs?{query}", 30)
    assert status == 200, body
    assert headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in body.splitlines()]


def wait_mirror(sup: SupervisorProcess, ref: str, predicate: Any, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        status, body = call(sup, "GET", f"/v1/containers/{ref}")
        if status == 200 and predicate(body["container"]):
            return body["container"]
        assert time.monotonic() < deadline, f"mirror never matched: {body}"
        time.sleep(0.05)


def actions_total(sup: SupervisorProcess) -> dict[tuple[str, str], float]:
    _, _, body = request(sup.socket, "GET", "/metrics")
    counts = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "homelabarr_supervisor_actions_total":
                counts[(sample.labels["action"], sample.labels["result"])] = sample.value
    return counts


# -- allowed ---------------------------------------------------------------------------


def test_start_restart_stop_remove_answer_with_the_mirrors_record(
    acting: SupervisorProcess,
    make_container: ContainerFactory,
    docker_api: docker.APIClient,
    tag: str,
) -> None:
    """Each allowed action answers 200 with the record as the mirror now shows it, equal to Docker's."""
    cid = make_container(STUBBORN, name=f"hls-{tag}", labels=ACTING_LABELS, start=False)
    wait_mirror(acting, cid, lambda c: c["state"] == "created")

    status, body = call(acting, "POST", f"/v1/containers/hls-{tag}/start")
    assert status == 200, body
    assert (body["action"], body["id"], body["changed"], body["settled"]) == (
        "start",
        cid,
        True,
        True,
    )
    inspected = docker_api.inspect_container(cid)
    assert body["container"]["state"] == "running" == inspected["State"]["Status"]
    assert body["container"]["started_at"] == inspected["State"]["StartedAt"]

    status, again = call(acting, "POST", f"/v1/containers/{cid}/start")
    assert status == 200 and again["changed"] is False  # Docker: 304, already running

    status, body = call(acting, "POST", f"/v1/containers/{cid[:12]}/restart?timeout=0")
    assert status == 200, body
    assert body["container"]["state"] == "running"
    assert body["container"]["started_at"] != inspected["State"]["StartedAt"]
    assert (
        body["container"]["started_at"] == docker_api.inspect_container(cid)["State"]["StartedAt"]
    )

    status, body = call(acting, "POST", f"/v1/containers/{cid}/stop?timeout=0")
    assert status == 200, body
    assert (
        body["container"]["state"]
        == "exited"
        == docker_api.inspect_container(cid)["State"]["Status"]
    )

    status, body = call(acting, "DELETE", f"/v1/containers/{cid}")
    assert status == 200, body
    assert (body["action"], body["id"], body["name"], body["container"]) == (
        "remove",
        cid,
        f"hls-{tag}",
        None,
    )
    assert cid not in {c["Id"] for c in docker_api.containers(all=True)}
    assert call(acting, "GET", f"/v1/containers/{cid}")[0] == 404


def test_actions_are_seen_on_the_event_stream(
    acting: SupervisorProcess, make_container: ContainerFactory, tag: str
) -> None:
    """A stop through the API shows up as an upsert to a subscriber, like any other change."""
    cid = make_container(name=f"hls-{tag}", labels=ACTING_LABELS)
    wait_mirror(acting, cid, lambda c: c["state"] == "running")
    conn, response = acting.open_events()
    try:
        assert json.loads(response.readline())["type"] == "snapshot"
        assert call(acting, "POST", f"/v1/containers/{cid}/stop?timeout=0")[0] == 200
        for _ in range(50):
            line = json.loads(response.readline())
            container = line.get("container") or {}
            if (
                line["type"] == "upsert"
                and container["id"] == cid
                and container["state"] == "exited"
            ):
                break
        else:
            raise AssertionError("no upsert showing the stop")
    finally:
        conn.close()


def test_stop_of_a_container_ignoring_sigterm_waits_then_kills(
    acting: SupervisorProcess,
    make_container: ContainerFactory,
    docker_api: docker.APIClient,
    tag: str,
) -> None:
    """stop?timeout=2 on a container that traps TERM: about 2 s, then SIGKILL (exit 137)."""
    cid = make_container(STUBBORN, name=f"hls-{tag}", labels=ACTING_LABELS)
    wait_mirror(acting, cid, lambda c: c["state"] == "running")
    time.sleep(0.3)  # let the shell install its trap
    started = time.monotonic()
    status, body = call(acting, "POST", f"/v1/containers/{cid}/stop?timeout=2")
    elapsed = time.monotonic() - started
    assert status == 200, body
    assert 2.0 <= elapsed < 10.0, elapsed
    assert body["container"]["state"] == "exited"
    assert (
        body["container"]["exit_code"]
        == 137
        == docker_api.inspect_container(cid)["State"]["ExitCode"]
    )


def test_remove_of_a_running_container_needs_force(
    acting: SupervisorProcess,
    make_container: ContainerFactory,
    docker_api: docker.APIClient,
    tag: str,
) -> None:
    """DELETE without force on a running container: 409 and it keeps running; with force: gone."""
    cid = make_container(name=f"hls-{tag}", labels=ACTING_LABELS)
    wait_mirror(acting, cid, lambda c: c["state"] == "running")
    status, body = call(acting, "DELETE", f"/v1/containers/{cid}")
    assert status == 409, body
    assert body["error"]["code"] == "conflict"
    assert body["error"]["kind"] == "container_state"
    assert "running" in body["error"]["message"]
    assert docker_api.inspect_container(cid)["State"]["Running"] is True
    status, body = call(acting, "DELETE", f"/v1/containers/{cid}?force=1&volumes=1")
    assert status == 200, body
    assert body["container"] is None
    assert cid not in {c["Id"] for c in docker_api.containers(all=True)}


def test_bad_parameters_are_400(
    acting: SupervisorProcess, make_container: ContainerFactory, tag: str
) -> None:
    """A malformed timeout or flag, or an unknown parameter, is a 400 and nothing happens."""
    cid = make_container(name=f"hls-{tag}", labels=ACTING_LABELS)
    wait_mirror(acting, cid, lambda c: c["state"] == "running")
    for method, target in (
        ("POST", f"/v1/containers/{cid}/stop?timeout=soon"),
        ("POST", f"/v1/containers/{cid}/restart?timeout=99999"),
        ("POST", f"/v1/containers/{cid}/start?force=1"),
        ("DELETE", f"/v1/containers/{cid}?force=maybe"),
        ("GET", f"/v1/containers/{cid}/logs?tail=-1"),
        ("GET", f"/v1/containers/{cid}/logs?since=yesterday"),
    ):
        status, body = call(acting, method, target)
        assert status == 400, (target, body)
        assert body["error"]["code"] == "bad_request"
    assert call(acting, "GET", f"/v1/containers/{cid}")[1]["container"]["state"] == "running"


# -- refused ---------------------------------------------------------------------------

ACTIONS = [
    ("start", "POST", "/start"),
    ("stop", "POST", "/stop"),
    ("restart", "POST", "/restart"),
    ("remove", "DELETE", ""),
    ("logs", "GET", "/logs"),
]


def test_every_action_refused_by_the_default_policy(
    refusing: SupervisorProcess,
    make_container: ContainerFactory,
    docker_api: docker.APIClient,
    tag: str,
) -> None:
    """With actions.allow empty, each action is 403 naming actions.allow, and Docker is untouched."""
    cid = make_container(name=f"hls-{tag}", labels=ACTING_LABELS)
    wait_mirror(refusing, cid, lambda c: c["state"] == "running")
    started_at = docker_api.inspect_container(cid)["State"]["StartedAt"]
    for action, method, suffix in ACTIONS:
        status, body = call(refusing, method, f"/v1/containers/{cid}{suffix}")
        assert status == 403, (action, body)
        assert body["error"]["code"] == "forbidden"
        assert f'add "{action}" to actions.allow' in body["error"]["message"]
    assert docker_api.inspect_container(cid)["State"]["StartedAt"] == started_at
    # Refused before the container is looked up: an unknown one gets 403 too, not 404.
    assert call(refusing, "POST", "/v1/containers/no-such-thing/stop")[0] == 403


def test_every_action_refused_outside_the_selector(
    acting: SupervisorProcess,
    make_container: ContainerFactory,
    docker_api: docker.APIClient,
    tag: str,
) -> None:
    """No hls.actions label, or another compose project: 403 naming the selector setting."""
    unlabelled = make_container(
        name=f"hls-{tag}-a", labels={"com.docker.compose.project": "hlsact"}
    )
    elsewhere = make_container(
        name=f"hls-{tag}-b", labels={"hls.actions": "1", "com.docker.compose.project": "other"}
    )
    for cid in (unlabelled, elsewhere):
        wait_mirror(acting, cid, lambda c: c["state"] == "running")
    for action, method, suffix in ACTIONS:
        status, body = call(acting, method, f"/v1/containers/{unlabelled}{suffix}")
        assert status == 403, (action, body)
        assert "actions.selector_labels" in body["error"]["message"]
        status, body = call(acting, method, f"/v1/containers/{elsewhere}{suffix}")
        assert status == 403, (action, body)
        assert "actions.selector_compose_projects" in body["error"]["message"]
    for cid in (unlabelled, elsewhere):
        assert docker_api.inspect_container(cid)["State"]["Running"] is True
    assert call(acting, "POST", "/v1/containers/no-such-thing/stop")[0] == 404


# Run as uid 65534: one request per argument "METHOD PATH", prints "STATUS BODY" lines.
PEER_SCRIPT = """
import socket, sys
for arg in sys.argv[2:]:
    method, path = arg.split(" ", 1)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(sys.argv[1])
    s.sendall(f"{method} {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    print(head.split(b" ")[1].decode(), body.decode().replace("\\n", " "))
"""


def test_every_action_refused_to_another_uid_who_may_still_read(
    acting: SupervisorProcess,
    make_container: ContainerFactory,
    docker_api: docker.APIClient,
    tag: str,
) -> None:
    """uid 65534 (not in actions.allowed_uids) gets 403 for each action but can list containers."""
    cid = make_container(name=f"hls-{tag}", labels=ACTING_LABELS)
    wait_mirror(acting, cid, lambda c: c["state"] == "running")
    requests = [f"{method} /v1/containers/{cid}{suffix}" for _, method, suffix in ACTIONS]
    done = subprocess.run(
        [
            "/usr/bin/python3",
            "-c",
            PEER_SCRIPT,
            str(acting.socket),
            *requests,
            "GET /v1/containers",
        ],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd="/",
    )
    answers = [line.split(" ", 1) for line in done.stdout.splitlines()]
    assert len(answers) == len(ACTIONS) + 1, done.stdout
    for (status, body), (action, _, _) in zip(answers, ACTIONS, strict=False):
        assert status == "403", (action, body)
        message = json.loads(body)["error"]["message"]
        assert f"uid {NOBODY}" in message and "actions.allowed_uids" in message
    assert answers[-1][0] == "200"
    assert cid in {c["id"] for c in json.loads(answers[-1][1])["containers"]}
    assert docker_api.inspect_container(cid)["State"]["Running"] is True


# -- the audit trail -------------------------------------------------------------------


def test_every_attempt_is_audited_and_counted(
    acting: SupervisorProcess, make_container: ContainerFactory, tag: str
) -> None:
    """An allowed stop and a refused one: one audit line each with peer, container, parameters, result."""
    ok = make_container(STUBBORN, name=f"hls-{tag}-ok", labels=ACTING_LABELS)
    out = make_container(name=f"hls-{tag}-out")
    for cid in (ok, out):
        wait_mirror(acting, cid, lambda c: c["state"] == "running")
    before = actions_total(acting)
    assert call(acting, "POST", f"/v1/containers/hls-{tag}-ok/stop?timeout=1")[0] == 200
    assert call(acting, "POST", f"/v1/containers/hls-{tag}-out/stop")[0] == 403
    after = actions_total(acting)
    assert after[("stop", "ok")] == before[("stop", "ok")] + 1
    assert after[("stop", "refused")] == before[("stop", "refused")] + 1
    assert set(after) >= {(a, r) for a in ("start", "logs") for r in ("ok", "refused", "timeout")}

    deadline = time.monotonic() + 5
    while True:
        audits = {
            r["container_id"]: r
            for r in acting.log_records()
            if r.get("audit") == "action" and r.get("container_id") in (ok, out)
        }
        if len(audits) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    done, refused = audits[ok], audits[out]
    assert done["action"] == "stop" and done["result"] == "ok" and done["status"] == 200
    assert done["peer_uid"] == 0 and isinstance(done["peer_pid"], int) and done["peer_pid"] > 0
    assert done["container_name"] == f"hls-{tag}-ok" and done["params"] == {"timeout": 1}
    assert done["duration_seconds"] >= 1.0  # the stop waited out its timeout
    assert done["level"] == "INFO"
    assert f"audit: stop hls-{tag}-ok ({ok[:12]}) by uid 0" in done["message"]
    assert refused["result"] == "refused" and refused["status"] == 403
    assert refused["container_name"] == f"hls-{tag}-out" and refused["level"] == "WARNING"
    assert "actions.selector_labels" in refused["reason"]


# -- logs ------------------------------------------------------------------------------

BOTH_STREAMS = [
    "/bin/sh",
    "-c",
    "echo out one; sleep 0.1; echo err one >&2; sleep 0.1; echo out two; sleep 0.1;"
    " echo err two >&2; sleep 0.1; printf 'no newline'",
]


@pytest.mark.parametrize("tty", [False, True], ids=["framed", "tty"])
def test_logs_of_both_streams_come_back_separated_and_in_order(
    acting: SupervisorProcess,
    make_container: ContainerFactory,
    docker_api: docker.APIClient,
    tag: str,
    tty: bool,
) -> None:
    """stdout and stderr lines are tagged and in order; a TTY merges both into stdout."""
    cid = make_container(BOTH_STREAMS, name=f"hls-{tag}", labels=ACTING_LABELS, tty=tty)
    docker_api.wait(cid, timeout=30)
    wait_mirror(acting, cid, lambda c: c["state"] == "exited")
    lines = get_logs(acting, cid)
    out, err = ("stdout", "stdout") if tty else ("stdout", "stderr")
    assert [(line["stream"], line["line"]) for line in lines] == [
        (out, "out one"),
        (err, "err one"),
        (out, "out two"),
        (err, "err two"),
        (out, "no newline"),
    ]
    assert all(line["time"] is None for line in lines)

    stamped = get_logs(acting, cid, "timestamps=1&tail=2")
    assert [line["line"] for line in stamped] == ["err two", "no newline"]
    times = [line["time"] for line in stamped]
    assert all(t and t.endswith("Z") for t in times) and times == sorted(times)
    since = get_logs(acting, cid, f"since={times[1]}")  # RFC 3339 accepted, as Unix seconds are
    assert [line["line"] for line in since] == ["no newline"]


def test_follow_sees_new_lines_and_ends_when_the_container_stops(
    acting: SupervisorProcess, make_container: ContainerFactory, tag: str
) -> None:
    """follow=1&tail=0 streams lines written after it opened; stopping the container ends it."""
    cid = make_container(
        ["/bin/sh", "-c", "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done"],
        name=f"hls-{tag}",
        labels=ACTING_LABELS,
    )
    wait_mirror(acting, cid, lambda c: c["state"] == "running")
    conn = UnixHTTPConnection(acting.socket, timeout=10)
    try:
        conn.request("GET", f"/v1/containers/{cid}/logs?follow=1&tail=0")
        response = conn.getresponse()
        assert response.status == 200
        seen = [json.loads(response.readline()) for _ in range(3)]
        numbers = [int(line["line"].split()[1]) for line in seen]
        assert numbers == list(range(numbers[0], numbers[0] + 3))
        assert all(line["stream"] == "stdout" for line in seen)
        assert call(acting, "POST", f"/v1/containers/{cid}/stop?timeout=0")[0] == 200
        started = time.monotonic()
        while response.readline():  # lines written before the kill, then the end
            assert time.monotonic() - started < 10
    finally:
        conn.close()


def test_a_follower_that_leaves_frees_its_docker_stream(
    acting: SupervisorProcess, make_container: ContainerFactory, tag: str
) -> None:
    """A client that disconnects mid-follow: the daemon drops the connection and keeps serving."""
    cid = make_container(
        ["/bin/sh", "-c", "while :; do echo x; sleep 0.1; done"],
        name=f"hls-{tag}",
        labels=ACTING_LABELS,
    )
    wait_mirror(acting, cid, lambda c: c["state"] == "running")
    fds = acting.fd_count()
    for _ in range(3):
        conn = UnixHTTPConnection(acting.socket, timeout=10)
        conn.request("GET", f"/v1/containers/{cid}/logs?follow=1&tail=1")
        response = conn.getresponse()
        assert json.loads(response.readline())["line"] == "x"
        conn.close()
    deadline = time.monotonic() + 10
    while acting.fd_count() > fds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert acting.fd_count() <= fds
    assert acting.get_json("/v1/health")["status"] == "ok"


# -- the command line --------------------------------------------------------------------


def cli(sup: SupervisorProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args, "--socket", str(sup.socket)],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")},
    )


def test_command_line_actions_and_logs(
    acting: SupervisorProcess,
    make_container: ContainerFactory,
    docker_api: docker.APIClient,
    tag: str,
) -> None:
    """stop, start, restart, rm and logs from the shell: one line each, errors on stderr with exit 1."""
    name = f"hls-{tag}"
    cid = make_container(
        ["/bin/sh", "-c", "echo to-out; echo to-err >&2; exec sleep 1000"],
        name=name,
        labels=ACTING_LABELS,
    )
    wait_mirror(acting, cid, lambda c: c["state"] == "running")
    done = cli(acting, "stop", name, "-t", "0")
    assert (done.returncode, done.stdout) == (0, f"stopped {name} ({cid[:12]}): exited\n"), (
        done.stderr
    )
    done = cli(acting, "start", name)
    assert (done.returncode, done.stdout) == (0, f"started {name} ({cid[:12]}): running\n"), (
        done.stderr
    )
    done = cli(acting, "restart", cid[:12], "--timeout", "0", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["container"]["state"] == "running"

    done = cli(acting, "logs", name, "--tail", "2")
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("to-out\n", "to-err\n")
    done = cli(acting, "logs", name, "--tail", "1", "--timestamps", "--json")
    (line,) = [json.loads(text) for text in done.stdout.splitlines()]
    assert line["line"] in ("to-out", "to-err") and line["time"]

    done = cli(acting, "rm", name)
    assert done.returncode == 1
    assert "running" in done.stderr and "(409)" in done.stderr
    done = cli(acting, "rm", name, "-f")
    assert (done.returncode, done.stdout) == (0, f"removed {name} ({cid[:12]}): gone\n"), (
        done.stderr
    )
    assert cid not in {c["Id"] for c in docker_api.containers(all=True)}
