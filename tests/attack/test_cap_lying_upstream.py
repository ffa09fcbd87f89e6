"""Red team: a per-key monthly spend cap passed many times over by an upstream that over-reports
its usage while honouring the output limit it was sent.

Dubhe sends the upstream exactly the output limit it held (``max_tokens`` 200 here) and the
realistic upstream generates exactly that (its own ledger says so), but reports 20 times the
completion tokens (``[[up:usage=inflated]]``). In a stream that count stays under the relayed bytes
(every chunk's JSON framing counts), so the settlement takes it as physically possible and charges
it in full, far beyond each request's hold. The cap lease only ever held the honest possible cost,
so 30 concurrent streams are all admitted and each is charged about 15 times what it held: the
key's month ends many times over its cap, and its owner pays for completion tokens that a limit of
200 made impossible."""

from __future__ import annotations

import asyncio
import secrets

import httpx
from sqlalchemy import text

from tests.billing.conftest import Billing

CAP_UUSD = 10_000  # $0.01
MAX_TOKENS = 200
STREAMS = 30


async def _stream(client: httpx.AsyncClient, url: str, key: str) -> int:
    body = {"model": "dubhe-fast", "stream": True, "max_tokens": MAX_TOKENS,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user",
                          "content": f"Tell me a story. [[up:tokens={MAX_TOKENS}]] "
                                     "[[up:usage=inflated]]"}]}
    async with client.stream("POST", url, json=body,
                             headers={"authorization": f"Bearer {key}"}) as response:
        async for _ in response.aiter_bytes():
            pass
        return response.status_code


async def test_an_over_reporting_upstream_cannot_spend_a_capped_key_past_its_cap(
        honest: Billing) -> None:
    email = f"inflated-{secrets.token_hex(4)}@example.com"
    honest.server.cli("users", "create", email, "--password", "correct-horse-battery",
                      "--plan", "metered")
    honest.server.cli("balance", "add", email, "5")
    key = honest.server.cli("keys", "create", email, "--spend-cap-usd", "0.01").stdout.strip()
    url = honest.server.base_url + "/chat/completions"
    async with httpx.AsyncClient(timeout=120) as client:
        statuses = await asyncio.gather(*(_stream(client, url, key) for _ in range(STREAMS)))
    assert 200 in statuses, statuses
    await asyncio.sleep(3)  # settlements flushed, leases idle (1.5 s) and closed
    async with honest.engine.connect() as connection:
        spent, most = (await connection.execute(text(
            "SELECT coalesce(sum(u.cost_uusd), 0), coalesce(max(u.completion_tokens), 0) "
            "FROM usage_records u JOIN users s ON s.id = u.user_id WHERE s.email = :e"),
            {"e": email})).one()
    # The upstream was sent max_tokens=200 and generated 200 per request: no request can have
    # cost more completion tokens than that, and the key cannot have spent past its cap.
    assert most <= MAX_TOKENS, f"a request was charged {most} completion tokens (limit sent: 200)"
    assert spent <= CAP_UUSD, (
        f"the key capped at ${CAP_UUSD / 1e6} spent ${spent / 1e6} "
        f"({statuses.count(200)} of {STREAMS} streams admitted)")
