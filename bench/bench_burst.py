"""Burst: containers created and started by 4 parallel clients, then removed.

The supervisor reaches dockerd through a recording Unix-socket proxy, so every
request it makes is counted (the clients making the burst talk to dockerd
directly). Side by side: a docker-py events client counts Docker's events per
container, the proxy counts the supervisor's inspects per container, and a
subscriber of ``/v1/events`` applies every delta to its snapshot. Measured per
phase (create+start, remove): the time from the last client call returning to
``/v1/containers`` equalling Docker's own list, inspects per container, and whether
the subscriber's state equals the final ``/v1/containers`` with no revision missing.

    .venv/bin/python bench/bench_burst.py [--containers N] [--quick]   # N/2 in the burst
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (
    BENCH_LABEL,
    Check,
    Options,
    Section,
    docker_view,
    log,
    mirror_view,
    ms,
    private_engine,
    standalone,
    table,
)

TITLE = "Burst"
CLIENTS = 4
CONVERGE_TARGET_SECONDS = 1.0
INSPECT_TARGET = 2.0

_REQUEST_LINE = re.compile(rb"^(GET|HEAD|POST|PUT|DELETE|PATCH) (\S+) HTTP/1\.[01]$")
_INSPECT = re.compile(r"^(?:/v[\d.]+)?/containers/([0-9a-f]{64})/json$")


class RecordingProxy:
    """A Unix-socket proxy in front of dockerd that records each request line (threads)."""

    def __init__(self, upstream: str, path: str) -> None:
        self.upstream = upstream
        self.path = path
        self.requests: list[tuple[float, str, str]] = []  # (time, method, target)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(128)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._accepter = threading.Thread(target=self._accept, name="proxy accept", daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._accepter.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        self._accepter.join(5)
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                server.connect(self.upstream)
            except OSError:
                server.close()
                client.close()
                continue
            with self._lock:
                self._open.update((client, server))
            down = threading.Thread(target=self._pipe, args=(server, client, False), daemon=True)
            up = threading.Thread(target=self._pair, args=(client, server, down), daemon=True)
            down.start()
            up.start()

    def _pair(self, client: socket.socket, server: socket.socket, down: threading.Thread) -> None:
        self._pipe(client, server, True)
        down.join()
        with self._lock:
            self._open.difference_update((client, server))
        client.close()
        server.close()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        buffer = b""
        try:
            while data := src.recv(65536):
                if record:
                    buffer += data
                    *lines, buffer = buffer.split(b"\r\n")
                    for line in lines:
                        if m := _REQUEST_LINE.match(line):
                            self.requests.append((time.monotonic(), m[1].decode(), m[2].decode()))
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):  # either side gone: end both directions
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def inspects_since(self, mark: int) -> collections.Counter[str]:
        """Inspect calls per container id among the requests after index ``mark``."""
        counts: collections.Counter[str] = collections.Counter()
        for _, method, target in self.requests[mark:]:
            if method == "GET" and (m := _INSPECT.match(target.split("?", 1)[0])):
                counts[m[1]] += 1
        return counts


class Subscriber(threading.Thread):
    """Follows ``/v1/events`` and applies every delta to its first snapshot."""

    def __init__(self, sup: Any) -> None:
        super().__init__(name="subscriber", daemon=True)
        self.conn, self.response = sup.open_events(timeout=120)
        self.state: dict[str, dict[str, Any]] = {}
        self.revision = -1
        self.gaps: list[tuple[int, int]] = []
        self.resyncs = 0
        self.deltas: collections.Counter[str] = collections.Counter()
        self.error: str | None = None

    def run(self) -> None:
        try:
            while line := self.response.readline():
                obj = json.loads(line)
                kind = obj["type"]
                if kind == "snapshot":
                    self.state = {c["id"]: c for c in obj["containers"]}
                    self.revision = obj["revision"]
                elif kind in ("upsert", "remove"):
                    if obj["revision"] != self.revision + 1:
                        self.gaps.append((self.revision, obj["revision"]))
                    self.revision = obj["revision"]
                    if kind == "upsert":
                        self.state[obj["container"]["id"]] = obj["container"]
                        self.deltas[obj["container"]["id"]] += 1
                    else:
                        self.state.pop(obj["id"], None)
                        self.deltas[obj["id"]] += 1
                elif kind == "resync":
                    self.resyncs += 1
        except Exception as exc:
            self.error = repr(exc)

    def close(self) -> None:
        if self.conn.sock is not None:
            with contextlib.suppress(OSError):
                self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        self.join(5)

    def agrees_with(self, sup: Any, timeout: float = 10.0) -> bool:
        """Once caught up with ``/v1/containers``: same revision, same records, no gap."""
        body = sup.get_json("/v1/containers")
        deadline = time.monotonic() + timeout
        while self.revision < body["revision"] and time.monotonic() < deadline:
            time.sleep(0.01)
        want = {c["id"]: c for c in body["containers"]}
        return (
            self.revision == body["revision"]
            and self.state == want
            and not self.gaps
            and not self.resyncs
            and self.error is None
        )


class DockerEvents(threading.Thread):
    """A plain docker-py events client: Docker's events per container."""

    def __init__(self, host: str) -> None:
        import docker

        super().__init__(name="docker events", daemon=True)
        self.api = docker.APIClient(base_url=host, version="auto", timeout=None)
        self.stream = self.api.events(decode=True, filters={"type": "container"})
        self.counts: collections.Counter[str] = collections.Counter()

    def run(self) -> None:
        with contextlib.suppress(Exception):
            for event in self.stream:
                self.counts[event.get("id", "")] += 1

    def close(self) -> None:
        self.stream.close()
        self.join(5)
        self.api.close()


