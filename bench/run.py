"""The one benchmark command: runs every benchmark, writes bench/report.md and prints it.

    python bench/run.py                    # everything, full sizes (~20 min)
    python bench/run.py --quick            # small sizes: a smoke run (~5 min)
    python bench/run.py --only events,recovery --containers 500

Run it as root from the repository with the project's venv (``.venv/bin/python
bench/run.py`` or ``.venv/bin/python -m bench.run``): every benchmark starts its own
private dockerd, as the tests do, and removes it afterwards.

Our benchmarks (``events``, ``burst``, ``recovery``, ``footprint``) run in this
process. The others (``api``, ``metrics``, ``stats``) are standalone scripts that
print Markdown; they run as child processes and their output is included as is. A
missing script or one that fails is noted in the report with its error, and the
rest goes on. With ``--quick`` a script gets ``--quick`` and the usual size flags
(``--requests``, ``--rounds``, ``--seconds``, ``--window``) set small, for each flag
its ``--help`` lists.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import REPO, Check, Options, Section, add_options, log, options_from, render_section

BENCH = REPO / "bench"
REPORT = BENCH / "report.md"

#: Ours, run in this process: name -> module.
OURS = {
    "events": "bench.bench_events",
    "burst": "bench.bench_burst",
    "recovery": "bench.bench_recovery",
    "footprint": "bench.bench_footprint",
}
#: Theirs, run as child processes: name -> (script, title).
THEIRS = {
    "api": ("bench_api.py", "Query: `GET /v1/containers` against Docker's list"),
    "metrics": ("bench_metrics.py", "Metrics scrape"),
    "stats": ("bench_stats.py", "Live resource stats"),
}
ORDER = ("api", "events", "burst", "recovery", "footprint", "metrics", "stats")
#: Flags given to a standalone script under --quick, when its --help lists them.
QUICK_FLAGS: dict[str, str | None] = {
    "--quick": None,
    "--requests": "50",
    "--rounds": "10",
    "--seconds": "1",
    "--window": "5",
}
EXTERNAL_TIMEOUT_SECONDS = 3600


# -- running -----------------------------------------------------------------------------


def run_ours(name: str, options: Options) -> Section:
    module = importlib.import_module(OURS[name])
    started = time.monotonic()
    try:
        section: Section = module.run(options)
    except Exception:
        section = Section(name, getattr(module, "TITLE", name))
        section.checks = [Check(f"{name}: ran", "failed", "runs to the end", False)]
        section.markdown = "It failed:\n\n```\n" + traceback.format_exc().strip() + "\n```"
    section.seconds = time.monotonic() - started
    return section


def _tee(stream: object, into: list[str]) -> None:
    """Copy a child's stderr to ours (progress) and keep it (the error, if it fails)."""
    for line in stream:  # type: ignore[attr-defined]
        into.append(line)
        sys.stderr.write(line)
        sys.stderr.flush()


