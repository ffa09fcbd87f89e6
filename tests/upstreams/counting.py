"""How the realistic test upstream counts a prompt: the byte-level worst case.

A byte-level BPE tokenizer never produces more tokens than the UTF-8 bytes it reads, so a real
upstream's prompt count is at most this: one token per UTF-8 byte of every string in the request
body it received (keys and values alike, so whatever chat template it renders is covered), except
that an image part counts a flat 1,000 tokens instead of the bytes of its URL, plus 4 tokens of
framing per message. Dubhe's hold must never be below this for any body it forwards.
"""

from __future__ import annotations

from typing import Any

TOKENS_PER_IMAGE = 1_000
TOKENS_PER_MESSAGE = 4


def adversarial_prompt_tokens(body: dict[str, Any]) -> int:
    total = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        total += TOKENS_PER_MESSAGE * len(messages)
    return total + _strings(body)


def _strings(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, list):
        return sum(_strings(item) for item in value)
    if isinstance(value, dict):
        if value.get("type") == "image_url" and "image_url" in value:
            rest = {key: item for key, item in value.items() if key != "image_url"}
            return TOKENS_PER_IMAGE + _strings(rest) + len(b"image_url") + len(b"url")
        return sum(_strings(key) + _strings(item) for key, item in value.items())
    return 0
