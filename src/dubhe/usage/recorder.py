"""Durable usage records, written with group commit.

Requests hand their record to :meth:`UsageRecorder.record`; one writer task inserts everything
queued in one transaction and then wakes every waiter. Under load many requests share one commit;
a request that awaits its record knows it is on disk before it tells the client it is done.
Records are keyed by request id, so a retried write can never meter a request twice.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dubhe.models import ApiKey, UsageRecord
from dubhe.usage import tokens

log = logging.getLogger(__name__)

_MAX_BATCH = 1000


@dataclass(slots=True)
class UsageEvent:
    request_id: str
    user_id: int
    api_key_id: int | None
    model: str
    upstream: str | None
    stream: bool
    outcome: str
    status_code: int
    latency_ms: int
    created_at: datetime
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # When the upstream gave no usage: what to count instead, off the response path.
    messages: list[Any] | None = None
    relayed: bytes | None = None
    response: dict[str, Any] | None = None

    def resolve_tokens(self) -> str:
        """Fill in missing counts with the tokenizer; return the usage source."""
        if self.prompt_tokens is not None and self.completion_tokens is not None:
            return "upstream"
        if self.prompt_tokens is None:
            self.prompt_tokens = tokens.count_prompt(self.messages or [])
        if self.completion_tokens is None:
            if self.relayed is not None:
                self.completion_tokens = tokens.count_completion_events(self.relayed)
            elif self.response is not None:
                self.completion_tokens = tokens.count_completion_message(self.response)
            else:
                self.completion_tokens = 0
        return "estimated"


class UsageRecorder:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], dialect: str) -> None:
        self._sessionmaker = sessionmaker
        self._insert = pg_insert if dialect == "postgresql" else sqlite_insert
        self._queue: list[tuple[UsageEvent, asyncio.Future[None] | None]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def record(self, event: UsageEvent) -> asyncio.Future[None]:
        """Queue a record; the future resolves once it is committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((event, future))
        self._wakeup.set()
        return future

    def record_nowait(self, event: UsageEvent) -> None:
        """Queue a record nobody waits for (a cancelled request); it is still written."""
        self._queue.append((event, None))
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._write_forever(), name="usage-recorder")

    async def stop(self) -> None:
        """Write everything still queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def _write_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
                await self._write_batch(batch)
            if self._closing:
                return

    async def _write_batch(self, batch: list[tuple[UsageEvent, asyncio.Future[None] | None]]) -> None:
        for attempt in range(1, 6):
            try:
                await self._insert_batch([event for event, _ in batch])
                break
            except Exception as exc:  # the database is down or busy: keep the records, retry
                log.warning("writing %d usage records failed (attempt %d): %s", len(batch), attempt, exc)
                if attempt == 5:
                    for _, future in batch:
                        if future is not None and not future.done():
                            future.set_exception(exc)
                    return
                await asyncio.sleep(0.05 * 2**attempt)
        for _, future in batch:
            if future is not None and not future.done():
                future.set_result(None)

    async def _insert_batch(self, events: list[UsageEvent]) -> None:
        rows = []
        last_used: dict[int, datetime] = {}
        for event in events:
            source = event.resolve_tokens()
            rows.append(
                {
                    "request_id": event.request_id,
                    "user_id": event.user_id,
                    "api_key_id": event.api_key_id,
                    "model": event.model,
                    "upstream": event.upstream,
                    "stream": event.stream,
                    "prompt_tokens": event.prompt_tokens,
                    "completion_tokens": event.completion_tokens,
                    "usage_source": source,
                    "outcome": event.outcome,
                    "status_code": event.status_code,
                    "latency_ms": event.latency_ms,
                    "cost_uusd": 0,
                    "created_at": event.created_at,
                }
            )
            if event.api_key_id is not None:
                seen = last_used.get(event.api_key_id)
                if seen is None or event.created_at > seen:
                    last_used[event.api_key_id] = event.created_at
        async with self._sessionmaker() as session, session.begin():
            statement = self._insert(UsageRecord).on_conflict_do_nothing(
                index_elements=["request_id"]
            )
            await session.execute(statement, rows)
            for key_id, when in last_used.items():
                await session.execute(
                    update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when)
                )


def now() -> datetime:
    return datetime.now(UTC)
