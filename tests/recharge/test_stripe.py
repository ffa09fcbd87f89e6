"""Stripe: Checkout sessions are created with the right charge; the signed webhook applies once."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import Server, fetch_one
from tests.recharge.conftest import Shop, assert_ledger_matches, checkout_event, user_id_of


async def _deliver(client: httpx.AsyncClient, shop: Shop, payload: bytes,
                   signature: str | None = None) -> httpx.Response:
    headers = {"content-type": "application/json",
               "stripe-signature": signature if signature is not None else shop.sign(payload)}
    return await client.post(f"{shop.root}/api/stripe/webhook", content=payload, headers=headers)


async def _balance(shop: Shop, key: str) -> str:
    async with httpx.AsyncClient(base_url=shop.root, headers={"authorization": f"Bearer {key}"}) as client:
        answer = await client.get("/api/account")
    assert answer.status_code == 200, answer.text
    return answer.json()["balance_usd"]  # type: ignore[no-any-return]


@asynccontextmanager
async def _dashboard(root: str, email: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client logged in to the dashboard as ``email``, sending its CSRF token: starting a
    checkout needs a session, not an API key. The shop's public URL is https, so its cookies are
    Secure and no client keeps them over this test's plain http: they are sent by hand."""
    async with httpx.AsyncClient(base_url=root) as client:
        await _log_in(client, email)
        yield client


