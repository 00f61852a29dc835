"""Benchmarks of homelabarr-supervisor against a private dockerd.

``python bench/run.py`` (or ``.venv/bin/python -m bench.run``) runs every benchmark and
writes ``bench/report.md``. Each of our benchmark modules (``bench_events``,
``bench_burst``, ``bench_recovery``, ``bench_footprint``) exposes
``run(options) -> Section`` and can also be run alone (``python bench/bench_events.py``).

This module holds what they share: the options, the result types (a Markdown body
and the targets checked), statistics, Markdown tables, and a private engine with
containers made in parallel. Standard library only at import time: the others'
standalone scripts live in this folder too and must not pay for it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for `tests.dockerd` and `tests.daemon_proc`

if TYPE_CHECKING:
    import docker

    from tests.dockerd import PrivateDockerd

#: Label on every container a benchmark makes.
BENCH_LABEL = "hls.bench"


@dataclass(frozen=True)
class Options:
    """What ``--containers``, ``--quick`` set; each benchmark derives its sizes from it."""

    containers: int = 1000
    quick: bool = False


@dataclass(frozen=True)
class Check:
    """One target next to the figure measured for it; ``passed`` None when not measured."""

    name: str
    figure: str
    target: str
    passed: bool | None

    @property
    def mark(self) -> str:
        return {True: "pass", False: "**miss**", None: "n/a"}[self.passed]


@dataclass
class Section:
    """One benchmark's part of the report."""

    name: str
    title: str
    markdown: str = ""
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# -- statistics ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100): a value that was actually measured."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ms(seconds: float) -> str:
    """Seconds as milliseconds for a table: 3 significant figures."""
    if math.isnan(seconds):
        return "-"
    value = seconds * 1000
    if abs(value) >= 100:
        return f"{value:.0f} ms"
    if abs(value) >= 10:
        return f"{value:.1f} ms"
    return f"{value:.2f} ms"


def mib(size: float) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (every cell through ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# -- progress --------------------------------------------------------------------------

_STARTED = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr (the report goes to stdout)."""
    print(f"[{time.monotonic() - _STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def wait_until(
    predicate: Callable[[], object], timeout: float, interval: float = 0.01, what: str = ""
) -> float:
    """Poll ``predicate`` until true; the seconds it took. TimeoutError after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what or 'condition'} not met within {timeout:g} s")
        time.sleep(interval)
    return time.monotonic() - started


# -- the process under test ------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_status(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status (VmRSS, VmHWM, ...) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


# -- a private engine ------------------------------------------------------------------


@contextlib.contextmanager
def private_engine(*, live_restore: bool = True) -> Iterator[PrivateDockerd]:
    """A started private dockerd with the test image; closed (and its folder removed) after."""
    from tests.dockerd import PrivateDockerd, build_test_image

    engine = PrivateDockerd(tempfile.mkdtemp(prefix="hb", dir="/tmp"), live_restore=live_restore)
    try:
        engine.start()
        with engine.api() as api:
            build_test_image(api)
        yield engine
    finally:
        engine.close()


def make_containers(
    host: str,
    count: int,
    *,
    clients: int = 4,
    start: bool = True,
    prefix: str = "bench",
    labels: dict[str, str] | None = None,
) -> list[str]:
    """Create (and start) ``count`` sleeping containers with ``clients`` parallel docker-py clients."""
    import docker

    from tests.dockerd import TEST_IMAGE

    ids: list[list[str]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            with docker.APIClient(base_url=host, version="auto", timeout=120) as api:
                host_config = api.create_host_config(network_mode="none")
                for n in range(worker, count, clients):
                    created = api.create_container(
                        TEST_IMAGE,
                        command=["/bin/sleep", "100000"],
                        name=f"{prefix}-{n:05d}",
                        labels={BENCH_LABEL: "1", **(labels or {})},
                        host_config=host_config,
                    )
                    ids[worker].append(created["Id"])
                    if start:
                        api.start(created["Id"])
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [cid for chunk in ids for cid in chunk]


def docker_view(api: docker.APIClient) -> dict[str, tuple[str, str]]:
    """Docker's own list: id -> (name, state)."""
    return {c["Id"]: (c["Names"][0].lstrip("/"), c["State"]) for c in api.containers(all=True)}


def mirror_view(body: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """A ``/v1/containers`` body: id -> (name, state)."""
    return {c["id"]: (c["name"], c["state"]) for c in body["containers"]}


# -- running one benchmark alone -------------------------------------------------------


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--containers",
        type=int,
        metavar="N",
        help="scale: N containers mirrored idle, N/2 in the burst (default 1000; 100 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")


def options_from(args: argparse.Namespace) -> Options:
    quick = bool(args.quick)
    return Options(containers=args.containers or (100 if quick else 1000), quick=quick)


def standalone(run: Callable[[Options], Section], description: str) -> None:
    """``main()`` of a benchmark module: parse the common options, run, print Markdown."""
    parser = argparse.ArgumentParser(description=description)
    add_options(parser)
    options = options_from(parser.parse_args())
    started = time.monotonic()
    section = run(options)
    section.seconds = time.monotonic() - started
    print(render_section(section))


def render_checks(checks: Sequence[Check]) -> str:
    return table(
        ("target", "figure", "wanted", "result"),
        [(c.name, c.figure, c.target, c.mark) for c in checks],
    )


def render_section(section: Section) -> str:
    parts = [f"## {section.title}", ""]
    if section.checks:
        parts += [render_checks(section.checks), ""]
    if section.markdown:
        parts += [section.markdown.strip(), ""]
    parts += [f"- {note}" for note in section.notes]
    if section.notes:
        parts.append("")
    parts.append(f"_({section.seconds:.0f} s)_")
    return "\n".join(parts) + "\n"
