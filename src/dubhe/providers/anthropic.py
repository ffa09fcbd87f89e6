"""Anthropic's Messages API, translated both ways at the provider boundary.

Requests: the OpenAI chat body becomes a Messages body. System and developer messages become the
top-level ``system``; text and image parts become content blocks (a ``data:`` URL a base64
source, any other URL a url source); an assistant's ``tool_calls`` become ``tool_use`` blocks and
``tool`` messages ``tool_result`` blocks in a user turn; consecutive turns of one role are merged
(the API wants them alternating). ``tools``/``tool_choice`` (and the legacy ``functions``) map to
their Anthropic forms, ``stop`` to ``stop_sequences``, ``user`` to ``metadata.user_id``, and the
output limit Dubhe held is sent as Anthropic's ``max_tokens``. Fields with no Anthropic meaning
(``presence_penalty``, ``seed``, ``logprobs``, extra fields...) are not sent: the API refuses
unknown fields.

Answers: a message becomes a ``chat.completion`` and its stream of events ``chat.completion.chunk``
events in OpenAI's SSE format, which the gateway then relays, checks and meters exactly like an
OpenAI-compatible upstream's (``gateway/relay.py``): the usage trust rule and the output bound
apply unchanged. Stop reasons: ``end_turn``/``stop_sequence`` → ``stop``, ``max_tokens`` →
``length``, ``tool_use`` → ``tool_calls``, ``refusal`` → ``content_filter``. Usage: the prompt is
``input_tokens`` plus the cache-write and cache-read tokens (``cache_creation_input_tokens``,
``cache_read_input_tokens``): all of them are input the upstream read and charges for, so Dubhe
counts every one as a prompt token. The cache-read part is also reported as
``prompt_tokens_details.cached_tokens``. A usage that is not made of non-negative integers is
dropped, so Dubhe's own count is charged.

Unlike the OpenAI relay, translating a stream parses every event: that cost is paid only by
Anthropic deployments.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from dubhe.errors import InvalidRequest

# What a chat template adds is covered by the model's overheads; Anthropic also adds a system
# prompt of its own when tools are given (documented at 313 to 346 tokens for current models),
# which the prompt bound must hold on top.
TOOL_USE_SYSTEM_TOKENS = 512

_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


# -- requests -----------------------------------------------------------------------------------


def request_body(body: dict[str, Any], upstream_model: str, max_tokens: int) -> dict[str, Any]:
    """The Messages API body for an OpenAI chat body (already validated by the gateway)."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(body["messages"]):
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_text_blocks(message.get("content"), f"messages[{index}].content"))
            continue
        if role == "user":
            blocks = _user_blocks(message.get("content"), f"messages[{index}].content")
            _append(turns, "user", blocks)
        elif role == "assistant":
            _append(turns, "assistant", _assistant_blocks(message, index))
        elif role in ("tool", "function"):
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": str(message.get("tool_call_id") or message.get("name") or ""),
                "content": _plain_text(message.get("content")),
            }
            _append(turns, "user", [result])
        else:
            raise InvalidRequest(
                f"Invalid value for 'messages[{index}].role': {role!r} cannot be sent to this "
                "model's upstream.",
                code="invalid_value",
                param=f"messages[{index}].role",
            )
    out: dict[str, Any] = {"model": upstream_model, "max_tokens": max_tokens, "messages": turns}
    if system:
        out["system"] = system
    if body.get("stream") is True:
        out["stream"] = True
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        out["temperature"] = min(float(temperature), 1.0)  # OpenAI's range is 0-2, this one 0-1
    top_p = body.get("top_p")
    if isinstance(top_p, int | float) and not isinstance(top_p, bool):
        out["top_p"] = top_p
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = [item for item in stop if isinstance(item, str)]
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    tools = _tools(body)
    if tools:
        out["tools"] = tools
        choice = _tool_choice(body)
        if choice is not None:
            out["tool_choice"] = choice
    return out


def _append(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)  # the API wants the roles alternating
    else:
        turns.append({"role": role, "content": blocks})


def _plain_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )  # fmt: skip
    return ""


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    text = _plain_text(content)
    return [{"type": "text", "text": text}] if text else []


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for index, part in enumerate(content if isinstance(content, list) else []):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            blocks.append({"type": "image", "source": _image_source(url, f"{where}[{index}]")})
        else:
            raise InvalidRequest(
                f"Invalid value for '{where}[{index}].type': {kind!r} parts cannot be sent to "
                "this model's upstream; send text and images.",
                code="invalid_value",
                param=f"{where}[{index}].type",
            )
    return blocks


def _image_source(url: Any, where: str) -> dict[str, Any]:
    if isinstance(url, str) and url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[5:].split(";", 1)[0]
        if ";base64" in header and media_type.startswith("image/") and data:
            return {"type": "base64", "media_type": media_type, "data": data}
    elif isinstance(url, str) and url.startswith(("https://", "http://")):
        return {"type": "url", "url": url}
    raise InvalidRequest(
        f"Invalid value for '{where}.image_url.url': send an http(s) URL or a base64 data: URL "
        "of an image.",
        code="invalid_value",
        param=f"{where}.image_url.url",
    )