async def _log_in(client: httpx.AsyncClient, email: str) -> None:
    session = await client.get("/api/auth/session")
    cookies = dict(session.cookies)
    client.headers["x-csrf-token"] = session.json()["csrf_token"]
    client.headers["cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    login = await client.post("/api/auth/login",
                              json={"email": email, "password": "correct-horse-battery"})
    assert login.status_code == 200, login.text
    cookies.update(login.cookies)
    client.headers["cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())


async def _count(db: AsyncEngine, sql: str, **params: object) -> int:
    return int((await fetch_one(db, sql, **params))["n"])


async def test_checkout_for_a_topup_sends_stripe_the_charge(shop: Shop) -> None:
    email, key = shop.new_user()
    before = len(shop.fake_stripe.requests)
    async with httpx.AsyncClient(base_url=shop.root, headers={"authorization": f"Bearer {key}"}) as client:
        by_key = await client.post("/api/billing/checkout", json={"purpose": "topup", "amount_usd": "12.34"})
    assert by_key.status_code == 401  # a leaked key cannot start a payment
    async with _dashboard(shop.root, email) as client:
        created = await client.post("/api/billing/checkout", json={"purpose": "topup", "amount_usd": "12.34"})
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["id"].startswith("cs_test_") and body["url"].endswith(body["id"])
    [sent] = shop.fake_stripe.requests[before:]
    assert sent["path"] == "/v1/checkout/sessions"
    assert sent["headers"]["Authorization"] == f"Bearer {shop.server.env['DUBHE_STRIPE_SECRET_KEY']}"
    params = sent["params"]
    assert params["mode"] == "payment"
    assert params["line_items[0][price_data][currency]"] == "usd"
    assert params["line_items[0][price_data][unit_amount]"] == "1234"
    assert params["line_items[0][quantity]"] == "1"
    assert params["metadata[purpose]"] == "topup"
    assert params["metadata[amount_uusd]"] == "12340000"
    assert params["metadata[user_id]"] == params["client_reference_id"]
    assert params["success_url"].startswith("https://dubhe.example.com/")
    assert params["cancel_url"].startswith("https://dubhe.example.com/")


async def test_checkout_for_a_plan_charges_its_price(shop: Shop) -> None:
    email, _ = shop.new_user("starter")
    before = len(shop.fake_stripe.requests)
    async with _dashboard(shop.root, email) as client:
        created = await client.post("/api/billing/checkout", json={"purpose": "plan", "plan": "pro"})
        assert created.status_code == 200, created.text
        same = await client.post("/api/billing/checkout", json={"purpose": "plan", "plan": "starter"})
        lower = await client.post("/api/billing/checkout", json={"purpose": "plan", "plan": "free"})
        unknown = await client.post("/api/billing/checkout", json={"purpose": "plan", "plan": "gold"})
        float_amount = await client.post("/api/billing/checkout", json={"purpose": "topup", "amount_usd": 10.5})
        sub_cent = await client.post("/api/billing/checkout", json={"purpose": "topup", "amount_usd": "10.001"})
        negative = await client.post("/api/billing/checkout", json={"purpose": "topup", "amount_usd": "-5"})
        huge = await client.post("/api/billing/checkout", json={"purpose": "topup", "amount_usd": "5000000"})
        no_amount = await client.post("/api/billing/checkout", json={"purpose": "topup"})
        bad_purpose = await client.post("/api/billing/checkout", json={"purpose": "gift"})
    [sent] = shop.fake_stripe.requests[before:]  # the refused ones never reached Stripe
    params = sent["params"]
    assert params["line_items[0][price_data][unit_amount]"] == "2900"
    assert params["metadata[purpose]"] == "plan" and params["metadata[plan]"] == "pro"
    assert params["metadata[amount_uusd]"] == "29000000"
    for refused in (same, lower):
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == ("plan", "plan_not_an_upgrade")
        assert "Starter" in error["message"] and "only a more expensive plan" in error["message"]
    for refused, param in [(unknown, "plan"),
                           (float_amount, "amount_usd"), (sub_cent, "amount_usd"),
                           (negative, "amount_usd"), (huge, "amount_usd"),
                           (no_amount, "amount_usd"), (bad_purpose, "purpose")]:
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["param"] == param, refused.text


async def test_checkout_without_stripe_configured_is_503(server: Server) -> None:
    root = server.base_url.removesuffix("/v1")
    email = f"nostripe-{secrets.token_hex(4)}@example.com"
    server.cli("users", "create", email, "--password", "correct-horse-battery")
    async with _dashboard(root, email) as client:
        created = await client.post("/api/billing/checkout", json={"purpose": "topup", "amount_usd": "10"})
        hook = await client.post("/api/stripe/webhook", content=b"{}", headers={"stripe-signature": "t=1,v1=00"})
    assert created.status_code == 503
    assert created.json()["error"]["code"] == "payments_not_configured"
    assert "DUBHE_STRIPE_SECRET_KEY" in created.json()["error"]["message"]
    assert hook.status_code == 503


async def test_a_webhook_delivered_5_times_at_once_credits_once(shop: Shop, shop_db: AsyncEngine) -> None:
    email, key = shop.new_user()
    user_id = await user_id_of(shop_db, email)
    session_id = "cs_test_" + secrets.token_hex(12)
    payload = checkout_event(session_id=session_id, user_id=user_id, purpose="topup", amount_cents=2500)
    async with httpx.AsyncClient(timeout=30) as client:
        answers = await asyncio.gather(*(_deliver(client, shop, payload) for _ in range(5)))
    assert [answer.status_code for answer in answers] == [200] * 5, [a.text for a in answers]
    assert all(answer.json() == {"received": True} for answer in answers)
    assert await _balance(shop, key) == "25.000000"
    assert await _count(shop_db, "SELECT count(*) AS n FROM ledger_entries WHERE kind = 'topup' AND ref = :r", r=session_id) == 1
    assert await _count(shop_db, "SELECT count(*) AS n FROM payments WHERE user_id = :u", u=user_id) == 1
    assert (await assert_ledger_matches(shop_db, user_id))["balance_uusd"] == 25_000_000


async def test_two_events_for_one_checkout_session_credit_once(shop: Shop, shop_db: AsyncEngine) -> None:
    email, key = shop.new_user()
    user_id = await user_id_of(shop_db, email)
    session_id = "cs_test_" + secrets.token_hex(12)
    pending = checkout_event(session_id=session_id, user_id=user_id, purpose="topup", amount_cents=1000,
                             payment_status="unpaid")
    completed = checkout_event(session_id=session_id, user_id=user_id, purpose="topup", amount_cents=1000)
    succeeded = checkout_event(session_id=session_id, user_id=user_id, purpose="topup", amount_cents=1000,
                               event_type="checkout.session.async_payment_succeeded")
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await _deliver(client, shop, pending)).status_code == 200
        assert await _balance(shop, key) == "0.000000"  # not paid yet: nothing applied
        assert (await _deliver(client, shop, completed)).status_code == 200
        assert (await _deliver(client, shop, succeeded)).status_code == 200
    assert await _balance(shop, key) == "10.000000"
    assert (await assert_ledger_matches(shop_db, user_id))["balance_uusd"] == 10_000_000


