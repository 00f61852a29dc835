"""The connection state machine and the backoff policy: pure, no Docker, no clock."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from supervisor.settings import BackoffSettings
from supervisor.state import (
    TRANSITIONS,
    Backoff,
    ConnectionMachine,
    ConnectionState,
    DockerFailure,
    ErrorKind,
    ImpossibleTransition,
)

S = ConnectionState
SETTINGS = BackoffSettings(
    initial_seconds=0.5, factor=2.0, max_seconds=30.0, reset_after_seconds=30.0
)
T0 = 1_796_000_000.0

ALL_PAIRS = list(itertools.product(ConnectionState, repeat=2))
FORBIDDEN = [pair for pair in ALL_PAIRS if pair not in TRANSITIONS]


def fail(kind: ErrorKind, at: float = T0) -> DockerFailure:
    return DockerFailure(kind, f"{kind.value} happened", f"fix {kind.value}", at)


def machine(seed: int = 1, settings: BackoffSettings = SETTINGS) -> ConnectionMachine:
    return ConnectionMachine(Backoff(settings, random.Random(seed)), now=T0)


def state_of(m: ConnectionMachine) -> ConnectionState:
    """The state, read afresh (the machine changes it behind the type checker's back)."""
    return m.state


def in_state(state: ConnectionState) -> ConnectionMachine:
    """A machine brought to ``state`` through the public API only."""
    m = machine()
    if state is S.CONNECTED:
        m.succeeded(now=T0)
    elif state is S.BACKING_OFF:
        m.failed(fail(ErrorKind.SOCKET_MISSING), now=T0)
    elif state is S.DENIED:
        m.failed(fail(ErrorKind.PERMISSION_DENIED), now=T0)
    assert m.state is state
    return m


# -- the table -------------------------------------------------------------------------


def test_table_is_exactly_the_documented_moves() -> None:
    """The transition table holds the seven moves of the theory of operation, no more."""
    assert {(a.value, b.value) for a, b in TRANSITIONS} == {
        ("connecting", "connected"),
        ("connecting", "backing_off"),
        ("connecting", "denied"),
        ("connected", "backing_off"),
        ("connected", "denied"),
        ("backing_off", "connecting"),
        ("denied", "connecting"),
    }


@pytest.mark.parametrize(("source", "target"), sorted(TRANSITIONS, key=str), ids=str)
def test_every_allowed_move_is_taken_and_recorded(
    source: ConnectionState, target: ConnectionState
) -> None:
    """Each allowed move changes the state, stamps the time, counts and records the cause."""
    m = in_state(source)
    sequence = m.sequence
    m._move(target, cause="because", now=T0 + 5)
    assert m.state is target
    assert m.since == T0 + 5
    assert m.sequence == sequence + 1
    assert m.transition_counts[(source, target)] >= 1
    assert m.last_transition is not None
    assert (m.last_transition.source, m.last_transition.target) == (source, target)
    assert m.last_transition.cause == "because"


@pytest.mark.parametrize(("source", "target"), FORBIDDEN, ids=str)
def test_every_other_move_raises_and_changes_nothing(
    source: ConnectionState, target: ConnectionState
) -> None:
    """A move outside the table raises ImpossibleTransition and leaves the machine as it was."""
    m = in_state(source)
    before = (m.state, m.since, m.sequence, m.last_transition)
    with pytest.raises(ImpossibleTransition, match=f"{source.value} -> {target.value}"):
        m._move(target, cause="bug", now=T0 + 9)
    assert (m.state, m.since, m.sequence, m.last_transition) == before


def test_lost_is_only_possible_while_connected() -> None:
    """lost() from any state but connected is a caller bug and raises."""
    for state in (S.CONNECTING, S.BACKING_OFF, S.DENIED):
        m = in_state(state)
        with pytest.raises(ImpossibleTransition):
            m.lost(fail(ErrorKind.TIMEOUT), now=T0 + 1)
        assert m.state is state


def test_success_without_an_attempt_raises() -> None:
    """succeeded() while backing off (no begin_attempt) is refused by the table."""
    m = in_state(S.BACKING_OFF)
    with pytest.raises(ImpossibleTransition):
        m.succeeded(now=T0 + 1)
    assert m.state is S.BACKING_OFF


def test_a_full_cycle_through_the_public_api() -> None:
    """connecting → backing_off → connecting → connected → backing_off, with readable facts."""
    m = machine()
    assert (m.state, m.since, m.attempts, m.last_error) == (S.CONNECTING, T0, 0, None)
    m.begin_attempt(now=T0, cause="start")
    assert m.state is S.CONNECTING and m.attempts == 1  # no move: already connecting

    gone = fail(ErrorKind.SOCKET_MISSING)
    delay = m.failed(gone, now=T0 + 1)
    assert state_of(m) is S.BACKING_OFF and m.since == T0 + 1
    assert m.last_error is gone
    assert m.next_attempt_at == pytest.approx(T0 + 1 + delay)
    assert m.retry_in(T0 + 1) == pytest.approx(delay)
    assert m.retry_in(T0 + 1000) == 0.0

    m.begin_attempt(now=T0 + 2, cause="backoff expired")
    assert (state_of(m), m.attempts, m.next_attempt_at) == (S.CONNECTING, 2, None)
    assert m.last_error is gone  # still the last error until a success
    m.succeeded(now=T0 + 3)
    assert (state_of(m), m.attempts, m.connected_since) == (S.CONNECTED, 0, T0 + 3)
    assert m.last_error is None  # a success clears the error
    assert m.connected and m.retry_in(T0 + 3) is None

    m.lost(fail(ErrorKind.CONNECTION_REFUSED), now=T0 + 4)
    assert state_of(m) is S.BACKING_OFF and m.connected_since is None
    assert m.attempt_results == {"socket_missing": 1, "success": 1}
    assert m.transition_counts == {
        (S.CONNECTING, S.BACKING_OFF): 1,
        (S.BACKING_OFF, S.CONNECTING): 1,
        (S.CONNECTING, S.CONNECTED): 1,
        (S.CONNECTED, S.BACKING_OFF): 1,
    }


@pytest.mark.parametrize("kind", [ErrorKind.PERMISSION_DENIED, ErrorKind.FORBIDDEN])
def test_refusals_deny_and_retry_at_the_cap(kind: ErrorKind) -> None:
    """permission_denied and forbidden go to denied, whose retries wait exactly the cap."""
    m = machine()
    for attempt in range(5):
        if attempt:
            m.begin_attempt(now=T0 + attempt, cause="timer")
        delay = m.failed(fail(kind), now=T0 + attempt)
        assert m.state is S.DENIED
        assert delay == SETTINGS.max_seconds
        assert m.retry_in(T0 + attempt) == SETTINGS.max_seconds
    # A working connection refused later (a proxy reconfigured) is denied as well.
    m.begin_attempt(now=T0 + 10, cause="timer")
    m.succeeded(now=T0 + 10)
    assert m.lost(fail(kind), now=T0 + 11) == SETTINGS.max_seconds
    assert m.state is S.DENIED


@pytest.mark.parametrize(
    "kind",
    [
        ErrorKind.SOCKET_MISSING,
        ErrorKind.CONNECTION_REFUSED,
        ErrorKind.TIMEOUT,
        ErrorKind.API_ERROR,
    ],
)
def test_transient_failures_back_off(kind: ErrorKind) -> None:
    """Every non-refusal kind goes to backing_off with a jittered delay under the ceiling."""
    m = machine()
    delay = m.failed(fail(kind), now=T0)
    assert m.state is S.BACKING_OFF
    assert 0.0 <= delay <= SETTINGS.initial_seconds
    assert not kind.denies


def test_failure_serialises_for_the_api() -> None:
    """DockerFailure.to_json has kind, message, remedy and an RFC 3339 UTC time."""
    f = DockerFailure(ErrorKind.TIMEOUT, "slow", "wait", 1_796_000_000.25)
    assert f.to_json() == {
        "kind": "timeout",
        "message": "slow",
        "remedy": "wait",
        "at": "2026-11-30T00:53:20.250000Z",
    }


# -- backoff ---------------------------------------------------------------------------


def test_ceiling_doubles_from_initial_up_to_the_cap() -> None:
    """The ceiling after n failures is initial·factorⁿ⁻¹, capped; absurd n do not overflow."""
    b = Backoff(SETTINGS, random.Random(0))
    assert [b.ceiling(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert b.ceiling(0) == 0.5
    assert b.ceiling(10_000) == 30.0


def test_delays_never_exceed_the_ceiling_or_go_negative() -> None:
    """Thousands of draws at every failure count stay within [0, ceiling(n)]."""
    b = Backoff(SETTINGS, random.Random(1234))
    for failures in range(1, 15):
        ceiling = b.ceiling(failures)
        draws = [b.delay(failures) for _ in range(500)]
        assert all(0.0 <= d <= ceiling <= SETTINGS.max_seconds for d in draws)
        # Full jitter: the draws spread over the whole interval, not just near the top.
        assert min(draws) < 0.05 * ceiling and max(draws) > 0.95 * ceiling


def test_jitter_is_uniform_with_mean_half_the_ceiling() -> None:
    """At the cap, 20 000 seeded draws have mean ≈ cap/2 and fill each quarter evenly."""
    b = Backoff(SETTINGS, random.Random(20261204))
    draws = [b.delay(30) for _ in range(20_000)]
    cap = SETTINGS.max_seconds
    # Uniform on [0, 30]: standard error of the mean is 30/sqrt(12·20000) ≈ 0.061.
    assert statistics.fmean(draws) == pytest.approx(cap / 2, abs=0.3)
    assert statistics.pstdev(draws) == pytest.approx(cap / 12**0.5, rel=0.03)
    quarters = [0, 0, 0, 0]
    for d in draws:
        quarters[min(int(d / cap * 4), 3)] += 1
    assert all(abs(q - 5000) < 300 for q in quarters), quarters


def test_same_seed_same_delays() -> None:
    """The RNG is injected: equal seeds give equal delay sequences."""
    a = Backoff(SETTINGS, random.Random(99))
    b = Backoff(SETTINGS, random.Random(99))
    assert [a.delay(n) for n in range(1, 20)] == [b.delay(n) for n in range(1, 20)]


def test_machine_delays_grow_with_consecutive_failures() -> None:
    """Consecutive failures raise the ceiling the machine draws from, up to the cap."""
    m = machine(seed=5)
    for n in range(1, 12):
        if n > 1:
            m.begin_attempt(now=T0 + n, cause="timer")
        delay = m.failed(fail(ErrorKind.CONNECTION_REFUSED), now=T0 + n)
        assert m.failures == n
        assert 0.0 <= delay <= m.backoff.ceiling(n)


def test_short_connections_keep_growing_the_backoff() -> None:
    """A connection lost before reset_after_seconds does not reset the backoff exponent."""
    m = machine()
    now = T0
    for n in range(1, 8):
        m.failed(fail(ErrorKind.API_ERROR), now=now)
        assert m.failures == 2 * n - 1
        m.begin_attempt(now=now, cause="timer")
        m.succeeded(now=now)
        now += SETTINGS.reset_after_seconds - 1  # connected, but not long enough
        m.lost(fail(ErrorKind.API_ERROR), now=now)
        assert m.failures == 2 * n
        m.begin_attempt(now=now, cause="timer")
    assert m.backoff.ceiling(m.failures) == SETTINGS.max_seconds


def test_backoff_resets_after_a_healthy_connection() -> None:
    """Connected for reset_after_seconds, the next loss starts again at the initial delay."""
    m = machine()
    for n in range(6):
        if n:
            m.begin_attempt(now=T0, cause="timer")
        m.failed(fail(ErrorKind.TIMEOUT), now=T0)
    m.begin_attempt(now=T0, cause="timer")
    m.succeeded(now=T0)
    delay = m.lost(fail(ErrorKind.TIMEOUT), now=T0 + SETTINGS.reset_after_seconds)
    assert m.failures == 1
    assert delay <= SETTINGS.initial_seconds


def test_reset_after_zero_resets_on_every_loss() -> None:
    """reset_after_seconds = 0 makes every loss of a connection start from the initial delay."""
    settings = BackoffSettings(
        initial_seconds=0.5, factor=2.0, max_seconds=30.0, reset_after_seconds=0.0
    )
    m = machine(settings=settings)
    for _ in range(5):
        m.failed(fail(ErrorKind.TIMEOUT), now=T0)
        m.begin_attempt(now=T0, cause="timer")
    m.succeeded(now=T0)
    m.lost(fail(ErrorKind.TIMEOUT), now=T0)
    assert m.failures == 1
