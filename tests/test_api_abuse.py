"""Abusive clients against a real daemon, each while a well-behaved client keeps working.

The daemon runs with short timeouts (head 2 s, idle 3 s) so that the slow cases end
quickly. A :class:`SteadyClient` thread asks for the container list and the health
on one keep-alive connection throughout each test and checks every answer; at the
end the mirror is compared with Docker's list and the daemon's connections on
its socket are back to what they were.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import selectors
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.daemon_proc import SupervisorProcess
from tests.dockerd import ContainerFactory
from tests.test_api_docker import settle

pytestmark = pytest.mark.docker

HEAD_TIMEOUT_SECONDS = 2
IDLE_TIMEOUT_SECONDS = 3
MAX_CONNECTIONS = 512


@pytest.fixture(scope="module")
def supervisor(docker_host: str) -> Iterator[SupervisorProcess]:
    """One daemon for the module, with short head and idle timeouts."""
    tmp = Path(tempfile.mkdtemp(prefix="hb", dir="/tmp"))
    try:
        with SupervisorProcess(
            docker_host,
            tmp / "api.sock",
            metrics_listen="",
            extra_env={
                "SUPERVISOR_API_HEAD_TIMEOUT_SECONDS": str(HEAD_TIMEOUT_SECONDS),
                "SUPERVISOR_API_IDLE_TIMEOUT_SECONDS": str(IDLE_TIMEOUT_SECONDS),
                "SUPERVISOR_API_HEARTBEAT_SECONDS": "1",
            },
        ) as sup:
            sup.wait_synced()
            yield sup
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class SteadyClient(threading.Thread):
    """A well-behaved client: one keep-alive connection, every answer checked."""

    def __init__(self, sup: SupervisorProcess) -> None:
        super().__init__(name="steady client", daemon=True)
        self.sup = sup
        self.answers = 0
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def _ask(self, conn: Any, path: str) -> Any:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise AssertionError(f"{path}: {response.status} {body[:200]!r}")
        return json.loads(body)

    def run(self) -> None:
        conn = self.sup.connection(timeout=5)
        last_revision = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                listing = self._ask(conn, "/v1/containers")
                assert set(listing) == {"revision", "state", "stale", "containers"}
                assert listing["state"] == "connected" and listing["stale"] is False
                assert listing["revision"] >= last_revision
                assert all(len(c["id"]) == 64 for c in listing["containers"])
                last_revision = listing["revision"]
                assert self._ask(conn, "/v1/health")["status"] == "ok"
                if time.monotonic() - started > 5:  # a hang, not a slow machine
                    raise AssertionError(f"answers took {time.monotonic() - started:.1f} s")
                self.answers += 1
            except Exception as exc:
                self.errors.append(repr(exc))
                conn.close()
                conn = self.sup.connection(timeout=5)
            self.stopping.wait(0.01)
        conn.close()


@contextlib.contextmanager
def steady(sup: SupervisorProcess) -> Iterator[SteadyClient]:
    """Run a SteadyClient around the block; it must have answered throughout, without error."""
    client = SteadyClient(sup)
    client.start()
    try:
        deadline = time.monotonic() + 5
        while client.answers == 0 and not client.errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.answers > 0, client.errors
        yield client
        # And it still gets answers after the abuse.
        after = client.answers
        deadline = time.monotonic() + 5
        while client.answers <= after + 1 and not client.errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.answers > after + 1
    finally:
        client.stopping.set()
        client.join(10)
    assert client.errors == []


def wait_connections(sup: SupervisorProcess, at_most: int, timeout: float = 10.0) -> None:
    """Wait until the daemon holds at most ``at_most`` connections on its API socket."""
    deadline = time.monotonic() + timeout
    while sup.api_connections() > at_most:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the daemon still holds {sup.api_connections()} API connections (> {at_most})"
            )
        time.sleep(0.05)


def exchange(path: Path, data: bytes, *, timeout: float = 15.0) -> bytes:
    """Send ``data`` (as much as the server takes), then read until the server closes."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                received += chunk
        return received