def _in_threads(work: Callable[[Any, int], None], host: str) -> float:
    """``work(api, worker)`` in CLIENTS threads, each with its own client; when the last returned."""
    import docker

    errors: list[BaseException] = []

    def target(worker: int) -> None:
        try:
            with docker.APIClient(base_url=host, version="auto", timeout=120) as api:
                work(api, worker)
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(w,), daemon=True) for w in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    last_returned = time.monotonic()
    if errors:
        raise errors[0]
    return last_returned


def _create_and_start(host: str, count: int) -> tuple[list[str], float]:
    """``count`` running containers made by CLIENTS clients: (ids, when the last call returned)."""
    from tests.dockerd import TEST_IMAGE

    made: list[str] = []

    def work(api: Any, worker: int) -> None:
        host_config = api.create_host_config(network_mode="none")
        for n in range(worker, count, CLIENTS):
            cid = api.create_container(
                TEST_IMAGE,
                command=["/bin/sleep", "100000"],
                name=f"burst-{n:05d}",
                labels={BENCH_LABEL: "burst"},
                host_config=host_config,
            )["Id"]
            made.append(cid)
            api.start(cid)

    return made, _in_threads(work, host)


def _remove(host: str, ids: list[str]) -> float:
    """Force-remove ``ids`` with CLIENTS clients; when the last call returned."""

    def work(api: Any, worker: int) -> None:
        for cid in ids[worker::CLIENTS]:
            api.remove_container(cid, force=True)

    return _in_threads(work, host)


def _converge(sup: Any, api: Any, since: float, limit: float = 30.0) -> float:
    """Seconds from ``since`` until ``/v1/containers`` equals Docker's list (fetched meanwhile)."""
    truth: list[dict[str, tuple[str, str]]] = []
    fetch = threading.Thread(target=lambda: truth.append(docker_view(api)), daemon=True)
    fetch.start()
    seen: list[tuple[float, dict[str, tuple[str, str]]]] = []
    while True:
        body = sup.get_json("/v1/containers")
        seen.append((time.monotonic(), mirror_view(body)))
        if truth and seen[-1][1] == truth[0]:
            break
        if time.monotonic() - since > limit:
            raise TimeoutError(f"the mirror did not equal Docker's list within {limit:g} s")
        time.sleep(0.005)
    fetch.join()
    first = next(t for t, view in seen if view == truth[0])
    return first - since


