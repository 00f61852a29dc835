"""A supervisor daemon in a child process, and a small HTTP client for its Unix socket.

    with SupervisorProcess(docker_host, short_tmp / "api.sock") as sup:
        status = sup.wait_for(lambda s: s["synced"], timeout=10)
        code, headers, body = sup.request("GET", "/v1/containers")

The child runs ``python -m supervisor run`` with JSON logs into a file (read with
:meth:`SupervisorProcess.logs`); :meth:`stop` sends SIGTERM and returns the exit
code; leaving the ``with`` block (or :meth:`close`) always ends the child, with
SIGKILL if it must.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from supervisor.client import UnixHTTPConnection

REPO = Path(__file__).resolve().parent.parent

# The daemon must not inherit the test run's settings by accident.
_DROPPED_ENV_PREFIXES = ("SUPERVISOR_", "DOCKER_")


class SupervisorError(RuntimeError):
    """The daemon did not start, or did something a test did not expect."""


def request(
    path: str | os.PathLike[str], method: str, target: str, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, headers with lower-case names, body)."""
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request(method, target)
        response = conn.getresponse()
        body = response.read()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, body
    finally:
        conn.close()


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def iter_lines(response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The NDJSON objects of an event-stream response, until it ends."""
    while True:
        line = response.readline()
        if not line:
            return
        yield json.loads(line)


class SupervisorProcess:
    """``python -m supervisor run`` as a child process, ready once ``/v1/health`` answers.

    ``env`` replaces the environment (default: this one without ``SUPERVISOR_*`` and
    ``DOCKER_*``, with the checkout on ``PYTHONPATH``); ``extra_env`` is added to it,
    e.g. ``{"SUPERVISOR_API_IDLE_TIMEOUT_SECONDS": "2"}``. ``user``/``group`` run the
    daemon as another uid/gid (with ``python`` and ``env`` from the
    ``unprivileged_runtime`` fixture).
    """

    def __init__(
        self,
        docker_host: str,
        socket_path: str | os.PathLike[str],
        *,
        metrics_listen: str | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        python: str | None = None,
        user: int | str | None = None,
        group: int | str | None = None,
        start_timeout: float = 20.0,
        wait_ready: bool = True,
    ) -> None:
        self.docker_host = docker_host
        self.socket = Path(socket_path)
        self.metrics_listen = (
            f"127.0.0.1:{free_tcp_port()}" if metrics_listen is None else metrics_listen
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV_PREFIXES)}
        self.env = dict(base if env is None else env)
        if env is None:
            self.env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(REPO), base.get("PYTHONPATH", "")) if p
            )
        self.env.update(extra_env or {})
        self.python = python or sys.executable
        self.argv = [
            self.python, "-m", "supervisor", "run",
            "--docker-host", docker_host,
            "--socket", str(self.socket),
            "--metrics-listen", self.metrics_listen,
            "--log-format", "json",
            *extra_args,
        ]  # fmt: skip
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in close()
            prefix="supervisor-", suffix=".log", delete=False
        )
        if user is not None or group is not None:
            os.chmod(self._log.name, 0o666)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd="/",
            user=user,
            group=group,
            extra_groups=[] if group is not None else None,
            start_new_session=True,
        )
        self._record_pid()
        if wait_ready:
            try:
                self.wait_serving(start_timeout)
            except BaseException:
                self.close()
                raise

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> SupervisorProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _record_pid(self) -> None:
        rundir = os.environ.get("SUPERVISOR_TEST_RUNDIR")
        if rundir:
            with open(os.path.join(rundir, "pids"), "a") as f:
                f.write(f"{self.proc.pid}\n")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        if not self.metrics_listen:
            return None
        host, _, port = self.metrics_listen.rpartition(":")
        return host, int(port)

    def wait_serving(self, timeout: float) -> None:
        """Wait until the socket answers HTTP (any status: an allowlist may refuse us)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SupervisorError(
                    f"the supervisor exited with {self.proc.returncode} before serving:\n"
                    + self.logs()
                )
            try:
                request(self.socket, "GET", "/v1/health", timeout=1.0)
                return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise SupervisorError(
                    f"the supervisor did not serve {self.socket} within {timeout:g} s:\n"
                    + self.logs()
                )
            time.sleep(0.02)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise SupervisorError(
                f"the supervisor did not exit within {timeout:g} s:\n" + self.logs()
            ) from None

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then wait; returns the exit code (SIGKILL and an error after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise SupervisorError(
                    f"the supervisor ignored SIGTERM for {timeout:g} s:\n" + self.logs()
                ) from None
        return self.proc.returncode

    def close(self) -> None:
        """End the child whatever its state, and drop its log file."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self._log.closed:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)

    def logs(self) -> str:
        try:
            return Path(self._log.name).read_text(errors="replace")
        except OSError:
            return "(log gone)"

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines (anything else the child printed is skipped)."""
        records = []
        for line in self.logs().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    # -- talking to it ----------------------------------------------------------------

    def connection(self, timeout: float = 5.0) -> UnixHTTPConnection:
        return UnixHTTPConnection(self.socket, timeout)

    def request(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        return request(self.socket, method, path)

    def get_json(self, path: str, *, expect: int | None = 200) -> Any:
        status, _, body = self.request("GET", path)
        if expect is not None and status != expect:
            raise SupervisorError(f"GET {path}: {status} {body[:500]!r}")
        return json.loads(body)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], object], timeout: float = 10.0
    ) -> dict[str, Any]:
        """Poll ``/v1/status`` until ``predicate(status)`` is true; returns that status."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while True:
            try:
                status = self.get_json("/v1/status")
            except (OSError, http.client.HTTPException, SupervisorError):
                if self.proc.poll() is not None:
                    raise SupervisorError(
                        f"the supervisor exited with {self.proc.returncode}:\n" + self.logs()
                    ) from None
            else:
                if predicate(status):
                    return status
            if time.monotonic() > deadline:
                raise SupervisorError(
                    f"condition not met within {timeout:g} s; last status {status}\n" + self.logs()
                )
            time.sleep(0.02)

    def wait_synced(self, timeout: float = 15.0) -> dict[str, Any]:
        return self.wait_for(lambda s: s["state"] == "connected" and s["synced"], timeout)

    def open_events(
        self, query: str = "", timeout: float = 10.0
    ) -> tuple[UnixHTTPConnection, http.client.HTTPResponse]:
        """Subscribe to ``/v1/events``; the caller closes the returned connection."""
        conn = self.connection(timeout)
        conn.request("GET", "/v1/events" + (f"?{query}" if query else ""))
        response = conn.getresponse()
        if response.status != 200:
            body = response.read()
            conn.close()
            raise SupervisorError(f"/v1/events: {response.status} {body!r}")
        return conn, response

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def api_connections(self) -> int:
        """Connections the daemon holds open on its API socket (the listener not counted).

        Accepted sockets carry the listener's path in /proc/net/unix, so the daemon's
        socket inodes with that path are the listener plus one per connection.
        """
        inodes = set()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        path = str(self.socket)
        count = 0
        with open("/proc/net/unix") as table:
            next(table)
            for line in table:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == path and fields[6] in inodes:
                    count += 1
        return max(0, count - 1)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0
