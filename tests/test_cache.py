"""The mirror: revisions, the bounded delta history, cached serialisation, lookups."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.cache import Cache, Delta
from supervisor.records import ContainerRecord, record_from_inspect
from tests.fakes import apply_deltas, cache_state, inspect_body


def rec(
    n: int, name: str | None = None, *, status: str = "running", restarts: int = 0
) -> ContainerRecord:
    cid = f"{n:08x}" + "ab" * 28
    body = inspect_body(cid, name or f"c{n}", status=status, restart_count=restarts)
    return record_from_inspect(body)


def test_revisions_are_contiguous_and_only_changes_count() -> None:
    """Each real change bumps the revision by one; no-op upserts and removes make no delta."""
    cache = Cache(16, initial_revision=500)
    a, b = rec(1), rec(2)
    deltas = [cache.upsert(a), cache.upsert(b), cache.upsert(rec(1, status="exited"))]
    assert [d.revision for d in deltas if d] == [501, 502, 503]
    assert cache.upsert(rec(1, status="exited")) is None  # equal record: nothing to say
    assert cache.remove("not-there") is None
    removed = cache.remove(b.id)
    assert removed is not None and (removed.revision, removed.type) == (504, "remove")
    assert removed.record is None and removed.container_id == b.id
    assert cache.revision == 504
    assert len(cache) == 1 and a.id in cache and b.id not in cache


def test_delta_lines_are_ndjson() -> None:
    """A delta's line is one JSON object: the whole record for upsert, the id for remove."""
    cache = Cache(4)
    up = cache.upsert(rec(1))
    down = cache.remove(rec(1).id)
    assert up is not None and down is not None
    assert up.line.endswith(b"\n") and up.line.count(b"\n") == 1
    assert json.loads(up.line) == {
        "type": "upsert",
        "revision": 1,
        "container": rec(1).to_json(),
    }
    assert json.loads(down.line) == {"type": "remove", "revision": 2, "id": rec(1).id}


def test_deltas_since_is_exact_inside_the_history() -> None:
    """For every retained revision r, deltas_since(r) are exactly the deltas after r."""
    cache = Cache(5, initial_revision=100)
    made: list[Delta] = []
    for n in range(8):
        d = cache.upsert(rec(n))
        assert d is not None
        made.append(d)
    assert cache.revision == 108
    # The history keeps 104..108: resumable from 103 on.
    assert cache.oldest_resumable == 103
    for since in range(103, 109):
        got = cache.deltas_since(since)
        assert got == [d for d in made if d.revision > since]
    assert cache.deltas_since(108) == []


@pytest.mark.parametrize("since", [0, 101, 102, 109, 10**9])
def test_deltas_since_is_none_outside_the_history(since: int) -> None:
    """Too old (fell out of the history) or from the future (another process): None."""
    cache = Cache(5, initial_revision=100)
    for n in range(8):
        cache.upsert(rec(n))
    assert cache.deltas_since(since) is None


def test_fresh_cache_answers_only_its_own_revision() -> None:
    """Before any change, only the current revision is resumable."""
    cache = Cache(5, initial_revision=1_796_000_000_000)
    assert cache.deltas_since(1_796_000_000_000) == []
    assert cache.deltas_since(1_795_999_999_999) is None
    assert cache.oldest_resumable == cache.revision


def test_history_size_must_be_positive() -> None:
    """A cache with no history could never resume anyone: refused."""
    with pytest.raises(ValueError):
        Cache(0)


def test_snapshot_built_at_most_once_per_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    """containers_json is built once per revision and reused until the next change."""
    cache = Cache(16)
    for n in (3, 1, 2):
        cache.upsert(rec(n))
    builds = 0
    original = Cache.records

    def counting(self: Cache) -> list[ContainerRecord]:
        nonlocal builds
        builds += 1
        return original(self)

    monkeypatch.setattr(Cache, "records", counting)
    first = cache.containers_json()
    assert cache.containers_json() is first
    assert cache.containers_json() is first
    assert builds == 1
    cache.upsert(rec(1))  # unchanged: same revision, same bytes
    assert cache.containers_json() is first and builds == 1
    cache.upsert(rec(4))
    second = cache.containers_json()
    assert second is not first and builds == 2
    assert [c["name"] for c in json.loads(second)] == ["c1", "c2", "c3", "c4"]
    assert json.loads(second) == [r.to_json() for r in original(cache)]


def test_records_and_json_are_ordered_by_name_then_id() -> None:
    """records() and the snapshot list containers by name, then id."""
    cache = Cache(16)
    for n, name in [(5, "b"), (4, "a"), (3, "b")]:
        cache.upsert(rec(n, name))
    assert [(r.name, r.id[:8]) for r in cache.records()] == [
        ("a", "00000004"),
        ("b", "00000003"),
        ("b", "00000005"),
    ]
    assert json.loads(cache.record_json(rec(4, "a").id)) == rec(4, "a").to_json()


def test_find_by_id_name_prefix_and_ambiguous_prefix() -> None:
    """find(): exact id, exact name (with or without /), unique or ambiguous id prefix."""
    cache = Cache(16)
    one = rec(0x1234, "web")
    two = rec(0x1235, "db")
    other = rec(0x9999, "1234")  # a name that looks like an id prefix
    for r in (one, two, other):
        cache.upsert(r)
    assert cache.find(one.id) == [one]
    assert cache.find("web") == [one]
    assert cache.find("/db") == [two]
    assert cache.find("1234") == [other]  # an exact name wins over a prefix
    assert cache.find("00001234") == [one]
    assert cache.find("0000123") == [two, one]  # ambiguous: both, by name
    assert cache.find("000") == []  # shorter than 4: no prefix search
    assert cache.find("nope") == []


def test_remove_absent_reconciles() -> None:
    """remove_absent drops every record not present, in id order, with one delta each."""
    cache = Cache(16)
    for n in range(5):
        cache.upsert(rec(n))
    deltas = cache.remove_absent([rec(1).id, rec(3).id, "unknown"])
    assert [d.container_id for d in deltas] == sorted([rec(0).id, rec(2).id, rec(4).id])
    assert cache.ids() == {rec(1).id, rec(3).id}


# -- property: any sequence of changes, any resume point ------------------------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["upsert", "remove"]),
        st.integers(0, 6),
        st.sampled_from(["running", "exited", "paused"]),
        st.integers(0, 2),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops, history=st.integers(1, 12))
def test_deltas_replay_to_the_current_state(
    ops: list[tuple[str, int, str, int]], history: int
) -> None:
    """From any revision still resumable, replaying the deltas gives exactly the mirror."""
    cache = Cache(history, initial_revision=7)
    states: dict[int, dict[str, ContainerRecord]] = {cache.revision: {}}  # what clients saw
    for op, n, status, restarts in ops:
        if op == "upsert":
            cache.upsert(rec(n, status=status, restarts=restarts))
        else:
            cache.remove(rec(n).id)
        states[cache.revision] = cache_state(cache)
    revisions = sorted(states)
    assert revisions == list(range(revisions[0], revisions[-1] + 1))  # contiguous
    for since, seen in states.items():
        deltas = cache.deltas_since(since)
        if since >= cache.oldest_resumable:
            assert deltas is not None
            assert [d.revision for d in deltas] == list(range(since + 1, cache.revision + 1))
            assert apply_deltas(seen, deltas) == cache_state(cache)
        else:
            assert deltas is None
    assert json.loads(cache.containers_json()) == [r.to_json() for r in cache.records()]
