"""Container actions (start, stop, restart, remove, logs) under the operator's policy.

Theory of operation
-------------------
An action goes API → policy → gateway, and its effect comes back the normal way:
Docker emits events, the watcher inspects, the mirror changes. :class:`Actions`
runs one attempt through these steps, stopping at the first that fails:

1. **the caller**: the peer's uid or gid must be in ``actions.allowed_uids`` /
   ``allowed_gids`` when either is set (403);
2. **the action** must be listed in ``actions.allow`` (403; the default allows none);
3. **the container** is found in the mirror by id, name or id prefix (404, or 409
   for an ambiguous prefix): the existence of containers is only revealed to
   callers who may act at all;
4. **the selector**: every label of ``actions.selector_labels`` (``KEY`` or
   ``KEY=VALUE``) and, when set, one of ``actions.selector_compose_projects``; and
   never the supervisor's own container unless ``actions.allow_self`` (403);
5. **the connection**: Docker must be connected and the mirror synced, else 409 with
   the reason's ``kind``; nothing is queued for later;
6. **the call**, through a short-lived gateway session (as the stats sampler does,
   so the watcher's connection is never shared), within ``actions.timeout_seconds``
   (plus the action's own ``timeout`` for stop and restart), else 504. Docker's
   refusals keep their meaning: 404 (gone meanwhile), 409 (the container's state
   does not allow it, such as removing a running container without ``force``);
7. **the mirror**: the answer waits, bounded by ``actions.timeout_seconds``, for the
   mirror to show the change (a new ``started_at`` after start or restart, no longer
   running after stop, gone after remove), so the record in the answer is the one
   every other client sees. If Docker answered 304 (already running, already
   stopped) nothing changes and nothing is waited for.

Every attempt, whatever its result, ends in one audit log line (peer uid and pid,
action, container id and name, parameters, result, duration) and one increment of
``homelabarr_supervisor_actions_total{action,result}``.

The supervisor's own container
------------------------------
Found once, at start-up, by :func:`detect_own_container`, first match wins:

1. ``/proc/self/mountinfo``: Docker and Podman bind-mount the container's
   ``/etc/hostname``, ``/etc/hosts`` and ``/etc/resolv.conf`` from a directory named
   after the full container id (``.../containers/<id>/hostname``,
   ``.../overlay-containers/<id>/userdata/hostname``). This works with cgroup v2
   and a private cgroup namespace, today's default, where the cgroup path is ``/``.
2. ``/proc/self/cgroup``: a 64-hex id in the cgroup path (``/docker/<id>``,
   ``docker-<id>.scope``, ``libpod-<id>.scope``), as cgroup v1 and a host cgroup
   namespace show it.
3. ``$HOSTNAME``: Docker's default hostname is the first 12 characters of the id; a
   12-character hex hostname is taken as an id prefix.

When none applies (not in a container, or a custom hostname with a private cgroup
namespace and unusual mounts) no container counts as the supervisor's own; the
start-up log says which method, if any, found it.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar

import anyio
from loguru import logger
from prometheus_client import CollectorRegistry, Counter

from supervisor.broadcast import ChangeFeed
from supervisor.cache import Cache
from supervisor.gateway import ActionGateway, ActionSession, DockerCallError, LogStream
from supervisor.logs import LogDecoder, LogFormatError
from supervisor.records import ContainerRecord
from supervisor.settings import ACTION_NAMES, ActionsSettings
from supervisor.state import ConnectionMachine, DockerFailure, ErrorKind

__all__ = [
    "ACTION_NAMES",
    "RESULTS",
    "ActionError",
    "Actions",
    "Caller",
    "Outcome",
    "OwnContainer",
    "Policy",
    "detect_own_container",
    "own_container_from",
]

T = TypeVar("T")

#: Values of the ``result`` label of ``homelabarr_supervisor_actions_total``.
RESULTS: Final = (
    "ok",
    "refused",
    "not_found",
    "conflict",
    "not_connected",
    "timeout",
    "error",
    "bad_request",
    "cancelled",
)
_LOST_REMEDY: Final = (
    "check that Docker is running (systemctl status docker); the supervisor reconnects by"
    " itself, then look at the container before retrying"
)
#: Longest a session may take to close after an action.
_CLOSE_SECONDS: Final = 2.0
#: While following logs, how often the connection state is looked at without a change.
_FOLLOW_POLL_SECONDS: Final = 30.0


class Caller(Protocol):
    """The peer of an API request (``supervisor.api.Peer``)."""

    @property
    def pid(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...


class ActionError(Exception):
    """An attempt that failed; carries the HTTP status it becomes and its ``result`` label."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        result: str,
        detail: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.result = result
        self.detail: Mapping[str, object] = detail or {}


