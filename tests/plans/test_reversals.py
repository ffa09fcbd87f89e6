"""Refunds and disputes take a card payment's credit back once (as a debt if it was spent),
and a dispute won gives it back once, however Stripe orders and repeats its events."""

from __future__ import annotations

import asyncio
import json
import secrets

from tests.plans.conftest import Store
from tests.recharge.conftest import charge_refunded_event, checkout_event, dispute_event


class Payment:
    """One card top-up and the Stripe events about it."""

    def __init__(self, user_id: int, cents: int) -> None:
        self.cents = cents
        self.session_id = "cs_test_" + secrets.token_hex(12)
        self.payment_intent = "pi_" + secrets.token_hex(12)
        self.charge_id = "ch_" + secrets.token_hex(12)
        self.dispute_id = "dp_" + secrets.token_hex(12)
        self.checkout = checkout_event(session_id=self.session_id, user_id=user_id,
                                       purpose="topup", amount_cents=cents,
                                       payment_intent=self.payment_intent)

    def refunded(self, cents: int) -> bytes:
        return charge_refunded_event(payment_intent=self.payment_intent, charge_id=self.charge_id,
                                     amount_cents=self.cents, refunded_cents=cents)

    def dispute(self, event_type: str, status: str) -> bytes:
        return dispute_event(event_type=f"charge.dispute.{event_type}",
                             payment_intent=self.payment_intent, charge_id=self.charge_id,
                             dispute_id=self.dispute_id, amount_cents=self.cents, status=status)


async def _deliver_all(store: Store, *payloads: bytes) -> None:
    for payload in payloads:
        answer = await store.deliver(payload)
        assert answer.status_code == 200, answer.text


async def _spend(store: Store, key: str) -> int:
    """Spend some of the balance (30 completion tokens: about $3); returns the cost in µUSD."""
    answer = await store.ask(key, "spend [[sim:tokens=30]]", max_tokens=30)
    assert answer.status_code == 200, answer.text
    cost = answer.headers["x-dubhe-cost-usd"]
    whole, micro = cost.split(".")
    return int(whole) * 1_000_000 + int(micro)


async def test_a_refund_before_its_payment_takes_the_credit_back_once(store: Store) -> None:
    _, _, user_id = await store.new_user()
    payment = Payment(user_id, 2500)
    full = payment.refunded(2500)
    await _deliver_all(store, full)
    # Then the payment and the refund again, all at the same instant.
    answers = await asyncio.gather(*(store.deliver(payload)
                                     for payload in (payment.checkout, full, payment.checkout)))
    assert [answer.status_code for answer in answers] == [200] * 3, [a.text for a in answers]

    [topup] = await store.ledger(user_id, "topup")
    [refund] = await store.ledger(user_id, "refund")
    assert topup["balance_uusd"] == 25_000_000 and refund["balance_uusd"] == -25_000_000
    assert refund["ref"].startswith(payment.session_id)  # points at the payment
    assert payment.session_id in refund["description"]
    account = await store.settled(user_id)
    assert (account["balance_uusd"], account["debt_uusd"]) == (0, 0)


async def test_a_refund_of_spent_credit_is_owed_and_partial_refunds_add_up(store: Store) -> None:
    _, key, user_id = await store.new_user("metered")
    payment = Payment(user_id, 1000)
    await _deliver_all(store, payment.checkout)
    cost = await _spend(store, key)
    assert 1_000_000 < cost < 10_000_000
    await store.settled(user_id)  # the worker returned what its lease did not spend
    # Stripe's amount_refunded is cumulative: $4, then the rest; the $4 arrives late and twice.
    partial, full = payment.refunded(400), payment.refunded(1000)
    await _deliver_all(store, full, partial, full, partial)

    refunds = await store.ledger(user_id, "refund")
    assert sum(-row["balance_uusd"] for row in refunds) == 10_000_000 - cost
    assert sum(row["debt_uusd"] for row in refunds) == cost  # spent: now owed
    account = await store.settled(user_id)
    assert (account["balance_uusd"], account["debt_uusd"]) == (0, cost)


async def test_a_dispute_won_before_it_was_opened_nets_to_nothing(store: Store) -> None:
    _, _, user_id = await store.new_user()
    payment = Payment(user_id, 2000)
    won, opened = payment.dispute("closed", "won"), payment.dispute("created", "needs_response")
    await _deliver_all(store, payment.checkout, won, opened, won, opened)

    [taken] = await store.ledger(user_id, "dispute")
    [given] = await store.ledger(user_id, "dispute_won")
    assert (taken["balance_uusd"], given["balance_uusd"]) == (-20_000_000, 20_000_000)
    assert all(row["ref"].startswith(payment.session_id) for row in (taken, given))
    account = await store.settled(user_id)
    assert (account["balance_uusd"], account["debt_uusd"]) == (20_000_000, 0)


