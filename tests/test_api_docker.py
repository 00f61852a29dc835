"""The API of a real daemon (``python -m supervisor run``) against a real dockerd.

Every answer is compared with Docker's own view: the list and its filters with
``GET /containers/json``, a single container with ``inspect``, the status with
``version``; the event stream and its resumption with what actually happened.
"""

from __future__ import annotations

import http.client
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.daemon_proc import SupervisorProcess
from tests.dockerd import ContainerFactory, PrivateDockerd

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def supervisor(docker_host: str) -> Iterator[SupervisorProcess]:
    """One daemon for the module, connected to the shared engine and synced."""
    tmp = Path(tempfile.mkdtemp(prefix="ha", dir="/tmp"))
    try:
        with SupervisorProcess(docker_host, tmp / "api.sock") as sup:
            sup.wait_synced()
            yield sup
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def tag() -> str:
    """A label value unique to the test, to tell its containers apart."""
    return uuid.uuid4().hex[:10]


# -- Docker's view ---------------------------------------------------------------------


def docker_view(api: docker.APIClient, **filters: Any) -> dict[str, dict[str, Any]]:
    """Docker's list (all=1, with filters) as id -> the fields the mirror also has."""
    listed = api.containers(all=True, filters=filters or None)
    return {
        c["Id"]: {
            "name": c["Names"][0].lstrip("/"),
            "state": c["State"],
            "image": c["Image"],
            "image_id": c["ImageID"],
            "labels": c["Labels"] or {},
        }
        for c in listed
    }


def mirror_view(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        c["id"]: {
            "name": c["name"],
            "state": c["state"],
            "image": c["image"],
            "image_id": c["image_id"],
            "labels": c["labels"],
        }
        for c in body["containers"]
    }


def settle(sup: SupervisorProcess, api: docker.APIClient, timeout: float = 15.0) -> dict[str, Any]:
    """Wait until the unfiltered list equals Docker's; returns that /v1/containers body."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = sup.get_json("/v1/containers")
        want = docker_view(api)
        if mirror_view(body) == want:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"mirror {mirror_view(body)}\n!= docker {want}")
        time.sleep(0.05)


def next_line(response: http.client.HTTPResponse) -> dict[str, Any]:
    line = response.readline()
    assert line, "the event stream ended"
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def wait_line(
    response: http.client.HTTPResponse,
    predicate: Callable[[dict[str, Any]], bool],
    limit: int = 200,
) -> dict[str, Any]:
    """The first line matching ``predicate`` (heartbeats and others skipped)."""
    for _ in range(limit):
        line = next_line(response)
        if predicate(line):
            return line
    raise AssertionError("no matching line")


# -- endpoints against Docker's view ---------------------------------------------------


def test_status_health_and_ready_match_docker(
    supervisor: SupervisorProcess, docker_api: docker.APIClient
) -> None:
    """/v1/status reports Docker's version and container count; health and ready are 200."""
    settle(supervisor, docker_api)
    status = supervisor.get_json("/v1/status")
    version = docker_api.version()
    assert status["state"] == "connected"
    assert status["synced"] is True
    assert status["error"] is None and status["retry_in"] is None
    assert status["docker"] == {
        "host": supervisor.docker_host,
        "version": version["Version"],
        "api_version": version["ApiVersion"],
    }
    assert status["containers"] == len(docker_api.containers(all=True))
    assert supervisor.get_json("/v1/health") == {"status": "ok", "state": "connected"}
    ready = supervisor.get_json("/v1/ready")
    assert ready["state"] == "connected" and ready["synced"] is True


def test_container_list_matches_docker(
    supervisor: SupervisorProcess,
    docker_api: docker.APIClient,
    make_container: ContainerFactory,
    tag: str,
) -> None:
    """Running, paused, exited and created containers are listed as Docker lists them."""
    running = make_container(name=f"hls-{tag}-run", labels={"hls.api": tag})
    paused = make_container(name=f"hls-{tag}-paused", labels={"hls.api": tag})
    docker_api.pause(paused)
    exited = make_container(["/bin/sh", "-c", "exit 3"], name=f"hls-{tag}-exit")
    docker_api.wait(exited, timeout=30)
    created = make_container(name=f"hls-{tag}-new", start=False)
    body = settle(supervisor, docker_api)
    assert body["state"] == "connected"
    assert body["stale"] is False
    states = {c["id"]: c["state"] for c in body["containers"]}
    assert [states[i] for i in (running, paused, exited, created)] == [
        "running", "paused", "exited", "created",
    ]  # fmt: skip
    by_id = {c["id"]: c for c in body["containers"]}
    assert by_id[exited]["exit_code"] == 3
    assert by_id[running]["labels"] == {"hls.test": "1", "hls.api": tag}
    assert body["revision"] == supervisor.get_json("/v1/status")["revision"]


