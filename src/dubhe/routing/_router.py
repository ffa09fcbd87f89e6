"""Choosing a deployment for one attempt, and how long to wait before the next."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Protocol, TypeVar

from dubhe.catalog import UpstreamSpec
from dubhe.routing._breaker import Breaker

# Backoff between attempts: full jitter over an exponential ceiling (AWS's "full jitter").
_BACKOFF_BASE_SECONDS = 0.05
_BACKOFF_CAP_SECONDS = 2.0


class Routable(Protocol):
    @property
    def spec(self) -> UpstreamSpec: ...

    @property
    def breaker(self) -> Breaker: ...


D = TypeVar("D", bound=Routable)


class Router:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, deployments: Sequence[D], excluded: Collection[D], now: float) -> D | None:
        """A deployment for the next attempt: weighted among the usable ones of the best
        priority tier that has any (``deployments`` is sorted by priority). None when every
        deployment is excluded or cooling down."""
        if len(deployments) == 1:  # the common case: no tiers, no draw
            only = deployments[0]
            if only in excluded or not only.breaker.usable(now, alone=True):
                return None
            only.breaker.take(now)
            return only
        tier: list[D] = []
        tier_priority = -1
        for deployment in deployments:
            if tier and deployment.spec.priority != tier_priority:
                break  # the best tier with a usable deployment is found
            if deployment not in excluded and deployment.breaker.usable(now):
                tier.append(deployment)
                tier_priority = deployment.spec.priority
        if not tier:
            return None
        chosen = (
            tier[0]
            if len(tier) == 1
            else self._rng.choices(tier, weights=[d.spec.weight for d in tier])[0]
        )
        chosen.breaker.take(now)
        return chosen

    @staticmethod
    def soonest_retry(deployments: Sequence[Routable], now: float) -> float:
        """Seconds until some deployment may be tried again (for a 503's retry-after)."""
        return max(0.0, min(d.breaker.retry_at for d in deployments) - now)


def backoff_seconds(attempt: int, rng: random.Random | None = None) -> float:
    """The pause before attempt ``attempt + 1``: uniform in [0, base × 2^(attempt-1)], capped."""
    ceiling = min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
    return (rng or random).uniform(0, ceiling)
