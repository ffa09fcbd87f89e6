"""A ``dubhe serve`` for the WebSocket chat, on SQLite and on PostgreSQL, with small socket limits
(so the hostile tests reach them quickly) and three upstreams: the fast and the paced simulator,
and the realistic, lying upstream (tests/upstreams/realistic.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from dubhe.catalog import load_catalog
from dubhe.database import create_engine
from tests.billing.conftest import Billing
from tests.conftest import Sim, assert_clean_log, fresh_database, start_server
from tests.upstreams.realistic import Realistic

# Small on purpose: each limit is reached by a test in a few seconds.
SOCKET_ENV = {
    # Room for a test process starved of CPU for a moment by a loaded machine.
    "DUBHE_WS_PING_INTERVAL_SECONDS": "1",
    "DUBHE_WS_PING_TIMEOUT_SECONDS": "3",
    "DUBHE_WS_IDLE_TIMEOUT_SECONDS": "6",
    "DUBHE_WS_MAX_CONCURRENT": "2",
    "DUBHE_WS_MAX_QUEUED": "1",
    "DUBHE_WS_MESSAGES_PER_SECOND": "20",
    "DUBHE_WS_MESSAGE_BURST": "40",
}
MAX_REQUEST_BYTES = 64_000


def ws_config(sims: dict[str, Sim], realistic: Realistic) -> str:
    # code: (included tokens, requests per minute)
    plans = {"roomy": (10_000_000, 100000), "tiny": (10, 100000), "metered": (0, 100000),
             "limited": (10_000_000, 2)}
    text_plans = "".join(
        f"""
[plans.{code}]
name = "{code.title()}"
price_usd = "0"
models = ["dubhe-fast", "dubhe-code", "dubhe-qwen"]
included_tokens = {included}
requests_per_minute = {rpm}
tokens_per_minute = 100000000
concurrent_requests = 1000
"""
        for code, (included, rpm) in plans.items()
    )
    return f"""
[defaults]
max_request_bytes = {MAX_REQUEST_BYTES}
reservation_ttl_seconds = 3
lease_idle_seconds = 1.5
{text_plans}
[[upstreams]]
name = "fast"
kind = "openai"
base_url = "{sims['fast'].base_url}"
models = ["dubhe-fast"]

[[upstreams]]
name = "paced"
kind = "openai"
base_url = "{sims['paced'].base_url}"
models = ["dubhe-code"]

[[upstreams]]
name = "realistic"
kind = "openai"
base_url = "{realistic.base_url}"
models = ["dubhe-qwen"]
"""


class WsBilling(Billing):
    @property
    def ws_url(self) -> str:
        return self.server.base_url.replace("http://", "ws://") + "/ws/chat"


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def ws_database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fresh_database(request.param, tmp_path_factory.mktemp("ws-db")) as url:
        yield url


@pytest.fixture(scope="session")
async def ws(
    ws_database: str,
    sims: dict[str, Sim],
    realistic: Realistic,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[WsBilling]:
    data_dir = tmp_path_factory.mktemp("ws")
    server = start_server(data_dir, ws_database, ws_config(sims, realistic), **SOCKET_ENV)
    engine = create_engine(ws_database)
    try:
        yield WsBilling(server, engine, load_catalog(Path(server.env["DUBHE_CONFIG"])))
    finally:
        await engine.dispose()
        server.running.stop()
    assert_clean_log(server)


async def next_event(socket: ClientConnection, timeout: float = 15) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(await asyncio.wait_for(socket.recv(), timeout))
    return event


async def until_done(socket: ClientConnection, request_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Events for ``request_id`` up to and including its terminal one (done or error)."""
    events: list[dict[str, Any]] = []
    while True:
        event = await next_event(socket)
        if event.get("request_id") != request_id:
            continue
        if event["type"] in ("chat.completion.done", "error"):
            return events, event
        events.append(event)


def create(request_id: str, model: str, content: str, **extra: Any) -> str:
    return json.dumps({"type": "chat.completion.create", "request_id": request_id, "model": model,
                       "messages": [{"role": "user", "content": content}], **extra})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
