"""The local HTTP API over a Unix socket, and the TCP metrics listener.

Two layers, kept apart:

* **The HTTP machinery** (:class:`HttpServer`): an accept loop with a connection
  cap and, per connection, an h11 state machine fed from a non-blocking socket
  (anyio's ``wait_readable``/``wait_writable``; see :class:`_Socket` for why not
  anyio's streams). It enforces every transport limit of ``api.*`` and knows
  nothing of containers: it turns bytes into a :class:`Request`, hands it to a
  :class:`Router`, and writes back the :class:`Response` or :class:`StreamResponse`.
* **The routes** (:class:`ApiApp`, :class:`MetricsApp`): handlers that read the
  cache, the connection state machine and the change feed. Nothing here calls
  Docker.

Timers of one connection
------------------------
* The head of the first request must be complete within ``head_timeout_seconds``
  of the accept (else 408 and close): a connection that says nothing is dropped.
* Between requests a keep-alive connection may stay silent for
  ``idle_timeout_seconds``; then it is closed without a word. Once the first byte
  of the next request arrives, its head and body must be complete within
  ``head_timeout_seconds`` (else 408 and close).
* Every write must complete within ``idle_timeout_seconds``, or the connection is
  dropped: a peer that stops reading (an event-stream subscriber above all) holds
  a task and a socket for at most that long.

Limits that end a request with an answer and a close: a head over
``max_head_bytes`` (431), a body over ``max_body_bytes`` (413), anything h11
cannot parse (400). After such an answer the connection lingers (bounded) so the
answer is not lost to a reset. Connections beyond ``max_connections`` get one 503
answer and are closed at once, so the ones already open are not slowed.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import http
import inspect
import os
import socket
import stat
import struct
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl, unquote

import anyio
import h11
from anyio.abc import TaskStatus
from loguru import logger

from supervisor.actions import ActionError, Outcome
from supervisor.broadcast import follow
from supervisor.cache import dumps
from supervisor.daemon import Runtime, StartupError
from supervisor.records import CONTAINER_STATES, ContainerRecord, parse_rfc3339
from supervisor.settings import ApiSettings

__all__ = [
    "HttpError",
    "HttpServer",
    "Limits",
    "Peer",
    "Request",
    "Response",
    "Router",
    "StreamResponse",
    "serve_api",
    "serve_metrics",
]

JSON: Final = "application/json"
NDJSON: Final = "application/x-ndjson"
_RECEIVE_BYTES: Final = 65536
#: After an error answer: how long, and how much, to read and drop before closing.
_LINGER_SECONDS: Final = 1.0
_LINGER_BYTES: Final = 1 << 20
_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SOCKET_DIR_MODE: Final = 0o750
#: Status → the ``code`` of the JSON error body.
_ERROR_CODES: Final[Mapping[int, str]] = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "body_too_large",
    431: "head_too_large",
    500: "internal_error",
    501: "not_implemented",
    502: "docker_error",
    503: "unavailable",
    504: "timeout",
}


# -- requests, responses, errors -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a Unix socket, as SO_PEERCRED reports it."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    peer: Peer | None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False


@dataclass(frozen=True, slots=True)
class StreamResponse:
    """A 200 whose body is written chunk by chunk until ``chunks`` ends."""

    chunks: AsyncGenerator[bytes, None]
    content_type: str = NDJSON


class HttpError(Exception):
    """A failed request; carries the status it becomes (like h11's ``error_status_hint``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        detail: Mapping[str, object] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)
        self.detail = detail or {}
        self.close = close

    def response(self) -> Response:
        error: dict[str, object] = {
            "code": _ERROR_CODES.get(self.status, "error"),
            "message": self.message,
        }
        error.update(self.detail)
        return Response(self.status, dumps({"error": error}), JSON, self.headers, self.close)


# -- routing ---------------------------------------------------------------------------

Answer = Response | StreamResponse
#: Handlers that only read are plain functions; those that call Docker (actions) are async.
Handler = Callable[[Request, Mapping[str, str]], Answer | Awaitable[Answer]]
#: Route label for requests that match no route (bounded metric label values).
OTHER_ROUTE: Final = "other"


class Router:
    """Path templates (``/v1/containers/{ref}``) → methods → handlers.

    ``guard`` runs before anything else and may raise :class:`HttpError` (the peer
    check). :meth:`dispatch` always answers: errors become their JSON response.
    """

    def __init__(
        self,
        routes: Mapping[str, Mapping[str, Handler]],
        *,
        guard: Callable[[Request], None] | None = None,
    ) -> None:
        self._routes = [
            (template, _split(template), methods) for template, methods in routes.items()
        ]
        self._guard = guard

    def match(self, path: str) -> tuple[str, Mapping[str, str], Mapping[str, Handler]] | None:
        parts = _split(path)
        for template, pattern, methods in self._routes:
            if len(pattern) != len(parts):
                continue
            params: dict[str, str] = {}
            for want, got in zip(pattern, parts, strict=True):
                if want.startswith("{"):
                    if not got:
                        break
                    params[want[1:-1]] = unquote(got)
                elif want != got:
                    break
            else:
                return template, params, methods
        return None

    async def dispatch(self, request: Request) -> tuple[str, Response | StreamResponse]:
        """The route label (a template or ``other``) and the answer."""
        found = self.match(request.path)
        route = found[0] if found else OTHER_ROUTE
        try:
            if self._guard is not None:
                self._guard(request)
            if found is None:
                raise HttpError(404, f"no such endpoint: {request.path}")
            _, params, methods = found
            handler = methods.get(request.method)
            if handler is None:
                allow = ", ".join(sorted(methods))
                raise HttpError(
                    405,
                    f"{request.method} is not allowed on {route}; use {allow}",
                    headers=[("allow", allow)],
                )
            answer = handler(request, params)
            if inspect.isawaitable(answer):
                answer = await answer
            return route, answer
        except HttpError as exc:
            return route, exc.response()
        except Exception:
            logger.exception("API handler for {} failed", route)
            return route, HttpError(500, "internal error; see the supervisor's log").response()


def _split(path: str) -> list[str]:
    return path.split("/")


class _Query:
    """The query string of one request, checked against the parameters an endpoint takes."""

    def __init__(self, request: Request, allowed: Sequence[str]) -> None:
        unknown = sorted({name for name, _ in request.query} - set(allowed))
        if unknown:
            takes = ", ".join(allowed) if allowed else "no parameters"
            raise HttpError(
                400, f"unknown query parameter {unknown[0]!r}; this endpoint takes {takes}"
            )
        self._pairs = request.query

    def all(self, name: str) -> list[str]:
        return [value for key, value in self._pairs if key == name]

    def optional_int(self, name: str) -> int | None:
        values = self.all(name)
        if not values:
            return None
        if len(values) > 1:
            raise HttpError(400, f"{name} given more than once")
        text = values[0]
        if not text.isdigit() or len(text) > 20:
            raise HttpError(400, f"{name} must be a non-negative integer, not {text!r}")
        return int(text)


# -- the HTTP machinery ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    max_head_bytes: int = 16384
    max_body_bytes: int = 65536
    head_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 60.0
    max_connections: int = 512

    @classmethod
    def from_settings(cls, api: ApiSettings) -> Limits:
        return cls(
            max_head_bytes=api.max_head_bytes,
            max_body_bytes=api.max_body_bytes,
            head_timeout_seconds=api.head_timeout_seconds,
            idle_timeout_seconds=api.idle_timeout_seconds,
            max_connections=api.max_connections,
        )


class _Closed(Exception):
    """The connection is over (peer gone, a write timed out): close without answering."""


class _Socket:
    """A connected, non-blocking socket driven by ``anyio.wait_readable``/``wait_writable``.

    Used instead of anyio's socket streams: on asyncio, cancelling a pending receive
    on anyio's UNIX stream can make the event loop's reader callback set a result on
    the cancelled future (``InvalidStateError`` logged by the loop), and a server
    cancels receives all the time (timeouts, shutdown). ``wait_readable`` guards
    against that. Writes also go straight to the kernel, so closing after an answer
    never drops bytes still buffered in user space.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        #: A write is under way, begun but not finished.
        self.partial = False

    async def receive(self, deadline: float | None = None) -> bytes:
        """Up to 64 KiB; ``b""`` when the peer closed or reset the connection.

        Raises ``TimeoutError`` when nothing arrives before ``deadline``
        (``time.monotonic()``). Timers and yields cost only when there is a wait.
        """
        try:
            data = self.sock.recv(_RECEIVE_BYTES)
        except BlockingIOError:
            pass
        except OSError:
            return b""
        else:
            await anyio.lowlevel.checkpoint()  # the peer is ahead of us: let others run
            return data
        scope = (
            anyio.fail_after(max(0.0, deadline - time.monotonic()))
            if deadline is not None
            else contextlib.nullcontext()
        )
        with scope:
            while True:
                await anyio.wait_readable(self.sock)
                try:
                    return self.sock.recv(_RECEIVE_BYTES)
                except BlockingIOError:
                    continue
                except OSError:
                    return b""

    async def send(self, data: bytes, stall_seconds: float) -> None:
        """Write all of ``data``; raises :class:`_Closed` on error or when stuck ``stall_seconds``.

        The timer is only set up when the kernel cannot take everything at once.
        """
        view = memoryview(data)
        try:
            view = view[self.sock.send(view) :]
        except BlockingIOError:
            pass
        except OSError:
            raise _Closed from None
        if not view:
            return
        self.partial = True  # stays set if we are cancelled half-way
        with anyio.move_on_after(stall_seconds):
            while view:
                await anyio.wait_writable(self.sock)
                try:
                    view = view[self.sock.send(view) :]
                except BlockingIOError:
                    continue
                except OSError:
                    raise _Closed from None
        if view:
            raise _Closed
        self.partial = False

    def close(self) -> None:
        self.sock.close()


def peer_of(sock: socket.socket) -> Peer | None:
    """SO_PEERCRED of a Unix-socket connection; None for other sockets."""
    if sock.family != socket.AF_UNIX:
        return None
    try:
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return None
    return Peer(pid, uid, gid)


class HttpServer:
    """Accepts connections on a listener and serves HTTP/1.1 on each with h11."""

    def __init__(
        self,
        router: Router,
        limits: Limits,
        *,
        observe: Callable[[str, int, float], None],
        name: str,
    ) -> None:
        self.router = router
        self.limits = limits
        self.name = name
        self._observe = observe
        #: Connections being served (the cap applies to this).
        self.active = 0
        #: Connections refused because of the cap, since start.
        self.refused = 0
        self._refusal = _refusal_bytes()
        self._last_refusal_log = 0.0
        self._last_accept_error_log = 0.0

    async def serve(self, listener: socket.socket) -> None:
        """Accept and serve until cancelled; the caller owns (and closes) ``listener``."""
        listener.setblocking(False)
        async with anyio.create_task_group() as tg:
            while True:
                await anyio.lowlevel.checkpoint()
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    await anyio.wait_readable(listener)
                    continue
                except OSError as exc:
                    # EMFILE and friends: keep serving the connections we have.
                    now = time.monotonic()
                    if now - self._last_accept_error_log > 10:
                        self._last_accept_error_log = now
                        logger.warning("{}: accept failed: {}", self.name, exc)
                    await anyio.sleep(0.05)
                    continue
                if self.active >= self.limits.max_connections:
                    self._refuse(sock)
                    continue
                self.active += 1
                tg.start_soon(self._connection, _Socket(sock))

    def observe(self, route: str, status: int, seconds: float) -> None:
        try:
            self._observe(route, status, seconds)
        except Exception:  # metrics must never break the API
            logger.opt(exception=True).debug("request metric failed")

    def _refuse(self, sock: socket.socket) -> None:
        self.refused += 1
        # A fresh socket's send buffer is empty: this one non-blocking write fits.
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(self._refusal)
        sock.close()
        self.observe(OTHER_ROUTE, 503, 0.0)
        now = time.monotonic()
        if now - self._last_refusal_log > 10:
            self._last_refusal_log = now
            logger.warning(
                "{}: {} connections open (api.max_connections); refused {} so far",
                self.name,
                self.active,
                self.refused,
            )

    async def _connection(self, conn: _Socket) -> None:
        try:
            await _Connection(self, conn).run()
        except Exception:
            logger.opt(exception=True).warning("{}: connection failed", self.name)
        finally:
            self.active -= 1
            conn.close()


def _refusal_bytes() -> bytes:
    body = HttpError(503, "too many connections; retry later").response().body
    conn = h11.Connection(h11.SERVER)
    head = conn.send(
        h11.Response(
            status_code=503,
            reason=b"Service Unavailable",
            headers=[
                ("content-type", JSON),
                ("content-length", str(len(body))),
                ("retry-after", "1"),
                ("connection", "close"),
            ],
        )
    )
    return (head or b"") + body


@functools.cache
def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class _Connection:
    """One client connection: read a request, answer it, repeat while keep-alive allows."""

    def __init__(self, server: HttpServer, stream: _Socket) -> None:
        self.server = server
        self.limits = server.limits
        self.stream = stream
        self.peer = peer_of(stream.sock)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_bytes)
        self.started = time.perf_counter()
        # The first request's head is timed from the accept.
        self.head_deadline = time.monotonic() + self.limits.head_timeout_seconds
        self.method = ""
        self.peer_gone = False

    async def run(self) -> None:
        first = True
        while True:
            try:
                request = await self._read_request(first)
                if request is None:
                    return
                keep_alive = await self._answer(request)
            except HttpError as exc:  # the request itself was unacceptable
                with contextlib.suppress(_Closed, h11.LocalProtocolError):
                    await self._respond(OTHER_ROUTE, exc.response(), force_close=True)
                    await self._linger()
                return
            except _Closed:
                return
            if not keep_alive or self.h11.our_state is not h11.DONE:
                return
            try:
                self.h11.start_next_cycle()
            except h11.LocalProtocolError:
                return
            first = False

    # -- reading -----------------------------------------------------------------------

    def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            if status == 431:
                message = f"request head larger than {self.limits.max_head_bytes} bytes"
            else:
                message = f"malformed request: {exc}"
            raise HttpError(status, message, close=True) from None

    async def _receive(self, deadline: float | None) -> None:
        data = await self.stream.receive(deadline)
        if not data:
            raise _Closed
        self.h11.receive_data(data)

    async def _read_request(self, first: bool) -> Request | None:
        limits = self.limits
        event = self._next_event()
        if event is h11.NEED_DATA and not first:
            # Keep-alive: wait for the next request's first byte, then time its head.
            try:
                await self._receive(time.monotonic() + limits.idle_timeout_seconds)
            except TimeoutError:
                return None
            event = self._next_event()
        if not first:
            self.started = time.perf_counter()
            self.head_deadline = time.monotonic() + limits.head_timeout_seconds
        try:
            while event is h11.NEED_DATA:
                await self._receive(self.head_deadline)
                event = self._next_event()
            if isinstance(event, h11.ConnectionClosed):
                return None
            if not isinstance(event, h11.Request):  # pragma: no cover - h11 guarantees it
                raise HttpError(400, f"unexpected {type(event).__name__}", close=True)
            request = self._check_head(event)
            await self._drain_body(self.head_deadline)
        except TimeoutError:
            raise HttpError(
                408, f"request not received within {limits.head_timeout_seconds:g} s", close=True
            ) from None
        self.started = time.perf_counter()
        return request

    def _check_head(self, event: h11.Request) -> Request:
        # h11 only bounds heads that arrive in pieces; one that arrives whole is
        # measured here.
        size = len(event.method) + len(event.target) + 12
        size += sum(len(name) + len(value) + 4 for name, value in event.headers)
        if size > self.limits.max_head_bytes:
            raise HttpError(
                431, f"request head larger than {self.limits.max_head_bytes} bytes", close=True
            )
        for name, value in event.headers:
            if name == b"content-length" and int(value) > self.limits.max_body_bytes:
                raise HttpError(
                    413, f"request body larger than {self.limits.max_body_bytes} bytes", close=True
                )
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        try:
            pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=64)
        except ValueError as exc:
            raise HttpError(400, f"bad query string: {exc}", close=True) from None
        self.method = event.method.decode("ascii")
        return Request(self.method, path, tuple(pairs), self.peer)

    async def _drain_body(self, deadline: float) -> None:
        """Read and drop the request body (no endpoint takes one), bounded in size."""
        if self.h11.client_is_waiting_for_100_continue:
            await self._send(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
        size = 0
        while True:
            event = self._next_event()
            if event is h11.NEED_DATA:
                await self._receive(deadline)
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.limits.max_body_bytes:
                    raise HttpError(
                        413,
                        f"request body larger than {self.limits.max_body_bytes} bytes",
                        close=True,
                    )
            elif isinstance(event, h11.EndOfMessage):
                return
            else:  # pragma: no cover - h11 sends nothing else in SEND_BODY
                raise HttpError(400, f"unexpected {type(event).__name__}", close=True)

    async def _linger(self) -> None:
        """Half-close, then drop what the peer still sends, for a bounded time and size.

        Closing a socket with unread input makes the kernel reset the connection, and
        a reset can reach the client before it has read our answer (TCP), or replace
        the end of the stream by an error (Unix sockets).
        """
        with contextlib.suppress(OSError):
            self.stream.sock.shutdown(socket.SHUT_WR)
        drained = 0
        with anyio.move_on_after(_LINGER_SECONDS):
            while drained < _LINGER_BYTES:
                data = await self.stream.receive(None)
                if not data:
                    return
                drained += len(data)

    # -- writing -----------------------------------------------------------------------

    async def _send(self, data: bytes | None) -> None:
        if not data:
            return
        await self.stream.send(data, self.limits.idle_timeout_seconds)

    async def _answer(self, request: Request) -> bool:
        """Answer one request; whether the connection may serve another."""
        route, response = await self.server.router.dispatch(request)
        if isinstance(response, StreamResponse):
            return await self._stream(route, response)
        await self._respond(route, response)
        return not response.close

    async def _respond(self, route: str, response: Response, *, force_close: bool = False) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        if response.close or force_close:
            headers.append(("connection", "close"))
        out = (
            self.h11.send(
                h11.Response(
                    status_code=response.status, headers=headers, reason=_reason(response.status)
                )
            )
            or b""
        )
        if response.body and self.method != "HEAD":  # a HEAD answer has headers only
            out += self.h11.send(h11.Data(data=response.body)) or b""
        out += self.h11.send(h11.EndOfMessage()) or b""
        try:
            await self._send(out)
        finally:
            self.server.observe(route, response.status, time.perf_counter() - self.started)

    async def _stream(self, route: str, response: StreamResponse) -> bool:
        head = h11.Response(
            status_code=200,
            reason=b"OK",
            headers=[("content-type", response.content_type), ("cache-control", "no-store")],
        )
        async with contextlib.aclosing(response.chunks) as chunks:
            try:
                await self._send(self.h11.send(head))
            finally:
                # Time to the head: a stream's whole life is not a latency.
                self.server.observe(route, 200, time.perf_counter() - self.started)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_peer, tg.cancel_scope)
                try:
                    async for chunk in chunks:
                        await self._send(self.h11.send(h11.Data(data=chunk)))
                    await self._send(self.h11.send(h11.EndOfMessage()))
                except _Closed:
                    self.peer_gone = True
                except anyio.get_cancelled_exc_class():
                    if not self.peer_gone:  # shutting down: end the body cleanly if we can
                        self._end_stream_now()
                    raise
                tg.cancel_scope.cancel()
        return not self.peer_gone

    def _end_stream_now(self) -> None:
        """Best effort, without waiting: the terminating chunk, unless a write was cut short."""
        if self.stream.partial:
            return
        with contextlib.suppress(h11.LocalProtocolError, OSError):
            self.stream.sock.send(self.h11.send(h11.EndOfMessage()) or b"")

    async def _watch_peer(self, scope: anyio.CancelScope) -> None:
        """While streaming: notice at once when the peer goes away.

        Bytes it sends meanwhile (a pipelined request) are kept for h11, up to the
        head limit; a peer that keeps talking over a stream is dropped.
        """
        received = 0
        while received <= self.limits.max_head_bytes:
            data = await self.stream.receive(None)
            if not data:
                break
            received += len(data)
            self.h11.receive_data(data)
        self.peer_gone = True
        scope.cancel()


# -- the API's routes ------------------------------------------------------------------


def _label_filter(text: str) -> tuple[str, str | None]:
    key, sep, value = text.partition("=")
    if not key:
        raise HttpError(400, f"label filter {text!r} needs a key: label=KEY or label=KEY=VALUE")
    return key, value if sep else None


def _matches(
    record: ContainerRecord,
    states: Sequence[str],
    labels: Sequence[tuple[str, str | None]],
    names: Sequence[str],
) -> bool:
    if states and record.state not in states:
        return False
    for key, value in labels:
        have = record.labels.get(key)
        if have is None or (value is not None and have != value):
            return False
    return not names or any(name in record.name for name in names)


def _flag(query: _Query, name: str) -> bool:
    """A 0/1 (or false/true) query flag; absent means false."""
    values = query.all(name)
    if len(values) > 1:
        raise HttpError(400, f"{name} given more than once")
    if not values or values[0] in ("0", "false"):
        return False
    if values[0] in ("1", "true"):
        return True
    raise HttpError(400, f"{name} must be 1 or 0, not {values[0]!r}")


class ApiApp:
    """The routes of the Unix-socket API. Reads the runtime; never calls Docker."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.api = runtime.settings.api
        self.router = Router(
            {
                "/v1/health": {"GET": self.health},
                "/v1/ready": {"GET": self.ready},
                "/v1/status": {"GET": self.status},
                "/v1/containers": {"GET": self.containers},
                "/v1/containers/{ref}": {"GET": self.container, "DELETE": self.remove},
                "/v1/containers/{ref}/stats": {"GET": self.container_stats},
                "/v1/containers/{ref}/start": {"POST": self.start},
                "/v1/containers/{ref}/stop": {"POST": self.stop},
                "/v1/containers/{ref}/restart": {"POST": self.restart},
                "/v1/containers/{ref}/logs": {"GET": self.logs},
                "/v1/events": {"GET": self.events},
                "/metrics": {"GET": self.metrics},
            },
            guard=self.check_peer,
        )

    def check_peer(self, request: Request) -> None:
        uids, gids = self.api.allowed_uids, self.api.allowed_gids
        if not uids and not gids:
            return
        peer = request.peer
        if peer is not None and (peer.uid in uids or peer.gid in gids):
            return
        who = f"uid {peer.uid}, gid {peer.gid}" if peer else "an unidentified peer"
        raise HttpError(
            403,
            f"{who} may not use this API (see api.allowed_uids and api.allowed_gids)",
            close=True,
        )

    # -- helpers -------------------------------------------------------------------

    def _lookup(self, ref: str) -> ContainerRecord:
        """The one container ``ref`` names (id, name or id prefix), or 404 / 409."""
        found = self.runtime.cache.find(ref)
        if not found:
            hint = "" if len(ref) >= 4 else " (an id prefix needs at least 4 characters)"
            raise HttpError(404, f"no container with id, name or id prefix {ref!r}{hint}")
        if len(found) > 1:
            raise HttpError(
                409,
                f"{ref!r} is a prefix of {len(found)} container ids; give more characters",
                detail={
                    "code": "ambiguous",
                    "matches": [{"id": r.id, "name": r.name} for r in found],
                },
            )
        return found[0]

    @property
    def stale(self) -> bool:
        return not (self.runtime.machine.connected and self.runtime.watcher.synced)

    def _envelope(self) -> bytes:
        """The opening of a ``{"revision", "state", "stale", ...}`` body, read in one go."""
        return b'{"revision":%d,"state":%s,"stale":%s,' % (
            self.runtime.cache.revision,
            dumps(self.runtime.machine.state.value),
            b"true" if self.stale else b"false",
        )

    # -- handlers ------------------------------------------------------------------

    def health(self, request: Request, params: Mapping[str, str]) -> Response:
        _Query(request, ())
        state = self.runtime.machine.state.value
        return Response(200, dumps({"status": "ok", "state": state}))

    def ready(self, request: Request, params: Mapping[str, str]) -> Response:
        _Query(request, ())
        ready = not self.stale
        return Response(200 if ready else 503, dumps(self.runtime.watcher.status()))

    def status(self, request: Request, params: Mapping[str, str]) -> Response:
        _Query(request, ())
        return Response(200, dumps(self.runtime.watcher.status()))

    def containers(self, request: Request, params: Mapping[str, str]) -> Response:
        query = _Query(request, ("state", "label", "name", "stats"))
        with_stats = _flag(query, "stats")
        states = query.all("state")
        for state in states:
            if state not in CONTAINER_STATES:
                raise HttpError(
                    400, f"state must be one of {', '.join(CONTAINER_STATES)}, not {state!r}"
                )
        labels = [_label_filter(text) for text in query.all("label")]
        names = [name.lstrip("/") for name in query.all("name")]
        cache = self.runtime.cache
        if with_stats:
            listing = self.runtime.stats.containers_json(
                r for r in cache.records() if _matches(r, states, labels, names)
            )
        elif not (states or labels or names):
            listing = cache.containers_json()  # built once per revision, spliced as is
        else:
            listing = (
                b"["
                + b",".join(
                    cache.record_json(r.id)
                    for r in cache.records()
                    if _matches(r, states, labels, names)
                )
                + b"]"
            )
        return Response(200, self._envelope() + b'"containers":' + listing + b"}")

    def container_stats(self, request: Request, params: Mapping[str, str]) -> Response:
        _Query(request, ())
        ref = params["ref"]
        record = self._lookup(ref)
        stats = self.runtime.stats.json_bytes(record.id)  # null: not running or not sampled yet
        return Response(
            200,
            self._envelope()
            + b'"id":%s,"name":%s,"stats":%s}' % (dumps(record.id), dumps(record.name), stats),
        )

    def container(self, request: Request, params: Mapping[str, str]) -> Response:
        _Query(request, ())
        ref = params["ref"]
        record_json = self.runtime.cache.record_json(self._lookup(ref).id)
        return Response(200, self._envelope() + b'"container":' + record_json + b"}")

    def events(self, request: Request, params: Mapping[str, str]) -> StreamResponse:
        since = _Query(request, ("since",)).optional_int("since")
        rt = self.runtime
        return StreamResponse(
            follow(
                rt.cache,
                rt.machine,
                rt.feed,
                since=since,
                max_lag=self.api.subscriber_queue_size,
                heartbeat_seconds=self.api.heartbeat_seconds,
                clock=time.monotonic,
                stale=lambda: self.stale,
            )
        )

    def metrics(self, request: Request, params: Mapping[str, str]) -> Response:
        body, content_type = self.runtime.metrics.render()
        return Response(200, body, content_type)

    # -- actions (supervisor.actions: policy, Docker, audit) -----------------------

    async def start(self, request: Request, params: Mapping[str, str]) -> Response:
        return await self._act("start", request, params)

    async def stop(self, request: Request, params: Mapping[str, str]) -> Response:
        return await self._act("stop", request, params)

    async def restart(self, request: Request, params: Mapping[str, str]) -> Response:
        return await self._act("restart", request, params)

    async def remove(self, request: Request, params: Mapping[str, str]) -> Response:
        return await self._act("remove", request, params)

    async def _act(self, action: str, request: Request, params: Mapping[str, str]) -> Response:
        actions = self.runtime.actions
        timeout: int | None = None
        force = volumes = False
        try:
            if action in ("stop", "restart"):
                timeout = _Query(request, ("timeout",)).optional_int("timeout")
                if timeout is not None and timeout > _MAX_STOP_TIMEOUT_SECONDS:
                    raise HttpError(400, f"timeout must be at most {_MAX_STOP_TIMEOUT_SECONDS} s")
            elif action == "remove":
                query = _Query(request, ("force", "volumes"))
                force, volumes = _flag(query, "force"), _flag(query, "volumes")
            else:
                _Query(request, ())
        except HttpError as exc:
            actions.reject(action, params["ref"], request.peer, dict(request.query), exc.message)
            raise
        try:
            outcome = await actions.run(
                action,
                params["ref"],
                request.peer,
                timeout_seconds=timeout,
                force=force,
                volumes=volumes,
            )
        except ActionError as exc:
            raise _action_error(exc) from None
        return Response(200, self._envelope() + _outcome_json(outcome))

    async def logs(self, request: Request, params: Mapping[str, str]) -> StreamResponse:
        actions = self.runtime.actions
        try:
            query = _Query(request, ("tail", "since", "timestamps", "follow"))
            tail = _tail(query)
            since = _since(query)
            timestamps, follow_ = _flag(query, "timestamps"), _flag(query, "follow")
        except HttpError as exc:
            actions.reject("logs", params["ref"], request.peer, dict(request.query), exc.message)
            raise
        try:
            lines = await actions.open_logs(
                params["ref"],
                request.peer,
                tail=tail,
                since=since,
                timestamps=timestamps,
                follow=follow_,
            )
        except ActionError as exc:
            raise _action_error(exc) from None
        return StreamResponse(lines)


#: The longest ``timeout`` a stop or restart may ask Docker to wait before it kills.
_MAX_STOP_TIMEOUT_SECONDS: Final = 3600


def _action_error(exc: ActionError) -> HttpError:
    return HttpError(exc.status, exc.message, detail={"code": exc.code, **exc.detail})


def _outcome_json(outcome: Outcome) -> bytes:
    """The rest of an action's answer after the envelope: what was done, and the record now."""
    record = dumps(outcome.record.to_json()) if outcome.record is not None else b"null"
    return b'"action":%s,"id":%s,"name":%s,"changed":%s,"settled":%s,"container":%s}' % (
        dumps(outcome.action),
        dumps(outcome.container_id),
        dumps(outcome.name),
        b"true" if outcome.changed else b"false",
        b"true" if outcome.settled else b"false",
        record,
    )


def _tail(query: _Query) -> int | None:
    """``tail``: a number of lines, or ``all`` (the default)."""
    values = query.all("tail")
    if values == ["all"]:
        return None
    return query.optional_int("tail")


def _since(query: _Query) -> float | None:
    """``since``: Unix seconds (fractions allowed) or an RFC 3339 time."""
    values = query.all("since")
    if not values:
        return None
    if len(values) > 1:
        raise HttpError(400, "since given more than once")
    text = values[0]
    try:
        seconds = float(text) if text.replace(".", "", 1).isdigit() else parse_rfc3339(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 1e11:
        raise HttpError(
            400,
            f"since must be Unix seconds or an RFC 3339 time such as 2026-01-31T12:00:00Z, not {text!r}",
        )
    return seconds


class MetricsApp:
    """The TCP listener's routes: ``GET /metrics`` and ``GET /v1/health``, nothing else."""

    def __init__(self, runtime: Runtime) -> None:
        api = ApiApp(runtime)
        self.router = Router({"/metrics": {"GET": api.metrics}, "/v1/health": {"GET": api.health}})


# -- the Unix socket -------------------------------------------------------------------


def _group_id(group: str) -> int | None:
    if not group:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"api.group: there is no group named {group!r}") from None


def _ensure_directory(path: str, gid: int | None) -> None:
    """Create the socket's directory (0750, and the socket's group) when missing."""
    if os.path.isdir(path):
        return
    try:
        os.makedirs(path, mode=_SOCKET_DIR_MODE, exist_ok=True)
        os.chmod(path, _SOCKET_DIR_MODE)
        if gid is not None:
            os.chown(path, -1, gid)
    except OSError as exc:
        raise StartupError(f"cannot create the socket directory {path}: {exc.strerror}") from None


def _is_live(path: str) -> bool:
    """Whether something accepts connections on the socket file at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except BlockingIOError:
        return True  # listening, its backlog full
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        raise StartupError(f"cannot check whether {path} is in use: {exc.strerror}") from None
    finally:
        probe.close()
    return True


def _clear_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(
            f"{path} exists and is not a socket; remove it or choose another api.socket"
        )
    if _is_live(path):
        raise StartupError(
            f"another process (another supervisor?) is serving {path}; stop it or choose"
            " another api.socket"
        )
    logger.info("replacing the stale socket {}", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def bind_unix_socket(api: ApiSettings) -> tuple[socket.socket, tuple[int, int]]:
    """Bind and listen on ``api.socket`` with its mode and group; (socket, (dev, inode)).

    The file is created with no permissions at all (umask 0777 around ``bind``),
    then given its group and mode, so no one can connect in between.
    """
    path = api.socket
    gid = _group_id(api.group)
    _ensure_directory(os.path.dirname(os.path.abspath(path)), gid)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o777)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        try:
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, api.mode)
        except OSError as exc:
            os.unlink(path)
            raise StartupError(
                f"cannot set group {api.group or '-'} and mode {api.mode:04o} on {path}:"
                f" {exc.strerror}"
            ) from None
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
        st = os.stat(path)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def _remove_socket(path: str, identity: tuple[int, int]) -> None:
    """Remove the socket file, unless it is no longer ours (replaced by a newer instance)."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
    except OSError as exc:
        logger.warning("could not remove {}: {}", path, exc.strerror)


def _observer(runtime: Runtime) -> Callable[[str, int, float], None]:
    return runtime.metrics.api_request


async def serve_api(
    runtime: Runtime, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve the API on ``api.socket`` until cancelled; ready once the socket is bound.

    Raises :class:`~supervisor.daemon.StartupError` when the socket cannot be had.
    The socket file is removed on the way out.
    """
    api = runtime.settings.api
    sock, identity = bind_unix_socket(api)
    server = HttpServer(
        ApiApp(runtime).router, Limits.from_settings(api), observe=_observer(runtime), name="api"
    )
    try:
        task_status.started()
        await server.serve(sock)
    finally:
        sock.close()
        _remove_socket(api.socket, identity)


async def serve_metrics(
    runtime: Runtime, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``GET /metrics`` and ``GET /v1/health`` on ``metrics.listen`` until cancelled."""
    settings = runtime.settings.metrics
    address = settings.address
    if address is None:  # metrics disabled
        task_status.started()
        return
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise StartupError(
            f"cannot listen for metrics on {settings.listen}: {exc.strerror or exc}"
        ) from None
    server = HttpServer(
        MetricsApp(runtime).router,
        Limits.from_settings(runtime.settings.api),
        observe=_observer(runtime),
        name="metrics",
    )
    try:
        task_status.started()
        await server.serve(sock)
    finally:
        sock.close()
