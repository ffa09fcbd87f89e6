"""An upstream that ignores its output limit is paid for in full, and stops the account at once.

The attack: a small prepaid account asks for 50 tokens from an upstream that generates 20,000
whatever it is told (the realistic test upstream's ``ignore_limit``), again and again. Every
token the upstream charged must be charged to the account, from its whole credit (not only one
worker's lease); what the account cannot pay is a debt; no request is admitted on any worker
while the debt stands; the next top-up repays it; and every counter still equals its
recomputation from the ledger. On SQLite and PostgreSQL, with one worker and with two.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text

from dubhe.billing.pricing import cost_uusd
from dubhe.catalog import load_catalog
from dubhe.database import create_engine
from tests.billing.conftest import Billing
from tests.conftest import assert_clean_log, fresh_database, start_server
from tests.upstreams.realistic import Realistic, start_realistic

CREDIT_UUSD = 10_000  # $0.01: about 16,000 output tokens of dubhe-fast
OVERRUN = "tell me everything [[up:tokens=20000]][[up:ignore_limit=1]]"


def overrun_config(upstream: Realistic) -> str:
    return f"""
[defaults]
reservation_ttl_seconds = 3
lease_idle_seconds = 1.5

[plans.metered]
name = "Metered"
price_usd = "0"
models = ["dubhe-fast"]
included_tokens = 0
requests_per_minute = 100000
tokens_per_minute = 100000000
concurrent_requests = 1000

[[upstreams]]
name = "realistic"
kind = "openai"
base_url = "{upstream.base_url}"
models = ["dubhe-fast"]
"""


@pytest.fixture(scope="module")
def realistic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realistic]:
    upstream = start_realistic(tmp_path_factory.mktemp("realistic") / "realistic.log")
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module", params=[("sqlite", 1), ("postgresql", 1), ("sqlite", 2),
                                        ("postgresql", 2)],
                ids=["sqlite-1-worker", "postgresql-1-worker", "sqlite-2-workers",
                     "postgresql-2-workers"])
def overrun_server(request: pytest.FixtureRequest, realistic: Realistic,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    kind, workers = request.param
    data_dir = tmp_path_factory.mktemp(f"overrun-{kind}-{workers}")
    with fresh_database(kind, data_dir) as url:
        server = start_server(data_dir, url, overrun_config(realistic), "--workers", str(workers))
        try:
            yield server, url
        finally:
            server.running.stop()
        assert_clean_log(server)


def ask(base_url: str, key: str, content: str, *, stream: bool = False) -> httpx.Response:
    # A new connection each time, so that with two workers both take requests.
    body: dict[str, Any] = {"model": "dubhe-fast", "max_tokens": 50,
                            "messages": [{"role": "user", "content": content}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return httpx.post(base_url + "/chat/completions", json=body,
                      headers={"authorization": f"Bearer {key}", "connection": "close"},
                      timeout=60)


def reported_cost(response: httpx.Response) -> tuple[dict[str, int], str]:
    """The usage and the cost Dubhe reported: the header, or the stream's usage chunk."""
    if "x-dubhe-cost-usd" in response.headers:
        return response.json()["usage"], response.headers["x-dubhe-cost-usd"]
    events = [line.removeprefix("data: ") for line in response.text.splitlines()
              if line.startswith("data: {")]
    usage = [event for event in map(orjson.loads, events) if event.get("usage")][-1]["usage"]
    return usage, usage["cost_usd"]


