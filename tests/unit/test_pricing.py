"""The integer arithmetic of billing, checked against brute force over many small cases."""

from __future__ import annotations

import random

import pytest

from dubhe.billing.pricing import cost_uusd, format_usd, size_admission, split_cost
from dubhe.catalog import load_catalog

MODELS = load_catalog(None).models


def test_cost_rounds_up_to_the_next_micro_dollar() -> None:
    fast = MODELS["dubhe-fast"]  # $0.20 / $0.60 per million tokens
    assert cost_uusd(fast, 0, 0) == 0
    assert cost_uusd(fast, 1, 0) == 1  # 0.2 µUSD is charged as 1
    assert cost_uusd(fast, 5, 0) == 1
    assert cost_uusd(fast, 6, 0) == 2
    assert cost_uusd(fast, 1_000_000, 1_000_000) == 800_000


def test_included_tokens_pay_for_the_prompt_first() -> None:
    reasoning = MODELS["dubhe-reasoning"]  # $1.50 / $6.00
    # 100 included tokens: the 80-token prompt and 20 of the completion tokens.
    assert split_cost(reasoning, 80, 50, 100) == cost_uusd(reasoning, 0, 30)
    assert split_cost(reasoning, 80, 50, 0) == cost_uusd(reasoning, 80, 50)
    assert split_cost(reasoning, 80, 50, 500) == 0


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_admission_grants_the_most_the_account_can_pay_for(model_id: str) -> None:
    model = MODELS[model_id]
    rng = random.Random(model_id)
    for _ in range(300):
        prompt = rng.randint(1, 300)
        wanted = rng.randint(1, 500)
        tokens = rng.choice([0, rng.randint(0, 900)])
        balance = rng.choice([0, rng.randint(0, 3_000)])
        admission = size_admission(model, prompt_tokens=prompt, max_tokens=wanted,
                                   tokens_available=tokens, balance_uusd=balance)

        best = max(
            (c for c in range(0, wanted + 1)
             if split_cost(model, prompt, c, min(tokens, prompt + c)) <= balance),
            default=-1,
        )
        if best < 1:
            assert admission is None
            continue
        assert admission is not None
        assert admission.max_tokens == best
        assert admission.clamped == (best < wanted)
        assert admission.tokens == min(tokens, prompt + best)
        assert admission.balance_uusd == split_cost(model, prompt, best, admission.tokens)
        assert admission.balance_uusd <= balance


def test_format_usd_is_exact() -> None:
    assert format_usd(0) == "0.000000"
    assert format_usd(1) == "0.000001"
    assert format_usd(12_500_001) == "12.500001"
    assert format_usd(-596) == "-0.000596"
