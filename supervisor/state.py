"""The connection state machine: where the supervisor stands with Docker.

Theory of operation
-------------------
The watcher is always in exactly one of four states::

    connecting ──success──► connected ──lost──► backing_off ──timer/socket change──► connecting
        │                      │                                                        ▲
        ├──transient failure──►backing_off                                              │
        └──access refused────► denied ───────────timer (at the cap)/socket change──────┘

* ``connecting``: an attempt is under way (client creation, version negotiation,
  event subscription).
* ``connected``: Docker answers and the event stream is open. ``synced`` (kept by
  the watcher, not here) says whether the mirror has been reconciled since.
* ``backing_off``: the last attempt failed for a reason that may pass by itself
  (Docker stopped, socket missing, timeout); the next attempt waits for an
  exponential backoff with full jitter, or for a change of the socket file.
* ``denied``: Docker refused us (EACCES on the socket, or 401/403 from a proxy).
  Retrying fast helps nobody, so retries happen at the backoff cap, or at once
  when the socket file changes (an operator fixing its group or mode).

Every transition goes through :meth:`ConnectionMachine._move`, which consults the
one table :data:`TRANSITIONS` and raises :class:`ImpossibleTransition` otherwise.
This module does no I/O: time comes from the caller, randomness from an injected
``random.Random``.
"""

from __future__ import annotations

import enum
import random
from collections import Counter
from dataclasses import dataclass, field

from supervisor.records import rfc3339
from supervisor.settings import BackoffSettings

__all__ = [
    "TRANSITIONS",
    "Backoff",
    "ConnectionMachine",
    "ConnectionState",
    "DockerFailure",
    "ErrorKind",
    "ImpossibleTransition",
    "Transition",
]


class ConnectionState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKING_OFF = "backing_off"
    DENIED = "denied"


class ErrorKind(enum.Enum):
    PERMISSION_DENIED = "permission_denied"
    FORBIDDEN = "forbidden"
    SOCKET_MISSING = "socket_missing"
    CONNECTION_REFUSED = "connection_refused"
    TIMEOUT = "timeout"
    API_ERROR = "api_error"

    @property
    def denies(self) -> bool:
        """Whether this failure means Docker refuses us, as opposed to being away."""
        return self in (ErrorKind.PERMISSION_DENIED, ErrorKind.FORBIDDEN)


S = ConnectionState

#: The only allowed moves. Anything else is a bug in the caller.
TRANSITIONS: frozenset[tuple[ConnectionState, ConnectionState]] = frozenset(
    {
        (S.CONNECTING, S.CONNECTED),
        (S.CONNECTING, S.BACKING_OFF),
        (S.CONNECTING, S.DENIED),
        (S.CONNECTED, S.BACKING_OFF),
        (S.CONNECTED, S.DENIED),
        (S.BACKING_OFF, S.CONNECTING),
        (S.DENIED, S.CONNECTING),
    }
)


class ImpossibleTransition(RuntimeError):
    """A move that :data:`TRANSITIONS` does not allow."""


@dataclass(frozen=True, slots=True)
class DockerFailure:
    """A classified failure to reach or use Docker, with what a human should do."""

    kind: ErrorKind
    message: str
    remedy: str
    at: float = 0.0  # wall-clock time (seconds since the epoch)

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind.value,
            "message": self.message,
            "remedy": self.remedy,
            "at": rfc3339(self.at),
        }


