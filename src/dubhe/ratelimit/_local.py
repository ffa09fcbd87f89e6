"""Plan limits kept in this process: exact for one worker, no I/O.

Without Redis this is the whole budget, so ``dubhe serve --workers N`` allows up to N times a
rate (each worker keeps its own); with Redis it is the fail-open fallback while Redis is down.
"""

from __future__ import annotations

import math
import time

from dubhe.ratelimit._plan import Limits, Refusal, Standing

# Subjects idle past a minute are full again and are dropped when the map grows past this.
_PRUNE_AT = 100_000


class _Rates:
    """GCRA for one rate with a burst of one minute's worth: state is one float, the TAT."""

    __slots__ = ("tat",)

    def __init__(self, now: float) -> None:
        self.tat = now

    def take(self, per_minute: int, cost: int, now: float) -> Refusal | Standing:
        interval = 60.0 / per_minute
        tat = max(self.tat, now)
        # Allowed while the new TAT stays within one minute of now (burst = per_minute).
        new_tat = tat + interval * cost
        if new_tat - now > 60.0 + 1e-9:
            if cost > per_minute:
                # Never fits: say so with the time to a full minute's budget.
                return Refusal(tat - now)
            return Refusal(new_tat - now - 60.0)
        self.tat = new_tat
        return standing(per_minute, new_tat, now)

    def give_back(self, per_minute: int, cost: int, now: float) -> None:
        self.tat = max(self.tat - 60.0 / per_minute * cost, now)


def standing(per_minute: int, tat: float, now: float) -> Standing:
    used = max(tat - now, 0.0)
    remaining = math.floor((60.0 - used) * per_minute / 60.0 + 1e-9)
    return Standing(per_minute, max(min(remaining, per_minute), 0), used)


class _Subject:
    __slots__ = ("requests", "tokens", "in_flight")

    def __init__(self, now: float) -> None:
        self.requests = _Rates(now)
        self.tokens = _Rates(now)
        self.in_flight = 0


class LocalBudget:
    def __init__(self) -> None:
        self._subjects: dict[str, _Subject] = {}

    def _get(self, subject: str, now: float) -> _Subject:
        state = self._subjects.get(subject)
        if state is None:
            if len(self._subjects) >= _PRUNE_AT:
                self._prune(now)
            state = self._subjects[subject] = _Subject(now)
        return state

    def _prune(self, now: float) -> None:
        self._subjects = {
            name: state for name, state in self._subjects.items()
            if state.in_flight or state.requests.tat > now or state.tokens.tat > now
        }

    # The Budget protocol's coroutines, and the same answers at once (``*_now``): PlanLimiter
    # calls those directly, saving a coroutine each, three a request.

    async def take_requests(self, subject: str, limits: Limits) -> Refusal | Standing:
        return self.take_requests_now(subject, limits)

    def take_requests_now(self, subject: str, limits: Limits) -> Refusal | Standing:
        now = time.monotonic()
        return self._get(subject, now).requests.take(limits.requests_per_minute, 1, now)

    async def take_tokens(self, subject: str, limits: Limits, tokens: int) -> Refusal | Standing:
        return self.take_tokens_now(subject, limits, tokens)

    def take_tokens_now(self, subject: str, limits: Limits, tokens: int) -> Refusal | Standing:
        now = time.monotonic()
        return self._get(subject, now).tokens.take(limits.tokens_per_minute, tokens, now)

    def return_tokens(self, subject: str, limits: Limits, tokens: int) -> None:
        now = time.monotonic()
        self._get(subject, now).tokens.give_back(limits.tokens_per_minute, tokens, now)

    def tokens_standing(self, subject: str, limits: Limits) -> Standing:
        now = time.monotonic()
        state = self._subjects.get(subject)
        return standing(limits.tokens_per_minute, state.tokens.tat if state else now, now)

    def requests_standing(self, subject: str, limits: Limits) -> Standing:
        now = time.monotonic()
        state = self._subjects.get(subject)
        return standing(limits.requests_per_minute, state.requests.tat if state else now, now)

    async def enter(self, subject: str, limits: Limits) -> bool:
        return self.enter_now(subject, limits)

    def enter_now(self, subject: str, limits: Limits) -> bool:
        state = self._get(subject, time.monotonic())
        if state.in_flight >= limits.concurrent:
            return False
        state.in_flight += 1
        return True

    def leave(self, subject: str) -> None:
        state = self._subjects.get(subject)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1
