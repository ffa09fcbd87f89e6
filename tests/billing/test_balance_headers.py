"""The balance a response reports (``x-dubhe-tokens-remaining``): the account as the worker last
read it, less what the worker settled since. A flush that commits while a read is in flight
must not make spent credit show again (CI saw "34 left" on an account with none).

Driven in this process against a real database on each backend, the interleaving forced."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.billing.meter import Reserved
from tests.billing.conftest import Ledger, admit, event


async def test_a_flush_that_overtakes_a_read_of_the_account_does_not_show_spent_credit(
    ledger: Ledger,
) -> None:
    user_id = await ledger.user("small")  # 100 included tokens; a lease takes 25 of them
    meter = ledger.meter()
    try:
        request_id, answer = await admit(meter, user_id, prompt_tokens=5, max_tokens=5)
        assert isinstance(answer, Reserved)
        first = meter.settle(event(user_id, request_id, 5, 5), wait=True)
        assert first is not None and first.balance.tokens_remaining == 90

        # The once-a-second read of the account takes its snapshot before the flush of that
        # request commits; the flush commits and strikes the request off what is unwritten
        # before the read's answer is applied.
        reads = meter._read_sessionmaker

        @asynccontextmanager
        async def overtaken() -> AsyncIterator[AsyncSession]:
            async with reads() as session:
                yield session
            await meter.flush()

        meter._read_sessionmaker = overtaken  # type: ignore[assignment]
        await meter._refresh_epochs()
        meter._read_sessionmaker = reads

        request_id, answer = await admit(meter, user_id, prompt_tokens=5, max_tokens=5)
        assert isinstance(answer, Reserved)
        # (Served from the lease's free tokens: no refill reads the account again.)
        second = meter.settle(event(user_id, request_id, 5, 5), wait=True)
        assert second is not None and second.balance.tokens_remaining == 80
        # An undisturbed read agrees.
        await meter.flush()
        await meter._refresh_epochs()
        request_id, answer = await admit(meter, user_id, prompt_tokens=5, max_tokens=5)
        assert isinstance(answer, Reserved)
        third = meter.settle(event(user_id, request_id, 5, 5), wait=True)
        assert third is not None and third.balance.tokens_remaining == 70
    finally:
        await meter.stop()
    account = await ledger.assert_reconciled(user_id)
    assert account["tokens_available"] + account["tokens_reserved"] == 70