def run_theirs(name: str, options: Options) -> Section:
    script, title = THEIRS[name]
    path = BENCH / script
    section = Section(name, f"{title} (`bench/{script}`)")
    started = time.monotonic()
    if not path.exists():
        section.notes.append(f"`bench/{script}` is missing: not run.")
        return section
    argv = [sys.executable, str(path)]
    if options.quick:
        helped = subprocess.run(
            [*argv, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
        ).stdout
        for flag, value in QUICK_FLAGS.items():
            if re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helped):
                argv += [flag] if value is None else [flag, value]
    log(f"{name}: {shlex.join([f'bench/{script}', *argv[2:]])}")
    errors: list[str] = []
    try:
        with subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            tee = threading.Thread(target=_tee, args=(proc.stderr, errors), daemon=True)
            tee.start()
            try:
                out, _ = proc.communicate(timeout=EXTERNAL_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                errors.append(f"(killed after {EXTERNAL_TIMEOUT_SECONDS} s)\n")
            tee.join(10)
            code = proc.returncode
    except OSError as exc:
        out, code = "", -1
        errors.append(f"{exc}\n")
    section.seconds = time.monotonic() - started
    if code == 0:
        section.markdown = _demote(out)
        shown = shlex.join(["python", f"bench/{script}", *argv[2:]])
        section.notes.append(f"run as `{shown}`; its targets are stated in its own text.")
    else:
        tail = "".join(errors[-40:]).strip() or "(nothing on stderr)"
        section.markdown = (
            _demote(out) + "\n\n" if out.strip() else ""
        ) + f"`bench/{script}` exited with {code}; the end of its stderr:\n\n```\n{tail}\n```"
        section.checks = [Check(f"{name}: ran", f"exit {code}", "exit 0", False)]
    return section


def _demote(markdown: str) -> str:
    """Push a script's headings one level down, so that they sit under its section."""
    lines, fenced = [], False
    for line in markdown.strip().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        lines.append("#" + line if not fenced and re.match(r"#{1,5} ", line) else line)
    return "\n".join(lines)


# -- the report ----------------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def _meminfo(key: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    return "?"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.system()


def _supervisor_version() -> str:
    import supervisor

    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return (
        f"{supervisor.__version__} (commit {commit}{', with uncommitted changes' if dirty else ''})"
    )


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def environment(load_at_start: str, version_at_start: str) -> str:
    import docker

    version = _supervisor_version()
    if version != version_at_start:  # somebody committed while the benchmarks ran
        version = f"{version_at_start} at the start; {version} at the end"

    rows = [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("machine", f"{os.cpu_count()} cores ({_cpu_model()}), {_meminfo('MemTotal')} memory"),
        ("system", f"{_os_name()}, kernel {platform.release()}"),
        ("load average", f"at start {load_at_start}; at the end {_load()}"),
        ("Python", platform.python_version()),
        ("Docker engine", _first_line(["dockerd", "--version"])),
        ("containerd", _first_line(["containerd", "--version"])),
        ("docker-py", docker.__version__),
        ("homelabarr-supervisor", version),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def render(
    sections: Sequence[Section], options: Options, argv: Sequence[str], load: str, version: str
) -> str:
    checks = [c for s in sections for c in s.checks]
    missed = sum(c.passed is False for c in checks)
    parts = [
        "# homelabarr-supervisor: benchmark report",
        "",
        f"Command: `{shlex.join(['python', 'bench/run.py', *argv])}`"
        f" (scale {options.containers} containers{', quick' if options.quick else ''})."
        " Every figure comes from this one run, on private dockerd instances started for it.",
        "",
        environment(load, version),
        "",
        "## Targets",
        "",
        f"{len(checks) - missed} of {len(checks)} met." if checks else "No target was measured.",
        "",
        "| benchmark | target | figure | wanted | result |",
        "|---|---|---|---|---|",
        *(
            f"| {s.name} | {c.name} | {c.figure} | {c.target} | {c.mark} |"
            for s in sections
            for c in s.checks
        ),
        "",
        "| benchmark | status | time |",
        "|---|---|---|",
        *(f"| {s.name} | {_status_of(s)} | {s.seconds:.0f} s |" for s in sections),
        "",
    ]
    parts += [render_section(s) for s in sections]
    return "\n".join(parts)


def _status_of(section: Section) -> str:
    if any(c.name.endswith(": ran") for c in section.checks):
        return "**failed** (see its section)"
    if not section.markdown and not section.checks:
        return "not run: " + "; ".join(section.notes)
    return "ran"


# -- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="benchmarks: " + ", ".join(ORDER),
    )
    add_options(parser)
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only these (repeatable, or comma-separated): " + ", ".join(ORDER),
    )
    parser.add_argument("--output", type=Path, default=REPORT, help="where to write the report")
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_list)
    options = options_from(args)
    names = list(ORDER)
    if args.only:
        wanted = [n.strip() for chunk in args.only for n in chunk.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(ORDER))
        if unknown:
            parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(ORDER)}")
        names = [n for n in ORDER if n in wanted]
    if os.geteuid() != 0:
        parser.error("run as root: each benchmark starts a private dockerd")

    load, version = _load(), _supervisor_version()
    sections: list[Section] = []
    for name in names:
        log(f"== {name}")
        runner: Callable[[str, Options], Section] = run_ours if name in OURS else run_theirs
        sections.append(runner(name, options))
        log(f"== {name} done in {sections[-1].seconds:.0f} s")
    report = render(sections, options, args_list, load, version)
    args.output.write_text(report)
    print(report)
    log(f"report written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
