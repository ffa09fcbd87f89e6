from __future__ import annotations

from datetime import datetime

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.models import ApiKey, User


class ApiKeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @classmethod
    def from_session(cls, session: AsyncSession) -> ApiKeyRepository:
        return cls(session)

    def add(self, key: ApiKey) -> None:
        self.session.add(key)

    async def identity_by_hash(self, key_hash: str) -> Row[ApiKey, str] | None:
        statement = (
            select(ApiKey, User.plan_code)
            .join(User, User.id == ApiKey.user_id)
            .where(ApiKey.key_hash == key_hash)
        )
        return (await self.session.execute(statement)).first()

    async def all_hashes(self) -> list[str]:
        return list((await self.session.execute(select(ApiKey.key_hash))).scalars())

    async def identities_changed_since(self, since: datetime) -> list[Row[ApiKey, str]]:
        """Keys whose own row or whose owner changed after ``since`` (revocations, plan moves)."""
        statement = (
            select(ApiKey, User.plan_code)
            .join(User, User.id == ApiKey.user_id)
            .where((ApiKey.updated_at > since) | (User.updated_at > since))
        )
        return list((await self.session.execute(statement)).all())
