"""Counters behind ``GET /sim/stats``; the app is single-threaded, so plain ints."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class SimStats:
    requests: int = 0
    """Chat completion requests received (other endpoints are not counted)."""
    completed: int = 0
    """Responses fully sent, including simulated and validation errors."""
    disconnected: int = 0
    """Requests whose client went away before the response was finished."""
    cut: int = 0
    """Connections dropped on purpose by ``[[sim:cut_after=N]]``."""
    active: int = 0
    """Chat completion requests in flight right now."""

    def reset(self) -> None:
        # `active` describes the present, not history: zeroing it would let it
        # go negative when the requests now in flight finish.
        self.requests = self.completed = self.disconnected = self.cut = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