def _assistant_blocks(message: dict[str, Any], index: int) -> list[dict[str, Any]]:
    blocks = _text_blocks(message.get("content"), f"messages[{index}].content")
    calls = message.get("tool_calls")
    legacy = message.get("function_call")
    if not isinstance(calls, list):
        calls = [{"id": "call_legacy", "function": legacy}] if isinstance(legacy, dict) else []
    for number, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        where = f"messages[{index}].tool_calls[{number}].function.arguments"
        try:
            arguments = orjson.loads(function.get("arguments") or "{}")
        except (orjson.JSONDecodeError, TypeError):
            arguments = None
        if not isinstance(arguments, dict):
            raise InvalidRequest(
                f"Invalid value for '{where}': this model's upstream needs the arguments as a "
                "JSON object.",
                code="invalid_value",
                param=where,
            )
        blocks.append(
            {
                "type": "tool_use",
                "id": str(call.get("id") or f"call_{index}_{number}"),
                "name": str(function.get("name", "")),
                "input": arguments,
            }
        )
    return blocks


def _tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    functions: list[Any] = []
    for tool in body.get("tools") or []:
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            functions.append(tool["function"])
    functions.extend(item for item in body.get("functions") or [] if isinstance(item, dict))
    tools = []
    for function in functions:
        translated: dict[str, Any] = {
            "name": function.get("name"),
            "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
        }
        if isinstance(function.get("description"), str):
            translated["description"] = function["description"]
        tools.append(translated)
    return tools


def _tool_choice(body: dict[str, Any]) -> dict[str, Any] | None:
    choice = body.get("tool_choice", body.get("function_call"))
    out: dict[str, Any] | None = None
    if choice == "auto":
        out = {"type": "auto"}
    elif choice == "none":
        out = {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict):
        function = choice.get("function", choice)
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            out = {"type": "tool", "name": function["name"]}
    if body.get("parallel_tool_calls") is False:
        out = {**(out or {"type": "auto"}), "disable_parallel_tool_use": True}
    return out


# -- answers ------------------------------------------------------------------------------------


def usage_object(usage: Any) -> dict[str, Any] | None:
    """OpenAI's usage for an Anthropic usage object; None when its counts are not believable
    integers (then Dubhe counts)."""
    if not isinstance(usage, dict):
        return None
    counts = {}
    for key in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                "cache_read_input_tokens"):  # fmt: skip
        value = usage.get(key) or 0
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return None
        counts[key] = value
    prompt = (
        counts["input_tokens"]
        + counts["cache_creation_input_tokens"]
        + counts["cache_read_input_tokens"]
    )
    return {
        "prompt_tokens": prompt,
        "completion_tokens": counts["output_tokens"],
        "total_tokens": prompt + counts["output_tokens"],
        "prompt_tokens_details": {"cached_tokens": counts["cache_read_input_tokens"]},
    }


def completion(data: dict[str, Any], public_model: str) -> dict[str, Any] | None:
    """A ``chat.completion`` for a Messages API answer; None if it is not one."""
    content = data.get("content")
    if data.get("type") != "message" or not isinstance(content, list):
        return None
    text: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        if not isinstance(block, dict):
            return None
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            reasoning.append(block["thinking"])
        elif kind == "tool_use":
            try:
                arguments = orjson.dumps(block.get("input", {})).decode()
            except orjson.JSONEncodeError:
                return None  # nested deeper than orjson writes: not an answer Dubhe can relay
            calls.append(
                {
                    "id": str(block.get("id", "")),
                    "type": "function",
                    "function": {
                        "name": str(block.get("name", "")),
                        "arguments": arguments,
                    },
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    answer: dict[str, Any] = {
        "id": f"chatcmpl-{data.get('id', '')}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": public_model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": _STOP_REASONS.get(str(data.get("stop_reason")), "stop"),
            }
        ],
    }
    usage = usage_object(data.get("usage"))
    if usage is not None:
        answer["usage"] = usage
    return answer


