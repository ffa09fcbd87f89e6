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
    # Far too few for the output relayed (an upstream under-reporting what it sent): refused.
    big = {**bounds, "visible_bytes": 4 * 1024 * 1024, "output_limit": 2_000_000}
    assert isinstance(judge(UsageReport(100, 5), **big), Untrusted)
    # Reasoning shown as text may be counted as hidden: the whole count is what must cover it.
    assert judge(UsageReport(100, 1100, 1095), **big) is None
    assert judge(UsageReport(100, 1024), **big) is None  # 4 KiB a token: the loosest believed


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


@pytest.mark.parametrize("read", [
    'data: {"choices":[{"delta":{"content":"caf\u00e9 \u4f60\u597d"}}]}\n\n'.encode(),
    'data: {"a":"\u00e9"}\n\ndata: {"b":"\u4f60"}\r\n\r\n'.encode(),
])
async def test_utf8_events_pass_untouched(read: bytes) -> None:
    stream = relay()
    assert stream.feed(read).replace(b"\r\n", b"\n") == read.replace(b"\r\n", b"\n")
    assert stream.fault is None


@pytest.mark.parametrize("bad", [
    b'data: {"choices":[{"delta":{"content":"\xff\xfe"}}]}\n\n',  # one event: the fast path
    b'data: {"a":1}\n\ndata: {"b":"\xc3"}\n\ndata: {"c":1}\n\n',  # among others
    b'data: {"b":"\xed\xa0\x80"}\n\n',  # an encoded surrogate
])
async def test_an_event_that_is_not_utf8_ends_the_relay_after_the_valid_ones(bad: bytes) -> None:
    """JSON is UTF-8: a client's SSE parser (the openai SDK decodes each line strictly) would
    fail on the line instead of showing an error event."""
    stream = relay()
    ready = stream.feed(bad)
    assert ready == (b'data: {"a":1}\n\n' if bad.startswith(b'data: {"a":1}') else b"")
    assert stream.fault is not None and "UTF-8" in str(stream.fault)


@pytest.mark.parametrize("smuggled", [
    b'data: {"a":1}\r\rdata: {"error":{"message":"key sk-upstream-1234 on 10.0.0.7"}}',
    b'data: {"a":1}\r\rdata: [DONE]\r\r{"b":1}',
    b'data: {"a":1}\rdata: {"b":2}',
])
async def test_a_lone_carriage_return_cannot_smuggle_lines_past_the_checks(smuggled: bytes) -> None:
    """A client's SSE parser ends a line at a lone CR; the relay's checks split on LF. Such an
    event would carry lines nobody checked (an unredacted error, an early [DONE]): it is a fault,
    alone in its read or among others."""
    alone = relay()
    assert alone.feed(b'data: {"x":1}\n\n') == b'data: {"x":1}\n\n'
    assert alone.feed(smuggled + b"\n\n") == b""
    assert alone.fault is not None and alone.ended
    among = relay()
    assert among.feed(b'data: {"x":1}\n\n' + smuggled + b"\n\n") == b'data: {"x":1}\n\n'
    assert among.fault is not None and among.ended


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


_REDACTED = (b'data: {"error":{"message":"The upstream failed while streaming; retry the request.",'
             b'"type":"server_error","param":null,"code":"upstream_error"}}\n\n')


@pytest.mark.parametrize(("event", "relayed", "end"), [
    (b"id: 1\ndata: [DONE]", b"", "done"),
    (b": x\ndata:[DONE]", b"", "done"),
    (b'event: error\ndata: {"error":{"type":"x"}}', _REDACTED, "error"),
    (b': x\ndata: { "error": {"type":"x"}}', _REDACTED, "error"),
    (b'data:  {"error":{"type":"x"}}', _REDACTED, "error"),
    (b'data: {"choices":[]}\ndata: [DONE]', b"", "fault"),
    (b'data: {"choices":[]}\ndata: {"error":{"message":"sk-up"}}', b"", "fault"),
    (b'data: {\ndata: "error":{"message":"sk-up"}}', b"", "fault"),
    (b'id: 7\nevent: x\nretry: 5\ndata: {"a":1}', b'data: {"a":1}\n\n', None),
])
@pytest.mark.parametrize("alone", [True, False])
async def test_done_and_errors_are_found_on_the_data_line_whatever_precedes_it(
    event: bytes, relayed: bytes, end: str | None, alone: bool
) -> None:
    """An OpenAI stream's events are one data line (and comments): [DONE] and the upstream's
    error are recognised however the line is spaced or preceded (by comments, id: or event:
    lines, which are not relayed), and an event with several data lines (one payload to a
    client) is a fault."""
    stream = relay()
    first = b'data: {"x":1}\n\n'
    if alone:
        assert stream.feed(first) == first
        assert stream.feed(event + b"\n\n") == relayed
    else:
        late = b'data: {"late":1}\n\n'
        assert stream.feed(first + event + b"\n\n" + late) == (
            first + relayed + (late if end is None else b""))
    assert stream.saw_done == (end == "done")
    assert stream.upstream_error == (end == "error")
    assert (stream.fault is not None) == (end == "fault")
    if end is None:
        assert stream.feed(b'data: {"b":2}\n\n') == b'data: {"b":2}\n\n'
    else:
        assert stream.ended and stream.feed(b'data: {"b":2}\n\n') == b""


