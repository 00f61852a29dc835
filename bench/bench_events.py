"""Event propagation: from ``docker start`` returning to the ``upsert`` on ``/v1/events``.

Side by side in the same run, on a private dockerd: a plain docker-py events client
(``APIClient.events``) and a subscriber of the supervisor's ``/v1/events``, each in
its own thread stamping every line as it arrives. Each cycle starts one container,
waits for Docker's ``start`` event and for the supervisor's ``upsert`` with the new
``started_at``, then kills it and waits for ``die`` and the ``exited`` upsert.
What the supervisor adds is, per cycle, its arrival time minus docker-py's.

    .venv/bin/python bench/bench_events.py [--quick]
"""

from __future__ import annotations

import contextlib
import json
import queue
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
    Check,
    Options,
    Section,
    log,
    make_containers,
    median,
    ms,
    percentile,
    private_engine,
    standalone,
    table,
)

TITLE = "Event propagation"
#: Containers that sit in the mirror meanwhile, so that it is not trivially small.
BACKGROUND = 50
MEDIAN_TARGET_SECONDS = 0.005
P99_TARGET_SECONDS = 0.025

Stamped = tuple[float, dict[str, Any]]


def _pump(lines: Callable[[], Any], into: queue.Queue[Stamped | None]) -> None:
    """Stamp and queue every object ``lines`` yields until it ends or fails."""
    with contextlib.suppress(Exception):
        for obj in lines():
            into.put((time.perf_counter(), obj))
    into.put(None)


def _await(
    source: queue.Queue[Stamped | None], match: Callable[[dict[str, Any]], bool], timeout: float
) -> float:
    """The arrival time of the first queued object that matches (others are dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        item = source.get(timeout=max(0.0, deadline - time.monotonic()))
        if item is None:
            raise RuntimeError("the stream ended")
        stamp, obj = item
        if match(obj):
            return stamp


def run(options: Options) -> Section:
    from tests.daemon_proc import SupervisorProcess

    cycles = 20 if options.quick else 100
    section = Section("events", TITLE)
    tmp = Path(tempfile.mkdtemp(prefix="hbe", dir="/tmp"))
    try:
        with private_engine() as engine, engine.api() as api:
            background = 10 if options.quick else BACKGROUND
            make_containers(engine.host, background, start=False, prefix="bg")
            [cid] = make_containers(engine.host, 1, start=False, prefix="subject")
            with SupervisorProcess(engine.host, tmp / "api.sock", metrics_listen="") as sup:
                sup.wait_synced(timeout=30)
                starts, kills = _cycles(engine.host, sup, api, cid, cycles)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for what, samples, docker_event, state in (
        ("`docker start`", starts, "`start`", "running"),
        ("`docker kill`", kills, "`die`", "exited"),
    ):
        docker_s = [d for d, _ in samples]
        super_s = [s for _, s in samples]
        added = [s - d for d, s in samples]
        rows += [
            (what, f"docker-py events client: {docker_event}", *_stats(docker_s)),
            (what, f"supervisor `/v1/events`: `upsert` {state}", *_stats(super_s)),
            (what, "**added by the supervisor** (per cycle)", *_stats(added)),
        ]
    added_start = [s - d for d, s in starts]
    section.markdown = "\n".join(
        [
            f"{cycles} start/kill cycles of one container, {background + 1} containers mirrored;"
            " times from the Docker call returning to the line arriving (negative: the"
            " event arrived before the call returned).",
            "",
            table(("call", "receiver", "median", "p99", "max"), rows),
            "",
            "The target applies to `docker start`. After `docker kill`, Docker sends `die`"
            " before it has finished recording the exit (an inspect made on the event"
            " waits for that), so the supervisor's state-bearing `upsert` trails the bare"
            " event by that much; it still arrives within a few ms of the call returning.",
        ]
    )
    section.checks = [
        Check(
            "events: added latency, median",
            ms(median(added_start)),
            f"≤ {ms(MEDIAN_TARGET_SECONDS)}",
            median(added_start) <= MEDIAN_TARGET_SECONDS,
        ),
        Check(
            "events: added latency, p99",
            ms(percentile(added_start, 99)),
            f"≤ {ms(P99_TARGET_SECONDS)}",
            percentile(added_start, 99) <= P99_TARGET_SECONDS,
        ),
    ]
    return section


def _stats(values: list[float]) -> tuple[str, str, str]:
    return ms(median(values)), ms(percentile(values, 99)), ms(max(values))


def _cycles(
    host: str, sup: Any, api: Any, cid: str, cycles: int
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(docker-py delay, supervisor delay) per start and per kill, in seconds."""
    import docker

    docker_q: queue.Queue[Stamped | None] = queue.Queue()
    super_q: queue.Queue[Stamped | None] = queue.Queue()
    watcher_api = docker.APIClient(base_url=host, version="auto", timeout=None)
    events = watcher_api.events(decode=True, filters={"type": "container", "container": cid})
    conn, response = sup.open_events(timeout=60)

    def super_lines() -> Any:
        while line := response.readline():
            yield json.loads(line)

    threads = [
        threading.Thread(target=_pump, args=(lambda: events, docker_q), daemon=True),
        threading.Thread(target=_pump, args=(super_lines, super_q), daemon=True),
    ]
    for t in threads:
        t.start()
    starts: list[tuple[float, float]] = []
    kills: list[tuple[float, float]] = []
    started_at: str | None = None

    def upsert(state: str) -> Callable[[dict[str, Any]], bool]:
        def match(obj: dict[str, Any]) -> bool:
            c = obj.get("container") or {}
            return (
                obj["type"] == "upsert"
                and c.get("id") == cid
                and c.get("state") == state
                and (state != "running" or c.get("started_at") != started_at)
            )

        return match

    def action(name: str) -> Callable[[dict[str, Any]], bool]:
        return lambda obj: obj.get("Action") == name and obj.get("id") == cid

    try:
        for n in range(cycles):
            api.start(cid)
            returned = time.perf_counter()
            d = _await(docker_q, action("start"), 10) - returned
            s = _await(super_q, upsert("running"), 10) - returned
            starts.append((d, s))
            started_at = api.inspect_container(cid)["State"]["StartedAt"]
            api.kill(cid)
            returned = time.perf_counter()
            d = _await(docker_q, action("die"), 10) - returned
            s = _await(super_q, upsert("exited"), 10) - returned
            kills.append((d, s))
            if (n + 1) % 20 == 0:
                log(f"events: {n + 1}/{cycles} cycles")
    finally:
        events.close()
        if conn.sock is not None:  # wake the reader blocked in recv()
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        watcher_api.close()
        for t in threads:
            t.join(5)
    return starts, kills


if __name__ == "__main__":
    standalone(run, __doc__.split("\n\n")[0])
