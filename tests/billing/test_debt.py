"""Usage beyond a hold is charged from the account; only what it cannot pay becomes a debt.

These drive the meter in this process, as two workers would (two ``Meter`` objects, each with
its own spool and leases), against a real database on each backend: the rules are exercised on
real SQL, locks and constraints, without an upstream. The end-to-end attack through ``dubhe
serve`` lives in ``test_overrun.py``.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from sqlalchemy import text, update

from dubhe.billing import queries, service
from dubhe.billing.meter import Denied, Meter, Reserved
from dubhe.billing.pricing import cost_uusd
from dubhe.models import Account
from dubhe.models.base import utcnow
from tests.billing.conftest import Ledger, admit, event


async def eventually_denied_for_debt(meter: Meter, user_id: int) -> Denied:
    """The floor the design promises: within about a second (epoch refresh), with margin."""
    deadline = time.monotonic() + 5
    while True:
        request_id, answer = await admit(meter, user_id)
        if isinstance(answer, Denied) and answer.debt_uusd > 0:
            return answer
        if isinstance(answer, Reserved):
            meter.settle(event(user_id, request_id, 10, 0), wait=True)
        assert time.monotonic() < deadline, "the worker kept admitting an account in debt"
        await asyncio.sleep(0.1)


async def test_overrun_beyond_the_lease_is_charged_from_the_account(ledger: Ledger) -> None:
    user_id = await ledger.user("metered")
    await ledger.credit(user_id, 1_000_000)  # $1; a lease takes a quarter of it
    model = ledger.catalog.models["dubhe-fast"]
    meter = ledger.meter()
    try:
        request_id, answer = await admit(meter, user_id)
        assert isinstance(answer, Reserved)
        # The upstream ignored its limit of 10: a million tokens, $0.60, more than the lease.
        settled = meter.settle(event(user_id, request_id, 10, 1_000_000), wait=True)
        assert settled is not None and settled.cost_uusd == cost_uusd(model, 10, 1_000_000)
        await meter.flush()
    finally:
        await meter.stop()
    record = await _usage(ledger, request_id)
    assert (record["cost_uusd"], record["uncollected_uusd"]) == (settled.cost_uusd, 0)
    account = await ledger.assert_reconciled(user_id)
    assert account["balance_uusd"] == 1_000_000 - settled.cost_uusd
    assert (account["debt_uusd"], account["balance_reserved_uusd"]) == (0, 0)


async def test_what_the_account_cannot_pay_is_a_debt_that_stops_every_worker(
    ledger: Ledger,
) -> None:
    user_id = await ledger.user("metered")
    await ledger.credit(user_id, 1_000)  # $0.001
    model = ledger.catalog.models["dubhe-fast"]
    first, second = ledger.meter(), ledger.meter()
    try:
        a_id, a = await admit(first, user_id)
        b_id, b = await admit(second, user_id)  # the other worker leases part of what is left
        assert isinstance(a, Reserved) and isinstance(b, Reserved)
        overrun = first.settle(event(user_id, a_id, 10, 100_000), wait=True)
        assert overrun is not None and overrun.cost_uusd == cost_uusd(model, 10, 100_000)
        await first.flush()
        account = await ledger.account(user_id)
        assert account["debt_uusd"] > 0 and account["epoch"] >= 1
        # The worker that saw the debt refuses at once, and says what is owed.
        denied = (await admit(first, user_id))[1]
        assert isinstance(denied, Denied) and denied.debt_uusd == account["debt_uusd"]
        assert "owes $" in service.debt_message(denied.debt_uusd)
        # The other one learns it from the epoch; its request in flight still settles.
        await eventually_denied_for_debt(second, user_id)
        assert second.settle(event(user_id, b_id, 10, 10), wait=True) is not None
        await second.flush()
        # Its lease returns what it did not use, and that repays part of the debt.
        await _until_no_open_leases(ledger, user_id)
        in_debt = await ledger.assert_reconciled(user_id)
        assert 0 < in_debt["debt_uusd"] < account["debt_uusd"]
        assert in_debt["balance_uusd"] == 0
        # The next credit repays the debt first; then both workers admit again.
        await ledger.credit(user_id, 1_000_000)
        repaid = await ledger.assert_reconciled(user_id)
        assert (repaid["debt_uusd"], repaid["debt_tokens"]) == (0, 0)
        assert repaid["balance_uusd"] == 1_000_000 - in_debt["debt_uusd"]
        await asyncio.sleep(1.1)  # past the second a debtor is refused from memory
        for meter in (first, second):
            request_id, answer = await admit(meter, user_id)
            assert isinstance(answer, Reserved), answer
            assert meter.settle(event(user_id, request_id, 10, 5), wait=True) is not None
    finally:
        await first.stop()
        await second.stop()
    final = await ledger.assert_reconciled(user_id)
    # Everything the usage cost was paid, the overrun included: credits in, minus what is left.
    async with ledger.engine.connect() as connection:
        charged = (await connection.execute(
            text("SELECT sum(cost_uusd) FROM usage_records WHERE user_id = :u"), {"u": user_id}
        )).scalar_one()
    assert 1_001_000 - final["balance_uusd"] == charged
    assert final["uncollected_uusd"] == account["debt_uusd"]
    assert (final["debt_uusd"], final["debt_tokens"]) == (0, 0)


async def test_a_grant_of_included_tokens_repays_a_debt_at_its_price(ledger: Ledger) -> None:
    user_id = await ledger.user("small")  # 100 included tokens, no balance
    meter = ledger.meter()
    try:
        request_id, answer = await admit(meter, user_id)
        assert isinstance(answer, Reserved)
        meter.settle(event(user_id, request_id, 10, 1_000), wait=True)
        await meter.flush()
    finally:
        await meter.stop()
    owing = await ledger.assert_reconciled(user_id)
    model = ledger.catalog.models["dubhe-fast"]
    # 100 included tokens paid the prompt and 90 completion tokens; 910 went unpaid.
    assert owing["debt_tokens"] == 910
    assert owing["debt_uusd"] == cost_uusd(model, 0, 910)
    assert owing["tokens_available"] == 0
    # The period ends; the renewal's 100 tokens go to the debt first.
    now = utcnow()
    async with ledger.engine.begin() as connection:
        await connection.execute(update(Account).where(Account.user_id == user_id).values(
            period_start=now - timedelta(days=31), period_end=now - timedelta(seconds=1)))
    async with ledger.sessionmaker() as session, session.begin():
        await queries.current_account(session, user_id=user_id, catalog=ledger.catalog, now=now)
    renewed = await ledger.assert_reconciled(user_id)
    assert renewed["debt_tokens"] == 810
    assert renewed["debt_uusd"] == owing["debt_uusd"] - owing["debt_uusd"] * 100 // 910
    assert renewed["tokens_available"] == 0
    await ledger.credit(user_id, 1_000_000)
    paid = await ledger.assert_reconciled(user_id)
    assert (paid["debt_uusd"], paid["debt_tokens"]) == (0, 0)
    assert paid["balance_uusd"] == 1_000_000 - renewed["debt_uusd"]


async def _usage(ledger: Ledger, request_id: str) -> dict[str, int]:
    async with ledger.engine.connect() as connection:
        row = await connection.execute(
            text("SELECT * FROM usage_records WHERE request_id = :r"), {"r": request_id})
        return dict(row.mappings().one())


async def _until_no_open_leases(ledger: Ledger, user_id: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        async with ledger.engine.connect() as connection:
            open_leases = (await connection.execute(
                text("SELECT count(*) FROM leases WHERE user_id = :u AND status = 'open'"),
                {"u": user_id})).scalar_one()
        if open_leases == 0:
            return
        assert time.monotonic() < deadline, "the leases were not returned"
        await asyncio.sleep(0.1)
