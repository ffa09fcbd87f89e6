"""Rate limits: one GCRA limiter (``RateLimiter``) and what is limited with it."""

from dubhe.ratelimit._gcra import RateLimiter, Verdict
from dubhe.ratelimit._unauthenticated import UnauthenticatedLimiter, rate_limited

__all__ = ["RateLimiter", "UnauthenticatedLimiter", "Verdict", "rate_limited"]
