"""The integer arithmetic of billing: prices, admission sizing and settlement splits.

Money is integer micro-dollars (µUSD) and prices are µUSD per million tokens, so a cost is
``ceil(tokens × price / 1e6)`` computed on integers: nothing here touches a float. Included tokens
pay for prompt tokens first, then completion tokens; whatever they do not cover is charged to the
balance at the model's input and output prices. USD amounts cross the API and the CLI as exact
decimal strings, read by ``parse_usd`` and written by ``format_usd``, never as floats.
"""

from __future__ import annotations

import re
from decimal import Decimal

from dubhe.catalog import ModelSpec
from dubhe.errors import UnprocessableRequest
from dubhe.immutable import immutable

MILLION = 1_000_000


UUSD_PER_USD = 1_000_000
UUSD_PER_CENT = 10_000
# Far above any real recharge; a typo like "10000000" must not mint ten million dollars.
MAX_AMOUNT_UUSD = 1_000_000 * UUSD_PER_USD

# ASCII digits, then at most six decimals: no sign, no exponent, no "NaN"/"inf", nothing a float
# would round. Not ``\d``: it matches every script's digits, and Decimal reads "٥" as 5.
_USD = re.compile(r"([0-9]{1,7})(?:\.([0-9]{1,6}))?", re.ASCII)


def parse_usd(text: str, *, param: str = "amount_usd") -> int:
    """A positive USD amount like "12.5" as exact integer micro-dollars (12500000)."""
    value = text.strip()
    if not _USD.fullmatch(value):
        raise UnprocessableRequest(
            f"{param} must be a positive USD amount like \"10\" or \"12.50\" (at most 6 "
            f"decimals), not {text!r}",
            param=param,
            code="invalid_value",
        )
    amount = int(Decimal(value) * UUSD_PER_USD)  # exact: at most 6 decimals
    if amount <= 0:
        raise UnprocessableRequest(f"{param} must be more than zero", param=param,
                                   code="invalid_value")
    if amount > MAX_AMOUNT_UUSD:
        raise UnprocessableRequest(
            f"{param} must be at most {MAX_AMOUNT_UUSD // UUSD_PER_USD:,} USD", param=param,
            code="invalid_value",
        )
    return amount


def format_usd(uusd: int) -> str:
    """Integer micro-dollars as an exact decimal string: 1234567 -> "1.234567"."""
    sign = "-" if uusd < 0 else ""
    whole, micro = divmod(abs(uusd), 1_000_000)
    return f"{sign}{whole}.{micro:06d}"


def cost_uusd(model: ModelSpec, prompt_tokens: int, completion_tokens: int) -> int:
    """What tokens not covered by included tokens cost, rounded up to the next µUSD."""
    numerator = (
        prompt_tokens * model.input_price_uusd_per_mtok
        + completion_tokens * model.output_price_uusd_per_mtok
    )
    return -(-numerator // MILLION)


def split_cost(
    model: ModelSpec, prompt_tokens: int, completion_tokens: int, plan_tokens: int
) -> int:
    """The balance cost of a usage once ``plan_tokens`` of it are paid by included tokens."""
    covered_prompt = min(prompt_tokens, plan_tokens)
    covered_completion = min(completion_tokens, plan_tokens - covered_prompt)
    return cost_uusd(model, prompt_tokens - covered_prompt, completion_tokens - covered_completion)


@immutable
class Admission:
    """What to hold for a request: included tokens, then balance, and the output limit it buys.

    ``max_tokens`` is the limit of each of the request's ``n`` choices: the hold pays for the
    prompt plus ``max_tokens × n``.
    """

    tokens: int
    balance_uusd: int
    max_tokens: int
    clamped: bool


def size_admission(
    model: ModelSpec,
    *,
    prompt_tokens: int,
    max_tokens: int,
    n: int = 1,
    tokens_available: int,
    balance_uusd: int,
    may_use_balance: bool = True,
) -> Admission | None:
    """Hold the prompt plus ``max_tokens`` for each of ``n`` choices; if that is unaffordable,
    the largest per-choice limit that is: ``floor(affordable / n)``, never rounded up, since each
    choice may generate its whole limit. None when not even one token per choice can be paid for.
    """
    affordable = affordable_completion(
        model,
        prompt_tokens=prompt_tokens,
        tokens_available=tokens_available,
        balance_uusd=balance_uusd if may_use_balance else 0,
    )
    granted = min(max_tokens, affordable // n) if affordable > 0 else 0
    if granted < 1:
        return None
    completion = granted * n
    need = prompt_tokens + completion
    plan_tokens = min(tokens_available, need)
    money = split_cost(model, prompt_tokens, completion, plan_tokens)
    return Admission(
        tokens=plan_tokens, balance_uusd=money, max_tokens=granted, clamped=granted < max_tokens
    )


def affordable_completion(
    model: ModelSpec, *, prompt_tokens: int, tokens_available: int, balance_uusd: int
) -> int:
    """The most completion tokens the account can pay for after the prompt (may be <= 0).

    Very large (capped) when the completion is free for the account beyond included tokens.
    """
    unlimited = 1 << 62
    if tokens_available >= prompt_tokens:
        from_plan = tokens_available - prompt_tokens
        budget = balance_uusd * MILLION
    else:
        from_plan = 0
        budget = balance_uusd * MILLION - (prompt_tokens - tokens_available) * model.input_price_uusd_per_mtok
        if budget < 0:
            return -1
    price = model.output_price_uusd_per_mtok
    from_balance = unlimited if price == 0 else budget // price
    return min(unlimited, from_plan + from_balance)