async def test_a_dispute_of_spent_credit_is_owed_then_cancelled_when_won(store: Store) -> None:
    _, key, user_id = await store.new_user("metered")
    payment = Payment(user_id, 1000)
    await _deliver_all(store, payment.checkout)
    cost = await _spend(store, key)
    await store.settled(user_id)
    opened = payment.dispute("created", "needs_response")
    await _deliver_all(store, opened, opened)
    account = await store.settled(user_id)
    assert (account["balance_uusd"], account["debt_uusd"]) == (0, cost)
    # Owing, the account is refused: nothing left to spend.
    assert (await store.ask(key, "more [[sim:tokens=5]]")).status_code == 402

    won = payment.dispute("closed", "won")
    await _deliver_all(store, won, won)
    account = await store.settled(user_id)
    # As if the dispute never happened: the debt is cancelled, the rest of the credit is back.
    assert (account["balance_uusd"], account["debt_uusd"]) == (10_000_000 - cost, 0)


async def test_a_dispute_lost_after_a_refund_takes_back_no_more_than_was_paid(
        store: Store) -> None:
    _, _, user_id = await store.new_user()
    payment = Payment(user_id, 1000)
    lost = payment.dispute("closed", "lost")
    await _deliver_all(store, lost, payment.checkout, payment.refunded(300), lost)
    account = await store.settled(user_id)
    assert (account["balance_uusd"], account["debt_uusd"]) == (0, 0)
    entries = [*await store.ledger(user_id, "dispute"), *await store.ledger(user_id, "refund")]
    assert sum(row["balance_uusd"] for row in entries) == -10_000_000


async def test_malformed_signed_events_are_refused_not_crashed(store: Store) -> None:
    """Signed by the right secret, but not what Stripe sends: a 4xx (or a 2xx ignore), never
    a 500 that Stripe would retry for days; nothing is applied (the server's log is checked
    for tracebacks when the session ends)."""
    _, _, user_id = await store.new_user()
    good = json.loads(Payment(user_id, 1000).checkout)
    refund = json.loads(Payment(user_id, 1000).refunded(1000))

    def variant(base: dict[str, object], path: tuple[str, ...], value: object) -> bytes:
        event = json.loads(json.dumps(base))
        target = event
        for name in path[:-1]:
            target = target[name]
        target[path[-1]] = value
        return json.dumps(event).encode()

    obj = ("data", "object")
    payloads = [
        variant(good, ("data",), "x"), variant(good, ("data",), [1]),
        variant(good, (*obj,), [1, 2]), variant(good, (*obj, "metadata"), "topup"),
        variant(good, (*obj, "metadata", "user_id"), "٥"),
        variant(good, (*obj, "metadata", "user_id"), str(2**70)),
        variant(good, (*obj, "metadata", "user_id"), 5),
        variant(good, (*obj, "metadata", "amount_uusd"), "1e7"),
        variant(good, (*obj, "amount_total"), 1000.0), variant(good, (*obj, "amount_total"), 1e30),
        variant(good, (*obj, "amount_total"), -1000), variant(good, (*obj, "amount_total"), True),
        variant(good, (*obj, "id"), {"x": 1}), variant(good, (*obj, "payment_intent"), 5),
        variant(good, (*obj, "client_reference_id"), [str(user_id)]),
        variant(refund, (*obj, "amount_refunded"), "1000"),
        variant(refund, (*obj, "amount_refunded"), 10**40),
        variant(refund, (*obj, "amount_refunded"), -5),
        variant(refund, (*obj, "payment_intent"), ["pi_x"]),
        variant(refund, (*obj, "id"), None), variant(refund, ("data",), None),
        variant(refund, ("type",), ["charge.refunded"]),
    ]
    for payload in payloads:
        answer = await store.deliver(payload)
        assert answer.status_code < 500, (payload, answer.text)
        body = answer.json()
        assert body == {"received": True} or set(body["error"]) == {"message", "type", "param",
                                                                   "code"}, body
    account = await store.settled(user_id)
    assert (account["balance_uusd"], account["debt_uusd"]) == (0, 0)
