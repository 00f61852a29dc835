"""The Node.js example client (examples/node-client) against a live daemon.

It runs with the machine's ``node`` behind a small Unix-socket proxy that the test
can cut, so a disconnect happens exactly when the test wants it: the client must
then resume with ``since`` and print exactly the changes it missed. Restarting the
daemon must make it resume from a fresh snapshot.
"""

from __future__ import annotations

import contextlib
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from tests.daemon_proc import REPO, SupervisorProcess
from tests.dockerd import ContainerFactory
from tests.test_api_docker import settle

pytestmark = pytest.mark.docker

CLIENT = REPO / "examples" / "node-client" / "client.js"


class CuttableProxy:
    """Forwards connections from ``path`` to ``upstream``; :meth:`cut` drops them all."""

    def __init__(self, path: Path, upstream: Path) -> None:
        self.path = path
        self.upstream = upstream
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def listen(self) -> None:
        """Accept connections again (until the next cut)."""
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(self.path))
        listener.listen(64)
        self._listener = listener
        self._spawn(self._accept, listener)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            upstream = socket.socket(socket.AF_UNIX)
            try:
                upstream.connect(str(self.upstream))
            except OSError:
                client.close()
                upstream.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every connection and stop accepting (the socket file goes away)."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        self.path.unlink(missing_ok=True)
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.cut()
        for thread in self._threads:
            thread.join(5)


class Output:
    """The lines a child process prints, awaited one predicate at a time."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, predicate: Callable[[str], bool], timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(0.01, remaining))
            except queue.Empty:
                if remaining <= 0:
                    raise AssertionError(
                        "expected line not printed; got:\n" + "\n".join(self.lines)
                    ) from None
                continue
            if line is None:
                raise AssertionError("the client exited; it printed:\n" + "\n".join(self.lines))
            self.lines.append(line)
            if predicate(line):
                return line


def fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


@contextlib.contextmanager
def node_client(socket_path: Path) -> Iterator[Output]:
    node = shutil.which("node")
    assert node, "node is not installed (tests/run.sh installs nodejs)"
    proc = subprocess.Popen(
        [node, str(CLIENT), str(socket_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield Output(proc)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def test_node_client_lists_follows_and_resumes(
    docker_host: str,
    docker_api: docker.APIClient,
    make_container: ContainerFactory,
    short_tmp: Path,
) -> None:
    """The Node client lists, follows, resumes with since after a cut, and re-snapshots after a restart."""
    tag = uuid.uuid4().hex[:8]
    c1 = make_container(name=f"hls-{tag}-n1")
    api_socket = short_tmp / "api.sock"
    sup = SupervisorProcess(docker_host, api_socket, metrics_listen="")
    proxy = CuttableProxy(short_tmp / "proxy.sock", api_socket)
    try:
        sup.wait_synced()
        listed = settle(sup, docker_api)
        proxy.listen()
        with node_client(proxy.path) as out:
            head = fields(out.expect(lambda x: x.startswith("containers ")))
            assert head["count"] == str(len(listed["containers"]))
            assert (head["state"], head["stale"]) == ("connected", "false")
            out.expect(lambda x: x == f"container id={c1[:12]} name=hls-{tag}-n1 state=running")
            snapshot = fields(out.expect(lambda x: x.startswith("snapshot ")))
            assert int(snapshot["revision"]) == listed["revision"]

            docker_api.pause(c1)
            paused = out.expect(
                lambda x: x.startswith("upsert ") and f"id={c1[:12]}" in x and "paused" in x
            )
            last_seen = int(fields(paused)["revision"])

            # Cut the connection; change things while the client cannot see.
            proxy.cut()
            out.expect(lambda x: x.startswith("disconnected "))
            docker_api.unpause(c1)
            c2 = make_container(name=f"hls-{tag}-n2")
            docker_api.remove_container(c1, force=True)
            final = settle(sup, docker_api)
            proxy.listen()
            out.expect(lambda x: x == f"subscribed since={last_seen}")
            resumed: list[str] = []
            while not resumed or int(fields(resumed[-1])["revision"]) < final["revision"]:
                line = out.expect(lambda x: not x.startswith("heartbeat "))
                assert line.startswith(("upsert ", "remove ")), line
                resumed.append(line)
            revisions = [int(fields(x)["revision"]) for x in resumed]
            assert revisions == list(range(last_seen + 1, final["revision"] + 1))
            assert f"upsert revision={revisions[-1]}" not in resumed[:-1]
            assert any(f"id={c1[:12]}" in x and "state=running" in x for x in resumed)
            assert any(f"id={c2[:12]}" in x and "state=running" in x for x in resumed)
            assert resumed[-1] == f"remove revision={final['revision']} id={c1[:12]}"

            # Restart the daemon: the old revision means nothing to the new one.
            assert sup.stop() == 0
            out.expect(lambda x: x.startswith("disconnected "))
            sup = SupervisorProcess(docker_host, api_socket, metrics_listen="")
            sup.wait_synced()
            out.expect(lambda x: x == f"subscribed since={final['revision']}")
            fresh = fields(out.expect(lambda x: x.startswith("snapshot ")))
            assert int(fresh["revision"]) > final["revision"]
            # Either the snapshot already holds c2, or its upsert follows.
            if fresh["state"] != "connected" or fresh["containers"] == "0":
                out.expect(lambda x: x.startswith("upsert ") and f"id={c2[:12]}" in x)
    finally:
        proxy.close()
        sup.close()
