from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Row, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.models import ApiKey, UsageRecord, User


@dataclass(frozen=True, slots=True)
class KeyActivity:
    """What the usage records say about one key since a moment (the start of the month)."""

    last_used_at: datetime | None
    spend_uusd: int
    requests: int


class ApiKeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @classmethod
    def from_session(cls, session: AsyncSession) -> ApiKeyRepository:
        return cls(session)

    def add(self, key: ApiKey) -> None:
        self.session.add(key)

    async def identity_by_hash(self, key_hash: str) -> Row[ApiKey, str, datetime | None] | None:
        statement = (
            select(ApiKey, User.plan_code, User.disabled_at)
            .join(User, User.id == ApiKey.user_id)
            .where(ApiKey.key_hash == key_hash)
        )
        return (await self.session.execute(statement)).first()

    async def all_hashes(self) -> list[str]:
        return list((await self.session.execute(select(ApiKey.key_hash))).scalars())

    async def identities_changed_since(
        self, since: datetime
    ) -> list[Row[ApiKey, str, datetime | None]]:
        """Keys whose own row or whose owner changed after ``since`` (revocations, plan moves,
        an account disabled or enabled)."""
        statement = (
            select(ApiKey, User.plan_code, User.disabled_at)
            .join(User, User.id == ApiKey.user_id)
            .where((ApiKey.updated_at > since) | (User.updated_at > since))
        )
        return list((await self.session.execute(statement)).all())

    async def for_user(self, user_id: int) -> list[ApiKey]:
        statement = select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.id.desc())
        return list((await self.session.execute(statement)).scalars().all())

    async def get_for_user(self, user_id: int, key_id: int) -> ApiKey | None:
        # Scoped by owner: another user's key id is "not found", never "forbidden".
        statement = select(ApiKey).where(ApiKey.id == key_id, ApiKey.user_id == user_id)
        return await self.session.scalar(statement)

    async def by_hash(self, key_hash: str) -> ApiKey | None:
        return await self.session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))

    async def live_by_prefix(self, prefix: str) -> list[ApiKey]:
        statement = select(ApiKey).where(ApiKey.prefix.startswith(prefix, autoescape=True),
                                         ApiKey.revoked_at.is_(None))
        return list((await self.session.execute(statement)).scalars().all())

    async def activity_since(self, user_id: int, since: datetime) -> dict[int, KeyActivity]:
        """Per key of ``user_id``: its last request ever, and its spend and requests since
        ``since``. One grouped query over the usage records."""
        recent = UsageRecord.created_at >= since
        statement = (
            select(
                UsageRecord.api_key_id,
                func.max(UsageRecord.created_at),
                func.coalesce(func.sum(UsageRecord.cost_uusd).filter(recent), 0),
                func.count().filter(recent),
            )
            .where(UsageRecord.user_id == user_id, UsageRecord.api_key_id.is_not(None))
            .group_by(UsageRecord.api_key_id)
        )
        activity = {}
        for key_id, last_used, spend, requests in (await self.session.execute(statement)).all():
            if key_id is None:  # filtered out above; the column is nullable
                continue
            if isinstance(last_used, str):  # SQLite hands back aggregates of dates as text
                last_used = datetime.fromisoformat(last_used)
            if last_used is not None and last_used.tzinfo is None:
                last_used = last_used.replace(tzinfo=UTC)
            activity[int(key_id)] = KeyActivity(last_used_at=last_used, spend_uusd=int(spend),
                                                requests=int(requests))
        return activity

    async def revoke(self, *, now: datetime, user_id: int | None = None,
                     key_id: int | None = None, web_session_id: int | None = None) -> int:
        """Revoke live keys: one key, all of a user's, or a dashboard session's playground key.

        ``updated_at`` moves with ``revoked_at``: that is what every worker's key cache watches,
        so the key stops working everywhere within about a second."""
        statement = update(ApiKey).where(ApiKey.revoked_at.is_(None))
        if user_id is not None:
            statement = statement.where(ApiKey.user_id == user_id)
        if key_id is not None:
            statement = statement.where(ApiKey.id == key_id)
        if web_session_id is not None:
            statement = statement.where(ApiKey.web_session_id == web_session_id)
        result = await self.session.execute(statement.values(revoked_at=now, updated_at=now))
        return int(result.rowcount)  # type: ignore[attr-defined]
