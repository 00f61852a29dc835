#!/usr/bin/env python3
"""Benchmark: ``GET /v1/containers`` of the supervisor against Docker's ``GET /containers/json``.

Starts a private dockerd (tests/dockerd.py), creates N containers (default 200), runs
the supervisor against it, and measures, side by side in one run and with the same
client (h11 over one keep-alive Unix-socket connection per client):

* median and p99 latency of sequential requests on one connection, in interleaved
  rounds so that both sides see the same machine;
* requests per second with 1 connection and with ``--connections`` client processes.

Prints a Markdown table with the ratios to Docker's ``/containers/json?all=1``.

    sudo .venv/bin/python bench/bench_api.py            # 200 containers
    sudo .venv/bin/python bench/bench_api.py 50 --requests 500

Needs root (dockerd), and the packages tests/run.sh installs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from urllib.parse import quote

import h11

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.daemon_proc import SupervisorProcess  # noqa: E402
from tests.dockerd import PrivateDockerd, build_test_image  # noqa: E402

LABEL_KEY = "bench.group"


class Client:
    """One keep-alive HTTP/1.1 connection over a Unix socket, h11 on the client side."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.conn = h11.Connection(h11.CLIENT)

    def get(self, target: str) -> int:
        """GET ``target``; returns the body size (the status must be 200)."""
        self.sock.sendall(
            (
                self.conn.send(h11.Request(method="GET", target=target, headers=[("host", "x")]))
                or b""
            )
            + (self.conn.send(h11.EndOfMessage()) or b"")
        )
        size = 0
        status = 0
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(1 << 18))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise RuntimeError(f"unexpected {event!r}")
        if status != 200:
            raise RuntimeError(f"GET {target}: {status}")
        self.conn.start_next_cycle()
        return size

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class Target:
    label: str
    socket: str
    path: str
    server_pid: int  # the process that answers (dockerd or the supervisor)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    target: Target
    body_bytes: int
    latencies: list[float]
    rps_one: float
    rps_many: float
    #: Server CPU time per request during the throughput runs.
    cpu_per_request: float

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies) * 1000

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000


def _throughput_worker(socket_path: str, path: str, start_at: float, seconds: float) -> int:
    client = Client(socket_path)
    try:
        while time.monotonic() < start_at:
            time.sleep(0.001)
        deadline = start_at + seconds
        count = 0
        while time.monotonic() < deadline:
            client.get(path)
            count += 1
        return count
    finally:
        client.close()


def throughput(target: Target, connections: int, seconds: float) -> tuple[float, int, float]:
    """Over ``connections`` client processes, each on one connection: requests per
    second, requests, and the server's CPU seconds meanwhile."""
    start_at = time.monotonic() + 0.5
    with ProcessPoolExecutor(connections, mp_context=get_context("fork")) as pool:
        futures = [
            pool.submit(_throughput_worker, target.socket, target.path, start_at, seconds)
            for _ in range(connections)
        ]
        while time.monotonic() < start_at:
            time.sleep(0.001)
        cpu_before = cpu_seconds(target.server_pid)
        total = sum(f.result() for f in futures)
        cpu = cpu_seconds(target.server_pid) - cpu_before
    return total / seconds, total, cpu


def latencies(targets: list[Target], requests: int, rounds: int) -> dict[Target, list[float]]:
    """Sequential requests on one connection per target, in interleaved rounds."""
    clients = {t: Client(t.socket) for t in targets}
    measured: dict[Target, list[float]] = {t: [] for t in targets}
    try:
        for t in targets:  # warm-up: connections, caches, the JIT-less interpreter's paths
            for _ in range(50):
                clients[t].get(t.path)
        per_round = max(1, requests // rounds)
        for _ in range(rounds):
            for t in targets:
                client, out = clients[t], measured[t]
                for _ in range(per_round):
                    started = time.perf_counter()
                    client.get(t.path)
                    out.append(time.perf_counter() - started)
    finally:
        for client in clients.values():
            client.close()
    return measured


def create_containers(engine: PrivateDockerd, count: int, start: bool, image: str) -> None:
    """``count`` containers, one in ten labelled ``bench.group=a``; 4 creators in parallel."""

    def make(i: int) -> None:
        with engine.api() as api:
            labels = {"bench": "1", LABEL_KEY: "a" if i % 10 == 0 else "b"}
            host_config = api.create_host_config(network_mode="none")
            created = api.create_container(
                image,
                command=["/bin/sleep", "100000"],
                name=f"bench-{i:04d}",
                labels=labels,
                host_config=host_config,
            )
            if start:
                api.start(created["Id"])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(make, range(count)))


