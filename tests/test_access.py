"""Docker socket access: endpoint discovery, remedies, doctor, least privilege, socket proxies."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import docker
import pytest
from anyio.abc import SocketStream

from supervisor.access import (
    Endpoint,
    ProcessFacts,
    SocketFacts,
    proxy_permission,
    remedy,
    resolve_endpoint,
)
from supervisor.api import ApiApp, Peer, Request, StreamResponse
from supervisor.daemon import Runtime, build_runtime
from supervisor.settings import DockerSettings, load_settings
from supervisor.state import ConnectionState, ErrorKind

# -- endpoint discovery (pure) -------------------------------------------------------


def test_configured_host_wins_over_auto_detection() -> None:
    """A configured unix:// host is used as is, with its socket path."""
    endpoint = resolve_endpoint(
        DockerSettings(host="unix:///srv/d.sock"), {}, exists=lambda p: True
    )
    assert endpoint == Endpoint("unix:///srv/d.sock", "/srv/d.sock")


def test_tcp_host_has_no_socket_to_watch() -> None:
    """A tcp:// endpoint (a socket proxy) is used without a socket path."""
    endpoint = resolve_endpoint(DockerSettings(host="tcp://socket-proxy:2375"), {})
    assert endpoint.url == "tcp://socket-proxy:2375"
    assert endpoint.socket_path is None
    assert endpoint.watch_paths == ()


def test_auto_detection_takes_the_first_candidate_that_exists() -> None:
    """Rootless Docker's socket is found under $XDG_RUNTIME_DIR when /var/run has none."""
    present = {"/run/user/1000/docker.sock", "/run/podman/podman.sock"}
    endpoint = resolve_endpoint(
        DockerSettings(), {"XDG_RUNTIME_DIR": "/run/user/1000"}, exists=present.__contains__
    )
    assert endpoint == Endpoint(
        "unix:///run/user/1000/docker.sock", "/run/user/1000/docker.sock", True
    )


def test_auto_detection_order_podman_then_desktop() -> None:
    """Without XDG_RUNTIME_DIR, Podman's socket comes before Docker Desktop's."""
    present = {"/run/podman/podman.sock", "/home/u/.docker/run/docker.sock"}
    endpoint = resolve_endpoint(DockerSettings(), {"HOME": "/home/u"}, exists=present.__contains__)
    assert endpoint.socket_path == "/run/podman/podman.sock"
    endpoint = resolve_endpoint(
        DockerSettings(),
        {"HOME": "/home/u"},
        exists={"/home/u/.docker/run/docker.sock"}.__contains__,
    )
    assert endpoint.socket_path == "/home/u/.docker/run/docker.sock"


def test_auto_detection_without_any_socket_watches_the_first_candidate() -> None:
    """Nothing exists yet: the first candidate is used, so its appearance is noticed."""
    endpoint = resolve_endpoint(DockerSettings(), {}, exists=lambda p: False)
    assert endpoint.socket_path == "/var/run/docker.sock"
    assert endpoint.detected


def test_endpoint_precedence_flag_env_file(tmp_path: Path) -> None:
    """--docker-host > SUPERVISOR_DOCKER_HOST > DOCKER_HOST > docker.host in the file."""
    config = tmp_path / "s.toml"
    config.write_text('[docker]\nhost = "unix:///file.sock"\n')
    env = {"DOCKER_HOST": "unix:///docker-host.sock"}
    assert load_settings(config_path=str(config), environ={}).docker.host == "unix:///file.sock"
    assert (
        load_settings(config_path=str(config), environ=env).docker.host
        == "unix:///docker-host.sock"
    )
    env["SUPERVISOR_DOCKER_HOST"] = "unix:///supervisor.sock"
    assert (
        load_settings(config_path=str(config), environ=env).docker.host == "unix:///supervisor.sock"
    )
    flagged = load_settings(
        config_path=str(config), environ=env, flags={"docker.host": "tcp://p:2375"}
    )
    assert flagged.docker.host == "tcp://p:2375"


# -- remedies (pure) -----------------------------------------------------------------

SOCK = Endpoint("unix:///var/run/docker.sock", "/var/run/docker.sock")