async def test_an_upstream_that_ignores_its_limit_is_paid_in_full_then_refused(
    overrun_server: tuple[Any, str], realistic: Realistic
) -> None:
    server, url = overrun_server
    engine = create_engine(url)
    billing = Billing(server, engine, load_catalog(Path(server.env["DUBHE_CONFIG"])))
    model = billing.catalog.models["dubhe-fast"]
    try:
        key, user_id = await billing.new_account("metered")
        await billing.credit(user_id, CREDIT_UUSD)  # credit_balance, as every credit path

        # The attack loop: until the account is refused.
        served: list[str] = []
        for attempt in range(20):
            response = ask(server.base_url, key, OVERRUN, stream=attempt % 2 == 0)
            if response.status_code == 402:
                break
            assert response.status_code == 200, response.text
            served.append(response.headers["x-request-id"])
            # The cost header, or the stream's cost_usd, reports the full price, debt included.
            usage, cost = reported_cost(response)
            assert cost == _usd(cost_uusd(model, usage["prompt_tokens"],
                                          usage["completion_tokens"]))
        assert served, "not even the first request was served"
        assert response.status_code == 402

        owed = await _debt(billing, user_id)
        assert owed > 0
        # Every worker has learnt of the debt within a second (the epoch refresh); from then on
        # nothing is admitted anywhere, and the refusal says what is owed and what to do.
        await asyncio.sleep(1.5)
        for _ in range(12):
            refused = ask(server.base_url, key, "just a little [[up:tokens=1]]")
            assert refused.status_code == 402, refused.text
            error = refused.json()["error"]
            assert error["code"] == "insufficient_quota"
            assert "owes $" in error["message"] and "Recharge" in error["message"]

        # What the upstream charged is what the account paid plus what it owes.
        account = await billing.assert_consistent(user_id)
        charged_by_upstream = realistic.stats()["by_request"]
        records = await _records(billing, user_id, served)
        for rid in served:
            # More output than the upstream was told it may generate is not believed as
            # reported: Dubhe counts what it relayed (the prompt count, within its bound, is
            # kept). Paid in full: never less than the upstream generated, and tiktoken's count
            # of the joined words is within a few tokens of it.
            upstream = charged_by_upstream[rid]
            assert records[rid]["prompt_tokens"] == upstream["prompt_tokens"]
            assert (upstream["completion_tokens"] <= records[rid]["completion_tokens"]
                    <= upstream["completion_tokens"] + 16), (records[rid], upstream)
            assert records[rid]["usage_source"] == "estimated"
        upstream_cost = sum(
            cost_uusd(model, records[rid]["prompt_tokens"], records[rid]["completion_tokens"])
            for rid in served
        )
        assert sum(record["cost_uusd"] for record in records.values()) == upstream_cost
        assert account["debt_uusd"] > 0 and account["balance_uusd"] == 0
        assert CREDIT_UUSD - account["balance_uusd"] + account["debt_uusd"] == upstream_cost
        assert account["uncollected_uusd"] == account["debt_uusd"]

        # The next top-up repays the debt first; the account is served again.
        await billing.credit(user_id, 1_000_000)
        repaid = await billing.assert_consistent(user_id)
        assert (repaid["debt_uusd"], repaid["debt_tokens"]) == (0, 0)
        assert repaid["balance_uusd"] == CREDIT_UUSD + 1_000_000 - upstream_cost
        deadline = time.monotonic() + 10
        while (answer := ask(server.base_url, key, "again [[up:tokens=3]]")).status_code == 402:
            assert time.monotonic() < deadline, answer.text
            await asyncio.sleep(0.2)
        assert answer.status_code == 200, answer.text
        await billing.assert_consistent(user_id)
    finally:
        await engine.dispose()


def _usd(uusd: int) -> str:
    return f"{uusd // 1_000_000}.{uusd % 1_000_000:06d}"


async def _debt(billing: Billing, user_id: int) -> int:
    deadline = time.monotonic() + 10
    while True:
        debt = int((await billing.account(user_id))["debt_uusd"])
        if debt or time.monotonic() > deadline:
            return debt
        await asyncio.sleep(0.1)


async def _records(billing: Billing, user_id: int,
                   request_ids: list[str]) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        async with billing.engine.connect() as connection:
            rows = (await connection.execute(
                text("SELECT * FROM usage_records WHERE user_id = :u"), {"u": user_id}
            )).mappings().all()
        records = {row["request_id"]: dict(row) for row in rows}
        if set(request_ids) <= records.keys() or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.1)
