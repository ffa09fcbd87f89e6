"""Property tests of admission sizing: the hold is never below what the realistic upstream can
charge, and the 422 check never refuses a body whose estimate fits.

Hypothesis generates request bodies (text and image parts, names, tool calls and results, tools,
response_format schemas, n, both limit fields or neither, unknown fields, any unicode including
the astral plane and characters JSON must escape) and runs them through the same pure functions
the gateway's admission step calls, against the realistic upstream's counting rule
(``tests/upstreams/counting.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from dubhe.billing.pricing import size_admission
from dubhe.catalog import OUTPUT_LIMIT_FIELDS, ModelSpec, UpstreamSpec, load_catalog
from dubhe.errors import DubheError, UnprocessableRequest
from dubhe.gateway.admission import (
    estimate_prompt,
    output_limit,
    size,
    size_request,
    upstream_payload,
)
from dubhe.gateway.validation import validate_chat_request
from dubhe.usage import tokens
from tests.upstreams.counting import adversarial_prompt_tokens

CATALOG = load_catalog(None)
AGENT = CATALOG.models["dubhe-agent"]  # vision and function calling: every part is allowed
FAST = CATALOG.models["dubhe-fast"]

# Any unicode but surrogates (JSON cannot carry a lone one; orjson refuses it), control
# characters and quotes included, which JSON escapes.
TEXT = st.text(max_size=40)
SHORT = st.text(min_size=1, max_size=12)

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), TEXT,
                      st.floats(allow_nan=False, allow_infinity=False))
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SHORT, inner, max_size=3),
    max_leaves=8,
)
# A JSON schema never types itself as an image part, which the counting rule would price at
# 1,000 tokens wherever it appears (a real upstream only prices content parts).
SCHEMA = st.recursive(
    st.fixed_dictionaries({"type": st.sampled_from(["string", "number", "boolean"])},
                          optional={"description": TEXT, "minimum": st.integers(0, 10**6)}),
    lambda inner: st.fixed_dictionaries(
        {"type": st.just("object"), "properties": st.dictionaries(SHORT, inner, max_size=3)},
        optional={"required": st.lists(SHORT, max_size=2)},
    ),
    max_leaves=6,
)

TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
IMAGE_URL = st.one_of(
    st.text(max_size=30).map(lambda tail: "https://img.example/" + tail),
    st.binary(max_size=300).map(lambda raw: "data:image/png;base64," + raw.hex()),
)
IMAGE_PART = st.fixed_dictionaries(
    {"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
        {"url": IMAGE_URL}, optional={"detail": st.sampled_from(["low", "high", "auto"])})}
)
CONTENT = st.one_of(TEXT, st.lists(st.one_of(TEXT_PART, IMAGE_PART), min_size=1, max_size=4))
TOOL_CALL = st.fixed_dictionaries({
    "id": SHORT, "type": st.just("function"),
    "function": st.fixed_dictionaries({"name": SHORT, "arguments": TEXT}),
})


@st.composite
def messages(draw: st.DrawFn) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 5))):
        role = draw(st.sampled_from(["system", "developer", "user", "assistant", "tool"]))
        message: dict[str, Any] = {"role": role}
        if role == "assistant" and draw(st.booleans()):
            message["tool_calls"] = draw(st.lists(TOOL_CALL, min_size=1, max_size=2))
            if draw(st.booleans()):
                message["content"] = None
        else:
            message["content"] = draw(CONTENT if role == "user" else TEXT)
        if role == "tool":
            message["tool_call_id"] = draw(SHORT)
        if draw(st.booleans()):
            message["name"] = draw(SHORT)
        out.append(message)
    return out


TOOL = st.fixed_dictionaries({
    "type": st.just("function"),
    "function": st.fixed_dictionaries(
        {"name": SHORT}, optional={"description": TEXT, "parameters": SCHEMA}),
})
RESPONSE_FORMAT = st.one_of(
    st.just({"type": "json_object"}),
    st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
        {"name": SHORT, "schema": SCHEMA}, optional={"strict": st.booleans()})}),
)
LIMIT = st.integers(1, 300_000)


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "dubhe-agent", "messages": draw(messages())}
    optional = {
        "max_tokens": LIMIT,
        "max_completion_tokens": LIMIT,
        "n": st.integers(1, 8),
        "tools": st.lists(TOOL, min_size=1, max_size=3),
        "response_format": RESPONSE_FORMAT,
        "stream": st.booleans(),
        "temperature": st.floats(0, 2),
        "user": TEXT,
        "metadata": JSON,  # an unknown field: passed through untouched
    }
    for field, strategy in optional.items():
        if draw(st.booleans()):
            body[field] = draw(strategy)
    if body.get("stream") and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    return body


UPSTREAMS = st.builds(
    UpstreamSpec,
    name=st.just("realistic"),
    kind=st.just("openai"),
    base_url=st.just("http://127.0.0.1:1/v1"),
    models=st.just(("dubhe-agent",)),
    # A renamed model may be longer than the public id: the bound must see the payload sent.
    model_map=st.one_of(st.just({}), st.builds(lambda tail: {"dubhe-agent": "org/" + tail}, TEXT)),
    output_limit_fields=st.sampled_from(
        [OUTPUT_LIMIT_FIELDS, ("max_completion_tokens",), ("max_tokens",)]),
)
# Overheads down to zero and images at exactly the counting rule's 1,000: the bound must hold
# on the payload's bytes alone, so the test is sharp (a bound a few tokens too low fails it).
MODELS = st.builds(
    lambda window, image_tokens, per_message, per_request: dataclasses.replace(
        AGENT, context_window=window, max_image_tokens=image_tokens,
        message_overhead_tokens=per_message, request_overhead_tokens=per_request),
    st.sampled_from([AGENT.context_window, 131_072, 4_096, 600, 60]),
    st.sampled_from([1_000, 1_001, 16_384]),
    st.sampled_from([0, 8]),
    st.sampled_from([0, 128]),
)


def prompt_estimate(body: dict[str, Any], model: ModelSpec) -> int:
    """The gateway's prompt estimate, as admission computes it for this body."""
    # The body's size only picks the path (at once, or piece by piece).
    return asyncio.run(estimate_prompt(body, model, body_bytes=len(str(body))))