def status_of(raw: bytes) -> int | None:
    if not raw:
        return None
    assert raw.startswith(b"HTTP/1.1 "), raw[:100]
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status >= 400:
        error = json.loads(body)["error"]
        assert set(error) >= {"code", "message"}
        assert b"connection: close" in head.lower()
    return status


def in_parallel(func: Callable[[int], Any], count: int) -> list[Any]:
    with ThreadPoolExecutor(max_workers=min(count, 32)) as pool:
        return list(pool.map(func, range(count)))


def test_random_bytes_get_an_error_and_a_close(
    supervisor: SupervisorProcess, docker_api: docker.APIClient
) -> None:
    """Random bytes and near-HTTP garbage get 400, 408, 431 or 501 and a close, never a success."""
    rng = random.Random(1234)
    payloads = [rng.randbytes(rng.choice((1, 100, 5000, 70000))) for _ in range(16)]
    payloads += [
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + rng.randbytes(200),  # TLS hello
        b"\r\n\r\n\r\n\r\n",
        b"\x00" * 1000 + b"\r\n\r\n",
        b"GET /v1/health HTTP/1.1 extra\r\nHost: x\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
    ]
    baseline = supervisor.api_connections()
    with steady(supervisor):
        statuses = in_parallel(
            lambda i: status_of(exchange(supervisor.socket, payloads[i])), len(payloads)
        )
    assert set(statuses) <= {400, 408, 431, 501}, statuses
    assert 400 in statuses
    wait_connections(supervisor, baseline)
    settle(supervisor, docker_api)


def test_head_of_one_mebibyte_gets_431(supervisor: SupervisorProcess) -> None:
    """A 1 MiB request head gets 431 and a close, with or without an end."""
    line = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20)
    many = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n" + b"X-H: 0123456789\r\n" * 60000
    with steady(supervisor):
        for data in (line, line + b"\r\n\r\n", many + b"\r\n"):
            assert status_of(exchange(supervisor.socket, data)) == 431


def test_body_of_ten_mebibytes_gets_413(supervisor: SupervisorProcess) -> None:
    """A 10 MiB body gets 413 and a close, declared by Content-Length or sent chunked."""
    ten = 10 << 20
    declared = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % ten
    chunk = b"100000\r\n" + b"x" * (1 << 20) + b"\r\n"
    chunked = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    with steady(supervisor):
        started = time.monotonic()
        assert status_of(exchange(supervisor.socket, declared + b"x" * ten)) == 413
        assert status_of(exchange(supervisor.socket, chunked + chunk * 10 + b"0\r\n\r\n")) == 413
        assert time.monotonic() - started < HEAD_TIMEOUT_SECONDS * 2


def test_one_byte_per_second_client_gets_408(supervisor: SupervisorProcess) -> None:
    """A client sending one byte a second gets 408 after the head timeout, and a close."""
    request = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    with steady(supervisor), socket.socket(socket.AF_UNIX) as s:
        s.connect(str(supervisor.socket))
        s.settimeout(1.0)
        started = time.monotonic()
        received = b""
        for byte in request:
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                received = s.recv(65536)
            except TimeoutError:
                continue
            break
        s.settimeout(5)
        while chunk := s.recv(65536):
            received += chunk
        elapsed = time.monotonic() - started
    assert status_of(received) == 408
    assert HEAD_TIMEOUT_SECONDS - 0.5 < elapsed < HEAD_TIMEOUT_SECONDS + 3


