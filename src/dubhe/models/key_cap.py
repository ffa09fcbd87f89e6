"""A worker's share of an API key's monthly spend cap (``billing/caps.py``)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from dubhe.models.base import Base, BigIntPK, UTCDateTime, utcnow


class KeyCapLease(Base):
    """Headroom under a capped key's cap that one worker holds for its requests, for one month.

    What the key has committed in a month is, over that month's rows: ``uusd`` for an open
    lease (or ``uusd_used`` if usage overran it), ``uusd_used`` for a closed one. A worker grows
    or opens a lease only under its account's row lock and only within ``cap - committed``; settled
    usage adds to ``uusd_used`` in the transaction that writes its usage record, so the sum of a
    month's ``uusd_used`` is the key's spend (``usage_records.cost_uusd``) that month.
    """

    __tablename__ = "key_cap_leases"
    __table_args__ = (
        Index("ix_key_cap_leases_key_month", "api_key_id", "month_start"),
        Index("ix_key_cap_leases_status_expires", "status", "expires_at"),
        CheckConstraint("uusd >= 0 AND uusd_used >= 0", name="amounts_nonnegative"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    owner: Mapped[str] = mapped_column(String(96))
    month_start: Mapped[datetime] = mapped_column(UTCDateTime)
    uusd: Mapped[int] = mapped_column(BigInteger)
    uusd_used: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(16))  # open | closed
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
