"""Changes are pushed: the migration's trigger notifies, and a worker's listener hears it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from dubhe.database import create_engine
from dubhe.migrations import upgrade
from dubhe.pubsub import ChangeListener
from tests.conftest import fresh_database


@pytest.fixture
def migrated_postgres(tmp_path: Path) -> Iterator[str]:
    with fresh_database("postgresql", tmp_path) as url:
        upgrade(url)
        yield url


async def test_a_key_change_wakes_every_listener(migrated_postgres: str) -> None:
    url = migrated_postgres
    heard = [asyncio.Event(), asyncio.Event()]  # two workers
    listeners = [ChangeListener(url, event.set) for event in heard]
    for listener in listeners:
        listener.start()
    engine = create_engine(url)
    try:
        # Each listener wakes its cache once when it connects (changes it may have missed).
        for event in heard:
            await asyncio.wait_for(event.wait(), 30)
            event.clear()
        async with engine.begin() as connection:
            # A statement that touches no row still fires the statement-level trigger.
            await connection.execute(text(
                "UPDATE api_keys SET revoked_at = now(), updated_at = now() WHERE id = -1"))
        for event in heard:
            await asyncio.wait_for(event.wait(), 30)
    finally:
        for listener in listeners:
            await listener.stop()
        await engine.dispose()
