"""Circuit breakers shared by every worker and instance, over Redis pub/sub.

A breaker's transition on one worker (opened, closed, paused by the upstream's retry-after) is
published on one channel; every other worker applies it to its breaker of the same name. Only
transitions travel, never a request's outcome, so a healthy deployment costs nothing, and the
hot path never waits on Redis (the publish is a task of its own). Without Redis, or while it is
down, each worker keeps finding out on its own, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

from dubhe.routing._breaker import Breaker

CHANNEL = "breakers"
_SEPARATOR = "\x1f"


class Bus(Protocol):
    @property
    def worker(self) -> str: ...

    def publish_soon(self, channel: str, payload: str) -> None: ...

    def subscribe(self, channel: str, handler: Callable[[str], None]) -> None: ...


def share_breakers(bus: Bus, breakers: Mapping[str, Breaker]) -> None:
    """Tell every worker of this one's transitions, and apply theirs."""

    def changed(name: str, change: str, seconds: float) -> None:
        bus.publish_soon(CHANNEL, _SEPARATOR.join((bus.worker, name, change, f"{seconds:.3f}")))

    def received(payload: str) -> None:
        parts = payload.split(_SEPARATOR)
        if len(parts) != 4 or parts[0] == bus.worker:
            return
        _, name, change, seconds = parts
        breaker = breakers.get(name)
        if breaker is None:
            return  # a deployment this instance does not route to
        try:
            breaker.apply(change, float(seconds), time.monotonic())
        except ValueError:
            return

    for breaker in breakers.values():
        breaker.on_change = changed
    bus.subscribe(CHANNEL, received)


__all__ = ["CHANNEL", "Bus", "share_breakers"]
