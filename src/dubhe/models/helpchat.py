from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from dubhe.models.base import Base, BigIntPK, UTCDateTime, utcnow


class HelpConversation(Base):
    """A visitor's help-chat thread. An anonymous visitor is known by a random cookie, of which
    only the SHA-256 is stored; signing in ties the thread to the account."""

    __tablename__ = "help_conversations"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    visitor_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_message_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # The last visitor message an admin has seen: unread = visitor messages after it.
    admin_read_message_id: Mapped[int] = mapped_column(BigInteger, default=0)


class HelpMessage(Base):
    __tablename__ = "help_messages"
    __table_args__ = (Index("ix_help_messages_conversation_id_id", "conversation_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("help_conversations.id", ondelete="CASCADE")
    )
    author: Mapped[str] = mapped_column(String(16))  # visitor | admin
    author_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    body: Mapped[str] = mapped_column(Text)
    # The sender's address, for the per-address rate limit (visitor messages only).
    client_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
