"""A lease that retires while a refill of it is in its transaction must not take the request.

The idle housekeeping (every 0.25 s) retires a lease no request has used for
``lease_idle_seconds`` and closes it, returning everything it did not use to the account. A
request that found the lease short at that moment is refilling it: the refill grows the lease,
commits, and used to admit the request against it. The close then returned that request's hold
too, and another worker spent it again: the account paid for more than it had (the CI run of
2026-12-02 served 17 requests of an account that had credit for 12, ``test_no_false_402``).

Two meters in this process, as two workers; a real database on each backend. The refill's
transaction is made slow (it sleeps after growing the lease) so that the meter's own
housekeeping runs inside it, as it does on a busy machine.

Each case now has two defences, each enough alone: the first, the refill done again into a new
lease and the idle close kept off an account being admitted (its lock); the second, the renewal
that retires a lease it finds closed and a lease admitting only until ``ADMIT_SHARE`` of its
deadline. Each test fails with both of its defences removed (160 tokens served of 100; the
closed lease still admitting), not with one.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from sqlalchemy import text

from dubhe.billing.meter import Denied, Meter, Reserved
from dubhe.billing.repository import BillingRepository
from tests.billing.conftest import Ledger, admit, event

INCLUDED = 100  # the "small" plan's tokens (IN_PROCESS_PLANS, lease_idle_seconds = 0.5)


async def test_a_lease_retired_during_its_refill_holds_nothing_the_account_can_spend_again(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    user_id = await ledger.user("small")
    grow_lease = BillingRepository.grow_lease
    grown: list[int] = []

    async def slow_grow(self: BillingRepository, lease_id: int, tokens: int, uusd: int) -> Any:
        answer = await grow_lease(self, lease_id, tokens, uusd)
        grown.append(lease_id)
        await asyncio.sleep(1)  # the idle housekeeping retires the lease meanwhile
        return answer

    monkeypatch.setattr(BillingRepository, "grow_lease", slow_grow)
    a, b = ledger.meter(), ledger.meter()
    try:
        first, answer = await admit(a, user_id, prompt_tokens=5, max_tokens=5)
        assert isinstance(answer, Reserved)  # the lease took a quarter: 25 tokens
        a.settle(event(user_id, first, 5, 5), wait=True)
        # Needs 60: more than the lease's 15 free, so the lease is refilled (and grown).
        second, answer = await admit(a, user_id, prompt_tokens=10, max_tokens=50)
        assert grown, "the request did not refill the lease it had"
        assert isinstance(answer, Reserved) and not answer.admission.clamped
        # Time for the housekeeping to close what it retired: had it retired the lease the
        # request now holds, its credit would be back in the account for the other worker.
        await asyncio.sleep(1)
        # The other worker asks for all the rest the account could have.
        third, other = await admit(b, user_id, prompt_tokens=5, max_tokens=85)
        a.settle(event(user_id, second, 10, 50), wait=True)
        used = 10 + 60
        if isinstance(other, Reserved):
            b.settle(event(user_id, third, 5, other.admission.max_tokens), wait=True)
            used += 5 + other.admission.max_tokens
        else:
            assert isinstance(other, Denied)
    finally:
        await a.stop()
        await b.stop()
    assert used <= INCLUDED, f"served {used} tokens of an account that had {INCLUDED}"
    account = await ledger.assert_reconciled(user_id)
    assert (account["debt_tokens"], account["debt_uusd"], account["uncollected_uusd"]) == (0, 0, 0)
    assert account["tokens_available"] == INCLUDED - used
    async with ledger.engine.connect() as connection:
        open_leases = (await connection.execute(text(
            "SELECT count(*) FROM leases WHERE user_id = :u AND status = 'open'"),
            {"u": user_id})).scalar_one()
    assert open_leases == 0


async def test_a_lease_its_renewal_finds_closed_admits_nothing_more(ledger: Ledger) -> None:
    """A worker whose lease another worker's sweep closed (its renewals had stopped reaching
    the database) learns it at its next renewal and takes a new lease: the closed one's credit,
    requests in flight included, is back in the account, and was never spent twice."""
    user_id = await ledger.user("small")
    catalog = dataclasses.replace(ledger.catalog, reservation_ttl_seconds=1.5)  # renewed each 0.5 s
    a = Meter(ledger.sessionmaker, catalog, ledger.tmp / "spool-a")
    a.start()
    try:
        first, answer = await admit(a, user_id, prompt_tokens=5, max_tokens=5)
        assert isinstance(answer, Reserved)
        async with ledger.engine.connect() as connection:
            lease_id = (await connection.execute(text(
                "SELECT id FROM leases WHERE user_id = :u AND status = 'open'"),
                {"u": user_id})).scalar_one()
        # Closed as a sweep closes a lease whose worker went quiet: all it did not use (this
        # request's hold too: nothing is flushed yet) back to the account.
        assert await a._close(lease_id, user_id)
        await asyncio.sleep(1.5)  # three renewals
        second, answer = await admit(a, user_id, prompt_tokens=5, max_tokens=5)
        assert isinstance(answer, Reserved)
        async with ledger.engine.connect() as connection:
            leases = (await connection.execute(text(
                "SELECT id, status FROM leases WHERE user_id = :u ORDER BY id"),
                {"u": user_id})).all()
        assert [status for _, status in leases] == ["closed", "open"], leases
        a.settle(event(user_id, first, 5, 5), wait=True)
        a.settle(event(user_id, second, 5, 5), wait=True)
    finally:
        await a.stop()
    account = await ledger.assert_reconciled(user_id)
    # Both requests were charged: the first from the account, its lease being closed.
    assert account["tokens_available"] == INCLUDED - 20
