"""All of billing's SQL. Statements are portable between SQLite and PostgreSQL.

On SQLite, a statement over many values never costs a statement step per value, and its text
never depends on how many values there are. aiosqlite runs each step in its thread and each step
gives the GIL back: with the event loop busy serving requests, a step per row waited for the GIL
every time, and a busy worker's flush fell tens of thousands of settlements behind (README,
Billing). And SQLite's statement cache keeps a compiled program per distinct text (128 of them):
a multi-row VALUES list whose length followed the number of rows grew a worker by megabytes. So
the rows a flush inserts go through one fixed statement of ``_SQLITE_ROWS_PER_INSERT`` rows of
bound values, its unused rows bound to NULL and filtered out (``_values_insert``: one step per
128 rows, ~190 KiB compiled once per table), and the request ids and accounts it looks up go as
ONE JSON parameter read with ``json_each``. Rows as JSON cost SQLite a parse of each row per
column it extracts: ~12 µs of CPU a row against ~4 bound (3.40, a flush's usage rows).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any, cast

import orjson
from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
    case,
    func,
    literal_column,
    select,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.database import dialect_insert
from dubhe.models import (
    Account,
    ApiKey,
    KeyCapLease,
    Lease,
    LedgerEntry,
    SubscriptionPeriod,
    UsageRecord,
    User,
)
from dubhe.models.base import UTCDateTime, sqlite_datetime_text
from dubhe.pubsub import RECALL

# Every counter an account has; each equals the sum of its column over the account's ledger.
# Core inserts go to the tables themselves (typed as Table: the ORM declares them as FromClause).
_LEDGER = cast(Table, LedgerEntry.__table__)
_USAGE = cast(Table, UsageRecord.__table__)

COUNTERS = ("tokens_available", "tokens_reserved", "balance_uusd", "balance_reserved_uusd",
            "debt_uusd", "debt_tokens")


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
    debt_uusd: int = 0
    debt_tokens: int = 0
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class AccountPosition:
    """What every worker reads of the accounts it holds leases for, once a second."""

    epoch: int
    unspent_tokens: int  # available plus reserved: not yet spent
    unspent_uusd: int


class BillingRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
        self._insert = dialect_insert(session)

    @classmethod
    def from_session(cls, session: AsyncSession) -> BillingRepository:
        return cls(session)

    def _among(self, column: Any, values: Iterable[Any]) -> ColumnElement[bool]:
        """``column IN values``; on SQLite with the values as one JSON parameter."""
        if self._dialect != "sqlite":
            return cast(ColumnElement[bool], column.in_(list(values)))
        listed = orjson.dumps(list(values)).decode()
        return cast(ColumnElement[bool], column.in_(
            select(literal_column("value")).select_from(func.json_each(listed))))

    async def _insert_rows(self, table: Table, rows: list[dict[str, Any]]) -> None:
        """Insert rows that all have the same keys; on SQLite with ``_values_insert``'s one
        statement, ``_SQLITE_ROWS_PER_INSERT`` rows a step."""
        assert self.session.bind is not None
        columns = tuple(rows[0])
        sql, processors = _values_insert(table, columns, self.session.bind.dialect)
        # One flat list: per row a 1 (kept) and its values in column order (one C call), then
        # the few columns with a bind processor (datetimes) converted in place.
        width = len(columns) + 1
        values = itemgetter(*columns) if len(columns) > 1 else lambda row: (row[columns[0]],)
        flat: list[Any] = []
        for row in rows:
            flat.append(1)
            flat += values(row)
        for index, process in enumerate(processors):
            if process is None:
                continue
            # Runs of one value (a flush's ledger rows share their time) are converted once.
            last_value: Any = _NOTHING
            last_bound: Any = None
            for position in range(index + 1, len(flat), width):
                value = flat[position]
                if value is not last_value:
                    last_value, last_bound = value, process(value)
                flat[position] = last_bound
        # A step's parameters: _SQLITE_ROWS_PER_INSERT rows, the last step's unused ones NULL.
        step_size = _SQLITE_ROWS_PER_INSERT * width
        steps = [tuple(flat[start : start + step_size]) for start in range(0, len(flat), step_size)]
        if len(steps[-1]) < step_size:
            steps[-1] += (None,) * (step_size - len(steps[-1]))
        connection = await self.session.connection()
        await connection.exec_driver_sql(sql, steps)

    async def lock_accounts(self, user_ids: Sequence[int]) -> dict[int, AccountState]:
        # Ascending user id: every transaction takes account locks in the same order, so two
        # batches touching the same accounts cannot deadlock. (SQLite ignores FOR UPDATE; its
        # transactions begin IMMEDIATE and so hold the database's write lock already.)
        statement = (
            select(Account)
            .where(self._among(Account.user_id, user_ids))
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
                debt_uusd=row.debt_uusd,
                debt_tokens=row.debt_tokens,
                epoch=row.epoch,
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
                debt_uusd=0,
                debt_tokens=0,
                epoch=0,
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

    async def bump_epochs(self, user_ids: Iterable[int], now: datetime) -> None:
        """Tell every worker that these accounts changed in a way that must stop or alter
        admission: each retires its lease of an older epoch within a second."""
        ids = sorted(set(user_ids))
        if ids:
            await self.session.execute(
                update(Account).where(self._among(Account.user_id, ids))
                .values(epoch=Account.epoch + 1, updated_at=now)
            )

    async def account_positions(self, user_ids: Iterable[int]) -> dict[int, AccountPosition]:
        """The current epoch and unspent credit of each account (one query, however many)."""
        ids = sorted(set(user_ids))
        positions: dict[int, AccountPosition] = {}
        # In slices: both databases cap the parameters of one statement (about 32,000).
        for start in range(0, len(ids), 10_000):
            rows = await self.session.execute(
                select(Account.user_id, Account.epoch,
                       Account.tokens_available + Account.tokens_reserved,
                       Account.balance_uusd + Account.balance_reserved_uusd)
                .where(self._among(Account.user_id, ids[start : start + 10_000]))
            )
            positions.update({user_id: AccountPosition(epoch, int(tokens), int(uusd))
                              for user_id, epoch, tokens, uusd in rows.all()})
        return positions

    @property
    def can_recall(self) -> bool:
        """PostgreSQL notifies every worker; SQLite (one machine) has no NOTIFY: there, idle
        leases return by themselves (``lease_idle_seconds``)."""
        return self._dialect == "postgresql"

    async def recall_leases(self, user_id: int, key_id: int | None = None) -> None:
        """Ask every worker to give back the unused part of its lease of this account's credit
        (payload ``"<user id>"``), or of this key's cap headroom (``"<user id> <key id>"``),
        when this transaction commits (``dubhe.pubsub``). PostgreSQL only (``can_recall``)."""
        payload = str(user_id) if key_id is None else f"{user_id} {key_id}"
        await self.session.execute(select(func.pg_notify(RECALL, payload)))

    async def others_hold_credit(self, user_id: int, owner: str) -> bool:
        """Whether another worker holds a lease of this account with credit it has not used
        (some of it may be held by requests in flight: the database cannot tell)."""
        statement = select(Lease.id).where(
            Lease.status == "open", Lease.user_id == user_id, Lease.owner != owner,
            (Lease.tokens > Lease.tokens_used) | (Lease.uusd > Lease.uusd_used),
        ).limit(1)
        return (await self.session.execute(statement)).first() is not None

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
        # Core inserts on the table: the ORM's bulk path costs several times more per row.
        if not rows:
            return
        if self._dialect == "sqlite":
            await self._insert_rows(_LEDGER, rows)
        else:
            await self.session.execute(self._insert(_LEDGER), rows)

    async def ledger_entry_exists(self, kind: str, ref: str) -> bool:
        statement = select(LedgerEntry.id).where(LedgerEntry.kind == kind, LedgerEntry.ref == ref)
        return (await self.session.execute(statement)).first() is not None

    async def existing_refs(self, kind: str, refs: Sequence[str]) -> set[str]:
        if not refs:
            return set()
        statement = select(LedgerEntry.ref).where(LedgerEntry.kind == kind,
                                                  self._among(LedgerEntry.ref, refs))
        return set((await self.session.execute(statement)).scalars().all())

    async def insert_lease(self, *, user_id: int, owner: str, tokens: int, uusd: int,
                           period_start: datetime, expires_at: datetime, now: datetime) -> int:
        statement = (
            self._insert(Lease)
            .values(user_id=user_id, owner=owner, tokens=tokens, uusd=uusd, tokens_used=0,
                    uusd_used=0, period_start=period_start, status="open",
                    expires_at=expires_at, created_at=now)
            .returning(Lease.id)
        )
        return int((await self.session.execute(statement)).scalar_one())

    async def grow_lease(self, lease_id: int, tokens: int, uusd: int) -> bool:
        result = await self.session.execute(
            update(Lease)
            .where(Lease.id == lease_id, Lease.status == "open")
            .values(tokens=Lease.tokens + tokens, uusd=Lease.uusd + uusd)
        )
        return result.rowcount == 1  # type: ignore[attr-defined, no-any-return]

    async def lease_statuses(self, lease_ids: Iterable[int]) -> dict[int, str]:
        ids = list(set(lease_ids))
        if not ids:
            return {}
        rows = await self.session.execute(
            select(Lease.id, Lease.status).where(self._among(Lease.id, ids)))
        return {lease_id: status for lease_id, status in rows.all()}

    async def use_lease(self, lease_id: int, tokens: int, uusd: int) -> None:
        # CHECK (tokens_used <= tokens ...) backs this: a lease never pays out more than it holds.
        await self.session.execute(
            update(Lease)
            .where(Lease.id == lease_id)
            .values(tokens_used=Lease.tokens_used + tokens, uusd_used=Lease.uusd_used + uusd)
        )

    async def shrink_lease(self, lease_id: int, tokens: int, uusd: int) -> datetime | None:
        """Take credit back out of an open lease (what its worker holds free, never what it
        used); returns the lease's period start, or None when it is closed already (its unused
        credit returned with it)."""
        statement = (
            update(Lease)
            .where(Lease.id == lease_id, Lease.status == "open",
                   Lease.tokens - tokens >= Lease.tokens_used,
                   Lease.uusd - uusd >= Lease.uusd_used)
            .values(tokens=Lease.tokens - tokens, uusd=Lease.uusd - uusd)
            .returning(Lease.period_start)
        )
        return (await self.session.execute(statement)).scalars().first()

    async def close_lease(self, lease_id: int, now: datetime, *,
                          expired: bool = False) -> Lease | None:
        """Close an open lease (with ``expired``, only one whose deadline is past ``now``);
        returns it (with what it used) only to the one caller that did."""
        condition = (Lease.id == lease_id) & (Lease.status == "open")
        if expired:
            condition &= Lease.expires_at < now
        statement = (
            update(Lease)
            .where(condition)
            .values(status="closed", closed_at=now)
            .returning(Lease)
        )
        row = (await self.session.execute(statement)).scalars().first()
        if row is not None:
            self.session.expunge(row)
        return row

    async def extend_leases(self, lease_ids: list[int], until: datetime) -> set[int]:
        """Renew the deadlines of open leases; returns the ids still open."""
        if not lease_ids:
            return set()
        rows = await self.session.execute(
            update(Lease)
            .where(self._among(Lease.id, lease_ids), Lease.status == "open")
            .values(expires_at=until)
            .returning(Lease.id)
        )
        return set(rows.scalars())

    async def expired_leases(self, now: datetime, limit: int) -> list[tuple[int, int]]:
        """(lease id, user id) of open leases whose owner stopped renewing them."""
        statement = (
            select(Lease.id, Lease.user_id)
            .where(Lease.status == "open", Lease.expires_at < now)
            .order_by(Lease.expires_at)
            .limit(limit)
        )
        rows = (await self.session.execute(statement)).all()
        return [(lease_id, user_id) for lease_id, user_id in rows]

    async def insert_usage(self, rows: list[dict[str, Any]]) -> None:
        """Usage rows of requests the caller found unwritten (``Meter._apply``: no ledger entry
        for them, read in this transaction). On SQLite the transaction holds the database's
        write lock, so nothing can have written one since; PostgreSQL skips a row another
        transaction wrote meanwhile."""
        if not rows:
            return
        if self._dialect == "sqlite":
            await self._insert_rows(_USAGE, rows)
        else:
            statement = self._insert(_USAGE).on_conflict_do_nothing(index_elements=["request_id"])
            await self.session.execute(statement, rows)

    async def touch_keys(self, last_used: dict[int, datetime]) -> None:
        for key_id, when in last_used.items():
            await self.session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when))

    async def ledger_sums(self, user_id: int) -> dict[str, int]:
        columns = [func.coalesce(func.sum(getattr(LedgerEntry, name)), 0) for name in (*COUNTERS, "uncollected_uusd")]
        row = (await self.session.execute(select(*columns).where(LedgerEntry.user_id == user_id))).one()
        return dict(zip((*COUNTERS, "uncollected_uusd"), (int(value) for value in row), strict=False))

    # -- key spend caps (``caps.py``) -----------------------------------------------------------

    async def key_cap(self, key_id: int) -> int | None:
        return await self.session.scalar(select(ApiKey.spend_cap_uusd).where(ApiKey.id == key_id))

    async def cap_committed(self, key_id: int, month_start: datetime) -> int:
        """What the key has spent or holds leased in the month starting ``month_start``: an open
        lease counts what it was granted (or used, if usage overran it), a closed one what it
        used."""
        committed = case(
            (and_(KeyCapLease.status == "open", KeyCapLease.uusd > KeyCapLease.uusd_used),
             KeyCapLease.uusd),
            else_=KeyCapLease.uusd_used,
        )
        statement = select(func.coalesce(func.sum(committed), 0)).where(
            KeyCapLease.api_key_id == key_id, KeyCapLease.month_start == month_start
        )
        return int(await self.session.scalar(statement) or 0)

    async def insert_cap_lease(self, *, key_id: int, owner: str, month_start: datetime,
                               uusd: int, expires_at: datetime, now: datetime) -> int:
        statement = (
            self._insert(KeyCapLease)
            .values(api_key_id=key_id, owner=owner, month_start=month_start, uusd=uusd,
                    uusd_used=0, status="open", expires_at=expires_at, created_at=now)
            .returning(KeyCapLease.id)
        )
        return int((await self.session.execute(statement)).scalar_one())

    async def grow_cap_lease(self, lease_id: int, uusd: int) -> bool:
        result = await self.session.execute(
            update(KeyCapLease)
            .where(KeyCapLease.id == lease_id, KeyCapLease.status == "open")
            .values(uusd=KeyCapLease.uusd + uusd)
        )
        return result.rowcount == 1  # type: ignore[attr-defined, no-any-return]

    async def use_cap_leases(self, uses: dict[int, int]) -> None:
        """Add settled spend to the cap leases it was held on (open or, after a crash, closed:
        a closed lease's use still counts against its key's cap)."""
        for lease_id, uusd in sorted(uses.items()):
            if uusd:
                await self.session.execute(
                    update(KeyCapLease).where(KeyCapLease.id == lease_id)
                    .values(uusd_used=KeyCapLease.uusd_used + uusd)
                )

    async def shrink_cap_lease(self, lease_id: int, uusd: int) -> bool:
        """Take free headroom back out of an open cap lease (never below what it used)."""
        result = await self.session.execute(
            update(KeyCapLease)
            .where(KeyCapLease.id == lease_id, KeyCapLease.status == "open",
                   KeyCapLease.uusd - uusd >= KeyCapLease.uusd_used)
            .values(uusd=KeyCapLease.uusd - uusd)
        )
        return result.rowcount == 1  # type: ignore[attr-defined, no-any-return]

    async def others_hold_headroom(self, key_id: int, month_start: datetime, owner: str) -> bool:
        """Whether another worker holds a cap lease of this key this month with headroom it has
        not used (requests in flight may hold it: the database cannot tell)."""
        statement = select(KeyCapLease.id).where(
            KeyCapLease.status == "open", KeyCapLease.api_key_id == key_id,
            KeyCapLease.month_start == month_start, KeyCapLease.owner != owner,
            KeyCapLease.uusd > KeyCapLease.uusd_used,
        ).limit(1)
        return (await self.session.execute(statement)).first() is not None

    async def close_cap_lease(self, lease_id: int, now: datetime) -> None:
        await self.session.execute(
            update(KeyCapLease).where(KeyCapLease.id == lease_id, KeyCapLease.status == "open")
            .values(status="closed", closed_at=now)
        )

    async def extend_cap_leases(self, lease_ids: list[int], until: datetime) -> set[int]:
        """Renew the deadlines of open cap leases; returns the ids still open."""
        still_open = set()
        # One row at a time, in id order: the order settlements lock them in (no deadlock).
        for lease_id in sorted(lease_ids):
            statement = (
                update(KeyCapLease)
                .where(KeyCapLease.id == lease_id, KeyCapLease.status == "open")
                .values(expires_at=until)
                .returning(KeyCapLease.id)
            )
            if (await self.session.execute(statement)).first() is not None:
                still_open.add(lease_id)
        return still_open

    async def close_expired_cap_leases(self, now: datetime) -> int:
        """Close the cap leases whose worker stopped renewing them: they then count only what
        they used, and the rest of their headroom is free again."""
        result = await self.session.execute(
            update(KeyCapLease)
            .where(KeyCapLease.status == "open", KeyCapLease.expires_at < now)
            .values(status="closed", closed_at=now)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


# -- SQLite: many rows in one fixed statement, many values as one JSON parameter --------------

# Rows per step of a flush's INSERT (see the module's docstring): 17 bound values each for the
# usage rows, 2,176 in all, within the 32,766 SQLite allows since 3.32 (999 before).
_SQLITE_ROWS_PER_INSERT = 128 if sqlite3.sqlite_version_info >= (3, 32) else 999 // 17
_VALUES_INSERTS: dict[tuple[str, tuple[str, ...]], tuple[str, list[Any]]] = {}


_NOTHING = object()


def _sqlite_utc(value: datetime | None) -> str | None:
    """UTCDateTime's bind processor on SQLite, the same text at a fraction of the cost."""
    return None if value is None else sqlite_datetime_text(value)


def _values_insert(table: Table, columns: tuple[str, ...],
                   dialect: Dialect) -> tuple[str, list[Any]]:
    """``INSERT INTO table (columns) SELECT column2, ... FROM (VALUES (?, ...), ...) WHERE
    column1 IS NOT NULL``: ``_SQLITE_ROWS_PER_INSERT`` rows of a keep flag and the columns'
    values, in order; and each column's bind processor (what SQLAlchemy would have bound: a
    datetime becomes SQLite's text form), so the rows written are the same."""
    key = (table.name, columns)
    if key not in _VALUES_INSERTS:
        row = "(" + ", ".join("?" * (len(columns) + 1)) + ")"
        picked = ", ".join(f"column{index + 2}" for index in range(len(columns)))
        sql = (f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT {picked} FROM "
               f"(VALUES {', '.join([row] * _SQLITE_ROWS_PER_INSERT)}) "
               "WHERE column1 IS NOT NULL")
        processors = [_sqlite_utc if isinstance(table.c[name].type, UTCDateTime)
                      else table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
                      for name in columns]  # fmt: skip
        _VALUES_INSERTS[key] = sql, processors
    return _VALUES_INSERTS[key]