async def test_a_bad_signature_is_400_and_applies_nothing(shop: Shop, shop_db: AsyncEngine) -> None:
    email, key = shop.new_user()
    user_id = await user_id_of(shop_db, email)
    payload = checkout_event(session_id="cs_test_" + secrets.token_hex(12), user_id=user_id,
                             purpose="topup", amount_cents=100_000)
    tampered = payload.replace(b'"amount_total": 100000', b'"amount_total": 100001')
    assert tampered != payload
    stale = shop.sign(payload, timestamp=int(time.time()) - 3600)
    async with httpx.AsyncClient(timeout=30) as client:
        answers = [
            await _deliver(client, shop, payload, signature=shop.sign(payload, secret="whsec_wrong")),
            await _deliver(client, shop, payload, signature=""),
            await _deliver(client, shop, payload, signature="garbage"),
            await _deliver(client, shop, tampered, signature=shop.sign(payload)),
            await _deliver(client, shop, payload, signature=stale),
        ]
        unsigned = await client.post(f"{shop.root}/api/stripe/webhook", content=payload)
    for answer in [*answers, unsigned]:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "invalid_signature"
    assert await _balance(shop, key) == "0.000000"
    assert await _count(shop_db, "SELECT count(*) AS n FROM payments WHERE user_id = :u", u=user_id) == 0
    await assert_ledger_matches(shop_db, user_id)


async def test_a_charge_that_does_not_match_the_metadata_is_refused(shop: Shop, shop_db: AsyncEngine) -> None:
    email, key = shop.new_user()
    user_id = await user_id_of(shop_db, email)
    payload = checkout_event(session_id="cs_test_" + secrets.token_hex(12), user_id=user_id,
                             purpose="topup", amount_cents=100, amount_uusd=500_000_000)
    ignored = checkout_event(session_id="cs_test_" + secrets.token_hex(12), user_id=user_id,
                             purpose="topup", amount_cents=100, event_type="checkout.session.expired")
    async with httpx.AsyncClient(timeout=30) as client:
        refused = await _deliver(client, shop, payload)
        other = await _deliver(client, shop, ignored)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "payment_mismatch"
    assert other.status_code == 200 and other.json() == {"received": True}
    assert await _balance(shop, key) == "0.000000"
    assert await _count(shop_db, "SELECT count(*) AS n FROM payments WHERE user_id = :u", u=user_id) == 0
    await assert_ledger_matches(shop_db, user_id)


async def test_a_paid_plan_upgrades_the_account_and_its_key(shop: Shop, shop_db: AsyncEngine) -> None:
    email, key = shop.new_user("free")
    user_id = await user_id_of(shop_db, email)
    root = shop.root
    async with httpx.AsyncClient(timeout=30) as client:
        models = await client.get(f"{root}/v1/models", headers={"authorization": f"Bearer {key}"})
        assert [m["id"] for m in models.json()["data"]] == ["dubhe-fast"]  # warms the key cache
        session_id = "cs_test_" + secrets.token_hex(12)
        payload = checkout_event(session_id=session_id, user_id=user_id, purpose="plan",
                                 amount_cents=2900, plan="pro")
        answers = await asyncio.gather(*(_deliver(client, shop, payload) for _ in range(3)))
        assert [a.status_code for a in answers] == [200] * 3
        deadline = time.monotonic() + 2.5
        while True:
            models = await client.get(f"{root}/v1/models", headers={"authorization": f"Bearer {key}"})
            ids = {m["id"] for m in models.json()["data"]}
            if "dubhe-reasoning" in ids or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    assert ids == {"dubhe-fast", "dubhe-vision", "dubhe-reasoning", "dubhe-code"}
    shown = shop.show(email)
    assert shown["plan"] == "pro" and shown["next_plan"] is None
    assert shown["tokens_remaining"] == 10_000_000
    assert await _count(shop_db, "SELECT count(*) AS n FROM payments WHERE user_id = :u AND purpose = 'plan' "
                                 "AND plan_code = 'pro' AND amount_uusd = 29000000", u=user_id) == 1
    # Upgraded once: one grant for the free period, one for the pro period.
    assert await _count(shop_db, "SELECT count(*) AS n FROM subscription_periods WHERE user_id = :u", u=user_id) == 2
    # The purchase shows in the account's history, once, though delivered three times.
    assert await _count(shop_db, "SELECT count(*) AS n FROM ledger_entries WHERE user_id = :u "
                                 "AND kind = 'plan_purchase' AND ref = :r", u=user_id, r=session_id) == 1
    counters = await assert_ledger_matches(shop_db, user_id)
    assert counters["balance_uusd"] == 0  # the card paid, not the balance
