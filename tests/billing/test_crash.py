"""SIGKILL during 50 in-flight streams loses nothing the client saw completed and holds nothing."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
from sqlalchemy import bindparam, text

from tests.billing.conftest import Billing
from tests.conftest import assert_clean_log, start_server


async def stream(session: aiohttp.ClientSession, base_url: str, key: str, tokens: int,
                 results: dict[str, bool]) -> None:
    body = {
        "model": "dubhe-code",  # the paced upstream: 40 tokens a second
        "messages": [{"role": "user", "content": f"go [[sim:tokens={tokens}]]"}],
        "stream": True,
    }
    try:
        async with session.post(base_url + "/chat/completions", json=body,
                                headers={"authorization": f"Bearer {key}"}) as response:
            request_id = response.headers["x-request-id"]
            assert response.status == 200, await response.text()
            results[request_id] = False
            async for line in response.content:
                if line.strip() == b"data: [DONE]":
                    results[request_id] = True
    except (TimeoutError, aiohttp.ClientError):
        pass  # the server died under this stream


async def test_sigkill_during_streams(
    billing: Billing, billing_database: str, billing_config_text: str, tmp_path: Path
) -> None:
    key, user_id = await billing.new_account("metered")
    await billing.credit(user_id, 10_000_000)
    # Instances of one deployment share its secret (API keys are HMACs under it).
    secret = (billing.server.data_dir / "secret_key").read_text().strip()
    victim = start_server(tmp_path, billing_database, billing_config_text, DUBHE_SECRET_KEY=secret)
    results: dict[str, bool] = {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            # Half finish within a quarter second, half would run for ten.
            tasks = [
                asyncio.create_task(stream(session, victim.base_url, key, 3 if i % 2 else 400, results))
                for i in range(50)
            ]
            deadline = time.monotonic() + 20
            while (len(results) < 50 or sum(results.values()) < 25) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(results) == 50 and sum(results.values()) == 25, results
            victim.running.process.send_signal(signal.SIGKILL)
            victim.running.process.wait()
            await asyncio.gather(*tasks)
    finally:
        victim.running.stop()  # a no-op once it is dead; stops it if an assertion came first
    completed = {request_id for request_id, done in results.items() if done}
    assert len(set(results) - completed) == 25

    # The restarted server replays the dead worker's spool, and the unused credit of its lease
    # returns once the lease's deadline passes (TTL 3 s here).
    restarted = start_server(tmp_path, billing_database, billing_config_text, DUBHE_SECRET_KEY=secret)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            async with billing.engine.connect() as connection:
                metered = (await connection.execute(
                    text("SELECT count(*) FROM usage_records WHERE user_id = :u AND request_id IN :ids")
                    .bindparams(bindparam("ids", expanding=True)),
                    {"u": user_id, "ids": sorted(completed)},
                )).scalar_one()
            if metered == len(completed):
                break
            await asyncio.sleep(0.2)
        async with billing.engine.connect() as connection:
            rows = (await connection.execute(
                text("SELECT request_id, outcome, completion_tokens, cost_uusd FROM usage_records "
                     "WHERE user_id = :u"), {"u": user_id}
            )).mappings().all()
        usage = {row["request_id"]: row for row in rows}
        # Every answer the client saw end is metered, though its server died right after.
        assert completed <= usage.keys()
        assert all(usage[r]["outcome"] == "ok" and usage[r]["completion_tokens"] == 3 for r in completed)
        account = await billing.assert_consistent(user_id)
        # Only what completed was charged; the rest of the lease went back to the balance.
        charged = sum(row["cost_uusd"] for row in rows)
        assert charged == sum(usage[r]["cost_uusd"] for r in completed)
        assert account["balance_uusd"] == 10_000_000 - charged
    finally:
        restarted.running.stop()
    assert_clean_log(restarted)