def upstream_charge(payload: bytes) -> tuple[int, int]:
    """What the realistic upstream charges for ``payload``: its prompt count, and each choice's
    output at the limit it honours (max_completion_tokens before max_tokens)."""
    sent = orjson.loads(payload)
    limit = sent.get("max_completion_tokens", sent.get("max_tokens"))
    assert isinstance(limit, int), "every upstream request carries an output limit"
    return adversarial_prompt_tokens(sent), limit


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies(), model=MODELS, upstream=UPSTREAMS,
       tokens_available=st.integers(0, 400_000), balance_uusd=st.integers(0, 10**6))
@example(  # a 4-byte astral character and an escaped control character, with n and both fields
    body={"model": "dubhe-agent", "n": 3, "max_tokens": 5, "max_completion_tokens": 900,
          "messages": [{"role": "user", "content": "\U0001f600\x00", "name": "\u00e9"}]},
    model=AGENT, upstream=UpstreamSpec("u", "openai", "http://x/v1", ("dubhe-agent",)),
    tokens_available=10**6, balance_uusd=0,
)
def test_the_hold_covers_what_the_realistic_upstream_charges(
    body: dict[str, Any], model: ModelSpec, upstream: UpstreamSpec, tokens_available: int,
    balance_uusd: int,
) -> None:
    request = validate_chat_request(body, model)
    estimate = prompt_estimate(body, model)
    try:
        sizing = size_request(body, request, model, upstream, estimate)
    except UnprocessableRequest as refused:
        assert refused.code == "context_length_exceeded"
        assume(False)
        return
    assert sizing.per_choice <= (request.max_tokens or model.default_max_tokens)
    prompt, limit = upstream_charge(sizing.payload)
    assert limit == sizing.per_choice
    assert sizing.prompt_bound + sizing.per_choice * request.n >= prompt + limit * request.n
    assert sizing.prompt_bound >= prompt
    assert sizing.estimate <= sizing.prompt_bound  # the estimate never holds more than the bound
    # No field left at a larger value than the one held, whichever fields the upstream reads.
    sent = orjson.loads(sizing.payload)
    assert {f for f in OUTPUT_LIMIT_FIELDS if f in sent} == set(upstream.output_limit_fields)

    # A clamped hold: the lower limit is what the upstream is sent, and the bound still holds.
    admission = size_admission(
        model, prompt_tokens=sizing.prompt_bound, max_tokens=sizing.per_choice, n=request.n,
        tokens_available=tokens_available, balance_uusd=balance_uusd,
    )
    if admission is None:
        return
    clamped = upstream_payload(body, request, model, upstream, admission.max_tokens)
    prompt, limit = upstream_charge(clamped)
    assert limit == admission.max_tokens <= sizing.per_choice
    assert len(clamped) <= len(sizing.payload)
    assert sizing.prompt_bound + admission.max_tokens * request.n >= prompt + limit * request.n


