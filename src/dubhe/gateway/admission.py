"""What a chat completion may cost, sized before the upstream is called: two prompt numbers and
the output limit the upstream is told.

**The best estimate** (``estimate_prompt``: tiktoken's count of the texts, tools and schemas,
plus the model's ``max_image_tokens`` per image) decides what the user sees as too long: the 422
``context_length_exceeded`` check and the default output limit. A 200,000-character English
prompt is about 45,000 tokens, so a 128K model takes it. A large prompt is counted piece by
piece between turns of the event loop, and no further than the context window.

**The prompt bound** (``prompt_bound``) is what the hold pays for. It must be at least what any
upstream can count as input, whatever its tokenizer:

    bound = bytes of the JSON payload sent upstream
            - characters of every image URL
            + max_image_tokens × images
            + message_overhead_tokens × messages
            + request_overhead_tokens

Why it holds: a byte-level BPE tokenizer (GPT-2 style, tiktoken, Llama 3, Qwen) never produces
more tokens than the UTF-8 bytes it reads, and SentencePiece with byte fallback at most one per
byte too. What a chat template renders is the strings of the request (keys and values, texts,
names, tool calls and results, ``tools``/``functions``, ``response_format`` schemas, numbers
written out) plus its own fixed text. The payload's JSON holds every one of those strings at
least at its UTF-8 length (orjson writes UTF-8 as is; escapes only lengthen; the quotes,
colons and commas are more slack on top), so its byte length bounds them all: it is the payload
actually sent, after the model is renamed and the limit fields and ``stream_options`` are added.
Images are the exception: their cost is not their URL's bytes (a ``data:`` URL is megabytes, an
``https:`` URL a few dozen), so the URL's characters (never more than its bytes) are taken out
and the model's ``max_image_tokens`` held per image instead. The two overheads cover a
template's own text: role markers and separators per message, a default system text or tool-use
instructions once per request. Audio and files stay in as bytes: encoded audio is far more bytes
than tokens; a file whose extracted text outgrows its bytes (a compressed PDF) would break the
bound, which is one reason file input is off for every shipped model.

**The output limit** is the client's own (the smaller of ``max_tokens`` and
``max_completion_tokens``) or, absent, ``default_max_tokens`` capped by the context window minus
the estimate. The hold pays for it once per choice (``n``); a clamp lowers it to
``floor(affordable / n)`` (``billing/pricing.py``). Whatever is held is sent upstream in the
fields the upstream reads (``output_limit_fields``), replacing the client's: no upstream is left
a larger limit than the one paid for.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from dubhe.catalog import OUTPUT_LIMIT_FIELDS, ModelSpec, UpstreamSpec
from dubhe.errors import InvalidRequest, UnprocessableRequest
from dubhe.gateway.validation import ChatRequest
from dubhe.immutable import immutable
from dubhe.providers import anthropic
from dubhe.usage import tokens

# Bodies up to this size are estimated at once (well under a millisecond of tiktoken).
INLINE_ESTIMATE_BYTES = 64 * 1024


@immutable
class Sizing:
    """A request sized for admission: hold ``prompt_bound + per_choice × n``, send ``payload``."""

    estimate: int | None  # the prompt's best estimate; None when it was not needed (``size``)
    per_choice: int  # each choice's output limit, as sent upstream
    prompt_bound: int
    payload: bytes


def size_request(
    body: dict[str, Any],
    request: ChatRequest,
    model: ModelSpec,
    upstream: UpstreamSpec,
    estimate: int,
) -> Sizing:
    """The output limit, the payload that carries it, and the prompt bound of that payload.

    If the hold is then clamped, ``upstream_payload(..., clamped)`` re-serialises the same body
    with a lower limit: the same strings and fewer digits, so this bound still covers it."""
    per_choice = output_limit(request, model, estimate)
    payload = upstream_payload(body, request, model, upstream, per_choice)
    bound = prompt_bound(payload, request, model) + provider_overhead(body, upstream)
    return Sizing(estimate, per_choice, bound, payload)


async def size(
    body: dict[str, Any],
    request: ChatRequest,
    model: ModelSpec,
    upstream: UpstreamSpec,
    *,
    body_bytes: int,
) -> Sizing:
    """``size_request``, counting the prompt only when it can matter.

    The bound is never below the estimate (tiktoken makes at most one token per UTF-8 byte, and
    the bound holds every counted text at its byte length, with the same allowance per image and
    more framing per message; the property tests check it). So when the bound fits in the
    context window next to the output limit, the estimate fits too: no 422 is possible, and the
    default limit is the model's own. Then nothing is tokenized, which is almost every request:
    tiktoken's CPU stays off the hot path, and its tables are not even loaded until a long
    prompt or an upstream's missing usage needs them."""
    limit = request.max_tokens or model.default_max_tokens
    payload = upstream_payload(body, request, model, upstream, limit)
    bound = prompt_bound(payload, request, model) + provider_overhead(body, upstream)
    if bound + limit <= model.context_window:
        return Sizing(None, limit, bound, payload)
    estimate = await estimate_prompt(body, model, body_bytes=body_bytes)
    return size_request(body, request, model, upstream, estimate)


