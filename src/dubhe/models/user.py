from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, String
from sqlalchemy.orm import Mapped, mapped_column

from dubhe.models.base import Base, BigIntPK, UTCDateTime, utcnow


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    plan_code: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # None until the owner follows the e-mailed link (sign-up mode "email-verified"); accounts
    # made by the operator, or in other modes, are verified at creation.
    email_verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # A deleted account keeps its row (the ledger refers to it) with the e-mail scrubbed.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Set by an admin: log-in refused, sessions ended, keys refused until enabled again.
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Bumped on every change that API-key caches must see (plan, deactivation).
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
