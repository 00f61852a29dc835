"""The one door to Docker: every docker-py call, run in worker threads, failures classified.

Nothing else in the package imports docker-py. Calls are blocking, so each runs
in a worker thread; failures leave this module only as :class:`DockerCallError`,
carrying a classified :class:`~supervisor.state.DockerFailure` with a remedy for
humans.

The worker threads are daemon threads of our own (:func:`_in_daemon_thread`),
not anyio's: anyio's are not daemon threads, so one stuck in a call to a Docker
that accepts connections but never answers (hung, stopped with SIGSTOP) would
keep the process alive after SIGTERM until the call's socket timeout
(``docker.call_timeout_seconds``, 30 s by default). A cancelled call abandons
its thread, which ends when the call does.

docker-py creates its client by asking ``/version`` (API version negotiation),
so :meth:`DockerGateway.open_session` makes a new client on every attempt and
the version is negotiated, never pinned.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import http.client
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import docker
import docker.errors
import docker.tls
import docker.utils
import requests.exceptions
import urllib3.exceptions

from supervisor.access import Endpoint, process_facts, remedy, socket_facts
from supervisor.settings import DockerSettings
from supervisor.state import DockerFailure, ErrorKind

__all__ = [
    "ActionGateway",
    "ActionSession",
    "DockerCallError",
    "DockerGateway",
    "DockerSession",
    "EventStream",
    "Gateway",
    "LogStream",
    "Session",
    "classify",
]

T = TypeVar("T")


class _DaemonWorkers:
    """Reusable daemon threads; an idle one ends after ``IDLE_SECONDS``."""

    IDLE_SECONDS = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[Callable[[], None]]] = []

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` (which must not raise) in an idle thread, or a new one."""
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            thread = threading.Thread(
                target=self._work, args=(inbox,), name="docker call", daemon=True
            )
            thread.start()
        inbox.put(job)

    def _work(self, inbox: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            try:
                job = inbox.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if inbox in self._idle:
                        self._idle.remove(inbox)
                        return
                continue  # handed a job just as the wait timed out
            job()
            with self._lock:
                self._idle.append(inbox)


_WORKERS = _DaemonWorkers()


async def _in_daemon_thread(func: Callable[[], T]) -> T:
    """``func()`` in a daemon thread; on cancellation the thread is abandoned (see above)."""
    done = anyio.Event()
    token = anyio.lowlevel.current_token()
    outcome: list[tuple[Any, BaseException | None]] = []

    def job() -> None:
        try:
            outcome.append((func(), None))
        except BaseException as exc:
            outcome.append((None, exc))
        # Wake the caller; once the event loop is gone there is nobody to tell.
        with contextlib.suppress(RuntimeError):
            anyio.from_thread.run_sync(done.set, token=token)

    _WORKERS.submit(job)
    await done.wait()
    value, error = outcome.pop()
    if error is None:
        result: T = value
        return result
    try:
        raise error
    finally:
        del error  # no cycle through this frame's traceback


class DockerCallError(Exception):
    """A Docker call failed; ``failure`` says how, and what to do about it.

    When Docker (or a proxy) answered with an HTTP error, ``status`` is its status
    code and ``explanation`` Docker's own message; both are None when no answer came.
    """

    def __init__(
        self,
        failure: DockerFailure,
        *,
        status: int | None = None,
        explanation: str | None = None,
    ) -> None:
        super().__init__(f"{failure.kind.value}: {failure.message}")
        self.failure = failure
        self.status = status
        self.explanation = explanation


# -- the interface the watcher sees (a fake implements it for unit tests) ------------


class EventStream(Protocol):
    async def next(self) -> object:
        """The next event as decoded JSON (raw bytes if it does not decode), or None at the end."""

    async def aclose(self) -> None: ...


class Session(Protocol):
    """A live client of one Docker endpoint."""

    version: Mapping[str, Any]

    async def ping(self) -> None: ...
    async def list_ids(self) -> list[str]: ...
    async def inspect(self, container_id: str) -> Mapping[str, Any] | None:
        """The inspect body, or None when the container does not exist (any more)."""

    async def stats(self, container_id: str) -> Mapping[str, Any] | None:
        """One stats sample (no stream), or None when the container is gone or not running."""

    async def open_events(self) -> EventStream: ...
    async def aclose(self) -> None: ...


class Gateway(Protocol):
    endpoint: Endpoint

    async def open_session(self) -> Session: ...


class LogStream(Protocol):
    async def next(self) -> bytes | None:
        """The next bytes of the log stream as they arrive, or None at its end."""

    async def aclose(self) -> None: ...


class ActionSession(Session, Protocol):
    """A session that may also change containers (the actions issue); see :class:`DockerSession`."""

    async def start(self, container_id: str) -> bool: ...
    async def stop(self, container_id: str, timeout_seconds: int) -> bool: ...
    async def restart(self, container_id: str, timeout_seconds: int) -> bool: ...
    async def remove(self, container_id: str, *, force: bool, volumes: bool) -> bool: ...
    async def open_logs(
        self,
        container_id: str,
        *,
        follow: bool,
        tail: int | None,
        since: float | None,
        timestamps: bool,
    ) -> LogStream: ...


class ActionGateway(Protocol):
    endpoint: Endpoint

    async def open_session(self) -> ActionSession: ...


# -- classification ------------------------------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, its causes and contexts, and exceptions nested in ``args``.

    requests and urllib3 wrap the OSError that says what really happened in the
    ``args`` of their own exceptions rather than in ``__cause__``.
    """
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(a for a in current.args if isinstance(a, BaseException))
        for linked in (current.__context__, current.__cause__):
            if linked is not None:
                stack.append(linked)


def _status(exc: BaseException) -> tuple[int, str | None] | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    if not isinstance(code, int):
        return None
    request = getattr(response, "request", None)
    path = getattr(request, "path_url", None)
    return code, path if isinstance(path, str) else None


def classify(
    exc: BaseException, endpoint: Endpoint, *, timeout_seconds: float | None = None
) -> DockerFailure:
    """Turn any failure of a Docker call into a :class:`DockerFailure` (kind, message, remedy)."""
    kind = ErrorKind.API_ERROR
    refused_path: str | None = None
    chain = list(_chain(exc))
    for link in chain:
        status = _status(link)
        if status and status[0] in (401, 403):
            kind, refused_path = ErrorKind.FORBIDDEN, status[1]
            break
        if isinstance(link, PermissionError) or (
            isinstance(link, OSError) and link.errno in (errno.EACCES, errno.EPERM)
        ):
            kind = ErrorKind.PERMISSION_DENIED
            break
        if isinstance(link, FileNotFoundError):
            kind = ErrorKind.SOCKET_MISSING
            break
        if isinstance(link, ConnectionRefusedError | ConnectionResetError | BrokenPipeError):
            # A reset or a broken pipe is Docker going away mid-conversation (killed,
            # restarting): to the operator the same as nothing answering.
            kind = ErrorKind.CONNECTION_REFUSED
            break
        if isinstance(link, TimeoutError | requests.exceptions.Timeout):
            kind = ErrorKind.TIMEOUT
            break
    sock = proc = None
    if kind is ErrorKind.PERMISSION_DENIED and endpoint.socket_path:
        sock, proc = socket_facts(endpoint.socket_path), process_facts()
    message = _message(exc, kind, endpoint)
    return DockerFailure(
        kind=kind,
        message=message,
        remedy=remedy(
            kind,
            endpoint,
            sock=sock,
            proc=proc,
            refused_path=refused_path,
            timeout_seconds=timeout_seconds,
        ),
        at=time.time(),
    )


def _message(exc: BaseException, kind: ErrorKind, endpoint: Endpoint) -> str:
    target = endpoint.socket_path or endpoint.url
    if kind is ErrorKind.PERMISSION_DENIED:
        return f"permission denied on {target}"
    if kind is ErrorKind.SOCKET_MISSING:
        return f"{target} does not exist"
    if kind is ErrorKind.CONNECTION_REFUSED:
        return f"connection refused by {target}"
    if kind is ErrorKind.TIMEOUT:
        return f"timed out talking to {target}"
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# -- the real gateway ----------------------------------------------------------------


@dataclass(slots=True)
class DockerGateway:
    settings: DockerSettings
    endpoint: Endpoint

    async def open_session(self) -> DockerSession:
        """Create a client (negotiating the API version) and check Docker answers."""
        if self.endpoint.socket_path:
            await self._run(self._probe_socket)
        client = await self._run(self._create_client)
        session = DockerSession(client, self)
        try:
            session.version = await session.call(client.version)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await session.aclose()
            raise
        return session

    def _probe_socket(self) -> None:
        """Connect once by hand: the common failures (ENOENT, EACCES, ECONNREFUSED) surface
        here, where the socket is closed properly; docker-py leaks it on a failed connect."""
        assert self.endpoint.socket_path is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(self.settings.call_timeout_seconds)
            probe.connect(self.endpoint.socket_path)

    def _create_client(self) -> Any:
        s = self.settings
        url = self.endpoint.url
        tls: Any = False
        if s.tls_verify or s.cert_path:
            cert_path = s.cert_path or os.path.join(os.path.expanduser("~"), ".docker")
            tls = docker.tls.TLSConfig(
                client_cert=(
                    os.path.join(cert_path, "cert.pem"),
                    os.path.join(cert_path, "key.pem"),
                ),
                ca_cert=os.path.join(cert_path, "ca.pem"),
                verify=s.tls_verify,
            )
            if url.startswith("tcp://"):
                url = "https://" + url[len("tcp://") :]
        return docker.APIClient(
            base_url=url,
            version="auto",
            timeout=s.call_timeout_seconds,
            tls=tls,
            max_pool_size=s.inspect_concurrency + 4,
        )

    async def _run(self, func: Callable[[], T]) -> T:
        """Run a blocking call in a worker thread, translating its failure."""
        with self._translate(self.settings.call_timeout_seconds):
            # The thread is abandoned on cancellation; the call's own socket timeout
            # (set on the client) bounds how long it can linger.
            return await _in_daemon_thread(func)

    @contextmanager
    def _translate(self, timeout: float | None) -> Iterator[None]:
        try:
            yield
        except (
            docker.errors.DockerException,
            requests.exceptions.RequestException,
            # A stream read bypasses requests, so urllib3's and http.client's own
            # errors (a connection broken mid-chunk) arrive unwrapped.
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
            OSError,
        ) as exc:
            answered = _status(exc)
            explanation = getattr(exc, "explanation", None)
            raise DockerCallError(
                classify(exc, self.endpoint, timeout_seconds=timeout),
                status=answered[0] if answered else None,
                explanation=str(explanation) if explanation else None,
            ) from exc


class DockerSession:
    """A connected docker-py ``APIClient``; closed with :meth:`aclose`."""

    def __init__(self, client: Any, gateway: DockerGateway) -> None:
        self._client = client
        self._gateway = gateway
        self.version: Mapping[str, Any] = {}

    async def call(self, func: Callable[..., T], *args: Any) -> T:
        return await self._gateway._run(lambda: func(*args))

    async def ping(self) -> None:
        with anyio.fail_after(self._gateway.settings.ping_timeout_seconds):
            await self.call(self._client.ping)

    async def list_ids(self) -> list[str]:
        rows = await self.call(lambda: self._client.containers(all=True, quiet=True))
        return [str(row["Id"]) for row in rows]

    async def inspect(self, container_id: str) -> Mapping[str, Any] | None:
        try:
            body: Mapping[str, Any] = await self.call(self._client.inspect_container, container_id)
        except DockerCallError as exc:
            cause = exc.__cause__
            if isinstance(cause, docker.errors.NotFound):
                return None
            raise
        return body

    async def stats(self, container_id: str) -> Mapping[str, Any] | None:
        # One-shot (API >= 1.41) answers at dockerd's next collection tick (up to 1 s);
        # without it, Docker waits for two ticks to fill in precpu_stats, which we do not use.
        one_shot = not docker.utils.version_lt(self._client.api_version, "1.41")
        try:
            body: Mapping[str, Any] = await self.call(
                lambda: self._client.stats(container_id, stream=False, one_shot=one_shot or None)
            )
        except DockerCallError as exc:
            cause = exc.__cause__
            if isinstance(cause, docker.errors.NotFound) or (
                isinstance(cause, docker.errors.APIError) and cause.status_code == 409
            ):
                return None
            raise
        return body

    async def open_events(self) -> DockerEventStream:
        def subscribe() -> Any:
            stream = self._client.events(decode=False, filters={"type": ["container"]})
            # docker-py streams whatever answers, a proxy's 403 page included.
            response = stream._response
            if response.status_code >= 400:
                response.close()
                response.raise_for_status()
            return stream

        return DockerEventStream(await self.call(subscribe), self._gateway)

    # -- actions: each True when Docker changed something, False when it answered 304
    # (already started, already stopped). Docker's refusals keep their status on the
    # DockerCallError (404 no such container, 409 conflict with its state).

    async def start(self, container_id: str) -> bool:
        return await self.call(lambda: self._change("POST", "/containers/{0}/start", container_id))

    async def stop(self, container_id: str, timeout_seconds: int) -> bool:
        return await self.call(
            lambda: self._change(
                "POST",
                "/containers/{0}/stop",
                container_id,
                {"t": timeout_seconds},
                timeout_seconds,
            )
        )

    async def restart(self, container_id: str, timeout_seconds: int) -> bool:
        return await self.call(
            lambda: self._change(
                "POST",
                "/containers/{0}/restart",
                container_id,
                {"t": timeout_seconds},
                timeout_seconds,
            )
        )

    async def remove(self, container_id: str, *, force: bool, volumes: bool) -> bool:
        params = {"force": int(force), "v": int(volumes), "link": 0}
        return await self.call(
            lambda: self._change("DELETE", "/containers/{0}", container_id, params)
        )

    def _change(
        self,
        method: str,
        template: str,
        container_id: str,
        params: Mapping[str, object] | None = None,
        extra_seconds: float = 0.0,
    ) -> bool:
        client = self._client
        # Stop and restart wait up to their own timeout before Docker answers.
        timeout = client.timeout + extra_seconds if client.timeout is not None else None
        send = client._post if method == "POST" else client._delete
        response = send(client._url(template, container_id), params=params, timeout=timeout)
        try:
            client._raise_for_status(response)
            return bool(response.status_code != 304)
        finally:
            response.close()

    async def open_logs(
        self,
        container_id: str,
        *,
        follow: bool,
        tail: int | None,
        since: float | None,
        timestamps: bool,
    ) -> DockerLogStream:
        """``GET /containers/{id}/logs`` (stdout and stderr), its body to be read as it comes.

        docker-py's ``logs()`` cannot be used: it demultiplexes the frames itself and
        drops which stream each came from. The stream of ``follow`` has no read
        timeout (a quiet container says nothing for hours); it ends when Docker ends
        it (the container stopped) or when :meth:`DockerLogStream.aclose` closes it.
        """
        client = self._client
        params: dict[str, object] = {
            "stdout": 1,
            "stderr": 1,
            "follow": int(follow),
            "timestamps": int(timestamps),
            "tail": "all" if tail is None else tail,
        }
        if since is not None:
            params["since"] = f"{since:.9f}"

        def request() -> Any:
            response = client._get(
                client._url("/containers/{0}/logs", container_id), params=params, stream=True
            )
            try:
                client._raise_for_status(response)
            except BaseException:
                response.close()
                raise
            if follow:
                sock = _socket_of(response)
                if sock is not None:
                    sock.settimeout(None)
            return response

        return DockerLogStream(await self.call(request), self._gateway)

    async def aclose(self) -> None:
        await _in_daemon_thread(self._client.close)


def _socket_of(response: Any) -> socket.socket | None:
    """The socket under a streamed requests response (unix or TCP, TLS or not), if still open."""
    try:
        raw = response.raw._fp.fp.raw
    except AttributeError:
        return None
    sock = getattr(raw, "_sock", None) or getattr(raw, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


class _BlockingStream(abc.ABC, Generic[T]):
    """A blocking reader run one read at a time in a daemon thread.

    ``aclose()`` from another task pulls the connection from under a blocked read,
    which then reports the end (None) rather than whatever it tripped over.
    """

    def __init__(self, gateway: DockerGateway) -> None:
        self._gateway = gateway
        self._closed = False

    @abc.abstractmethod
    def _next(self) -> T | None: ...

    @abc.abstractmethod
    def _close_quietly(self) -> None: ...

    async def next(self) -> T | None:
        if self._closed:
            return None
        try:
            with self._gateway._translate(None):
                return await _in_daemon_thread(self._next)
        except Exception:
            if self._closed:
                # http.client races the close and can fail with AttributeError: this
                # is the end of the stream all the same.
                return None
            raise

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            with anyio.CancelScope(shield=True):
                await _in_daemon_thread(self._close_quietly)


class DockerLogStream(_BlockingStream[bytes]):
    """A log response's body, read as it arrives; see :meth:`DockerSession.open_logs`."""

    READ_BYTES = 65536

    def __init__(self, response: Any, gateway: DockerGateway) -> None:
        super().__init__(gateway)
        self._response = response

    def _next(self) -> bytes | None:
        data: bytes = self._response.raw.read1(self.READ_BYTES)
        return data or None

    def _close_quietly(self) -> None:
        sock = _socket_of(self._response)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self._response.close()


class DockerEventStream(_BlockingStream[object]):
    """docker-py's event iterator, one event at a time.

    docker-py gives the stream no read timeout; the watcher's liveness ping closes
    it when Docker stops answering.
    """

    def __init__(self, stream: Any, gateway: DockerGateway) -> None:
        super().__init__(gateway)
        self._stream = stream
        self._buffer = b""

    def _next(self) -> object:
        # Docker writes one JSON object per line. Split lines ourselves rather than
        # let docker-py decode, so one malformed line is reported, not fatal.
        while True:
            while b"\n" not in self._buffer:
                try:
                    chunk = next(self._stream)
                except StopIteration:
                    return None
                self._buffer += chunk.encode() if isinstance(chunk, str) else chunk
            line, _, self._buffer = self._buffer.partition(b"\n")
            if not line.strip():
                continue
            try:
                return json.loads(line)
            except ValueError:
                return line

    def _close_quietly(self) -> None:
        # The stream may already be broken: closing is best effort. docker-py's
        # close() shuts the socket down, but the fd stays open until the response's
        # file object is closed too.
        with contextlib.suppress(Exception):
            self._stream.close()
        with contextlib.suppress(Exception):
            self._stream._response.close()
