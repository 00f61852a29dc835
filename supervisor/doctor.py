"""``homelabarr-supervisor doctor``: why can (or can't) this process use Docker, and the fix.

The doctor probes each endpoint with plain HTTP requests (stdlib ``http.client``
over the Unix socket or TCP), one per API call the daemon needs, so every answer
(a 403 from a socket proxy on ``/events`` only, say) is seen exactly; docker-py
would hide which call failed behind its version negotiation.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from supervisor.access import (
    Endpoint,
    ProcessFacts,
    SocketFacts,
    expand_candidate,
    process_facts,
    proxy_permission,
    resolve_endpoint,
    socket_facts,
)
from supervisor.client import UnixHTTPConnection
from supervisor.settings import DockerSettings

__all__ = ["Check", "Diagnosis", "EndpointReport", "diagnose"]

PROBE_TIMEOUT_SECONDS = 5.0

#: What the daemon needs, in the order it uses them: (check name, method, path).
_PROBES: tuple[tuple[str, str, str], ...] = (
    ("ping", "GET", "/_ping"),
    ("version", "GET", "/version"),
    ("list", "GET", "/containers/json?all=1&limit=1"),
    (
        "events",
        "GET",
        "/events?since={now}&until={now}&filters=%7B%22type%22%3A%5B%22container%22%5D%7D",
    ),
    ("info", "GET", "/info"),
)


@dataclass(slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    status: int | None = None

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "status": self.status}


@dataclass(slots=True)
class EndpointReport:
    endpoint: Endpoint
    socket: SocketFacts | None
    checks: list[Check] = field(default_factory=list)
    version: Mapping[str, Any] | None = None
    connect_errno: int | None = None

    @property
    def ok(self) -> bool:
        needed = {"connect", "ping", "version", "list", "events"}
        passed = {c.name for c in self.checks if c.ok}
        return needed <= passed

    def forbidden(self) -> list[str]:
        """Socket-proxy permissions whose requests were refused with 401/403."""
        refused = []
        for check in self.checks:
            if check.status in (401, 403):
                path = dict((n, p) for n, _, p in _PROBES).get(check.name)
                permission = proxy_permission(path)
                if permission:
                    refused.append(permission)
        return refused

    def to_json(self) -> dict[str, object]:
        sock = self.socket
        return {
            "url": self.endpoint.url,
            "detected": self.endpoint.detected,
            "socket": None
            if sock is None
            else {
                "path": sock.path,
                "exists": sock.exists,
                "is_socket": sock.is_socket,
                "uid": sock.uid,
                "gid": sock.gid,
                "owner": sock.owner,
                "group": sock.group,
                "mode": f"{sock.mode:04o}" if sock.mode is not None else None,
            },
            "checks": [c.to_json() for c in self.checks],
            "version": dict(self.version) if self.version else None,
            "ok": self.ok,
        }


@dataclass(slots=True)
class Diagnosis:
    process: ProcessFacts
    endpoint: EndpointReport
    candidates: list[EndpointReport]
    remedy: str

    @property
    def ok(self) -> bool:
        return self.endpoint.ok

    def to_json(self) -> dict[str, object]:
        p = self.process
        return {
            "ok": self.ok,
            "process": {"uid": p.uid, "gid": p.gid, "groups": list(p.groups)},
            "endpoint": self.endpoint.to_json(),
            "candidates": [c.to_json() for c in self.candidates],
            "remedy": self.remedy,
        }

    def render(self) -> str:
        lines = [self.process.describe()]
        for report in [
            self.endpoint,
            *[c for c in self.candidates if c.endpoint != self.endpoint.endpoint],
        ]:
            how = "auto-detected" if report.endpoint.detected else "configured"
            lines.append("")
            lines.append(f"{report.endpoint.url} ({how})")
            if report.socket is not None:
                lines.append(f"  socket: {report.socket.describe()}")
                if report.socket.exists:
                    may = self.process.may_open(report.socket)
                    lines.append(f"  mode bits let this process open it: {'yes' if may else 'no'}")
            for check in report.checks:
                mark = "ok  " if check.ok else "FAIL"
                lines.append(f"  [{mark}] {check.name:<8} {check.detail}")
        lines.append("")
        lines.append(("OK: " if self.ok else "PROBLEM: ") + self.remedy)
        return "\n".join(lines)


# -- probing -------------------------------------------------------------------------


def _connection(endpoint: Endpoint, settings: DockerSettings) -> http.client.HTTPConnection:
    if endpoint.socket_path:
        return UnixHTTPConnection(endpoint.socket_path, PROBE_TIMEOUT_SECONDS)
    parsed = urlparse(endpoint.url)
    host = parsed.hostname or "localhost"
    port = parsed.port or (2376 if settings.tls_verify else 2375)
    if settings.tls_verify or settings.cert_path:
        cert_path = settings.cert_path or os.path.expanduser("~/.docker")
        context = ssl.create_default_context(cafile=os.path.join(cert_path, "ca.pem"))
        context.load_cert_chain(
            os.path.join(cert_path, "cert.pem"), os.path.join(cert_path, "key.pem")
        )
        if not settings.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(
            host, port, timeout=PROBE_TIMEOUT_SECONDS, context=context
        )
    return http.client.HTTPConnection(host, port, timeout=PROBE_TIMEOUT_SECONDS)


def _probe(endpoint: Endpoint, settings: DockerSettings) -> EndpointReport:
    sock = socket_facts(endpoint.socket_path) if endpoint.socket_path else None
    report = EndpointReport(endpoint, sock)
    if sock is not None and not sock.exists and not sock.hidden:
        report.checks.append(Check("connect", False, f"{sock.path} does not exist"))
        report.connect_errno = errno.ENOENT
        return report
    conn = _connection(endpoint, settings)
    try:
        conn.connect()
    except OSError as exc:
        report.connect_errno = exc.errno
        report.checks.append(
            Check("connect", False, f"{os.strerror(exc.errno or 0) if exc.errno else exc}")
        )
        return report
    report.checks.append(Check("connect", True, "connected"))
    now = int(time.time())
    try:
        for name, method, path in _PROBES:
            target = path.format(now=now)
            try:
                conn.request(method, target, headers={"Host": "docker"})
                response = conn.getresponse()
                body = response.read(1 << 20)
            except (OSError, http.client.HTTPException) as exc:
                report.checks.append(Check(name, False, f"{method} {target.split('?')[0]}: {exc}"))
                conn.close()
                conn = _connection(endpoint, settings)
                continue
            ok = 200 <= response.status < 300
            detail = f"{method} {target.split('?')[0]} → {response.status}"
            if name == "version" and ok:
                try:
                    report.version = json.loads(body)
                    detail += f" (Docker {report.version.get('Version')}, API {report.version.get('ApiVersion')})"
                except ValueError:
                    ok = False
                    detail += " (not JSON)"
            elif not ok:
                text = body[:200].decode(errors="replace").strip()
                detail += f": {text}" if text else ""
            if name == "info" and not ok:
                detail += " (optional)"
            report.checks.append(Check(name, ok, detail, response.status))
    finally:
        conn.close()
    return report


# -- the remedy ----------------------------------------------------------------------


def _selinux_enforcing() -> bool:
    try:
        with open("/sys/fs/selinux/enforce") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _remedy(report: EndpointReport, proc: ProcessFacts, others: list[EndpointReport]) -> str:
    endpoint, sock = report.endpoint, report.socket
    if report.ok:
        version = report.version or {}
        return (
            f"everything the supervisor needs works at {endpoint.url} "
            f"(Docker {version.get('Version')}, API {version.get('ApiVersion')})"
        )
    if report.connect_errno == errno.ENOENT:
        working = [o for o in others if o.ok]
        if working:
            return f"use the socket that works: DOCKER_HOST={working[0].endpoint.url}"
        path = endpoint.socket_path or endpoint.url
        if "podman" in path:
            return (
                f"{path} does not exist: start Podman's API socket "
                "(systemctl enable --now podman.socket; for rootless: systemctl --user enable --now podman.socket)"
            )
        if path.startswith("/run/user/"):
            return f"{path} does not exist: start rootless Docker (systemctl --user start docker)"
        return (
            f"{path} does not exist: is Docker running on the host? In compose, mount it: "
            f'volumes: ["/var/run/docker.sock:{path}"]; or point DOCKER_HOST at the right socket'
        )
    if report.connect_errno in (errno.EACCES, errno.EPERM) and sock is not None:
        if sock.hidden:
            return (
                f"{sock.path} cannot be reached: a directory on the way denies uid {proc.uid}; "
                "make each directory on the path traversable (chmod o+x), or mount the socket "
                "somewhere reachable"
            )
        if sock.path.startswith("/run/user/") and sock.uid is not None and sock.uid != proc.uid:
            return (
                f"{sock.path} is a rootless Docker socket owned by uid {sock.uid}: run the "
                f'supervisor as that user (user: "{sock.uid}" in compose)'
            )
        if proc.may_open(sock):
            if _selinux_enforcing():
                return (
                    "the mode bits allow access but the kernel refuses: SELinux is enforcing; add "
                    'security_opt: ["label=disable"] to the supervisor\'s service (rather than '
                    "relabelling the socket with :z)"
                )
            return "the mode bits allow access but the kernel refuses: check SELinux/AppArmor"
        if sock.gid == 0:
            return (
                f"{sock.path} belongs to group 0 (root): adding group 0 would give the supervisor "
                "the root group, which can read much of the host. Instead give the socket a "
                f"dedicated group on the host (groupadd docker; chgrp docker {sock.path}), then "
                "group_add that GID, or put a socket proxy in front (DOCKER_HOST=tcp://socket-proxy:2375)"
            )
        if sock.mode is not None and sock.mode & 0o060 != 0o060:
            return f"{sock.path} is mode {sock.mode:04o}: its group cannot use it; on the host: chmod 660 {sock.path}"
        return (
            f'add the socket\'s group {sock.gid}: group_add: ["{sock.gid}"] in compose.yaml, or '
            f"--group-add {sock.gid} for docker run; or the adaptive start (start as root with "
            "process.user set, cap_add SETUID and SETGID), which reads the group by itself"
        )
    if report.connect_errno == errno.ECONNREFUSED:
        return (
            f"nothing answers at {endpoint.url}: Docker is stopped (a crash leaves the socket "
            "file behind); start it: systemctl start docker"
        )
    missing = report.forbidden()
    if missing:
        needed = sorted(set(missing))
        return (
            f"{endpoint.url} refuses {', '.join(needed)} with 401/403: it is a socket proxy; grant "
            + " ".join(f"{p}=1" for p in needed)
            + " (the supervisor needs CONTAINERS, EVENTS, VERSION, PING; INFO is optional; no POST)"
        )
    failed = [c for c in report.checks if not c.ok and c.name != "info"]
    first = failed[0] if failed else None
    return f"Docker at {endpoint.url} did not answer as expected: {first.detail if first else 'unknown'}"


def diagnose(settings: DockerSettings, environ: Mapping[str, str]) -> Diagnosis:
    proc = process_facts()
    endpoint = resolve_endpoint(settings, environ)
    main = _probe(endpoint, settings)
    candidates: list[EndpointReport] = []
    if endpoint.detected or not main.ok:
        for candidate in settings.candidates:
            path = expand_candidate(candidate, environ)
            if path is None or path == endpoint.socket_path:
                continue
            candidates.append(_probe(Endpoint("unix://" + path, path, detected=True), settings))
    return Diagnosis(proc, main, candidates, _remedy(main, proc, candidates))
