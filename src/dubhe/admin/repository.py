"""All SQL of the admin console: user search, platform totals, codes, upstream errors, audit."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.models import AdminAuditEntry, RedemptionCode, UsageRecord, User

# Outcomes of a usage record that mean the upstream failed (see models/usage.py).
UPSTREAM_FAILURES = ("upstream_error", "upstream_unreachable", "stream_interrupted")


@dataclass(frozen=True, slots=True)
class DayTotal:
    day: date
    requests: int
    tokens: int
    revenue_uusd: int


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    upstream: str
    model: str
    outcome: str
    status_code: int
    request_id: str
    created_at: datetime


def _as_date(value: object) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def _as_datetime(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class AdminRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @classmethod
    def from_session(cls, session: AsyncSession) -> AdminRepository:
        return cls(session)

    async def search_users(self, query: str, *, limit: int) -> list[User]:
        statement = select(User).where(User.deleted_at.is_(None)).order_by(User.id.desc())
        if query:
            statement = statement.where(User.email.contains(query.lower(), autoescape=True))
        return list((await self.session.execute(statement.limit(limit))).scalars())

    async def user(self, user_id: int) -> User | None:
        return await self.session.get(User, user_id)

    async def totals_by_day(self, since: datetime) -> list[DayTotal]:
        day = func.date(UsageRecord.created_at)
        statement = (
            select(day, func.count(),
                   func.coalesce(func.sum(UsageRecord.prompt_tokens
                                          + UsageRecord.completion_tokens), 0),
                   func.coalesce(func.sum(UsageRecord.cost_uusd), 0))
            .where(UsageRecord.created_at >= since)
            .group_by(day).order_by(day.desc())
        )
        return [DayTotal(_as_date(row[0]), int(row[1]), int(row[2]), int(row[3]))
                for row in (await self.session.execute(statement)).all()]

    async def upstream_failures(self, *, per_upstream: int) -> dict[str, list[UpstreamFailure]]:
        statement = (
            select(UsageRecord.upstream, UsageRecord.model, UsageRecord.outcome,
                   UsageRecord.status_code, UsageRecord.request_id, UsageRecord.created_at)
            .where(UsageRecord.outcome.in_(UPSTREAM_FAILURES), UsageRecord.upstream.is_not(None))
            .order_by(UsageRecord.id.desc()).limit(per_upstream * 20)
        )
        found: dict[str, list[UpstreamFailure]] = {}
        for row in (await self.session.execute(statement)).all():
            rows = found.setdefault(str(row[0]), [])
            if len(rows) < per_upstream:
                rows.append(UpstreamFailure(str(row[0]), row[1], row[2], int(row[3]), row[4],
                                            _as_datetime(row[5])))
        return found

    async def codes(self, *, limit: int) -> list[RedemptionCode]:
        statement = select(RedemptionCode).order_by(RedemptionCode.id.desc()).limit(limit)
        return list((await self.session.execute(statement)).scalars())

    async def revoke_code(self, code_id: int, now: datetime) -> bool:
        """Revoke an unredeemed code: a guarded update, so a redemption racing it either wins
        (and the revocation fails) or finds the code revoked."""
        statement = (
            update(RedemptionCode)
            .where(RedemptionCode.id == code_id, RedemptionCode.redeemed_at.is_(None),
                   RedemptionCode.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        return bool((await self.session.execute(statement)).rowcount)  # type: ignore[attr-defined]

    def record(self, entry: AdminAuditEntry) -> None:
        self.session.add(entry)

    async def audit(self, *, limit: int) -> list[AdminAuditEntry]:
        statement = select(AdminAuditEntry).order_by(AdminAuditEntry.id.desc()).limit(limit)
        return list((await self.session.execute(statement)).scalars())
