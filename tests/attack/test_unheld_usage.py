"""An honest upstream that honours its output limit must never put an account in debt.

Debt is meant for an upstream that ignored the limit it was sent. Here the upstream is honest
(tests/upstreams/realistic.py charges one token per prompt byte and obeys max_tokens), yet the
hold admission takes does not cover what the request costs upstream:

- the prompt is held as tiktoken's count of the messages only (gateway/completion.py
  ``_check_context``), not the bound of the payload sent upstream: a ``tools`` or
  ``response_format`` schema is never held, so a free account sends a 900 KB schema and owes
  what the operator paid for it;
- with no ``max_tokens``, the default output limit is held (4,096) but never sent upstream, so
  the upstream generates its natural length.

Both fail on fb91792 (main) and pass once admission holds the prompt bound and sends the held
output limit upstream (gateway/admission.py ``size_request``, written but not called).
"""

from __future__ import annotations

import asyncio

import httpx

from tests.billing.conftest import Billing
from tests.upstreams.realistic import Realistic

SCHEMA = {"type": "json_schema",
          "json_schema": {"name": "answer", "schema": {"description": "x" * 200_000}}}


async def test_a_schema_the_hold_does_not_cover_leaves_no_debt(honest: Billing) -> None:
    key, user_id = await honest.new_account("tiny")  # 1,000 included tokens, no balance
    async with httpx.AsyncClient(base_url=honest.server.base_url, timeout=120,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        response = await client.post("/chat/completions", json={
            "model": "dubhe-fast", "messages": [{"role": "user", "content": "hi"}],
            "response_format": SCHEMA, "max_tokens": 5})
    # Either refused up front (the account cannot pay a 200,000-token prompt), or served and
    # paid for: never served on credit the account does not have.
    assert response.status_code in (200, 402), response.text
    account = await honest.assert_consistent(user_id)
    assert account["debt_uusd"] == 0, (response.status_code, response.headers, account)


async def test_concurrent_schemas_do_not_multiply_the_debt(honest: Billing) -> None:
    key, user_id = await honest.new_account("tiny")
    body = {"model": "dubhe-reasoning",
            "messages": [{"role": "user", "content": "hi [[up:delay_ms=3000]]"}],
            "response_format": SCHEMA, "max_tokens": 5}
    async with httpx.AsyncClient(base_url=honest.server.base_url, timeout=120,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        answers = await asyncio.gather(
            *[client.post("/chat/completions", json=body) for _ in range(10)])
    served = sum(answer.status_code == 200 for answer in answers)
    account = await honest.assert_consistent(user_id)
    assert account["debt_uusd"] == 0, (served, account)


async def test_the_default_output_limit_held_is_the_one_sent(honest: Billing,
                                                              realistic: Realistic) -> None:
    key, user_id = await honest.new_account("metered")
    await honest.credit(user_id, 10_000)  # $0.01: 4,096 output tokens of dubhe-fast and more
    async with httpx.AsyncClient(base_url=honest.server.base_url, timeout=300,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        response = await client.post("/chat/completions", json={
            "model": "dubhe-fast",
            "messages": [{"role": "user", "content": "hi [[up:tokens=20000]]"}]})
    assert response.status_code == 200, response.text
    charged = realistic.charged(response.headers["x-request-id"])
    assert charged is not None
    assert charged["completion_tokens"] <= 4096, charged
    account = await honest.assert_consistent(user_id)
    assert account["debt_uusd"] == 0, account


async def test_without_usage_the_schema_is_still_charged(honest: Billing) -> None:
    """An upstream that reports no usage (many do, in streams) is charged on Dubhe's own count,
    which must include the tools the upstream read: 50,000 tokens of tool description here
    (each " the" is one cl100k_base token). On main it counts the messages only (14 tokens)."""
    key, user_id = await honest.new_account("metered")
    await honest.credit(user_id, 1_000_000)
    tool = {"type": "function", "function": {"name": "f", "description": " the" * 50_000}}
    async with httpx.AsyncClient(base_url=honest.server.base_url, timeout=120,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        response = await client.post("/chat/completions", json={
            "model": "dubhe-fast", "messages": [{"role": "user", "content": "hi [[up:usage=none]]"}],
            "tools": [tool], "max_tokens": 5})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] >= 50_000, response.json()["usage"]
    await honest.assert_consistent(user_id)


async def test_the_smaller_of_two_limits_is_the_one_sent(honest: Billing,
                                                          realistic: Realistic) -> None:
    """max_tokens=1 is held, but max_completion_tokens=50000 goes upstream untouched and wins
    there (as in vLLM): 20,000 tokens for the price of one, owed by a free account."""
    key, user_id = await honest.new_account("tiny")
    async with httpx.AsyncClient(base_url=honest.server.base_url, timeout=300,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        response = await client.post("/chat/completions", json={
            "model": "dubhe-fast", "max_tokens": 1, "max_completion_tokens": 50_000,
            "messages": [{"role": "user", "content": "hi [[up:tokens=20000]]"}]})
    assert response.status_code == 200, response.text
    charged = realistic.charged(response.headers["x-request-id"])
    assert charged is not None and charged["completion_tokens"] <= 1, charged
    account = await honest.assert_consistent(user_id)
    assert account["debt_uusd"] == 0, account
