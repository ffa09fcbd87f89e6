"""Simulated tool calls: pick a function from ``tools`` and invent its arguments."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import orjson

from dubhe.sim._errors import InvalidRequest
from dubhe.sim._tokens import ENCODING, count_tokens

# One dummy per JSON-schema type; anything unknown or untyped becomes null.
_DUMMY_BY_TYPE: dict[str, Any] = {
    "string": "sim",
    "number": 1,
    "integer": 1,
    "boolean": True,
    "array": [],
    "object": {},
    "null": None,
}


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    """A JSON object serialised to a string, as OpenAI sends it."""

    @property
    def completion_tokens(self) -> int:
        return count_tokens(self.name) + count_tokens(self.arguments)


def choose_tool_call(request: dict[str, Any]) -> ToolCall | None:
    """The tool call to answer with, or None when the answer should be text."""
    tools = request.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    tool_choice = request.get("tool_choice")
    if tool_choice == "none":
        return None
    functions = [
        tool["function"]
        for tool in tools
        if isinstance(tool, dict)
        and tool.get("type", "function") == "function"
        and isinstance(tool.get("function"), dict)
        and isinstance(tool["function"].get("name"), str)
    ]
    if not functions:
        return None
    function = functions[0]
    if isinstance(tool_choice, dict):
        wanted = (tool_choice.get("function") or {}).get("name")
        named = [candidate for candidate in functions if candidate["name"] == wanted]
        if not named:
            raise InvalidRequest(
                f"tool_choice names function {wanted!r}, which is not in tools",
                param="tool_choice",
            )
        function = named[0]
    return ToolCall(
        id=f"call_sim_{random.getrandbits(96):024x}",
        name=function["name"],
        arguments=dummy_arguments(function.get("parameters")),
    )


def dummy_arguments(parameters: Any) -> str:
    """Fill the schema's required properties with a dummy value of their type."""
    if not isinstance(parameters, dict):
        return "{}"
    properties = parameters.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    required = parameters.get("required")
    required = required if isinstance(required, list) else []
    arguments = {
        name: _dummy_value(properties.get(name)) for name in required if isinstance(name, str)
    }
    return orjson.dumps(arguments).decode()


def _dummy_value(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return None
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]  # a dummy outside the enum would fail strict validation
    schema_type = schema.get("type")
    if isinstance(schema_type, list):  # e.g. ["string", "null"]: prefer the real type
        schema_type = next((kind for kind in schema_type if kind != "null"), "null")
    return _DUMMY_BY_TYPE.get(schema_type) if isinstance(schema_type, str) else None


def argument_fragments(arguments: str) -> list[str]:
    """Split ``arguments`` the way OpenAI streams them: about one token per piece.

    Token bytes are buffered until they form valid UTF-8, so a multi-byte
    character split across tokens is never sent in halves.
    """
    fragments: list[str] = []
    pending = b""
    for token in ENCODING.encode_ordinary(arguments):
        pending += ENCODING.decode_single_token_bytes(token)
        try:
            fragments.append(pending.decode())
        except UnicodeDecodeError:
            continue
        pending = b""
    return fragments
