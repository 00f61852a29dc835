"""The adaptive start: started as root with a user set, take the socket's group and drop root."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.access import Endpoint
from supervisor.privilege import PrivilegeError, drop_privileges, resolve_user
from supervisor.settings import ProcessSettings
from tests.daemon_proc import SupervisorProcess


def _proc_status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {
        k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)
    }


def _reachable(private_dockerd: Any, short_tmp: Path) -> Path:
    sock = Path(private_dockerd.socket_path)
    sock.parent.chmod(0o711)
    short_tmp.chmod(0o777)
    return sock


def test_resolve_user_by_name_and_number() -> None:
    """`nobody` and `65534` resolve to uid and primary gid; an unknown name is an error."""
    assert resolve_user("nobody") == (65534, 65534)
    assert resolve_user("65534") == (65534, 65534)
    assert resolve_user("4321") == (4321, 4321)
    with pytest.raises(PrivilegeError, match="no such user"):
        resolve_user("no-such-user-here")


def test_no_user_means_no_switch() -> None:
    """Without process.user nothing happens, whoever started the daemon."""
    assert drop_privileges(ProcessSettings(), Endpoint("unix:///x", "/x")) is None


def test_adaptive_start_takes_the_socket_group_and_drops_all_capabilities(
    private_dockerd: Any, unprivileged_runtime: Any, short_tmp: Path
) -> None:
    """Started as root with --user 65534: runs as 65534 with the socket's GID, no capabilities, connected."""
    sock = _reachable(private_dockerd, short_tmp)
    with SupervisorProcess(
        private_dockerd.host,
        short_tmp / "api.sock",
        python=unprivileged_runtime.python,
        env=unprivileged_runtime.env,
        extra_args=["--user", "65534"],
    ) as sup:
        sup.wait_synced(timeout=10)
        status = _proc_status(sup.pid)
        assert status["Uid"].split() == ["65534"] * 4
        assert status["Gid"].split() == ["65534"] * 4
        assert str(sock.stat().st_gid) in status["Groups"].split()
        for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            assert int(status[caps], 16) == 0, caps
        assert sup.stop() == 0


def test_adaptive_start_waits_for_a_socket_that_appears_later(
    private_dockerd: Any, unprivileged_runtime: Any, short_tmp: Path
) -> None:
    """Docker's socket appears after the supervisor starts: its group is read then, before the switch."""
    sock = _reachable(private_dockerd, short_tmp)
    later = short_tmp / "later.sock"
    with SupervisorProcess(
        f"unix://{later}",
        short_tmp / "api.sock",
        python=unprivileged_runtime.python,
        env=unprivileged_runtime.env,
        extra_args=["--user", "65534"],
        wait_ready=False,
    ) as sup:
        time.sleep(1.0)
        assert not (short_tmp / "api.sock").exists()  # still root, waiting for the socket
        later.symlink_to(sock)
        sup.wait_serving(10)
        sup.wait_synced(timeout=10)
        assert str(sock.stat().st_gid) in _proc_status(sup.pid)["Groups"].split()
        assert sup.stop() == 0


def test_adaptive_start_refuses_group_zero(
    private_dockerd: Any, unprivileged_runtime: Any, short_tmp: Path
) -> None:
    """A socket of group 0: the adaptive start refuses with an explanation and exit code 2."""
    sock = _reachable(private_dockerd, short_tmp)
    gid = sock.stat().st_gid
    os.chown(sock, -1, 0)
    try:
        done = subprocess.run(
            [
                unprivileged_runtime.python, "-m", "supervisor", "run",
                "--docker-host", private_dockerd.host,
                "--socket", str(short_tmp / "api.sock"),
                "--metrics-listen", "",
                "--user", "65534",
            ],
            env=unprivileged_runtime.env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        os.chown(sock, -1, gid)
    assert done.returncode == 2, done.stderr
    assert "group 0" in done.stderr and "allow_root_group" in done.stderr
