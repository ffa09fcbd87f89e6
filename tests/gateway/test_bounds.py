"""Admission bounds end to end: ``dubhe serve`` in front of the realistic test upstream
(``tests/upstreams/realistic.py``: it counts prompts by the byte-level worst case, honours
``max_completion_tokens`` before ``max_tokens``, and keeps its own ledger per request id).

An account with ``T`` included tokens asks for far more output than it can pay for, and the
upstream is told to generate without end (``[[up:tokens=...]]``), so each choice runs to its
limit. The hold is clamped: each choice gets ``floor((T - bound) / n)`` tokens, and the hold then
lies in ``(T - n, T]``. What the upstream charges must fit in it, and the account is charged
exactly the upstream's count, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dubhe.accounts.service import create_user
from dubhe.catalog import load_catalog
from dubhe.database import create_engine, create_sessionmaker
from dubhe.keys.service import create_key
from dubhe.settings import Settings
from tests.conftest import Server, assert_clean_log, start_server
from tests.upstreams.realistic import Realistic

PLAN_TOKENS = 12_000
LONG_MODEL_NAME = "organisation/a-much-longer-upstream-model-name-than-the-public-one"


@pytest.fixture(scope="module")
def bounds_server(
    database_url: str, realistic: Realistic, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    config = f"""
[plans.bounded]
name = "Bounded"
price_usd = "0"
models = ["dubhe-fast", "dubhe-agent", "dubhe-reasoning"]
included_tokens = {PLAN_TOKENS}
requests_per_minute = 100000
tokens_per_minute = 100000000
concurrent_requests = 1000

[[upstreams]]
name = "both-fields"
base_url = "{realistic.base_url}"
models = ["dubhe-fast", "dubhe-agent"]

[[upstreams]]
name = "reasoning-style"
base_url = "{realistic.base_url}"
models = ["dubhe-reasoning"]
model_map = {{ "dubhe-reasoning" = "{LONG_MODEL_NAME}" }}
output_limit_fields = ["max_completion_tokens"]
"""
    server = start_server(tmp_path_factory.mktemp("bounds"), database_url, config)
    try:
        yield server
    finally:
        server.running.stop()
    assert_clean_log(server)


ACCOUNTS = 16  # each test and each generated body gets a fresh account with PLAN_TOKENS


@pytest.fixture(scope="module")
def keys(bounds_server: Server) -> list[str]:
    """Fresh accounts on the Bounded plan, made through the services (the operator CLI costs
    seconds a call on this machine), one short transaction each: SQLite has one writer."""

    async def create() -> list[str]:
        catalog = load_catalog(Path(bounds_server.env["DUBHE_CONFIG"]))
        secret = Settings(data_dir=bounds_server.data_dir).resolved_secret
        engine = create_engine(bounds_server.database_url)
        made = []
        try:
            for _ in range(ACCOUNTS):
                email = f"bounded-{secrets.token_hex(4)}@example.com"
                async with create_sessionmaker(engine)() as session, session.begin():
                    await create_user(session, email, "correct-horse-battery", catalog=catalog,
                                      plan="bounded")
                    made.append((await create_key(session, email, secret=secret)).secret)
        finally:
            await engine.dispose()
        return made

    made = asyncio.run(create())
    time.sleep(1.5)  # the server's key cache refreshes every second
    return made


ENDLESS = " [[up:tokens=1000000]]"  # the upstream generates until its limit stops it


def charged(realistic: Realistic, response: httpx.Response) -> dict[str, Any]:
    charge = realistic.charged(response.headers["x-request-id"])
    assert charge is not None and charge["finished"], charge
    return charge


def check_hold_covers_the_charge(realistic: Realistic, response: httpx.Response, n: int) -> int:
    """The upstream generated exactly the clamped limit per choice, and charged no more than
    the hold: bound + granted × n with granted = floor((T - bound) / n), so above T - n."""
    charge = charged(realistic, response)
    granted = int(response.headers["x-dubhe-max-tokens-clamped"])
    assert charge["completion_tokens"] == granted * n
    assert charge["total_tokens"] <= PLAN_TOKENS - n + 1
    return int(charge["total_tokens"])


def test_one_max_tokens_cannot_hide_a_larger_max_completion_tokens(
    bounds_server: Server, realistic: Realistic, keys: list[str]
) -> None:
    """The issue's repro: max_tokens 1 held, max_completion_tokens 200,000 read upstream."""
    client = openai.OpenAI(base_url=bounds_server.base_url, api_key=keys.pop(), max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="dubhe-fast", messages=[{"role": "user", "content": "write a lot" + ENDLESS}],
        max_tokens=1, max_completion_tokens=200_000,
    )
    assert charged(realistic, raw.http_response)["completion_tokens"] == 1
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.completion_tokens == 1


