"""Plans bought by card: a payment is never lost and never charged twice.

Each Stripe event is signed the way Stripe signs it and delivered twice, out of order."""

from __future__ import annotations

import secrets
from datetime import timedelta

from dubhe.models.base import utcnow
from tests.conftest import fetch_one
from tests.plans.conftest import Store
from tests.recharge.conftest import checkout_event


def _plan_session(user_id: int, plan: str, cents: int) -> tuple[str, bytes]:
    session_id = "cs_test_" + secrets.token_hex(12)
    return session_id, checkout_event(session_id=session_id, user_id=user_id, purpose="plan",
                                      amount_cents=cents, plan=plan,
                                      payment_intent="pi_" + secrets.token_hex(12))


async def _deliver_all(store: Store, *payloads: bytes) -> None:
    for payload in payloads:
        answer = await store.deliver(payload)
        assert answer.status_code == 200, answer.text


async def _periods(store: Store, user_id: int) -> int:
    row = await fetch_one(store.db, "SELECT count(*) AS n FROM subscription_periods "
                          "WHERE user_id = :u", u=user_id)
    return int(row["n"])


async def test_a_second_paid_session_for_the_same_plan_is_credited_not_lost(store: Store) -> None:
    email, _, user_id = await store.new_user("starter")
    first_id, first = _plan_session(user_id, "pro", 2900)
    second_id, second = _plan_session(user_id, "pro", 2900)
    await _deliver_all(store, second, first, second, first)

    shown = store.show(email)
    assert (shown["plan"], shown["next_plan"]) == ("pro", None)
    assert shown["balance_usd"] == "29.000000"  # the second $29 is the customer's, not ours
    [purchase] = await store.ledger(user_id, "plan_purchase")
    assert purchase["ref"] == second_id  # the first to arrive bought the plan
    [credit] = await store.ledger(user_id, "topup")
    assert (credit["ref"], credit["balance_uusd"]) == (first_id, 29_000_000)
    assert "Pro plan credited to your balance" in credit["description"]
    assert "already had the Pro plan" in credit["description"]
    assert await _periods(store, user_id) == 2  # Starter's, then Pro's: upgraded once
    account = await store.settled(user_id)
    assert account["balance_uusd"] == 29_000_000


async def test_a_lower_plan_paid_after_a_higher_one_is_no_downgrade(store: Store) -> None:
    email, _, user_id = await store.new_user("starter")
    _, ultimate = _plan_session(user_id, "ultimate", 9900)
    pro_id, pro = _plan_session(user_id, "pro", 2900)
    await _deliver_all(store, ultimate, pro, ultimate, pro)

    shown = store.show(email)
    assert (shown["plan"], shown["next_plan"]) == ("ultimate", None)
    assert shown["tokens_remaining"] == 50_000_000
    assert shown["balance_usd"] == "29.000000"
    [credit] = await store.ledger(user_id, "topup")
    assert credit["ref"] == pro_id and "already had the Ultimate plan" in credit["description"]
    account = await store.settled(user_id)
    assert account["balance_uusd"] == 29_000_000


async def test_a_plan_bought_after_the_period_ended_renews_nothing(store: Store) -> None:
    email, _, user_id = await store.new_user("pro")
    store.server.cli("balance", "add", email, "40")
    await store.end_period(user_id, ago_seconds=3600, start=utcnow() - timedelta(days=31))
    session_id, ultimate = _plan_session(user_id, "ultimate", 9900)
    await _deliver_all(store, ultimate, ultimate)

    shown = store.show(email)
    assert (shown["plan"], shown["next_plan"]) == ("ultimate", None)
    assert shown["balance_usd"] == "40.000000"  # not $11: Pro was not renewed first
    assert shown["tokens_remaining"] == 50_000_000
    assert await store.ledger(user_id, "renewal") == []
    [purchase] = await store.ledger(user_id, "plan_purchase")
    assert purchase["ref"] == session_id
    row = await fetch_one(store.db, "SELECT period_start, period_end FROM accounts "
                          "WHERE user_id = :u", u=user_id)
    assert await _periods(store, user_id) == 2  # Pro's first period, then Ultimate's from now
    assert shown["period_start"] >= (utcnow() - timedelta(minutes=5)).isoformat()[:16]
    assert row is not None
    account = await store.settled(user_id)
    assert account["balance_uusd"] == 40_000_000


async def test_an_operator_plan_change_after_the_period_ended_charges_no_renewal(
        store: Store) -> None:
    email, _, user_id = await store.new_user("pro")
    store.server.cli("balance", "add", email, "40")
    await store.end_period(user_id, ago_seconds=60, start=utcnow() - timedelta(days=31))
    store.server.cli("users", "plan", email, "starter")  # a downgrade, but the period is over
    shown = store.show(email)
    assert (shown["plan"], shown["next_plan"]) == ("starter", None)
    assert shown["tokens_remaining"] == 1_000_000
    assert shown["balance_usd"] == "40.000000"
    assert await store.ledger(user_id, "renewal") == []
    account = await store.settled(user_id)
    assert account["balance_uusd"] == 40_000_000
