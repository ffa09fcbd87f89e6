"""200 concurrent requests race an account that can afford exactly N of them."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from dubhe.billing.pricing import cost_uusd
from tests.billing.conftest import (
    FULL_REQUESTS,
    RACE_BODY,
    RACE_HOLD_PROMPT,
    RACE_MAX_TOKENS,
    RACE_PROMPT,
    REMAINDER_COMPLETION,
    REQUEST_TOKENS,
    REQUEST_USAGE,
    Billing,
    prompt_tokens,
)

RACERS = 200


async def race(billing: Billing, key: str, count: int = RACERS) -> list[httpx.Response]:
    body = RACE_BODY
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        return await asyncio.gather(
            *(
                client.post(
                    billing.server.base_url + "/chat/completions",
                    json=body,
                    headers={"authorization": f"Bearer {key}"},
                )
                for _ in range(count)
            )
        )


def outcomes(responses: list[httpx.Response]) -> tuple[list[httpx.Response], list[httpx.Response]]:
    ok = [r for r in responses if r.status_code == 200]
    denied = [r for r in responses if r.status_code == 402]
    assert len(ok) + len(denied) == len(responses), {r.status_code for r in responses}
    for response in denied:
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
        assert response.headers["x-should-retry"] == "false"
        assert "Recharge" in error["message"]
    return ok, denied


async def test_included_tokens_admit_exactly_n(billing: Billing) -> None:
    key, user_id = await billing.new_account("exact")
    ok, denied = outcomes(await race(billing, key))
    assert len(ok) == FULL_REQUESTS
    assert len(denied) == RACERS - FULL_REQUESTS
    assert not any("x-dubhe-max-tokens-clamped" in r.headers for r in ok)
    for response in ok:
        assert response.json()["usage"]["total_tokens"] == REQUEST_USAGE
    account = await billing.assert_consistent(user_id)
    # What the holds' prompt bounds took beyond the simulator's count came back.
    leftover = FULL_REQUESTS * (REQUEST_TOKENS - REQUEST_USAGE)
    assert account["tokens_available"] == leftover and account["tokens_reserved"] == 0


async def test_a_remainder_buys_one_clamped_request_never_more(billing: Billing) -> None:
    key, user_id = await billing.new_account("remainder")
    ok, denied = outcomes(await race(billing, key))
    assert len(ok) == FULL_REQUESTS + 1
    clamped = [r for r in ok if "x-dubhe-max-tokens-clamped" in r.headers]
    assert len(clamped) == 1
    assert clamped[0].headers["x-dubhe-max-tokens-clamped"] == str(REMAINDER_COMPLETION)
    assert clamped[0].json()["usage"]["completion_tokens"] == REMAINDER_COMPLETION
    account = await billing.assert_consistent(user_id)
    leftover = (FULL_REQUESTS + 1) * (RACE_HOLD_PROMPT - prompt_tokens(RACE_PROMPT))
    assert account["tokens_available"] == leftover and account["tokens_reserved"] == 0


@pytest.mark.parametrize("remainder", [False, True])
async def test_prepaid_balance_admits_exactly_n(billing: Billing, remainder: bool) -> None:
    key, user_id = await billing.new_account("metered")  # no included tokens: balance only
    model = billing.catalog.models["dubhe-fast"]
    prompt, held = prompt_tokens(RACE_PROMPT), RACE_HOLD_PROMPT
    each = cost_uusd(model, held, RACE_MAX_TOKENS)
    extra = cost_uusd(model, held, REMAINDER_COMPLETION) if remainder else 0
    await billing.credit(user_id, FULL_REQUESTS * each + extra)
    ok, _ = outcomes(await race(billing, key))
    assert len(ok) == FULL_REQUESTS + (1 if remainder else 0)
    clamped = [r for r in ok if "x-dubhe-max-tokens-clamped" in r.headers]
    assert len(clamped) == (1 if remainder else 0)
    if remainder:
        # The clamped request got the most completion tokens the remainder pays for.
        granted = int(clamped[0].headers["x-dubhe-max-tokens-clamped"])
        assert granted >= REMAINDER_COMPLETION
        assert cost_uusd(model, held, granted) <= extra < cost_uusd(model, held, granted + 1)
    charged = cost_uusd(model, prompt, RACE_MAX_TOKENS)
    costs = sorted(r.headers["x-dubhe-cost-usd"] for r in ok)
    assert costs[-1] == f"0.{charged:06d}"
    account = await billing.assert_consistent(user_id)
    assert account["balance_reserved_uusd"] == 0
    spent = FULL_REQUESTS * charged + (cost_uusd(model, prompt, granted) if remainder else 0)
    assert account["balance_uusd"] == FULL_REQUESTS * each + extra - spent
