"""Changes pushed to every worker: PostgreSQL ``LISTEN/NOTIFY`` on one connection per worker.

Channels, all notified on commit and to every instance sharing the database:

- ``dubhe_changes`` (payload: the table's name), from the triggers of migrations 0009 and 0011:
  a statement that inserts into ``api_keys`` or sets ``updated_at`` on it or ``users`` (a
  revocation, a key's limits, a plan change: what the key cache's poll reads), or that changes
  ``model_maintenance`` (a maintenance switch).
- ``dubhe_epochs`` (payload: ``"<user id> <epoch>"``), from migration 0011's trigger on
  ``accounts``: an account's epoch moved (a debt, a plan change); the meter retires its lease of
  an older epoch at once.
- ``dubhe_recall`` (payload: the user id), sent by a worker whose refill found the account short
  while other workers' leases hold its credit (``billing/meter.py``): each worker gives back the
  unused part of its lease for that account. Payload ``"<user id> <key id>"``: the same for a
  capped key's headroom (``billing/caps.py``).

Each worker listens on one connection of its own (``ChangeListener``) and hands each
notification to the handlers subscribed to its channel. The polls stay (keys and epochs every
second, maintenance twice a second), as the fallback for a lost connection and for SQLite (one
machine, no NOTIFY); on every (re)connection the ``on_connect`` hooks run, for the changes made
while this worker was not listening.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

CHANGES = "dubhe_changes"
EPOCHS = "dubhe_epochs"
RECALL = "dubhe_recall"
_RECONNECT_SECONDS = 1.0
_CHECK_SECONDS = 5.0


class ChangeListener:
    def __init__(self, database_url: str) -> None:
        # SQLAlchemy's URL form (postgresql+asyncpg://) to asyncpg's.
        self._dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
        self._handlers: dict[str, list[Callable[[str], None]]] = defaultdict(list)
        self._on_connect: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        # Set while a connection is listening (tests wait for it).
        self.listening = asyncio.Event()

    @staticmethod
    def supported(database_url: str) -> bool:
        return database_url.startswith(("postgresql+asyncpg://", "postgresql://"))

    def subscribe(self, channel: str, handler: Callable[[str], None]) -> None:
        """Call ``handler(payload)`` for every notification on ``channel`` (before ``start``).
        Handlers run on the event loop: they must not block; one that fails is logged."""
        self._handlers[channel].append(handler)

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` whenever the listener (re)connects: what changed meanwhile was missed."""
        self._on_connect.append(hook)

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="change-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def _notified(self, _connection: Any, _pid: int, channel: str, payload: str) -> None:
        for handler in self._handlers.get(channel, ()):
            try:
                handler(payload)
            except Exception:
                log.exception("handling a notification on %s failed", channel)

    async def _listen_forever(self) -> None:
        while True:
            try:
                await self._listen_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the polls cover the gap
                log.warning("cannot listen for changes (%s); retrying", type(exc).__name__)
            self.listening.clear()
            await asyncio.sleep(_RECONNECT_SECONDS)

    async def _listen_once(self) -> None:
        import asyncpg  # type: ignore[import-untyped]

        connection = await asyncpg.connect(self._dsn, timeout=5)
        try:
            for channel in self._handlers:
                await connection.add_listener(channel, self._notified)
            self.listening.set()
            for hook in self._on_connect:
                try:
                    hook()
                except Exception:
                    log.exception("a change listener's connect hook failed")
            while True:
                # A connection dropped in silence is only noticed by using it.
                await asyncio.sleep(_CHECK_SECONDS)
                await connection.fetchval("SELECT 1", timeout=5)
        finally:
            connection.terminate()
