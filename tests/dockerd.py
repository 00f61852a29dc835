"""A private Docker engine for tests: containerd and dockerd in a temporary directory.

containerd runs as its own process, as a host's service manager would run it, and
dockerd is pointed at it. dockerd's own child containerd lingers after a `kill -9` and
makes an immediate restart fail; with a separate containerd and `--live-restore`, a
killed dockerd comes back in a fraction of a second and running containers survive.

Every process started here is appended to `$SUPERVISOR_TEST_RUNDIR/pids` and every
engine directory to `$SUPERVISOR_TEST_RUNDIR/dirs`, so that tests/run.sh can reap what
a crashed test run leaves behind.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import io
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import docker
import docker.errors

TEST_IMAGE = "hls-test/busybox:latest"
TEST_LABEL = "hls.test"
BUSYBOX = Path("/bin/busybox")
RUNDIR_ENV = "SUPERVISOR_TEST_RUNDIR"

# containerd keeps one bundle per task here; each holds the container's init.pid.
_TASK_DIR = "io.containerd.runtime.v2.task"


class DockerdError(RuntimeError):
    """The private engine could not be started or stopped."""


class DockerEngine(Protocol):
    """What tests need from an engine: where it listens and a client for it."""

    @property
    def host(self) -> str: ...

    def api(self) -> docker.APIClient: ...


class ExternalDockerd:
    """An engine somebody else runs (`SUPERVISOR_TEST_DOCKER_HOST`)."""

    def __init__(self, host: str) -> None:
        self._host = host

    @property
    def host(self) -> str:
        return self._host

    def api(self) -> docker.APIClient:
        return docker.APIClient(base_url=self._host, version="auto", timeout=30)


@contextlib.contextmanager
def docker_py_socket_leak_ignored() -> Iterator[None]:
    """Silence the ResourceWarning of docker-py's failed connects.

    docker-py's UnixHTTPConnection.connect() does not close its socket when
    connect() fails (ECONNREFUSED, ENOENT, EACCES); under `filterwarnings = error`
    that leak fails whatever test is running when the socket is collected.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "unclosed <socket.socket", ResourceWarning)
        try:
            yield
        finally:
            gc.collect()


