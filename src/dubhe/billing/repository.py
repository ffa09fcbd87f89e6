"""All of billing's SQL. Statements are portable between SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.models import Account, LedgerEntry, Reservation, SubscriptionPeriod, UsageRecord, User

COUNTERS = ("tokens_available", "tokens_reserved", "balance_uusd", "balance_reserved_uusd")


class GuardFailed(Exception):
    """A guarded update matched no row: the counters could not cover the change."""


@dataclass(slots=True)
class AccountState:
    """An account row as read under its lock, changed in memory, written back as deltas."""

    user_id: int
    plan_code: str
    next_plan_code: str | None
    period_start: datetime
    period_end: datetime
    tokens_available: int
    tokens_reserved: int
    balance_uusd: int
    balance_reserved_uusd: int
    uncollected_uusd: int


class BillingRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
        self._insert = pg_insert if dialect == "postgresql" else sqlite_insert

    @classmethod
    def from_session(cls, session: AsyncSession) -> BillingRepository:
        return cls(session)

    async def lock_accounts(self, user_ids: Sequence[int]) -> dict[int, AccountState]:
        # Ascending user id: every transaction takes account locks in the same order, so two
        # batches touching the same accounts cannot deadlock. (SQLite ignores FOR UPDATE; its
        # transactions begin IMMEDIATE and so hold the database's write lock already.)
        statement = (
            select(Account)
            .where(Account.user_id.in_(user_ids))
            .order_by(Account.user_id)
            .with_for_update()
        )
        rows = (await self.session.execute(statement)).scalars().all()
        states = {}
        for row in rows:
            states[row.user_id] = AccountState(
                user_id=row.user_id,
                plan_code=row.plan_code,
                next_plan_code=row.next_plan_code,
                period_start=row.period_start,
                period_end=row.period_end,
                tokens_available=row.tokens_available,
                tokens_reserved=row.tokens_reserved,
                balance_uusd=row.balance_uusd,
                balance_reserved_uusd=row.balance_reserved_uusd,
                uncollected_uusd=row.uncollected_uusd,
            )
            self.session.expunge(row)
        return states

    async def plan_of_user(self, user_id: int) -> str | None:
        return await self.session.scalar(select(User.plan_code).where(User.id == user_id))

    async def insert_account(self, state: AccountState, now: datetime) -> None:
        await self.session.execute(
            self._insert(Account).values(
                user_id=state.user_id,
                plan_code=state.plan_code,
                next_plan_code=None,
                period_start=state.period_start,
                period_end=state.period_end,
                tokens_available=0,
                tokens_reserved=0,
                balance_uusd=0,
                balance_reserved_uusd=0,
                uncollected_uusd=0,
                updated_at=now,
            )
        )

    async def apply_deltas(self, user_id: int, deltas: dict[str, int], now: datetime, **fields: Any) -> None:
        """``counter = counter + delta`` for each counter, guarded so none can go below zero."""
        statement = update(Account).where(Account.user_id == user_id)
        values: dict[str, Any] = {"updated_at": now, **fields}
        for name, delta in deltas.items():
            if delta == 0:
                continue
            column = getattr(Account, name)
            values[name] = column + delta
            if delta < 0:
                statement = statement.where(column >= -delta)
        result = await self.session.execute(statement.values(**values))
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise GuardFailed(f"account {user_id} cannot cover {deltas}")

    async def set_user_plan(self, user_id: int, plan_code: str, now: datetime) -> None:
        # updated_at tells every worker's key cache that this user's plan changed.
        await self.session.execute(
            update(User).where(User.id == user_id).values(plan_code=plan_code, updated_at=now)
        )

    async def insert_period(self, user_id: int, plan_code: str, start: datetime, end: datetime,
                            included_tokens: int, now: datetime) -> bool:
        statement = (
            self._insert(SubscriptionPeriod)
            .values(user_id=user_id, plan_code=plan_code, period_start=start, period_end=end,
                    included_tokens=included_tokens, created_at=now)
            .on_conflict_do_nothing(index_elements=["user_id", "period_start"])
            .returning(SubscriptionPeriod.id)
        )
        return (await self.session.execute(statement)).first() is not None

    async def insert_ledger(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            await self.session.execute(self._insert(LedgerEntry), rows)

    async def ledger_entry_exists(self, kind: str, ref: str) -> bool:
        statement = select(LedgerEntry.id).where(LedgerEntry.kind == kind, LedgerEntry.ref == ref)
        return (await self.session.execute(statement)).first() is not None

    async def insert_reservations(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            await self.session.execute(self._insert(Reservation), rows)

    async def claim_reservations(self, request_ids: Iterable[str], status: str,
                                 now: datetime) -> dict[str, Reservation]:
        """Move held reservations to ``status``; only those still held come back (once, ever)."""
        ids = list(request_ids)
        if not ids:
            return {}
        statement = (
            update(Reservation)
            .where(Reservation.request_id.in_(ids), Reservation.status == "held")
            .values(status=status, finished_at=now)
            .returning(Reservation)
        )
        rows = (await self.session.execute(statement)).scalars().all()
        claimed = {row.request_id: row for row in rows}
        for row in rows:
            self.session.expunge(row)
        return claimed

    async def extend_reservations(self, request_ids: list[str], until: datetime) -> None:
        if request_ids:
            await self.session.execute(
                update(Reservation)
                .where(Reservation.request_id.in_(request_ids), Reservation.status == "held")
                .values(expires_at=until)
            )

    async def expired_reservation_ids(self, now: datetime, limit: int) -> list[str]:
        statement = (
            select(Reservation.request_id)
            .where(Reservation.status == "held", Reservation.expires_at < now)
            .order_by(Reservation.expires_at)
            .limit(limit)
        )
        return list((await self.session.execute(statement)).scalars().all())

    async def insert_usage(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            statement = self._insert(UsageRecord).on_conflict_do_nothing(index_elements=["request_id"])
            await self.session.execute(statement, rows)

    async def touch_keys(self, last_used: dict[int, datetime]) -> None:
        from dubhe.models import ApiKey

        for key_id, when in last_used.items():
            await self.session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when))

    async def ledger_sums(self, user_id: int) -> dict[str, int]:
        columns = [func.coalesce(func.sum(getattr(LedgerEntry, name)), 0) for name in (*COUNTERS, "uncollected_uusd")]
        row = (await self.session.execute(select(*columns).where(LedgerEntry.user_id == user_id))).one()
        return dict(zip((*COUNTERS, "uncollected_uusd"), (int(value) for value in row)))
