"""Order of spending, plan boundaries, renewal, and what a disconnect costs."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import aiohttp
import httpx
from sqlalchemy import select, text, update

from dubhe.billing.pricing import split_cost
from dubhe.models import Account
from tests.billing.conftest import POCKET_TOKENS, Billing, hold_prompt
from tests.conftest import Sim, wait_for_row


def ask(billing: Billing, key: str, content: str, **extra: object) -> httpx.Response:
    body = {"model": "dubhe-fast", "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(
        billing.server.base_url + "/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


async def test_included_tokens_are_spent_before_balance(billing: Billing) -> None:
    key, user_id = await billing.new_account("small")  # 100 included tokens
    await billing.credit(user_id, 1_000_000)  # $1
    model = billing.catalog.models["dubhe-fast"]

    first = ask(billing, key, "one [[sim:tokens=20]]")
    used = first.json()["usage"]["total_tokens"]
    assert used < 100
    assert first.headers["x-dubhe-cost-usd"] == "0.000000"
    assert first.headers["x-dubhe-tokens-remaining"] == str(100 - used)
    assert first.headers["x-dubhe-balance-usd"] == "1.000000"

    second = ask(billing, key, "two [[sim:tokens=200]]")
    usage = second.json()["usage"]
    expected = split_cost(model, usage["prompt_tokens"], usage["completion_tokens"], 100 - used)
    assert expected > 0
    assert second.headers["x-dubhe-cost-usd"] == f"0.{expected:06d}"
    assert second.headers["x-dubhe-tokens-remaining"] == "0"
    assert second.headers["x-dubhe-balance-usd"] == f"0.{1_000_000 - expected:06d}"
    record = await wait_for_row(
        billing.engine, "SELECT * FROM usage_records WHERE request_id = :r",
        r=second.headers["x-request-id"],
    )
    assert (record["tokens_from_plan"], record["cost_uusd"]) == (100 - used, expected)
    account = await billing.assert_consistent(user_id)
    assert account["balance_uusd"] == 1_000_000 - expected


async def test_balance_does_not_open_models_outside_the_plan(billing: Billing) -> None:
    free_key, free_id = await billing.new_account("free")
    await billing.credit(free_id, 50_000_000)  # $50 of balance
    response = httpx.post(
        billing.server.base_url + "/chat/completions",
        json={"model": "dubhe-code", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {free_key}"},
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    account = await billing.assert_consistent(free_id)
    assert account["balance_uusd"] == 50_000_000


async def test_not_even_the_prompt_is_402_with_what_is_left(billing: Billing) -> None:
    key, user_id = await billing.new_account("metered")  # nothing included, no balance
    response = ask(billing, key, "hello")
    assert response.status_code == 402
    error = response.json()["error"]
    assert error["param"] is None and "0 included tokens and $0.000000 are available" in error["message"]
    await billing.assert_consistent(user_id)


async def test_renewal_raced_by_100_requests_grants_once(billing: Billing) -> None:
    key, user_id = await billing.new_account("pocket")
    assert ask(billing, key, "spend some [[sim:tokens=30]]").status_code == 200
    await billing.assert_consistent(user_id)  # the worker has returned its lease
    now = datetime.now(UTC)
    async with billing.engine.begin() as connection:
        # The period ended a second ago (the clock moves; no counter is touched).
        await connection.execute(
            update(Account)
            .where(Account.user_id == user_id)
            .values(period_start=now - timedelta(days=31), period_end=now - timedelta(seconds=1))
        )
    # Each racer waits for its first byte, so none settles (returning the part of its hold the
    # simulator does not charge) before the race is decided.
    content = "x [[sim:tokens=1]] [[sim:delay_ms=5000]]"
    body = {"model": "dubhe-fast", "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=120), timeout=60) as client:
        responses = await asyncio.gather(*(
            client.post(billing.server.base_url + "/chat/completions", json=body,
                        headers={"authorization": f"Bearer {key}"})
            for _ in range(100)
        ))
    statuses = [r.status_code for r in responses]
    # The included tokens renewed once: each request holds its prompt's bound plus one token.
    per_request = hold_prompt(body) + 1
    assert statuses.count(200) == POCKET_TOKENS // per_request
    assert set(statuses) <= {200, 402}
    async with billing.engine.connect() as connection:
        periods = (await connection.execute(
            text("SELECT count(*) FROM subscription_periods WHERE user_id = :u"), {"u": user_id}
        )).scalar_one()
        grants = (await connection.execute(
            text("SELECT count(*) FROM ledger_entries WHERE user_id = :u AND kind = 'grant'"), {"u": user_id}
        )).scalar_one()
        expiries = (await connection.execute(
            text("SELECT count(*) FROM ledger_entries WHERE user_id = :u AND kind = 'expire'"), {"u": user_id}
        )).scalar_one()
    assert (periods, grants, expiries) == (2, 2, 1)
    await billing.assert_consistent(user_id)
    async with billing.engine.connect() as connection:
        period_end = (await connection.execute(
            select(Account.period_end).where(Account.user_id == user_id)
        )).scalar_one()
    assert period_end > now


async def test_client_cut_pays_for_what_was_generated(billing: Billing, sims: dict[str, Sim]) -> None:
    key, user_id = await billing.new_account("metered")
    await billing.credit(user_id, 2_000_000)
    paced = sims["paced"]  # 40 tokens a second
    disconnected = paced.stats()["disconnected"]
    body = {
        "model": "dubhe-code",
        "messages": [{"role": "user", "content": "long [[sim:tokens=400]]"}],
        "stream": True,
    }
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            billing.server.base_url + "/chat/completions", json=body,
            headers={"authorization": f"Bearer {key}"},
        )
        request_id = response.headers["x-request-id"]
        seen = 0
        async for line in response.content:
            seen += line.startswith(b"data: ")
            if seen == 8:
                break
        response.close()
    deadline = time.monotonic() + 3
    while paced.stats()["disconnected"] == disconnected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert paced.stats()["disconnected"] == disconnected + 1, "the upstream kept generating"

    record = await wait_for_row(
        billing.engine, "SELECT * FROM usage_records WHERE request_id = :r", r=request_id
    )
    assert record["outcome"] == "client_cancelled"
    # Seven tokens reached the client (after the role chunk); a few more may have been in flight.
    assert 7 <= record["completion_tokens"] < 40
    model = billing.catalog.models["dubhe-code"]
    expected = split_cost(model, record["prompt_tokens"], record["completion_tokens"], 0)
    assert record["cost_uusd"] == expected
    account = await billing.assert_consistent(user_id)
    assert account["balance_uusd"] == 2_000_000 - expected
    assert account["balance_reserved_uusd"] == 0


async def test_account_api_counts_leased_credit_as_remaining(billing: Billing) -> None:
    key, user_id = await billing.new_account("pocket")
    root = billing.server.base_url.removesuffix("/v1")
    # The worker builds its web app on the first request outside /v1: done before the request
    # below, so the read that follows it comes well within the lease's 1.5 s of idle.
    assert httpx.get(root + "/api/account", headers={"authorization": f"Bearer {key}"},
                     timeout=30).status_code == 200
    response = ask(billing, key, "hi [[sim:tokens=10]]")
    used = response.json()["usage"]["total_tokens"]
    await wait_for_row(billing.engine, "SELECT id FROM usage_records WHERE request_id = :r",
                       r=response.headers["x-request-id"])  # flushed
    account = httpx.get(root + "/api/account", headers={"authorization": f"Bearer {key}"}).json()
    # The worker still holds the rest of its lease (returned after 1.5 s idle): unspent all the same.
    assert account["tokens_reserved"] == POCKET_TOKENS - used
    assert account["tokens_remaining"] == POCKET_TOKENS - used
    await billing.assert_consistent(user_id)
