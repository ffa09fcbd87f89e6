from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from dubhe.models.base import Base, BigIntPK, UTCDateTime, utcnow


class AdminAuditEntry(Base):
    """One change an admin made from the console or its API: who, what, when. Written in the
    same transaction as the change, so a change is never without its entry (nor the reverse)."""

    __tablename__ = "admin_audit_log"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    admin_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    # The admin's e-mail at the time: the record outlives a later rename or deletion.
    admin_email: Mapped[str] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(48))
    target: Mapped[str] = mapped_column(String(128))
    detail: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class ModelMaintenance(Base):
    """The run-time maintenance switch of a public model. Every worker polls this table (a
    handful of rows) and refuses the model's requests while ``in_maintenance`` is true; the
    catalog's own ``status = "maintenance"`` still applies on top."""

    __tablename__ = "model_maintenance"

    model_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    in_maintenance: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