def test_permission_remedy_names_the_socket_gid() -> None:
    """EACCES: the remedy gives the socket's numeric GID for group_add and --group-add."""
    sock = SocketFacts("/var/run/docker.sock", True, True, 0, 998, 0o660, "root", "docker")
    proc = ProcessFacts(1000, 1000, (1000,))
    text = remedy(ErrorKind.PERMISSION_DENIED, SOCK, sock=sock, proc=proc)
    assert 'group_add: ["998"]' in text
    assert "--group-add 998" in text
    assert "uid 1000" in text and "mode 0660" in text


def test_permission_remedy_refuses_to_suggest_group_zero() -> None:
    """A root:root socket: the remedy explains the root-group trap instead of group_add 0."""
    sock = SocketFacts("/var/run/docker.sock", True, True, 0, 0, 0o660, "root", "root")
    text = remedy(ErrorKind.PERMISSION_DENIED, SOCK, sock=sock, proc=ProcessFacts(1000, 1000, ()))
    assert 'group_add: ["0"]' not in text
    assert "root group" in text


def test_forbidden_remedy_names_the_missing_proxy_permission() -> None:
    """A proxy refusing /events: the remedy says EVENTS=1."""
    text = remedy(
        ErrorKind.FORBIDDEN, Endpoint("tcp://p:2375", None), refused_path="/v1.41/events?filters=x"
    )
    assert "EVENTS=1" in text


@pytest.mark.parametrize(
    ("path", "permission"),
    [
        ("/v1.41/_ping", "PING"),
        ("/version", "VERSION"),
        ("/v1.44/containers/json?all=1", "CONTAINERS"),
        ("/v1.41/containers/abc/json", "CONTAINERS"),
        ("/v1.41/events", "EVENTS"),
        ("/info", "INFO"),
        ("/images/json", None),
    ],
)
def test_proxy_permission_of_each_path(path: str, permission: str | None) -> None:
    """Each API path maps to the socket-proxy permission that allows it."""
    assert proxy_permission(path) == permission


def test_process_may_open_follows_mode_bits() -> None:
    """Owner, group and other bits decide whether a non-root process may open the socket."""
    sock = SocketFacts("/s", True, True, 0, 998, 0o660)
    assert ProcessFacts(1000, 1000, (998,)).may_open(sock)
    assert not ProcessFacts(1000, 1000, (1000,)).may_open(sock)
    assert ProcessFacts(0, 0, ()).may_open(sock)
    assert not ProcessFacts(1000, 998, ()).may_open(SocketFacts("/s", True, True, 0, 998, 0o600))


# -- helpers for the Docker tests ----------------------------------------------------


def _settings(host: str, **extra: object) -> object:
    flags: dict[str, object] = {
        "docker.host": host,
        "docker.ping_interval_seconds": 0.2,
        "backoff.initial_seconds": 0.05,
        "backoff.max_seconds": 0.5,
        "watch.socket_poll_seconds": 0.05,
        "metrics.listen": "",
    }
    flags.update(extra)
    return load_settings(environ={}, flags=flags)


async def _wait(predicate: Callable[[], bool], what: str, seconds: float = 15.0) -> None:
    with anyio.move_on_after(seconds):
        while not predicate():  # noqa: ASYNC110 - polling state owned by another task is the point
            await anyio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@asynccontextmanager
async def _watching(host: str, **extra: object) -> AsyncIterator[Runtime]:
    runtime = build_runtime(_settings(host, **extra))  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(runtime.watcher.serve)
        try:
            yield runtime
        finally:
            tg.cancel_scope.cancel()


def _doctor(
    host: str, *, user: int | None = None, rt: object = None
) -> tuple[int, dict[str, object]]:
    command = [sys.executable, "-m", "supervisor", "doctor", "--docker-host", host, "--json"]
    env = None
    kwargs: dict[str, object] = {}
    if user is not None:
        assert rt is not None
        command[0] = rt.python  # type: ignore[attr-defined]
        env = rt.env  # type: ignore[attr-defined]
        kwargs = {"user": user, "group": user, "extra_groups": []}
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, **kwargs)  # type: ignore[call-overload]
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


# -- doctor against a real engine ----------------------------------------------------


def test_doctor_reports_everything_working(docker_host: str) -> None:
    """doctor against the test engine as root: every needed call passes, exit 0."""
    code, report = _doctor(docker_host)
    assert code == 0
    assert report["ok"] is True
    checks = {c["name"]: c for c in report["endpoint"]["checks"]}  # type: ignore[index]
    for name in ("connect", "ping", "version", "list", "events"):
        assert checks[name]["ok"], checks[name]
    assert report["endpoint"]["version"]["ApiVersion"]  # type: ignore[index]


