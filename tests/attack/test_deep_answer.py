"""A 200 whose JSON nests deeper than orjson writes (it reads 1024 levels, writes 254): Dubhe
re-encodes every non-streaming answer (the public model name, its own usage, an Anthropic
answer translated), and the encoder's error escaped as a 500 with a traceback in the log while
the hold was released unused. It must be an upstream that answered something Dubhe cannot
relay: 502, the next deployment tried, nothing charged for the refused answer, no traceback."""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import (
    ROOT,
    Server,
    assert_clean_log,
    free_port,
    start_process,
    start_server,
    wait_until_up,
)
from tests.upstreams.realistic import SECRET_HOST, SECRET_IP, SECRET_KEY_PREFIX, Realistic


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory, realistic: Realistic) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("deep")
    port = free_port()
    upstream = start_process([sys.executable, "-m", "tests.attack.deep_upstream", str(port)],
                             tmp / "upstream.log")
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", upstream.process, upstream.log)
        config = f"""
[[upstreams]]
name = "deep-openai"
kind = "openai"
base_url = "http://127.0.0.1:{port}/v1"
models = ["dubhe-fast", "dubhe-code", "dubhe-reasoning"]

[[upstreams]]
name = "deep-anthropic"
kind = "anthropic"
base_url = "http://127.0.0.1:{port}/v1"
models = ["dubhe-agent"]

[[upstreams]]
name = "realistic"
kind = "openai"
base_url = "{realistic.base_url}"
models = ["dubhe-agent"]
priority = 2
"""
        server = start_server(tmp, f"sqlite+aiosqlite:///{tmp / 'dubhe.db'}", config,
                              PYTHONPATH=str(ROOT))
        yield server
        server.running.stop()
        assert_clean_log(server)
    finally:
        upstream.stop()


def usage_rows(server: Server, model: str) -> list[tuple[str, str, int]]:
    """The model's usage records, once the first is written (usage rows are spooled)."""
    for _ in range(100):
        rows = _usage_rows(server, model)
        if rows:
            return rows
        time.sleep(0.1)
    return []


def _usage_rows(server: Server, model: str) -> list[tuple[str, str, int]]:
    with sqlite3.connect(server.data_dir / "dubhe.db") as db:
        return db.execute("SELECT upstream, outcome, completion_tokens FROM usage_records "
                          "WHERE model = ? ORDER BY id", (model,)).fetchall()  # fmt: skip


def ask(server: Server, model: str, prompt: str = "hi") -> httpx.Response:
    return httpx.post(f"{server.base_url}/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {server.key('ultimate')}"},
                      json={"model": model, "messages": [{"role": "user", "content": prompt}]})


def test_an_answer_too_deep_to_reencode_is_a_502(deep: Server) -> None:
    response = ask(deep, "dubhe-fast")
    assert response.status_code == 502, response.text
    assert "Traceback" not in response.text
    # Metered once, as the failure it is: the refused answer is not the client's to pay.
    assert usage_rows(deep, "dubhe-fast") == [("deep-openai", "upstream_invalid", 0)]


def test_an_anthropic_answer_too_deep_to_translate_fails_over(deep: Server) -> None:
    response = ask(deep, "dubhe-agent")
    assert response.status_code == 200, response.text
    [(upstream, outcome, completion_tokens)] = usage_rows(deep, "dubhe-agent")
    assert (upstream, outcome) == ("realistic", "ok") and completion_tokens > 0


def test_a_usage_chunk_too_deep_to_reencode_ends_the_stream_billed_as_delivered(
    deep: Server,
) -> None:
    """The usage chunk is re-encoded with its cost at the stream's end, after settlement: that
    broke the stream (no [DONE], a traceback). It is a broken stream now, charged on Dubhe's
    count of what was relayed."""
    with httpx.stream("POST", f"{deep.base_url}/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {deep.key('ultimate')}"},
                      json={"model": "dubhe-code", "stream": True,
                            "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": "hi"}]}) as response:
        assert response.status_code == 200
        text = response.read().decode()
    assert "Paris is the capital." in text
    assert '"error"' in text.rstrip().splitlines()[-1], text  # ends with the error event
    [(upstream, outcome, completion_tokens)] = usage_rows(deep, "dubhe-code")
    assert (upstream, outcome) == ("deep-openai", "upstream_invalid") and completion_tokens > 0


def test_a_200_with_an_error_body_is_no_answer(deep: Server) -> None:
    """A JSON object was enough to be relayed as the answer: an error envelope with a 200 went
    to the client verbatim (the upstream's secrets unredacted) and was charged its prompt. A
    non-streaming answer must be a chat completion (``choices`` a list); else it is a 502."""
    response = ask(deep, "dubhe-reasoning", "an error body please")
    assert response.status_code == 502, response.text
    for secret in (SECRET_KEY_PREFIX, SECRET_HOST, SECRET_IP):
        assert secret not in response.text, response.text
    assert usage_rows(deep, "dubhe-reasoning") == [("deep-openai", "upstream_invalid", 0)]
