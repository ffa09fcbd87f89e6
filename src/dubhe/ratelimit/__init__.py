"""Rate limits: one GCRA limiter (``RateLimiter``) and what is limited with it: failed
authentication per address, and the plans' requests, tokens and concurrency per key or account
(``PlanLimiter`` over a ``LocalBudget`` or, with Redis, a ``RedisBudget``)."""

from dubhe.ratelimit._gcra import RateLimiter, Verdict
from dubhe.ratelimit._local import LocalBudget
from dubhe.ratelimit._plan import Limits, PlanLimiter, Ticket, format_duration
from dubhe.ratelimit._redis import RedisBudget, redis_client
from dubhe.ratelimit._unauthenticated import UnauthenticatedLimiter, rate_limited

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