def test_doctor_as_non_root_names_the_socket_gid(
    docker_host: str, unprivileged_runtime: object
) -> None:
    """doctor as uid 65534 without the socket's group: exit 1, remedy gives group_add with the GID."""
    path = Path(docker_host.removeprefix("unix://"))
    gid = path.stat().st_gid
    code, report = _doctor(docker_host, user=65534, rt=unprivileged_runtime)
    assert code == 1
    assert "cannot be reached" in str(report["remedy"])  # the engine's folder is 0700
    mode = path.parent.stat().st_mode
    path.parent.chmod(mode | 0o011)
    try:
        code, report = _doctor(docker_host, user=65534, rt=unprivileged_runtime)
    finally:
        path.parent.chmod(mode)
    assert code == 1
    assert f'group_add: ["{gid}"]' in str(report["remedy"])
    assert report["process"]["uid"] == 65534  # type: ignore[index]


def test_doctor_missing_socket(short_tmp: Path) -> None:
    """doctor against a socket path that does not exist: exit 1, remedy says how to mount it."""
    code, report = _doctor(f"unix://{short_tmp}/none.sock")
    assert code == 1
    assert "does not exist" in str(report["remedy"])


# -- least privilege: record every request the supervisor makes ---------------------

_REQUEST_LINE = re.compile(rb"(?m)^(GET|HEAD|POST|PUT|DELETE|PATCH) (\S+) HTTP/1\.[01]\r$")


class RecordingProxy:
    """A Unix-socket proxy in front of dockerd that records each request line."""

    def __init__(self, upstream: str, path: str) -> None:
        self.upstream = upstream
        self.path = path
        self.requests: list[tuple[str, str]] = []

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        listener = await anyio.create_unix_listener(self.path)
        task_status.started()
        async with listener:
            await listener.serve(self._handle)

    async def _handle(self, client: SocketStream) -> None:
        async with client, await anyio.connect_unix(self.upstream) as server:
            async with anyio.create_task_group() as tg:

                async def up() -> None:
                    buffer = b""
                    try:
                        async for chunk in client:
                            buffer += chunk
                            for match in _REQUEST_LINE.finditer(buffer):
                                self.requests.append((match[1].decode(), match[2].decode()))
                            buffer = buffer[buffer.rfind(b"\n") + 1 :]
                            await server.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
                    tg.cancel_scope.cancel()

                async def down() -> None:
                    try:
                        async for chunk in server:
                            await client.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(up)
                tg.start_soon(down)


#: What the supervisor may ask Docker without actions enabled (method, path template).
ALLOWED_CALLS = {
    ("GET", "/_ping"),
    ("GET", "/version"),
    ("GET", "/info"),
    ("GET", "/containers/json"),
    ("GET", "/containers/{id}/json"),
    ("GET", "/events"),
}


def _template(path: str) -> str:
    path = path.split("?", 1)[0]
    path = re.sub(r"^/v\d+\.\d+", "", path)
    return re.sub(r"^/containers/[0-9a-f]{12,64}(?=/|$)", "/containers/{id}", path)


async def test_supervisor_makes_only_the_calls_it_needs(
    docker_host: str, docker_api: docker.APIClient, make_container: object, short_tmp: Path
) -> None:
    """Every request through a recording proxy, over a full container life cycle, is in the allowed list."""
    proxy = RecordingProxy(docker_host.removeprefix("unix://"), str(short_tmp / "rec.sock"))
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        async with _watching(f"unix://{proxy.path}") as runtime:
            await _wait(lambda: runtime.watcher.synced, "the first sync")
            cid = await anyio.to_thread.run_sync(lambda: make_container(name="lp-one"))  # type: ignore[operator]
            await _wait(
                lambda: (r := runtime.cache.get(cid)) is not None and r.running, "the start"
            )
            for call in (docker_api.pause, docker_api.unpause):
                await anyio.to_thread.run_sync(call, cid)
            await anyio.to_thread.run_sync(lambda: docker_api.stop(cid, timeout=1))
            await anyio.to_thread.run_sync(lambda: docker_api.rename(cid, "lp-two"))
            await _wait(
                lambda: (r := runtime.cache.get(cid)) is not None and r.name == "lp-two",
                "the rename",
            )
            await anyio.to_thread.run_sync(lambda: docker_api.remove_container(cid, force=True))
            await _wait(lambda: runtime.cache.get(cid) is None, "the removal")
            await anyio.sleep(0.5)  # let a few liveness pings through the proxy
        tg.cancel_scope.cancel()
    made = {(method, _template(path)) for method, path in proxy.requests}
    assert ("GET", "/events") in made and ("GET", "/containers/{id}/json") in made
    assert ("GET", "/_ping") in made
    assert made <= ALLOWED_CALLS, made - ALLOWED_CALLS


