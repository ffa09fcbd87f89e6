"""A stream whose upstream fails before any content, with its own error event (Anthropic's
``overloaded_error`` after ``message_start``; an OpenAI server's error as its first event),
has sent the client nothing: it fails over like a 529 would. It was committed instead (the
translated ``message_start``, or the error event itself, counted as the first event): the
client got a 200 with only an error frame and paid for its prompt, while another deployment
was up."""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Iterator

import httpx
import orjson
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
from tests.upstreams.realistic import Realistic, iter_events


@pytest.fixture(scope="module")
def overloaded(tmp_path_factory: pytest.TempPathFactory,
               realistic: Realistic) -> Iterator[tuple[Server, str]]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("overloaded")
    port = free_port()
    upstream = start_process(
        [sys.executable, "-m", "tests.attack.overloaded_upstream", str(port)], tmp / "up.log"
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/stats", upstream.process, upstream.log)
        config = f"""
[defaults]
stream_keepalive_seconds = 1

[[upstreams]]
name = "overloaded-anthropic"
kind = "anthropic"
base_url = "http://127.0.0.1:{port}/v1"
models = ["dubhe-agent"]
idle_timeout_seconds = 1

[[upstreams]]
name = "overloaded-openai"
kind = "openai"
base_url = "http://127.0.0.1:{port}/v1"
models = ["dubhe-code"]

[[upstreams]]
name = "realistic"
kind = "openai"
base_url = "{realistic.base_url}"
models = ["dubhe-agent", "dubhe-code"]
priority = 1
"""
        server = start_server(tmp, f"sqlite+aiosqlite:///{tmp / 'dubhe.db'}", config,
                              PYTHONPATH=str(ROOT))
        yield server, f"http://127.0.0.1:{port}"
        server.running.stop()
        assert_clean_log(server)
    finally:
        upstream.stop()


def usage_rows(server: Server, model: str) -> list[tuple[str, str]]:
    """The model's usage records, once the first is written (usage rows are spooled)."""
    for _ in range(100):
        with sqlite3.connect(server.data_dir / "dubhe.db") as db:
            rows = db.execute("SELECT upstream, outcome FROM usage_records WHERE model = ? "
                              "ORDER BY id", (model,)).fetchall()  # fmt: skip
        if rows:
            return rows
        time.sleep(0.1)
    return []


@pytest.mark.parametrize("model", ["dubhe-agent", "dubhe-code"])
def test_an_error_event_before_any_content_fails_over(
    overloaded: tuple[Server, str], model: str
) -> None:
    server, upstream = overloaded
    before = httpx.get(f"{upstream}/stats").json()["count"]
    body = {"model": model, "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hello"}]}  # fmt: skip
    response = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60,
                          headers={"authorization": f"Bearer {server.key('ultimate')}"})  # fmt: skip
    assert response.status_code == 200
    events = list(iter_events(response.content))
    assert events[-1] == b"[DONE]", response.text
    assert not any(b'"error"' in event for event in events), response.text
    text = "".join(orjson.loads(event)["choices"][0]["delta"].get("content") or ""
                   for event in events[:-1])  # fmt: skip
    assert text
    assert httpx.get(f"{upstream}/stats").json()["count"] > before  # it was tried first
    assert usage_rows(server, model) == [("realistic", "ok")]  # billed once, where it answered


def test_pings_after_the_first_content_do_not_keep_a_stream_open_forever(
    overloaded: tuple[Server, str],
) -> None:
    """Anthropic's ``ping`` events carry nothing for the client: an upstream that sends only
    them kept the connection busy, so the idle timeout never came and the stream (and its
    hold) stayed open for as long as the client waited. The pings are not the answer: past the
    idle timeout the stream ends with the error event, charged for what was delivered."""
    server, _ = overloaded
    body = {"model": "dubhe-agent", "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hello, pings forever"}]}  # fmt: skip
    content = b""
    give_up = time.monotonic() + 60  # not a timing assertion: only so a failure does not hang
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {server.key('ultimate')}"}) as response:
        assert response.status_code == 200
        for piece in response.iter_bytes():
            content += piece
            if time.monotonic() > give_up:
                pytest.fail(f"the stream was still open after 60 s: {content!r}")
    events = list(iter_events(content))
    assert orjson.loads(events[-1])["error"]["code"] == "upstream_error", content
    assert b"The answer is" in content
    rows: list[tuple[str, str]] = []
    for _ in range(100):  # usage rows are spooled: until the stream's own is written
        rows = [row for row in usage_rows(server, "dubhe-agent")
                if row[0] == "overloaded-anthropic"]  # fmt: skip
        if rows:
            break
        time.sleep(0.1)
    assert rows == [("overloaded-anthropic", "stream_interrupted")]  # charged as delivered
