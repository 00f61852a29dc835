"""Docker JSON in, immutable container records and event meanings out. Pure.

Two translations live here and nowhere else:

* :func:`record_from_inspect` turns the body of ``GET /containers/{id}/json``
  into a :class:`ContainerRecord`, the unit the mirror stores and serves;
* :func:`parse_event` turns one object of ``GET /events`` into an
  :class:`Event`: which container, which normalised verb, and what it means
  for the mirror (:class:`Effect`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

__all__ = [
    "CONTAINER_STATES",
    "HEALTH_STATES",
    "KNOWN_ACTIONS",
    "Compose",
    "ContainerRecord",
    "Effect",
    "Event",
    "MalformedEvent",
    "Port",
    "parse_event",
    "parse_rfc3339",
    "record_from_inspect",
    "rfc3339",
]

CONTAINER_STATES = ("created", "running", "paused", "restarting", "removing", "exited", "dead")
HEALTH_STATES = ("starting", "healthy", "unhealthy")


class Effect(enum.Enum):
    INSPECT = "inspect"  # the container may have changed: look again
    REMOVE = "remove"  # the container is gone: drop it without asking
    NONE = "none"  # nothing the mirror shows changes (exec, attach, ...)


#: Every container action Docker documents, with its effect on the mirror.
#: An action outside this table is counted as ``other`` and inspected, to be safe.
KNOWN_ACTIONS: Mapping[str, Effect] = MappingProxyType(
    {
        "create": Effect.INSPECT,
        "start": Effect.INSPECT,
        "restart": Effect.INSPECT,
        # A signal changes nothing by itself: if the container ends, `die` follows;
        # `stop` comes after that `die`. Looking again would only cost an inspect.
        "stop": Effect.NONE,
        "kill": Effect.NONE,
        "die": Effect.INSPECT,
        "oom": Effect.INSPECT,
        "pause": Effect.INSPECT,
        "unpause": Effect.INSPECT,
        "rename": Effect.INSPECT,
        "update": Effect.INSPECT,
        "health_status": Effect.INSPECT,
        "destroy": Effect.REMOVE,
        "attach": Effect.NONE,
        "detach": Effect.NONE,
        "commit": Effect.NONE,
        "copy": Effect.NONE,
        "archive-path": Effect.NONE,
        "extract-to-dir": Effect.NONE,
        "export": Effect.NONE,
        "exec_create": Effect.NONE,
        "exec_start": Effect.NONE,
        "exec_die": Effect.NONE,
        "exec_detach": Effect.NONE,
        "resize": Effect.NONE,
        "top": Effect.NONE,
        "prune": Effect.NONE,
        "mount": Effect.NONE,
        "unmount": Effect.NONE,
    }
)


# -- time ----------------------------------------------------------------------------

_ZERO_TIME_PREFIX = "0001-01-01"
_FRACTION = re.compile(r"\.(\d+)")


def parse_rfc3339(value: str) -> float:
    """Seconds since the epoch for an RFC 3339 time as Docker writes it (nanoseconds allowed)."""
    # Python parses at most microseconds: cut the fraction to six digits.
    text = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), value, count=1)
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def rfc3339(seconds: float) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2026-12-04T15:57:39.123456Z``."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _docker_time(value: object) -> str | None:
    """Docker's time string normalised to UTC ``Z`` form, or None for its zero time."""
    if not isinstance(value, str) or not value or value.startswith(_ZERO_TIME_PREFIX):
        return None
    if value.endswith("Z"):
        return value
    try:
        return rfc3339(parse_rfc3339(value))
    except ValueError:
        return None


# -- records -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Port:
    container_port: int
    protocol: str
    host_ip: str | None
    host_port: int | None

    def to_json(self) -> dict[str, object]:
        return {
            "container_port": self.container_port,
            "protocol": self.protocol,
            "host_ip": self.host_ip,
            "host_port": self.host_port,
        }


@dataclass(frozen=True, slots=True)
class Compose:
    project: str
    service: str | None

    def to_json(self) -> dict[str, object]:
        return {"project": self.project, "service": self.service}


