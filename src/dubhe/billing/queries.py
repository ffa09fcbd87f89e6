"""Read-side billing for the API and the CLI: one user's account, usage by day, ledger pages.

Every query filters on the caller's ``user_id``: that filter is what keeps one user's data from
another's, so it is a parameter of every function here, never optional.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Date, cast, func, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.billing import service
from dubhe.billing.periods import previous_period
from dubhe.billing.repository import AccountState, BillingRepository
from dubhe.catalog import Catalog
from dubhe.models import ApiKey, LedgerEntry, UsageRecord

# Moves between a counter's available and reserved halves (credit a worker leased, and what it
# returned): they change neither the balance nor the included tokens, so statements leave them out.
INTERNAL_LEDGER_KINDS = ("lease", "release")


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
class UsageSummary:
    period_start: datetime
    period_end: datetime
    days: list[UsageBucket]
    keys: list[KeyUsage]


async def usage_summary(session: AsyncSession, *, user_id: int, catalog: Catalog, now: datetime,
                        previous: bool = False) -> UsageSummary:
    """Usage per day and model, and per key, in the account's current monthly period (or the
    one before it)."""
    account = await current_account(session, user_id=user_id, catalog=catalog, now=now)
    start, end = account.period_start, account.period_end
    if previous:
        start, end = previous_period(start)
    queries = BillingQueries.from_session(session)
    return UsageSummary(period_start=start, period_end=end,
                        days=await queries.usage_by_day(user_id, start, end),
                        keys=await queries.usage_by_key(user_id, start, end))


@dataclass(frozen=True, slots=True)
class UsageBucket:
    day: date
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    tokens_from_plan: int
    cost_uusd: int


@dataclass(frozen=True, slots=True)
class ModelTotal:
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_uusd: int


def totals_by_model(buckets: list[UsageBucket]) -> list[ModelTotal]:
    """Day buckets added up per model, in model order."""
    sums: dict[str, list[int]] = {}
    for bucket in buckets:
        total = sums.setdefault(bucket.model, [0, 0, 0, 0])
        total[0] += bucket.requests
        total[1] += bucket.prompt_tokens
        total[2] += bucket.completion_tokens
        total[3] += bucket.cost_uusd
    return [ModelTotal(model, *values) for model, values in sorted(sums.items())]


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

    async def usage_by_day(self, user_id: int, since: datetime,
                           until: datetime | None = None) -> list[UsageBucket]:
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
            .where(UsageRecord.user_id == user_id, UsageRecord.created_at >= since,
                   UsageRecord.created_at < until if until is not None else true())
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

    async def usage_by_key(self, user_id: int, since: datetime,
                           until: datetime) -> list[KeyUsage]:
        """Requests, tokens and cost per API key in [since, until); deleted keys' usage is
        grouped under ``key_id`` None."""
        statement = (
            select(
                UsageRecord.api_key_id,
                func.min(ApiKey.name),
                func.min(ApiKey.prefix),
                func.count(),
                func.coalesce(func.sum(UsageRecord.prompt_tokens + UsageRecord.completion_tokens), 0),
                func.coalesce(func.sum(UsageRecord.cost_uusd), 0),
            )
            .select_from(UsageRecord)
            .outerjoin(ApiKey, (ApiKey.id == UsageRecord.api_key_id) & (ApiKey.user_id == user_id))
            .where(UsageRecord.user_id == user_id, UsageRecord.created_at >= since,
                   UsageRecord.created_at < until)
            .group_by(UsageRecord.api_key_id)
        )
        rows = [
            KeyUsage(key_id=row[0], name=row[1], prefix=row[2], requests=int(row[3]),
                     tokens=int(row[4]), cost_uusd=int(row[5]))
            for row in (await self.session.execute(statement)).all()
        ]
        return sorted(rows, key=lambda usage: (-usage.cost_uusd, -usage.tokens, usage.key_id or 0))

    async def requests_page(self, user_id: int, *, limit: int, before: int | None = None,
                            since: datetime | None = None,
                            until: datetime | None = None) -> tuple[list[UsageRecord], int | None]:
        """The caller's requests, newest first, keyset-paginated on id like the ledger."""
        statement = select(UsageRecord).where(UsageRecord.user_id == user_id)
        if before is not None:
            statement = statement.where(UsageRecord.id < before)
        if since is not None:
            statement = statement.where(UsageRecord.created_at >= since)
        if until is not None:
            statement = statement.where(UsageRecord.created_at < until)
        statement = statement.order_by(UsageRecord.id.desc()).limit(limit + 1)
        rows = list((await self.session.execute(statement)).scalars().all())
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1].id if more and rows else None)

    async def statement_page(self, user_id: int, *, limit: int,
                             before: int | None = None) -> tuple[list[StatementLine], int | None]:
        """The ledger as a bank statement, newest first: each line's change to the balance and
        to the included tokens, and the balance after it.

        The balance after an entry is the sum of every balance delta up to it (the account is a
        projection of its ledger), so one sum places the page; lines then step back from it."""
        statement = select(LedgerEntry).where(LedgerEntry.user_id == user_id,
                                              LedgerEntry.kind.not_in(INTERNAL_LEDGER_KINDS))
        if before is not None:
            statement = statement.where(LedgerEntry.id < before)
        statement = statement.order_by(LedgerEntry.id.desc()).limit(limit + 1)
        rows = list((await self.session.execute(statement)).scalars().all())
        more = len(rows) > limit
        rows = rows[:limit]
        if not rows:
            return [], None
        balance = int((await self.session.execute(
            select(func.coalesce(func.sum(LedgerEntry.balance_uusd
                                          + LedgerEntry.balance_reserved_uusd), 0))
            .where(LedgerEntry.user_id == user_id, LedgerEntry.id <= rows[0].id)
        )).scalar_one())
        lines = []
        for row in rows:
            amount = row.balance_uusd + row.balance_reserved_uusd
            lines.append(StatementLine(
                id=row.id, created_at=row.created_at, kind=row.kind, description=row.description,
                tokens=row.tokens_available + row.tokens_reserved, amount_uusd=amount,
                balance_after_uusd=balance,
            ))
            balance -= amount
        return lines, (rows[-1].id if more else None)


@dataclass(frozen=True, slots=True)
class KeyUsage:
    key_id: int | None
    name: str | None
    prefix: str | None
    requests: int
    tokens: int
    cost_uusd: int


@dataclass(frozen=True, slots=True)
class StatementLine:
    id: int
    created_at: datetime
    kind: str
    description: str
    tokens: int  # change to the included tokens
    amount_uusd: int  # change to the balance
    balance_after_uusd: int
