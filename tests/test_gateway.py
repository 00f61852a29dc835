"""The gateway: failures classified from real exception chains, and the real client against dockerd.

Every failure here is produced for real: a missing socket, a stale one, a socket
this uid may not open (in a child process running as uid 65534), a tiny HTTP
server on a Unix socket playing a socket proxy that answers 401/403/500, a
listener that never answers. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import anyio
import docker
import docker.errors
import pytest

from supervisor.access import Endpoint, resolve_endpoint
from supervisor.gateway import DockerCallError, DockerEventStream, DockerGateway, classify
from supervisor.records import parse_event, record_from_inspect
from supervisor.settings import DockerSettings
from supervisor.state import ErrorKind
from tests.conftest import UnprivilegedRuntime
from tests.dockerd import ContainerFactory, docker_py_socket_leak_ignored

VERSION_BODY = {
    "Version": "20.10.24",
    "ApiVersion": "1.41",
    "MinAPIVersion": "1.12",
    "Os": "linux",
    "Arch": "amd64",
}


def gateway_for(path: str | os.PathLike[str], *, call_timeout: float = 5.0) -> DockerGateway:
    settings = DockerSettings(host=f"unix://{os.fspath(path)}", call_timeout_seconds=call_timeout)
    return DockerGateway(settings, resolve_endpoint(settings, {}))


async def open_failure(gateway: DockerGateway) -> DockerCallError:
    """The DockerCallError of a connect that must fail."""
    with anyio.fail_after(10):
        try:
            session = await gateway.open_session()
        except DockerCallError as exc:
            return exc
    await session.aclose()
    raise AssertionError("the connect succeeded")


def docker_py_error(path: str | os.PathLike[str], timeout: float = 2.0) -> BaseException:
    """The exception docker-py itself raises when it creates a client of ``path``."""
    with docker_py_socket_leak_ignored():
        try:
            docker.APIClient(base_url=f"unix://{os.fspath(path)}", version="auto", timeout=timeout)
        except Exception as exc:
            exc.__traceback__ = None  # let go of docker-py's leaked socket now
            return exc
    raise AssertionError("docker-py connected")


# -- missing and stale sockets ---------------------------------------------------------


async def test_missing_socket_is_socket_missing(short_tmp: Path) -> None:
    """No file at the path: socket_missing, from docker-py's chain and from the gateway."""
    path = short_tmp / "docker.sock"
    endpoint = Endpoint(f"unix://{path}", str(path))
    from_docker_py = classify(docker_py_error(path), endpoint)
    failure = (await open_failure(gateway_for(path))).failure
    for f in (from_docker_py, failure):
        assert f.kind is ErrorKind.SOCKET_MISSING
        assert f.message == f"{path} does not exist"
        assert str(path) in f.remedy and "DOCKER_HOST" in f.remedy


async def test_stale_socket_is_connection_refused(short_tmp: Path) -> None:
    """A socket file nobody listens on (a crashed daemon's): connection_refused."""
    path = short_tmp / "docker.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # closed without listening: the file stays, refusing
    endpoint = Endpoint(f"unix://{path}", str(path))
    from_docker_py = classify(docker_py_error(path), endpoint)
    failure = (await open_failure(gateway_for(path))).failure
    for f in (from_docker_py, failure):
        assert f.kind is ErrorKind.CONNECTION_REFUSED
        assert "Docker is stopped or restarting" in f.remedy


def test_connection_reset_mid_answer_is_connection_refused() -> None:
    """Docker killed mid-answer (a reset inside a requests chain) reads as connection_refused."""
    import requests.exceptions
    import urllib3.exceptions

    reset = ConnectionResetError(104, "Connection reset by peer")
    chain = requests.exceptions.ConnectionError(
        urllib3.exceptions.ProtocolError("Connection aborted.", reset)
    )
    failure = classify(chain, Endpoint("unix:///run/docker.sock", "/run/docker.sock"))
    assert failure.kind is ErrorKind.CONNECTION_REFUSED
    assert "Docker is stopped or restarting" in failure.remedy


