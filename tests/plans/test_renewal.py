"""Renewal sees the whole balance, leased slices included, on a server with two workers."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import aiohttp

from dubhe.models.base import utcnow
from tests.conftest import fetch_one
from tests.plans.conftest import Store


async def test_renewal_waits_for_leased_balance_instead_of_dropping_the_plan(
        store2: Store) -> None:
    store = store2
    email, key, user_id = await store.new_user("pro")
    store.server.cli("balance", "add", email, "35")  # Pro costs $29
    headers = {"authorization": f"Bearer {key}"}
    body = {"model": "dubhe-code", "stream": True,
            "messages": [{"role": "user", "content": "slow [[sim:tokens=400]]"}]}
    statuses = []
    async with aiohttp.ClientSession() as session:
        # A ten-second stream (40 tokens a second) keeps a worker's lease (a quarter of the
        # balance, $8.75) out of the account while the period ends under it.
        stream = await session.post(f"{store.server.base_url}/chat/completions", json=body,
                                    headers=headers)
        assert stream.status == 200
        await stream.content.readline()
        await store.end_period(user_id, ago_seconds=1, start=utcnow() - timedelta(days=31))
        deadline = time.monotonic() + 90
        while True:
            assert time.monotonic() < deadline, statuses
            answer = await store.ask(key, "after the period [[sim:tokens=2]]", model="dubhe-code",
                                     max_tokens=2)
            statuses.append(answer.status_code)
            if answer.status_code == 503:
                # Waiting for the lease: a short, retryable answer, never a fall to Free.
                error = answer.json()["error"]
                assert (error["code"], answer.headers["retry-after"]) == ("billing_unavailable",
                                                                          "1")
            else:
                assert answer.status_code == 200, answer.text  # not a 404: still on Pro
                if await store.ledger(user_id, "renewal"):
                    break
            await asyncio.sleep(0.5)
        async for _ in stream.content:
            pass  # the stream finished normally, settled against the lease it started on
    [renewal] = await store.ledger(user_id, "renewal")
    assert renewal["balance_uusd"] == -29_000_000
    # The renewal came after the stream's lease returned its $8.75, not before.
    row = await fetch_one(store.db, "SELECT max(closed_at) AS closed FROM leases "
                          "WHERE user_id = :u AND uusd > 0", u=user_id)
    assert row["closed"] is not None
    shown = store.show(email)
    assert shown["plan"] == "pro" and shown["tokens_included"] == 10_000_000
    account = await store.settled(user_id)
    assert account["balance_uusd"] == 6_000_000  # $35 - $29; tokens were included
