"""Where Docker is, who may open it, and what to tell a human who may not.

The endpoint and remedy logic is plain code over small fact objects
(:class:`SocketFacts`, :class:`ProcessFacts`); gathering those facts (``stat``,
``getgroups``) is the only I/O here and stays in the two ``*_facts`` functions.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

from supervisor.settings import DockerSettings
from supervisor.state import ErrorKind

__all__ = [
    "Endpoint",
    "ProcessFacts",
    "SocketFacts",
    "expand_candidate",
    "process_facts",
    "proxy_permission",
    "remedy",
    "resolve_endpoint",
    "socket_facts",
]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The Docker endpoint in use: its URL and, for ``unix://``, the socket path."""

    url: str
    socket_path: str | None
    detected: bool = False  # found by auto-detection rather than configured

    @property
    def watch_paths(self) -> tuple[str, ...]:
        return (self.socket_path,) if self.socket_path else ()


def expand_candidate(candidate: str, environ: Mapping[str, str]) -> str | None:
    """``$XDG_RUNTIME_DIR/docker.sock`` → a path, or None when a variable is unset."""
    path = candidate
    if "$XDG_RUNTIME_DIR" in path:
        runtime = environ.get("XDG_RUNTIME_DIR")
        if not runtime:
            return None
        path = path.replace("$XDG_RUNTIME_DIR", runtime)
    if path.startswith("~"):
        home = environ.get("HOME")
        if not home:
            return None
        path = home + path[1:]
    return path


def resolve_endpoint(
    settings: DockerSettings, environ: Mapping[str, str], exists: object = os.path.exists
) -> Endpoint:
    """The configured host, else the first candidate socket that exists, else the first one."""
    if settings.host:
        url = settings.host
        if url.startswith("/"):
            url = "unix://" + url
        parsed = urlparse(url)
        path = parsed.path if parsed.scheme in ("unix", "http+unix") else None
        return Endpoint(url, path or None)
    paths = [p for p in (expand_candidate(c, environ) for c in settings.candidates) if p]
    assert callable(exists)
    for path in paths:
        if exists(path):
            return Endpoint("unix://" + path, path, detected=True)
    fallback = paths[0] if paths else "/var/run/docker.sock"
    return Endpoint("unix://" + fallback, fallback, detected=True)


# -- facts ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SocketFacts:
    path: str
    exists: bool
    is_socket: bool = False
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None
    owner: str | None = None
    group: str | None = None
    #: errno of a failed stat: ENOENT (missing) or EACCES (a directory on the way is closed).
    stat_errno: int | None = None

    @property
    def hidden(self) -> bool:
        """The path cannot be looked at: a parent directory denies this process."""
        return self.stat_errno in (errno.EACCES, errno.EPERM)

    def describe(self) -> str:
        if self.hidden:
            return f"{self.path} cannot be reached: a directory on the way denies this process"
        if not self.exists:
            return f"{self.path} does not exist"
        owner = self.owner or str(self.uid)
        group = self.group or str(self.gid)
        kind = "" if self.is_socket else " (not a socket!)"
        return f"{self.path} is {owner}:{group} (uid {self.uid}, gid {self.gid}) mode {self.mode:04o}{kind}"


@dataclass(frozen=True, slots=True)
class ProcessFacts:
    uid: int
    gid: int
    groups: tuple[int, ...]

    def describe(self) -> str:
        groups = ",".join(str(g) for g in self.groups) or "none"
        return f"this process runs as uid {self.uid} gid {self.gid} with groups [{groups}]"

    def may_open(self, sock: SocketFacts) -> bool:
        """Whether the mode bits let this process read and write the socket."""
        if not sock.exists or sock.mode is None:
            return False
        if self.uid == 0:
            return True
        if sock.uid == self.uid:
            return sock.mode & 0o600 == 0o600
        if sock.gid == self.gid or sock.gid in self.groups:
            return sock.mode & 0o060 == 0o060
        return sock.mode & 0o006 == 0o006


