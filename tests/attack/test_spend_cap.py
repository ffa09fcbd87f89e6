"""A key "capped" at $0.0002 once kept spending (red team): the meter now holds every capped
key's requests against its cap. A request without max_tokens is clamped to what the cap has
left, and the one that would pass it gets 402 naming the cap; the key's spend in the database
never exceeds it. (Two workers and both databases under concurrency: tests/caps/.)"""

from __future__ import annotations

import asyncio
import secrets

import httpx
from sqlalchemy import text

from tests.billing.conftest import Billing


async def test_a_tiny_cap_stops_the_key_at_the_cap(honest: Billing) -> None:
    email = f"capped-{secrets.token_hex(4)}@example.com"
    honest.server.cli("users", "create", email, "--password", "correct-horse-battery",
                      "--plan", "metered")
    honest.server.cli("balance", "add", email, "1")
    key = honest.server.cli("keys", "create", email, "--spend-cap-usd", "0.0002").stdout.strip()
    bad = honest.server.cli("keys", "create", email, "--spend-cap-usd", "0", check=False)
    assert bad.returncode != 0 and "--spend-cap-usd" in bad.stderr and bad.stdout == ""
    body = {"model": "dubhe-fast", "messages": [{"role": "user", "content": "Write a long story. [[up:tokens=100000]]"}]}
    statuses, clamped = [], []
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(40):
            response = await client.post(honest.server.base_url + "/chat/completions", json=body,
                                         headers={"authorization": f"Bearer {key}"})
            statuses.append(response.status_code)
            if response.status_code != 200:
                break
            clamped.append(int(response.headers["x-dubhe-max-tokens-clamped"]))
            await asyncio.sleep(0)
    assert statuses[0] == 200 and statuses[-1] == 402, statuses
    assert clamped and all(limit < 4096 for limit in clamped)  # no output beyond the cap
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert "spend cap of $0.0002" in error["message"]
    await asyncio.sleep(2.5)  # leases idle (1.5 s) and usage flushed
    async with honest.engine.connect() as connection:
        spent = (await connection.execute(text(
            "SELECT coalesce(sum(u.cost_uusd), 0) FROM usage_records u JOIN users s "
            "ON s.id = u.user_id WHERE s.email = :e"), {"e": email})).scalar_one()
    assert 0 < spent <= 200
