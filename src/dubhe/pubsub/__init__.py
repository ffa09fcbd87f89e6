"""Changes pushed to every worker: PostgreSQL ``LISTEN/NOTIFY``.

A trigger (migration 0009) notifies channel ``dubhe_changes`` whenever a statement inserts into
``api_keys`` or sets ``updated_at`` on it or ``users`` (a revocation, a key's limits, a plan
change: what the key cache's poll reads), on commit and to every instance sharing the database. Each worker listens on one connection of its own and wakes its key
cache at once, instead of at the next one-second poll; the poll stays, as the fallback for a lost
connection and for SQLite (one machine, no NOTIFY).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

CHANNEL = "dubhe_changes"
_RECONNECT_SECONDS = 1.0
_CHECK_SECONDS = 5.0


class ChangeListener:
    def __init__(self, database_url: str, on_change: Callable[[], None]) -> None:
        # SQLAlchemy's URL form (postgresql+asyncpg://) to asyncpg's.
        self._dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def supported(database_url: str) -> bool:
        return database_url.startswith(("postgresql+asyncpg://", "postgresql://"))

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="change-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def _notified(self, *_: Any) -> None:
        self._on_change()

    async def _listen_forever(self) -> None:
        while True:
            try:
                await self._listen_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the one-second poll covers the gap
                log.warning("cannot listen for changes (%s); retrying", type(exc).__name__)
            await asyncio.sleep(_RECONNECT_SECONDS)

    async def _listen_once(self) -> None:
        import asyncpg  # type: ignore[import-untyped]

        connection = await asyncpg.connect(self._dsn, timeout=5)
        try:
            await connection.add_listener(CHANNEL, self._notified)
            # Changes made while this worker was not listening: the poll may not have run.
            self._on_change()
            while True:
                # A connection dropped in silence is only noticed by using it.
                await asyncio.sleep(_CHECK_SECONDS)
                await connection.fetchval("SELECT 1", timeout=5)
        finally:
            connection.terminate()