def run(options: Options) -> Section:
    from tests.daemon_proc import SupervisorProcess

    count = max(8, options.containers // 2)
    section = Section("burst", TITLE)
    tmp = Path(tempfile.mkdtemp(prefix="hbb", dir="/tmp"))
    try:
        with (
            private_engine() as engine,
            engine.api() as api,
            RecordingProxy(str(engine.socket_path), str(tmp / "rec.sock")) as proxy,
            SupervisorProcess(f"unix://{proxy.path}", tmp / "api.sock", metrics_listen="") as sup,
        ):
            sup.wait_synced(timeout=30)
            subscriber = Subscriber(sup)
            subscriber.start()
            peer = DockerEvents(engine.host)
            peer.start()
            try:
                log(f"burst: creating and starting {count} containers with {CLIENTS} clients")
                mark = len(proxy.requests)
                began = time.monotonic()
                ids, up_end = _create_and_start(engine.host, count)
                up_seconds = up_end - began
                up_converge = _converge(sup, api, up_end)
                up_agrees = subscriber.agrees_with(sup)
                up_inspects = proxy.inspects_since(mark)
                up_events = collections.Counter({c: peer.counts[c] for c in ids})
                up_deltas = collections.Counter({c: subscriber.deltas[c] for c in ids})

                log(f"burst: removing {count} containers with {CLIENTS} clients")
                mark = len(proxy.requests)
                began = time.monotonic()
                down_end = _remove(engine.host, ids)
                down_seconds = down_end - began
                down_converge = _converge(sup, api, down_end)
                down_agrees = subscriber.agrees_with(sup)
                down_inspects = proxy.inspects_since(mark)
                time.sleep(0.2)  # the peer's last events
                all_events = collections.Counter({c: peer.counts[c] for c in ids})
                all_deltas = collections.Counter({c: subscriber.deltas[c] for c in ids})
                gaps, resyncs, sub_error = subscriber.gaps, subscriber.resyncs, subscriber.error
            finally:
                subscriber.close()
                peer.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def per(counter: collections.Counter[str]) -> tuple[str, str]:
        values = [counter.get(c, 0) for c in ids]
        return f"{sum(values) / len(values):.2f}", str(max(values))

    down_events = all_events - up_events
    down_deltas = all_deltas - up_deltas
    total_inspects = up_inspects + down_inspects
    rows = [
        (
            "create + start",
            f"{up_seconds:.1f} s ({count / up_seconds:.0f}/s)",
            ms(up_converge),
            *per(up_events),
            *per(up_inspects),
            *per(up_deltas),
        ),
        (
            "remove (force)",
            f"{down_seconds:.1f} s ({count / down_seconds:.0f}/s)",
            ms(down_converge),
            *per(down_events),
            *per(down_inspects),
            *per(down_deltas),
        ),
        (
            "whole burst",
            f"{up_seconds + down_seconds:.1f} s",
            "",
            *per(all_events),
            *per(total_inspects),
            *per(all_deltas),
        ),
    ]
    section.markdown = "\n".join(
        [
            f"{count} containers, {CLIENTS} parallel docker-py clients (each its own"
            " connection). Per container: mean and max.",
            "",
            table(
                (
                    "phase",
                    "Docker calls took",
                    "mirror = Docker after the last call",
                    "Docker events (mean)",
                    "max",
                    "supervisor inspects (mean)",
                    "max",
                    "deltas on /v1/events (mean)",
                    "max",
                ),
                rows,
            ),
            "",
            f"Subscriber: {len(gaps)} revision gaps, {resyncs} resync lines,"
            f" error {sub_error or 'none'}; its state equalled `/v1/containers` after the"
            f" create phase: {'yes' if up_agrees else 'NO'}, after the removal:"
            f" {'yes' if down_agrees else 'NO'}.",
        ]
    )
    mean_up = sum(up_inspects.get(c, 0) for c in ids) / len(ids)
    mean_all = sum(total_inspects.get(c, 0) for c in ids) / len(ids)
    section.checks = [
        Check(
            "burst: mirror = Docker after create+start",
            ms(up_converge),
            f"≤ {CONVERGE_TARGET_SECONDS:g} s",
            up_converge <= CONVERGE_TARGET_SECONDS,
        ),
        Check(
            "burst: mirror = Docker after removal",
            ms(down_converge),
            f"≤ {CONVERGE_TARGET_SECONDS:g} s",
            down_converge <= CONVERGE_TARGET_SECONDS,
        ),
        Check(
            "burst: inspects per container, create+start (mean)",
            f"{mean_up:.2f}",
            f"≤ {INSPECT_TARGET:g}",
            mean_up <= INSPECT_TARGET,
        ),
        Check(
            "burst: inspects per container, whole life (mean)",
            f"{mean_all:.2f}",
            f"≤ {INSPECT_TARGET:g}",
            mean_all <= INSPECT_TARGET,
        ),
        Check(
            "burst: no delta lost by a reading subscriber",
            f"{len(gaps)} gaps, {resyncs} resyncs, equal: {up_agrees and down_agrees}",
            "0, 0, equal",
            up_agrees and down_agrees and not gaps and not resyncs,
        ),
    ]
    return section


if __name__ == "__main__":
    standalone(run, __doc__.split("\n\n")[0])
