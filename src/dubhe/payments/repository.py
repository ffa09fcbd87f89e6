"""Payments' SQL. Portable between SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.database import dialect_insert
from dubhe.models import Payment, PaymentReversal


class PaymentRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._insert = dialect_insert(session)

    @classmethod
    def from_session(cls, session: AsyncSession) -> PaymentRepository:
        return cls(session)

    async def record(self, *, provider: str, payment_id: str, user_id: int, purpose: str,
                     amount_uusd: int, plan_code: str | None, payment_intent: str | None,
                     now: datetime) -> bool:
        """Insert the payment unless it is already there; True if this call inserted it.

        On PostgreSQL a concurrent insert of the same key waits for the first transaction and
        then does nothing, so of any number of simultaneous deliveries exactly one gets True.
        """
        statement = (
            self._insert(Payment)
            .values(provider=provider, event_id=payment_id, user_id=user_id, purpose=purpose,
                    amount_uusd=amount_uusd, plan_code=plan_code, payment_intent=payment_intent,
                    refunded_uusd=0, reversed_uusd=0, created_at=now)
            .on_conflict_do_nothing(index_elements=["provider", "event_id"])
            .returning(Payment.id)
        )
        return (await self.session.execute(statement)).first() is not None

    async def lock_intent(self, *, provider: str, payment_intent: str, event_id: str,
                          now: datetime) -> None:
        """Take the payment intent's lock row (created on first use) for this transaction.

        Every webhook touching a payment intent does this first. An insert of the same key waits
        for the transaction that inserted it first; after the wait, this transaction's next
        statements see what that one committed (READ COMMITTED on PostgreSQL; SQLite's writers
        are serial anyway). So a refund and its payment arriving at once see each other."""
        await self.add_reversal(provider=provider, ref=f"intent:{payment_intent}", kind="intent",
                                payment_intent=payment_intent, amount_uusd=0, event_id=event_id,
                                now=now)
        await self.session.execute(
            select(PaymentReversal.id)
            .where(PaymentReversal.provider == provider,
                   PaymentReversal.ref == f"intent:{payment_intent}")
            .with_for_update()
        )

    async def add_reversal(self, *, provider: str, ref: str, kind: str, payment_intent: str,
                           amount_uusd: int, event_id: str, now: datetime) -> bool:
        statement = (
            self._insert(PaymentReversal)
            .values(provider=provider, ref=ref, kind=kind, payment_intent=payment_intent,
                    amount_uusd=amount_uusd, event_id=event_id, applied_uusd=0, owed_uusd=0,
                    created_at=now)
            .on_conflict_do_nothing(index_elements=["provider", "ref"])
            .returning(PaymentReversal.id)
        )
        return (await self.session.execute(statement)).first() is not None

    async def payment_of_intent(self, provider: str, payment_intent: str) -> Payment | None:
        statement = (
            select(Payment)
            .where(Payment.provider == provider, Payment.payment_intent == payment_intent)
            .order_by(Payment.id)
            .limit(1)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        return (await self.session.execute(statement)).scalars().first()

    async def unapplied_reversals(self, provider: str, payment_intent: str) -> list[PaymentReversal]:
        """In arrival order: a dispute is always stored before its "won" (see the service)."""
        statement = (
            select(PaymentReversal)
            .where(PaymentReversal.provider == provider,
                   PaymentReversal.payment_intent == payment_intent,
                   PaymentReversal.kind != "intent",
                   PaymentReversal.applied_at.is_(None))
            .order_by(PaymentReversal.id)
            .execution_options(populate_existing=True)
        )
        return list((await self.session.execute(statement)).scalars().all())

    async def reversal(self, provider: str, ref: str) -> PaymentReversal | None:
        statement = (
            select(PaymentReversal)
            .where(PaymentReversal.provider == provider, PaymentReversal.ref == ref)
            .execution_options(populate_existing=True)
        )
        return (await self.session.execute(statement)).scalars().first()

    async def mark_applied(self, reversal_id: int, *, applied_uusd: int, owed_uusd: int,
                           now: datetime) -> bool:
        """Status-guarded: of two transactions applying one fact, only one gets True."""
        result = await self.session.execute(
            update(PaymentReversal)
            .where(PaymentReversal.id == reversal_id, PaymentReversal.applied_at.is_(None))
            .values(applied_at=now, applied_uusd=applied_uusd, owed_uusd=owed_uusd)
        )
        return result.rowcount == 1  # type: ignore[attr-defined, no-any-return]

    async def set_reversed(self, payment_id: int, *, refunded_uusd: int,
                           reversed_uusd: int) -> None:
        await self.session.execute(
            update(Payment).where(Payment.id == payment_id)
            .values(refunded_uusd=refunded_uusd, reversed_uusd=reversed_uusd)
        )
