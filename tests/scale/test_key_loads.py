"""A burst of requests with a key new to a worker makes one query between them, not one
database connection each (50 at once exhausted PostgreSQL's connections)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from dubhe.accounts.service import create_user
from dubhe.catalog import load_catalog
from dubhe.database import create_engine, create_sessionmaker
from dubhe.keys.cache import KeyCache
from dubhe.keys.service import create_key
from dubhe.migrations import upgrade
from tests.conftest import fresh_database

SECRET = b"k" * 48


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    with fresh_database("postgresql", tmp_path) as url:
        upgrade(url)
        yield url


async def test_a_burst_with_a_new_key_makes_one_query(database: str) -> None:
    engine = create_engine(database)
    sessionmaker = create_sessionmaker(engine)
    catalog = load_catalog(Path("/nonexistent/dubhe.toml"))
    async with sessionmaker() as session, session.begin():
        email = f"{secrets.token_hex(4)}@example.com"
        await create_user(session, email, "a long password", catalog=catalog)
        key = (await create_key(session, email, secret=SECRET)).secret
    cache = KeyCache(sessionmaker, SECRET, refresh_seconds=60)
    await cache.load()  # the key is in the filter, not yet in the map: its first use loads it
    lookups: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "key_hash" in statement:
            lookups.append(statement)

    try:
        identities = await asyncio.gather(
            *(cache.authenticate(b"Bearer " + key.encode()) for _ in range(50)))
        assert {identity.key_id for identity in identities} == {identities[0].key_id}
        assert len(lookups) == 1
    finally:
        await engine.dispose()
