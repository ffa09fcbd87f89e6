"""How the realistic test upstream counts a prompt: the byte-level worst case.

A byte-level BPE tokenizer never produces more tokens than the UTF-8 bytes it reads, so a real
upstream's prompt count is at most this: one token per UTF-8 byte of every string in the request
body it received (keys and values alike, so whatever chat template it renders is covered), except
that an image part of a message's content counts a flat 1,000 tokens instead of the bytes of its
URL, plus 4 tokens of framing per message. Dubhe's hold must never be below this for any body it
forwards.
"""

from __future__ import annotations

from typing import Any

TOKENS_PER_IMAGE = 1_000
TOKENS_PER_MESSAGE = 4


def adversarial_prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return _strings(body)
    total = TOKENS_PER_MESSAGE * len(messages)
    total += sum(_strings(key) + _strings(value) for key, value in body.items() if key != "messages")
    total += len(b"messages")
    for message in messages:
        if not isinstance(message, dict):
            total += _strings(message)
            continue
        for key, value in message.items():
            total += _strings(key)
            if key == "content" and isinstance(value, list):
                total += sum(_content_part(part) for part in value)
            else:
                total += _strings(value)
    return total


def _content_part(part: Any) -> int:
    # Only an image part of a message's content is an image to an upstream; the same shape inside
    # a tool's schema or an extra field is text like any other.
    if isinstance(part, dict) and part.get("type") == "image_url" and "image_url" in part:
        rest = {key: item for key, item in part.items() if key != "image_url"}
        return TOKENS_PER_IMAGE + _strings(rest) + len(b"image_url") + len(b"url")
    return _strings(part)


def _strings(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, list):
        return sum(_strings(item) for item in value)
    if isinstance(value, dict):
        return sum(_strings(key) + _strings(item) for key, item in value.items())
    return 0
