"""The help chat's poll at shutdown, on a real database in this process: it ends between two
polls, before the worker closes its engines (a poll still running when the event loop is torn
down has its connection's reset cancelled, and the pool logs a traceback)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dubhe.database import create_engine, create_sessionmaker
from dubhe.helpchat.feed import HelpFeed
from dubhe.migrations import upgrade
from tests.conftest import fresh_database


def test_stop_ends_the_poll_between_two_polls(tmp_path: Path) -> None:
    with fresh_database("sqlite", tmp_path) as url:
        upgrade(url)
        asyncio.run(_stop(url))


async def _stop(url: str) -> None:
    engine = create_engine(url)
    feed = HelpFeed(create_sessionmaker(engine), poll_seconds=0.01)
    try:
        with feed.listen(1) as changed:
            await asyncio.wait_for(changed.wait(), 10)  # the first poll ran
            task = feed._task
            assert task is not None and not task.done()
            await asyncio.wait_for(feed.stop(), 5)
            assert task.done() and not task.cancelled()  # it returned; it was not cancelled
    finally:
        await engine.dispose()
