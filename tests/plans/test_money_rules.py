"""Money's small print: what an amount of USD may look like, and how a cost is rounded."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dubhe.billing.pricing import cost_uusd, parse_usd, split_cost
from dubhe.catalog import load_catalog
from dubhe.errors import UnprocessableRequest
from tests.plans.conftest import Store

MODELS = load_catalog(None).models


@pytest.mark.parametrize("text", [
    "٥",  # Arabic-Indic five: Decimal reads it as 5
    "۵", "५", "５", "1٠", "𝟓", "5.٠", "²", "1_000", "+5", "-5", "5e2", "NaN", "inf", ".5", "5.",
    "0x10", "1,000", "", " ", "5.1234567", "99999999",
])
def test_only_ascii_decimal_amounts_are_money(text: str) -> None:
    with pytest.raises(UnprocessableRequest) as refused:
        parse_usd(text, param="amount_usd")
    assert refused.value.param == "amount_usd"


@pytest.mark.parametrize(("text", "uusd"), [
    ("5", 5_000_000), ("12.5", 12_500_000), ("0.000001", 1), (" 10.25 ", 10_250_000),
    ("1000000", 1_000_000_000_000),
])
def test_ascii_amounts_are_exact_micro_dollars(text: str, uusd: int) -> None:
    assert parse_usd(text) == uusd


def _exact(model_id: str, prompt: int, completion: int) -> Fraction:
    model = MODELS[model_id]
    return Fraction(prompt * model.input_price_uusd_per_mtok
                    + completion * model.output_price_uusd_per_mtok, 1_000_000)


@settings(max_examples=2_000, deadline=None)
@given(model_id=st.sampled_from(sorted(MODELS)), prompt=st.integers(0, 2_000_000),
       completion=st.integers(0, 2_000_000), plan_tokens=st.integers(0, 4_000_000))
def test_a_request_costs_at_most_one_micro_dollar_above_its_exact_price(
        model_id: str, prompt: int, completion: int, plan_tokens: int) -> None:
    """The documented policy (README, Billing): each request's cost is its exact price rounded
    up to the next µUSD, so never below it and less than 1 µUSD above it."""
    model = MODELS[model_id]
    exact = _exact(model_id, prompt, completion)
    cost = cost_uusd(model, prompt, completion)
    assert exact <= cost < exact + 1
    # With included tokens paying first (prompt before completion), the balance pays the exact
    # price of what is left, rounded the same way.
    covered_prompt = min(prompt, plan_tokens)
    covered_completion = min(completion, plan_tokens - covered_prompt)
    rest = _exact(model_id, prompt - covered_prompt, completion - covered_completion)
    assert rest <= split_cost(model, prompt, completion, plan_tokens) < rest + 1


def test_rounding_at_scale_is_bounded_by_one_micro_dollar_a_request() -> None:
    """A million of the smallest possible requests: the rounding is the whole charge here (the
    worst case, each exact price far below 1 µUSD), and it is exactly the documented bound."""
    fast = MODELS["dubhe-fast"]  # $0.20 per million input tokens: 1 token costs 0.2 µUSD
    requests = 1_000_000
    charged = sum(cost_uusd(fast, 1, 0) for _ in range(requests))
    exact = _exact("dubhe-fast", requests, 0)
    assert charged - exact < requests  # < $1 per million requests
    assert charged == requests  # each 0.2 µUSD request is charged 1 µUSD, as documented
    # Realistic requests (hundreds of tokens) carry the same < 1 µUSD each, relatively nothing.
    assert cost_uusd(fast, 500, 300) == 280


async def test_the_operator_cannot_credit_non_ascii_digits(store: Store) -> None:
    email, _, user_id = await store.new_user()
    for amount in ("٥", "５", "1٠"):
        refused = store.server.cli("balance", "add", email, amount, check=False)
        assert refused.returncode != 0 and "amount" in refused.stderr, refused.stderr
    store.server.cli("balance", "add", email, "5")
    account = await store.settled(user_id)
    assert account["balance_uusd"] == 5_000_000  # only the ASCII "5" was credited
