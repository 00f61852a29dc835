"""Adapt to the Docker socket's group, then drop root: the adaptive start.

Started as root with ``process.user`` set, the daemon reads the group of the
Docker socket, makes it a supplementary group, switches group and user, and
checks that no capability survived, before it does anything else. This lets one
image work on every host whatever the socket's GID (999, 998, 281, ...), with no
``group_add`` to configure. Started as any other user, it does nothing.
"""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from supervisor.access import Endpoint
from supervisor.settings import ProcessSettings

__all__ = ["PrivilegeError", "Switched", "capabilities", "drop_privileges", "resolve_user"]


class PrivilegeError(Exception):
    """The switch cannot be made safely; the daemon must not start."""


@dataclass(frozen=True, slots=True)
class Switched:
    uid: int
    gid: int
    groups: tuple[int, ...]
    socket_gid: int | None
    note: str


def resolve_user(user: str) -> tuple[int, int]:
    """``nobody`` or ``65534`` → (uid, primary gid). A bare number need not exist in passwd."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise PrivilegeError(f"process.user: no such user {user!r}") from None
        uid = int(user)
        try:
            return uid, pwd.getpwuid(uid).pw_gid
        except KeyError:
            return uid, uid
    return entry.pw_uid, entry.pw_gid


def capabilities() -> dict[str, int]:
    """The capability sets of this process from /proc (CapInh, CapPrm, CapEff, CapBnd, CapAmb)."""
    caps: dict[str, int] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name.startswith("Cap"):
                    caps[name] = int(value.strip(), 16)
    except OSError:
        pass
    return caps


def _wait_for_socket(path: str, seconds: float, sleep: Callable[[float], None]) -> int | None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return os.stat(path).st_gid
        except OSError:
            if time.monotonic() >= deadline:
                return None
        sleep(0.25)


def drop_privileges(
    settings: ProcessSettings,
    endpoint: Endpoint,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> Switched | None:
    """Switch to ``settings.user`` with the socket's group; None when there is nothing to do."""
    if not settings.user:
        return None
    if os.geteuid() != 0:
        logger.debug(
            "process.user={} ignored: started as uid {}, not root; the socket's group must be "
            "given with group_add",
            settings.user,
            os.geteuid(),
        )
        return None
    uid, gid = resolve_user(settings.user)
    socket_gid: int | None = None
    note = ""
    if endpoint.socket_path:
        socket_gid = _wait_for_socket(endpoint.socket_path, settings.socket_wait_seconds, sleep)
        if socket_gid is None:
            note = (
                f"{endpoint.socket_path} did not appear within {settings.socket_wait_seconds:g} s; "
                f"switched to uid {uid} without its group: when Docker starts, access will be "
                "denied until the supervisor is restarted (or give the group with group_add)"
            )
    else:
        note = f"{endpoint.url} is not a Unix socket: no group to add"
    if socket_gid == 0 and not settings.allow_root_group:
        raise PrivilegeError(
            f"{endpoint.socket_path} belongs to group 0 (root); adding group 0 would give the "
            "supervisor the root group. Give the socket a dedicated group on the host "
            "(chgrp docker SOCKET), use a socket proxy, or set process.allow_root_group = true "
            "if you accept the risk"
        )
    groups = sorted({gid} | ({socket_gid} if socket_gid is not None else set()))
    try:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to uid {uid} gid {gid}: {exc}") from exc
    caps = capabilities()
    left = {
        name: value
        for name, value in caps.items()
        if name in ("CapPrm", "CapEff", "CapAmb") and value
    }
    if left or os.getuid() == 0 or os.geteuid() == 0:
        raise PrivilegeError(f"capabilities left after switching to uid {uid}: {left}")
    switched = Switched(uid, gid, tuple(os.getgroups()), socket_gid, note)
    if note:
        logger.warning("privileges dropped: {}", note)
    logger.info(
        "privileges dropped: uid {} gid {} groups {} (socket group {}); no capabilities left",
        uid,
        gid,
        list(switched.groups),
        socket_gid,
    )
    return switched
