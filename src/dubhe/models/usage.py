from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from dubhe.models.base import Base, BigIntPK, UTCDateTime, utcnow


class UsageRecord(Base):
    """One row per /v1 request that reached the upstream stage, whatever its outcome.

    ``request_id`` is the idempotency key billing settles on: a request is metered exactly once.
    """

    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_user_created", "user_id", "created_at"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    api_key_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), nullable=True
    )
    model: Mapped[str] = mapped_column(String(64))
    upstream: Mapped[str | None] = mapped_column(String(64), nullable=True)
    stream: Mapped[bool] = mapped_column(Boolean)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    # "upstream": the upstream's own count; "estimated": counted by Dubhe with a tokenizer.
    usage_source: Mapped[str] = mapped_column(String(16))
    # ok | upstream_error | upstream_unreachable | client_cancelled | stream_interrupted
    outcome: Mapped[str] = mapped_column(String(24))
    status_code: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[int] = mapped_column(Integer)
    # Tokens paid from the plan's included tokens; the rest was charged at the model's price.
    tokens_from_plan: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_uusd: Mapped[int] = mapped_column(BigInteger, default=0)
    uncollected_uusd: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
