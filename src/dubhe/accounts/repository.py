from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.models import AuthAttempt, User, WebSession


class UserRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @classmethod
    def from_session(cls, session: AsyncSession) -> UserRepository:
        return cls(session)

    async def get_by_email(self, email: str) -> User | None:
        return await self.session.scalar(select(User).where(User.email == email))

    async def get(self, user_id: int) -> User | None:
        return await self.session.get(User, user_id)

    def add(self, user: User) -> None:
        self.session.add(user)

    async def any_admin(self) -> bool:
        statement = select(User.id).where(User.is_admin.is_(True), User.deleted_at.is_(None))
        return await self.session.scalar(statement.limit(1)) is not None


class WebSessionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @classmethod
    def from_session(cls, session: AsyncSession) -> WebSessionRepository:
        return cls(session)

    def add(self, web_session: WebSession) -> None:
        self.session.add(web_session)

    async def delete(self, session_id: int) -> None:
        await self.session.execute(delete(WebSession).where(WebSession.id == session_id))

    async def delete_for_user(self, user_id: int, *, keep: int | None = None) -> None:
        statement = delete(WebSession).where(WebSession.user_id == user_id)
        if keep is not None:
            statement = statement.where(WebSession.id != keep)
        await self.session.execute(statement)

    async def delete_expired(self, now: datetime) -> None:
        await self.session.execute(delete(WebSession).where(WebSession.expires_at <= now))


class AuthAttemptRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @classmethod
    def from_session(cls, session: AsyncSession) -> AuthAttemptRepository:
        return cls(session)

    def add(self, kind: str, subject: str, now: datetime) -> None:
        self.session.add(AuthAttempt(kind=kind, subject=subject, created_at=now))

    async def count_since(self, kind: str, subject: str, since: datetime) -> int:
        statement = select(func.count()).select_from(AuthAttempt).where(
            AuthAttempt.kind == kind, AuthAttempt.subject == subject,
            AuthAttempt.created_at > since,
        )
        return int(await self.session.scalar(statement) or 0)

    async def clear(self, kind: str, subject: str) -> None:
        await self.session.execute(
            delete(AuthAttempt).where(AuthAttempt.kind == kind, AuthAttempt.subject == subject)
        )

    async def delete_older_than(self, cutoff: datetime) -> None:
        await self.session.execute(delete(AuthAttempt).where(AuthAttempt.created_at <= cutoff))

