"""The API socket file of a real daemon process: mode, group, directory, stale and live
sockets, removal on shutdown, the peer allowlist, and a daemon run as another user.

None of this needs Docker to answer, so most daemons here point at a Docker socket
that does not exist and stay in ``backing_off``: the API serves all the same.
"""

from __future__ import annotations

import grp
import json
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import UnprivilegedRuntime
from tests.daemon_proc import SupervisorProcess

NO_DOCKER = "unix:///nonexistent/docker.sock"
NOBODY = 65534

# Run as another uid by the system Python: one GET, prints "STATUS BODY".
PEER_SCRIPT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(b"GET /v1/health HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
head, _, body = data.partition(b"\\r\\n\\r\\n")
print(head.split(b" ")[1].decode(), body.decode())
"""


def get_as(uid: int, gid: int, path: Path) -> tuple[int, dict[str, object]]:
    """GET /v1/health on ``path`` from a process running as ``uid``/``gid``."""
    done = subprocess.run(
        ["/usr/bin/python3", "-c", PEER_SCRIPT, str(path)],
        user=uid,
        group=gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd="/",
    )
    status, _, body = done.stdout.strip().partition(" ")
    return int(status), json.loads(body)


def test_socket_mode_group_directory_and_removal(short_tmp: Path) -> None:
    """The socket gets api.mode and api.group, a missing directory 0750, and is removed on SIGTERM."""
    sock = short_tmp / "run" / "api.sock"
    with SupervisorProcess(
        NO_DOCKER,
        sock,
        metrics_listen="",
        extra_env={
            "SUPERVISOR_API_MODE": "0640",
            "SUPERVISOR_API_GROUP": grp.getgrgid(NOBODY).gr_name,
        },
    ) as sup:
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert (st.st_uid, st.st_gid) == (0, NOBODY)
        directory = os.stat(sock.parent)
        assert stat.S_IMODE(directory.st_mode) == 0o750
        assert directory.st_gid == NOBODY
        assert sup.get_json("/v1/health")["status"] == "ok"
        assert sup.stop() == 0
        assert not sock.exists()
        assert sock.parent.exists()


def test_stale_socket_is_replaced(short_tmp: Path) -> None:
    """A socket file nobody listens on is replaced at start-up."""
    sock = short_tmp / "api.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()
    os.chmod(sock, 0o700)  # tell the old file from the new one (inode numbers get reused)
    with SupervisorProcess(NO_DOCKER, sock, metrics_listen="") as sup:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        assert sup.get_json("/v1/health")["status"] == "ok"
        assert "replacing the stale socket" in sup.logs()


def test_second_instance_is_refused_with_exit_code_2(short_tmp: Path) -> None:
    """A second daemon on a live socket exits with 2 and one clear line; the first keeps serving."""
    sock = short_tmp / "api.sock"
    with SupervisorProcess(NO_DOCKER, sock, metrics_listen="") as first:
        inode = os.stat(sock).st_ino
        with SupervisorProcess(NO_DOCKER, sock, metrics_listen="", wait_ready=False) as second:
            assert second.wait_exit(20) == 2
            output = second.logs()
        assert "cannot start: another process" in output
        assert str(sock) in output
        assert "Traceback" not in output
        assert os.stat(sock).st_ino == inode
        assert first.get_json("/v1/health")["status"] == "ok"


def test_a_file_in_the_way_is_not_replaced(short_tmp: Path) -> None:
    """A regular file at the socket path stops start-up (exit 2) and is left alone."""
    sock = short_tmp / "api.sock"
    sock.write_text("keep me")
    with SupervisorProcess(NO_DOCKER, sock, metrics_listen="", wait_ready=False) as sup:
        assert sup.wait_exit(20) == 2
        assert "is not a socket" in sup.logs()
    assert sock.read_text() == "keep me"


def test_peer_allowlist_by_uid_and_by_gid(short_tmp: Path) -> None:
    """With allowed_uids or allowed_gids set, other peers get 403; listed ones are served."""
    os.chmod(short_tmp, 0o755)  # let uid 65534 reach the socket
    sock = short_tmp / "api.sock"
    mode = {"SUPERVISOR_API_MODE": "0666"}
    with SupervisorProcess(
        NO_DOCKER, sock, metrics_listen="", extra_env={**mode, "SUPERVISOR_API_ALLOWED_UIDS": "0"}
    ) as sup:
        assert sup.get_json("/v1/health")["status"] == "ok"
        status, body = get_as(NOBODY, NOBODY, sock)
        assert status == 403
        assert body["error"]["code"] == "forbidden"  # type: ignore[index]
        assert f"uid {NOBODY}" in body["error"]["message"]  # type: ignore[index]
    with SupervisorProcess(
        NO_DOCKER,
        sock,
        metrics_listen="",
        extra_env={**mode, "SUPERVISOR_API_ALLOWED_GIDS": str(NOBODY)},
    ) as sup:
        status, body = get_as(NOBODY, NOBODY, sock)
        assert (status, body["status"]) == (200, "ok")
        status, _, raw = sup.request("GET", "/v1/containers")
        assert status == 403
        assert json.loads(raw)["error"]["code"] == "forbidden"
    with SupervisorProcess(NO_DOCKER, sock, metrics_listen="", extra_env=mode):
        assert get_as(NOBODY, NOBODY, sock)[0] == 200  # no allowlist: anyone who can open it


def test_daemon_as_another_user_stays_live_while_docker_refuses_it(
    docker_host: str, unprivileged_runtime: UnprivilegedRuntime, short_tmp: Path
) -> None:
    """Run as uid 65534 without access to Docker: health 200, ready 503, a stale empty list."""
    os.chmod(short_tmp, 0o755)
    run_dir = short_tmp / "run"
    run_dir.mkdir()
    os.chown(run_dir, NOBODY, NOBODY)
    sock = run_dir / "api.sock"
    with SupervisorProcess(
        docker_host,
        sock,
        metrics_listen="",
        python=unprivileged_runtime.python,
        env=unprivileged_runtime.env,
        user=NOBODY,
        group=NOBODY,
    ) as sup:
        assert os.stat(sock).st_uid == NOBODY
        status = sup.wait_for(lambda s: s["error"] is not None)
        assert status["state"] in ("denied", "backing_off")
        assert sup.get_json("/v1/health") == {"status": "ok", "state": status["state"]}
        code, _, _ = sup.request("GET", "/v1/ready")
        assert code == 503
        listing = sup.get_json("/v1/containers")
        assert (listing["stale"], listing["containers"]) == (True, [])
        assert sup.stop() == 0
    assert not sock.exists()


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests change owners and run processes as uid 65534: run them as root")
