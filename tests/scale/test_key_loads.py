"""A burst of requests with a key new to a worker makes one query between them, not one
database connection each (50 at once exhausted PostgreSQL's connections)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from dubhe.database import create_engine, create_sessionmaker
from dubhe.keys.cache import KeyCache
from dubhe.migrations import upgrade
from tests.conftest import fresh_database, new_user_key

SECRET = b"k" * 48


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    with fresh_database("postgresql", tmp_path) as url:
        upgrade(url)
        yield url


async def test_a_burst_with_a_new_key_makes_one_query(database: str) -> None:
    engine = create_engine(database)
    sessionmaker = create_sessionmaker(engine)
    key = (await new_user_key(sessionmaker, SECRET)).secret
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
