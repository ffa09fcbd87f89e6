"""Unknown API keys cost no database query: the key cache answers them from its filter of every
key hash. A key created after the filter was loaded still works, within one refresh."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, update

from dubhe.database import create_engine, create_sessionmaker
from dubhe.errors import AuthenticationFailed
from dubhe.keys import cache as cache_module
from dubhe.keys.cache import KeyCache
from dubhe.keys.format import generate_key, hash_key
from dubhe.migrations import upgrade
from dubhe.models import ApiKey
from dubhe.models.base import utcnow
from tests.conftest import fresh_database, new_user_key

SECRET = b"k" * 48


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        upgrade(url)
        yield url


async def test_guessed_keys_cost_no_query_and_new_keys_still_work(database: str) -> None:
    engine = create_engine(database)
    statements: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    sessionmaker = create_sessionmaker(engine)

    async def new_key() -> str:
        return str((await new_user_key(sessionmaker, SECRET)).secret)

    existing = await new_key()
    cache = KeyCache(sessionmaker, SECRET, refresh_seconds=1.0)
    try:
        await cache.load()
        cache.start()
        assert (await cache.authenticate(b"Bearer " + existing.encode())).key_id > 0

        statements.clear()
        guesses = [generate_key() for _ in range(500)]
        results = await asyncio.gather(
            *(cache.authenticate(b"Bearer " + guess.encode()) for guess in guesses),
            return_exceptions=True,
        )
        assert all(isinstance(result, AuthenticationFailed) for result in results)
        # No lookup by hash; what ran is the cache's own refreshes (at most ~20 a second).
        assert not [s for s in statements if "key_hash =" in s], statements
        queries = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
        refreshes = [s for s in queries if "updated_at >" in s]
        assert refreshes == queries
        assert len(refreshes) < 40

        # A key made after the filter was loaded: accepted after (at most) one refresh.
        created = await new_key()
        identity = await cache.authenticate(b"Bearer " + created.encode())
        assert identity.key_id > 0
    finally:
        await cache.stop()
        await engine.dispose()


async def test_a_warm_header_skips_the_hmac_but_never_an_expiry_or_a_revocation(
        database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A header that authenticated before is found by a keyed BLAKE2b of it, without the
    HMAC; what it finds is the cached identity, so an expiry or a revocation the refresh
    brings in refuses it as it refuses a cold one."""
    engine = create_engine(database)
    sessionmaker = create_sessionmaker(engine)
    created = await new_user_key(sessionmaker, SECRET)
    hmacs = []

    def counted(secret: bytes, key: str) -> str:
        hmacs.append(key)
        return hash_key(secret, key)

    monkeypatch.setattr(cache_module, "hash_key", counted)
    header = b"Bearer " + created.secret.encode()
    cache = KeyCache(sessionmaker, SECRET, refresh_seconds=3600)
    try:
        await cache.load()
        first = await cache.authenticate(header)
        assert (await cache.authenticate(header)) == first
        assert hmacs == [created.secret]  # the second call found the header warm
        # Another spelling of the same key is its own header: one HMAC more, then warm too.
        assert (await cache.authenticate(b"Bearer  " + created.secret.encode())) == first
        assert len(hmacs) == 2

        for change, code in (({"expires_at": utcnow() - timedelta(seconds=1)}, "expired_api_key"),
                             ({"expires_at": None, "revoked_at": utcnow()}, "invalid_api_key")):
            async with sessionmaker() as session, session.begin():
                await session.execute(update(ApiKey).where(ApiKey.id == first.key_id)
                                      .values(**change, updated_at=utcnow()))
            await cache.refresh()
            with pytest.raises(AuthenticationFailed) as refused:
                await cache.authenticate(header)
            assert refused.value.code == code
        assert len(hmacs) == 2
    finally:
        await cache.stop()
        await engine.dispose()
