"""Which deployment answers a request: weighted choice within the best healthy priority tier, a
circuit breaker per deployment, and the backoff between attempts.

All of it is in-process memory: choosing a deployment costs a few attribute reads and, where a
tier has several healthy deployments, one weighted random draw. Nothing here does I/O, so the
``/v1`` hot path never waits on a database or Redis to route. With several workers each keeps
its own breakers; with Redis configured their transitions are shared (``_shared.py``), so a dead
deployment found out by one worker is routed around by all.
"""

from dubhe.routing._breaker import Breaker, BreakerState
from dubhe.routing._router import Router, backoff_seconds
from dubhe.routing._shared import share_breakers

__all__ = ["Breaker", "BreakerState", "Router", "backoff_seconds", "share_breakers"]