def markdown(results: list[Result], baseline: Result, connections: int) -> str:
    lines = [
        f"| request | body | median | p99 | median vs Docker | req/s, 1 conn"
        f" | req/s, {connections} conns | req/s vs Docker | server CPU/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r is baseline:
            speedup = rps_ratio = "baseline"
        else:
            speedup = f"{baseline.median_ms / r.median_ms:.1f}x lower"
            rps_ratio = f"{r.rps_many / baseline.rps_many:.1f}x"
        lines.append(
            f"| {r.target.label} | {r.body_bytes / 1024:.0f} KiB | {r.median_ms:.3f} ms"
            f" | {r.p99_ms:.3f} ms | {speedup} | {r.rps_one:,.0f}"
            f" | {r.rps_many:,.0f} | {rps_ratio} | {r.cpu_per_request * 1e6:,.0f} µs |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("containers", nargs="?", type=int, default=200)
    parser.add_argument(
        "--requests", type=int, default=2000, help="latency samples per request kind"
    )
    parser.add_argument("--rounds", type=int, default=4, help="interleaved latency rounds")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="duration of each throughput run"
    )
    parser.add_argument("--connections", type=int, default=4, help="client processes for req/s")
    parser.add_argument("--no-start", action="store_true", help="create the containers only")
    args = parser.parse_args(argv)

    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    engine = PrivateDockerd(tempfile.mkdtemp(prefix="hbench", dir="/tmp"))
    try:
        started = time.monotonic()
        engine.start()
        with engine.api() as api:
            image = build_test_image(api)
            docker_version = api.version()
        log(f"dockerd up; creating {args.containers} containers ...")
        create_containers(engine, args.containers, not args.no_start, image)
        log(f"containers ready after {time.monotonic() - started:.0f} s")
        sock_dir = Path(tempfile.mkdtemp(prefix="hbs", dir="/tmp"))
        with SupervisorProcess(engine.host, sock_dir / "api.sock", metrics_listen="") as sup:
            sup.wait_for(lambda s: s["synced"] and s["containers"] == args.containers, timeout=120)
            docker_sock = str(engine.socket_path)
            api_sock = str(sup.socket)
            dockerd, supervisor = engine.pid, sup.pid
            assert dockerd is not None
            label_filter = quote(json.dumps({"label": [f"{LABEL_KEY}=a"]}))
            targets = [
                Target(
                    "Docker `GET /containers/json?all=1`",
                    docker_sock,
                    "/containers/json?all=1",
                    dockerd,
                ),
                Target("supervisor `GET /v1/containers`", api_sock, "/v1/containers", supervisor),
                Target(
                    f"supervisor `GET /v1/containers?label={LABEL_KEY}=a`",
                    api_sock,
                    f"/v1/containers?label={LABEL_KEY}=a",
                    supervisor,
                ),
                Target(
                    f"Docker `GET /containers/json?all=1&filters={{label:[{LABEL_KEY}=a]}}`",
                    docker_sock,
                    f"/containers/json?all=1&filters={label_filter}",
                    dockerd,
                ),
            ]
            sizes = {}
            for t in targets:
                client = Client(t.socket)
                sizes[t] = client.get(t.path)
                client.close()
            log("latency ...")
            measured = latencies(targets, args.requests, args.rounds)
            results = []
            for t in targets:
                log(f"throughput: {t.label} ...")
                one, requests_one, cpu_one = throughput(t, 1, args.seconds)
                many, requests_many, cpu_many = throughput(t, args.connections, args.seconds)
                cpu = (cpu_one + cpu_many) / max(1, requests_one + requests_many)
                results.append(Result(t, sizes[t], measured[t], one, many, cpu))
        load = os.getloadavg()[0]
        print(
            f"Load average {load:.1f} at the end of the run (2 CPUs means 2.0 is a full"
            " machine): other work on the machine slows both sides alike, but lowers req/s."
        )
        print(
            f"{args.containers} containers ({'created' if args.no_start else 'running'}),"
            f" Docker {docker_version['Version']} (API {docker_version['ApiVersion']}),"
            f" Python {platform.python_version()}, {os.cpu_count()} CPUs;"
            f" {args.requests} sequential requests per row on one keep-alive connection"
            f" ({args.rounds} interleaved rounds), {args.seconds:g} s per throughput run.\n"
        )
        print(markdown(results, results[0], args.connections))
    finally:
        log("stopping dockerd ...")
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
