"""The upstream boundary's pure parts: usage parsing and judging, stream framing, redaction."""

from __future__ import annotations

import asyncio

import pytest

from dubhe.gateway.relay import StreamRelay
from dubhe.providers.errors import MAX_RELAYED_MESSAGE_CHARS, redact_upstream_message
from dubhe.usage.reports import OVERHEAD_PER_CHOICE, Untrusted, UsageReport, judge, parse_usage


@pytest.mark.parametrize(
    "usage",
    [
        None, [], "12", {"total_tokens": 30}, {"prompt_tokens": -1, "completion_tokens": 5},
        {"prompt_tokens": 10.5, "completion_tokens": 5}, {"prompt_tokens": "10", "completion_tokens": 5},
        {"prompt_tokens": 2**64 + 1, "completion_tokens": 5}, {"prompt_tokens": True, "completion_tokens": 5},
        {"prompt_tokens": 10, "completion_tokens": 5, "completion_tokens_details": {"reasoning_tokens": 6}},
        {"prompt_tokens": 10, "completion_tokens": 5, "completion_tokens_details": {"reasoning_tokens": -1}},
    ],
)  # fmt: skip
def test_usage_that_is_not_counts_is_refused(usage: object) -> None:
    assert isinstance(parse_usage(usage), Untrusted)


def test_usage_that_is_counts_is_parsed() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 50,
             "completion_tokens_details": {"reasoning_tokens": 40}, "total_tokens": 60}
    assert parse_usage(usage) == UsageReport(10, 50, 40)


def test_only_physically_possible_usage_is_believed() -> None:
    bounds = {"prompt_bound": 100, "visible_bytes": 40, "choices": 2, "output_limit": 500}
    assert judge(UsageReport(100, 40 + 2 * OVERHEAD_PER_CHOICE), **bounds) is None
    assert judge(UsageReport(100, 500, 460), **bounds) is None  # hidden reasoning, within limit
    # More than the output limit sent (hidden plus visible): the completion count is refused,
    # the prompt count (within its bound) kept.
    refused = judge(UsageReport(100, 540, 500), **bounds)
    assert isinstance(refused, Untrusted) and refused.prompt_tokens == 100
    for report in (UsageReport(101, 10), UsageReport(0, 10), UsageReport(50, 0),
                   UsageReport(50, 41 + 2 * OVERHEAD_PER_CHOICE), UsageReport(50, 1010, 501)):
        assert isinstance(judge(report, **bounds), Untrusted), report


def relay(limit: int = 1024) -> StreamRelay:
    return StreamRelay(public_model="m", upstream_model="m", strip_usage_nulls=False,
                       max_event_bytes=limit)


async def test_events_are_relayed_whole_and_nothing_after_done() -> None:
    stream = relay()
    assert stream.feed(b'data: {"a":1}\n\ndata: {"b"') == b'data: {"a":1}\n\n'
    assert stream.feed(b":2}\n") == b""
    assert stream.feed(b'\ndata: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}'
                       b'\n\ndata: [DONE]\n\ndata: {"late":1}\n\n') == b'data: {"b":2}\n\n'
    assert stream.saw_done and stream.usage == UsageReport(1, 2)
    assert stream.feed(b'data: {"later":1}\n\n') == b""


@pytest.mark.parametrize("bad", [b"data: [1]", b'data: "x"', b"data: 3", b'data: {"cut"', b"hello"])
async def test_an_event_that_is_not_an_object_ends_the_relay_after_the_valid_ones(bad: bytes) -> None:
    stream = relay()
    ready = stream.feed(b'data: {"a":1}\n\n' + bad + b'\n\ndata: {"b":2}\n\n')
    assert ready == b'data: {"a":1}\n\n'
    assert stream.fault is not None and stream.ended


async def test_an_endless_event_is_cut_at_the_bound_without_recopying() -> None:
    stream = relay(limit=8 * 1024 * 1024)
    piece = b"x" * 65536
    assert stream.feed(b'data: {"a":1}\n\ndata: {"endless":"') == b'data: {"a":1}\n\n'
    reads = 0
    while not stream.ended:
        assert stream.feed(piece) == b""
        reads += 1
    # Stopped at the bound (pending reads are kept as a list, never re-joined per read).
    assert reads == 8 * 1024 * 1024 // 65536
    assert stream.fault is not None and "without ending" in str(stream.fault)


async def test_the_upstreams_own_error_event_is_the_last() -> None:
    stream = relay()
    ready = stream.feed(b'data: {"a":1}\n\ndata: {"error":{"message":"x"}}\n\ndata: {"b":2}\n\n')
    assert ready == (b'data: {"a":1}\n\ndata: {"error":{"message":"x","type":"server_error",'
                     b'"param":null,"code":"upstream_error"}}\n\n')
    assert stream.upstream_error and stream.feed(b"data: [DONE]\n\n") == b""


async def test_relayed_tokens_are_counted_across_batches() -> None:
    stream = relay()
    event = b'data: {"choices":[{"index":0,"delta":{"content":" the"}}]}\n\n'
    count = 40_000  # about 2.4 MB: two batches counted in a thread, and the rest
    for _ in range(count):
        stream.feed(event)
    counted = await asyncio.wait_for(stream.completion_tokens(), 60)
    # Long texts are counted in pieces cut at spaces: a token per piece of noise at most.
    assert count <= counted <= count + 10


def test_error_messages_are_cut_and_redacted() -> None:
    message = ("Incorrect API key provided: sk-proj-Ab12****xyZ9 at https://gpu-3.corp.internal/v1 "
               "(10.1.2.3:8000, fe80::1ff:fe23:4567:890a), host vllm-7.svc.cluster.local; "
               "Bearer eyJhbGciOi; 'max_tokens' must be at most 4096 for Qwen2.5-7B-Instruct")
    redacted = redact_upstream_message(message)
    for secret in ("sk-proj", "https://", "gpu-3", "10.1.2.3", "fe80", "vllm-7", "eyJhbGciOi"):
        assert secret not in redacted, secret
    assert "'max_tokens' must be at most 4096 for Qwen2.5-7B-Instruct" in redacted
    assert len(redact_upstream_message("x" * 5000)) == MAX_RELAYED_MESSAGE_CHARS
