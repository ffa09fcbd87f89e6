"""Read-side billing for the API and the CLI: one user's account, usage by day, ledger pages.

Every query filters on the caller's ``user_id``: that filter is what keeps one user's data from
another's, so it is a parameter of every function here, never optional.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Date, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.billing import service
from dubhe.billing.repository import AccountState, BillingRepository
from dubhe.catalog import Catalog
from dubhe.models import LedgerEntry, UsageRecord


async def current_account(session: AsyncSession, *, user_id: int, catalog: Catalog,
                          now: datetime) -> AccountState:
    """The account as it stands now, locked for the rest of the caller's transaction.

    Reading writes when a period has ended: renewal is lazy (the first look after the end
    renews it), so a balance or plan shown here is the one the next request would see.
    """
    repository = BillingRepository.from_session(session)
    posting = service.Posting()
    states = await service.current_accounts(repository, posting, [user_id], catalog, now)
    await posting.write(repository, now)
    return states[user_id]


@dataclass(frozen=True, slots=True)
class UsageBucket:
    day: date
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    tokens_from_plan: int
    cost_uusd: int


def usage_window_start(now: datetime, days: int) -> datetime:
    """Midnight UTC ``days - 1`` days ago: ``days=1`` is today so far."""
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days - 1)


class BillingQueries:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._dialect = session.bind.dialect.name if session.bind is not None else "sqlite"

    @classmethod
    def from_session(cls, session: AsyncSession) -> BillingQueries:
        return cls(session)

    def _utc_day(self, column: Any) -> Any:
        # The day in UTC, on each database: PostgreSQL stores timestamptz (convert, then cast);
        # SQLite stores UTC text (UTCDateTime converts on the way in), which date() reads.
        if self._dialect == "postgresql":
            return cast(func.timezone("UTC", column), Date)
        return func.date(column)

    async def usage_by_day(self, user_id: int, since: datetime) -> list[UsageBucket]:
        day = self._utc_day(UsageRecord.created_at).label("day")
        statement = (
            select(
                day,
                UsageRecord.model,
                func.count(),
                func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
                func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
                func.coalesce(func.sum(UsageRecord.tokens_from_plan), 0),
                func.coalesce(func.sum(UsageRecord.cost_uusd), 0),
            )
            .where(UsageRecord.user_id == user_id, UsageRecord.created_at >= since)
            .group_by(day, UsageRecord.model)
            .order_by(day, UsageRecord.model)
        )
        buckets = []
        for row in (await self.session.execute(statement)).all():
            raw_day = row[0]
            buckets.append(UsageBucket(
                day=raw_day if isinstance(raw_day, date) else date.fromisoformat(str(raw_day)),
                model=row[1],
                requests=int(row[2]),
                prompt_tokens=int(row[3]),
                completion_tokens=int(row[4]),
                tokens_from_plan=int(row[5]),
                cost_uusd=int(row[6]),
            ))
        return buckets

    async def ledger_page(self, user_id: int, *, limit: int,
                          before: int | None) -> tuple[list[LedgerEntry], int | None]:
        """Newest first, keyset-paginated on id (stable while new entries keep arriving)."""
        statement = select(LedgerEntry).where(LedgerEntry.user_id == user_id)
        if before is not None:
            statement = statement.where(LedgerEntry.id < before)
        statement = statement.order_by(LedgerEntry.id.desc()).limit(limit + 1)
        rows = list((await self.session.execute(statement)).scalars().all())
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1].id if more and rows else None)
