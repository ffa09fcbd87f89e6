"""All SQL of the help chat."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.models import HelpConversation, HelpMessage, User


@dataclass(frozen=True, slots=True)
class InboxRow:
    conversation: HelpConversation
    email: str | None
    unread: int
    last_body: str


class HelpChatRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @classmethod
    def from_session(cls, session: AsyncSession) -> HelpChatRepository:
        return cls(session)

    async def by_visitor(self, visitor_hash: str) -> HelpConversation | None:
        return await self.session.scalar(
            select(HelpConversation).where(HelpConversation.visitor_hash == visitor_hash))

    async def by_user(self, user_id: int) -> HelpConversation | None:
        return await self.session.scalar(
            select(HelpConversation).where(HelpConversation.user_id == user_id)
            .order_by(HelpConversation.id).limit(1))

    async def get(self, conversation_id: int) -> HelpConversation | None:
        return await self.session.get(HelpConversation, conversation_id)

    def add(self, row: HelpConversation | HelpMessage) -> None:
        self.session.add(row)

    async def move_messages(self, source_id: int, target_id: int) -> None:
        await self.session.execute(update(HelpMessage)
                                   .where(HelpMessage.conversation_id == source_id)
                                   .values(conversation_id=target_id))
        await self.session.execute(delete(HelpConversation)
                                   .where(HelpConversation.id == source_id))

    async def messages(self, conversation_id: int, *, after: int = 0,
                       limit: int = 200) -> list[HelpMessage]:
        """The last ``limit`` messages after ``after``, oldest first."""
        statement = (select(HelpMessage)
                     .where(HelpMessage.conversation_id == conversation_id,
                            HelpMessage.id > after)
                     .order_by(HelpMessage.id.desc()).limit(limit))
        return list(reversed((await self.session.execute(statement)).scalars().all()))

    async def serialize(self, *names: str) -> None:
        """Make this transaction the only one between here and its end that posts for each of
        ``names`` (a client address, an account): a check-then-insert cannot race. PostgreSQL
        takes a transaction-level advisory lock per name, in the order given (every caller
        gives the same order); SQLite's writers are serialised already (BEGIN IMMEDIATE)."""
        if self.session.get_bind().dialect.name != "postgresql":
            return
        for name in names:
            digest = hashlib.sha256(b"dubhe-helpchat:" + name.encode()).digest()
            await self.session.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                                       {"k": int.from_bytes(digest[:8], "big", signed=True)})

    async def visitor_messages_since(self, *, since: datetime, conversation_id: int | None = None,
                                     client_ip: str | None = None) -> int:
        statement = select(func.count()).select_from(HelpMessage).where(
            HelpMessage.author == "visitor", HelpMessage.created_at >= since)
        if conversation_id is not None:
            statement = statement.where(HelpMessage.conversation_id == conversation_id)
        if client_ip is not None:
            statement = statement.where(HelpMessage.client_ip == client_ip)
        return int(await self.session.scalar(statement) or 0)

    async def latest_message_ids(self, after: int, *, limit: int = 1000) -> list[tuple[int, int]]:
        """(message id, conversation id) of messages after ``after``: the live feed's poll."""
        statement = (select(HelpMessage.id, HelpMessage.conversation_id)
                     .where(HelpMessage.id > after).order_by(HelpMessage.id).limit(limit))
        return [(int(row[0]), int(row[1])) for row in (await self.session.execute(statement)).all()]

    async def max_message_id(self) -> int:
        return int(await self.session.scalar(select(func.max(HelpMessage.id))) or 0)

    async def inbox(self, *, limit: int) -> list[InboxRow]:
        unread = (select(func.count()).where(
            HelpMessage.conversation_id == HelpConversation.id, HelpMessage.author == "visitor",
            HelpMessage.id > HelpConversation.admin_read_message_id)
            .correlate(HelpConversation).scalar_subquery())
        last_body = (select(HelpMessage.body).where(
            HelpMessage.conversation_id == HelpConversation.id)
            .order_by(HelpMessage.id.desc()).limit(1)
            .correlate(HelpConversation).scalar_subquery())
        statement = (select(HelpConversation, User.email, unread, last_body)
                     .outerjoin(User, User.id == HelpConversation.user_id)
                     .order_by(HelpConversation.last_message_at.desc()).limit(limit))
        return [InboxRow(row[0], row[1], int(row[2] or 0), row[3] or "")
                for row in (await self.session.execute(statement)).all()]

    async def mark_read(self, conversation_id: int, up_to: int) -> None:
        await self.session.execute(
            update(HelpConversation)
            .where(HelpConversation.id == conversation_id,
                   HelpConversation.admin_read_message_id < up_to)
            .values(admin_read_message_id=up_to))

    async def unread_total(self) -> int:
        statement = (select(func.count()).select_from(HelpMessage)
                     .join(HelpConversation, HelpConversation.id == HelpMessage.conversation_id)
                     .where(HelpMessage.author == "visitor",
                            HelpMessage.id > HelpConversation.admin_read_message_id))
        return int(await self.session.scalar(statement) or 0)
