"""What a finished request reports for metering; billing turns it into a usage record."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dubhe.usage import tokens


@dataclass(slots=True)
class UsageEvent:
    request_id: str
    user_id: int
    api_key_id: int | None
    model: str
    upstream: str | None
    stream: bool
    outcome: str
    status_code: int
    latency_ms: int
    created_at: datetime
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # When the upstream gave no usage: what to count instead, off the response path.
    messages: list[Any] | None = None
    relayed: bytes | None = None
    response: dict[str, Any] | None = None
    usage_source: str = "upstream"

    def resolve_tokens(self) -> str:
        """Fill in missing counts with the tokenizer; return the usage source."""
        if self.prompt_tokens is not None and self.completion_tokens is not None:
            return "upstream"
        if self.prompt_tokens is None:
            self.prompt_tokens = tokens.count_prompt(self.messages or [])
        if self.completion_tokens is None:
            if self.relayed is not None:
                self.completion_tokens = tokens.count_completion_events(self.relayed)
            elif self.response is not None:
                self.completion_tokens = tokens.count_completion_message(self.response)
            else:
                self.completion_tokens = 0
        return "estimated"
