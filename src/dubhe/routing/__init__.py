"""Which deployment answers a request: weighted choice within the best healthy priority tier, a
circuit breaker per deployment, and the backoff between attempts.

All of it is in-process memory: choosing a deployment costs a few attribute reads and, where a
tier has several healthy deployments, one weighted random draw. Nothing here does I/O, so the
``/v1`` hot path never waits on a database or Redis to route. (With several workers each keeps
its own breakers: a dead deployment is found out once per worker.)
"""

from dubhe.routing._breaker import Breaker, BreakerState
from dubhe.routing._router import Router, backoff_seconds

__all__ = ["Breaker", "BreakerState", "Router", "backoff_seconds"]