@settings(max_examples=250, deadline=None)
@given(body=bodies(), window=st.integers(1, 3_000), default=st.integers(1, 5_000))
def test_the_context_check_refuses_only_what_its_estimate_does_not_fit(
    body: dict[str, Any], window: int, default: int
) -> None:
    model = dataclasses.replace(AGENT, context_window=window, default_max_tokens=default)
    request = validate_chat_request(body, model)
    estimate = prompt_estimate(body, model)
    fits = estimate + (request.max_tokens or 1) <= window
    try:
        limit = output_limit(request, model, estimate)
    except UnprocessableRequest as refused:
        assert refused.code == "context_length_exceeded"
        assert not fits
        return
    assert fits
    assert 1 <= limit and estimate + limit <= window
    assert limit == (request.max_tokens or min(default, window - estimate))


def test_a_long_english_prompt_fits_by_its_estimate_though_its_bound_is_larger() -> None:
    words = "the quick brown fox jumps over the lazy dog and keeps running "
    body = {"model": "dubhe-fast", "messages": [
        {"role": "user", "content": (words * 4000)[:200_000]}]}
    request = validate_chat_request(body, FAST)
    estimate = prompt_estimate(body, FAST)
    sizing = size_request(body, request, FAST, CATALOG.upstreams[0], estimate)
    assert estimate < 60_000 < FAST.context_window < sizing.prompt_bound
    assert sizing.per_choice == FAST.default_max_tokens


def test_the_prompt_is_counted_only_when_its_bound_may_not_fit() -> None:
    upstream = CATALOG.upstreams[0]
    short = {"model": "dubhe-fast", "messages": [{"role": "user", "content": "Hello!"}]}
    sized = asyncio.run(size(dict(short), validate_chat_request(short, FAST), FAST, upstream,
                             body_bytes=60))
    counted = size_request(dict(short), validate_chat_request(short, FAST), FAST, upstream,
                           prompt_estimate(short, FAST))
    # Nothing tokenized, and the same hold and payload as with the count.
    assert sized.estimate is None
    assert (sized.per_choice, sized.prompt_bound, sized.payload) == (
        counted.per_choice, counted.prompt_bound, counted.payload)
    # Near the window the count decides: the default limit shrinks to what is left.
    words = "the quick brown fox jumps over the lazy dog and keeps running "
    long = {"model": "dubhe-fast", "messages": [{"role": "user", "content": words * 2100}]}
    request = validate_chat_request(long, FAST)
    sized = asyncio.run(size(dict(long), request, FAST, upstream, body_bytes=130_000))
    estimate = prompt_estimate(long, FAST)
    assert sized.estimate == estimate
    assert sized.per_choice == min(FAST.default_max_tokens, FAST.context_window - estimate)
    too_long = {"model": "dubhe-fast", "messages": [{"role": "user", "content": words * 12000}]}
    with pytest.raises(UnprocessableRequest) as refused:
        asyncio.run(size(dict(too_long), validate_chat_request(too_long, FAST), FAST, upstream,
                         body_bytes=750_000))
    assert refused.value.code == "context_length_exceeded"


