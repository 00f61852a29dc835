"""Live stats served by a running daemon: `?stats=1`, `/v1/containers/{ref}/stats`, metrics, CLI."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.daemon_proc import SupervisorProcess

BUSY = ["/bin/sh", "-c", "while :; do :; done"]


def _until(check: Callable[[], Any], what: str, seconds: float = 20.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_stats_are_served_by_list_item_metrics_and_cli(
    docker_host: str, make_container: Callable[..., str], short_tmp: Path
) -> None:
    """A busy container gets stats in ?stats=1, in /stats, in /metrics and in `containers --stats`; a stopped one gets null."""
    busy = make_container(BUSY, name="stats-busy")
    stopped = make_container(name="stats-stopped", start=False)
    with SupervisorProcess(
        docker_host, short_tmp / "api.sock", extra_env={"SUPERVISOR_STATS_INTERVAL_SECONDS": "0.5"}
    ) as sup:
        sup.wait_synced()

        def busy_stats() -> dict[str, Any] | None:
            body = sup.get_json("/v1/containers?stats=1&name=stats-")
            by_id = {c["id"]: c for c in body["containers"]}
            assert by_id[stopped]["stats"] is None
            stats = by_id[busy]["stats"]
            return stats if stats and stats["cpu_percent"] is not None else None

        stats = _until(busy_stats, "a second sample of the busy container")
        assert stats["cpu_percent"] > 5
        assert stats["memory_limit_bytes"] > 0 and stats["pids"] >= 1
        assert set(stats) == {
            "cpu_percent", "memory_usage_bytes", "memory_limit_bytes", "memory_percent",
            "network", "block_read_bytes", "block_write_bytes", "pids", "sampled_at",
        }  # fmt: skip

        one = sup.get_json("/v1/containers/stats-busy/stats")
        assert one["id"] == busy and one["stats"]["pids"] >= 1
        assert sup.get_json("/v1/containers/stats-stopped/stats")["stats"] is None
        assert sup.request("GET", "/v1/containers/no-such-thing/stats")[0] == 404
        assert sup.request("GET", "/v1/containers?stats=maybe")[0] == 400

        _, _, metrics = sup.request("GET", "/metrics")
        assert re.search(
            rb"homelabarr_supervisor_container_cpu_seconds_total\{[^}]*name=\"stats-busy\"", metrics
        )
        assert not re.search(
            rb"homelabarr_supervisor_container_cpu_seconds_total\{[^}]*stats-stopped", metrics
        )

        table = subprocess.run(
            [sys.executable, "-m", "supervisor", "containers", "--stats", "--socket", str(sup.socket)],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        header, *rows = table.splitlines()
        assert "CPU %" in header and "MEM USAGE / LIMIT" in header
        busy_row = next(r for r in rows if r.startswith("stats-busy"))
        assert "%" in busy_row
        assert sup.stop() == 0
