"""Changes are pushed: the migration's trigger notifies, and a worker's listener hears it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from dubhe.accounts.service import create_user
from dubhe.admin.maintenance import MaintenanceRepository
from dubhe.billing.repository import BillingRepository
from dubhe.catalog import load_catalog
from dubhe.database import create_engine, create_sessionmaker
from dubhe.migrations import upgrade
from dubhe.models.base import utcnow
from dubhe.pubsub import CHANGES, EPOCHS, RECALL, ChangeListener
from tests.conftest import fresh_database


@pytest.fixture
def migrated_postgres(tmp_path: Path) -> Iterator[str]:
    with fresh_database("postgresql", tmp_path) as url:
        upgrade(url)
        yield url


async def test_a_key_change_wakes_every_listener(migrated_postgres: str) -> None:
    url = migrated_postgres
    heard = [asyncio.Event(), asyncio.Event()]  # two workers
    listeners = []
    for event in heard:
        listener = ChangeListener(url)
        listener.subscribe(CHANGES, lambda _table, event=event: event.set())
        listener.on_connect(event.set)
        listener.start()
        listeners.append(listener)
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


async def _listening(url: str) -> tuple[ChangeListener, dict[str, list[str]]]:
    """A listener on every channel, connected, with what it hears per channel."""
    heard: dict[str, list[str]] = {CHANGES: [], EPOCHS: [], RECALL: []}
    listener = ChangeListener(url)
    for channel, payloads in heard.items():
        listener.subscribe(channel, payloads.append)
    listener.start()
    await asyncio.wait_for(listener.listening.wait(), 30)
    return listener, heard


async def _heard(payloads: list[str], expected: str) -> None:
    async def wait() -> None:
        while expected not in payloads:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), 30)


async def test_epochs_maintenance_and_recalls_are_pushed(migrated_postgres: str) -> None:
    url = migrated_postgres
    listener, heard = await _listening(url)
    engine = create_engine(url)
    try:
        sessionmaker = create_sessionmaker(engine)
        async with sessionmaker() as session, session.begin():
            user = await create_user(session, "push@example.com", "a long password",
                                     catalog=load_catalog(Path("/nonexistent/dubhe.toml")))
            user_id = user.id
        # A flush's counter update does not notify; an epoch bump does, with the new epoch.
        async with engine.begin() as connection:
            await connection.execute(text(
                "UPDATE accounts SET tokens_available = 5 WHERE user_id = :u"), {"u": user_id})
        async with engine.begin() as connection:
            await connection.execute(text(
                "UPDATE accounts SET epoch = epoch + 1 WHERE user_id = :u"), {"u": user_id})
        await _heard(heard[EPOCHS], f"{user_id} 1")
        assert heard[EPOCHS] == [f"{user_id} 1"]
        # A maintenance switch, made through its repository as the admin console makes it.
        async with sessionmaker() as session, session.begin():
            assert await MaintenanceRepository.from_session(session).switch(
                "dubhe-fast", True, utcnow())
        await _heard(heard[CHANGES], "model_maintenance")
        # A recall, sent as a short worker's refill sends it: on commit.
        async with sessionmaker() as session, session.begin():
            await BillingRepository.from_session(session).recall_leases(user_id)
            await asyncio.sleep(0.2)
            assert heard[RECALL] == []  # not before the transaction commits
        await _heard(heard[RECALL], str(user_id))
    finally:
        await listener.stop()
        await engine.dispose()