def test_a_large_prompt_is_counted_in_pieces_and_no_further_than_the_window() -> None:
    words = "the quick brown fox jumps over the lazy dog and keeps running "
    text = words * 20_000  # 1.3 MB, about 260,000 tokens
    body = {"model": "dubhe-agent", "messages": [{"role": "user", "content": text}]}
    whole = tokens.count_text(text)
    counted = prompt_estimate(body, AGENT)  # a 1M window: counted to the end, piece by piece
    assert abs(counted - 3 - 3 - whole) <= 2 * (len(text) // 16_384 + 1)  # a cut or two a piece
    small = dataclasses.replace(AGENT, context_window=10_000)
    stopped = prompt_estimate(body, small)
    assert small.context_window < stopped < 20_000  # stopped soon after the window
    request = validate_chat_request(body, small)
    with pytest.raises(UnprocessableRequest, match="at least") as refused:
        output_limit(request, small, stopped)
    assert refused.value.code == "context_length_exceeded"


def test_an_image_holds_max_image_tokens_not_its_url_bytes() -> None:
    image = "data:image/png;base64," + "A" * 500_000
    body = {"model": "dubhe-agent", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": image}}]}], "max_tokens": 10}
    request = validate_chat_request(body, AGENT)
    sizing = size_request(body, request, AGENT, CATALOG.upstreams[0], 0)
    prompt, _ = upstream_charge(sizing.payload)
    assert prompt <= sizing.prompt_bound < AGENT.max_image_tokens + 1_000


@pytest.mark.parametrize(
    ("fields", "client", "expected"),
    [
        (OUTPUT_LIMIT_FIELDS, {"max_tokens": 1, "max_completion_tokens": 200_000},
         {"max_tokens": 1, "max_completion_tokens": 1}),
        (OUTPUT_LIMIT_FIELDS, {}, {"max_tokens": 4096, "max_completion_tokens": 4096}),
        (("max_completion_tokens",), {"max_tokens": 50}, {"max_completion_tokens": 50}),
        (("max_tokens",), {"max_completion_tokens": 70_000}, {"max_tokens": 70_000}),
    ],
)
def test_the_upstream_is_sent_the_held_limit_in_the_fields_it_reads(
    fields: tuple[str, ...], client: dict[str, int], expected: dict[str, int]
) -> None:
    body = {"model": "dubhe-fast", "messages": [{"role": "user", "content": "hi"}], **client}
    upstream = UpstreamSpec("u", "openai", "http://x/v1", ("dubhe-fast",), {"dubhe-fast": "llama"},
                            output_limit_fields=fields)
    request = validate_chat_request(body, FAST)
    sizing = size_request(body, request, FAST, upstream, 10)
    sent = orjson.loads(sizing.payload)
    assert {f: sent[f] for f in OUTPUT_LIMIT_FIELDS if f in sent} == expected
    assert sent["model"] == "llama"


@settings(max_examples=600, deadline=None)
@given(body=st.one_of(
    bodies(),
    st.dictionaries(st.sampled_from(["messages", "n", "max_tokens", "tools", "stop",
                                     "response_format", "stream", "stream_options",
                                     "logit_bias", "tool_choice", "max_completion_tokens"]),
                    JSON).map(lambda d: {"model": "dubhe-fast", "messages": [], **d}),
    st.builds(lambda content: {"model": "dubhe-agent", "messages": [
        {"role": "user", "content": content}]}, st.lists(JSON | st.dictionaries(
            st.sampled_from(["type", "text", "image_url", "input_audio", "file", "url"]),
            JSON, max_size=3), max_size=3)),
))
def test_any_json_body_is_admitted_or_refused_with_a_client_error(body: dict[str, Any]) -> None:
    """Fuzz: validation and sizing either pass or raise a 4xx DubheError, never anything else."""
    for model in (FAST, AGENT):
        try:
            request = validate_chat_request(dict(body), model)
            estimate = prompt_estimate(body, model)
            size_request(dict(body), request, model, CATALOG.upstreams[0], estimate)
        except DubheError as refused:
            assert 400 <= refused.status_code < 500


def test_a_body_nested_deeper_than_can_be_forwarded_is_a_400_not_a_crash() -> None:
    deep = orjson.loads(b"[" * 300 + b"]" * 300)  # orjson reads 1,024 levels, writes 254
    body = {"model": "dubhe-fast", "messages": [{"role": "user", "content": "hi"}], "x": deep}
    request = validate_chat_request(body, FAST)
    estimate = prompt_estimate(body, FAST)
    with pytest.raises(DubheError) as refused:
        size_request(body, request, FAST, CATALOG.upstreams[0], estimate)
    assert (refused.value.status_code, refused.value.code) == (400, "invalid_json")


@pytest.mark.parametrize("part_type", [["text"], {"x": 1}, 5, None, True])
def test_a_content_part_type_that_is_not_a_string_is_invalid_type(part_type: Any) -> None:
    body = {"model": "dubhe-fast", "messages": [
        {"role": "user", "content": [{"type": part_type, "text": "hi"}]}]}
    with pytest.raises(UnprocessableRequest) as refused:
        validate_chat_request(body, FAST)
    assert (refused.value.code, refused.value.param) == ("invalid_type", "messages[0].content[0].type")


@pytest.mark.parametrize(
    ("part", "capability"),
    [
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio_input"),
        ({"type": "file", "file": {"file_data": "JVBERi0=", "filename": "a.pdf"}}, "file_input"),
        ({"type": "image_url", "image_url": {"url": "https://x/y.png"}}, "vision"),
    ],
)
def test_input_a_model_cannot_take_is_unsupported_content(part: dict[str, Any], capability: str) -> None:
    body = {"model": "dubhe-fast", "messages": [
        {"role": "user", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "and"}, part]}]}
    with pytest.raises(UnprocessableRequest) as refused:
        validate_chat_request(body, dataclasses.replace(AGENT, **{capability: False}))
    assert (refused.value.code, refused.value.param) == (
        "unsupported_content", "messages[1].content[1]")
    validate_chat_request(body, dataclasses.replace(AGENT, **{capability: True}))