@dataclass(frozen=True, slots=True)
class ContainerRecord:
    """What the mirror knows of one container. Immutable; compared by value."""

    id: str
    name: str
    image: str
    image_id: str
    state: str
    health: str | None
    exit_code: int | None
    created: str | None
    started_at: str | None
    finished_at: str | None
    restart_count: int
    oom_killed: bool
    labels: Mapping[str, str]
    ports: tuple[Port, ...]
    networks: tuple[str, ...]
    compose: Compose | None

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "image": self.image,
            "image_id": self.image_id,
            "state": self.state,
            "health": self.health,
            "exit_code": self.exit_code,
            "created": self.created,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "restart_count": self.restart_count,
            "oom_killed": self.oom_killed,
            "labels": dict(self.labels),
            "ports": [port.to_json() for port in self.ports],
            "networks": list(self.networks),
            "compose": self.compose.to_json() if self.compose else None,
        }

    @property
    def running(self) -> bool:
        return self.state == "running"


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _ports(data: Mapping[str, Any], running: bool) -> tuple[Port, ...]:
    """Published ports: live bindings while running, configured ones otherwise.

    A stopped container has no live bindings, but the backend's port checks must
    still see which host ports it claims, so fall back to ``HostConfig.PortBindings``
    and the image's exposed ports.
    """
    live = _mapping(_mapping(data.get("NetworkSettings")).get("Ports"))
    configured = _mapping(_mapping(data.get("HostConfig")).get("PortBindings"))
    exposed = _mapping(_mapping(data.get("Config")).get("ExposedPorts"))
    source: Mapping[str, Any] = live if running and live else configured
    keys = set(source) | set(exposed) | (set(live) if running else set())
    ports: set[Port] = set()
    for key in keys:
        number, _, protocol = str(key).partition("/")
        container_port = _int_or_none(number)
        if container_port is None:
            continue
        bindings = source.get(key)
        if isinstance(bindings, list) and bindings:
            for binding in bindings:
                binding = _mapping(binding)
                host_ip = binding.get("HostIp") or None
                ports.add(
                    Port(
                        container_port,
                        protocol or "tcp",
                        host_ip if isinstance(host_ip, str) else None,
                        _int_or_none(binding.get("HostPort")),
                    )
                )
        else:
            ports.add(Port(container_port, protocol or "tcp", None, None))
    return tuple(
        sorted(
            ports,
            key=lambda p: (p.container_port, p.protocol, p.host_ip or "", p.host_port or 0),
        )
    )


def record_from_inspect(data: Mapping[str, Any]) -> ContainerRecord:
    """Build a record from ``docker inspect`` JSON.

    Raises ``ValueError`` when the body lacks an id: anything else missing takes a
    neutral value, since Docker versions differ in what they fill in.
    """
    container_id = data.get("Id")
    if not isinstance(container_id, str) or not container_id:
        raise ValueError("inspect result without an Id")
    state = _mapping(data.get("State"))
    config = _mapping(data.get("Config"))
    status = state.get("Status")
    if status not in CONTAINER_STATES:
        status = "dead" if state.get("Dead") else "running" if state.get("Running") else "exited"
    health = _mapping(state.get("Health")).get("Status")
    raw_labels = _mapping(config.get("Labels"))
    labels = MappingProxyType({str(k): str(v) for k, v in sorted(raw_labels.items())})
    project = labels.get("com.docker.compose.project")
    name = data.get("Name")
    networks = _mapping(_mapping(data.get("NetworkSettings")).get("Networks"))
    return ContainerRecord(
        id=container_id,
        name=name.lstrip("/") if isinstance(name, str) else "",
        image=str(config.get("Image") or data.get("Image") or ""),
        image_id=str(data.get("Image") or ""),
        state=str(status),
        health=health if health in HEALTH_STATES else None,
        exit_code=_int_or_none(state.get("ExitCode")),
        created=_docker_time(data.get("Created")),
        started_at=_docker_time(state.get("StartedAt")),
        finished_at=_docker_time(state.get("FinishedAt")),
        restart_count=_int_or_none(data.get("RestartCount")) or 0,
        oom_killed=bool(state.get("OOMKilled")),
        labels=labels,
        ports=_ports(data, status == "running"),
        networks=tuple(sorted(str(n) for n in networks)),
        compose=Compose(project, labels.get("com.docker.compose.service")) if project else None,
    )


# -- events --------------------------------------------------------------------------


class MalformedEvent(ValueError):
    """An object on the event stream that is not a usable container event."""


@dataclass(frozen=True, slots=True)
class Event:
    container_id: str
    action: str  # normalised verb: "health_status", not "health_status: healthy"
    effect: Effect
    time: float | None  # seconds since the epoch, from timeNano when present

    @property
    def known(self) -> bool:
        return self.action in KNOWN_ACTIONS


def normalise_action(action: str) -> str:
    """``exec_start: sh -c ...`` → ``exec_start``; ``health_status: healthy`` → ``health_status``."""
    return action.split(":", 1)[0].strip()


def parse_event(data: object) -> Event | None:
    """The meaning of one event, None for a non-container event, or MalformedEvent."""
    if not isinstance(data, Mapping):
        raise MalformedEvent(f"event is not an object: {data!r:.200}")
    event_type = data.get("Type")
    if event_type is not None and event_type != "container":
        return None
    action = data.get("Action", data.get("status"))
    actor = _mapping(data.get("Actor"))
    container_id = actor.get("ID", data.get("id"))
    if not isinstance(action, str) or not action:
        raise MalformedEvent(f"container event without an action: {data!r:.200}")
    if not isinstance(container_id, str) or not container_id:
        raise MalformedEvent(f"container event without an id: {data!r:.200}")
    verb = normalise_action(action)
    time_nano = data.get("timeNano")
    time_s = data.get("time")
    when: float | None
    if isinstance(time_nano, int) and not isinstance(time_nano, bool):
        when = time_nano / 1e9
    elif isinstance(time_s, int | float) and not isinstance(time_s, bool):
        when = float(time_s)
    else:
        when = None
    return Event(container_id, verb, KNOWN_ACTIONS.get(verb, Effect.INSPECT), when)