def test_constructed_permission_chain_is_permission_denied(short_tmp: Path) -> None:
    """A PermissionError deep in a requests/docker-py chain (in args and __context__) is found."""
    path = short_tmp / "docker.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    os.chown(path, 0, 4242)
    os.chmod(path, 0o660)
    import requests.exceptions
    import urllib3.exceptions

    try:
        try:
            raise urllib3.exceptions.ProtocolError(
                "Connection aborted.", PermissionError(13, "Permission denied")
            )
        except urllib3.exceptions.ProtocolError as inner:
            raise requests.exceptions.ConnectionError(inner) from None
    except requests.exceptions.ConnectionError as middle:
        chained = docker.errors.DockerException(
            f"Error while fetching server API version: {middle}"
        )
        chained.__cause__ = middle
    f = classify(chained, Endpoint(f"unix://{path}", str(path)))
    assert f.kind is ErrorKind.PERMISSION_DENIED
    assert f.message == f"permission denied on {path}"
    assert "(uid 0, gid 4242) mode 0660" in f.remedy
    assert 'group_add: ["4242"]' in f.remedy


# -- permission denied, for real, as uid 65534 ------------------------------------------

_AS_NOBODY = r"""
import json, sys
import anyio, docker
from supervisor.access import resolve_endpoint
from supervisor.gateway import DockerCallError, DockerGateway, classify
from supervisor.settings import DockerSettings

async def gateway_failure(settings):
    try:
        session = await DockerGateway(settings, resolve_endpoint(settings, {})).open_session()
    except DockerCallError as exc:
        return exc.failure.to_json()
    await session.aclose()
    return None

out = {}
for path in sys.argv[1:]:
    settings = DockerSettings(host="unix://" + path, call_timeout_seconds=5)
    endpoint = resolve_endpoint(settings, {})
    try:
        docker.APIClient(base_url=endpoint.url, version="auto", timeout=5)
        chain = None
    except Exception as exc:
        chain = classify(exc, endpoint).to_json()
    out[path] = {"docker_py": chain, "gateway": anyio.run(gateway_failure, settings)}
print(json.dumps(out))
"""


@contextlib.contextmanager
def listening(path: Path, uid: int, gid: int, mode: int) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen()
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        yield s