#: The call each action adds (logs also inspects the container, a read already allowed).
ACTION_CALLS = {
    "start": ("POST", "/containers/{id}/start"),
    "stop": ("POST", "/containers/{id}/stop"),
    "restart": ("POST", "/containers/{id}/restart"),
    "remove": ("DELETE", "/containers/{id}"),
    "logs": ("GET", "/containers/{id}/logs"),
}
#: Each action as the API receives it: method and path suffix after /v1/containers/{id}.
ACTION_REQUESTS = {
    "start": ("POST", "/start"),
    "restart": ("POST", "/restart"),
    "logs": ("GET", "/logs"),
    "stop": ("POST", "/stop"),
    "remove": ("DELETE", ""),
}


def _running(runtime: Runtime, cid: str) -> Callable[[], bool]:
    return lambda: (r := runtime.cache.get(cid)) is not None and r.running


async def _attempt_every_action(runtime: Runtime, cid: str) -> dict[str, int]:
    """Each action on ``cid`` through the API's router, as uid 0; the status of each."""
    app = ApiApp(runtime)
    statuses: dict[str, int] = {}
    for action, (method, suffix) in ACTION_REQUESTS.items():
        query = (("timeout", "0"),) if action in ("stop", "restart") else ()
        request = Request(method, f"/v1/containers/{cid}{suffix}", query, Peer(os.getpid(), 0, 0))
        _, answer = await app.router.dispatch(request)
        if isinstance(answer, StreamResponse):
            async with contextlib.aclosing(answer.chunks) as chunks:
                assert b"hello" in b"".join([chunk async for chunk in chunks])
            statuses[action] = 200
        else:
            statuses[action] = answer.status
    return statuses


async def test_actions_add_exactly_the_calls_they_need(
    docker_api: docker.APIClient, docker_host: str, make_container: object, short_tmp: Path
) -> None:
    """With actions enabled, the recording shows each allowed action's one call and nothing else."""
    proxy = RecordingProxy(docker_host.removeprefix("unix://"), str(short_tmp / "rec.sock"))
    host = f"unix://{proxy.path}"
    made: dict[str, set[tuple[str, str]]] = {}
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        for allow in ("logs", "start,stop,restart,remove,logs"):
            cid = await anyio.to_thread.run_sync(
                lambda: make_container(
                    ["/bin/sh", "-c", "echo hello; exec sleep 1000"], start=False
                )  # type: ignore[operator]
            )
            await anyio.to_thread.run_sync(docker_api.start, cid)
            first = len(proxy.requests)
            async with _watching(host, **{"actions.allow": allow}) as runtime:
                await _wait(_running(runtime, cid), "the container")
                statuses = await _attempt_every_action(runtime, cid)
            allowed = allow.split(",")
            assert statuses == {a: 200 if a in allowed else 403 for a in ACTION_REQUESTS}
            made[allow] = {(m, _template(p)) for m, p in proxy.requests[first:]}
        tg.cancel_scope.cancel()
    for allow, calls in made.items():
        wanted = {ACTION_CALLS[a] for a in allow.split(",")}
        assert calls - ALLOWED_CALLS == wanted, allow
        assert ("GET", "/containers/{id}/json") in calls


# -- behind a real HAProxy socket proxy ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


HAPROXY_CONFIG = """
global
    maxconn 256
defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend docker
    bind 127.0.0.1:{port}
    acl ping       path_reg ^(/v[0-9.]+)?/_ping$
    acl version    path_reg ^(/v[0-9.]+)?/version$
    acl info       path_reg ^(/v[0-9.]+)?/info$
    acl containers path_reg ^(/v[0-9.]+)?/containers/
    acl events     path_reg ^(/v[0-9.]+)?/events
    http-request deny deny_status 403 unless METH_GET or METH_HEAD
    http-request deny deny_status 403 unless ping or version or info or containers {events}
    default_backend dockerd
backend dockerd
    server engine unix@{socket}
"""


