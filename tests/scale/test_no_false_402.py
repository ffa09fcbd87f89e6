"""No false 402 across workers: an account with credit for exactly K requests, hit by 4K at once
spread over two instances of two workers each (one PostgreSQL), serves exactly K, refuses the
rest with 402, and its ledger reconciles once the leases are returned.

Without lease recall, each worker's lease keeps a fragment of the account's last credit: the
worker that finds the account short refuses (or clamps) while the credit it needs sits unused in
another worker's lease."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from dubhe.billing.pricing import cost_uusd, format_usd
from dubhe.catalog import load_catalog
from dubhe.database import create_engine
from tests.billing.conftest import hold_prompt, prompt_tokens
from tests.conftest import Server, Sim, assert_clean_log, fresh_database, start_server

K = 12
# Every admitted request waits 3 s for its first byte, so none settles (and returns the unused
# part of its prompt bound) before every refusal is decided: the count is exact.
PROMPT = "recall [[sim:tokens=5000]] [[sim:delay_ms=3000]]"
MAX_TOKENS = 400
BODY = {"model": "dubhe-fast", "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS}
HOLD_PROMPT = hold_prompt(BODY)
REQUEST_TOKENS = HOLD_PROMPT + MAX_TOKENS  # what each request holds
REQUEST_USAGE = prompt_tokens(PROMPT) + MAX_TOKENS  # what each one is charged

CONFIG = """
[defaults]
reservation_ttl_seconds = 6
lease_idle_seconds = 1

[plans.exact]
name = "Exact"
price_usd = "0"
models = ["dubhe-fast"]
included_tokens = {included}
requests_per_minute = 100000
tokens_per_minute = 100000000
concurrent_requests = 1000

[plans.metered]
name = "Metered"
price_usd = "0"
models = ["dubhe-fast"]
included_tokens = 0
requests_per_minute = 100000
tokens_per_minute = 100000000
concurrent_requests = 1000

[[upstreams]]
name = "fast"
kind = "openai"
base_url = "{fast}"
models = ["dubhe-fast"]
"""


@dataclass
class Pair:
    a: Server
    b: Server
    engine: AsyncEngine

    async def new_account(self, plan: str = "exact", *key_args: str) -> tuple[str, int]:
        email = f"{plan}-{secrets.token_hex(4)}@example.com"
        self.a.cli("users", "create", email, "--password", "correct-horse-battery",
                   "--plan", plan)
        if plan == "metered":
            self.a.cli("balance", "add", email, "100")
        key = self.a.cli("keys", "create", email, *key_args).stdout.strip()
        async with self.engine.connect() as connection:
            row = await connection.execute(text("SELECT id FROM users WHERE email = :e"),
                                           {"e": email})
            return key, int(row.scalar_one())


@pytest.fixture(scope="module")
def pair_servers(sims: dict[str, Sim],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    tmp = tmp_path_factory.mktemp("recall")
    config = CONFIG.format(included=K * REQUEST_TOKENS, fast=sims["fast"].base_url)
    with fresh_database("postgresql", tmp) as url:
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        secret = secrets.token_urlsafe(48)
        a = start_server(tmp / "a", url, config, workers=2, DUBHE_SECRET_KEY=secret)
        try:
            b = start_server(tmp / "b", url, config, workers=2, DUBHE_SECRET_KEY=secret)
        except BaseException:
            a.running.stop()
            raise
        try:
            yield a, b
        finally:
            a.running.stop()
            b.running.stop()
        assert_clean_log(a)
        assert_clean_log(b)


@pytest.fixture
async def pair(pair_servers: tuple[Server, Server]) -> AsyncIterator[Pair]:
    a, b = pair_servers
    engine = create_engine(a.database_url)
    try:
        yield Pair(a, b, engine)
    finally:
        await engine.dispose()


async def _reconciled(engine: AsyncEngine, user_id: int) -> dict[str, int]:
    """Once every lease is back: each counter equals the sum of its column over the ledger."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        async with engine.connect() as connection:
            open_leases = (await connection.execute(
                text("SELECT count(*) FROM leases WHERE user_id = :u AND status = 'open'"),
                {"u": user_id})).scalar_one()
        if open_leases == 0:
            break
        assert asyncio.get_running_loop().time() < deadline, "the leases were not returned"
        await asyncio.sleep(0.2)
    counters = ("tokens_available", "tokens_reserved", "balance_uusd", "balance_reserved_uusd",
                "debt_uusd", "debt_tokens", "uncollected_uusd")
    async with engine.connect() as connection:
        account = dict((await connection.execute(
            text("SELECT * FROM accounts WHERE user_id = :u"), {"u": user_id})).mappings().one())
        sums = (await connection.execute(text(
            "SELECT " + ", ".join(f"coalesce(sum({name}), 0)" for name in counters)
            + " FROM ledger_entries WHERE user_id = :u"), {"u": user_id})).one()
    for name, total in zip(counters, sums, strict=True):
        assert account[name] == total, (name, account[name], total)
        assert account[name] >= 0, name
    return account


