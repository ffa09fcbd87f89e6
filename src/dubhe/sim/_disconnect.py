"""Noticing that the client went away while we are still producing a response."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

Receive = Callable[[], Awaitable[dict[str, Any]]]


class DisconnectWatcher:
    """A background ``receive()`` once the request body has been read.

    With the body consumed, uvicorn's next ``receive()`` only returns when the
    connection is lost (or the response completes), and its ``send()`` silently
    drops data for a gone client — so this task is the only reliable signal.
    """

    __slots__ = ("_task",)

    def __init__(self, receive: Receive):
        self._task: asyncio.Future[dict[str, Any]] = asyncio.ensure_future(receive())

    @property
    def client_gone(self) -> bool:
        return self._task.done()

    async def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking early if the client leaves; True if it left."""
        if seconds > 0 and not self._task.done():
            await asyncio.wait((self._task,), timeout=seconds)
        return self._task.done()

    def close(self) -> None:
        self._task.cancel()