@pytest.fixture
def haproxy(docker_host: str, short_tmp: Path) -> Iterator[Callable[[bool], str]]:
    """Start a method-and-path filtering HAProxy in front of the test engine; returns its tcp:// URL."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(binary):
        pytest.fail("haproxy is not installed (tests/run.sh installs it)")
    processes: list[subprocess.Popen[bytes]] = []

    def start(allow_events: bool) -> str:
        port = _free_port()
        config = short_tmp / f"haproxy-{port}.cfg"
        config.write_text(
            HAPROXY_CONFIG.format(
                port=port,
                socket=docker_host.removeprefix("unix://"),
                events="or events" if allow_events else "",
            )
        )
        check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, timeout=30)
        assert check.returncode == 0, check.stderr.decode() + check.stdout.decode()
        proc = subprocess.Popen(
            [binary, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        processes.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return f"tcp://127.0.0.1:{port}"
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                time.sleep(0.05)
        raise AssertionError("haproxy did not start listening")

    try:
        yield start
    finally:
        for proc in processes:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stderr:
                proc.stderr.close()


async def test_works_fully_behind_a_read_only_proxy(
    haproxy: Callable[[bool], str], make_container: Callable[..., str]
) -> None:
    """Behind HAProxy allowing containers, events, info, version, ping (GET only): connected and mirroring."""
    url = haproxy(True)
    async with _watching(url) as runtime:
        await _wait(lambda: runtime.watcher.synced, "the first sync")
        assert runtime.machine.state is ConnectionState.CONNECTED
        cid = await anyio.to_thread.run_sync(lambda: make_container(name="behind-proxy"))
        await _wait(
            lambda: (r := runtime.cache.get(cid)) is not None and r.running, "the new container"
        )


async def test_proxy_denying_events_gives_denied_forbidden(haproxy: Callable[[bool], str]) -> None:
    """HAProxy refusing /events with 403: state denied, kind forbidden, remedy names EVENTS."""
    url = haproxy(False)
    async with _watching(url) as runtime:
        await _wait(lambda: runtime.machine.state is ConnectionState.DENIED, "denied")
        error = runtime.machine.last_error
        assert error is not None
        assert error.kind is ErrorKind.FORBIDDEN
        assert "EVENTS" in error.remedy


def test_doctor_names_the_missing_proxy_permission(haproxy: Callable[[bool], str]) -> None:
    """doctor behind HAProxy without events: exit 1, remedy asks for EVENTS=1."""
    code, report = _doctor(haproxy(False))
    assert code == 1
    assert "EVENTS=1" in str(report["remedy"])
    checks = {c["name"]: c for c in report["endpoint"]["checks"]}  # type: ignore[index]
    assert checks["events"]["status"] == 403
    assert checks["ping"]["ok"] and checks["list"]["ok"]


# -- recovery without restart, as an unprivileged process ----------------------------


def test_non_root_recovers_when_the_socket_group_is_fixed(
    private_dockerd: object, unprivileged_runtime: object, short_tmp: Path
) -> None:
    """uid 65534 without the socket's group: denied naming the GID; chgrp to its group: connected; back: denied."""
    from tests.daemon_proc import SupervisorProcess

    sock = Path(private_dockerd.socket_path)  # type: ignore[attr-defined]
    docker_gid = sock.stat().st_gid
    sock.parent.chmod(0o711)  # let uid 65534 reach the socket; its mode still decides
    short_tmp.chmod(0o777)
    with SupervisorProcess(
        private_dockerd.host,  # type: ignore[attr-defined]
        short_tmp / "api.sock",
        python=unprivileged_runtime.python,  # type: ignore[attr-defined]
        env=unprivileged_runtime.env,  # type: ignore[attr-defined]
        user=65534,
        group=65534,
        extra_args=["--log-level", "DEBUG"],
    ) as sup:
        status = sup.wait_for(lambda s: s["state"] == "denied", timeout=10)
        assert status["error"]["kind"] == "permission_denied"
        assert f'group_add: ["{docker_gid}"]' in status["error"]["remedy"]
        assert "uid 65534" in status["error"]["remedy"]

        os.chown(sock, -1, 65534)
        status = sup.wait_for(lambda s: s["state"] == "connected" and s["synced"], timeout=5)
        assert status["error"] is None

        os.chown(sock, -1, docker_gid)
        status = sup.wait_for(lambda s: s["state"] == "denied", timeout=5)
        assert status["error"]["kind"] == "permission_denied"
        assert sup.stop() == 0
