from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from dubhe.models.base import Base, BigIntPK, UTCDateTime, utcnow


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    # What lists show: "sk-dubhe-AbCd…"; never enough to use the key.
    prefix: Mapped[str] = mapped_column(String(32))
    # HMAC-SHA256 of the full key under the deployment secret; the key itself is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    spend_cap_uusd: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The operator's per-key limits (``dubhe keys limits``); NULL: the plan's. A key with any of
    # them set is limited on its own instead of sharing its account's plan budget.
    rpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    concurrency_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Set on the playground's short-lived keys: revoked when that dashboard session logs out.
    web_session_id: Mapped[int | None] = mapped_column(
        ForeignKey("web_sessions.id", ondelete="SET NULL"), nullable=True, index=True
    )
    # Bumped on revoke and edits, so every worker's key cache picks the change up within a second.
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
