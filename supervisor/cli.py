"""The ``homelabarr-supervisor`` command: ``run`` the daemon, or talk to a running one.

Exit codes: 0 success, 1 failure (daemon unreachable, a check that failed),
2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import anyio
from loguru import logger

from supervisor import __version__
from supervisor.settings import ConfigError, LogSettings, Settings, load_settings

__all__ = ["configure_logging", "main"]

#: ``run`` flags → dotted settings keys.
RUN_FLAGS = {
    "docker_host": ("docker.host", "--docker-host"),
    "socket": ("api.socket", "--socket"),
    "metrics_listen": ("metrics.listen", "--metrics-listen"),
    "log_level": ("log.level", "--log-level"),
    "log_format": ("log.format", "--log-format"),
    "user": ("process.user", "--user"),
}


def _json_sink(message: Any) -> None:
    record = message.record
    line: dict[str, object] = {
        "time": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
        "module": record["name"],
    }
    if record["exception"] is not None:
        line["exception"] = "".join(message.splitlines(keepends=True)[1:]).strip() or None
    line.update(record["extra"])
    sys.stderr.write(json.dumps(line, default=str) + "\n")
    sys.stderr.flush()


def configure_logging(settings: LogSettings) -> None:
    """Human text by default; one JSON object per line with ``log.format = "json"``."""
    logger.remove()
    if settings.format == "json":
        logger.add(_json_sink, level=settings.level, format="{message}", backtrace=False)
    else:
        logger.add(
            sys.stderr,
            level=settings.level,
            format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}",
            backtrace=False,
            diagnose=False,
        )


def _settings_from(args: argparse.Namespace) -> Settings:
    flags: dict[str, object] = {}
    names: dict[str, str] = {}
    for attr, (key, flag) in RUN_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None:
            flags[key] = value
            names[key] = flag
    return load_settings(config_path=args.config, flags=flags, flag_names=names)


def _cmd_run(args: argparse.Namespace) -> int:
    from supervisor.access import resolve_endpoint
    from supervisor.daemon import join_threads, run_daemon
    from supervisor.privilege import drop_privileges

    settings = _settings_from(args)
    configure_logging(settings.log)
    drop_privileges(settings.process, resolve_endpoint(settings.docker, os.environ))
    anyio.run(run_daemon, settings)
    leftover = join_threads()
    if leftover:
        logger.warning("threads still running at exit: {}", ", ".join(leftover))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from supervisor.doctor import diagnose

    settings = _settings_from(args)
    diagnosis = diagnose(settings.docker, os.environ)
    if args.json:
        print(json.dumps(diagnosis.to_json(), indent=2))
    else:
        print(diagnosis.render())
    return 0 if diagnosis.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="homelabarr-supervisor",
        description="The one place where a HomelabARR installation touches Docker.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon until SIGTERM or SIGINT")
    run.add_argument("--config", metavar="PATH", help="TOML file (default: $SUPERVISOR_CONFIG)")
    run.add_argument("--docker-host", metavar="URL", help="unix:///path or tcp://host:port")
    run.add_argument("--socket", metavar="PATH", help="the API's Unix socket")
    run.add_argument("--metrics-listen", metavar="HOST:PORT", help="metrics listener; empty: off")
    run.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ...")
    run.add_argument("--log-format", metavar="FORMAT", help="text or json")
    run.add_argument("--user", metavar="NAME|UID", help="drop to this user (started as root)")
    run.set_defaults(handler=_cmd_run)

    doctor = commands.add_parser(
        "doctor", help="check access to Docker and print the one fix that applies"
    )
    doctor.add_argument("--config", metavar="PATH", help="TOML file (default: $SUPERVISOR_CONFIG)")
    doctor.add_argument("--docker-host", metavar="URL", help="unix:///path or tcp://host:port")
    doctor.add_argument("--json", action="store_true", help="one JSON object")
    doctor.set_defaults(handler=_cmd_doctor)

    from supervisor import client

    client.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except BaseException as exc:
        fatal = _startup_failure(exc)
        if fatal is None:
            raise
        print(f"homelabarr-supervisor: {fatal}", file=sys.stderr)
        return 2
    return code


def _startup_failure(exc: BaseException) -> str | None:
    """The message for a configuration or start-up error, wherever it was raised.

    Errors raised inside the daemon's task group arrive wrapped in exception groups.
    """
    from supervisor.daemon import StartupError
    from supervisor.privilege import PrivilegeError

    if isinstance(exc, ConfigError):
        return f"configuration error: {exc}"
    if isinstance(exc, StartupError | PrivilegeError):
        return f"cannot start: {exc}"
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _startup_failure(inner)
            if found is not None:
                return found
    return None
