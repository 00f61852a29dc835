"""Docker JSON → container records and event meanings: pure, from hand-written fixtures.

The bodies below follow what Docker 20.10 (API 1.41) returns; the Docker tests
compare records built from the engine's own inspect output.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from supervisor.records import (
    CONTAINER_STATES,
    KNOWN_ACTIONS,
    Compose,
    Effect,
    MalformedEvent,
    Port,
    normalise_action,
    parse_event,
    parse_rfc3339,
    record_from_inspect,
    rfc3339,
)
from tests.fakes import inspect_body

CID = "4f0c6b8e1d2a" + "0" * 52

RUNNING_WEB: dict[str, Any] = {
    "Id": CID,
    "Created": "2026-12-04T15:57:39.123456789Z",
    "Path": "/bin/httpd",
    "Args": ["-f", "-p", "80"],
    "State": {
        "Status": "running",
        "Running": True,
        "Paused": False,
        "Restarting": False,
        "OOMKilled": False,
        "Dead": False,
        "Pid": 31337,
        "ExitCode": 0,
        "Error": "",
        "StartedAt": "2026-12-04T15:57:40.5Z",
        "FinishedAt": "0001-01-01T00:00:00Z",
        "Health": {
            "Status": "healthy",
            "FailingStreak": 0,
            "Log": [{"Start": "2026-12-04T15:57:41Z", "ExitCode": 0, "Output": ""}],
        },
    },
    "Image": "sha256:" + "1" * 64,
    "Name": "/media_web_1",
    "RestartCount": 3,
    "HostConfig": {
        "NetworkMode": "media_default",
        "PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]},
        "RestartPolicy": {"Name": "unless-stopped", "MaximumRetryCount": 0},
    },
    "Config": {
        "Image": "nginx:1.27",
        "Labels": {
            "com.docker.compose.project": "media",
            "com.docker.compose.service": "web",
            "org.opencontainers.image.title": "nginx",
        },
        "ExposedPorts": {"80/tcp": {}, "443/tcp": {}},
    },
    "NetworkSettings": {
        "Ports": {
            "80/tcp": [
                {"HostIp": "0.0.0.0", "HostPort": "8080"},
                {"HostIp": "::", "HostPort": "8080"},
            ],
            "443/tcp": None,
        },
        "Networks": {"media_default": {}, "backend": {}},
    },
}


def test_running_compose_container_record() -> None:
    """Every field of a running, healthy, published compose container."""
    r = record_from_inspect(RUNNING_WEB)
    assert r.id == CID
    assert r.name == "media_web_1"
    assert r.image == "nginx:1.27"
    assert r.image_id == "sha256:" + "1" * 64
    assert (r.state, r.health, r.exit_code) == ("running", "healthy", 0)
    assert r.created == "2026-12-04T15:57:39.123456789Z"
    assert r.started_at == "2026-12-04T15:57:40.5Z"
    assert r.finished_at is None  # Docker's zero time
    assert (r.restart_count, r.oom_killed) == (3, False)
    assert dict(r.labels) == RUNNING_WEB["Config"]["Labels"]
    assert r.ports == (
        Port(80, "tcp", "0.0.0.0", 8080),
        Port(80, "tcp", "::", 8080),
        Port(443, "tcp", None, None),
    )
    assert r.networks == ("backend", "media_default")
    assert r.compose == Compose("media", "web")
    assert r.running


def test_record_json_has_exactly_the_documented_fields() -> None:
    """to_json carries the issue's field list and is plain JSON."""
    body: dict[str, Any] = record_from_inspect(RUNNING_WEB).to_json()
    assert set(body) == {
        "id", "name", "image", "image_id", "state", "health", "exit_code", "created",
        "started_at", "finished_at", "restart_count", "oom_killed", "labels", "ports",
        "networks", "compose",
    }  # fmt: skip
    assert json.loads(json.dumps(body)) == body
    assert body["ports"][0] == {
        "container_port": 80,
        "protocol": "tcp",
        "host_ip": "0.0.0.0",
        "host_port": 8080,
    }
    assert body["compose"] == {"project": "media", "service": "web"}


