"""Failed authentication, limited per client address.

Unknown keys are answered from memory (the key cache's filter of every key hash), so guessing
costs no query; this bounds how fast one address may guess at all. An address over its limit
gets 429 ``rate_limit_exceeded`` instead of 401 until it slows down. Requests with a valid key
never touch it.
"""

from __future__ import annotations

import math

from dubhe.errors import AuthenticationFailed, DubheError, RateLimited
from dubhe.ratelimit._gcra import RateLimiter


class UnauthenticatedLimiter:
    def __init__(self, *, per_minute: int, burst: int) -> None:
        self.limiter = RateLimiter(per_minute=per_minute, burst=burst)

    def judge(self, error: AuthenticationFailed, client: tuple[str, int] | None) -> DubheError:
        """The answer to a request that failed authentication: ``error`` itself, or a 429 when
        its address has failed too often."""
        address = client[0] if client else "unknown"
        verdict = self.limiter.hit(address)
        if verdict.allowed:
            return error
        return rate_limited(verdict.retry_after_seconds,
                            "Too many requests with a missing or invalid API key from your "
                            "address; check the key, then retry")


def rate_limited(wait_seconds: float, reason: str) -> RateLimited:
    """429 with ``retry-after`` (whole seconds, at least 1) and ``retry-after-ms``."""
    milliseconds = max(math.ceil(wait_seconds * 1000), 1)
    seconds = max(math.ceil(wait_seconds), 1)
    return RateLimited(
        f"{reason} after {seconds} second{'s' if seconds != 1 else ''}.",
        code="rate_limit_exceeded",
        headers={"retry-after": str(seconds), "retry-after-ms": str(milliseconds)},
    )