# -- the supervisor's own container ------------------------------------------------------

_FULL_ID: Final = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
_SHORT_ID: Final = re.compile(r"[0-9a-f]{12}")
_CONTAINER_FILES: Final = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")


@dataclass(frozen=True, slots=True)
class OwnContainer:
    """The supervisor's own container: a full id, or an id prefix from the hostname."""

    container_id: str | None = None
    prefix: str | None = None
    #: How it was found: ``mountinfo``, ``cgroup``, ``hostname``, or ``none``.
    method: str = "none"

    def matches(self, container_id: str) -> bool:
        if self.container_id is not None:
            return container_id == self.container_id
        return self.prefix is not None and container_id.startswith(self.prefix)


def own_container_from(cgroup: str, mountinfo: str, hostname: str) -> OwnContainer:
    """The supervisor's container as the given file contents show it (see the module docstring)."""
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] in _CONTAINER_FILES:
            found = _FULL_ID.findall(fields[3])
            if found:
                return OwnContainer(container_id=found[-1], method="mountinfo")
    for line in cgroup.splitlines():
        path = line.split(":", 2)[-1]
        found = _FULL_ID.findall(path)
        if found:
            return OwnContainer(container_id=found[-1], method="cgroup")
    if _SHORT_ID.fullmatch(hostname):
        return OwnContainer(prefix=hostname, method="hostname")
    return OwnContainer()


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def detect_own_container(environ: Mapping[str, str] | None = None) -> OwnContainer:
    """Look at this process's mounts, cgroups and hostname (see the module docstring)."""
    env = os.environ if environ is None else environ
    hostname = env.get("HOSTNAME") or socket.gethostname()
    return own_container_from(_read("/proc/self/cgroup"), _read("/proc/self/mountinfo"), hostname)


# -- the policy (pure) -----------------------------------------------------------------


def _selector(text: str) -> tuple[str, str | None]:
    key, sep, value = text.partition("=")
    return key, value if sep else None


class Policy:
    """Who may run which action on which container; each check returns a refusal or None."""

    def __init__(self, settings: ActionsSettings, own: OwnContainer) -> None:
        self.settings = settings
        self.own = own
        self._labels = [_selector(text) for text in settings.selector_labels]

    def refuse_caller(self, action: str, peer: Caller | None) -> str | None:
        """Why this peer may not run ``action`` (the message names the setting), or None."""
        s = self.settings
        restricted = bool(s.allowed_uids or s.allowed_gids)
        if restricted and not (
            peer is not None and (peer.uid in s.allowed_uids or peer.gid in s.allowed_gids)
        ):
            who = f"uid {peer.uid}, gid {peer.gid}" if peer else "an unidentified peer"
            return (
                f"{who} may not run actions: its uid must be in actions.allowed_uids"
                " or its gid in actions.allowed_gids"
            )
        if action not in s.allow:
            allowed = ", ".join(s.allow) if s.allow else "none"
            return (
                f"the action {action!r} is not allowed (allowed: {allowed}):"
                f' add "{action}" to actions.allow'
            )
        return None

    def refuse_container(self, record: ContainerRecord) -> str | None:
        """Why ``record`` is out of reach (the message names the setting), or None."""
        for key, value in self._labels:
            have = record.labels.get(key)
            if have is None or (value is not None and have != value):
                want = key if value is None else f"{key}={value}"
                return (
                    f"container {record.name} is outside the action selector: it lacks the"
                    f" label {want} (actions.selector_labels)"
                )
        projects = self.settings.selector_compose_projects
        if projects:
            project = record.compose.project if record.compose else None
            if project not in projects:
                return (
                    f"container {record.name} is outside the action selector: its compose"
                    f" project ({project or 'none'}) is not in actions.selector_compose_projects"
                )
        if not self.settings.allow_self and self.own.matches(record.id):
            return (
                f"container {record.name} is the supervisor's own container (found by"
                f" {self.own.method}): set actions.allow_self = true to act on it"
            )
        return None