async def _race(pair: Pair, key: str) -> list[httpx.Response]:
    """4K requests at once, alternating between the two instances."""
    count = 4 * K
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        return await asyncio.gather(*(
            client.post(server.base_url + "/chat/completions", json=BODY,
                        headers={"authorization": f"Bearer {key}"})
            for server in [pair.a, pair.b] * (count // 2)
        ))


async def test_an_account_for_k_requests_serves_exactly_k_across_workers(pair: Pair) -> None:
    key, user_id = await pair.new_account()
    count = 4 * K
    responses = await _race(pair, key)
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 402]
    assert len(served) + len(refused) == count, sorted({r.status_code for r in responses})
    clamped = [r.headers["x-dubhe-max-tokens-clamped"] for r in served
               if "x-dubhe-max-tokens-clamped" in r.headers]
    assert (len(served), clamped) == (K, []), "credit stayed in other workers' leases"
    for response in served:
        assert response.json()["usage"]["total_tokens"] == REQUEST_USAGE
        # The header reports the account (available plus what every lease holds unused), not
        # the one worker's lease: nothing the account had is spent beyond the 12 requests.
        shown = int(response.headers["x-dubhe-tokens-remaining"])
        assert K * (REQUEST_TOKENS - REQUEST_USAGE) <= shown <= K * REQUEST_TOKENS - REQUEST_USAGE
    for response in refused:
        assert response.json()["error"]["code"] == "insufficient_quota"
    account = await _reconciled(pair.engine, user_id)
    # All that is left is what the prompt bounds held beyond the simulator's count.
    assert account["tokens_available"] == K * (REQUEST_TOKENS - REQUEST_USAGE)
    assert account["tokens_reserved"] == 0


async def test_a_key_capped_at_k_requests_serves_exactly_k_across_workers(pair: Pair) -> None:
    """The same for a key's monthly spend cap (``billing/caps.py``): the account can pay for
    many more, the cap for exactly K, and the cap's headroom is recalled like credit."""
    model = load_catalog(None).models["dubhe-fast"]
    each = cost_uusd(model, HOLD_PROMPT, MAX_TOKENS)
    key, user_id = await pair.new_account("metered", "--spend-cap-usd", format_usd(K * each))
    responses = await _race(pair, key)
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 402]
    assert len(served) + len(refused) == 4 * K, sorted({r.status_code for r in responses})
    clamped = [r.headers["x-dubhe-max-tokens-clamped"] for r in served
               if "x-dubhe-max-tokens-clamped" in r.headers]
    assert (len(served), clamped) == (K, []), "headroom stayed in other workers' cap leases"
    for response in refused:
        assert "spend cap" in response.json()["error"]["message"]
    await _reconciled(pair.engine, user_id)
    async with pair.engine.connect() as connection:
        spent = (await connection.execute(text(
            "SELECT coalesce(sum(cost_uusd), 0) FROM usage_records WHERE user_id = :u"),
            {"u": user_id})).scalar_one()
    assert spent == K * cost_uusd(model, prompt_tokens(PROMPT), MAX_TOKENS) <= K * each
