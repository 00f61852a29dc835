"""Fan-out of mirror changes to event-stream subscribers, with bounded memory.

Subscribers share one buffer: the cache's delta history. Each subscriber keeps
only a cursor (the last revision it was sent) and, when woken by
:meth:`ChangeFeed.notify`, reads the deltas after its cursor from the history.
Publishing is therefore O(1) whatever the number of subscribers, and a
subscriber that does not read costs nothing but its cursor: it cannot slow the
watcher or other subscribers, nor grow memory.

Overflow: a subscriber that falls more than ``max_lag`` revisions behind (or out
of the retained history) gets one ``resync`` line and its stream ends; it should
reconnect (with ``since``, or without to get a fresh snapshot).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

import anyio

from supervisor.cache import Cache, dumps
from supervisor.state import ConnectionMachine

__all__ = ["ChangeFeed", "follow", "snapshot_line"]


class ChangeFeed:
    """Wakes every waiting subscriber when the mirror or the connection changes."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self.subscribers = 0
        self.overflows = 0

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self, max_seconds: float) -> None:
        """Return after the next notification, or after ``max_seconds``."""
        if self._event is None:
            self._event = anyio.Event()
        event = self._event
        with anyio.move_on_after(max_seconds):
            await event.wait()


def _connection_line(machine: ConnectionMachine, revision: int) -> bytes:
    """A connection change; ``revision`` is the subscriber's, so resuming from it is safe."""
    error = machine.last_error.to_json() if machine.last_error else None
    line = {
        "type": "connection",
        "revision": revision,
        "state": machine.state.value,
        "error": error,
    }
    return dumps(line) + b"\n"


def snapshot_line(cache: Cache, machine: ConnectionMachine, *, stale: bool) -> bytes:
    """Every record; ``stale`` tells a snapshot of a disconnected (or unsynced) mirror."""
    return b'{"type":"snapshot","revision":%d,"state":%s,"stale":%s,"containers":%s}\n' % (
        cache.revision,
        dumps(machine.state.value),
        b"true" if stale else b"false",
        cache.containers_json(),
    )


async def follow(
    cache: Cache,
    machine: ConnectionMachine,
    feed: ChangeFeed,
    *,
    since: int | None,
    max_lag: int,
    heartbeat_seconds: float,
    clock: Callable[[], float],
    stale: Callable[[], bool] = lambda: False,
) -> AsyncGenerator[bytes, None]:
    """The NDJSON lines of one event-stream subscriber, until it overflows.

    First a ``snapshot`` (or, when ``since`` is still inside the history, the
    deltas after it), then deltas and ``connection`` lines as they happen and a
    ``heartbeat`` whenever ``heartbeat_seconds`` pass without anything to send.
    """
    feed.subscribers += 1
    try:
        missed = cache.deltas_since(since) if since is not None else None
        if missed is None or len(missed) > max_lag:
            # Too far behind to catch up by deltas: a snapshot costs less than a resync.
            cursor = cache.revision
            yield snapshot_line(cache, machine, stale=stale())
        else:
            cursor = since if since is not None else cache.revision
        seen_sequence = machine.sequence
        last_sent = clock()
        while True:
            lines: list[bytes] = []
            if machine.sequence != seen_sequence:
                seen_sequence = machine.sequence
                lines.append(_connection_line(machine, cursor))
            if cache.revision != cursor:
                deltas = cache.deltas_since(cursor)
                if deltas is None or cache.revision - cursor > max_lag:
                    feed.overflows += 1
                    yield (
                        dumps(
                            {
                                "type": "resync",
                                # The last revision this subscriber was sent: resuming
                                # from it never skips a delta (it gets a snapshot).
                                "revision": cursor,
                                "reason": "subscriber fell behind; reconnect to get a fresh snapshot",
                            }
                        )
                        + b"\n"
                    )
                    return
                lines.extend(d.line for d in deltas)
                cursor = cache.revision
            if lines:
                yield b"".join(lines)
                last_sent = clock()
                continue
            idle = clock() - last_sent
            if idle >= heartbeat_seconds:
                yield b'{"type":"heartbeat","revision":%d}\n' % cache.revision
                last_sent = clock()
                continue
            await feed.wait(heartbeat_seconds - idle)
    finally:
        feed.subscribers -= 1
