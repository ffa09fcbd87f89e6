"""Deciding what a request is answered with, before any byte is rendered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dubhe.sim._directives import Directives
from dubhe.sim._tokens import count_prompt_tokens
from dubhe.sim._tools import ToolCall, choose_tool_call

DEFAULT_ANSWER_TOKENS = 16


@dataclass(frozen=True, slots=True)
class Answer:
    content_tokens: int
    """Number of answer tokens when the answer is text (0 for a tool call)."""
    tool_call: ToolCall | None
    finish_reason: str
    usage: dict[str, int]


def plan_answer(request: dict[str, Any], messages: list[Any], directives: Directives) -> Answer:
    """Raises InvalidRequest when tool_choice names a function that is not offered."""
    prompt_tokens = count_prompt_tokens(messages)
    tool_call = choose_tool_call(request)
    if tool_call is not None:
        usage = _usage(prompt_tokens, tool_call.completion_tokens)
        return Answer(0, tool_call, "tool_calls", usage)

    wanted = DEFAULT_ANSWER_TOKENS if directives.tokens is None else directives.tokens
    limit = _max_tokens(request)
    if limit is not None and wanted > limit:
        return Answer(limit, None, "length", _usage(prompt_tokens, limit))
    return Answer(wanted, None, "stop", _usage(prompt_tokens, wanted))


def _max_tokens(request: dict[str, Any]) -> int | None:
    # max_completion_tokens is the current name; max_tokens the deprecated one.
    for key in ("max_completion_tokens", "max_tokens"):
        value = request.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
