"""While a streaming upstream is silent, Dubhe sends `: ping` comments; clients ignore them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import (
    BIN,
    Server,
    assert_clean_log,
    free_port,
    fresh_database,
    start_process,
    start_server,
    wait_until_up,
)


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("keepalive")
    port = free_port()
    sim = start_process(
        [str(BIN / "dubhe"), "upstream-sim", "--port", str(port), "--tokens-per-second", "2"],
        tmp / "sim.log",
    )
    wait_until_up(f"http://127.0.0.1:{port}/sim/stats", sim.process, tmp / "sim.log")
    config = f"""
[defaults]
stream_keepalive_seconds = 0.2

[[upstreams]]
name = "slow"
kind = "openai"
base_url = "http://127.0.0.1:{port}/v1"
models = ["dubhe-fast"]
"""
    with fresh_database("sqlite", tmp) as url:
        data = tmp / "data"
        data.mkdir()
        server = start_server(data, url, config)
        yield server
        server.running.stop()
        sim.stop()
        assert_clean_log(server)


def test_silent_upstream_gets_pings_and_the_sdk_ignores_them(slow_server: Server) -> None:
    key = slow_server.new_key("free")
    body = {
        "model": "dubhe-fast",
        "messages": [{"role": "user", "content": "slow [[sim:tokens=3]]"}],
        "stream": True,
    }
    response = httpx.post(
        slow_server.base_url + "/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    events = [event for event in response.text.split("\n\n") if event]
    # Half a second between tokens, a ping after 0.2 s of silence: several pings in between.
    assert events.count(": ping") >= 2
    assert events[-1] == "data: [DONE]"

    sdk = openai.OpenAI(base_url=slow_server.base_url, api_key=key, max_retries=0)
    chunks = list(sdk.chat.completions.create(**body))  # type: ignore[call-overload]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert len(text.split()) == 3
