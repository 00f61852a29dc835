"""Scrape cost of the supervisor's /metrics next to what a polling exporter pays Docker.

Run as root from the repository (it starts a private dockerd, like the tests):

    .venv/bin/python bench/bench_metrics.py                      # 200 real, 1,000 synthetic
    .venv/bin/python bench/bench_metrics.py --real 200,1000      # 1,000 real containers too
    .venv/bin/python bench/bench_metrics.py --quick              # 50 real: a smoke run

Before each measurement it waits (up to 30 s) for the CPUs to calm down after the
containers were created, and reports how busy they still were ("CPU busy before"):
figures taken on a busy machine are slower than the code is.

For each size it reports, side by side:

* render: ``Metrics.render()`` on a mirror holding that many container records,
  the first time (every container's lines built), with nothing changed, and with
  one container changed since the previous scrape (the usual case);
* HTTP: ``GET /metrics`` through the real TCP listener (``serve_metrics``) of a
  supervisor that mirrors the private dockerd (real sizes only);
* the exposition's size, plain and gzip-compressed (Prometheus asks for gzip);
* poll: the Docker API calls an exporter that polls would make per scrape for
  the same data: ``GET /containers/json?all=1`` plus one inspect per container
  (``RestartCount``, ``OOMKilled``, health and start time are not in the list),
  one call after the other and with 8 in parallel.

"synthetic" rows fill the mirror with copies of one real container's inspect JSON
(new id, name and compose service each) instead of creating that many containers;
no Docker poll is measured for them, since there is nothing to poll.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import os
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import anyio  # noqa: E402
import docker  # noqa: E402
from loguru import logger  # noqa: E402

from supervisor.api import serve_metrics  # noqa: E402
from supervisor.daemon import Runtime, build_runtime  # noqa: E402
from supervisor.records import ContainerRecord, record_from_inspect  # noqa: E402
from supervisor.settings import DockerSettings, MetricsSettings, Settings  # noqa: E402
from tests.dockerd import TEST_IMAGE, PrivateDockerd, build_test_image  # noqa: E402

LABEL = "hls.bench"


@dataclass
class Row:
    containers: int
    source: str
    cold_ms: float
    warm_ms: float
    changed_ms: float
    http_ms: float | None
    busy: float
    size: int
    gzip_size: int
    poll_ms: float | None = None
    poll8_ms: float | None = None


def median_ms(func: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- Docker side --------------------------------------------------------------------------


def create_containers(engine: PrivateDockerd, first: int, count: int) -> None:
    """``count`` running sleepers labelled as compose services, 4 at a time."""
    local = threading.local()

    def one(n: int) -> None:
        api = getattr(local, "api", None)
        if api is None:
            api = local.api = engine.api()
        created = api.create_container(
            TEST_IMAGE,
            command=["/bin/sleep", "1000000"],
            name=f"bench-{n:04d}",
            labels={
                LABEL: "1",
                "com.docker.compose.project": "bench",
                "com.docker.compose.service": f"svc{n:04d}",
            },
            host_config=api.create_host_config(network_mode="none"),
        )
        api.start(created["Id"])

    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(first, first + count)))
    print(f"  created {count} containers in {time.monotonic() - started:.0f} s", file=sys.stderr)


def poll_once(api: docker.APIClient, pool: ThreadPoolExecutor | None) -> int:
    """What a polling exporter does per scrape: list, then inspect every container."""
    ids = [c["Id"] for c in api.containers(all=True)]
    if pool is None:
        for cid in ids:
            api.inspect_container(cid)
    else:
        list(pool.map(api.inspect_container, ids))
    return len(ids)


def measure_poll(engine: PrivateDockerd, expected: int, rounds: int) -> tuple[float, float]:
    with engine.api() as api, ThreadPoolExecutor(8) as pool:
        assert poll_once(api, None) == expected
        sequential = median_ms(lambda: poll_once(api, None), rounds)
        parallel = median_ms(lambda: poll_once(api, pool), rounds)
    return sequential, parallel


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over ``seconds`` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def settle(limit_seconds: float = 30.0) -> float:
    """Wait (bounded) until dockerd has digested the new containers; returns the CPU share left busy."""
    deadline = time.monotonic() + limit_seconds
    busy = cpu_busy()
    while busy > 0.15 and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


# -- supervisor side -----------------------------------------------------------------------


def standalone(records: list[ContainerRecord]) -> Runtime:
    """A runtime that is never connected, its mirror filled with ``records``."""
    runtime = build_runtime(Settings(docker=DockerSettings(host="unix:///nonexistent")), environ={})
    for record in records:
        runtime.cache.upsert(record)
    return runtime


def measure_render(
    records: list[ContainerRecord], rounds: int
) -> tuple[float, float, float, bytes]:
    cold_times = []
    for _ in range(5):
        runtime = standalone(records)
        started = time.perf_counter()
        body = runtime.metrics.render()[0]
        cold_times.append(time.perf_counter() - started)
    cold = statistics.median(cold_times) * 1000
    warm = median_ms(runtime.metrics.render, rounds)
    current = runtime.cache.records()
    tick = iter(range(10**9))

    def changed() -> None:
        runtime.cache.upsert(replace(current[0], restart_count=next(tick) + 1))
        runtime.metrics.render()

    return cold, warm, median_ms(changed, rounds), body


def http_get_ms(url: str, rounds: int) -> float:
    def get() -> None:
        with urllib.request.urlopen(url, timeout=10) as reply:
            reply.read()

    get()
    return median_ms(get, rounds)


def synthetic(template: dict[str, Any], count: int) -> list[ContainerRecord]:
    records = []
    for n in range(count):
        body = copy.deepcopy(template)
        body["Id"] = secrets.token_hex(32)
        body["Name"] = f"/synthetic-{n:04d}"
        labels = body["Config"]["Labels"]
        labels["com.docker.compose.service"] = f"svc{n:04d}"
        records.append(record_from_inspect(body))
    return records


# -- the run -------------------------------------------------------------------------------


async def run(real_sizes: list[int], synthetic_sizes: list[int], rounds: int) -> list[Row]:
    rows: list[Row] = []
    base = tempfile.mkdtemp(prefix="hbm", dir="/tmp")
    engine = PrivateDockerd(base)
    try:
        print("starting a private dockerd", file=sys.stderr)
        engine.start()
        with engine.api() as api:
            build_test_image(api)
        listen = f"127.0.0.1:{free_port()}"
        settings = Settings(
            docker=DockerSettings(host=engine.host), metrics=MetricsSettings(listen=listen)
        )
        live = build_runtime(settings)
        created = 0
        async with anyio.create_task_group() as tg:
            await tg.start(serve_metrics, live)
            await tg.start(live.watcher.serve)
            for size in sorted(real_sizes):
                await anyio.to_thread.run_sync(create_containers, engine, created, size - created)
                created = size
                with anyio.fail_after(120):
                    while not (live.watcher.synced and len(live.cache) == size):
                        await live.feed.wait(1.0)
                records = live.cache.records()
                busy = await anyio.to_thread.run_sync(settle)
                cold, warm, changed, body = measure_render(records, rounds)
                http = await anyio.to_thread.run_sync(
                    http_get_ms, f"http://{listen}/metrics", rounds
                )
                poll, poll8 = await anyio.to_thread.run_sync(
                    measure_poll, engine, size, max(3, rounds // 20)
                )
                rows.append(
                    Row(size, "real", cold, warm, changed, http, busy, len(body),
                        len(gzip.compress(body)), poll, poll8)
                )  # fmt: skip
                print(f"  measured {size} real containers", file=sys.stderr)
            with engine.api() as api:
                template = api.inspect_container(live.cache.records()[0].id)
            tg.cancel_scope.cancel()
        for size in synthetic_sizes:
            records = synthetic(template, size)
            busy = await anyio.to_thread.run_sync(settle)
            cold, warm, changed, body = measure_render(records, rounds)
            rows.append(
                Row(size, "synthetic", cold, warm, changed, None, busy, len(body),
                    len(gzip.compress(body)))
            )  # fmt: skip
    finally:
        print("stopping the private dockerd", file=sys.stderr)
        engine.close()
        shutil.rmtree(base, ignore_errors=True)
    return rows


def table(rows: list[Row]) -> str:
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = [
        "| containers | mirror | render, first (ms) | render, unchanged (ms) "
        "| render, 1 changed (ms) | GET /metrics over TCP (ms) | exposition (KiB) "
        "| gzip (KiB) | poll: list + inspects, serial (ms) | poll, 8 parallel (ms) "
        "| Docker calls per poll | CPU busy before |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r.containers, r.source)):
        calls = str(r.containers + 1) if r.poll_ms is not None else "n/a"
        lines.append(
            f"| {r.containers} | {r.source} | {ms(r.cold_ms)} | {ms(r.warm_ms)} "
            f"| {ms(r.changed_ms)} | {ms(r.http_ms)} | {r.size / 1024:.0f} "
            f"| {r.gzip_size / 1024:.0f} | {ms(r.poll_ms)} | {ms(r.poll8_ms)} | {calls} "
            f"| {r.busy:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", default="200", help="sizes with real containers, e.g. 200,1000")
    parser.add_argument("--synthetic", default="1000", help="sizes with synthetic records")
    parser.add_argument("--rounds", type=int, default=100, help="renders per median")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 50 real containers")
    args = parser.parse_args()
    if args.quick:
        args.real = "50"
    if os.geteuid() != 0:
        sys.exit("bench_metrics.py starts a private dockerd: run it as root")
    real = [int(v) for v in args.real.split(",") if v]
    fake = [int(v) for v in args.synthetic.split(",") if v]
    if not real:
        sys.exit("at least one real size is needed (the synthetic records copy a real one)")
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    os.environ["PATH"] += ":/usr/sbin:/sbin"
    rows = anyio.run(run, real, fake, args.rounds)
    print(table(rows))
    print(
        f"\nPython {sys.version.split()[0]}, {os.cpu_count()} CPUs; medians of {args.rounds}"
        " renders/GETs and of the polls; 'first' is a fresh Metrics (median of 5)."
    )


if __name__ == "__main__":
    main()