def run_as_nobody(
    runtime: UnprivilegedRuntime, paths: list[Path], extra_groups: list[int] | None = None
) -> dict[str, Any]:
    result = subprocess.run(
        [runtime.python, "-c", _AS_NOBODY, *map(str, paths)],
        user=65534,
        group=65534,
        extra_groups=extra_groups or [],
        env=runtime.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def test_permission_denied_for_real_names_the_fix(
    short_tmp: Path, unprivileged_runtime: UnprivilegedRuntime
) -> None:
    """As uid 65534: a group it lacks, group 0, mode 0600, mode 000; each remedy says what to do."""
    os.chmod(short_tmp, 0o755)
    other_group = short_tmp / "g.sock"
    root_group = short_tmp / "r.sock"
    owner_only = short_tmp / "o.sock"
    closed = short_tmp / "z.sock"
    with (
        listening(other_group, 0, 4242, 0o660),
        listening(root_group, 0, 0, 0o660),
        listening(owner_only, 0, 65534, 0o600),
        listening(closed, 0, 65534, 0o000),
    ):
        out = run_as_nobody(unprivileged_runtime, [other_group, root_group, owner_only, closed])
    for path, both in out.items():
        for source in ("docker_py", "gateway"):
            f = both[source]
            assert f is not None, (path, source)
            assert f["kind"] == "permission_denied", (path, source, f)
            assert f["message"] == f"permission denied on {path}"
            assert "this process runs as uid 65534 gid 65534 with groups [none]" in f["remedy"]
        # docker-py's own chain and the gateway agree on the diagnosis.
        assert both["docker_py"]["remedy"] == both["gateway"]["remedy"]
    remedy = {Path(p).name: both["gateway"]["remedy"] for p, both in out.items()}
    assert f"{other_group} is root:4242 (uid 0, gid 4242) mode 0660" in remedy["g.sock"]
    assert 'group_add: ["4242"]' in remedy["g.sock"] and "--group-add 4242" in remedy["g.sock"]
    assert "group 0 (root)" in remedy["r.sock"] and "group_add" in remedy["r.sock"]
    assert 'group_add: ["0"]' not in remedy["r.sock"]
    assert f"chmod 660 {owner_only}" in remedy["o.sock"]
    assert "mode 0000" in remedy["z.sock"] and f"chmod 660 {closed}" in remedy["z.sock"]


# -- a socket proxy on a Unix socket -----------------------------------------------------


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        parts = path.split("/", 2)
        if len(parts) > 2 and parts[1].startswith("v1."):
            path = "/" + parts[2]
        status, body = next(
            (v for prefix, v in self.server.routes.items() if path.startswith(prefix)),  # type: ignore[attr-defined]
            (404, {"message": "page not found"}),
        )
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if status < 400 else "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    routes: dict[str, tuple[int, Any]]


@contextlib.contextmanager
def proxy(path: Path, routes: dict[str, tuple[int, Any]]) -> Iterator[None]:
    """A tiny HTTP server on a Unix socket answering by path prefix, like a socket proxy."""
    server = _UnixHTTPServer(str(path), _ProxyHandler)
    server.routes = routes
    thread = threading.Thread(target=server.serve_forever, name="test proxy")
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


FORBIDDEN_PAGE = (
    b"<html><body><h1>403 Forbidden</h1>Request forbidden by administrative rules.</body></html>"
)


@pytest.mark.parametrize("status", [401, 403])
async def test_proxy_refusing_version_is_forbidden(short_tmp: Path, status: int) -> None:
    """A proxy refusing /version (401 or 403): denied as forbidden, remedy names VERSION."""
    path = short_tmp / "proxy.sock"
    with proxy(path, {"/": (status, FORBIDDEN_PAGE)}):
        f = (await open_failure(gateway_for(path))).failure
    assert f.kind is ErrorKind.FORBIDDEN
    assert "/version" in f.remedy and "allow VERSION=1" in f.remedy


async def test_proxy_refusing_events_is_forbidden(short_tmp: Path) -> None:
    """A proxy that allows version and containers but not events: forbidden at the subscription."""
    path = short_tmp / "proxy.sock"
    routes: dict[str, tuple[int, Any]] = {
        "/version": (200, VERSION_BODY),
        "/_ping": (200, b"OK"),
        "/containers/json": (200, []),
        "/events": (403, FORBIDDEN_PAGE),
    }
    with proxy(path, routes):
        session = await gateway_for(path).open_session()
        try:
            assert session.version["ApiVersion"] == "1.41"
            assert await session.list_ids() == []
            with pytest.raises(DockerCallError) as excinfo:
                await session.open_events()
        finally:
            await session.aclose()
    f = excinfo.value.failure
    assert f.kind is ErrorKind.FORBIDDEN
    assert "allow EVENTS=1" in f.remedy


async def test_server_error_is_api_error(short_tmp: Path) -> None:
    """A 500 from the endpoint is an api_error that keeps Docker's message."""
    path = short_tmp / "proxy.sock"
    with proxy(path, {"/": (500, {"message": "engine on fire"})}):
        f = (await open_failure(gateway_for(path))).failure
    assert f.kind is ErrorKind.API_ERROR
    assert "engine on fire" in f.message


async def test_silent_endpoint_is_a_timeout(short_tmp: Path) -> None:
    """A listener that accepts but never answers: timeout after call_timeout_seconds."""
    path = short_tmp / "hung.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(8)  # connections queue up; nothing ever answers
        started = time.monotonic()
        f = (await open_failure(gateway_for(path, call_timeout=0.3))).failure
        elapsed = time.monotonic() - started
    assert f.kind is ErrorKind.TIMEOUT
    assert "within 0.3 s" in f.remedy
    assert 0.25 < elapsed < 3


def test_with_the_group_uid_65534_gets_in(
    short_tmp: Path, unprivileged_runtime: UnprivilegedRuntime
) -> None:
    """The remedy works: the same uid given the socket's group connects."""
    os.chmod(short_tmp, 0o755)
    path = short_tmp / "g.sock"
    routes: dict[str, tuple[int, Any]] = {"/version": (200, VERSION_BODY)}
    with proxy(path, routes):
        os.chown(path, 0, 4242)
        os.chmod(path, 0o660)
        out = run_as_nobody(unprivileged_runtime, [path], extra_groups=[4242])
    assert out[str(path)] == {"docker_py": None, "gateway": None}


# -- the event stream's own line splitting -------------------------------------------------


class _Chunks:
    def __init__(self, chunks: list[bytes | str]) -> None:
        self._chunks = iter(chunks)
        self.closed = False

    def __next__(self) -> bytes | str:
        return next(self._chunks)

    def close(self) -> None:
        self.closed = True


async def test_event_stream_splits_lines_and_passes_bad_ones_as_bytes() -> None:
    """Objects split across chunks are joined; a bad line comes out as bytes; the end is None."""
    chunks: list[bytes | str] = [
        b'{"Type":"container","Act',
        b'ion":"start","Actor":{"ID":"a"}}\n{not json}\n',
        "\n",
        '{"Type":"container","Action":"die","Actor":{"ID":"a"}}\n',
    ]
    raw = _Chunks(chunks)
    stream = DockerEventStream(raw, gateway_for("/nonexistent.sock"))
    got = [await stream.next() for _ in range(4)]
    assert got[0] == {"Type": "container", "Action": "start", "Actor": {"ID": "a"}}
    assert got[1] == b"{not json}"
    assert got[2] == {"Type": "container", "Action": "die", "Actor": {"ID": "a"}}
    assert got[3] is None
    await stream.aclose()
    assert raw.closed
    assert await stream.next() is None


class _Broken:
    """A stream whose read fails the way urllib3 does when the connection breaks mid-chunk."""

    def __next__(self) -> bytes:
        import http.client

        import urllib3.exceptions

        raise urllib3.exceptions.ProtocolError(
            "Connection broken: IncompleteRead(10 bytes read, 5 more expected)",
            http.client.IncompleteRead(b"x" * 10, 5),
        )

    def close(self) -> None:
        pass


async def test_event_stream_translates_a_broken_connection() -> None:
    """urllib3's own errors on a stream read leave the gateway as DockerCallError, like all others."""
    stream = DockerEventStream(_Broken(), gateway_for("/nonexistent.sock"))
    with pytest.raises(DockerCallError) as excinfo:
        await stream.next()
    assert excinfo.value.failure.kind is ErrorKind.API_ERROR
    assert "Connection broken" in excinfo.value.failure.message


class _CutOff:
    """A blocked read that trips over its own connection when another thread closes it."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    def __next__(self) -> bytes:
        self.closed.wait(10)
        raise AttributeError("'NoneType' object has no attribute 'close'")  # http.client's race

    def close(self) -> None:
        self.closed.set()


async def test_event_stream_closed_under_a_read_ends_quietly() -> None:
    """aclose() during a blocked read: the read reports the end (None), whatever it tripped on."""
    raw = _CutOff()
    stream = DockerEventStream(raw, gateway_for("/nonexistent.sock"))
    got: list[object] = []
    async with anyio.create_task_group() as tg:

        async def read() -> None:
            got.append(await stream.next())

        tg.start_soon(read)
        await anyio.sleep(0.05)
        with anyio.fail_after(5):
            await stream.aclose()
    assert got == [None]


# -- against the real dockerd -------------------------------------------------------------


@pytest.mark.docker
async def test_session_against_real_docker(
    docker_host: str, docker_api: docker.APIClient, make_container: ContainerFactory
) -> None:
    """version negotiated, ping, list, inspect (and None for a gone id), events, close."""
    settings = DockerSettings(host=docker_host, call_timeout_seconds=10)
    gateway = DockerGateway(settings, resolve_endpoint(settings, {}))
    cid = make_container(start=False, name="hls-gw-probe")
    with anyio.fail_after(20):
        session = await gateway.open_session()
        try:
            assert session.version["ApiVersion"] == docker_api.version()["ApiVersion"]
            await session.ping()
            assert cid in await session.list_ids()
            body = await session.inspect(cid)
            assert body is not None
            truth = await anyio.to_thread.run_sync(docker_api.inspect_container, cid)
            assert record_from_inspect(body) == record_from_inspect(truth)
            assert await session.inspect("0" * 64) is None

            stream = await session.open_events()
            await anyio.to_thread.run_sync(docker_api.start, cid)
            seen: list[str] = []
            while "start" not in seen:
                event = parse_event(await stream.next())
                if event is not None and event.container_id == cid:
                    seen.append(event.action)

            # close() from elsewhere ends a blocked read with a normal end.
            async with anyio.create_task_group() as tg:
                ended: list[object] = []

                async def read() -> None:
                    ended.append(await stream.next())

                tg.start_soon(read)
                await anyio.sleep(0.1)
                closed_at = time.monotonic()
                await stream.aclose()
            assert ended == [None]
            assert time.monotonic() - closed_at < 1
        finally:
            await session.aclose()