@dataclass(frozen=True, slots=True)
class Transition:
    source: ConnectionState
    target: ConnectionState
    cause: str
    at: float


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter (delay drawn from [0, min(cap, base·factorⁿ)])."""

    settings: BackoffSettings
    rng: random.Random = field(default_factory=random.Random)

    def ceiling(self, failures: int) -> float:
        """The upper bound of the delay after ``failures`` consecutive failures (≥ 1)."""
        s = self.settings
        exponent = max(failures - 1, 0)
        # Avoid float overflow for absurd failure counts: the cap is reached long before.
        if exponent > 64:
            return s.max_seconds
        return float(min(s.max_seconds, s.initial_seconds * s.factor**exponent))

    def delay(self, failures: int) -> float:
        return self.rng.uniform(0.0, self.ceiling(failures))


class ConnectionMachine:
    """The current connection state and its history, fed by the watcher.

    Readable by everyone (API, metrics, CLI); written only by the watcher.
    ``now`` arguments are wall-clock seconds; the machine never reads a clock.
    """

    def __init__(self, backoff: Backoff, *, now: float) -> None:
        self.backoff = backoff
        self.state = ConnectionState.CONNECTING
        self.since = now
        #: Failures in a row, counting losses of a connection that did not stay up for
        #: ``reset_after_seconds``: the exponent of the backoff.
        self.failures = 0
        #: Attempts made in the current run of failures, including the one under way.
        self.attempts = 0
        self.next_attempt_at: float | None = None
        self.last_error: DockerFailure | None = None
        self.connected_since: float | None = None
        #: Counts for metrics, read at scrape time.
        self.transition_counts: Counter[tuple[ConnectionState, ConnectionState]] = Counter()
        self.attempt_results: Counter[str] = Counter()
        #: Bumped on every transition so readers can notice a change cheaply.
        self.sequence = 0
        self.last_transition: Transition | None = None

    # -- reading -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state is ConnectionState.CONNECTED

    def retry_in(self, now: float) -> float | None:
        """Seconds until the next scheduled attempt, or None when none is scheduled."""
        if self.next_attempt_at is None:
            return None
        return max(0.0, self.next_attempt_at - now)

    # -- writing (the watcher) -----------------------------------------------------

    def begin_attempt(self, *, now: float, cause: str) -> None:
        """Leave ``backing_off``/``denied`` for ``connecting``."""
        if self.state is not ConnectionState.CONNECTING:
            self._move(ConnectionState.CONNECTING, cause=cause, now=now)
        self.attempts += 1
        self.next_attempt_at = None

    def succeeded(self, *, now: float) -> None:
        """The attempt under way reached Docker."""
        self.attempt_results["success"] += 1
        # ``failures`` is kept: a connection that breaks again at once must not retry
        # at the initial delay forever. It resets in ``lost`` after a healthy period.
        self.attempts = 0
        self.next_attempt_at = None
        self.connected_since = now
        self._move(ConnectionState.CONNECTED, cause="connected", now=now)

    def failed(self, failure: DockerFailure, *, now: float) -> float:
        """The attempt under way failed; returns the delay until the next one."""
        self.attempt_results[failure.kind.value] += 1
        return self._fall(failure, now=now)

    def lost(self, failure: DockerFailure, *, now: float) -> float:
        """A working connection broke; returns the delay until the next attempt."""
        if self.state is not ConnectionState.CONNECTED:
            raise ImpossibleTransition(f"lost while {self.state.value}")
        if (
            self.connected_since is not None
            and now - self.connected_since >= self.backoff.settings.reset_after_seconds
        ):
            self.failures = 0
        self.connected_since = None
        return self._fall(failure, now=now)

    # -- internals -----------------------------------------------------------------

    def _fall(self, failure: DockerFailure, *, now: float) -> float:
        self.failures += 1
        self.last_error = failure
        if failure.kind.denies:
            target = ConnectionState.DENIED
            delay = self.backoff.settings.max_seconds
        else:
            target = ConnectionState.BACKING_OFF
            delay = self.backoff.delay(self.failures)
        self.next_attempt_at = now + delay
        self._move(target, cause=f"{failure.kind.value}: {failure.message}", now=now)
        return delay

    def _move(self, target: ConnectionState, *, cause: str, now: float) -> None:
        source = self.state
        if (source, target) not in TRANSITIONS:
            raise ImpossibleTransition(f"{source.value} -> {target.value} ({cause})")
        self.state = target
        self.since = now
        self.transition_counts[(source, target)] += 1
        self.sequence += 1
        self.last_transition = Transition(source, target, cause, now)
        if target is ConnectionState.CONNECTED:
            self.last_error = None
