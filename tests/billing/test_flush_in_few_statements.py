"""A flush writes its settlements' rows in one statement per table, not a statement step per row,
and on SQLite in a statement whose text does not depend on the number of rows.

On SQLite each step runs in aiosqlite's thread and gives the GIL back; with the event loop busy
serving requests each step then waited for it, and under load the database fell tens of
thousands of rows behind the spool (`make bench`, README "Billing"). A multi-row VALUES list as
long as the rows compiled to a new program for each number of rows, which SQLite's statement
cache kept (128 of them): a worker grew by megabytes. So on SQLite the rows go through one
statement of a fixed number of rows, one step per that many (the last step's unused rows bound
to NULL and filtered out), and on PostgreSQL in one executemany (asyncpg pipelines it, with no
thread). Real database, both dialects; no timing is asserted."""

from __future__ import annotations

import dataclasses
import secrets
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import insert, text

from dubhe.billing import meter as meter_module
from dubhe.billing import repository as repository_module
from dubhe.billing.meter import Meter, Reserved
from dubhe.billing.repository import BillingRepository
from dubhe.models import LedgerEntry, UsageRecord
from tests.billing.conftest import Ledger, admit, event

REQUESTS = 1200
ROWS_PER_STEP = repository_module._SQLITE_ROWS_PER_INSERT