def test_stopped_container_keeps_its_configured_ports() -> None:
    """An exited container has no live bindings; its PortBindings and exposed ports still show."""
    body = json.loads(json.dumps(RUNNING_WEB))
    body["State"].update(
        Status="exited",
        Running=False,
        Pid=0,
        ExitCode=137,
        OOMKilled=True,
        FinishedAt="2026-12-04T16:00:00.000000001Z",
    )
    del body["State"]["Health"]
    body["NetworkSettings"]["Ports"] = {}
    r = record_from_inspect(body)
    assert (r.state, r.exit_code, r.oom_killed, r.health) == ("exited", 137, True, None)
    assert r.finished_at == "2026-12-04T16:00:00.000000001Z"
    assert r.ports == (Port(80, "tcp", None, 8080), Port(443, "tcp", None, None))
    assert not r.running


def test_created_container_has_no_times_and_no_compose() -> None:
    """A created container: zero StartedAt/FinishedAt are null, no compose labels → null."""
    r = record_from_inspect(inspect_body(CID, "plain", labels={"a": "b"}))
    assert (r.state, r.started_at, r.finished_at) == ("created", None, None)
    assert r.compose is None
    assert dict(r.labels) == {"a": "b"}
    assert r.networks == ("none",)
    assert r.ports == ()


def test_health_starting_and_unhealthy_and_none() -> None:
    """Health states pass through; Docker's 'none' (no healthcheck) becomes null."""
    for status, expected in [("starting", "starting"), ("unhealthy", "unhealthy"), ("none", None)]:
        body = inspect_body(CID, "h", status="running", health=status)
        assert record_from_inspect(body).health == expected


@pytest.mark.parametrize("status", CONTAINER_STATES)
def test_every_docker_state_is_kept(status: str) -> None:
    """Each of Docker's seven container states is stored as is."""
    assert record_from_inspect(inspect_body(CID, "s", status=status)).state == status


def test_unknown_status_falls_back_on_the_flags() -> None:
    """A Status Docker does not document is derived from Running/Dead instead."""
    body = inspect_body(CID, "x", status="running")
    body["State"]["Status"] = "weird"
    assert record_from_inspect(body).state == "running"
    body["State"].update(Running=False, Dead=True)
    assert record_from_inspect(body).state == "dead"
    del body["State"]
    assert record_from_inspect(body).state == "exited"


def test_sparse_body_takes_neutral_values() -> None:
    """A body with only an Id still gives a record (older engines fill in less)."""
    r = record_from_inspect({"Id": CID})
    assert (r.name, r.image, r.image_id, r.state, r.health) == ("", "", "", "exited", None)
    assert (r.exit_code, r.created, r.restart_count, r.labels, r.ports) == (None, None, 0, {}, ())


@pytest.mark.parametrize("body", [{}, {"Id": ""}, {"Id": 5}, {"Name": "/x"}])
def test_body_without_an_id_is_refused(body: dict[str, Any]) -> None:
    """No usable Id: ValueError, which the watcher counts as malformed."""
    with pytest.raises(ValueError, match="Id"):
        record_from_inspect(body)


def test_records_compare_by_value() -> None:
    """Two inspects of an unchanged container give equal records (no spurious deltas)."""
    assert record_from_inspect(RUNNING_WEB) == record_from_inspect(
        json.loads(json.dumps(RUNNING_WEB))
    )
    changed = json.loads(json.dumps(RUNNING_WEB))
    changed["State"]["StartedAt"] = "2026-12-04T15:58:00Z"
    assert record_from_inspect(RUNNING_WEB) != record_from_inspect(changed)


def test_times_with_an_offset_become_utc() -> None:
    """A non-UTC RFC 3339 time is converted to UTC Z form."""
    body = inspect_body(CID, "t", status="exited", finished_at="2026-12-04T17:00:00.25+02:00")
    assert record_from_inspect(body).finished_at == "2026-12-04T15:00:00.250000Z"
    body["State"]["FinishedAt"] = "not a time"
    assert record_from_inspect(body).finished_at is None


def test_rfc3339_round_trip_and_nanoseconds() -> None:
    """parse_rfc3339 accepts Docker's nanoseconds; rfc3339 writes microseconds with Z."""
    assert parse_rfc3339("2026-12-04T15:57:39.123456789Z") == pytest.approx(
        parse_rfc3339("2026-12-04T15:57:39.123456Z")
    )
    assert rfc3339(parse_rfc3339("2026-12-04T15:57:39Z")) == "2026-12-04T15:57:39.000000Z"
    assert parse_rfc3339("2026-12-04T15:57:39.5") == parse_rfc3339("2026-12-04T15:57:39.5Z")


