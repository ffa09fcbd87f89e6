"""Disconnects cancel the upstream at once; every outcome leaves one usage record."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import httpx
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import Server, Sim, wait_for_row


async def test_client_disconnect_cancels_the_upstream_and_is_metered(
    server: Server, sims: dict[str, Sim], db: AsyncEngine
) -> None:
    paced = sims["paced"]  # 40 tokens/s: a 400-token answer would take 10 s
    before = paced.stats()
    body = {
        "model": "dubhe-code",
        "messages": [{"role": "user", "content": "long [[sim:tokens=400]]"}],
        "stream": True,
    }
    headers = {"authorization": f"Bearer {server.key('ultimate')}"}
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        response = await session.post(server.base_url + "/chat/completions", json=body, headers=headers)
        request_id = response.headers["x-request-id"]
        events = 0
        async for line in response.content:
            if line.startswith(b"data: "):
                events += 1
            if events == 6:
                break
        response.close()  # the client goes away mid-stream

    deadline = time.monotonic() + 3
    while paced.stats()["disconnected"] == before["disconnected"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    after = paced.stats()
    assert after["disconnected"] == before["disconnected"] + 1, "the upstream was not cancelled"
    assert time.monotonic() - started < 5

    record = await wait_for_row(
        db, "SELECT * FROM usage_records WHERE request_id = :r", r=request_id
    )
    assert record is not None
    assert record["outcome"] == "client_cancelled"
    assert record["usage_source"] == "estimated"
    # Six events reached the client: the role chunk and five tokens; a few more may have been
    # relayed before the disconnect was seen, never the whole answer.
    assert 5 <= record["completion_tokens"] < 100
    assert record["prompt_tokens"] > 0


async def test_disconnect_while_waiting_for_the_first_byte(
    server: Server, sims: dict[str, Sim], db: AsyncEngine
) -> None:
    """A non-streaming answer is not cancelled by the client's leaving: the bounded request
    finishes and is charged on the upstream's own usage (README, Billing)."""
    fast = sims["fast"]
    before = fast.stats()
    body = {"model": "dubhe-fast", "messages": [{"role": "user", "content": "x [[sim:delay_ms=3000]]"}]}
    headers = {"authorization": f"Bearer {server.key('ultimate')}"}
    async with httpx.AsyncClient() as client:
        try:
            await client.post(server.base_url + "/chat/completions", json=body, headers=headers, timeout=0.5)
        except httpx.ReadTimeout:
            pass
    deadline = time.monotonic() + 10
    while fast.stats()["completed"] == before["completed"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    after = fast.stats()
    assert after["completed"] == before["completed"] + 1
    assert after["disconnected"] == before["disconnected"]
    record = await wait_for_row(
        db,
        "SELECT * FROM usage_records WHERE outcome = 'client_cancelled' AND stream = false "
        "AND completion_tokens = 16 ORDER BY id DESC",
    )
    assert record is not None and record["usage_source"] == "upstream"


async def test_cut_stream_is_counted_with_the_tokenizer(server: Server, db: AsyncEngine) -> None:
    body = {
        "model": "dubhe-fast",
        "messages": [{"role": "user", "content": "x [[sim:tokens=40]] [[sim:cut_after=11]]"}],
        "stream": True,
    }
    response = httpx.post(
        server.base_url + "/chat/completions",
        content=orjson.dumps(body),
        headers={"authorization": f"Bearer {server.key('ultimate')}"},
    )
    record = await wait_for_row(
        db, "SELECT * FROM usage_records WHERE request_id = :r", r=response.headers["x-request-id"]
    )
    assert record["outcome"] == "stream_interrupted"
    assert record["usage_source"] == "estimated"
    # Events 2..11 carried one token each (event 1 is the role chunk).
    assert record["completion_tokens"] == 10


async def test_failures_leave_a_record_too(server: Server, db: AsyncEngine) -> None:
    headers = {"authorization": f"Bearer {server.key('ultimate')}"}
    failing = {"model": "dubhe-fast", "messages": [{"role": "user", "content": "x [[sim:status=500]]"}]}
    unreachable = {"model": "dubhe-qwen", "messages": [{"role": "user", "content": "x"}]}
    for body, outcome, status in ((failing, "upstream_error", 500), (unreachable, "upstream_unreachable", 502)):
        response = httpx.post(server.base_url + "/chat/completions", json=body, headers=headers)
        assert response.status_code == status
        record = await wait_for_row(
            db, "SELECT * FROM usage_records WHERE request_id = :r", r=response.headers["x-request-id"]
        )
        assert record is not None
        assert (record["outcome"], record["status_code"]) == (outcome, status)
        assert record["completion_tokens"] == 0


async def test_last_used_at_is_kept(server: Server, db: AsyncEngine) -> None:
    key = server.new_key("free")
    response = httpx.post(
        server.base_url + "/chat/completions",
        json={"model": "dubhe-fast", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200
    row = await wait_for_row(
        db,
        "SELECT k.last_used_at FROM api_keys k JOIN usage_records u ON u.api_key_id = k.id "
        "WHERE u.request_id = :r AND k.last_used_at IS NOT NULL",
        r=response.headers["x-request-id"],
    )
    assert row is not None
