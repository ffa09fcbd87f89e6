"""The /api JSON API: the caller's account, usage and ledger, and nobody else's."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from dubhe.billing.pricing import format_usd
from tests.recharge.conftest import Shop, assert_ledger_matches, user_id_of


async def fetch_all(engine: AsyncEngine, sql: str, **params: object) -> list[Any]:
    async with engine.connect() as connection:
        return list((await connection.execute(text(sql), params)).mappings().all())


def _client(shop: Shop, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=shop.root, headers={"authorization": f"Bearer {key}"}, timeout=30)


async def _chat(client: httpx.AsyncClient, model: str, tokens: int) -> None:
    answer = await client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": f"hi [[sim:tokens={tokens}]]"}],
    })
    assert answer.status_code == 200, answer.text


async def test_account(shop: Shop, shop_db: AsyncEngine) -> None:
    email, key = shop.new_user("starter")
    shop.cli("balance", "add", email, "4.5")
    async with _client(shop, key) as client:
        answer = await client.get("/api/account")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"].startswith("req_")
    account = answer.json()
    assert account["plan"] == "starter" and account["plan_name"] == "Starter"
    assert account["next_plan"] is None
    assert account["tokens_included"] == account["tokens_remaining"] == 1_000_000
    assert account["tokens_reserved"] == 0
    assert account["balance_usd"] == "4.500000" and account["balance_reserved_usd"] == "0.000000"
    start = datetime.fromisoformat(account["period_start"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(account["period_end"].replace("Z", "+00:00"))
    assert start <= datetime.now(UTC) < end
    await assert_ledger_matches(shop_db, await user_id_of(shop_db, email))


async def test_usage_and_ledger_are_the_callers_own(shop: Shop, shop_db: AsyncEngine) -> None:
    email, key = shop.new_user("pro")
    other_email, other_key = shop.new_user("pro")
    codes = shop.cli("codes", "create", "--usd", "1.5", "--count", "4").stdout.split()
    async with _client(shop, key) as client:
        for _ in range(3):
            await _chat(client, "dubhe-fast", 7)
        await _chat(client, "dubhe-vision", 5)
        for code in codes:
            assert (await client.post("/api/redeem", json={"code": code})).status_code == 200
        # Usage reaches the database with the worker's next spool flush (every 100 ms).
        deadline = time.monotonic() + 5
        while True:
            usage = (await client.get("/api/usage", params={"days": 30})).json()
            if sum(row["requests"] for row in usage["data"]) >= 4 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        first = (await client.get("/api/ledger", params={"limit": 3})).json()
        pages, before = [first], first["next_before"]
        while before is not None:
            page = (await client.get("/api/ledger", params={"limit": 3, "before": before})).json()
            pages.append(page)
            before = page["next_before"]
        too_many = await client.get("/api/ledger", params={"limit": 201})
        bad_days = await client.get("/api/usage", params={"days": 0})
    async with _client(shop, other_key) as other:
        await _chat(other, "dubhe-fast", 3)
        deadline = time.monotonic() + 5
        while True:
            other_usage = (await other.get("/api/usage")).json()
            if other_usage["data"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        other_ledger = (await other.get("/api/ledger", params={"limit": 200})).json()

    today = datetime.now(UTC).date().isoformat()
    rows = {(row["date"], row["model"]): row for row in usage["data"]}
    assert set(rows) == {(today, "dubhe-fast"), (today, "dubhe-vision")}
    fast = rows[(today, "dubhe-fast")]
    assert fast["requests"] == 3 and fast["completion_tokens"] == 21 and fast["prompt_tokens"] > 0
    assert fast["cost_usd"] == "0.000000"  # the plan's included tokens paid
    assert rows[(today, "dubhe-vision")]["requests"] == 1
    assert [(row["model"], row["requests"]) for row in other_usage["data"]] == [("dubhe-fast", 1)]

    # Every ledger entry of the user, exactly once, newest first, in full pages but the last.
    # (Compared up to the first page's newest entry: the worker may append more meanwhile.)
    user_id = await user_id_of(shop_db, email)
    entries = [entry for page in pages for entry in page["data"]]
    ids = [entry["id"] for entry in entries]
    stored = await fetch_all(shop_db, "SELECT id, tokens_available, balance_uusd FROM ledger_entries "
                                      "WHERE user_id = :u AND id <= :top ORDER BY id DESC", u=user_id, top=ids[0])
    assert ids == [row["id"] for row in stored]
    assert len(ids) >= 5  # the first grant and four redemptions, at least
    assert all(len(page["data"]) == 3 for page in pages[:-1]) and 1 <= len(pages[-1]["data"]) <= 3
    assert pages[-1]["next_before"] is None
    assert entries[-1]["kind"] == "grant" and entries[-1]["tokens_available"] == 10_000_000
    assert [entry["balance_usd"] for entry in entries if entry["kind"] == "redeem"] == ["1.500000"] * 4
    assert [entry["tokens_available"] for entry in entries] == [row["tokens_available"] for row in stored]
    assert [entry["balance_usd"] for entry in entries] == [format_usd(row["balance_uusd"]) for row in stored]
    await assert_ledger_matches(shop_db, user_id)
    # The other user's ledger shares nothing with it.
    other_id = await user_id_of(shop_db, other_email)
    other_ids = [entry["id"] for entry in other_ledger["data"]]
    other_stored = await fetch_all(shop_db, "SELECT id FROM ledger_entries WHERE user_id = :u AND id <= :top "
                                            "ORDER BY id DESC", u=other_id, top=other_ids[0])
    assert other_ids == [row["id"] for row in other_stored]
    assert not set(ids) & {entry["id"] for entry in other_ledger["data"]}
    assert other_ledger["next_before"] is None
    await assert_ledger_matches(shop_db, other_id)
    assert too_many.status_code == 422 and too_many.json()["error"]["param"] == "limit"
    assert bad_days.status_code == 422 and bad_days.json()["error"]["param"] == "days"


async def test_errors_are_json_envelopes(shop: Shop) -> None:
    _, key = shop.new_user()
    async with _client(shop, key) as client:
        unknown = await client.get("/api/nothing-here")
        elsewhere = await client.get("/dashboard")
        wrong_method = await client.delete("/api/account")
        not_json = await client.post("/api/redeem", content=b"{nope", headers={"content-type": "application/json"})
        no_key = await client.get("/api/account", headers={"authorization": ""})
        bad_key = await client.get("/api/account", headers={"authorization": "Bearer sk-dubhe-nope"})
    for answer, status, code in [(unknown, 404, "unknown_url"), (elsewhere, 404, "unknown_url"),
                                 (wrong_method, 405, "method_not_allowed"), (not_json, 400, "invalid_json"),
                                 (no_key, 401, "missing_api_key"), (bad_key, 401, "invalid_api_key")]:
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["x-request-id"].startswith("req_")
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
