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


@pytest.mark.parametrize("model_id", ["dubhe-fast", "dubhe-reasoning"])
def test_a_clamp_splits_what_is_affordable_over_n_choices_never_rounding_up(model_id: str) -> None:
    model = MODELS[model_id]
    rng = random.Random(f"n-{model_id}")
    for _ in range(300):
        prompt = rng.randint(1, 300)
        wanted = rng.randint(1, 500)
        n = rng.randint(1, 9)
        tokens = rng.choice([0, rng.randint(0, 2_000)])
        balance = rng.choice([0, rng.randint(0, 5_000)])
        admission = size_admission(model, prompt_tokens=prompt, max_tokens=wanted, n=n,
                                   tokens_available=tokens, balance_uusd=balance)

        # Every choice may generate its whole limit: the most c with c × n paid for in full.
        best = max(
            (c for c in range(0, wanted + 1)
             if split_cost(model, prompt, c * n, min(tokens, prompt + c * n)) <= balance),
            default=-1,
        )
        if best < 1:
            assert admission is None
            continue
        assert admission is not None
        assert admission.max_tokens == best
        assert admission.clamped == (best < wanted)
        assert admission.tokens == min(tokens, prompt + best * n)
        assert admission.balance_uusd == split_cost(model, prompt, best * n, admission.tokens)
        assert admission.balance_uusd <= balance


def test_less_than_one_token_per_choice_is_refused_not_rounded_up() -> None:
    fast = MODELS["dubhe-fast"]
    # The prompt plus 3 tokens are affordable: 3 choices get one each, 4 choices get nothing.
    three = size_admission(fast, prompt_tokens=10, max_tokens=100, n=3, tokens_available=13,
                           balance_uusd=0)
    assert three is not None and (three.max_tokens, three.tokens) == (1, 13)
    assert size_admission(fast, prompt_tokens=10, max_tokens=100, n=4, tokens_available=13,
                          balance_uusd=0) is None


def test_format_usd_is_exact() -> None:
    assert format_usd(0) == "0.000000"
    assert format_usd(1) == "0.000001"
    assert format_usd(12_500_001) == "12.500001"
    assert format_usd(-596) == "-0.000596"
