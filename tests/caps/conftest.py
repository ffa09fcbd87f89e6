"""Fixtures of the spend-cap tests: the in-process meter on a real database (SQLite and
PostgreSQL), and keys with or without a cap."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from dubhe.billing.meter import Denied, Meter, Reserved
from dubhe.catalog import load_catalog
from dubhe.database import create_engine, create_sessionmaker
from dubhe.keys.service import create_user_key
from dubhe.migrations import upgrade
from dubhe.models.base import utcnow
from dubhe.usage.events import UsageEvent
from tests.billing.conftest import IN_PROCESS_PLANS, Ledger
from tests.conftest import fresh_database

# What each request of these tests asks for, and its usage.
PROMPT = 100
MAX_TOKENS = 1000


def used(user_id: int, key_id: int, request_id: str, completion: int) -> UsageEvent:
    return UsageEvent(request_id=request_id, user_id=user_id, api_key_id=key_id,
                      model="dubhe-fast", upstream="test", stream=False, outcome="ok",
                      status_code=200, latency_ms=1, created_at=utcnow(), prompt_tokens=PROMPT,
                      completion_tokens=completion)


async def reserve(meter: Meter, user_id: int, key_id: int, cap: int | None,
                  max_tokens: int = MAX_TOKENS) -> tuple[str, Reserved | Denied]:
    request_id = secrets.token_hex(8)
    answer = await meter.reserve(user_id=user_id, request_id=request_id, api_key_id=key_id,
                                 model="dubhe-fast", prompt_tokens=PROMPT, max_tokens=max_tokens,
                                 spend_cap_uusd=cap)
    return request_id, answer


class CapLedger(Ledger):
    async def key(self, user_id: int, cap_uusd: int | None) -> int:
        async with self.sessionmaker() as session, session.begin():
            created = await create_user_key(session, user_id, secret=b"s" * 32,
                                            spend_cap_uusd=cap_uusd)
            return created.key.id

    async def key_spend(self, key_id: int) -> tuple[int, int]:
        """(what the key's usage records cost, what its cap leases say it used)."""
        async with self.engine.connect() as connection:
            spent = (await connection.execute(text(
                "SELECT coalesce(sum(cost_uusd), 0) FROM usage_records WHERE api_key_id = :k"),
                {"k": key_id})).scalar_one()
            used = (await connection.execute(text(
                "SELECT coalesce(sum(uusd_used), 0) FROM key_cap_leases WHERE api_key_id = :k"),
                {"k": key_id})).scalar_one()
        return int(spent), int(used)

    async def open_cap_leases(self, key_id: int) -> int:
        async with self.engine.connect() as connection:
            return int((await connection.execute(text(
                "SELECT count(*) FROM key_cap_leases WHERE api_key_id = :k AND status = 'open'"),
                {"k": key_id})).scalar_one())


@pytest.fixture(params=["sqlite", "postgresql"])
def caps_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        upgrade(url)
        yield url


@pytest.fixture
async def caps(caps_database: str, tmp_path: Path) -> AsyncIterator[CapLedger]:
    (tmp_path / "dubhe.toml").write_text(IN_PROCESS_PLANS)
    engine = create_engine(caps_database)
    try:
        yield CapLedger(engine, create_sessionmaker(engine), load_catalog(tmp_path / "dubhe.toml"),
                        tmp_path)
    finally:
        await engine.dispose()