async def test_a_flush_writes_its_rows_in_one_statement_per_table(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    # The meter's own loops flush every 0.1 s and close a lease idle for half a second (a
    # ledger entry): one of them still writing when the test's flush begins would add its
    # statements to the count. The test's two flushes are the only writes.
    monkeypatch.setattr(meter_module, "_FLUSH_SECONDS", 3600)
    catalog = dataclasses.replace(ledger.catalog, lease_idle_seconds=3600)
    user_id = await ledger.user("metered")
    await ledger.credit(user_id, 100_000_000)
    meter = Meter(ledger.sessionmaker, catalog, ledger.tmp / "spool")
    meter.start()
    inserts: list[tuple[str, bool, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any,
             executemany: bool) -> None:
        inserts.append((statement.strip(), executemany, parameters))

    try:
        for batch in (REQUESTS, 7):
            for _ in range(batch):
                request_id, answer = await admit(meter, user_id, prompt_tokens=5, max_tokens=5)
                assert isinstance(answer, Reserved)
                meter.settle(event(user_id, request_id, 5, 5), wait=False)
            sqlalchemy_event.listen(ledger.engine.sync_engine, "before_cursor_execute", seen)
            try:
                await meter.flush()
            finally:
                sqlalchemy_event.remove(ledger.engine.sync_engine, "before_cursor_execute", seen)
    finally:
        await meter.stop()
    sqlite = ledger.engine.dialect.name == "sqlite"
    for table in ("usage_records", "ledger_entries"):
        calls = [call for call in inserts if call[0].startswith(f"INSERT INTO {table}")]
        assert len(calls) == 2, (table, len(calls))  # one per flush
        if sqlite:
            # One statement: the same text for 1,200 rows and for 7, so SQLite compiles and
            # caches it once; a step per 128 rows.
            assert calls[0][0] == calls[1][0] and "FROM (VALUES (?" in calls[0][0], table
            steps = [len(call[2]) if call[1] else 1 for call in calls]
            assert steps == [-(-REQUESTS // ROWS_PER_STEP), 1], table
        else:
            assert [len(call[2]) for call in calls] == [REQUESTS, 7], table
            assert all(call[1] for call in calls), table  # one executemany, pipelined by asyncpg
    # The lookups by request id and account take their values the same way (one parameter).
    refs = [call for call in inserts if call[0].startswith("SELECT ledger_entries.ref")]
    assert len(refs) == 2 and (not sqlite or refs[0][0] == refs[1][0])
    async with ledger.engine.connect() as connection:
        rows = (await connection.execute(
            text("SELECT COUNT(*) FROM usage_records WHERE user_id = :u"), {"u": user_id})).scalar()
    assert rows == REQUESTS + 7
    await ledger.assert_reconciled(user_id)


async def test_the_rows_written_are_those_sqlalchemy_writes(ledger: Ledger) -> None:
    """The SQLite path binds every value as SQLAlchemy would (a datetime in SQLite's text form,
    a bool as 0/1): the same values, of the same storage type, as SQLAlchemy's own INSERT. A
    string with a NUL is written whole too."""
    user_id = await ledger.user("metered")
    when = datetime(2026, 12, 2, 10, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    descriptions = ['dubhe-fast: ü "quoted" \\ 1']
    if ledger.engine.dialect.name == "sqlite":  # PostgreSQL's text refuses NUL either way
        descriptions.append("goodwill\x00 refund for ticket 42")
    for description in descriptions:
        await _same_rows_as_sqlalchemy(ledger, user_id, when, description)


async def _same_rows_as_sqlalchemy(ledger: Ledger, user_id: int, when: datetime,
                                   description: str) -> None:
    ref = secrets.token_hex(4)
    entry = {"user_id": user_id, "kind": "test", "ref": ref, "created_at": when,
             "description": description, "uncollected_uusd": 5,
             "tokens_available": -3, "tokens_reserved": 0, "balance_uusd": 2**62,
             "balance_reserved_uusd": 0, "debt_uusd": 0, "debt_tokens": 0}
    usage = {"request_id": ref, "user_id": user_id, "api_key_id": None, "model": "dubhe-fast",
             "upstream": None, "stream": True, "prompt_tokens": 1, "completion_tokens": 2,
             "usage_source": "upstream", "outcome": "ok", "status_code": 200, "latency_ms": 3,
             "tokens_from_plan": 0, "cost_uusd": 7, "uncollected_uusd": 0, "created_at": when}
    async with ledger.sessionmaker() as session, session.begin():
        repository = BillingRepository.from_session(session)
        await repository.insert_ledger([entry])
        await repository.insert_usage([usage])
        await session.execute(insert(LedgerEntry.__table__), [{**entry, "ref": ref + "-core"}])
        await session.execute(insert(UsageRecord.__table__),
                              [{**usage, "request_id": ref + "-core"}])
    typed = "typeof({0}), {0}" if ledger.engine.dialect.name == "sqlite" else "{0}"
    async with ledger.engine.connect() as connection:
        for table, key, row in (("ledger_entries", "ref", entry), ("usage_records", "request_id", usage)):
            columns = ", ".join(typed.format(name) for name in row if name != key)
            written = {}
            for value in (ref, ref + "-core"):
                written[value] = (await connection.execute(text(
                    f"SELECT {columns} FROM {table} WHERE user_id = :u AND {key} = :k"),
                    {"u": user_id, "k": value})).one()
            assert written[ref] == written[ref + "-core"], table
            if table == "ledger_entries":
                assert description in written[ref]


async def test_rows_of_one_batch_keep_each_their_own_time(ledger: Ledger) -> None:
    """A batch binds a run of one time once (a flush's ledger rows share theirs): rows whose
    times differ, or come back after another, are each written with their own, as SQLAlchemy
    writes them."""
    user_id = await ledger.user("metered")
    first = datetime(2026, 12, 3, 13, 17, 50, 865194, tzinfo=UTC)
    later = first + timedelta(seconds=1, microseconds=7)
    times = [first, first, later, first, datetime.fromisoformat(first.isoformat()), later]
    prefix = secrets.token_hex(4)
    rows = [{"user_id": user_id, "kind": "test", "ref": f"{prefix}-{index}", "created_at": when,
             "description": "", "uncollected_uusd": 0, "tokens_available": 0,
             "tokens_reserved": 0, "balance_uusd": 0, "balance_reserved_uusd": 0,
             "debt_uusd": 0, "debt_tokens": 0} for index, when in enumerate(times)]
    async with ledger.sessionmaker() as session, session.begin():
        await BillingRepository.from_session(session).insert_ledger(rows)
        await session.execute(insert(LedgerEntry.__table__),
                              [{**row, "ref": row["ref"] + "-core"} for row in rows])
    async with ledger.engine.connect() as connection:
        written = dict((await connection.execute(text(
            "SELECT ref, created_at FROM ledger_entries WHERE user_id = :u AND kind = 'test'"),
            {"u": user_id})).all())
    assert len(written) == 2 * len(times)
    for index in range(len(times)):
        assert written[f"{prefix}-{index}"] == written[f"{prefix}-{index}-core"], index
    assert written[f"{prefix}-0"] != written[f"{prefix}-2"]