class StreamTranslator:
    """Anthropic's SSE events in, OpenAI ``chat.completion.chunk`` SSE events out.

    ``feed`` takes bytes as they arrive and returns whole translated events. An event longer
    than ``max_event_bytes`` or one that is not what the API documents becomes an error event
    (which ends the relay, like an OpenAI upstream's own error event)."""

    def __init__(self, public_model: str, request_id: str, max_event_bytes: int) -> None:
        self._model = public_model
        self._id = f"chatcmpl-{request_id}"
        self._created = int(time.time())
        self._max_event_bytes = max_event_bytes
        self._pending: list[bytes] = []  # the reads of an event not yet ended
        self._pending_size = 0
        self._tail = b""  # the last bytes received, for a blank line split across reads
        self._tool_index: dict[int, int] = {}  # content block index -> tool call index
        self._input: dict[str, Any] = {}  # message_start's usage
        self._output: dict[str, Any] = {}  # message_delta's usage
        self._finished = False
        self._role_pending = False  # message_start came; its role chunk is not sent yet

    def feed(self, data: bytes) -> bytes:
        if self._finished:
            return b""
        tail, self._tail = self._tail, (self._tail + data[-3:])[-3:]
        if not _may_end_event(tail, data):
            # Kept, not joined: an upstream trickling one giant event in small reads must not
            # make every read copy and rescan all it sent before (quadratic, a stalled worker).
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > self._max_event_bytes:
                self._pending.clear()
                return self._fail(f"an event exceeded {self._max_event_bytes} bytes")
            return b""
        self._pending.append(data)
        buffer = b"".join(self._pending).replace(b"\r\n", b"\n")
        events = buffer.split(b"\n\n")
        rest = events.pop()
        self._pending = [rest] if rest else []
        self._pending_size = len(rest)
        if len(rest) > self._max_event_bytes:
            self._pending.clear()
            return self._fail(f"an event exceeded {self._max_event_bytes} bytes")
        out: list[bytes] = []
        for event in events:
            if event.strip():
                out.append(self._translate(event))
                if self._finished:
                    break
        return b"".join(out)

    def _translate(self, event: bytes) -> bytes:
        data = b""
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                data += line[5:].strip()
        if not data:
            return b""  # an event with no data (a comment)
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            return self._fail("an event is not valid JSON")
        if not isinstance(parsed, dict):
            return self._fail("an event is not a JSON object")
        kind = parsed.get("type")
        if kind == "message_start":
            message = parsed.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            self._input = usage if isinstance(usage, dict) else {}
            # The role chunk goes out with the first chunk after it: an upstream that fails
            # right after message_start (Anthropic's overloaded error) has then sent the client
            # nothing, and the request fails over like a 529 would.
            self._role_pending = True
            return b""
        if kind == "content_block_start":
            block = parsed.get("content_block")
            if isinstance(block, dict) and block.get("type") == "tool_use":
                tool = self._tool_index.setdefault(_int(parsed.get("index")), len(self._tool_index))
                call = {"index": tool, "id": str(block.get("id", "")), "type": "function",
                        "function": {"name": str(block.get("name", "")), "arguments": ""}}  # fmt: skip
                return self._chunk({"tool_calls": [call]})
            if isinstance(block, dict) and block.get("type") == "text" and block.get("text"):
                return self._chunk({"content": str(block["text"])})
            return b""
        if kind == "content_block_delta":
            delta = parsed.get("delta")
            if not isinstance(delta, dict):
                return self._fail("a content_block_delta has no delta")
            delta_type = delta.get("type")
            if delta_type == "text_delta" and isinstance(delta.get("text"), str):
                return self._chunk({"content": delta["text"]})
            if delta_type == "thinking_delta" and isinstance(delta.get("thinking"), str):
                return self._chunk({"reasoning_content": delta["thinking"]})
            if delta_type == "input_json_delta" and isinstance(delta.get("partial_json"), str):
                known = self._tool_index.get(_int(parsed.get("index")))
                if known is None:
                    return self._fail("an input_json_delta for a block that is not a tool call")
                call = {"index": known, "function": {"arguments": delta["partial_json"]}}
                return self._chunk({"tool_calls": [call]})
            return b""  # signature_delta and others carry nothing to relay
        if kind == "message_delta":
            delta = parsed.get("delta")
            usage = parsed.get("usage")
            if isinstance(usage, dict):
                self._output = usage
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            if reason is None:
                return b""
            return self._chunk({}, _STOP_REASONS.get(str(reason), "stop"))
        if kind == "message_stop":
            self._finished = True
            role = self._role_chunk()
            usage = usage_object({**self._input, **self._output})
            tail = b""
            if usage is not None:
                tail = self._event({"id": self._id, "object": "chat.completion.chunk",
                                    "created": self._created, "model": self._model,
                                    "choices": [], "usage": usage})  # fmt: skip
            return role + tail + b"data: [DONE]\n\n"
        if kind == "error":
            error = parsed.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            self._finished = True
            return self._event({"error": {"message": str(message or "upstream error"),
                                          "type": "upstream_error"}})  # fmt: skip
        if kind in ("ping", "content_block_stop"):
            return b""
        return b""  # new event types are ignored, as the API's versioning policy asks

    def _role_chunk(self) -> bytes:
        if not self._role_pending:
            return b""
        self._role_pending = False
        return self._chunk({"role": "assistant", "content": ""})

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return self._role_chunk() + self._event(
            {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    @staticmethod
    def _event(payload: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    def _fail(self, why: str) -> bytes:
        self._finished = True
        return self._event(
            {"error": {"message": f"The upstream's stream broke: {why}.", "type": "upstream_error"}}
        )


def _may_end_event(tail: bytes, data: bytes) -> bool:
    """Whether this read, after the bytes ``tail`` received just before it, may end an event (a
    blank line, with ``\\n`` or ``\\r\\n`` line ends, possibly split across reads)."""
    joint = tail + data[:3]
    return b"\n\n" in data or b"\n\r\n" in data or b"\n\n" in joint or b"\n\r\n" in joint


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else -1
