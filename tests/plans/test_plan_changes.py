"""A plan change retires every worker's lease of the old plan: no request is admitted against a
plan the account no longer has (two workers, kept busy so no lease ever idles out)."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.plans.conftest import Store

STARTER_TOKENS = 1_000_000
PRO_TOKENS = 10_000_000


async def test_an_upgrade_stops_spending_the_old_plan_on_every_worker(store2: Store) -> None:
    store = store2
    email, key, user_id = await store.new_user("starter")
    body = {"model": "dubhe-fast", "max_tokens": 20,
            "messages": [{"role": "user", "content": "busy [[sim:tokens=20]]"}]}
    seen: list[tuple[float, int, int]] = []  # (when answered, tokens remaining shown, used)
    stop = asyncio.Event()

    async def keep_busy(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            answer = await client.post(f"{store.server.base_url}/chat/completions", json=body,
                                       headers={"authorization": f"Bearer {key}"})
            assert answer.status_code == 200, answer.text
            seen.append((time.monotonic(), int(answer.headers["x-dubhe-tokens-remaining"]),
                         answer.json()["usage"]["total_tokens"]))

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=8)) as client:
        loops = [asyncio.create_task(keep_busy(client)) for _ in range(4)]
        try:
            while len(seen) < 8:  # both workers hold a Starter lease by now
                await asyncio.sleep(0.1)
            await asyncio.to_thread(store.server.cli, "users", "plan", email, "pro")
            changed = time.monotonic()
            # Every worker learns of the change within a second; wait for the first answer
            # from Pro's credit, then give the other worker a generous while to follow.
            deadline = changed + 30
            while not any(shown > STARTER_TOKENS for _, shown, _ in seen):
                assert time.monotonic() < deadline, "requests kept spending the Starter plan"
                await asyncio.sleep(0.1)
            settled_after = time.monotonic() + 3
            while time.monotonic() < settled_after + 2:
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await asyncio.gather(*loops)

    late = [shown for when, shown, _ in seen if when > settled_after]
    assert late and all(shown > STARTER_TOKENS for shown in late), late
    # The money: Pro's tokens paid exactly for the requests admitted on Pro's credit; what was
    # left of Starter's expired with its period.
    on_pro = sum(used for _, shown, used in seen if shown > STARTER_TOKENS)
    account = await store.settled(user_id)
    assert account["tokens_available"] == PRO_TOKENS - on_pro
    [expired] = await store.ledger(user_id, "expire")
    on_starter = sum(used for _, shown, used in seen if shown <= STARTER_TOKENS)
    assert -expired["tokens_available"] <= STARTER_TOKENS - on_starter
    shown_plan = store.show(email)
    assert (shown_plan["plan"], shown_plan["tokens_remaining"]) == ("pro", PRO_TOKENS - on_pro)