def socket_facts(path: str) -> SocketFacts:
    try:
        st = os.stat(path)
    except OSError as exc:
        return SocketFacts(path, exists=False, stat_errno=exc.errno)
    try:
        owner: str | None = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = None
    try:
        group: str | None = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = None
    return SocketFacts(
        path,
        exists=True,
        is_socket=stat.S_ISSOCK(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mode=stat.S_IMODE(st.st_mode),
        owner=owner,
        group=group,
    )


def process_facts() -> ProcessFacts:
    return ProcessFacts(os.getuid(), os.getgid(), tuple(sorted(set(os.getgroups()))))


# -- remedies ------------------------------------------------------------------------

#: API path prefix → the permission a socket proxy (docker-socket-proxy style) must grant.
_PROXY_PERMISSIONS: Sequence[tuple[str, str]] = (
    ("/_ping", "PING"),
    ("/version", "VERSION"),
    ("/info", "INFO"),
    ("/events", "EVENTS"),
    ("/containers", "CONTAINERS"),
)


def proxy_permission(path: str | None) -> str | None:
    """The socket-proxy permission a refused request path needs, e.g. ``EVENTS``."""
    if not path:
        return None
    path = urlparse(path).path
    # Strip a version prefix such as /v1.41.
    parts = path.split("/", 2)
    if len(parts) > 2 and parts[1].startswith("v") and parts[1][1:2].isdigit():
        path = "/" + parts[2]
    for prefix, permission in _PROXY_PERMISSIONS:
        if path.startswith(prefix):
            return permission
    return None


def remedy(
    kind: ErrorKind,
    endpoint: Endpoint,
    *,
    sock: SocketFacts | None = None,
    proc: ProcessFacts | None = None,
    refused_path: str | None = None,
    timeout_seconds: float | None = None,
) -> str:
    """One line telling the operator what to do about a failure of ``kind``."""
    if kind is ErrorKind.PERMISSION_DENIED:
        return _permission_remedy(endpoint, sock, proc)
    if kind is ErrorKind.FORBIDDEN:
        permission = proxy_permission(refused_path)
        what = f"{refused_path} " if refused_path else ""
        if permission:
            return (
                f"{endpoint.url} refused {what}with 401/403: a socket proxy is filtering; "
                f"allow {permission}=1 (the supervisor needs CONTAINERS, EVENTS, INFO, VERSION, "
                "PING; no POST unless actions are enabled)"
            )
        return (
            f"{endpoint.url} refused {what}with 401/403: grant the supervisor read access to "
            "containers, events, info, version and ping on the proxy"
        )
    if kind is ErrorKind.SOCKET_MISSING:
        path = endpoint.socket_path or endpoint.url
        return (
            f"no Docker socket at {path}: start Docker, or mount the host's socket into this "
            f"container (-v /var/run/docker.sock:{path}), or set DOCKER_HOST"
        )
    if kind is ErrorKind.CONNECTION_REFUSED:
        return (
            f"nothing answers at {endpoint.url}: Docker is stopped or restarting (a socket file "
            "left behind by a crash refuses connections); start it, e.g. systemctl start docker"
        )
    if kind is ErrorKind.TIMEOUT:
        within = f" within {timeout_seconds:g} s" if timeout_seconds else ""
        return (
            f"Docker at {endpoint.url} did not answer{within}: it may be hung or overloaded; "
            "check systemctl status docker and its logs"
        )
    return f"Docker at {endpoint.url} answered with an error; see the message and Docker's logs"


def _permission_remedy(
    endpoint: Endpoint, sock: SocketFacts | None, proc: ProcessFacts | None
) -> str:
    path = endpoint.socket_path or endpoint.url
    facts = [f.describe() for f in (sock, proc) if f is not None]
    prefix = "; ".join(facts) + ": " if facts else f"permission denied on {path}: "
    if sock is not None and sock.hidden:
        return prefix + (
            f"make every directory on the way to {path} traversable (chmod o+x) for this process"
        )
    if sock is None or not sock.exists or sock.gid is None:
        return prefix + "give this process the socket's group (stat -c %g " + path + ")"
    if sock.gid == 0:
        return prefix + (
            "the socket belongs to group 0 (root), and adding group 0 would give this process "
            "the root group; instead give the socket a dedicated group on the host "
            f"(chgrp docker {path}) and add that group's GID with group_add, or use a socket "
            "proxy (DOCKER_HOST=tcp://socket-proxy:2375)"
        )
    if sock.mode is not None and sock.mode & 0o060 != 0o060:
        return prefix + (
            f"the socket's group may not read and write it; on the host run chmod 660 {path}"
        )
    gid = sock.gid
    return prefix + (
        f'add the socket\'s group: group_add: ["{gid}"] in compose.yaml, '
        f"or --group-add {gid} for docker run (or set process.user and start as root to "
        "adapt automatically)"
    )
