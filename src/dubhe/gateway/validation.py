"""Validation of the chat-completions fields Dubhe owns, with OpenAI's types and ranges.

Everything else in the body passes to the upstream untouched. Errors name the JSON path of the
offending value (``messages[1].role``) so a client can fix it without guessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dubhe.catalog import ModelSpec
from dubhe.errors import UnprocessableRequest
from dubhe.immutable import immutable

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
CONTENT_PART_TYPES = frozenset({"text", "image_url", "input_audio", "file", "refusal"})
TOOL_CHOICE_MODES = frozenset({"none", "auto", "required"})
MAX_STOP_SEQUENCES = 4


@immutable
class ChatRequest:
    """What the gateway needs from a validated request; the body itself stays a plain dict."""

    stream: bool
    include_usage: bool  # the client asked for the usage chunk
    max_tokens: int | None  # the client's own limit, if any
    max_tokens_field: str  # which field carries it upstream
    n: int
    text_chars: int  # characters of message text: small prompts are counted on the event loop
    messages: int
    # Image parts, and the characters of their URLs: the prompt bound holds the model's
    # ``max_image_tokens`` per image instead of the URL's bytes (a data: URL is megabytes).
    images: int
    image_url_chars: int


def _invalid_type(param: str, expected: str) -> UnprocessableRequest:
    return UnprocessableRequest(
        f"Invalid type for '{param}': expected {expected}.", code="invalid_type", param=param
    )


def _invalid_value(param: str, message: str) -> UnprocessableRequest:
    return UnprocessableRequest(
        f"Invalid value for '{param}': {message}", code="invalid_value", param=param
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number_in(body: dict[str, Any], field: str, low: float, high: float) -> None:
    value = body.get(field)
    if value is None:
        return
    if not _is_number(value):
        raise _invalid_type(field, "a number")
    if not low <= value <= high:
        raise _invalid_value(field, f"{value} is out of range; use a number from {low} to {high}.")


def _int_in(body: dict[str, Any], field: str, low: int, high: int | None = None) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if not _is_int(value):
        raise _invalid_type(field, "an integer")
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise _invalid_value(field, f"{value} is out of range; use an integer {bound}.")
    return int(value)


def _bool(body: dict[str, Any], field: str) -> bool:
    value = body.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid_type(field, "a boolean")
    return value


def validate_chat_request(body: dict[str, Any], model: ModelSpec) -> ChatRequest:
    content = _validate_messages(body["messages"], model)
    stream = _bool(body, "stream")
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _invalid_type("stream_options", "an object")
        if not stream:
            raise _invalid_value(
                "stream_options", "stream_options is only allowed when 'stream' is true."
            )
        usage_flag = stream_options.get("include_usage")
        if usage_flag is not None and not isinstance(usage_flag, bool):
            raise _invalid_type("stream_options.include_usage", "a boolean")
        include_usage = bool(usage_flag)
    _number_in(body, "temperature", 0, 2)
    _number_in(body, "top_p", 0, 1)
    _number_in(body, "presence_penalty", -2, 2)
    _number_in(body, "frequency_penalty", -2, 2)
    n = _int_in(body, "n", 1, 128) or 1
    max_tokens = _int_in(body, "max_tokens", 1)
    max_tokens_field = "max_tokens"
    max_completion_tokens = _int_in(body, "max_completion_tokens", 1)
    if max_completion_tokens is not None:
        max_tokens_field = "max_completion_tokens"
        max_tokens = (
            max_completion_tokens if max_tokens is None else min(max_tokens, max_completion_tokens)
        )
    _int_in(body, "top_logprobs", 0, 20)
    _bool(body, "logprobs")
    _bool(body, "parallel_tool_calls")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _invalid_type("seed", "an integer")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _invalid_type("user", "a string")
    _validate_stop(body.get("stop"))
    logit_bias = body.get("logit_bias")
    if logit_bias is not None:
        if not isinstance(logit_bias, dict):
            raise _invalid_type("logit_bias", "an object mapping token ids to numbers")
        for token, bias in logit_bias.items():
            if not _is_number(bias) or not -100 <= bias <= 100:
                raise _invalid_value(f"logit_bias.{token}", "biases must be numbers from -100 to 100.")
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise _invalid_type("response_format", "an object")
        if response_format.get("type") not in ("text", "json_object", "json_schema"):
            raise _invalid_value(
                "response_format.type", "use 'text', 'json_object' or 'json_schema'."
            )
    _validate_tools(body, model)
    return ChatRequest(
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        max_tokens_field=max_tokens_field,
        n=n,
        text_chars=content.text_chars,
        messages=len(body["messages"]),
        images=content.images,
        image_url_chars=content.image_url_chars,
    )


@dataclass(slots=True)
class _Content:
    text_chars: int = 0
    images: int = 0
    image_url_chars: int = 0


# Content part types beyond text, and the model capability each needs.
_PART_CAPABILITIES = {
    "image_url": ("vision", "images"),
    "input_audio": ("audio_input", "audio input"),
    "file": ("file_input", "file input"),
}


def _validate_messages(messages: Any, model: ModelSpec) -> _Content:
    if not isinstance(messages, list):
        raise _invalid_type("messages", "an array of message objects")
    if not messages:
        raise _invalid_value("messages", "the array must contain at least one message.")
    seen = _Content()
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _invalid_type(where, "an object")
        role = message.get("role")
        if role is None:
            raise UnprocessableRequest(
                f"Missing required parameter: '{where}.role'.",
                code="missing_required_parameter",
                param=f"{where}.role",
            )
        if not isinstance(role, str):
            raise _invalid_type(f"{where}.role", "a string")
        if role not in ROLES:
            raise _invalid_value(
                f"{where}.role",
                f"'{role}' is not a role; use one of {', '.join(sorted(ROLES))}.",
            )
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise _invalid_type(f"{where}.name", "a string")
        content = message.get("content")
        if content is None:
            # Only an assistant turn may omit content (it carried tool calls instead).
            if role != "assistant":
                raise UnprocessableRequest(
                    f"Missing required parameter: '{where}.content'.",
                    code="missing_required_parameter",
                    param=f"{where}.content",
                )
        elif isinstance(content, str):
            seen.text_chars += len(content)
        elif isinstance(content, list):
            for part_index, part in enumerate(content):
                _validate_part(part, f"{where}.content[{part_index}]", model, seen)
        else:
            raise _invalid_type(f"{where}.content", "a string or an array of content parts")
    return seen


def _validate_part(part: Any, where: str, model: ModelSpec, seen: _Content) -> None:
    if not isinstance(part, dict):
        raise _invalid_type(where, "an object")
    part_type = part.get("type")
    if not isinstance(part_type, str):
        # Checked before the set membership below: a list or object is not hashable.
        raise _invalid_type(f"{where}.type", "a string")
    if part_type not in CONTENT_PART_TYPES:
        raise _invalid_value(
            f"{where}.type",
            f"{part_type!r} is not a content part type; use one of "
            f"{', '.join(sorted(CONTENT_PART_TYPES))}.",
        )
    if part_type in ("text", "refusal"):
        text = part.get(part_type)
        if not isinstance(text, str):
            raise _invalid_type(f"{where}.{part_type}", "a string")
        seen.text_chars += len(text)
        return
    capability, kind = _PART_CAPABILITIES[part_type]
    if not getattr(model, capability):
        raise UnprocessableRequest(
            f"The model '{model.id}' does not accept {kind}; remove this part, or use a model "
            f"that does (see GET /v1/models).",
            code="unsupported_content",
            param=where,
        )
    detail = part.get(part_type)
    if not isinstance(detail, dict):
        raise _invalid_type(f"{where}.{part_type}", "an object")
    if part_type == "image_url":
        url = detail.get("url")
        if not isinstance(url, str):
            raise _invalid_type(f"{where}.image_url.url", "a string")
        seen.images += 1
        # Characters, not UTF-8 bytes: never more than the bytes, so the bound stays sound.
        seen.image_url_chars += len(url)


def _validate_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list):
        raise _invalid_type("stop", "a string or an array of strings")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise _invalid_value(
            "stop", f"{len(stop)} sequences given; at most {MAX_STOP_SEQUENCES} are allowed."
        )
    for index, sequence in enumerate(stop):
        if not isinstance(sequence, str):
            raise _invalid_type(f"stop[{index}]", "a string")


def _validate_tools(body: dict[str, Any], model: ModelSpec) -> None:
    tools = body.get("tools")
    functions = body.get("functions")
    if tools is not None:
        if not isinstance(tools, list):
            raise _invalid_type("tools", "an array of tool objects")
        for index, tool in enumerate(tools):
            where = f"tools[{index}]"
            if not isinstance(tool, dict):
                raise _invalid_type(where, "an object")
            if tool.get("type") != "function":
                raise _invalid_value(f"{where}.type", "only 'function' tools are supported.")
            function = tool.get("function")
            if not isinstance(function, dict):
                raise _invalid_type(f"{where}.function", "an object")
            if not isinstance(function.get("name"), str) or not function["name"]:
                raise UnprocessableRequest(
                    f"Missing required parameter: '{where}.function.name'.",
                    code="missing_required_parameter",
                    param=f"{where}.function.name",
                )
    if functions is not None:
        # The legacy form of tools: checked like them, or a translation to an upstream's own
        # form (Anthropic's) trips on it.
        if not isinstance(functions, list):
            raise _invalid_type("functions", "an array of function objects")
        for index, function in enumerate(functions):
            where = f"functions[{index}]"
            if not isinstance(function, dict):
                raise _invalid_type(where, "an object")
            if not isinstance(function.get("name"), str) or not function["name"]:
                raise UnprocessableRequest(
                    f"Missing required parameter: '{where}.name'.",
                    code="missing_required_parameter",
                    param=f"{where}.name",
                )
    tool_choice = body.get("tool_choice")
    if tool_choice is not None:
        if isinstance(tool_choice, str):
            if tool_choice not in TOOL_CHOICE_MODES:
                raise _invalid_value("tool_choice", "use 'none', 'auto', 'required' or an object.")
        elif not isinstance(tool_choice, dict):
            raise _invalid_type("tool_choice", "a string or an object")
    if (tools or functions) and not model.function_calling:
        raise UnprocessableRequest(
            f"The model '{model.id}' does not support function calling; remove 'tools', or "
            "use a model with function calling (see GET /v1/models).",
            code="unsupported_parameter",
            param="tools" if tools else "functions",
        )