async def estimate_prompt(body: dict[str, Any], model: ModelSpec, *, body_bytes: int) -> int:
    """The best estimate of the prompt's tokens. A large body is counted a piece at a time,
    yielding to the event loop between pieces, and only until it is known not to fit: the work is
    bounded by the context window, not the body (a 15 MB prompt on a 128K model stops after
    ~0.5 MB), and no piece stalls the worker's other requests for more than a few milliseconds.
    Past the window, the count returned is where counting stopped (still too long)."""
    fixed, texts = tokens.prompt_texts(body, image_tokens=model.max_image_tokens)
    if body_bytes <= INLINE_ESTIMATE_BYTES:
        return fixed + sum(tokens.count_text(text) for text in texts)
    total = fixed
    for text in texts:
        for piece in tokens.text_pieces(text):
            total += tokens.count_text(piece)
            if total > model.context_window:
                return total
            await asyncio.sleep(0)
    return total


def output_limit(request: ChatRequest, model: ModelSpec, estimate: int) -> int:
    """Each choice's output limit: the client's, or the model's default capped by the context
    window. Refuses with 422 a prompt (by its best estimate) that leaves no room for it."""
    room = model.context_window - estimate
    limit = request.max_tokens or min(model.default_max_tokens, room)
    if limit > room or room < 1:
        asked = f", {request.max_tokens} in the completion" if request.max_tokens else ""
        # Counting stops past the window (estimate_prompt): the number is then a lower bound.
        least = "at least " if estimate > model.context_window else ""
        raise UnprocessableRequest(
            f"This model's maximum context length is {model.context_window} tokens. However, "
            f"you requested {least}{estimate + (request.max_tokens or 0)} tokens ({estimate} in "
            f"the messages{asked}). Shorten the messages or lower max_tokens.",
            code="context_length_exceeded",
            param="messages",
        )
    return limit


def upstream_payload(
    body: dict[str, Any],
    request: ChatRequest,
    model: ModelSpec,
    upstream: UpstreamSpec,
    per_choice: int,
) -> bytes:
    """The JSON sent upstream: the upstream's model name, usage always asked of a stream, and
    the output limit in exactly the fields the upstream reads (the client's own removed).
    Updates ``body`` in place. An Anthropic deployment gets the body translated to its Messages
    API, with the limit in its own ``max_tokens`` (``body`` is left as it is)."""
    if upstream.kind == "anthropic":
        translated = anthropic.request_body(
            body, upstream.model_map.get(model.id, model.id), per_choice
        )
        try:
            return orjson.dumps(translated)
        except (orjson.JSONEncodeError, TypeError):
            raise InvalidRequest(
                "The request body is nested too deeply; flatten the extra fields.",
                code="invalid_json",
            ) from None
    body["model"] = upstream.model_map.get(model.id, model.id)
    if request.stream and not request.include_usage:
        options = body.get("stream_options") or {}
        body["stream_options"] = {**options, "include_usage": True}
    for field in OUTPUT_LIMIT_FIELDS:
        body.pop(field, None)
    for field in upstream.output_limit_fields:
        body[field] = per_choice
    try:
        return orjson.dumps(body)
    except (orjson.JSONEncodeError, TypeError):
        # orjson reads 1,024 levels of nesting but writes only 254.
        raise InvalidRequest(
            "The request body is nested too deeply; flatten the extra fields.",
            code="invalid_json",
        ) from None


def provider_overhead(body: dict[str, Any], upstream: UpstreamSpec) -> int:
    """Prompt tokens a provider adds of its own beyond a chat template's: Anthropic's tool-use
    system prompt when tools are given."""
    if upstream.kind == "anthropic" and (body.get("tools") or body.get("functions")):
        return anthropic.TOOL_USE_SYSTEM_TOKENS
    return 0


def prompt_bound(payload: bytes, request: ChatRequest, model: ModelSpec) -> int:
    """An upper bound of the prompt tokens any upstream can count for ``payload`` (see the
    module docstring for why it holds)."""
    return (
        len(payload)
        - request.image_url_chars
        + request.images * model.max_image_tokens
        + request.messages * model.message_overhead_tokens
        + model.request_overhead_tokens
    )
