"""Reading the text out of OpenAI chat messages.

Content may be a plain string or a list of typed parts; only ``text`` parts carry
text (images, audio and files are ignored), which is what both prompt-token
counting and directive parsing need.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def text_parts(content: Any) -> Iterator[str]:
    """Yield every piece of text in one message's ``content``."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    yield text


def last_user_text(messages: list[Any]) -> str:
    """Text of the last ``user`` message (parts joined), or "" if there is none."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return "".join(text_parts(message.get("content")))
    return ""
