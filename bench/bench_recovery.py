"""Recovery: from dockerd answering ``/_ping`` again to the supervisor connected and synced.

A private dockerd (``--live-restore``, its containerd apart, as a host runs it) with a
handful of running containers is stopped with SIGTERM or killed with SIGKILL, left
down long enough for the supervisor's backoff to grow (several attempts, the next
one seconds away), then started again. A thread pings the engine's socket every
2 ms to stamp when Docker answers; another polls ``/v1/status`` every 5 ms for
``connected`` and ``synced``. Side by side: how long dockerd itself took from its
start to answering ``/_ping``.

    .venv/bin/python bench/bench_recovery.py [--quick]
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
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
    docker_view,
    log,
    make_containers,
    median,
    mirror_view,
    ms,
    percentile,
    private_engine,
    standalone,
    table,
)

TITLE = "Recovery after a Docker restart"
CONTAINERS = 5
TARGET_SECONDS = 1.0


def _pings(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(str(path))
            s.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
    except OSError:
        return False
    return reply.startswith(b"HTTP/1.1 200")


def _first(predicate: Any, interval: float, stop: threading.Event, out: list[float]) -> None:
    """Append the first time ``predicate()`` holds to ``out`` (polling), unless stopped."""
    while not stop.is_set():
        if predicate():
            out.append(time.monotonic())
            return
        time.sleep(interval)


def _status(sup: Any) -> dict[str, Any] | None:
    try:
        status: dict[str, Any] = sup.get_json("/v1/status")
    except Exception:
        return None
    return status


def _one_outage(engine: Any, sup: Any, api: Any, signal: str, outage: float) -> dict[str, Any]:
    """Stop or kill dockerd, wait ``outage`` s, start it; the timings of the way back."""
    sup.wait_synced(timeout=30)
    if signal == "SIGTERM":
        engine.stop()
    else:
        engine.kill()
    down_at = time.monotonic()
    sup.wait_for(lambda s: s["state"] in ("backing_off", "denied"), timeout=30)
    time.sleep(max(0.0, outage - (time.monotonic() - down_at)))
    before = _status(sup) or {}

    stop = threading.Event()
    answered: list[float] = []
    synced: list[float] = []
    watchers = [
        threading.Thread(
            target=_first,
            args=(lambda: _pings(engine.socket_path), 0.002, stop, answered),
            daemon=True,
        ),
        threading.Thread(
            target=_first,
            args=(
                lambda: (
                    (s := _status(sup)) is not None and s["state"] == "connected" and s["synced"]
                ),
                0.005,
                stop,
                synced,
            ),
            daemon=True,
        ),
    ]
    for t in watchers:
        t.start()
    spawned = time.monotonic()
    try:
        engine.pid_file.unlink(missing_ok=True)
        engine.start()
        deadline = time.monotonic() + 60
        while not synced and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in watchers:
            t.join(5)
    if not (answered and synced):
        raise TimeoutError(f"no recovery after {signal}: ping {answered}, synced {synced}")
    if mirror_view(sup.get_json("/v1/containers")) != docker_view(api):
        raise AssertionError(f"after {signal}: the mirror differs from Docker's list")
    return {
        "signal": signal,
        "dockerd_start": answered[0] - spawned,
        "recovery": synced[0] - answered[0],
        "attempts": before.get("attempts"),
        "retry_in": before.get("retry_in"),
        "state": before.get("state"),
        "kind": (before.get("error") or {}).get("kind"),
    }


def run(options: Options) -> Section:
    from tests.daemon_proc import SupervisorProcess

    repetitions = 1 if options.quick else 5
    outage = 3.0 if options.quick else 8.0
    section = Section("recovery", TITLE)
    tmp = Path(tempfile.mkdtemp(prefix="hbr", dir="/tmp"))
    results: list[dict[str, Any]] = []
    try:
        with private_engine() as engine, engine.api() as api:
            make_containers(engine.host, CONTAINERS, start=True, prefix="rec")
            with SupervisorProcess(engine.host, tmp / "api.sock", metrics_listen="") as sup:
                for n in range(repetitions):
                    for signal in ("SIGTERM", "SIGKILL"):
                        results.append(_one_outage(engine, sup, api, signal, outage))
                        log(
                            f"recovery: {signal} {n + 1}/{repetitions}:"
                            f" {ms(results[-1]['recovery'])}"
                        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for signal in ("SIGTERM", "SIGKILL", "both"):
        mine = [r for r in results if signal in (r["signal"], "both")]
        rec = [r["recovery"] for r in mine]
        start = [r["dockerd_start"] for r in mine]
        rows.append(
            (
                signal,
                len(mine),
                ms(median(start)),
                ms(median(rec)),
                ms(percentile(rec, 99)),
                ms(max(rec)),
            )
        )
    detail = [
        (
            r["signal"],
            r["state"],
            r["kind"],
            r["attempts"],
            f"{r['retry_in']:.1f} s" if r["retry_in"] is not None else "-",
            ms(r["recovery"]),
        )
        for r in results
    ]
    all_recoveries = [r["recovery"] for r in results]
    section.markdown = "\n".join(
        [
            f"{CONTAINERS} running containers; dockerd down {outage:g} s each time"
            f" (`--live-restore`: the containers survive); default backoff (0.5 s, x2, cap 30 s).",
            "",
            table(
                (
                    "dockerd stopped by",
                    "outages",
                    "dockerd: start to /_ping (median)",
                    "supervisor: /_ping to synced (median)",
                    "p99",
                    "max",
                ),
                rows,
            ),
            "",
            "Where the backoff stood when dockerd came back:",
            "",
            table(
                (
                    "signal",
                    "state",
                    "error",
                    "attempts since the loss",
                    "next attempt was in",
                    "recovery",
                ),
                detail,
            ),
        ]
    )
    section.checks = [
        Check(
            "recovery: /_ping to connected and synced, median",
            ms(median(all_recoveries)),
            f"< {TARGET_SECONDS:g} s",
            median(all_recoveries) < TARGET_SECONDS,
        )
    ]
    return section


if __name__ == "__main__":
    standalone(run, __doc__.split("\n\n")[0])
