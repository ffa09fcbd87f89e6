"""Fixtures of the spend-cap tests: the in-process meter on a real database (SQLite and
PostgreSQL), and keys with or without a cap."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from dubhe.catalog import load_catalog
from dubhe.database import create_engine, create_sessionmaker
from dubhe.keys.service import create_user_key
from dubhe.migrations import upgrade
from tests.billing.conftest import IN_PROCESS_PLANS, Ledger
from tests.conftest import fresh_database


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
