"""Turning an Answer into response bytes: one JSON body, or a list of SSE events.

Stream chunks differ only in their ``delta`` and ``finish_reason``, so each
request builds the shared head and tail once and every event is a concatenation
of ready-made byte strings; this is the benchmark baseline, so it must be cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from dubhe.sim._answer import Answer
from dubhe.sim._tokens import ANSWER_TOKEN_CYCLE, FIRST_ANSWER_TOKEN, answer_text
from dubhe.sim._tools import argument_fragments

DONE_EVENT = b"data: [DONE]\n\n"

_ROLE_DELTA = b'{"role":"assistant","content":""}'
_FINISH_DELTA = b"{}"
# Delta bytes of every answer token, mirroring _tokens.answer_token().
_FIRST_CONTENT_DELTA = orjson.dumps({"content": FIRST_ANSWER_TOKEN})
_CYCLE_CONTENT_DELTAS = tuple(orjson.dumps({"content": text}) for text in ANSWER_TOKEN_CYCLE)


def completion_body(completion_id: str, created: int, model: Any, answer: Answer) -> bytes:
    if answer.tool_call is None:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": answer_text(answer.content_tokens),
            "refusal": None,
        }
    else:
        call = answer.tool_call
        message = {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
            ],
        }
    return orjson.dumps(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": answer.finish_reason,
                }
            ],
            "usage": answer.usage,
            "system_fingerprint": None,
        }
    )


class ChunkEncoder:
    """Encodes ``chat.completion.chunk`` SSE events for one streamed response."""

    __slots__ = ("_head", "_open_tail", "_usage_tail", "_usage_head")

    def __init__(self, completion_id: str, created: int, model: Any, include_usage: bool):
        envelope = (
            b'data: {"id":' + orjson.dumps(completion_id)
            + b',"object":"chat.completion.chunk","created":' + str(created).encode()
            + b',"model":' + orjson.dumps(model) + b',"system_fingerprint":null,"choices":'
        )  # fmt: skip
        self._head = envelope + b'[{"index":0,"delta":'
        # With include_usage OpenAI puts "usage":null on every non-final chunk.
        self._usage_tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        self._open_tail = b',"logprobs":null,"finish_reason":null}]' + self._usage_tail
        self._usage_head = envelope + b'[],"usage":'

    def delta(self, delta_json: bytes) -> bytes:
        return self._head + delta_json + self._open_tail

    def finish(self, finish_reason: str) -> bytes:
        return (
            self._head + _FINISH_DELTA + b',"logprobs":null,"finish_reason":"'
            + finish_reason.encode() + b'"}]' + self._usage_tail
        )  # fmt: skip

    def usage(self, usage: dict[str, int]) -> bytes:
        return self._usage_head + orjson.dumps(usage) + b"}\n\n"


def stream_events(
    encoder: ChunkEncoder, answer: Answer, include_usage: bool
) -> Iterator[tuple[bytes, bool]]:
    """Yield ``(event, is_token)``; token events are the ones tokens_per_second paces."""
    if answer.tool_call is None:
        yield encoder.delta(_ROLE_DELTA), False
        for index in range(answer.content_tokens):
            if index == 0:
                yield encoder.delta(_FIRST_CONTENT_DELTA), True
            else:
                cycle_position = (index - 1) % len(_CYCLE_CONTENT_DELTAS)
                yield encoder.delta(_CYCLE_CONTENT_DELTAS[cycle_position]), True
    else:
        call = answer.tool_call
        yield encoder.delta(orjson.dumps({
            "role": "assistant",
            "content": None,
            "tool_calls": [{
                "index": 0,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }],
        })), False  # fmt: skip
        for fragment in argument_fragments(call.arguments):
            yield encoder.delta(orjson.dumps(
                {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}
            )), True  # fmt: skip
    yield encoder.finish(answer.finish_reason), False
    if include_usage:
        yield encoder.usage(answer.usage), False
    yield DONE_EVENT, False
