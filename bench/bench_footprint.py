"""Footprint: start-up time at 200 containers, memory and CPU with N containers mirrored and idle.

On a private dockerd: 200 running containers, then more created (not started: the
mirror holds a created container just as a running one, and creating is far
quicker) up to N with 4 parallel clients. Start-up is measured from spawning
``python -m supervisor run`` to ``/v1/status`` saying ``connected`` and ``synced``
(polled every 5 ms), several times; side by side, what a client without the
supervisor pays for the same data (docker-py: one list, then one inspect per
container). Idle: the supervisor's resident memory (VmRSS, and its peak VmHWM)
and CPU time over a window, next to dockerd's over the same window.

    .venv/bin/python bench/bench_footprint.py [--containers N] [--quick]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (
    Check,
    Options,
    Section,
    cpu_seconds,
    log,
    make_containers,
    median,
    mib,
    ms,
    private_engine,
    proc_status,
    standalone,
    table,
)

TITLE = "Footprint"
STARTUP_CONTAINERS = 200
RSS_TARGET = 64 << 20
CPU_TARGET_PERCENT = 0.5
STARTUP_TARGET_SECONDS = 1.0


def _startup(host: str, socket_path: Path) -> dict[str, float]:
    """Spawn a supervisor; seconds to serving, connected and synced; its RSS once synced."""
    from tests.daemon_proc import SupervisorProcess

    spawned = time.monotonic()
    marks: dict[str, float] = {}
    with SupervisorProcess(host, socket_path, metrics_listen="", wait_ready=False) as sup:
        deadline = spawned + 60
        while "synced" not in marks:
            if time.monotonic() > deadline or sup.proc.poll() is not None:
                raise RuntimeError("the supervisor did not sync within 60 s:\n" + sup.logs())
            try:
                status = sup.get_json("/v1/status")
            except Exception:
                time.sleep(0.005)
                continue
            now = time.monotonic() - spawned
            marks.setdefault("serving", now)
            if status["state"] == "connected":
                marks.setdefault("connected", now)
                if status["synced"]:
                    marks["synced"] = now
            time.sleep(0.005)
        marks["containers"] = sup.get_json("/v1/status")["containers"]
        marks["rss"] = sup.rss_bytes()
        sup.stop()
    return marks


def _docker_py_startup(host: str) -> float:
    """What a client without the supervisor pays for the same data: list, then inspect each."""
    import docker

    started = time.monotonic()
    with docker.APIClient(base_url=host, version="auto", timeout=60) as api:
        for row in api.containers(all=True, quiet=True):
            api.inspect_container(row["Id"])
    return time.monotonic() - started


def _idle(
    host: str, socket_path: Path, dockerd_pid: int, window: float, extra_args: list[str]
) -> dict[str, Any]:
    from tests.daemon_proc import SupervisorProcess

    # The metrics listener on, as by default.
    with SupervisorProcess(host, socket_path, extra_args=extra_args) as sup:
        sup.wait_synced(timeout=120)
        containers = sup.get_json("/v1/status")["containers"]
        time.sleep(5)  # let the start-up settle: the first pings, the allocator
        cpu0, dcpu0, t0 = cpu_seconds(sup.pid), cpu_seconds(dockerd_pid), time.monotonic()
        time.sleep(window)
        cpu1, dcpu1, t1 = cpu_seconds(sup.pid), cpu_seconds(dockerd_pid), time.monotonic()
        result = {
            "containers": containers,
            "window": t1 - t0,
            "cpu_percent": 100 * (cpu1 - cpu0) / (t1 - t0),
            "rss": proc_status(sup.pid, "VmRSS"),
            "hwm": proc_status(sup.pid, "VmHWM"),
            "fds": sup.fd_count(),
            "threads": _threads(sup.pid),
            "dockerd_cpu_percent": 100 * (dcpu1 - dcpu0) / (t1 - t0),
            "dockerd_rss": proc_status(dockerd_pid, "VmRSS"),
        }
        sup.stop()
    return result


def _threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def run(options: Options) -> Section:
    total = max(options.containers, 1)
    first = min(STARTUP_CONTAINERS, total)
    repetitions = 2 if options.quick else 5
    window = 10.0 if options.quick else 30.0
    section = Section("footprint", TITLE)
    tmp = Path(tempfile.mkdtemp(prefix="hbf", dir="/tmp"))
    try:
        with private_engine() as engine:
            log(f"footprint: {first} running containers")
            began = time.monotonic()
            make_containers(engine.host, first, start=True, prefix="run")
            made_running = time.monotonic() - began
            startups = [_startup(engine.host, tmp / "api.sock") for _ in range(repetitions)]
            peers = [_docker_py_startup(engine.host) for _ in range(repetitions)]
            log(f"footprint: start-up at {first}: {ms(median([s['synced'] for s in startups]))}")
            made_created = 0.0
            if total > first:
                log(f"footprint: {total - first} more containers, created only, 4 clients")
                began = time.monotonic()
                make_containers(engine.host, total - first, start=False, prefix="idle")
                made_created = time.monotonic() - began
            big = _startup(engine.host, tmp / "api.sock") if total > first else startups[-1]
            assert engine.pid is not None
            log(f"footprint: idle for {window:g} s with {total} containers, default settings")
            idle = _idle(engine.host, tmp / "api.sock", engine.pid, window, [])
            log(f"footprint: idle for {window:g} s with {total} containers, stats sampling off")
            no_stats = tmp / "no-stats.toml"
            no_stats.write_text("[stats]\ninterval_seconds = 0\n")
            mirror_only = _idle(
                engine.host, tmp / "api.sock", engine.pid, window, ["--config", str(no_stats)]
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    synced = [s["synced"] for s in startups]
    rows = [
        (
            f"supervisor, {first} containers (median of {repetitions})",
            ms(median([s["serving"] for s in startups])),
            ms(median([s["connected"] for s in startups])),
            ms(median(synced)),
            ms(max(synced)),
            mib(median([s["rss"] for s in startups])),
        ),
        (
            f"docker-py: list + {first} inspects, one by one (median of {repetitions})",
            "",
            "",
            ms(median(peers)),
            ms(max(peers)),
            "",
        ),
    ]
    if total > first:
        rows.insert(
            1,
            (
                f"supervisor, {total} containers (once)",
                ms(big["serving"]),
                ms(big["connected"]),
                ms(big["synced"]),
                "",
                mib(big["rss"]),
            ),
        )
    idle_rows = [
        (
            label,
            mib(m["rss"]),
            mib(m["hwm"]),
            f"{m['cpu_percent']:.2f} %",
            f"{m['fds']} fds, {m['threads']} threads",
            mib(m["dockerd_rss"]),
            f"{m['dockerd_cpu_percent']:.2f} %",
        )
        for label, m in (
            (f"default settings (live stats of the {first} running containers every 10 s)", idle),
            ("stats sampling off (`[stats] interval_seconds = 0`): the mirror alone", mirror_only),
        )
    ]
    section.markdown = "\n".join(
        [
            f"Containers: {first} running (made in {made_running:.0f} s by 4 parallel clients)"
            + (
                f", then {total - first} more created, not started (in {made_created:.0f} s)."
                if total > first
                else "."
            ),
            "",
            "Start-up, from spawning `python -m supervisor run` (interpreter and imports included):",
            "",
            table(
                ("", "serving /v1", "connected", "connected and synced", "max", "RSS when synced"),
                rows,
            ),
            "",
            f"Idle with {idle['containers']} containers mirrored, over {idle['window']:.0f} s"
            " each (after 5 s of settling; metrics listener on, no client). Live stats"
            " sample running containers only, one Docker stats call each per interval:",
            "",
            table(
                (
                    "supervisor",
                    "RSS",
                    "peak RSS (VmHWM)",
                    "CPU",
                    "",
                    "dockerd RSS (for scale)",
                    "dockerd CPU",
                ),
                idle_rows,
            ),
        ]
    )
    section.checks = [
        Check(
            f"footprint: RSS, {idle['containers']} containers idle",
            mib(idle["rss"]),
            f"< {mib(RSS_TARGET)}",
            idle["rss"] < RSS_TARGET,
        ),
        Check(
            f"footprint: CPU, {idle['containers']} containers idle, default settings",
            f"{idle['cpu_percent']:.2f} %",
            f"< {CPU_TARGET_PERCENT:g} %",
            idle["cpu_percent"] < CPU_TARGET_PERCENT,
        ),
        Check(
            f"footprint: CPU, {idle['containers']} containers idle, stats sampling off",
            f"{mirror_only['cpu_percent']:.2f} %",
            f"< {CPU_TARGET_PERCENT:g} %",
            mirror_only["cpu_percent"] < CPU_TARGET_PERCENT,
        ),
        Check(
            f"footprint: start-up to synced, {first} containers (median)",
            ms(median(synced)),
            f"< {STARTUP_TARGET_SECONDS:g} s",
            median(synced) < STARTUP_TARGET_SECONDS,
        ),
    ]
    if idle["containers"] != total:
        section.notes.append(
            f"the mirror held {idle['containers']} containers, not {total}: check the engine"
        )
    return section


if __name__ == "__main__":
    standalone(run, __doc__.split("\n\n")[0])
