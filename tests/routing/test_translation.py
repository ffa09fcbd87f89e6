"""Anthropic translation in memory: what a byte split or a broken event does to a stream, and
what the hold pays for on an Anthropic deployment."""

from __future__ import annotations

import asyncio
import random
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import orjson

from dubhe.catalog import UpstreamSpec, load_catalog
from dubhe.gateway import admission
from dubhe.gateway.validation import validate_chat_request
from dubhe.providers import anthropic
from tests.upstreams.realistic import iter_events

STREAM = b"".join(
    b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
    for kind, data in [
        ("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 9,
                                                                          "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Paris é"}}),
        ("content_block_start", {"type": "content_block_start", "index": 1,
                                 "content_block": {"type": "tool_use", "id": "t1", "name": "f"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "input_json_delta", "partial_json": "1}"}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                           "usage": {"output_tokens": 7}}),
        ("message_stop", {"type": "message_stop"}),
    ]
)  # fmt: skip


def translate(pieces: list[bytes]) -> bytes:
    """The translated stream, its creation time (the clock's second, which two translators can
    read differently) written as 0 so that two translations compare byte for byte."""
    translator = anthropic.StreamTranslator("dubhe-agent", "req_1", 1 << 20)
    translated = b"".join(translator.feed(piece) for piece in pieces)
    return re.sub(rb'"created":\d+', b'"created":0', translated)


def test_a_stream_split_anywhere_translates_the_same() -> None:
    whole = translate([STREAM])
    for cut in range(1, len(STREAM), 7):
        assert translate([STREAM[:cut], STREAM[cut:]]) == whole
    events = list(iter_events(whole))
    assert events[-1] == b"[DONE]"
    usage = orjson.loads(events[-2])["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (9, 7)
    finish = orjson.loads(events[-3])["choices"][0]
    assert finish["finish_reason"] == "tool_calls"


def test_a_stream_in_tiny_reads_or_crlf_translates_the_same() -> None:
    crlf = STREAM.replace(b"\n", b"\r\n")
    whole = translate([STREAM])
    assert translate([crlf]) == whole
    rng = random.Random(11)
    for source in (STREAM, crlf):
        assert translate([bytes([byte]) for byte in source]) == whole
        for _ in range(50):
            pieces, at = [], 0
            while at < len(source):
                size = rng.choice((1, 2, 3, 5, 64))
                pieces.append(source[at : at + size])
                at += size
            assert translate(pieces) == whole


@contextmanager
def bytes_scanned() -> Iterator[list[int]]:
    """The bytes that bytes methods called meanwhile ran over (the object each is bound to)."""
    total = [0]

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call" and isinstance(getattr(arg, "__self__", None), bytes):
            total[0] += len(arg.__self__)

    sys.setprofile(profile)
    try:
        yield total
    finally:
        sys.setprofile(None)


def test_a_giant_event_in_small_reads_costs_linear_work() -> None:
    """A hostile upstream trickling one event of megabytes in small reads: each read must not
    copy and rescan everything kept before it (that was quadratic: ~20 s of a stalled worker for
    8 MiB in 4 KiB reads)."""
    translator = anthropic.StreamTranslator("dubhe-agent", "req_1", 1 << 22)
    head = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_delta","text":"')  # fmt: skip
    reads = [STREAM.split(b"event: content_block_start")[0], head]
    reads += [b"x" * 1024] * 2048 + [b'"}}\n\n']
    fed = sum(len(read) for read in reads)
    with bytes_scanned() as scanned:
        out = b"".join(translator.feed(read) for read in reads)
    assert out.count(b"x" * 1024) == 2048  # the giant event was translated whole
    assert scanned[0] < 8 * fed


def test_a_broken_event_becomes_an_error_event_and_ends_the_stream() -> None:
    out = translate([b"event: message_start\ndata: {not json\n\n", STREAM])
    [event] = list(iter_events(out))
    assert orjson.loads(event)["error"]["type"] == "upstream_error"


def test_unbelievable_usage_is_dropped_so_dubhe_counts() -> None:
    assert anthropic.usage_object({"input_tokens": -1, "output_tokens": 3}) is None
    assert anthropic.usage_object({"input_tokens": "9", "output_tokens": 3}) is None
    assert anthropic.usage_object({"input_tokens": True, "output_tokens": 3}) is None


def test_turns_are_merged_to_alternate() -> None:
    body = {"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "user", "content": [{"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ], "presence_penalty": 1, "seed": 3, "parallel_tool_calls": False, "tools": [
        {"type": "function", "function": {"name": "f"}}]}  # fmt: skip
    out = anthropic.request_body(body, "claude", 64)
    assert [turn["role"] for turn in out["messages"]] == ["user", "assistant", "user"]
    assert len(out["messages"][0]["content"]) == 2
    assert [b["tool_use_id"] for b in out["messages"][2]["content"]] == ["c1", "c2"]
    assert out["system"] == [{"type": "text", "text": "Be brief."}]
    assert "presence_penalty" not in out and "seed" not in out
    assert out["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert out["tools"][0]["input_schema"] == {"type": "object", "properties": {}}


def test_the_hold_covers_anthropic_s_tool_prompt() -> None:
    catalog = load_catalog(None)
    model = catalog.models["dubhe-agent"]
    body = {"model": "dubhe-agent", "max_tokens": 10,
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}  # fmt: skip
    request = validate_chat_request(body, model)
    openai = UpstreamSpec("o", "openai", "http://o/v1", ("dubhe-agent",))
    claude = UpstreamSpec("c", "anthropic", "http://c/v1", ("dubhe-agent",))
    plain = asyncio.run(admission.size(dict(body), request, model, openai, body_bytes=200))
    translated = asyncio.run(admission.size(dict(body), request, model, claude, body_bytes=200))
    assert b'"max_tokens":10' in translated.payload
    assert translated.prompt_bound >= anthropic.TOOL_USE_SYSTEM_TOKENS
    assert translated.prompt_bound > plain.prompt_bound
