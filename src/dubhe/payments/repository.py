"""Payments' SQL. Portable between SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.models import Payment


class PaymentRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
        self._insert = pg_insert if dialect == "postgresql" else sqlite_insert

    @classmethod
    def from_session(cls, session: AsyncSession) -> PaymentRepository:
        return cls(session)

    async def record(self, *, provider: str, payment_id: str, user_id: int, purpose: str,
                     amount_uusd: int, plan_code: str | None, now: datetime) -> bool:
        """Insert the payment unless it is already there; True if this call inserted it.

        On PostgreSQL a concurrent insert of the same key waits for the first transaction and
        then does nothing, so of any number of simultaneous deliveries exactly one gets True.
        """
        statement = (
            self._insert(Payment)
            .values(provider=provider, event_id=payment_id, user_id=user_id, purpose=purpose,
                    amount_uusd=amount_uusd, plan_code=plan_code, created_at=now)
            .on_conflict_do_nothing(index_elements=["provider", "event_id"])
            .returning(Payment.id)
        )
        return (await self.session.execute(statement)).first() is not None
