from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from dubhe.models.base import Base, BigIntPK, UTCDateTime, utcnow


class WebSession(Base):
    """A dashboard log-in. The cookie holds a random token; only its SHA-256 is stored, so a copy
    of the database cannot be replayed as a cookie."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuthAttempt(Base):
    """One counted attempt (a failed log-in, a sign-up, a reset request) by IP or by account.

    Limits count these rows in a time window, so every worker and instance shares them."""

    __tablename__ = "auth_attempts"
    __table_args__ = (Index("ix_auth_attempts_kind_subject_created", "kind", "subject",
                            "created_at"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    # e.g. "login_ip", "login_account", "signup_ip", "account_ip", "reset_ip"
    kind: Mapped[str] = mapped_column(String(32))
    # an IP address or a normalized e-mail
    subject: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
