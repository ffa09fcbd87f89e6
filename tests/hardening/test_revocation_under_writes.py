"""A revocation reaches every worker's key cache within about a second even while writers hold
SQLite's write lock and every connection of the writers' pool: the cache's refresh has a pool of
its own and reads the last committed state instead of queueing behind them (it once waited up to
the 30 s busy timeout behind each writer, so on a loaded machine a revoked key kept working for
tens of seconds)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from dubhe.database import (
    create_engine,
    create_read_engine,
    create_read_sessionmaker,
    create_sessionmaker,
)
from dubhe.errors import AuthenticationFailed
from dubhe.keys.cache import KeyCache
from dubhe.keys.repository import ApiKeyRepository
from dubhe.migrations import upgrade
from dubhe.models import ApiKey
from dubhe.models.base import utcnow
from tests.conftest import new_user_key

SECRET = b"r" * 48


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A migrated SQLite database (sync: migrating runs its own event loop)."""
    path = tmp_path / "dubhe.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


async def test_a_revocation_reaches_the_cache_while_another_writer_holds_the_lock(
        path: Path) -> None:
    url = f"sqlite+aiosqlite:///{path}"
    engine = create_engine(url)
    sessionmaker = create_sessionmaker(engine)
    secret = (await new_user_key(sessionmaker, SECRET)).secret
    bearer = b"Bearer " + secret.encode()

    read_engine = create_read_engine(url)
    cache = KeyCache(create_read_sessionmaker(read_engine), SECRET, refresh_seconds=0.2)
    await cache.load()
    cache.start()
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writers: list[asyncio.Task[None]] = []
    try:
        assert (await cache.authenticate(bearer)).key_id > 0
        async with sessionmaker() as session, session.begin():
            key_id = await session.scalar(select(ApiKey.id))
            now = utcnow()
            await ApiKeyRepository.from_session(session).revoke(now=now, key_id=key_id)
        # Another process's writer now holds the write lock, as the meter's flushes do, and
        # this process's writers queue for it holding every connection of their pool.
        blocker.execute("BEGIN IMMEDIATE")

        async def queued_writer() -> None:
            async with sessionmaker() as session, session.begin():
                await session.connection()  # a connection from the pool, then BEGIN IMMEDIATE

        writers = [asyncio.create_task(queued_writer()) for _ in range(20)]
        await asyncio.sleep(0.5)
        started = time.monotonic()
        while time.monotonic() - started < 3:
            try:
                await cache.authenticate(bearer)
            except AuthenticationFailed:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the revoked key was still accepted 3 s later")
    finally:
        blocker.rollback()
        blocker.close()
        if writers:
            await asyncio.gather(*writers, return_exceptions=True)
        await cache.stop()
        await read_engine.dispose()
        await engine.dispose()
