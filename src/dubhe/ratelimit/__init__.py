"""Rate limits: one GCRA limiter (``RateLimiter``) and what is limited with it: failed
authentication per address, and the plans' requests, tokens and concurrency per key or account
(``PlanLimiter`` over a ``LocalBudget`` or, with Redis, a ``RedisBudget``)."""

from typing import TYPE_CHECKING, Any

from dubhe.ratelimit._gcra import RateLimiter, Verdict
from dubhe.ratelimit._local import LocalBudget
from dubhe.ratelimit._plan import Limits, PlanLimiter, Ticket, format_duration
from dubhe.ratelimit._unauthenticated import UnauthenticatedLimiter, rate_limited

if TYPE_CHECKING:
    from dubhe.ratelimit._redis import RedisBudget, redis_client


def __getattr__(name: str) -> Any:
    # The Redis client library (~0.1 s and several MB to import) only where Redis is used.
    if name in ("RedisBudget", "redis_client"):
        from dubhe.ratelimit import _redis

        return getattr(_redis, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Limits",
    "LocalBudget",
    "PlanLimiter",
    "RateLimiter",
    "RedisBudget",
    "Ticket",
    "UnauthenticatedLimiter",
    "Verdict",
    "format_duration",
    "rate_limited",
    "redis_client",
]