# -- running actions -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """A done action: the container, and its record in the mirror afterwards."""

    action: str
    container_id: str
    name: str
    #: The mirror's record after the action (None once removed).
    record: ContainerRecord | None
    #: False when Docker said the container already was so (304): nothing was done.
    changed: bool
    #: Whether the mirror showed the change within ``actions.timeout_seconds``.
    settled: bool


@dataclass
class _Attempt:
    """One action attempt, for its audit line and its count."""

    action: str
    ref: str
    peer: Caller | None
    params: Mapping[str, object]
    started: float = field(default_factory=time.perf_counter)
    record: ContainerRecord | None = None


def _reflected(action: str, before: ContainerRecord, now: ContainerRecord | None) -> bool:
    """Whether the mirror shows the effect of a done ``action`` on ``before``."""
    if now is None:
        return True  # removed (by us or meanwhile): nothing more will come
    if action == "remove":
        return False
    if action == "stop":
        return now.state not in ("running", "restarting", "paused")
    return now.started_at != before.started_at  # start, restart: a new run


class Actions:
    """Runs action attempts for the API (see the module docstring)."""

    def __init__(
        self,
        *,
        settings: ActionsSettings,
        cache: Cache,
        machine: ConnectionMachine,
        feed: ChangeFeed,
        synced: Callable[[], bool],
        make_gateway: Callable[[], ActionGateway],
        registry: CollectorRegistry | None = None,
        own: OwnContainer | None = None,
    ) -> None:
        self.settings = settings
        self.own = detect_own_container() if own is None else own
        self.policy = Policy(settings, self.own)
        self._cache = cache
        self._machine = machine
        self._feed = feed
        self._synced = synced
        self._make_gateway = make_gateway
        self.attempts = Counter(
            "homelabarr_supervisor_actions",
            "Container action attempts through the API, by action and result.",
            labelnames=["action", "result"],
            registry=registry,
        )
        for action in ACTION_NAMES:
            for result in RESULTS:
                self.attempts.labels(action, result)

    def describe(self) -> str:
        """One line for the start-up log."""
        s = self.settings
        if not s.allow:
            return "actions: none allowed (actions.allow is empty)"
        parts = [f"actions allowed: {', '.join(s.allow)}"]
        if s.selector_labels:
            parts.append(f"labels {', '.join(s.selector_labels)}")
        if s.selector_compose_projects:
            parts.append(f"compose projects {', '.join(s.selector_compose_projects)}")
        if s.allowed_uids or s.allowed_gids:
            parts.append(f"uids {list(s.allowed_uids)} gids {list(s.allowed_gids)}")
        own = self.own
        parts.append(
            f"own container {own.container_id or own.prefix} (by {own.method})"
            if own.method != "none"
            else "own container: none found"
        )
        return "; ".join(parts)

    # -- entry points ------------------------------------------------------------------

    async def run(
        self,
        action: str,
        ref: str,
        peer: Caller | None,
        *,
        timeout_seconds: int | None = None,
        force: bool = False,
        volumes: bool = False,
    ) -> Outcome:
        """start, stop, restart or remove ``ref``; raises :class:`ActionError`."""
        wait = 10 if timeout_seconds is None else timeout_seconds
        params: dict[str, object] = {}
        if action in ("stop", "restart"):
            params["timeout"] = wait
        elif action == "remove":
            params.update(force=force, volumes=volumes)
        else:
            wait = 0
        attempt = _Attempt(action, ref, peer, params)
        try:
            record = self._admit(attempt)
            change = self._change(action, record.id, wait, force=force, volumes=volumes)
            changed = await self._call(attempt, record, change, float(wait))
            now, settled = await self._settle(action, record, changed)
        except BaseException as exc:
            self._finish(attempt, exc)
            raise
        outcome = Outcome(action, record.id, record.name, now, changed, settled)
        self._finish(attempt, None, note="" if changed else "already so")
        return outcome

    async def open_logs(
        self,
        ref: str,
        peer: Caller | None,
        *,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
        follow: bool = False,
    ) -> AsyncGenerator[bytes, None]:
        """The NDJSON lines of ``ref``'s logs, opened (errors raised) before this returns.

        The generator ends with Docker's stream (the end of the logs, or, with
        ``follow``, the container stopping), when the connection to Docker is lost,
        or when it is closed (the client left); it closes the Docker stream itself.
        """
        params: dict[str, object] = {
            "tail": tail,
            "since": since,
            "timestamps": timestamps,
            "follow": follow,
        }
        attempt = _Attempt("logs", ref, peer, params)
        try:
            record = self._admit(attempt)

            async def open_stream(session: ActionSession) -> tuple[ActionSession, LogStream, bool]:
                body = await session.inspect(record.id)
                if body is None:
                    raise DockerCallError(_gone(record.id), status=404)
                config = body.get("Config")
                tty = bool(config.get("Tty")) if isinstance(config, Mapping) else False
                stream = await session.open_logs(
                    record.id, follow=follow, tail=tail, since=since, timestamps=timestamps
                )
                return session, stream, tty

            session, stream, tty = await self._call(
                attempt, record, open_stream, 0.0, keep_session=True
            )
        except BaseException as exc:
            self._finish(attempt, exc)
            raise
        self._finish(attempt, None)
        lines = self._log_lines(
            session, stream, LogDecoder(framed=not tty, timestamps=timestamps), follow
        )
        try:
            await anext(lines)  # started: from here on its ``finally`` closes the stream
        except BaseException:
            with anyio.move_on_after(_CLOSE_SECONDS, shield=True):
                await stream.aclose()
                await session.aclose()
            raise
        return lines

    def reject(
        self, action: str, ref: str, peer: Caller | None, params: Mapping[str, object], why: str
    ) -> None:
        """Audit and count an attempt whose request was malformed (the API answers 400)."""
        attempt = _Attempt(action, ref, peer, params)
        self._finish(attempt, ActionError(400, "bad_request", why, result="bad_request"))

    # -- the steps ---------------------------------------------------------------------

    def _admit(self, attempt: _Attempt) -> ContainerRecord:
        """Steps 1-5 of the module docstring: the record to act on, or ActionError."""
        found = self._cache.find(attempt.ref)
        if len(found) == 1:
            attempt.record = found[0]  # for the audit line, whatever the outcome
        refusal = self.policy.refuse_caller(attempt.action, attempt.peer)
        if refusal:
            raise ActionError(403, "forbidden", refusal, result="refused")
        if not found:
            hint = "" if len(attempt.ref) >= 4 else " (an id prefix needs at least 4 characters)"
            raise ActionError(
                404,
                "not_found",
                f"no container with id, name or id prefix {attempt.ref!r}{hint}",
                result="not_found",
            )
        if len(found) > 1:
            raise ActionError(
                409,
                "ambiguous",
                f"{attempt.ref!r} is a prefix of {len(found)} container ids; give more characters",
                result="bad_request",
                detail={"matches": [{"id": r.id, "name": r.name} for r in found]},
            )
        record = found[0]
        refusal = self.policy.refuse_container(record)
        if refusal:
            raise ActionError(403, "forbidden", refusal, result="refused")
        self._require_connected()
        return record

    def _require_connected(self) -> None:
        machine = self._machine
        if machine.connected and self._synced():
            return
        state = machine.state.value
        error = machine.last_error
        if machine.connected:
            kind, why, remedy = "syncing", "the mirror is being synced", "retry in a moment"
        elif error is not None:
            kind, why, remedy = error.kind.value, error.message, error.remedy
        else:
            kind, why, remedy = state, "no connection yet", "retry in a moment"
        raise ActionError(
            409,
            "not_connected",
            f"Docker is {state} ({why}); nothing was done",
            result="not_connected",
            detail={"kind": kind, "state": state, "remedy": remedy},
        )

    @staticmethod
    def _change(
        action: str, container_id: str, wait: int, *, force: bool, volumes: bool
    ) -> Callable[[ActionSession], Awaitable[bool]]:
        if action == "start":
            return lambda session: session.start(container_id)
        if action == "stop":
            return lambda session: session.stop(container_id, wait)
        if action == "restart":
            return lambda session: session.restart(container_id, wait)
        if action == "remove":
            return lambda session: session.remove(container_id, force=force, volumes=volumes)
        raise ValueError(f"unknown action {action!r}")

    async def _call(
        self,
        attempt: _Attempt,
        record: ContainerRecord,
        call: Callable[[ActionSession], Awaitable[T]],
        extra_seconds: float,
        *,
        keep_session: bool = False,
    ) -> T:
        """``call`` on a fresh session within the deadline; Docker's failures as ActionError.

        With ``keep_session`` the session stays open once ``call`` succeeded: ``call``
        hands it on to whoever closes it (the log stream).
        """
        limit = self.settings.timeout_seconds + extra_seconds
        session: ActionSession | None = None
        done = False
        try:
            with anyio.fail_after(limit):
                session = await self._make_gateway().open_session()
                result = await call(session)
            done = True
            return result
        except TimeoutError:
            raise ActionError(
                504,
                "timeout",
                f"Docker did not answer within {limit:g} s (actions.timeout_seconds)"
                + _may_still_happen(attempt.action),
                result="timeout",
                detail={"kind": "timeout"},
            ) from None
        except DockerCallError as exc:
            raise self._docker_error(attempt, record, exc) from None
        finally:
            if session is not None and not (done and keep_session):
                with anyio.move_on_after(_CLOSE_SECONDS, shield=True):
                    await session.aclose()

    def _docker_error(
        self, attempt: _Attempt, record: ContainerRecord, exc: DockerCallError
    ) -> ActionError:
        failure = exc.failure
        what = f"Docker refused to {attempt.action} {record.name}"
        if exc.status == 404:
            return ActionError(404, "not_found", f"{what}: it no longer exists", result="not_found")
        if exc.status == 409:
            return ActionError(
                409,
                "conflict",
                f"{what}: {exc.explanation or failure.message}",
                result="conflict",
                detail={"kind": "container_state", "container_state": record.state},
            )
        if exc.status is not None:
            remedy = failure.remedy
            if failure.kind is ErrorKind.FORBIDDEN:
                remedy = (
                    "a socket proxy refused the call: actions need CONTAINERS=1 and POST=1 on it,"
                    f" or remove {attempt.action!r} from actions.allow"
                )
            return ActionError(
                502,
                "docker_error",
                f"{what}: {exc.explanation or failure.message} (HTTP {exc.status})",
                result="error",
                detail={"kind": failure.kind.value, "remedy": remedy},
            )
        if failure.kind is ErrorKind.TIMEOUT:
            return ActionError(
                504,
                "timeout",
                f"Docker did not answer in time ({failure.message})"
                + _may_still_happen(attempt.action),
                result="timeout",
                detail={"kind": "timeout"},
            )
        # No answer at all: Docker went away (or the connection broke) mid-call.
        if failure.kind is ErrorKind.API_ERROR:
            kind, remedy = "connection_lost", _LOST_REMEDY
            message = (
                f"the connection to Docker broke during the {attempt.action} ({failure.message})"
                + _may_still_happen(attempt.action)
            )
        else:
            kind, remedy = failure.kind.value, failure.remedy
            message = f"Docker is not reachable: {failure.message}; nothing was done"
        return ActionError(
            409,
            "not_connected",
            message,
            result="not_connected",
            detail={"kind": kind, "state": self._machine.state.value, "remedy": remedy},
        )

    async def _settle(
        self, action: str, before: ContainerRecord, changed: bool
    ) -> tuple[ContainerRecord | None, bool]:
        """Wait (bounded) until the mirror shows the action's effect; (record, shown)."""
        if not changed:
            return self._cache.get(before.id), True
        deadline = time.monotonic() + self.settings.timeout_seconds
        while True:
            now = self._cache.get(before.id)
            if _reflected(action, before, now):
                return now, True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._machine.connected:
                return now, False
            await self._feed.wait(remaining)

    async def _log_lines(
        self, session: ActionSession, stream: LogStream, decoder: LogDecoder, follow: bool
    ) -> AsyncGenerator[bytes, None]:
        try:
            yield b""  # primed by open_logs, never seen by the API
            while True:
                chunk = await (self._next_or_lost(stream) if follow else stream.next())
                if chunk is None:
                    break
                lines = decoder.feed(chunk)
                if lines:
                    yield b"".join(line.to_json() for line in lines)
            rest = decoder.close()
            if rest:
                yield b"".join(line.to_json() for line in rest)
        except DockerCallError as exc:
            logger.debug("log stream ended: {}", exc.failure.message)
        except LogFormatError as exc:
            logger.warning("log stream ended: {}", exc)
        finally:
            with anyio.move_on_after(_CLOSE_SECONDS, shield=True):
                await stream.aclose()
                await session.aclose()

    async def _next_or_lost(self, stream: LogStream) -> bytes | None:
        """The next chunk, or None as soon as the connection to Docker is lost."""
        got: list[bytes | None] = []
        failed: list[DockerCallError] = []
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                try:
                    got.append(await stream.next())
                except DockerCallError as exc:
                    failed.append(exc)
                tg.cancel_scope.cancel()

            async def watch() -> None:
                while self._machine.connected:
                    await self._feed.wait(_FOLLOW_POLL_SECONDS)
                tg.cancel_scope.cancel()

            tg.start_soon(read)
            tg.start_soon(watch)
        if failed:
            raise failed[0]
        return got[0] if got else None

    # -- the audit line ------------------------------------------------------------------

    def _finish(self, attempt: _Attempt, exc: BaseException | None, *, note: str = "") -> None:
        seconds = time.perf_counter() - attempt.started
        if exc is None:
            result, status, reason = "ok", 200, note
        elif isinstance(exc, ActionError):
            result, status, reason = exc.result, exc.status, exc.message
        elif isinstance(exc, anyio.get_cancelled_exc_class()):
            result, status, reason = "cancelled", 0, "cancelled (shutdown)"
        else:
            result, status, reason = "error", 500, repr(exc)
        self.attempts.labels(attempt.action, result).inc()
        peer, record = attempt.peer, attempt.record
        fields = {
            "audit": "action",
            "action": attempt.action,
            "result": result,
            "status": status,
            "peer_uid": peer.uid if peer else None,
            "peer_pid": peer.pid if peer else None,
            "container_id": record.id if record else None,
            "container_name": record.name if record else None,
            "ref": attempt.ref,
            "params": dict(attempt.params),
            "duration_seconds": round(seconds, 6),
            "reason": reason,
        }
        params = " ".join(f"{k}={_show(v)}" for k, v in attempt.params.items()) or "-"
        target = f"{record.name} ({record.id[:12]})" if record else repr(attempt.ref)
        logger.bind(**fields).log(
            "INFO" if result == "ok" else "WARNING",
            "audit: {} {} by uid {} pid {} [{}]: {} {} in {:.3f} s{}",
            attempt.action,
            target,
            fields["peer_uid"] if peer else "?",
            fields["peer_pid"] if peer else "?",
            params,
            result,
            status,
            seconds,
            f" ({reason})" if reason else "",
        )


def _may_still_happen(action: str) -> str:
    return "" if action == "logs" else f"; the {action} may still happen"


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return "-" if value is None else str(value)


def _gone(container_id: str) -> DockerFailure:
    return DockerFailure(
        ErrorKind.API_ERROR, f"no such container {container_id[:12]}", "", time.time()
    )
