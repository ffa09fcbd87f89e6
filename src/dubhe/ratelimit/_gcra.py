"""One limiter for every rate Dubhe enforces: GCRA (the generic cell rate algorithm).

Each key costs one float, its theoretical arrival time (TAT): a request at ``now`` is allowed
when ``TAT - now`` stays within the burst's tolerance, and then moves TAT one emission interval
on. No log of past requests, no timer: O(1) time and memory per key. This one limits failed
authentication per address, per worker. The plan limits (``_plan.py``) use the same algorithm
with a burst of one minute's worth, kept per worker (``_local.py``) or shared through Redis
(``_redis.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# Past this many keys, keys whose TAT has passed (they would start fresh anyway) are dropped.
_PRUNE_AT = 100_000


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    # When refused: how long until the same request would be allowed.
    retry_after_seconds: float


class RateLimiter:
    def __init__(self, *, per_minute: int, burst: int) -> None:
        if per_minute < 1 or burst < 1:
            raise ValueError("a rate limit needs per_minute >= 1 and burst >= 1")
        self.per_minute = per_minute
        self.burst = burst
        self._interval = 60.0 / per_minute
        self._tolerance = self._interval * (burst - 1)
        self._tat: dict[str, float] = {}

    def hit(self, key: str, cost: int = 1, now: float | None = None) -> Verdict:
        """Count ``cost`` units against ``key``, unless that would exceed the limit."""
        now = time.monotonic() if now is None else now
        tat = max(self._tat.get(key, now), now)
        new_tat = tat + self._interval * cost
        allow_at = new_tat - self._interval - self._tolerance
        if allow_at > now:
            return Verdict(False, allow_at - now)
        if len(self._tat) >= _PRUNE_AT and key not in self._tat:
            self._prune(now)
        self._tat[key] = new_tat
        return Verdict(True, 0.0)

    def refused_for(self, key: str, now: float | None = None) -> float:
        """Seconds until ``key`` may make one more request; 0 when it may now. Counts nothing."""
        now = time.monotonic() if now is None else now
        tat = self._tat.get(key)
        if tat is None:
            return 0.0
        return max(tat - self._tolerance - now, 0.0)

    def _prune(self, now: float) -> None:
        self._tat = {key: tat for key, tat in self._tat.items() if tat > now}
        if len(self._tat) >= _PRUNE_AT:
            # Every key is active: a flood of addresses. Forgetting them lets some through again;
            # keeping them all would let the flood take the worker's memory.
            self._tat.clear()