def _record(kind: str, value: object) -> None:
    rundir = os.environ.get(RUNDIR_ENV)
    if rundir:
        with open(os.path.join(rundir, kind), "a") as f:
            f.write(f"{value}\n")


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _ping(socket_path: Path, timeout: float = 1.0) -> bool:
    """True if an engine answers `GET /_ping` with OK on the socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(socket_path))
            s.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
    except OSError:
        return False
    return reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"OK")


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; always reaps the process."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(10)


def _processes_naming(text: str) -> Iterator[int]:
    """Pids of processes whose command line contains `text`."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            yield int(entry)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class PrivateDockerd:
    """containerd + dockerd with all their state under one short directory."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        live_restore: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.dir = Path(base_dir)
        self.live_restore = live_restore
        self.extra_args = tuple(extra_args)
        self.containerd_socket = self.dir / "cd" / "containerd.sock"
        self.pid_file = self.dir / "docker.pid"
        self.dockerd_log = self.dir / "dockerd.log"
        self.containerd_log = self.dir / "containerd.log"
        self._containerd: subprocess.Popen[bytes] | None = None
        self._dockerd: subprocess.Popen[bytes] | None = None
        self._closed = False
        self.dir.mkdir(parents=True, exist_ok=True)
        _record("dirs", self.dir)

    def __enter__(self) -> PrivateDockerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def socket_path(self) -> Path:
        return self.dir / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        """dockerd's pid while it runs."""
        if self._dockerd is None or self._dockerd.poll() is not None:
            return None
        return self._dockerd.pid

    def api(self) -> docker.APIClient:
        return docker.APIClient(base_url=self.host, version="auto", timeout=30)

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            # A session of its own: a Ctrl-C meant for pytest must not reach the
            # engine before the fixtures have stopped it in order.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _record("pids", proc.pid)
        return proc

    def _start_containerd(self, timeout: float) -> None:
        if self._containerd is not None and self._containerd.poll() is None:
            return
        cd = self.dir / "cd"
        cd.mkdir(exist_ok=True)
        config = cd / "config.toml"
        # Our own config, so that the host's /etc/containerd/config.toml does not
        # apply; the CRI plugin (Kubernetes) is not needed and only slows start-up.
        config.write_text('version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n')
        self._containerd = self._spawn(
            [
                "containerd",
                "--config", str(config),
                "--address", str(self.containerd_socket),
                "--root", str(cd / "root"),
                "--state", str(cd / "state"),
            ],
            self.containerd_log,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self._containerd.poll() is not None:
                raise DockerdError(
                    f"containerd exited with {self._containerd.returncode}:\n"
                    + _log_tail(self.containerd_log)
                )
            probe = subprocess.run(
                ["ctr", "--address", str(self.containerd_socket), "version"],
                capture_output=True,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise DockerdError(
                    f"containerd not ready after {timeout:.0f} s:\n"
                    + _log_tail(self.containerd_log)
                )
            time.sleep(0.05)

    def start(self, timeout: float = 30.0) -> None:
        """Start containerd (once) and dockerd; return when dockerd answers `/_ping`."""
        if self._closed:
            raise DockerdError("this engine has been closed")
        if self.pid is not None:
            return
        deadline = time.monotonic() + timeout
        self._start_containerd(timeout)
        config_file = self.dir / "daemon.json"
        config_file.write_text("{}\n")  # not the host's /etc/docker/daemon.json
        argv = [
            "dockerd",
            "--containerd", str(self.containerd_socket),
            "--config-file", str(config_file),
            "--host", self.host,
            "--data-root", str(self.dir / "data"),
            "--exec-root", str(self.dir / "exec"),
            "--pidfile", str(self.pid_file),
            "--iptables=false",
            "--bridge=none",
        ]  # fmt: skip
        if self.live_restore:
            argv.append("--live-restore")
        argv.extend(self.extra_args)
        self._dockerd = self._spawn(argv, self.dockerd_log)
        while not _ping(self.socket_path):
            if self._dockerd.poll() is not None:
                raise DockerdError(
                    f"dockerd exited with {self._dockerd.returncode}:\n"
                    + _log_tail(self.dockerd_log)
                )
            if time.monotonic() > deadline:
                _terminate(self._dockerd, 5)
                raise DockerdError(
                    f"dockerd did not answer /_ping within {timeout:.0f} s:\n"
                    + _log_tail(self.dockerd_log)
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM dockerd and wait for it (SIGKILL after `timeout` seconds)."""
        if self._dockerd is not None:
            _terminate(self._dockerd, timeout)

    def kill(self) -> None:
        """SIGKILL dockerd only; its socket and pid file stay behind, as in real life."""
        if self._dockerd is not None and self._dockerd.poll() is None:
            self._dockerd.kill()
            self._dockerd.wait(10)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop dockerd if it runs, drop a stale pid file, start it again."""
        self.stop()
        self.pid_file.unlink(missing_ok=True)
        self.start(timeout)

    def container_init_pids(self) -> list[int]:
        """Host pids of the containers' init processes, from containerd's state."""
        pids = []
        for f in (self.dir / "cd" / "state" / _TASK_DIR).glob("*/*/init.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(f.read_text())
                # A task that ended leaves its file: make sure the pid is not recycled.
                if f.parent.name in Path(f"/proc/{pid}/cgroup").read_text():
                    pids.append(pid)
        return pids

    def close(self) -> None:
        """Stop everything this engine started and remove its directory."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.pid is not None:
                # Killing the containers first keeps dockerd's shutdown short: a
                # `sleep` as pid 1 ignores SIGTERM and would hold it 10 s each.
                with contextlib.suppress(Exception), self.api() as api:
                    for c in api.containers(filters={"status": "running"}):
                        with contextlib.suppress(docker.errors.APIError):
                            api.kill(c["Id"])
                self.stop()
            # What is left when dockerd was killed or live-restored its containers.
            for pid in self.container_init_pids():
                _kill(pid)
            if self._containerd is not None:
                _terminate(self._containerd, 10)
            for pid in _processes_naming(str(self.dir) + "/"):
                _kill(pid)  # container shims, which name containerd's socket
        finally:
            self._remove_dir()

    def _remove_dir(self) -> None:
        mounts = []
        with open("/proc/self/mounts") as f:
            for line in f:
                target = line.split()[1].replace("\\040", " ")
                if target.startswith(f"{self.dir}/"):
                    mounts.append(target)
        for target in sorted(mounts, reverse=True):
            # Lazy: a process that is still dying may hold the mount a moment.
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)
        for _ in range(20):
            try:
                shutil.rmtree(self.dir)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    raise
                time.sleep(0.1)
        shutil.rmtree(self.dir, ignore_errors=True)


def _busybox_rootfs() -> bytes:
    """A tar of a root file system with busybox and a link in bin/ for every applet."""
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))

        add_dir("bin")
        add_dir("etc")
        add_dir("tmp", 0o1777)
        add_file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
        for applet in sorted(set(applets) - {"busybox"}):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            info.mode = 0o777
            tar.addfile(info)
        add_file(
            "etc/passwd", b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"
        )
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def build_test_image(api: docker.APIClient, tag: str = TEST_IMAGE) -> str:
    """Import a busybox image as `tag` unless the engine has it; return the tag."""
    try:
        api.inspect_image(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    repository, _, version = tag.rpartition(":")
    if not repository or "/" in version:
        repository, version = tag, "latest"
    api.import_image_from_data(
        _busybox_rootfs(),
        repository=repository,
        tag=version,
        changes=["ENV PATH=/bin", 'CMD ["/bin/sh"]'],
    )
    api.inspect_image(tag)  # the import reports errors only in its stream
    return tag


class ContainerFactory:
    """Creates labelled test containers and force-removes all of them in `cleanup()`."""

    def __init__(self, default_api: docker.APIClient, image: str = TEST_IMAGE) -> None:
        self.default_api = default_api
        self.image = image
        self.created: list[tuple[docker.APIClient, str]] = []

    def __call__(
        self,
        cmd: Sequence[str] = ("/bin/sleep", "1000"),
        *,
        name: str | None = None,
        start: bool = True,
        labels: dict[str, str] | None = None,
        healthcheck: dict[str, Any] | None = None,
        restart_policy: dict[str, Any] | None = None,
        api: docker.APIClient | None = None,
        **create_kwargs: Any,
    ) -> str:
        """Create (and by default start) a container; return its id."""
        api = api or self.default_api
        host_config = create_kwargs.pop("host_config", None)
        if host_config is None:
            host_config = api.create_host_config(network_mode="none", restart_policy=restart_policy)
        elif restart_policy is not None:
            raise TypeError("pass restart_policy inside host_config when giving host_config")
        created = api.create_container(
            create_kwargs.pop("image", self.image),
            command=list(cmd),
            name=name,
            labels={TEST_LABEL: "1", **(labels or {})},
            healthcheck=healthcheck,
            host_config=host_config,
            **create_kwargs,
        )
        container_id: str = created["Id"]
        self.created.append((api, container_id))
        if start:
            api.start(container_id)
        return container_id

    def cleanup(self) -> None:
        """Force-remove every container made here, ignoring errors (engine gone, ...)."""
        with docker_py_socket_leak_ignored():  # the engine may be gone already
            while self.created:
                api, container_id = self.created.pop()
                with contextlib.suppress(Exception):
                    api.remove_container(container_id, force=True, v=True)
