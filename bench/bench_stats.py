"""Live stats with 50 running containers: answering from memory against asking Docker.

Run as root on a machine with docker.io, containerd and busybox-static (what
tests/run.sh installs), from the repository root:

    .venv/bin/python bench/bench_stats.py [--containers 50] [--window 30]

It starts a private dockerd (tests/dockerd.py), starts N sleeping busybox
containers, runs the supervisor's watcher and stats sampler in this process, and
prints one Markdown table:

* the time to produce every container with its stats from the store, which is
  what ``GET /v1/containers?stats=1`` costs (the records' JSON plus the stats
  objects; "cold" re-encodes every stats object, as the first request after a
  round does, "warm" reuses the encodings);
* HomelabARR's way today: ``docker stats --no-stream ID`` and ``docker inspect ID``
  per container, one after another, through the CLI;
* one ``docker stats --no-stream`` for all containers;
* a sampling round through the gateway at several concurrencies;
* a Prometheus scrape of the stats families;
* the supervisor's own CPU use (process CPU time over a window) while sampling
  with the default settings, against the same window with sampling off, and the
  engine's (dockerd, containerd and shims) over the same windows.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.metrics_core import Metric  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

from supervisor.access import resolve_endpoint  # noqa: E402
from supervisor.cache import dumps  # noqa: E402
from supervisor.daemon import build_runtime  # noqa: E402
from supervisor.gateway import DockerGateway  # noqa: E402
from supervisor.sampler import Sampler  # noqa: E402
from supervisor.settings import DockerSettings, Settings, StatsSettings  # noqa: E402
from supervisor.stats import collect  # noqa: E402
from tests.dockerd import ContainerFactory, PrivateDockerd, build_test_image  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def median_ms(func: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``func`` in milliseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def process_cpu_seconds() -> float:
    """User + system CPU time of this process, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def engine_cpu_seconds(engine_dir: Path, pids: Iterable[int]) -> float:
    """CPU time of dockerd, containerd and the shims (every process naming the engine dir)."""
    wanted = set(pids)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes()
        except OSError:
            continue
        if str(engine_dir).encode() + b"/" in cmdline:
            wanted.add(int(entry))
    total = 0
    for pid in wanted:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def docker_cli(host: str, *args: str) -> str:
    done = subprocess.run(
        ["docker", "-H", host, *args], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout


class _Families(Collector):
    def __init__(self, produce: Callable[[], list[Metric]]) -> None:
        self._produce = produce

    def collect(self) -> Iterable[Metric]:
        return self._produce()


async def measure(engine: PrivateDockerd, ids: list[str], window: float) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    host = engine.host
    n = len(ids)
    settings = Settings(docker=DockerSettings(host=host))

    def make_gateway() -> DockerGateway:
        return DockerGateway(settings.docker, resolve_endpoint(settings.docker, {}))

    # The daemon's own runtime (no API); samplers of varying settings are added below.
    runtime = build_runtime(settings, environ={})
    cache, machine, feed, watcher = runtime.cache, runtime.machine, runtime.feed, runtime.watcher
    store = runtime.stats

    def sampler_with(interval: float, concurrency: int) -> Sampler:
        return Sampler(
            store=store,
            cache=cache,
            machine=machine,
            make_gateway=make_gateway,
            settings=StatsSettings(interval_seconds=interval, concurrency=concurrency),
            synced=lambda: watcher.synced,
            feed=feed,
        )

    async with anyio.create_task_group() as tg:
        await tg.start(watcher.serve)
        with anyio.fail_after(60):
            while not (watcher.synced and sum(r.running for r in cache.records()) >= n):  # noqa: ASYNC110
                await anyio.sleep(0.05)

        # -- sampling rounds through the gateway ----------------------------------------
        for concurrency in (4, 16, 50):
            sampler = sampler_with(10.0, concurrency)
            durations = []
            for _ in range(3):
                started = time.perf_counter()
                await sampler.sample_round()
                durations.append(time.perf_counter() - started)
            rows.append(
                (
                    f"one sampling round, {n} containers, concurrency {concurrency}"
                    " (background, not on any request path)",
                    f"{statistics.median(durations) * 1000:,.0f} ms",
                )
            )
        sampled = sum(store.get(cid) is not None for cid in ids)
        with_cpu = sum(1 for cid in ids if (s := store.get(cid)) and s.cpu_percent is not None)
        assert sampled == n and with_cpu == n, (sampled, with_cpu)

        # -- answering from memory ------------------------------------------------------
        records = cache.records()

        def warm() -> bytes:
            return store.containers_json(records)

        def cold() -> bytes:
            # What the first request after a round pays: every stats object encoded anew.
            parts = []
            for record in records:
                stats = store.get(record.id)
                stats_json = dumps(stats.to_json()) if stats else b"null"
                parts.append(cache.record_json(record.id)[:-1] + b',"stats":' + stats_json + b"}")
            return b"[" + b",".join(parts) + b"]"

        assert warm() == cold()
        body_kib = len(warm()) / 1024
        rows.append(
            (
                f"`GET /v1/containers?stats=1` body from the store ({n} records + stats,"
                f" {body_kib:.0f} KiB), cold",
                f"{median_ms(cold, 200):.3f} ms",
            )
        )
        rows.append(("same, warm (stats encodings reused)", f"{median_ms(warm, 1000):.3f} ms"))
        registry = CollectorRegistry()
        registry.register(_Families(lambda: collect(store, cache)))
        rows.append(
            (
                f"Prometheus scrape of the 5 stats families ({n} containers)",
                f"{median_ms(lambda: generate_latest(registry), 200):.2f} ms",
            )
        )

        # -- the CLI ---------------------------------------------------------------------
        def one_stats_for_all() -> None:
            out = docker_cli(host, "stats", "--no-stream", "--format", "{{json .}}")
            assert len(out.splitlines()) >= n

        rows.append(
            (
                "one `docker stats --no-stream` for all containers",
                f"{median_ms(one_stats_for_all, 3):,.0f} ms",
            )
        )

        def homelabarr_way() -> None:
            for cid in ids:
                docker_cli(host, "stats", "--no-stream", "--format", "{{json .}}", cid)
                docker_cli(host, "inspect", cid)

        rows.append(
            (
                "HomelabARR today: `docker stats --no-stream` + `docker inspect` per container,"
                " sequentially",
                f"{median_ms(homelabarr_way, 1):,.0f} ms",
            )
        )

        # -- CPU while sampling ------------------------------------------------------------
        engine_pids = [p for p in (engine.pid,) if p is not None]

        async def cpu_over(seconds: float) -> tuple[float, float]:
            own, theirs = process_cpu_seconds(), engine_cpu_seconds(engine.dir, engine_pids)
            started = time.monotonic()
            await anyio.sleep(seconds)
            wall = time.monotonic() - started
            own = process_cpu_seconds() - own
            theirs = engine_cpu_seconds(engine.dir, engine_pids) - theirs
            return own / wall * 100, theirs / wall * 100

        idle_own, idle_engine = await cpu_over(window)
        sampler = sampler_with(10.0, 4)  # the defaults
        rounds_before = sampler.rounds
        await tg.start(sampler.serve)
        busy_own, busy_engine = await cpu_over(window)
        rounds = sampler.rounds - rounds_before
        rows.append(
            (
                f"supervisor process CPU, watcher only, sampling off ({window:.0f} s window)",
                f"{idle_own:.2f} % of one CPU",
            )
        )
        rows.append(
            (
                f"supervisor process CPU while sampling with the defaults (interval 10 s,"
                f" concurrency 4; {rounds} rounds of {n} in {window:.0f} s)",
                f"{busy_own:.2f} % of one CPU",
            )
        )
        rows.append(
            (
                "Docker engine CPU (dockerd + containerd + shims), sampling off / on",
                f"{idle_engine:.2f} % / {busy_engine:.2f} % of one CPU",
            )
        )
        if sampler.last_round_seconds is not None:
            rows.append(
                (
                    "last default round",
                    f"{sampler.last_round_seconds * 1000:,.0f} ms",
                )
            )
        tg.cancel_scope.cancel()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument("--window", type=float, default=30.0, help="CPU window, seconds")
    args = parser.parse_args()
    engine = PrivateDockerd(tempfile.mkdtemp(prefix="hb", dir="/tmp"))
    try:
        engine.start()
        with engine.api() as api:
            build_test_image(api)
            factory = ContainerFactory(api)
            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                ids = list(
                    pool.map(
                        lambda i: factory(("sh", "-c", "sleep 100000; echo"), name=f"bench{i:03d}"),
                        range(args.containers),
                    )
                )
            print(
                f"started {len(ids)} containers in {time.monotonic() - started:.1f} s",
                file=sys.stderr,
            )
            rows = anyio.run(measure, engine, ids, args.window)
            factory.cleanup()
    finally:
        engine.close()
    load = os.getloadavg()
    print(f"\n{args.containers} running busybox containers, Docker 20.10 (API 1.41),")
    print(f"{os.cpu_count()} CPUs, load average {load[0]:.1f} at the end.\n")
    print("| measurement | result |")
    print("|---|---|")
    for what, value in rows:
        print(f"| {what} | {value} |")


if __name__ == "__main__":
    main()
