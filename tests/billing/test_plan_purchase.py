"""Buying a plan from the balance, downgrading, and the statement's running balance (both
databases): what /api/billing/plan and the billing page do, driven through the service the way
the routes call it, against the running server's database."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import text

from dubhe.billing.queries import BillingQueries
from dubhe.billing.repository import BillingRepository
from dubhe.billing.service import PlanChange, choose_plan
from dubhe.database import create_sessionmaker
from dubhe.errors import DubheError, InsufficientQuota
from tests.billing.conftest import Billing

PRO_PRICE_UUSD = 29_000_000


async def choose(billing: Billing, user_id: int, plan: str) -> PlanChange:
    async with create_sessionmaker(billing.engine)() as session, session.begin():
        change, _, _ = await choose_plan(
            BillingRepository.from_session(session), user_id=user_id, plan_code=plan,
            catalog=billing.catalog, now=datetime.now(UTC), ref=f"test-{secrets.token_hex(8)}")
    return change


async def ledger_kinds(billing: Billing, user_id: int) -> list[str]:
    async with billing.engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT kind FROM ledger_entries WHERE user_id = :u ORDER BY id"), {"u": user_id})
        return [row[0] for row in rows]


def visible_models(billing: Billing, key: str) -> set[str]:
    response = httpx.get(billing.server.base_url + "/models",
                         headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 200, response.text
    return {model["id"] for model in response.json()["data"]}


async def test_racing_upgrades_pay_once_and_start_a_new_period(billing: Billing) -> None:
    key, user_id = await billing.new_account("free")
    await billing.credit(user_id, 40_000_000)  # $40: enough for Pro once, not twice
    before = await billing.account(user_id)

    # A double (quadruple) click: the first pays; the others find the account on Pro already,
    # which is choosing the current plan again, not a second purchase.
    results = await asyncio.gather(*(choose(billing, user_id, "pro") for _ in range(4)))

    assert sorted(results) == ["unchanged", "unchanged", "unchanged", "upgraded"]
    account = await billing.assert_consistent(user_id)
    assert account["plan_code"] == "pro"
    assert account["balance_uusd"] == 40_000_000 - PRO_PRICE_UUSD
    assert account["tokens_available"] == billing.catalog.plans["pro"].included_tokens
    assert account["period_start"] > before["period_start"]
    assert (await ledger_kinds(billing, user_id)).count("plan_payment") == 1
    # Every worker's key cache sees the new plan within a second or so.
    deadline = time.monotonic() + 5
    while "dubhe-reasoning" not in visible_models(billing, key):
        assert time.monotonic() < deadline, "the upgrade did not reach /v1/models"
        await asyncio.sleep(0.1)


async def test_an_upgrade_the_balance_cannot_cover_is_402_and_changes_nothing(
    billing: Billing,
) -> None:
    _, user_id = await billing.new_account("free")
    await billing.credit(user_id, PRO_PRICE_UUSD - 1)  # one micro-dollar short
    kinds = await ledger_kinds(billing, user_id)
    before = await billing.account(user_id)

    with pytest.raises(InsufficientQuota) as refused:
        await choose(billing, user_id, "pro")

    assert refused.value.status_code == 402
    assert "29.000000" in refused.value.message and "28.999999" in refused.value.message
    assert await ledger_kinds(billing, user_id) == kinds
    assert await billing.account(user_id) == before


async def test_a_downgrade_waits_for_the_period_end_and_can_be_cancelled(
    billing: Billing,
) -> None:
    _, user_id = await billing.new_account("pro")
    await billing.credit(user_id, 5_000_000)
    before = await billing.account(user_id)

    assert await choose(billing, user_id, "starter") == "scheduled"
    waiting = await billing.account(user_id)
    assert (waiting["plan_code"], waiting["next_plan_code"]) == ("pro", "starter")
    assert waiting["period_end"] == before["period_end"]
    assert waiting["balance_uusd"] == before["balance_uusd"]  # downgrades cost nothing

    assert await choose(billing, user_id, "pro") == "unchanged"
    cancelled = await billing.assert_consistent(user_id)
    assert (cancelled["plan_code"], cancelled["next_plan_code"]) == ("pro", None)


async def test_unknown_plans_are_refused_with_the_field_named(billing: Billing) -> None:
    _, user_id = await billing.new_account("free")
    with pytest.raises(DubheError) as refused:
        await choose(billing, user_id, "platinum")
    assert (refused.value.status_code, refused.value.param) == (422, "plan")


async def test_the_statement_steps_back_from_the_balance_across_pages(billing: Billing) -> None:
    key, user_id = await billing.new_account("small")  # 100 included tokens, then the balance
    for amount in (1_250_000, 3_000_001, 700_000):
        await billing.credit(user_id, amount)
    for _ in range(3):  # spend included tokens, then balance (lease, settle, release entries)
        response = httpx.post(billing.server.base_url + "/chat/completions", json={
            "model": "dubhe-fast", "messages": [{"role": "user", "content": "hi [[sim:tokens=80]]"}],
        }, headers={"authorization": f"Bearer {key}"}, timeout=30)
        assert response.status_code == 200, response.text
    account = await billing.assert_consistent(user_id)
    balance = account["balance_uusd"] + account["balance_reserved_uusd"]
    assert balance < 1_250_000 + 3_000_001 + 700_000  # the requests spent some of it

    lines = []
    before = None
    async with create_sessionmaker(billing.engine)() as session:
        queries = BillingQueries.from_session(session)
        while True:
            page, before = await queries.statement_page(user_id, limit=2, before=before)
            lines.extend(page)
            if before is None:
                break

    assert lines[0].balance_after_uusd == balance
    for newer, older in zip(lines, lines[1:], strict=False):
        assert newer.id > older.id
        assert newer.balance_after_uusd - newer.amount_uusd == older.balance_after_uusd
    assert lines[-1].balance_after_uusd - lines[-1].amount_uusd == 0
    assert not {line.kind for line in lines} & {"lease", "release"}
    assert {"grant", "credit", "settle"} <= {line.kind for line in lines}
    assert sum(line.amount_uusd for line in lines) == balance
