"""A circuit breaker per deployment.

Closed: requests go through. It opens after ``failures`` consecutive failures, or when at least
half of the last ``_WINDOW`` outcomes failed (with ``_MIN_SAMPLES`` seen), so a deployment that
fails every other request is also taken out. Open: no request is sent for ``cooldown`` seconds.
Then half-open: one trial request goes through (another only after a further cool-down, should
the trial never report); its success closes the breaker, its failure opens it again.

A failure a request could have caused by what it sent (a 5xx, an answer that is not one, a
timeout or a broken stream) names the account that sent it; one that no request content can cause
(the connection refused, the upstream's credential refused, an unknown model or path) names none.
The breaker opens only on failures that name no account or name at least two: one client sending
requests the upstream chokes on cannot take a deployment away from everyone else (its own requests
still fail over, each time).

An upstream's ``retry-after`` (a 429 or 503) pauses the deployment for that long whatever the
breaker's state, so no request of this worker is sent there before the upstream asked. An open
breaker does not stop a request that has no other deployment to go to; a pause does.

With Redis configured, each transition (opened, closed, paused) is told to every other worker
(``share_breakers`` in ``_shared.py``), which applies it with ``apply``: a deployment found dead
by one worker is routed around by all of them.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

_WINDOW = 20
_MIN_SAMPLES = 10
# Never honour a retry-after longer than this (an upstream cannot take itself out for a day).
_MAX_RETRY_AFTER_SECONDS = 300.0
_SUCCEEDED = -1  # no account has this id


def _shared(failing: Iterable[int | None]) -> bool:
    """Not one client's doing: some failure is nobody's, or they came from two accounts."""
    accounts = set(failing)
    accounts.discard(_SUCCEEDED)
    return None in accounts or len(accounts) > 1


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    __slots__ = ("_cooldown", "_failing", "_failures_to_open", "_outcomes", "consecutive_failures",
                 "name", "on_change", "opened_at", "paused_until", "retry_at", "state")  # fmt: skip

    def __init__(self, name: str, *, failures: int, cooldown: float) -> None:
        self.name = name
        self._failures_to_open = failures
        self._cooldown = cooldown
        self._outcomes: deque[bool] = deque(maxlen=_WINDOW)
        # Who each of the last outcomes' failures came from (None: no request could have
        # caused it; _SUCCEEDED for a success).
        self._failing: deque[int | None] = deque(maxlen=_WINDOW)
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0
        # No request before this monotonic time (a cool-down, or the upstream's retry-after)...
        self.retry_at = 0.0
        # ...and, whatever else, none before the upstream's own retry-after.
        self.paused_until = 0.0
        # Told of each transition this worker saw: (name, "open" | "closed" | "paused", seconds
        # before a request may be sent again).
        self.on_change: Callable[[str, str, float], None] | None = None

    def usable(self, now: float, *, alone: bool = False) -> bool:
        """Whether a request may be sent now (without taking a half-open trial). A deployment
        that is the only one a request can use is tried even with its breaker open (a breaker
        is for routing around a failure; with nowhere else to go it would only turn errors into
        refusals), unless the upstream itself asked for a pause."""
        if alone:
            return now >= self.paused_until
        return now >= self.retry_at

    def take(self, now: float) -> None:
        """A request is being sent: an open breaker past its cool-down lets this one through as
        its trial, and holds back the others for another cool-down."""
        if self.state is not BreakerState.CLOSED:
            self.state = BreakerState.HALF_OPEN
            self.retry_at = now + self._cooldown

    def succeeded(self) -> None:
        self._outcomes.append(True)
        self._failing.append(_SUCCEEDED)
        self.consecutive_failures = 0
        if self.state is not BreakerState.CLOSED:
            log.warning("upstream %s recovered: its circuit breaker is closed", self.name)
            self.state = BreakerState.CLOSED
            self.retry_at = 0.0
            if self.on_change is not None:
                self.on_change(self.name, "closed", 0.0)

    def failed(self, now: float, retry_after: float | None = None, *,
               account: int | None = None) -> None:
        """An attempt failed; ``account``: the account whose request it was, when what the
        request sent could have caused it (None: the upstream failed whatever was sent)."""
        self._outcomes.append(False)
        self._failing.append(account)
        self.consecutive_failures += 1
        if retry_after is not None and retry_after > 0:
            self.paused_until = max(
                self.paused_until, now + min(retry_after, _MAX_RETRY_AFTER_SECONDS)
            )
            self.retry_at = max(self.retry_at, self.paused_until)
            if self.on_change is not None:
                self.on_change(self.name, "paused", self.paused_until - now)
        failing = len(self._outcomes) >= _MIN_SAMPLES and (
            self._outcomes.count(False) * 2 >= len(self._outcomes)
        ) and _shared(self._failing)
        streak = self.state is BreakerState.HALF_OPEN or (
            self.consecutive_failures >= self._failures_to_open
        )
        if streak:
            recent = list(self._failing)[-min(self.consecutive_failures, _WINDOW):]
            streak = _shared(recent)
        if streak or failing:
            if self.state is not BreakerState.OPEN:
                log.warning(
                    "upstream %s is failing (%d in a row): its circuit breaker is open for %g s",
                    self.name, self.consecutive_failures, self._cooldown,
                )  # fmt: skip
            opened = self.state is not BreakerState.OPEN
            self.state = BreakerState.OPEN
            self.opened_at = now
            self.retry_at = max(self.retry_at, now + self._cooldown)
            self._outcomes.clear()
            self._failing.clear()
            if opened and self.on_change is not None:
                self.on_change(self.name, "open", self.retry_at - now)

    def apply(self, change: str, seconds: float, now: float) -> None:
        """What another worker saw: its breaker opened (no request here for ``seconds``
        either, then this worker's own half-open trial), closed, or the upstream asked for a
        pause. Applied silently: it is not told again."""
        seconds = min(max(seconds, 0.0), _MAX_RETRY_AFTER_SECONDS)
        if change == "open":
            if self.state is not BreakerState.OPEN:
                log.warning("upstream %s is failing on another worker: its circuit breaker is "
                            "open here too for %g s", self.name, seconds)
            self.state = BreakerState.OPEN
            self.opened_at = now
            self.retry_at = max(self.retry_at, now + seconds)
            self._outcomes.clear()
            self._failing.clear()
        elif change == "closed" and self.state is not BreakerState.CLOSED:
            self.state = BreakerState.CLOSED
            self.consecutive_failures = 0
            self._outcomes.clear()
            self._failing.clear()
            self.retry_at = self.paused_until
        elif change == "paused":
            self.paused_until = max(self.paused_until, now + seconds)
            self.retry_at = max(self.retry_at, self.paused_until)

    def retry_in(self, now: float) -> float:
        """Seconds before a request may be sent here again (0: now)."""
        return max(0.0, self.retry_at - now)
