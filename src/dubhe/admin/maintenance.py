"""The run-time maintenance switch of models, stored in the database (``model_maintenance``).

Each worker polls the table (a few rows) twice a second and hands the set of models in
maintenance to the gateway, which checks it with one set lookup per request: no query on the
hot path, and a switch made on any worker or instance is seen everywhere within a second. On
PostgreSQL a trigger (migration 0011) notifies every worker of a switch (``dubhe.pubsub``),
which reads the table at once (``wake``); the poll stays as the fallback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dubhe.models import ModelMaintenance

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


class MaintenanceRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @classmethod
    def from_session(cls, session: AsyncSession) -> MaintenanceRepository:
        return cls(session)

    async def models_in_maintenance(self) -> frozenset[str]:
        statement = select(ModelMaintenance.model_id).where(ModelMaintenance.in_maintenance)
        return frozenset((await self.session.execute(statement)).scalars())

    async def switch(self, model_id: str, on: bool, now: datetime) -> bool:
        """Set the switch; True when it changed."""
        row = await self.session.get(ModelMaintenance, model_id, with_for_update=True)
        if row is None:
            if not on:
                return False
            self.session.add(ModelMaintenance(model_id=model_id, in_maintenance=True,
                                              updated_at=now))
            return True
        if row.in_maintenance == on:
            return False
        row.in_maintenance = on
        row.updated_at = now
        return True


class MaintenanceBoard:
    """This worker's copy of the switches; ``on_change`` gets the new set whenever it changes."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession],
                 on_change: Callable[[frozenset[str]], None], *,
                 poll_seconds: float = POLL_SECONDS) -> None:
        self._sessionmaker = sessionmaker
        self._on_change = on_change
        self._poll_seconds = poll_seconds
        self.models: frozenset[str] = frozenset()
        self._task: asyncio.Task[None] | None = None
        self._woken = asyncio.Event()

    def wake(self, _payload: str = "") -> None:
        """A switch changed somewhere: read the table now rather than at the next poll."""
        self._woken.set()

    async def refresh(self) -> None:
        async with self._sessionmaker() as session:
            models = await MaintenanceRepository.from_session(session).models_in_maintenance()
        if models != self.models:
            self.models = models
            self._on_change(models)

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll_forever(), name="maintenance-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _poll_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._woken.wait(), self._poll_seconds)
            except TimeoutError:
                pass
            self._woken.clear()
            try:
                await self.refresh()
            except Exception:  # a database hiccup keeps the last known switches
                log.exception("reading the model maintenance switches failed; retrying")
