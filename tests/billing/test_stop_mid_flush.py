"""A worker stopped while its flush is writing a backlog writes all of it and stops promptly.

The housekeeping loops used to be cancelled wherever they were: a flush cancelled inside its
transaction left that connection holding its locks (SQLite's write lock, PostgreSQL's row locks
on the account), so the last flush of stop() waited on them, past any supervisor's patience, and
the worker was killed with its usage still in the spool (seen in `make bench`: stops of 15 s
ending in SIGKILL, and usage rows missing after them). Real database, both dialects."""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from dubhe.billing.meter import Reserved
from tests.billing.conftest import Ledger, admit, event

REQUESTS = 3000


async def test_stop_during_a_flush_writes_the_whole_backlog(ledger: Ledger) -> None:
    user_id = await ledger.user("metered")
    await ledger.credit(user_id, 100_000_000)
    meter = ledger.meter()
    try:
        for _ in range(REQUESTS):
            request_id, answer = await admit(meter, user_id, prompt_tokens=5, max_tokens=5)
            assert isinstance(answer, Reserved)
            meter.settle(event(user_id, request_id, 5, 5), wait=False)
        # The flush loop is inside a write now (what stop() must not cut short).
        for _ in range(2000):
            if meter._flush_lock.locked():
                break
            await asyncio.sleep(0.001)
        assert meter._flush_lock.locked()
    finally:
        await asyncio.wait_for(meter.stop(), 20)
    async with ledger.engine.connect() as connection:
        rows = (await connection.execute(
            text("SELECT COUNT(*) FROM usage_records WHERE user_id = :u"), {"u": user_id})).scalar()
    assert rows == REQUESTS
    account = await ledger.assert_reconciled(user_id)
    assert (account["tokens_reserved"], account["balance_reserved_uusd"]) == (0, 0)