# -- events ----------------------------------------------------------------------------


def event(action: str, **extra: Any) -> dict[str, Any]:
    return {
        "status": action,
        "id": CID,
        "from": "nginx:1.27",
        "Type": "container",
        "Action": action,
        "Actor": {"ID": CID, "Attributes": {"name": "web"}},
        "scope": "local",
        "time": 1_796_000_000,
        "timeNano": 1_796_000_000_123_456_789,
        **extra,
    }


@pytest.mark.parametrize(
    ("action", "verb", "effect"),
    [
        ("create", "create", Effect.INSPECT),
        ("start", "start", Effect.INSPECT),
        ("die", "die", Effect.INSPECT),
        ("health_status: healthy", "health_status", Effect.INSPECT),
        ("health_status: unhealthy", "health_status", Effect.INSPECT),
        ("exec_start: sh -c 'echo a: b'", "exec_start", Effect.NONE),
        ("exec_create: /bin/true", "exec_create", Effect.NONE),
        ("exec_die", "exec_die", Effect.NONE),
        ("destroy", "destroy", Effect.REMOVE),
        ("rename", "rename", Effect.INSPECT),
        ("update", "update", Effect.INSPECT),
    ],
)
def test_actions_normalise_to_their_verb(action: str, verb: str, effect: Effect) -> None:
    """Actions with arguments are counted by verb; each verb has its effect on the mirror."""
    parsed = parse_event(event(action))
    assert parsed is not None
    assert (parsed.container_id, parsed.action, parsed.effect, parsed.known) == (
        CID,
        verb,
        effect,
        True,
    )
    assert parsed.time == pytest.approx(1_796_000_000.123456789)


def test_unknown_action_is_inspected_to_be_safe() -> None:
    """A verb Docker may add later is not known, and its container is looked at again."""
    parsed = parse_event(event("teleport: far"))
    assert parsed is not None
    assert (parsed.action, parsed.known, parsed.effect) == ("teleport", False, Effect.INSPECT)


def test_old_format_event_and_second_resolution_time() -> None:
    """An event with only status/id/time (old engines) still parses."""
    parsed = parse_event({"status": "stop", "id": CID, "time": 1_796_000_001})
    assert parsed is not None
    assert (parsed.container_id, parsed.action, parsed.time) == (CID, "stop", 1_796_000_001.0)
    assert parse_event({"status": "start", "id": CID}).time is None  # type: ignore[union-attr]


def test_non_container_events_are_ignored() -> None:
    """Network, image and volume events mean nothing to the container mirror."""
    for kind in ("network", "image", "volume", "daemon"):
        assert parse_event(event("connect", Type=kind)) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        "a string",
        None,
        42,
        ["list"],
        {"Type": "container", "Actor": {"ID": CID}},
        {"Type": "container", "Action": "", "Actor": {"ID": CID}},
        {"Type": "container", "Action": 7, "Actor": {"ID": CID}},
        {"Type": "container", "Action": "start", "Actor": {}},
        {"Type": "container", "Action": "start", "Actor": {"ID": 12}},
        {"Type": "container", "Action": "start", "Actor": "not a mapping"},
    ],
)
def test_malformed_events_raise_malformed_event(raw: object) -> None:
    """Anything that is not a usable container event raises MalformedEvent (never crashes)."""
    with pytest.raises(MalformedEvent):
        parse_event(raw)


def test_known_actions_cover_what_docker_documents() -> None:
    """Docker's container actions are all in the table; only destroy removes."""
    documented = {
        "attach", "commit", "copy", "create", "destroy", "detach", "die", "exec_create",
        "exec_detach", "exec_die", "exec_start", "export", "health_status", "kill", "oom",
        "pause", "rename", "resize", "restart", "start", "stop", "top", "unpause", "update",
    }  # fmt: skip
    assert documented <= set(KNOWN_ACTIONS)
    assert [a for a, e in KNOWN_ACTIONS.items() if e is Effect.REMOVE] == ["destroy"]
    assert normalise_action("  health_status : healthy") == "health_status"