def test_subscribers_that_disconnect_mid_stream_are_released(
    supervisor: SupervisorProcess, docker_api: docker.APIClient
) -> None:
    """Fifty subscribers hanging up at various points leave no connection behind."""
    baseline = supervisor.api_connections()

    def hang_up(i: int) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(supervisor.socket))
            s.sendall(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
            if i % 3 == 1:
                s.recv(10)  # part of the head
            elif i % 3 == 2:
                data = b""
                while b'"snapshot"' not in data:
                    data += s.recv(65536)

    with steady(supervisor):
        in_parallel(hang_up, 50)
    wait_connections(supervisor, baseline)
    settle(supervisor, docker_api)


def test_six_hundred_connections_at_once(
    supervisor: SupervisorProcess, docker_api: docker.APIClient
) -> None:
    """600 connections at once: those over max_connections get 503, the rest 408; nobody else suffers."""
    baseline = supervisor.api_connections()
    with steady(supervisor):
        sockets = []
        try:
            for _ in range(600):
                s = socket.socket(socket.AF_UNIX)
                sockets.append(s)
                s.connect(str(supervisor.socket))
                s.setblocking(False)
            received = {s.fileno(): b"" for s in sockets}
            with selectors.DefaultSelector() as sel:
                for s in sockets:
                    sel.register(s, selectors.EVENT_READ)
                deadline = time.monotonic() + HEAD_TIMEOUT_SECONDS + 15
                open_count = len(sockets)
                while open_count and time.monotonic() < deadline:
                    for key, _ in sel.select(timeout=0.5):
                        sock: socket.socket = key.fileobj  # type: ignore[assignment]
                        try:
                            chunk = sock.recv(65536)
                        except ConnectionResetError:
                            chunk = b""
                        if chunk:
                            received[sock.fileno()] += chunk
                        else:
                            sel.unregister(sock)
                            open_count -= 1
            assert open_count == 0, f"{open_count} connections still open"
        finally:
            for s in sockets:
                s.close()
    statuses = [status_of(raw) for raw in received.values()]
    refused = statuses.count(503)
    assert set(statuses) <= {503, 408}
    assert refused >= 600 - MAX_CONNECTIONS
    assert statuses.count(408) >= 1
    wait_connections(supervisor, baseline)
    assert supervisor.get_json("/v1/health")["status"] == "ok"
    settle(supervisor, docker_api)


@pytest.mark.slow
def test_subscriber_that_never_reads_while_two_thousand_changes_happen(
    supervisor: SupervisorProcess,
    docker_host: str,
    docker_api: docker.APIClient,
    make_container: ContainerFactory,
) -> None:
    """A subscriber that never reads is cut off, memory stays bounded, others keep up, during 2,000 renames."""
    ids = [make_container() for _ in range(8)]
    settle(supervisor, docker_api)
    baseline = supervisor.api_connections()
    rss_before = supervisor.rss_bytes()
    start_revision = supervisor.get_json("/v1/status")["revision"]

    lazy = socket.socket(socket.AF_UNIX)
    lazy.connect(str(supervisor.socket))
    lazy.sendall(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
    reader_conn, reader = supervisor.open_events()  # a subscriber that keeps up
    seen: list[dict[str, Any]] = []

    def follow() -> None:
        # Ends when the test shuts the connection down under it.
        with contextlib.suppress(OSError, ValueError, AttributeError, http.client.HTTPException):
            while line := reader.readline():
                seen.append(json.loads(line))

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()

    def rename(i: int) -> None:
        with docker.APIClient(base_url=docker_host, version="auto", timeout=30) as api:
            for n in range(250):
                api.rename(ids[i], f"hls-storm-{i}-{n}")

    try:
        with steady(supervisor):
            in_parallel(rename, 8)  # 8 x 250 = 2,000 changes
            final = settle(supervisor, docker_api, timeout=30)
        assert final["revision"] - start_revision >= 250  # bursts coalesce; most show
        deadline = time.monotonic() + 10
        while (not seen or seen[-1].get("revision") != final["revision"]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        deltas = [x for x in seen if x["type"] in ("upsert", "remove")]
        assert [x["type"] for x in seen[:1]] == ["snapshot"]
        assert [x["revision"] for x in deltas] == list(
            range(seen[0]["revision"] + 1, final["revision"] + 1)
        )
        # The lazy subscriber was closed by the daemon; what it holds is bounded.
        lazy.settimeout(IDLE_TIMEOUT_SECONDS + 10)
        total = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := lazy.recv(1 << 16):
                total += len(chunk)
        assert total < 4 << 20
        assert supervisor.rss_bytes() - rss_before < 40 << 20
    finally:
        lazy.close()
        if reader_conn.sock is not None:
            reader_conn.sock.shutdown(socket.SHUT_RDWR)
        follower.join(10)
        reader_conn.close()
    wait_connections(supervisor, baseline)
