"""A ``dubhe serve`` with two workers, Stripe's webhook configured and a model priced so that a
few tokens are real money, on SQLite and PostgreSQL: plans, renewals and payments are tried
against it as a customer (and an attacker) would, over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
import stripe
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from dubhe.database import create_engine
from dubhe.models.base import utcnow
from tests.conftest import (
    ROOMY_LIMITS,
    Server,
    Sim,
    assert_clean_log,
    execute,
    fetch_one,
    start_server,
)
from tests.recharge.conftest import assert_ledger_matches

# dubhe-fast at $0.001 per prompt token and $0.10 per completion token: ten completion tokens
# cost a dollar, so a test spends a card payment in one request.
PLANS_CONFIG = """
[defaults]
reservation_ttl_seconds = 3
lease_idle_seconds = 1.5

[models.dubhe-fast]
input_price_usd_per_mtok = "1000"
output_price_usd_per_mtok = "100000"

# Pay as you go: every token is paid from the balance.
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
models = ["dubhe-fast", "dubhe-vision", "dubhe-reasoning"]

[[upstreams]]
name = "paced"
kind = "openai"
base_url = "{paced}"
models = ["dubhe-code", "dubhe-agent"]
"""


@dataclass
class Store:
    server: Server
    root: str  # the server's base URL without /v1
    webhook_secret: str
    db: AsyncEngine

    async def new_user(self, plan: str = "free") -> tuple[str, str, int]:
        """(e-mail, API key, user id) of a new user on ``plan``."""
        email = f"{plan}-{secrets.token_hex(5)}@example.com"
        key = self.server.new_account(email, plan=plan)
        row = await fetch_one(self.db, "SELECT id FROM users WHERE email = :e", e=email)
        return email, key, int(row["id"])

    def show(self, email: str) -> dict[str, Any]:
        return json.loads(self.server.cli("users", "show", email).stdout)  # type: ignore[no-any-return]

    async def deliver(self, payload: bytes) -> httpx.Response:
        signature = stripe.WebhookSignature.generate_signature_header(payload.decode(),
                                                                      self.webhook_secret)
        async with httpx.AsyncClient(timeout=30) as client:
            return await client.post(f"{self.root}/api/stripe/webhook", content=payload,
                                     headers={"content-type": "application/json",
                                              "stripe-signature": signature})

    async def ask(self, key: str, content: str, model: str = "dubhe-fast",
                  **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        async with httpx.AsyncClient(timeout=30) as client:
            return await client.post(f"{self.server.base_url}/chat/completions", json=body,
                                     headers={"authorization": f"Bearer {key}"})

    async def end_period(self, user_id: int, *, ago_seconds: float, start: datetime) -> None:
        """Move the account's period end into the past (the clock moves; no counter does).
        The workers learn of it as of any change to an account, by its epoch: a lease they hold
        keeps the period end it was taken with, which real time would have reached."""
        await execute(self.db, "UPDATE accounts SET period_start = :s, period_end = :e, "
                      "epoch = epoch + 1 WHERE user_id = :u", s=start,
                      e=utcnow() - timedelta(seconds=ago_seconds), u=user_id)

    async def settled(self, user_id: int) -> dict[str, int]:
        """Once both workers have returned the account's leases (idle after 1.5 s): every
        counter equals its recomputation from the ledger, none below zero, nothing reserved."""
        deadline = time.monotonic() + 15
        while True:
            row = await fetch_one(self.db, "SELECT count(*) AS n FROM leases WHERE user_id = :u "
                                  "AND status = 'open'", u=user_id)
            if int(row["n"]) == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert int(row["n"]) == 0, "the account's leases were not returned"
        account = await assert_ledger_matches(self.db, user_id)
        assert (account["tokens_reserved"], account["balance_reserved_uusd"]) == (0, 0)
        return account

    async def ledger(self, user_id: int, kind: str) -> list[dict[str, Any]]:
        async with self.db.connect() as connection:
            rows = await connection.execute(
                text("SELECT * FROM ledger_entries WHERE user_id = :u AND kind = :k ORDER BY id"),
                {"u": user_id, "k": kind})
            return [dict(row) for row in rows.mappings().all()]



def _serve(database_url: str, sims: dict[str, Sim], tmp_path_factory: pytest.TempPathFactory,
           workers: int) -> tuple[Server, str]:
    webhook_secret = "whsec_" + secrets.token_hex(16)
    server = start_server(
        tmp_path_factory.mktemp("plans"), database_url,
        # These tests are about money, not rate limits (tests/scale is): the shipped plans'
        # limits are lifted.
        PLANS_CONFIG.format(fast=sims["fast"].base_url, paced=sims["paced"].base_url)
        + ROOMY_LIMITS,
        workers=workers,
        DUBHE_STRIPE_SECRET_KEY="sk_test_" + secrets.token_hex(12),
        DUBHE_STRIPE_WEBHOOK_SECRET=webhook_secret,
        DUBHE_STRIPE_API_BASE="http://127.0.0.1:9",  # no test here creates a session at Stripe
    )
    return server, webhook_secret


@asynccontextmanager
async def _store(server: Server, webhook_secret: str) -> AsyncIterator[Store]:
    engine = create_engine(server.database_url)
    try:
        yield Store(server, server.base_url.removesuffix("/v1"), webhook_secret, engine)
    finally:
        await engine.dispose()
        server.running.stop()
        assert_clean_log(server)


@pytest.fixture(scope="session")
async def store(database_url: str, sims: dict[str, Sim],
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Store]:
    """One worker: for what happens in one transaction (webhooks, plan purchases)."""
    async with _store(*_serve(database_url, sims, tmp_path_factory, workers=1)) as running:
        yield running


@pytest.fixture(scope="session")
async def store2(database_url: str, sims: dict[str, Sim],
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Store]:
    """Two workers, each leasing credit: for what must reach every worker's lease."""
    async with _store(*_serve(database_url, sims, tmp_path_factory, workers=2)) as running:
        yield running
