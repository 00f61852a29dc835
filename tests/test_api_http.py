"""The API in-process over a real Unix socket, with a mirror filled by hand (no Docker).

Fast tests of the HTTP machinery (keep-alive, limits, timeouts, the connection cap,
cancellation) and of the routes (filters, lookups, the event stream), each against
``serve_api`` running in the test's own event loop.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import re
import socket
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import h11
import pytest
from anyio.abc import ByteStream, TaskStatus

from supervisor.api import serve_api, serve_metrics
from supervisor.daemon import Runtime, StartupError, build_runtime
from supervisor.records import ContainerRecord, record_from_inspect
from supervisor.settings import ApiSettings, MetricsSettings, Settings, WatchSettings
from tests.daemon_proc import free_tcp_port

pytestmark = pytest.mark.anyio

ROUTES = {
    "/v1/health",
    "/v1/ready",
    "/v1/status",
    "/v1/containers",
    "/v1/containers/{ref}",
    "/v1/events",
    "/metrics",
    "other",
}


# -- a mirror without Docker -----------------------------------------------------------


def make_record(
    cid: str,
    name: str,
    state: str = "running",
    labels: dict[str, str] | None = None,
    image: str = "busybox",
) -> ContainerRecord:
    return record_from_inspect(
        {
            "Id": cid,
            "Name": "/" + name,
            "Image": "sha256:" + "0" * 64,
            "State": {"Status": state, "Running": state == "running"},
            "Config": {"Image": image, "Labels": labels or {}},
        }
    )


def connect(runtime: Runtime) -> None:
    """Move the connection machine to ``connected`` and mark the mirror synced."""
    runtime.machine.succeeded(now=time.time())
    runtime.watcher.synced = True
    runtime.feed.notify()


def put(runtime: Runtime, record: ContainerRecord) -> None:
    runtime.cache.upsert(record)
    runtime.feed.notify()


@dataclass
class Recorder:
    calls: list[tuple[str, int, float]] = field(default_factory=list)

    def api_request(self, route: str, code: int, seconds: float) -> None:
        self.calls.append((route, code, seconds))


@contextlib.asynccontextmanager
async def serving(tmp: Path, *, history_size: int = 4096, **api: Any) -> AsyncIterator[Runtime]:
    """``serve_api`` on ``tmp/api.sock`` in a task group of the test; cancelled on exit."""
    settings = Settings(
        api=ApiSettings(socket=str(tmp / "api.sock"), **api),
        watch=WatchSettings(history_size=history_size),
        metrics=MetricsSettings(listen=""),
    )
    runtime = build_runtime(settings)
    with anyio.fail_after(30):  # every wait of a test is bounded
        async with anyio.create_task_group() as tg:
            await tg.start(serve_api, runtime)
            try:
                yield runtime
            finally:
                tg.cancel_scope.cancel()


# -- a small h11 client ----------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """HTTP/1.1 over an anyio byte stream, with h11 on the client side."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self._lines = b""

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, runtime: Runtime) -> AsyncIterator[Client]:
        stream = await anyio.connect_unix(runtime.settings.api.socket)
        async with stream:
            yield cls(stream)

    async def _next(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive()
            except anyio.EndOfStream:
                data = b""
            self.conn.receive_data(data)

    async def send_request(self, target: str, method: str = "GET", body: bytes = b"") -> None:
        headers = [("host", "localhost")]
        if body:
            headers.append(("content-length", str(len(body))))
        out = self.conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if body:
            out += self.conn.send(h11.Data(data=body)) or b""
        out += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send(out)

    async def read_head(self) -> h11.Response:
        event = await self._next()
        assert isinstance(event, h11.Response), event
        return event

    async def read_reply(self) -> Reply:
        head = await self.read_head()
        body = b""
        while True:
            event = await self._next()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        headers = {k.decode(): v.decode() for k, v in head.headers}
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Reply(head.status_code, headers, body)

    async def get(self, target: str, method: str = "GET") -> Reply:
        await self.send_request(target, method)
        return await self.read_reply()

    async def line(self) -> dict[str, Any] | None:
        """The next NDJSON object of a streamed body; None at its end."""
        while b"\n" not in self._lines:
            event = await self._next()
            if isinstance(event, h11.Data):
                self._lines += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return None
        line, self._lines = self._lines.split(b"\n", 1)
        parsed: dict[str, Any] = json.loads(line)
        return parsed


async def raw_exchange(path: str, data: bytes, *, seconds: float = 5.0) -> bytes:
    """Send raw bytes, then read until the server closes."""
    received = b""
    with anyio.fail_after(seconds):
        async with await anyio.connect_unix(path) as stream:
            with contextlib.suppress(anyio.BrokenResourceError):
                await stream.send(data)
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    received += await stream.receive()
    return received


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def error_of(raw: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]
    return error


# -- the HTTP machinery ----------------------------------------------------------------


async def test_keep_alive_serves_many_requests_on_one_connection(short_tmp: Path) -> None:
    """One connection carries many requests, pipelined ones included, answered in order."""
    async with serving(short_tmp) as rt:
        async with Client.open(rt) as client:
            for _ in range(20):
                assert (await client.get("/v1/health")).status == 200
        raw = await raw_exchange(
            rt.settings.api.socket,
            b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", raw) == [b"200", b"404", b"200"]


async def test_unknown_path_is_404_and_wrong_method_is_405_with_allow(short_tmp: Path) -> None:
    """Unknown paths give a JSON 404; a wrong method gives 405 naming the allowed one."""
    async with serving(short_tmp) as rt, Client.open(rt) as client:
        for target in ("/", "/v1", "/v1/containers/", "/v2/health", "/v1/health/x"):
            reply = await client.get(target)
            assert reply.status == 404, target
            assert reply.headers["content-type"] == "application/json"
            assert reply.json()["error"]["code"] == "not_found"
        for method in ("POST", "DELETE", "HEAD", "PUT"):
            reply = await client.get("/v1/containers", method=method)
            assert reply.status == 405
            assert reply.headers["allow"] == "GET"
            if method != "HEAD":  # HEAD answers carry no body
                assert reply.json()["error"]["code"] == "method_not_allowed"
        assert (await client.get("/v1/health")).status == 200  # still usable


async def test_http10_client_gets_an_answer_and_a_close(short_tmp: Path) -> None:
    """An HTTP/1.0 request is answered and the connection then closed."""
    async with serving(short_tmp) as rt:
        raw = await raw_exchange(rt.settings.api.socket, b"GET /v1/health HTTP/1.0\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 ")
        assert raw.endswith(b'{"status":"ok","state":"connecting"}')


async def test_malformed_request_gets_400_and_close(short_tmp: Path) -> None:
    """Garbage, a missing Host and a bad header each get a JSON 400 and a close."""
    async with serving(short_tmp) as rt:
        path = rt.settings.api.socket
        for data in (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
            b"GET /v1/health HTTP/1.1\r\n\r\n",
            b"GET /v1/health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        ):
            raw = await raw_exchange(path, data)
            assert status_of(raw) == 400, raw
            assert b"connection: close" in raw.lower()
            assert error_of(raw)["code"] == "bad_request"


async def test_head_over_limit_gets_431(short_tmp: Path) -> None:
    """A head over max_head_bytes gets 431, whether it arrives in pieces or whole."""
    async with serving(short_tmp, max_head_bytes=1024) as rt:
        path = rt.settings.api.socket
        big = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 2000 + b"\r\n\r\n"
        raw = await raw_exchange(path, big)
        assert status_of(raw) == 431
        assert error_of(raw)["code"] == "head_too_large"
        endless = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100_000
        raw = await raw_exchange(path, endless)
        assert status_of(raw) == 431


async def test_body_over_limit_gets_413(short_tmp: Path) -> None:
    """A body over max_body_bytes gets 413, declared by length or sent chunked; a small one is drained."""
    async with serving(short_tmp, max_body_bytes=100) as rt:
        path = rt.settings.api.socket
        raw = await raw_exchange(
            path, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n"
        )
        assert status_of(raw) == 413
        assert error_of(raw)["code"] == "body_too_large"
        chunked = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunked += b"40\r\n" + b"x" * 64 + b"\r\n" + b"40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n"
        raw = await raw_exchange(path, chunked)
        assert status_of(raw) == 413
        # A body within the limit is read and ignored; the connection stays usable.
        async with Client.open(rt) as client:
            await client.send_request("/v1/health", body=b"hello")
            assert (await client.read_reply()).status == 200
            assert (await client.get("/v1/health")).status == 200


async def test_slow_head_gets_408_and_idle_connection_is_closed(short_tmp: Path) -> None:
    """An unfinished head gets 408 after head_timeout; an idle keep-alive is closed after idle_timeout."""
    async with serving(short_tmp, head_timeout_seconds=0.3, idle_timeout_seconds=0.5) as rt:
        path = rt.settings.api.socket
        started = time.monotonic()
        raw = await raw_exchange(path, b"GET /v1/hea")
        assert status_of(raw) == 408
        assert error_of(raw)["code"] == "request_timeout"
        assert 0.25 < time.monotonic() - started < 3
        # A connection that never says anything is treated alike.
        raw = await raw_exchange(path, b"")
        assert status_of(raw) == 408
        async with Client.open(rt) as client:
            assert (await client.get("/v1/health")).status == 200
            started = time.monotonic()
            with anyio.fail_after(5):
                with pytest.raises(anyio.EndOfStream):
                    await client.stream.receive()
            assert time.monotonic() - started >= 0.45


async def test_connections_over_the_cap_get_503_and_the_rest_keep_working(
    short_tmp: Path,
) -> None:
    """With max_connections=3, a fourth connection gets 503 and a close; the three still work."""
    async with serving(short_tmp, max_connections=3) as rt, contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client.open(rt)) for _ in range(3)]
        for client in clients:  # accepted and being served
            assert (await client.get("/v1/health")).status == 200
        raw = await raw_exchange(rt.settings.api.socket, b"")
        assert status_of(raw) == 503
        assert error_of(raw)["code"] == "unavailable"
        for client in clients:
            assert (await client.get("/v1/health")).status == 200
        await clients[0].stream.aclose()
        for _ in range(100):  # the freed slot is given to the next connection
            raw = await raw_exchange(
                rt.settings.api.socket,
                b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            if status_of(raw) == 200:
                break
            await anyio.sleep(0.01)
        assert status_of(raw) == 200


async def test_request_metrics_are_reported_to_the_runtime_metrics(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """api_request gets (route template, status, seconds) for answered and refused requests."""
    recorder = Recorder()
    from supervisor import metrics as metrics_module

    monkeypatch.setattr(
        metrics_module.Metrics, "api_request", lambda self, *a: recorder.api_request(*a)
    )
    async with serving(short_tmp) as rt, Client.open(rt) as client:
        put(rt, make_record("a" * 64, "web"))
        for target in (
            "/v1/health",
            "/v1/containers/web",
            "/v1/containers/" + "a" * 64,
            "/v1/containers/nothing",
            "/no/such/thing",
        ):
            await client.get(target)
        await client.get("/v1/health", method="POST")
        await raw_exchange(rt.settings.api.socket, b"\x00garbage\r\n\r\n")
    calls = [(route, code) for route, code, _ in recorder.calls]
    assert calls == [
        ("/v1/health", 200),
        ("/v1/containers/{ref}", 200),
        ("/v1/containers/{ref}", 200),
        ("/v1/containers/{ref}", 404),
        ("other", 404),
        ("/v1/health", 405),
        ("other", 400),
    ]
    assert all(0 <= seconds < 5 for _, _, seconds in recorder.calls)


async def test_cancel_closes_connections_and_removes_the_socket(short_tmp: Path) -> None:
    """Cancelling serve_api ends open connections and streams, and removes the socket file."""
    sock_path = short_tmp / "api.sock"
    rt = build_runtime(
        Settings(api=ApiSettings(socket=str(sock_path)), metrics=MetricsSettings(listen=""))
    )
    scope = anyio.CancelScope()
    finished = anyio.Event()

    async def run(*, task_status: TaskStatus[None]) -> None:
        with scope:
            await serve_api(rt, task_status=task_status)
        finished.set()

    async with anyio.create_task_group() as tg:
        await tg.start(run)
        async with Client.open(rt) as client, Client.open(rt) as subscriber:
            assert (await client.get("/v1/health")).status == 200
            await subscriber.send_request("/v1/events")
            assert (await subscriber.read_head()).status_code == 200
            assert (await subscriber.line() or {})["type"] == "snapshot"
            assert sock_path.exists()
            scope.cancel()
            with anyio.fail_after(5):
                await finished.wait()
                assert await subscriber.line() is None  # the body ended cleanly
                for stream in (client.stream, subscriber.stream):
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        await stream.receive()
        assert not sock_path.exists()
        assert rt.feed.subscribers == 0


# -- routes ----------------------------------------------------------------------------


async def test_health_ready_status_follow_the_connection_state(short_tmp: Path) -> None:
    """Health is 200 in any state; ready is 503 with the status body until connected and synced."""
    async with serving(short_tmp) as rt, Client.open(rt) as client:
        health = await client.get("/v1/health")
        assert (health.status, health.json()) == (200, {"status": "ok", "state": "connecting"})
        ready = await client.get("/v1/ready")
        assert ready.status == 503
        assert ready.json()["state"] == "connecting"
        assert ready.json()["synced"] is False
        listing = (await client.get("/v1/containers")).json()
        assert listing["stale"] is True
        connect(rt)
        ready = await client.get("/v1/ready")
        assert ready.status == 200
        status = (await client.get("/v1/status")).json()
        assert status == ready.json()
        assert set(status) == {
            "state", "since", "attempts", "retry_in", "error", "docker",
            "revision", "containers", "synced",
        }  # fmt: skip
        assert (status["state"], status["synced"]) == ("connected", True)
        assert (await client.get("/v1/containers")).json()["stale"] is False
        assert (await client.get("/v1/health?x=1")).status == 400


async def test_container_filters(short_tmp: Path) -> None:
    """state, label (KEY and KEY=VALUE, all must match) and name filters, alone and combined."""
    records = [
        make_record("1" * 64, "web-1", "running", {"app": "web", "tier": "front"}),
        make_record("2" * 64, "web-2", "exited", {"app": "web", "tier": "back"}),
        make_record("3" * 64, "db", "running", {"app": "db", "tier": "back"}),
        make_record("4" * 64, "cache", "paused", {"app": "cache"}),
        make_record("5" * 64, "job", "created", {}),
    ]
    async with serving(short_tmp) as rt, Client.open(rt) as client:
        connect(rt)
        for record in records:
            put(rt, record)

        async def names(query: str) -> list[str]:
            reply = await client.get("/v1/containers" + query)
            assert reply.status == 200, reply.body
            body = reply.json()
            assert body["revision"] == rt.cache.revision
            assert (body["state"], body["stale"]) == ("connected", False)
            return [c["name"] for c in body["containers"]]

        assert await names("") == ["cache", "db", "job", "web-1", "web-2"]
        assert await names("?state=running") == ["db", "web-1"]
        assert await names("?state=running&state=paused") == ["cache", "db", "web-1"]
        assert await names("?label=app") == ["cache", "db", "web-1", "web-2"]
        assert await names("?label=app=web") == ["web-1", "web-2"]
        assert await names("?label=app=web&label=tier=back") == ["web-2"]
        assert await names("?label=tier&label=app=db") == ["db"]
        assert await names("?label=app=nope") == []
        assert await names("?name=web") == ["web-1", "web-2"]
        assert await names("?name=/web-2") == ["web-2"]
        assert await names("?name=b") == ["db", "job", "web-1", "web-2"]
        assert await names("?name=web&state=running&label=tier=front") == ["web-1"]
        # The unfiltered list is the cache's own bytes.
        reply = await client.get("/v1/containers")
        assert rt.cache.containers_json() in reply.body

        for bad in ("?state=sleeping", "?label=", "?label==x", "?status=running", "?all=1"):
            reply = await client.get("/v1/containers" + bad)
            assert reply.status == 400, bad
            assert reply.json()["error"]["code"] == "bad_request"


async def test_container_lookup_by_id_name_prefix_and_ambiguity(short_tmp: Path) -> None:
    """A container is found by id, name or unique prefix; 404 when unknown; 409 lists an ambiguous prefix."""
    a = make_record("abcd1" + "0" * 59, "alpha")
    b = make_record("abcd2" + "0" * 59, "beta")
    async with serving(short_tmp) as rt, Client.open(rt) as client:
        put(rt, a)
        put(rt, b)
        for ref in (a.id, "alpha", "%2Falpha", "abcd1", a.id[:12]):
            reply = await client.get(f"/v1/containers/{ref}")
            assert reply.status == 200, ref
            body = reply.json()
            assert set(body) == {"revision", "state", "stale", "container"}
            assert body["container"] == a.to_json()
            assert body["revision"] == rt.cache.revision
        reply = await client.get("/v1/containers/abcd")
        assert reply.status == 409
        error = reply.json()["error"]
        assert error["code"] == "ambiguous"
        assert error["matches"] == [{"id": a.id, "name": "alpha"}, {"id": b.id, "name": "beta"}]
        for ref in ("abc", "gamma", "abcd3"):
            reply = await client.get(f"/v1/containers/{ref}")
            assert reply.status == 404
            assert reply.json()["error"]["code"] == "not_found"


async def test_events_snapshot_then_changes_and_heartbeats(short_tmp: Path) -> None:
    """The stream starts with a snapshot, then upsert, remove, connection and heartbeat lines."""
    async with serving(short_tmp, heartbeat_seconds=0.2) as rt, Client.open(rt) as client:
        put(rt, make_record("1" * 64, "one"))
        await client.send_request("/v1/events")
        head = await client.read_head()
        assert head.status_code == 200
        headers = dict(head.headers)
        assert headers[b"content-type"] == b"application/x-ndjson"
        assert headers[b"transfer-encoding"] == b"chunked"
        with anyio.fail_after(5):
            snapshot = await client.line()
            assert snapshot is not None
            assert snapshot["type"] == "snapshot"
            assert snapshot["revision"] == rt.cache.revision
            assert snapshot["state"] == "connecting"
            assert [c["name"] for c in snapshot["containers"]] == ["one"]
            put(rt, make_record("2" * 64, "two"))
            line = await client.line()
            assert line is not None
            assert (line["type"], line["revision"], line["container"]["name"]) == (
                "upsert", snapshot["revision"] + 1, "two",
            )  # fmt: skip
            rt.cache.remove("1" * 64)
            rt.feed.notify()
            line = await client.line()
            assert line == {"type": "remove", "revision": snapshot["revision"] + 2, "id": "1" * 64}
            connect(rt)
            line = await client.line()
            assert line is not None
            assert (line["type"], line["state"], line["error"]) == ("connection", "connected", None)
            line = await client.line()
            assert line == {"type": "heartbeat", "revision": rt.cache.revision}


async def test_events_resume_with_since(short_tmp: Path) -> None:
    """since inside the history gives exactly the missed deltas; too old, too far behind or unknown: a snapshot."""
    async with serving(short_tmp, history_size=8, subscriber_queue_size=5) as rt:
        start = rt.cache.revision
        for i in range(6):
            put(rt, make_record(f"{i}" * 64, f"c{i}"))

        async def first_lines(query: str, count: int) -> list[dict[str, Any]]:
            async with Client.open(rt) as client:
                await client.send_request("/v1/events" + query)
                assert (await client.read_head()).status_code == 200
                with anyio.fail_after(5):
                    return [line for _ in range(count) if (line := await client.line())]

        lines = await first_lines(f"?since={start + 2}", 4)
        assert [(x["type"], x["revision"]) for x in lines] == [
            ("upsert", start + r) for r in range(3, 7)
        ]
        assert (await first_lines(f"?since={start + 6}", 0)) == []
        # More missed than subscriber_queue_size: a snapshot, not a resync.
        (line,) = await first_lines(f"?since={start}", 1)
        assert (line["type"], line["revision"]) == ("snapshot", start + 6)
        for i in range(6, 12):
            put(rt, make_record(f"{i:x}" * 64, f"c{i}"))
        for since in (start + 1, 0, start + 1000):  # older than the history; unknown
            (line,) = await first_lines(f"?since={since}", 1)
            assert line["type"] == "snapshot"
            assert len(line["containers"]) == 12
        async with Client.open(rt) as client:
            for bad in ("?since=abc", "?since=-1", "?since=1&since=2", "?from=1"):
                reply = await client.get("/v1/events" + bad)
                assert reply.status == 400, bad


async def test_subscriber_that_falls_behind_gets_resync_and_the_stream_ends(
    short_tmp: Path,
) -> None:
    """More changes than subscriber_queue_size between two reads: one resync line, then the end."""
    async with serving(short_tmp, subscriber_queue_size=3) as rt, Client.open(rt) as client:
        await client.send_request("/v1/events")
        assert (await client.read_head()).status_code == 200
        with anyio.fail_after(5):
            snapshot = await client.line() or {}
            assert snapshot["type"] == "snapshot"
            for i in range(5):  # in one go: the subscriber cannot run in between
                rt.cache.upsert(make_record(f"{i}" * 64, f"c{i}"))
            rt.feed.notify()
            line = await client.line()
            assert line is not None
            # The resync names the last revision this subscriber saw, so a resume skips nothing.
            assert (line["type"], line["revision"]) == ("resync", snapshot["revision"])
            assert await client.line() is None  # the chunked body ends cleanly
        assert rt.feed.overflows == 1
        assert (await client.get("/v1/health")).status == 200  # keep-alive goes on


async def test_disconnected_subscriber_is_released_at_once(short_tmp: Path) -> None:
    """A subscriber that hangs up is noticed without waiting for a heartbeat."""
    async with serving(short_tmp, heartbeat_seconds=60) as rt:
        for _ in range(5):
            async with Client.open(rt) as client:
                await client.send_request("/v1/events")
                assert (await client.read_head()).status_code == 200
                assert await client.line() is not None
        with anyio.fail_after(5):
            while rt.feed.subscribers:  # noqa: ASYNC110 - polling a plain counter
                await anyio.sleep(0.01)


async def test_metrics_on_the_socket_and_on_the_tcp_listener(short_tmp: Path) -> None:
    """GET /metrics answers on the socket; the TCP listener serves only /metrics and /v1/health."""
    port = free_tcp_port()
    settings = Settings(
        api=ApiSettings(socket=str(short_tmp / "api.sock")),
        metrics=MetricsSettings(listen=f"127.0.0.1:{port}"),
    )
    rt = build_runtime(settings)
    async with anyio.create_task_group() as tg:
        await tg.start(serve_api, rt)
        await tg.start(serve_metrics, rt)
        async with Client.open(rt) as client:
            reply = await client.get("/metrics")
            assert reply.status == 200
            assert reply.headers["content-type"].startswith("text/plain")
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            client = Client(stream)
            reply = await client.get("/metrics")
            assert reply.status == 200
            assert reply.headers["content-type"].startswith("text/plain")
            assert (await client.get("/v1/health")).json()["status"] == "ok"
            for target in ("/v1/status", "/v1/containers", "/v1/events", "/"):
                reply = await client.get(target)
                assert reply.status == 404, target
                assert reply.json()["error"]["code"] == "not_found"
        tg.cancel_scope.cancel()


# -- the socket file -------------------------------------------------------------------


def _group_name(gid: int) -> str:
    return grp.getgrgid(gid).gr_name


async def test_socket_directory_mode_and_group(short_tmp: Path) -> None:
    """A missing directory is made 0750 with the socket's group; the socket gets api.mode and api.group."""
    for group in ("65534", _group_name(65534)):
        base = short_tmp / group
        sock = base / "sub" / "api.sock"
        settings = Settings(
            api=ApiSettings(socket=str(sock), mode=0o640, group=group),
            metrics=MetricsSettings(listen=""),
        )
        rt = build_runtime(settings)
        async with anyio.create_task_group() as tg:
            await tg.start(serve_api, rt)
            st = os.stat(sock)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o640
            assert st.st_gid == 65534
            dst = os.stat(sock.parent)
            assert stat.S_IMODE(dst.st_mode) == 0o750
            assert dst.st_gid == 65534
            tg.cancel_scope.cancel()
        assert not sock.exists()


async def test_socket_startup_errors(short_tmp: Path) -> None:
    """Unknown group, a live socket and a non-socket file stop start-up; a stale socket is replaced."""
    sock = short_tmp / "api.sock"

    def runtime(**api: Any) -> Runtime:
        return build_runtime(
            Settings(api=ApiSettings(socket=str(sock), **api), metrics=MetricsSettings(listen=""))
        )

    with pytest.raises(StartupError, match="no group named"):
        await serve_api(runtime(group="no-such-group-hls"))

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens
    async with anyio.create_task_group() as tg:
        await tg.start(serve_api, runtime())
        async with Client.open(runtime()) as client:
            assert (await client.get("/v1/health")).status == 200
        with pytest.raises(StartupError, match="another process"):
            await serve_api(runtime())
        tg.cancel_scope.cancel()
    assert not sock.exists()

    sock.write_text("not a socket")
    with pytest.raises(StartupError, match="not a socket"):
        await serve_api(runtime())
    assert sock.read_text() == "not a socket"