def test_container_filters_match_docker(
    supervisor: SupervisorProcess,
    docker_api: docker.APIClient,
    make_container: ContainerFactory,
    tag: str,
) -> None:
    """state, label and name filters, alone and combined, select what Docker's filters select."""
    make_container(name=f"hls-{tag}-web-1", labels={"hls.api": tag, "role": "web"})
    make_container(name=f"hls-{tag}-web-2", labels={"hls.api": tag, "role": "web"}, start=False)
    db = make_container(name=f"hls-{tag}-db", labels={"hls.api": tag, "role": "db"})
    docker_api.pause(db)
    make_container(name=f"hls-{tag}-job", labels={"hls.api": tag})
    settle(supervisor, docker_api)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("state=running", {"status": ["running"]}),
        ("state=created&state=paused", {"status": ["created", "paused"]}),
        (f"label=hls.api={tag}", {"label": [f"hls.api={tag}"]}),
        ("label=role", {"label": ["role"]}),
        (f"label=hls.api={tag}&label=role=web", {"label": [f"hls.api={tag}", "role=web"]}),
        (f"name={tag}-web", {"name": [f"{tag}-web"]}),
        (f"name={tag}-db&name={tag}-job", {"name": [f"{tag}-db", f"{tag}-job"]}),
        (
            f"state=running&label=hls.api={tag}&name={tag}",
            {"status": ["running"], "label": [f"hls.api={tag}"], "name": [tag]},
        ),
        ("label=role=nothing", {"label": ["role=nothing"]}),
    ]
    for query, filters in cases:
        body = supervisor.get_json(f"/v1/containers?{query}")
        assert mirror_view(body) == docker_view(docker_api, **filters), query
    assert len(supervisor.get_json(f"/v1/containers?label=hls.api={tag}")["containers"]) == 4


def test_single_container_by_id_name_and_prefix_matches_inspect(
    supervisor: SupervisorProcess,
    docker_api: docker.APIClient,
    make_container: ContainerFactory,
    tag: str,
) -> None:
    """/v1/containers/{ref} finds a container by id, name or prefix as inspect shows it; else 404."""
    cid = make_container(["/bin/sh", "-c", "exit 7"], name=f"hls-{tag}-one", labels={"k": "v"})
    docker_api.wait(cid, timeout=30)
    settle(supervisor, docker_api)
    inspect = docker_api.inspect_container(cid)
    for ref in (cid, f"hls-{tag}-one", cid[:12], cid[:6]):
        status, _, raw = supervisor.request("GET", f"/v1/containers/{ref}")
        assert status == 200, ref
        body = json.loads(raw)
        assert (body["state"], body["stale"]) == ("connected", False)
        record = body["container"]
        assert record["id"] == inspect["Id"]
        assert record["name"] == inspect["Name"].lstrip("/")
        assert record["state"] == inspect["State"]["Status"] == "exited"
        assert record["exit_code"] == inspect["State"]["ExitCode"] == 7
        assert record["image_id"] == inspect["Image"]
        assert record["labels"] == inspect["Config"]["Labels"]
        assert record["restart_count"] == inspect["RestartCount"]
    for ref in (f"hls-{tag}-none", "0000000000", "abc"):
        status, headers, raw = supervisor.request("GET", f"/v1/containers/{ref}")
        assert status == 404
        assert headers["content-type"] == "application/json"
        assert json.loads(raw)["error"]["code"] == "not_found"


def test_event_stream_follows_real_changes(
    supervisor: SupervisorProcess,
    docker_api: docker.APIClient,
    make_container: ContainerFactory,
    tag: str,
) -> None:
    """Start, pause, unpause, stop and remove each show up as a line, with contiguous revisions."""
    settle(supervisor, docker_api)
    conn, response = supervisor.open_events()
    try:
        assert response.getheader("content-type") == "application/x-ndjson"
        snapshot = next_line(response)
        assert snapshot["type"] == "snapshot"
        assert mirror_view(snapshot) == docker_view(docker_api)
        cid = make_container(name=f"hls-{tag}-ev", start=False)

        def upsert_of(state: str) -> Callable[[dict[str, Any]], bool]:
            return lambda line: (
                line["type"] == "upsert"
                and line["container"]["id"] == cid
                and line["container"]["state"] == state
            )

        seen = [wait_line(response, upsert_of("created"))]
        for action, state in (
            (docker_api.start, "running"),
            (docker_api.pause, "paused"),
            (docker_api.unpause, "running"),
            (lambda c: docker_api.kill(c), "exited"),
        ):
            action(cid)
            seen.append(wait_line(response, upsert_of(state)))
        docker_api.remove_container(cid)
        seen.append(wait_line(response, lambda line: line["type"] == "remove"))
        assert seen[-1]["id"] == cid
        revisions = [line["revision"] for line in seen]
        assert revisions == sorted(set(revisions))
        assert revisions[-1] == supervisor.get_json("/v1/status")["revision"]
    finally:
        conn.close()


def _apply(containers: dict[str, Any], line: dict[str, Any]) -> None:
    if line["type"] == "upsert":
        containers[line["container"]["id"]] = line["container"]
    elif line["type"] == "remove":
        containers.pop(line["id"], None)


