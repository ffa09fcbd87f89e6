"""Redemption codes: minted by the CLI, redeemed by the CLI or /api, each once, ever."""

from __future__ import annotations

import asyncio
import re

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import fetch_one
from tests.recharge.conftest import Shop, assert_ledger_matches, user_id_of

CODE = re.compile(r"DUBHE(-[A-HJ-NP-Z2-9]{4}){4}")


async def test_codes_create_prints_only_codes_and_stores_only_hashes(shop: Shop, shop_db: AsyncEngine) -> None:
    result = shop.cli("codes", "create", "--usd", "7.25", "--count", "3")
    codes = result.stdout.splitlines()
    assert len(codes) == 3 and len(set(codes)) == 3
    assert all(CODE.fullmatch(code) for code in codes), codes
    for code in codes:
        assert await fetch_one(shop_db, "SELECT id FROM redemption_codes WHERE code_hash = :c", c=code) is None
    row = await fetch_one(shop_db, "SELECT count(*) AS n, min(amount_uusd) AS lo, max(amount_uusd) AS hi "
                                   "FROM redemption_codes WHERE amount_uusd = 7250000")
    assert row["n"] >= 3 and row["lo"] == row["hi"] == 7_250_000


async def test_redeem_with_the_cli_credits_once(shop: Shop, shop_db: AsyncEngine) -> None:
    email, _ = shop.new_user()
    code = shop.cli("codes", "create", "--usd", "12.5").stdout.strip()
    shop.cli("codes", "redeem", email, code.lower().replace("-", " "))  # case and dashes are forgiven
    again = shop.cli("codes", "redeem", email, code, check=False)
    assert again.returncode != 0 and again.stdout == ""
    assert "already been redeemed" in again.stderr and len(again.stderr.splitlines()) == 1
    assert shop.show(email)["balance_usd"] == "12.500000"
    user_id = await user_id_of(shop_db, email)
    counters = await assert_ledger_matches(shop_db, user_id)
    assert counters["balance_uusd"] == 12_500_000
    row = await fetch_one(shop_db, "SELECT redeemed_by, redeemed_at FROM redemption_codes WHERE redeemed_by = :u", u=user_id)
    assert row is not None and row["redeemed_at"] is not None


async def test_redeem_through_the_api(shop: Shop, shop_db: AsyncEngine) -> None:
    email, key = shop.new_user()
    code = shop.cli("codes", "create", "--usd", "3").stdout.strip()
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=shop.root, headers=headers) as client:
        first = await client.post("/api/redeem", json={"code": code})
        assert first.status_code == 200, first.text
        assert first.json() == {"credited_usd": "3.000000", "balance_usd": "3.000000"}
        again = await client.post("/api/redeem", json={"code": code})
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "code_already_redeemed"
        unknown = await client.post("/api/redeem", json={"code": "DUBHE-AAAA-BBBB-CCCC-DDDD"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "invalid_code"
        garbage = await client.post("/api/redeem", json={"code": "hello"})
        assert garbage.status_code == 404 and garbage.json()["error"]["code"] == "invalid_code"
        missing = await client.post("/api/redeem", json={})
        assert missing.status_code == 422
        assert missing.json()["error"] == {
            "message": "code is required.", "type": "invalid_request_error", "param": "code",
            "code": "missing_required_parameter",
        }
        anonymous = await client.post("/api/redeem", json={"code": code}, headers={"authorization": ""})
        assert anonymous.status_code == 401
    assert shop.show(email)["balance_usd"] == "3.000000"
    await assert_ledger_matches(shop_db, await user_id_of(shop_db, email))


async def test_a_code_redeemed_20_times_at_once_credits_once(shop: Shop, shop_db: AsyncEngine) -> None:
    users = [shop.new_user() for _ in range(2)]
    code = shop.cli("codes", "create", "--usd", "50").stdout.strip()
    async with httpx.AsyncClient(base_url=shop.root, timeout=30) as client:
        answers = await asyncio.gather(*(
            client.post("/api/redeem", json={"code": code},
                        headers={"authorization": f"Bearer {users[i % 2][1]}"})
            for i in range(20)
        ))
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200] + [409] * 19, [a.text for a in answers if a.status_code not in (200, 409)]
    user_ids = [await user_id_of(shop_db, email) for email, _ in users]
    balances = [(await assert_ledger_matches(shop_db, user_id))["balance_uusd"] for user_id in user_ids]
    assert sorted(balances) == [0, 50_000_000]
    ids = ", ".join(map(str, user_ids))
    row = await fetch_one(shop_db, f"SELECT count(*) AS n FROM ledger_entries WHERE kind = 'redeem' AND user_id IN ({ids})")
    assert row["n"] == 1
