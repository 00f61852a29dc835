"""Command-line clients of a running daemon: ``status``, ``containers``, ``watch``, ``healthcheck``,
and the actions ``start``, ``stop``, ``restart``, ``rm``, ``logs``.

They talk to the API over its Unix socket like any other client (a small
synchronous ``http.client`` connection), print an aligned table or one line per
event, or the API's JSON with ``--json``. A daemon that cannot be reached is one
line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO
from urllib.parse import quote, urlencode

from supervisor.records import CONTAINER_STATES
from supervisor.settings import load_settings

__all__ = ["ApiClient", "ClientError", "add_commands"]

PROG = "homelabarr-supervisor"
REQUEST_TIMEOUT_SECONDS = 5.0


class ClientError(Exception):
    """Something a human must be told in one line (exit code 1)."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix socket (the API's, or Docker's for the doctor)."""

    def __init__(self, path: str | os.PathLike[str], timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = os.fspath(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    """A synchronous client of the API's Unix socket, with human error messages."""

    def __init__(self, socket_path: str, timeout: float | None = REQUEST_TIMEOUT_SECONDS) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        path = self.socket_path
        try:
            yield
        except FileNotFoundError:
            raise ClientError(
                f"no socket at {path}: is the supervisor running? (--socket, SUPERVISOR_API_SOCKET)"
            ) from None
        except ConnectionRefusedError:
            raise ClientError(f"nothing listens on {path}: the supervisor is not running") from None
        except PermissionError:
            raise ClientError(
                f"permission denied on {path}: join the socket's group or run as its owner"
            ) from None
        except TimeoutError:
            raise ClientError(
                f"the supervisor at {path} did not answer within {self.timeout:g} s"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"lost the connection to the supervisor at {path}: {exc!r}") from None

    def get(self, path: str) -> tuple[int, Any]:
        """``GET path``: (status, decoded JSON body)."""
        return self.call("GET", path)

    def call(self, method: str, path: str, timeout: float | None = None) -> tuple[int, Any]:
        """``METHOD path``: (status, decoded JSON body); ``timeout`` replaces the client's."""
        with self._errors():
            conn = UnixHTTPConnection(self.socket_path, timeout or self.timeout)
            try:
                conn.request(method, path)
                response = conn.getresponse()
                body = response.read()
            finally:
                conn.close()
        try:
            return response.status, json.loads(body)
        except ValueError:
            raise ClientError(
                f"{method} {path}: {response.status}, not JSON: {body[:200]!r}"
            ) from None

    def get_ok(self, path: str) -> Any:
        status, body = self.get(path)
        if status != 200:
            raise ClientError(_error_message(path, status, body))
        return body

    def events(self, since: int | None) -> Iterator[dict[str, Any]]:
        """Follow ``/v1/events`` until the stream ends; yields the decoded lines."""
        path = "/v1/events" + (f"?since={since}" if since is not None else "")
        # No read timeout: heartbeats come every api.heartbeat_seconds, but that
        # value is the daemon's to choose.
        return self.ndjson(path, None)

    def ndjson(self, path: str, timeout: float | None) -> Iterator[dict[str, Any]]:
        """``GET path`` answered with NDJSON: the decoded lines until the stream ends."""
        conn = UnixHTTPConnection(self.socket_path, timeout)
        try:
            with self._errors():
                conn.request("GET", path)
                response = conn.getresponse()
                if response.status != 200:
                    body = response.read()
                    try:
                        decoded = json.loads(body)
                    except ValueError:
                        decoded = None
                    raise ClientError(_error_message(path, response.status, decoded))
            while True:
                with self._errors():
                    line = response.readline()
                if not line:
                    return
                yield json.loads(line)
        finally:
            conn.close()


def _error_message(path: str, status: int, body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return f"{body['error'].get('message', '')} ({status})"
    return f"GET {path}: HTTP {status}"


# -- output ----------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart; the last is not padded."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = []
    for row in [headers, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _dash(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _status_rows(status: dict[str, Any]) -> list[tuple[str, str]]:
    docker = status.get("docker") or {}
    error = status.get("error")
    retry_in = status.get("retry_in")
    return [
        ("state", f"{status['state']} since {status['since']}"),
        ("synced", "yes" if status.get("synced") else "no"),
        ("docker", _dash(docker.get("host"))),
        (
            "docker version",
            f"{_dash(docker.get('version'))} (API {_dash(docker.get('api_version'))})",
        ),
        ("containers", str(status.get("containers"))),
        ("revision", str(status.get("revision"))),
        ("attempts", str(status.get("attempts"))),
        ("retry in", "-" if retry_in is None else f"{retry_in:g} s"),
        ("error", f"{error['kind']}: {error['message']}" if error else "-"),
        ("remedy", error["remedy"] if error else "-"),
    ]


# -- commands --------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> ApiClient:
    path = args.socket or load_settings(config_path=args.config).api.socket
    return ApiClient(path)


def _run(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ClientError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:  # `... | head`
            with contextlib.suppress(OSError):
                sys.stdout.close()
            return 0

    return run


def _cmd_status(args: argparse.Namespace) -> int:
    status = _client(args).get_ok("/v1/status")
    if args.json:
        _print_json(status, sys.stdout)
    else:
        rows = _status_rows(status)
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key.ljust(width)}  {value}")
    return 0


def _containers_query(args: argparse.Namespace) -> str:
    pairs = [("state", s) for s in args.state or []]
    pairs += [("label", label) for label in args.label or []]
    pairs += [("name", name) for name in args.name or []]
    if getattr(args, "stats", False):
        pairs.append(("stats", "1"))
    return f"?{urlencode(pairs, quote_via=quote)}" if pairs else ""


def _cmd_containers(args: argparse.Namespace) -> int:
    body = _client(args).get_ok("/v1/containers" + _containers_query(args))
    if args.json:
        _print_json(body, sys.stdout)
        return 0
    headers: tuple[str, ...] = ("NAME", "STATE", "HEALTH", "IMAGE", "ID")
    rows: list[tuple[str, ...]] = [
        (c["name"], c["state"], _dash(c.get("health")), c["image"], c["id"][:12])
        for c in body["containers"]
    ]
    if args.stats:
        headers += ("CPU %", "MEM USAGE / LIMIT", "MEM %", "NET I/O", "BLOCK I/O", "PIDS")
        rows = [
            row + _stats_cells(c.get("stats"))
            for row, c in zip(rows, body["containers"], strict=True)
        ]
    print(table(headers, rows))
    if body.get("stale"):
        print(
            f"{PROG}: stale: Docker is {body['state']}; this is the last known state",
            file=sys.stderr,
        )
    return 0


def _size(value: object, *, binary: bool) -> str:
    """Bytes as docker stats prints them: 48.29MiB (binary), 11.7kB (decimal)."""
    if not isinstance(value, int | float):
        return "-"
    base, units = (
        (1024.0, ("B", "KiB", "MiB", "GiB", "TiB"))
        if binary
        else (1000.0, ("B", "kB", "MB", "GB", "TB"))
    )
    number = float(value)
    for unit in units[:-1]:
        if number < base:
            return f"{number:.4g}{unit}" if binary else f"{number:.3g}{unit}"
        number /= base
    return f"{number:.4g}{units[-1]}" if binary else f"{number:.3g}{units[-1]}"


def _percent(value: object) -> str:
    return f"{value:.2f}%" if isinstance(value, int | float) else "-"


def _stats_cells(stats: dict[str, Any] | None) -> tuple[str, ...]:
    """The --stats columns of one container; dashes when not running or not sampled yet."""
    if not stats:
        return ("-",) * 6
    network = stats.get("network") or {}
    rx = sum(i.get("rx_bytes", 0) for i in network.values())
    tx = sum(i.get("tx_bytes", 0) for i in network.values())
    return (
        _percent(stats.get("cpu_percent")),
        f"{_size(stats.get('memory_usage_bytes'), binary=True)} / "
        f"{_size(stats.get('memory_limit_bytes'), binary=True)}",
        _percent(stats.get("memory_percent")),
        f"{_size(rx, binary=False)} / {_size(tx, binary=False)}",
        f"{_size(stats.get('block_read_bytes'), binary=False)} / "
        f"{_size(stats.get('block_write_bytes'), binary=False)}",
        _dash(stats.get("pids")),
    )


class _EventPrinter:
    """One human line per change: time, revision, what happened."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.names: dict[str, str] = {}

    def line(self, event: dict[str, Any]) -> str | None:
        kind = event.get("type")
        revision = _dash(event.get("revision"))
        if kind == "heartbeat":
            return None
        if kind == "snapshot":
            containers = event.get("containers") or []
            self.names = {c["id"]: c["name"] for c in containers}
            text = f"{len(containers)} containers, docker {event.get('state')}"
        elif kind == "upsert":
            c = event["container"]
            self.names[c["id"]] = c["name"]
            text = f"{c['name']:<24}  {c['state']:<10}  {_dash(c.get('health')):<9}  {c['id'][:12]}"
        elif kind == "remove":
            cid = str(event.get("id"))
            text = f"{self.names.pop(cid, '?'):<24}  {'removed':<10}  {'-':<9}  {cid[:12]}"
        elif kind == "connection":
            error = event.get("error")
            text = f"docker {event.get('state')}" + (
                f"  {error['kind']}: {error['message']}" if error else ""
            )
        elif kind == "resync":
            text = "fell behind; reconnecting for a fresh snapshot"
        else:
            text = json.dumps(event)
        return f"{time.strftime('%H:%M:%S')}  {revision:>13}  {kind:<10}  {text}"

    def show(self, event: dict[str, Any]) -> None:
        text = self.line(event)
        if text is not None:
            self.out.write(text + "\n")
            self.out.flush()


def _cmd_watch(args: argparse.Namespace) -> int:
    client = _client(args)
    printer = _EventPrinter(sys.stdout)
    since: int | None = args.since
    while True:
        resync = False
        for event in client.events(since):
            if args.json:
                if event.get("type") != "heartbeat":
                    sys.stdout.write(json.dumps(event, ensure_ascii=False) + "\n")
                    sys.stdout.flush()
            else:
                printer.show(event)
            if event.get("type") == "resync":
                # Its revision is the daemon's, not ours: resume from what we have seen.
                resync = True
            elif isinstance(event.get("revision"), int):
                since = event["revision"]
        if not resync:
            raise ClientError("the supervisor closed the event stream")


def _cmd_healthcheck(args: argparse.Namespace) -> int:
    path = "/v1/ready" if args.ready else "/v1/health"
    status, body = _client(args).get(path)
    if args.json:
        _print_json(body, sys.stdout)
    elif status == 200:
        print(f"ok: docker {body.get('state')}")
    elif isinstance(body, dict) and "state" in body:
        error = body.get("error")
        why = f" ({error['kind']}: {error['message']})" if error else ""
        synced = "" if body.get("synced") else ", not synced"
        print(f"not ready: docker {body['state']}{synced}{why}")
    else:
        print(_error_message(path, status, body))
    return 0 if status == 200 else 1


#: How long the CLI waits for an action beyond its own timeout (the daemon bounds Docker's
#: answer and the wait for the mirror by actions.timeout_seconds, 30 s by default, each).
ACTION_WAIT_SECONDS = 75.0
_DONE = {"start": "started", "stop": "stopped", "restart": "restarted", "remove": "removed"}


def _cmd_action(args: argparse.Namespace) -> int:
    action: str = args.action
    ref = quote(args.ref, safe="")
    pairs: list[tuple[str, str]] = []
    method, path = "POST", f"/v1/containers/{ref}/{action}"
    if action in ("stop", "restart") and args.timeout is not None:
        pairs.append(("timeout", str(args.timeout)))
    if action == "remove":
        method, path = "DELETE", f"/v1/containers/{ref}"
        pairs += [(flag, "1") for flag in ("force", "volumes") if getattr(args, flag)]
    if pairs:
        path += "?" + urlencode(pairs)
    wait = ACTION_WAIT_SECONDS + ((args.timeout or 10) if action in ("stop", "restart") else 0)
    status, body = _client(args).call(method, path, timeout=wait)
    if status != 200:
        raise ClientError(_error_message(path, status, body))
    if args.json:
        _print_json(body, sys.stdout)
        return 0
    container = body.get("container")
    state = container["state"] if container else "gone"
    notes = []
    if not body.get("changed"):
        notes.append(f"already {state}; nothing done")
    if not body.get("settled"):
        notes.append("the mirror has not shown the change yet")
    extra = f" ({'; '.join(notes)})" if notes else ""
    print(f"{_DONE[action]} {body['name']} ({body['id'][:12]}): {state}{extra}")
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    pairs = [("tail", args.tail)] if args.tail is not None else []
    if args.since is not None:
        pairs.append(("since", args.since))
    pairs += [(flag, "1") for flag in ("timestamps", "follow") if getattr(args, flag)]
    path = f"/v1/containers/{quote(args.ref, safe='')}/logs"
    if pairs:
        path += "?" + urlencode(pairs)
    # Following has no end in time; otherwise each read may take as long as a request.
    for line in _client(args).ndjson(path, None if args.follow else 30.0):
        if args.json:
            sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
            sys.stdout.flush()
            continue
        out = sys.stderr if line.get("stream") == "stderr" else sys.stdout
        stamp = f"{line['time']} " if line.get("time") else ""
        out.write(f"{stamp}{line.get('line', '')}\n")
        out.flush()
    return 0


def add_commands(commands: Any) -> None:
    """Add the client subcommands (status, containers, watch, healthcheck, actions) to ``commands``."""

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--socket",
            metavar="PATH",
            help="the API's Unix socket (default: api.socket from --config or SUPERVISOR_API_SOCKET)",
        )
        parser.add_argument(
            "--config",
            metavar="PATH",
            help="TOML file to take api.socket from ($SUPERVISOR_CONFIG)",
        )
        parser.add_argument("--json", action="store_true", help="print the API's JSON")

    status = commands.add_parser("status", help="where the supervisor stands with Docker")
    common(status)
    status.set_defaults(handler=_run(_cmd_status))

    containers = commands.add_parser("containers", help="list the mirrored containers")
    common(containers)
    containers.add_argument(
        "--state", action="append", choices=CONTAINER_STATES, help="only this state (repeatable)"
    )
    containers.add_argument(
        "--label",
        action="append",
        metavar="KEY[=VALUE]",
        help="only containers with this label (repeatable; all must match)",
    )
    containers.add_argument(
        "--name", action="append", metavar="TEXT", help="only names containing TEXT (repeatable)"
    )
    containers.add_argument(
        "--stats", action="store_true", help="add CPU, memory, network, block I/O and pids"
    )
    containers.set_defaults(handler=_run(_cmd_containers))

    watch = commands.add_parser("watch", help="follow the changes, one line each")
    common(watch)
    watch.add_argument("--since", type=int, metavar="REVISION", help="resume after this revision")
    watch.set_defaults(handler=_run(_cmd_watch))

    healthcheck = commands.add_parser(
        "healthcheck", help="exit 0 when the daemon answers (--ready: and is synced with Docker)"
    )
    common(healthcheck)
    healthcheck.add_argument(
        "--ready", action="store_true", help="require a connection to Docker and a synced mirror"
    )
    healthcheck.set_defaults(handler=_run(_cmd_healthcheck))

    # -- actions: allowed by the daemon's [actions] policy, refused (403) otherwise ----
    ref_help = "container name, id, or id prefix (at least 4 characters)"
    for action, help_text in (
        ("start", "start a container"),
        ("stop", "stop a container (SIGTERM, then SIGKILL after --timeout)"),
        ("restart", "restart a container"),
        ("rm", "remove a container"),
    ):
        parser = commands.add_parser(action, help=f"{help_text} (needs actions.allow)")
        common(parser)
        parser.add_argument("ref", metavar="REF", help=ref_help)
        if action in ("stop", "restart"):
            parser.add_argument(
                "-t",
                "--timeout",
                type=int,
                metavar="SECONDS",
                help="seconds to wait for it to stop before killing it (default 10)",
            )
        if action == "rm":
            parser.add_argument(
                "-f", "--force", action="store_true", help="remove it even if it runs (kills it)"
            )
            parser.add_argument(
                "-v", "--volumes", action="store_true", help="remove its anonymous volumes too"
            )
        parser.set_defaults(
            handler=_run(_cmd_action), action="remove" if action == "rm" else action
        )

    logs = commands.add_parser(
        "logs", help="print a container's logs, stdout to stdout and stderr to stderr"
    )
    common(logs)
    logs.add_argument("ref", metavar="REF", help=ref_help)
    logs.add_argument("--tail", metavar="N", help="only the last N lines (default: all)")
    logs.add_argument(
        "--since", metavar="TIME", help="only lines since Unix seconds or an RFC 3339 time"
    )
    logs.add_argument("-t", "--timestamps", action="store_true", help="prefix each line's time")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines until it stops"
    )
    logs.set_defaults(handler=_run(_cmd_logs))
