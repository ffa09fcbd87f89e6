"""A worker stopped while its flush is writing a backlog lets that write finish (its loops end
between two jobs, none is cancelled), writes all of it, and stops promptly.

The housekeeping loops used to be cancelled wherever they were. A transaction cancelled inside
it can leave its connection holding its locks (SQLite's write lock, PostgreSQL's row locks on the
account), and the last flush of stop() then waits on them; `make bench` saw stops of 15 s ending
in SIGKILL with usage left in the spool. That hang is not reproduced here: this checks that no
loop is cancelled any more, and that nothing is lost. Real database, both dialects."""

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
    assert not any(task.cancelled() for task in meter._tasks)
    async with ledger.engine.connect() as connection:
        rows = (await connection.execute(
            text("SELECT COUNT(*) FROM usage_records WHERE user_id = :u"), {"u": user_id})).scalar()
    assert rows == REQUESTS
    account = await ledger.assert_reconciled(user_id)
    assert (account["tokens_reserved"], account["balance_reserved_uusd"]) == (0, 0)