def test_no_limit_sends_the_default_and_a_reasoning_upstream_reads_its_one_field(
    bounds_server: Server, realistic: Realistic, keys: list[str]
) -> None:
    client = openai.OpenAI(base_url=bounds_server.base_url, api_key=keys.pop(), max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="dubhe-fast", messages=[{"role": "user", "content": "hi" + ENDLESS}])
    assert charged(realistic, raw.http_response)["completion_tokens"] == 4096

    raw = client.chat.completions.with_raw_response.create(
        model="dubhe-reasoning", messages=[{"role": "user", "content": "think" + ENDLESS}],
        max_tokens=700,
    )
    assert charged(realistic, raw.http_response)["completion_tokens"] == 700
    assert raw.parse().model == "dubhe-reasoning"


def test_n_choices_are_clamped_per_choice_and_charged_in_full(
    bounds_server: Server, realistic: Realistic, keys: list[str]
) -> None:
    key = keys.pop()
    client = openai.OpenAI(base_url=bounds_server.base_url, api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="dubhe-fast", messages=[{"role": "user", "content": "three stories" + ENDLESS}],
        n=3, max_completion_tokens=100_000,
    )
    charge = check_hold_covers_the_charge(realistic, raw.http_response, 3)
    completion = raw.parse()
    assert len(completion.choices) == 3
    assert completion.usage is not None and completion.usage.total_tokens == charge
    assert int(raw.headers["x-dubhe-tokens-remaining"]) == PLAN_TOKENS - charge
    # Not even one token per choice is left for the next request: 402, not a rounded-up 1.
    refused = httpx.post(
        bounds_server.base_url + "/chat/completions", timeout=60,
        headers={"authorization": f"Bearer {key}"},
        json={"model": "dubhe-fast", "n": 128, "messages": [{"role": "user", "content": "x"}]},
    )
    assert refused.status_code == 402, refused.text
    assert refused.json()["error"]["code"] == "insufficient_quota"


TEXT = st.text(max_size=60)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
        {"url": st.binary(max_size=2_000).map(lambda b: "data:image/png;base64," + b.hex())})}),
)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.just("user"),
                           "content": st.one_of(TEXT, st.lists(PART, min_size=1, max_size=2))},
                          optional={"name": st.text(min_size=1, max_size=10)}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none(),
                           "tool_calls": st.lists(st.fixed_dictionaries({
                               "id": st.text(min_size=1, max_size=8), "type": st.just("function"),
                               "function": st.fixed_dictionaries(
                                   {"name": st.text(min_size=1, max_size=8), "arguments": TEXT})}),
                               min_size=1, max_size=2)}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": TEXT,
                           "tool_call_id": st.text(min_size=1, max_size=8)}),
)
BODY = st.fixed_dictionaries(
    {"model": st.just("dubhe-agent"), "messages": st.lists(MESSAGE, min_size=1, max_size=3),
     "max_tokens": st.just(900_000)},
    optional={
        "n": st.integers(1, 4),
        "stream": st.booleans(),
        "max_completion_tokens": st.just(500_000),
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"),
                                                 "function": st.fixed_dictionaries(
                                                     {"name": st.text(min_size=1, max_size=10),
                                                      "description": TEXT})}),
                          min_size=1, max_size=2),
        "response_format": st.fixed_dictionaries({"type": st.just("json_schema"),
                                                  "json_schema": st.fixed_dictionaries(
                                                      {"name": st.just("s"),
                                                       "schema": st.just({"type": "object"})})}),
        "metadata": st.dictionaries(st.text(max_size=5), TEXT, max_size=2),
    },
)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODY)
def test_generated_bodies_never_cost_more_than_their_hold(
    bounds_server: Server, realistic: Realistic, keys: list[str], body: dict[str, Any]
) -> None:
    body["messages"].append({"role": "user", "content": "go on" + ENDLESS})
    response = httpx.post(
        bounds_server.base_url + "/chat/completions", timeout=60,
        headers={"authorization": f"Bearer {keys.pop()}"}, content=orjson.dumps(body),
    )
    assert response.status_code == 200, response.text
    check_hold_covers_the_charge(realistic, response, body.get("n", 1))
