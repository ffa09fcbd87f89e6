"""``[[sim:name=N]]`` directives that steer one simulated response.

They are read from the last user message only, so a conversation history that
once contained a directive does not keep triggering it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dubhe.sim._messages import last_user_text

_MARKER = "[[sim:"
_DIRECTIVE = re.compile(r"\[\[sim:([a-z_]+)=(\d+)\]\]")


@dataclass(frozen=True, slots=True)
class Directives:
    tokens: int | None = None
    """Answer length in tokens (may be 0); None means the default length."""
    status: int | None = None
    """Reply with this 4xx/5xx status and an OpenAI error envelope."""
    delay_ms: int = 0
    """Wait this long before the response starts."""
    cut_after: int | None = None
    """Drop the connection mid-response; see the package docstring for counting."""


NO_DIRECTIVES = Directives()


def parse_directives(messages: list[Any]) -> Directives:
    text = last_user_text(messages)
    if _MARKER not in text:  # the common case: skip the regex entirely
        return NO_DIRECTIVES
    values = {name: int(number) for name, number in _DIRECTIVE.findall(text)}
    status = values.get("status")
    if status is not None and not 400 <= status <= 599:
        status = None  # a "success" or nonsense status is not an error to simulate
    return Directives(
        tokens=values.get("tokens"),
        status=status,
        delay_ms=values.get("delay_ms", 0),
        cut_after=values.get("cut_after"),
    )
