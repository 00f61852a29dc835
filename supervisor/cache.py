"""The mirror: container records by id, a revision, a bounded delta history. Pure.

Every change that alters what a client would see bumps :attr:`Cache.revision` by
exactly one and is kept as a :class:`Delta`, so revisions in the history are
contiguous and a client that saw revision *r* can be handed exactly the deltas
after it (:meth:`Cache.deltas_since`) for as long as they are retained.

Revisions start at the wall-clock time in milliseconds when the cache is made
(unless told otherwise), so a client resuming against a restarted supervisor
presents a revision from before the new start, which is older than anything
retained, and gets a fresh snapshot instead of deltas that belong to another
process.

Serialisation is cached: each record's JSON once per change, the whole list once
per revision.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from supervisor.records import ContainerRecord

__all__ = ["Cache", "Delta", "dumps"]


def dumps(value: object) -> bytes:
    """Compact JSON bytes, the one encoding the API and the history share."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class Delta:
    """One change of the mirror: ``upsert`` carries the whole record, ``remove`` the id."""

    revision: int
    type: Literal["upsert", "remove"]
    container_id: str
    record: ContainerRecord | None
    #: The serialised NDJSON line, built once and shared by every subscriber.
    line: bytes = field(repr=False, compare=False, default=b"")

    @staticmethod
    def upsert(revision: int, record: ContainerRecord, record_json: bytes) -> Delta:
        line = b'{"type":"upsert","revision":%d,"container":%s}\n' % (revision, record_json)
        return Delta(revision, "upsert", record.id, record, line)

    @staticmethod
    def remove(revision: int, container_id: str) -> Delta:
        line = b'{"type":"remove","revision":%d,"id":%s}\n' % (revision, dumps(container_id))
        return Delta(revision, "remove", container_id, None, line)


class Cache:
    def __init__(self, history_size: int, *, initial_revision: int = 0) -> None:
        if history_size < 1:
            raise ValueError("history_size must be at least 1")
        self.revision = initial_revision
        self._records: dict[str, ContainerRecord] = {}
        self._json: dict[str, bytes] = {}
        self._history: deque[Delta] = deque(maxlen=history_size)
        self._list_json: tuple[int, bytes] | None = None
        self._sorted: tuple[int, tuple[ContainerRecord, ...]] | None = None

    # -- reading -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, container_id: object) -> bool:
        return container_id in self._records

    def get(self, container_id: str) -> ContainerRecord | None:
        return self._records.get(container_id)

    def ids(self) -> set[str]:
        return set(self._records)

    def records(self) -> tuple[ContainerRecord, ...]:
        """All records, ordered by name then id (a stable order for clients); sorted once per revision."""
        cached = self._sorted
        if cached is None or cached[0] != self.revision:
            ordered = tuple(sorted(self._records.values(), key=lambda r: (r.name, r.id)))
            cached = self._sorted = (self.revision, ordered)
        return cached[1]

    def record_json(self, container_id: str) -> bytes:
        return self._json[container_id]

    def containers_json(self) -> bytes:
        """The JSON array of every record, built at most once per revision."""
        cached = self._list_json
        if cached is not None and cached[0] == self.revision:
            return cached[1]
        body = b"[" + b",".join(self._json[r.id] for r in self.records()) + b"]"
        self._list_json = (self.revision, body)
        return body

    def find(self, ref: str) -> list[ContainerRecord]:
        """Records matching ``ref``: an exact id, an exact name, or an id prefix of ≥ 4 chars."""
        exact = self._records.get(ref)
        if exact is not None:
            return [exact]
        named = [r for r in self._records.values() if r.name == ref.lstrip("/")]
        if named:
            return named
        if len(ref) < 4:
            return []
        return sorted(
            (r for r in self._records.values() if r.id.startswith(ref)), key=lambda r: r.name
        )

    def deltas_since(self, revision: int) -> list[Delta] | None:
        """The deltas after ``revision``, or None when they are no longer all retained."""
        if revision == self.revision:
            return []
        if revision > self.revision or not self._history:
            return None
        oldest = self._history[0].revision
        if revision < oldest - 1:
            return None
        start = revision - oldest + 1
        return [self._history[i] for i in range(start, len(self._history))]

    @property
    def oldest_resumable(self) -> int:
        """The smallest ``since`` for which :meth:`deltas_since` still answers."""
        return self._history[0].revision - 1 if self._history else self.revision

    # -- writing (the watcher) -----------------------------------------------------

    def upsert(self, record: ContainerRecord) -> Delta | None:
        """Store ``record``; a delta only when it differs from what is stored."""
        if self._records.get(record.id) == record:
            return None
        record_json = dumps(record.to_json())
        self._records[record.id] = record
        self._json[record.id] = record_json
        return self._push(Delta.upsert(self.revision + 1, record, record_json))

    def remove(self, container_id: str) -> Delta | None:
        if self._records.pop(container_id, None) is None:
            return None
        del self._json[container_id]
        return self._push(Delta.remove(self.revision + 1, container_id))

    def remove_absent(self, present: Iterable[str]) -> list[Delta]:
        """Remove every record whose id is not in ``present`` (reconciliation)."""
        keep = set(present)
        gone = sorted(cid for cid in self._records if cid not in keep)
        return [d for d in map(self.remove, gone) if d is not None]

    def _push(self, delta: Delta) -> Delta:
        self.revision = delta.revision
        self._history.append(delta)
        return delta