def test_resume_with_since_gets_exactly_the_missed_deltas(
    supervisor: SupervisorProcess,
    docker_api: docker.APIClient,
    make_container: ContainerFactory,
    tag: str,
) -> None:
    """Reconnecting with since gives the deltas missed, in order, once each, as a live subscriber saw them."""
    settle(supervisor, docker_api)
    live_conn, live = supervisor.open_events()
    conn, response = supervisor.open_events()
    try:
        snapshot = next_line(response)
        assert next_line(live)["revision"] == snapshot["revision"]
        conn.close()  # disconnect, then change things

        a = make_container(name=f"hls-{tag}-a")
        b = make_container(name=f"hls-{tag}-b", start=False)
        docker_api.pause(a)
        docker_api.rename(b, f"hls-{tag}-b2")
        docker_api.remove_container(a, force=True)
        final = settle(supervisor, docker_api)
        assert final["revision"] > snapshot["revision"]

        missed_live: list[dict[str, Any]] = []
        while not missed_live or missed_live[-1]["revision"] < final["revision"]:
            line = next_line(live)
            if line["type"] in ("upsert", "remove"):
                missed_live.append(line)

        conn, response = supervisor.open_events(f"since={snapshot['revision']}")
        resumed: list[dict[str, Any]] = []
        while not resumed or resumed[-1]["revision"] < final["revision"]:
            line = next_line(response)
            assert line["type"] in ("upsert", "remove", "heartbeat"), line
            if line["type"] != "heartbeat":
                resumed.append(line)
        assert resumed == missed_live
        revisions = [line["revision"] for line in resumed]
        assert revisions == list(range(snapshot["revision"] + 1, final["revision"] + 1))
        state = {c["id"]: c for c in snapshot["containers"]}
        for line in resumed:
            _apply(state, line)
        assert state == {c["id"]: c for c in final["containers"]}
        assert a not in state and state[b]["name"] == f"hls-{tag}-b2"
    finally:
        conn.close()
        live_conn.close()


def test_resume_older_than_the_history_gets_a_snapshot(
    docker_host: str,
    docker_api: docker.APIClient,
    make_container: ContainerFactory,
    short_tmp: Path,
    tag: str,
) -> None:
    """With watch.history_size=2, a since from before seven changes gets a fresh snapshot."""
    with SupervisorProcess(
        docker_host,
        short_tmp / "api.sock",
        extra_env={"SUPERVISOR_WATCH_HISTORY_SIZE": "2"},
        metrics_listen="",
    ) as sup:
        old = sup.wait_synced()["revision"]
        cid = make_container(name=f"hls-{tag}-h")
        for n in range(6):  # renames: synchronous, unlike a quick pause/unpause on Docker 20.10
            docker_api.rename(cid, f"hls-{tag}-h{n}")
            settle(sup, docker_api)
        final = settle(sup, docker_api)
        # Coalescing may merge changes; at least 3 deltas still leave `old` out of a history of 2.
        assert final["revision"] - old >= 3
        conn, response = sup.open_events(f"since={old}")
        try:
            line = next_line(response)
            assert line["type"] == "snapshot"
            assert line["revision"] == final["revision"]
            assert line["containers"] == final["containers"]
        finally:
            conn.close()
        # Still inside the history: deltas.
        conn, response = sup.open_events(f"since={final['revision'] - 1}")
        try:
            line = next_line(response)
            assert (line["type"], line["revision"]) == ("upsert", final["revision"])
        finally:
            conn.close()


def test_last_known_state_is_served_stale_while_docker_is_away(
    private_dockerd: PrivateDockerd, make_container: ContainerFactory, short_tmp: Path
) -> None:
    """Docker stopped: the list is still served with stale=true, ready is 503, health stays 200."""
    with private_dockerd.api() as api:
        cid = make_container(name="hls-stale", api=api)
        with SupervisorProcess(
            private_dockerd.host, short_tmp / "api.sock", metrics_listen=""
        ) as sup:
            sup.wait_synced()
            before = settle(sup, api)
            conn, response = sup.open_events()
            try:
                next_line(response)  # snapshot
                private_dockerd.stop()
                sup.wait_for(lambda s: s["state"] != "connected")
                line = wait_line(response, lambda x: x["type"] == "connection")
                assert line["state"] != "connected"
            finally:
                conn.close()
            body = sup.get_json("/v1/containers")
            assert body["stale"] is True
            assert body["state"] in ("connecting", "backing_off")
            assert body["containers"] == before["containers"]
            assert sup.get_json(f"/v1/containers/{cid}")["stale"] is True
            status, _, raw = sup.request("GET", "/v1/ready")
            assert status == 503
            assert json.loads(raw)["error"]["kind"] in ("socket_missing", "connection_refused")
            assert sup.get_json("/v1/health")["status"] == "ok"
            private_dockerd.start()
            sup.wait_synced(timeout=30)
            assert sup.get_json("/v1/containers")["stale"] is False