async def test_reads_that_cannot_end_the_event_are_never_rejoined() -> None:
    """Reads ending in LF and starting with CR look like an event end, but LF CR is not one:
    each is kept as it came (the pending event never re-joined and rescanned per read, which
    cost seconds of CPU per 8 MiB event), then the event ends at the bound; and an end that
    does span two reads is still found."""
    stream = relay(limit=4 * 1024 * 1024)
    assert stream.feed(b'data: {"a":"' + b"x" * 1000 + b"\n") == b""
    reads = 1
    while not stream.ended:
        assert stream.feed(b"\r" + b"x" * 1022 + b"\n") == b""
        reads += 1
        assert stream.ended or len(stream._pending) == reads  # kept, not joined
    assert reads == 4 * 1024 * 1024 // 1024 + 1
    assert stream.fault is not None and "without ending" in str(stream.fault)
    for head, tail in ((b'data: {"a":1}\r\n\r', b"\n"), (b'data: {"a":1}\n', b"\n"),
                       (b'data: {"a":1}\r', b"\n\r\n"), (b'data: {"a":1}', b"\r\n\r\n")):
        split = relay()
        assert split.feed(head) == b""
        assert split.feed(tail) == b'data: {"a":1}\n\n', (head, tail)


async def test_a_read_mixing_lf_and_crlf_framing_relays_every_whole_event() -> None:
    stream = relay()
    assert stream.feed(b'data: {"a":1}\n\ndata: {"b":2}\r\n\r\ndata: {"c"') == (
        b'data: {"a":1}\n\ndata: {"b":2}\n\n')
    assert stream.feed(b":3}\r\n\r\n") == b'data: {"c":3}\n\n'


async def test_the_upstreams_own_error_event_is_the_last() -> None:
    stream = relay()
    ready = stream.feed(b'data: {"a":1}\n\ndata: {"error":{"message":"x"}}\n\ndata: {"b":2}\n\n')
    assert ready == (b'data: {"a":1}\n\ndata: {"error":{"message":"x","type":"server_error",'
                     b'"param":null,"code":"upstream_error"}}\n\n')
    assert stream.upstream_error and stream.feed(b"data: [DONE]\n\n") == b""


_CONTENT = (b'data: {"id":"c","model":"up","choices":[{"index":0,"delta":{"content":"hi"}}]'
            b',"usage":null}\n\n')
_STREAMS = {
    "usage last": [_CONTENT, _CONTENT, b'data: {"id":"c","model":"up","choices":[],"usage":'
                   b'{"prompt_tokens":3,"completion_tokens":2}}\n\n', b"data: [DONE]\n\n"],
    "usage on a content chunk": [_CONTENT, b'data: {"model":"up","choices":[{"index":0,"delta":'
                                 b'{"content":"x"}}],"usage":{"prompt_tokens":3,'
                                 b'"completion_tokens":1}}\n\n', b"data: [DONE]\n\n"],
    "a null usage first": [b'data: {"usage":null,"model":"up","choices":[]}\n\n', _CONTENT,
                           b"data: [DONE]\n\n"],
    "a spaced null": [b'data: {"model":"up","choices":[], "usage": null}\n\n', _CONTENT],
    "two usage fields": [b'data: {"usage":{"prompt_tokens":9,"completion_tokens":9},"choices":[]'
                         b',"usage":null}\n\n', _CONTENT],
    "an error": [_CONTENT, b'data: {"error":{"message":"boom"},"usage":null}\n\n', _CONTENT],
    "[DONE] inside content": [b'data: {"choices":[{"delta":{"content":"[DONE]"}}],'
                              b'"usage":null}\n\n', b'data: [DONE]\n\n'],
    "a comment and CRLF": [b": keep-alive\n\n", b'data: {"a":1,"usage":null}\r\n\r\n', _CONTENT],
    "not an object": [_CONTENT, b'data: [1,"usage":null}\n\n', _CONTENT],
    "a lone CR": [_CONTENT, b'data: {"a":1}\r\rdata: {"b":2,"usage":null}\n\n', _CONTENT],
}


@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("rename", [False, True])
@pytest.mark.parametrize("name", list(_STREAMS))
async def test_an_event_per_read_and_all_in_one_read_relay_the_same(
    name: str, strip: bool, rename: bool
) -> None:
    """One whole event per read takes the relay's fast path, several in a read its general one:
    both relay the same bytes and find the same usage, errors, faults and end."""
    def fresh() -> StreamRelay:
        return StreamRelay(public_model="pub" if rename else "up", upstream_model="up",
                           strip_usage_nulls=strip, max_event_bytes=1024)

    events = _STREAMS[name]
    one_by_one, at_once = fresh(), fresh()
    relayed = b"".join(one_by_one.feed(event) for event in events)
    assert relayed == at_once.feed(b"".join(events))
    for relay_ in (one_by_one, at_once):
        relay_.fault = str(relay_.fault) if relay_.fault else None  # type: ignore[assignment]
    assert vars(one_by_one) | {"_batch": []} == vars(at_once) | {"_batch": []}
    if strip:
        assert b',"usage":null' not in relayed
    if rename:
        assert b'"model":"up"' not in relayed


@pytest.mark.parametrize("oddity", [b',"logprob":NaN', b',"note":"\\ud800"'])
async def test_relayed_text_orjson_cannot_read_is_still_counted(oddity: bytes) -> None:
    """A chunk orjson refuses (a NaN, a lone surrogate escape) is still relayed, and a lenient
    client parser shows its text: Dubhe's own count includes it (the whole payload)."""
    stream = relay()
    text = " ".join(["word"] * 300)
    event = (b'data: {"choices":[{"index":0,"delta":{"content":"' + text.encode() + b'"}}]'
             + oddity + b"}\n\n")
    assert stream.feed(event) == event
    assert await stream.completion_tokens() >= 300


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
