"""A strict local stand-in for Anthropic's Messages API (``POST /v1/messages``), for Dubhe's
translation tests over real HTTP.

It refuses what the real API documents it refuses, with the API's error shape
(``{"type": "error", "error": {"type", "message"}}``): a missing or wrong ``x-api-key`` (401), no
``anthropic-version`` (400), unknown top-level fields or block fields ("Extra inputs are not
permitted"), ``max_tokens`` missing or not a positive integer, no messages, roles other than
user/assistant or not alternating, empty text blocks, images that are neither a base64 source of
jpeg/png/gif/webp nor a url source, ``tool_use`` outside an assistant turn, a ``tool_result``
whose id no ``tool_use`` of the turn before holds, a system that is not text, a temperature
outside 0-1, and tools whose name or ``input_schema`` is malformed.

Its answers follow the documented formats, non-streaming and as SSE events (``message_start``,
``content_block_start``, ``ping``, ``content_block_delta`` with ``text_delta`` or
``input_json_delta``, ``content_block_stop``, ``message_delta``, ``message_stop``, ``error``).
Directives in the last user text (``[[anthropic:name]]`` or ``[[anthropic:name=N]]``):

* ``tool`` with tools given: call the first tool (or the one ``tool_choice`` names) with
  ``{"city": "Paris"}``; ``stop_reason`` ``tool_use``.
* ``status=N``: answer that HTTP status with the matching error type (529 overloaded).
* ``stream_error``: a stream sends one text delta, then an ``error`` event (overloaded).
* ``cache=N``: report N cache-read and N/2 cache-write input tokens.

Otherwise it answers ``ANSWER`` (cut at ``max_tokens`` words, ``stop_reason`` ``max_tokens``),
one word per token. ``GET /fake/last`` returns the last request body it accepted.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from dubhe.sim._app import _read_body, _run_lifespan
from dubhe.sim._disconnect import Receive
from tests.upstreams.realistic import ROOT, Send, _send_json

API_KEY = "sk-ant-test-0123456789"
ANSWER = "The capital of France is Paris."
_TOP_LEVEL = frozenset({"model", "messages", "max_tokens", "system", "stop_sequences", "stream",
                        "temperature", "top_p", "top_k", "metadata", "tools", "tool_choice",
                        "thinking", "service_tier"})  # fmt: skip
_BLOCK_FIELDS = {
    "text": {"type", "text", "cache_control", "citations"},
    "image": {"type", "source", "cache_control"},
    "tool_use": {"type", "id", "name", "input", "cache_control"},
    "tool_result": {"type", "tool_use_id", "content", "is_error", "cache_control"},
}
_MEDIA_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_DIRECTIVE = re.compile(r"\[\[anthropic:([a-z_]+)(?:=(\d+))?\]\]")
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}  # fmt: skip


class Refused(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> bytes:
    kind = _ERROR_TYPES.get(status, "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def check_request(body: Any) -> dict[str, Any]:
    """The body if the real API would take it; else ``Refused`` with its message."""
    if not isinstance(body, dict):
        raise Refused("body: Input should be an object")
    extra = set(body) - _TOP_LEVEL
    if extra:
        raise Refused(f"{sorted(extra)[0]}: Extra inputs are not permitted")
    if not isinstance(body.get("model"), str):
        raise Refused("model: Field required")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise Refused("max_tokens: Field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise Refused("max_tokens: Input should be a valid positive integer")
    temperature = body.get("temperature", 0)
    if not isinstance(temperature, int | float) or not 0 <= temperature <= 1:
        raise Refused("temperature: Input should be less than or equal to 1")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        if not isinstance(system, list):
            raise Refused("system: Input should be a valid string or list of text blocks")
        for index, block in enumerate(system):
            _check_block(block, f"system.{index}", {"text"})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Refused("messages: at least one message is required")
    previous_tool_ids: set[str] = set()
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise Refused(f"{where}: Extra inputs are not permitted")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise Refused(f"{where}.role: Input should be 'user' or 'assistant'")
        if index == 0 and role != "user":
            raise Refused("messages: the first message must use the \"user\" role")
        if index and messages[index - 1].get("role") == role:
            raise Refused("messages: roles must alternate between \"user\" and \"assistant\"")
        content = message.get("content")
        if isinstance(content, str):
            if not content:
                raise Refused(f"{where}: text content blocks must be non-empty")
            previous_tool_ids = set()
            continue
        if not isinstance(content, list) or not content:
            raise Refused(f"{where}.content: Input should be a valid string or non-empty list")
        allowed = {"text", "image", "tool_result"} if role == "user" else {"text", "tool_use"}
        tool_ids = set()
        for number, block in enumerate(content):
            _check_block(block, f"{where}.content.{number}", allowed)
            if block["type"] == "tool_use":
                tool_ids.add(block["id"])
            if block["type"] == "tool_result" and block["tool_use_id"] not in previous_tool_ids:
                raise Refused(f"{where}.content.{number}: unexpected `tool_use_id` found in "
                              "`tool_result` blocks; each must have a `tool_use` block in the "
                              "previous message")  # fmt: skip
        previous_tool_ids = tool_ids
    for index, tool in enumerate(body.get("tools") or []):
        where = f"tools.{index}"
        if not isinstance(tool, dict) or set(tool) - {"name", "description", "input_schema",
                                                      "cache_control"}:  # fmt: skip
            raise Refused(f"{where}: Extra inputs are not permitted")
        if not isinstance(tool.get("name"), str) or not _TOOL_NAME.match(tool["name"]):
            raise Refused(f"{where}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise Refused(f"{where}.input_schema.type: Input should be 'object'")
    choice = body.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "none", "tool"):
            raise Refused("tool_choice: Input should be a valid tool choice")
        if set(choice) - {"type", "name", "disable_parallel_tool_use"}:
            raise Refused("tool_choice: Extra inputs are not permitted")
        if choice["type"] == "tool" and not isinstance(choice.get("name"), str):
            raise Refused("tool_choice.name: Field required")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list)
                              or not all(isinstance(s, str) for s in stops)):  # fmt: skip
        raise Refused("stop_sequences: Input should be a valid list of strings")
    return body


def _check_block(block: Any, where: str, allowed: set[str]) -> None:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind not in allowed:
        raise Refused(f"{where}.type: Input tag {kind!r} is not allowed here")
    extra = set(block) - _BLOCK_FIELDS[kind]
    if extra:
        raise Refused(f"{where}.{sorted(extra)[0]}: Extra inputs are not permitted")
    if kind == "text" and (not isinstance(block.get("text"), str) or not block["text"]):
        raise Refused(f"{where}: text content blocks must be non-empty")
    if kind == "image":
        source = block.get("source")
        if not isinstance(source, dict):
            raise Refused(f"{where}.source: Field required")
        if source.get("type") == "base64":
            if source.get("media_type") not in _MEDIA_TYPES or not source.get("data"):
                raise Refused(f"{where}.source.media_type: Input should be one of "
                              f"{sorted(_MEDIA_TYPES)}")  # fmt: skip
        elif source.get("type") != "url" or not str(source.get("url", "")).startswith("http"):
            raise Refused(f"{where}.source: Input should be a base64 or url source")
    if kind == "tool_use" and not (isinstance(block.get("id"), str)
                                   and isinstance(block.get("name"), str)
                                   and isinstance(block.get("input"), dict)):  # fmt: skip
        raise Refused(f"{where}: a tool_use block needs id, name and an object input")
    if kind == "tool_result" and not isinstance(block.get("tool_use_id"), str):
        raise Refused(f"{where}.tool_use_id: Field required")


@dataclass
class Answer:
    blocks: list[dict[str, Any]]
    stop_reason: str
    input_tokens: int
    output_tokens: int
    cache: int
    stream_error: bool


def plan(body: dict[str, Any]) -> Answer | int:
    """The answer to a valid request, or the error status a directive asks for."""
    text = ""
    last = body["messages"][-1]
    if last["role"] == "user":
        content = last["content"]
        if isinstance(content, str):
            text = content
        else:
            text = " ".join(b.get("text", "") for b in content if b["type"] == "text")
    directives = {name: int(value or 0) for name, value in _DIRECTIVE.findall(text)}
    if directives.get("status"):
        return directives["status"]
    strings = orjson.dumps(body["messages"]) + orjson.dumps(body.get("system", ""))
    input_tokens = len(strings) // 4 + 8
    if "tool" in directives and body.get("tools"):
        choice = body.get("tool_choice") or {}
        name = choice.get("name") or body["tools"][0]["name"]
        block = {"type": "tool_use", "id": "toolu_01A", "name": name, "input": {"city": "Paris"}}
        return Answer([block], "tool_use", input_tokens, 12, directives.get("cache", 0), False)
    words = ANSWER.split(" ")
    cut = words[: body["max_tokens"]]
    block = {"type": "text", "text": " ".join(cut)}
    stop = "end_turn" if len(cut) == len(words) else "max_tokens"
    return Answer([block], stop, input_tokens, len(cut), directives.get("cache", 0),
                  "stream_error" in directives)  # fmt: skip


def _usage(answer: Answer, output_tokens: int) -> dict[str, int]:
    return {"input_tokens": answer.input_tokens, "output_tokens": output_tokens,
            "cache_creation_input_tokens": answer.cache // 2,
            "cache_read_input_tokens": answer.cache}  # fmt: skip


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class FakeAnthropic:
    def __init__(self) -> None:
        self.last: dict[str, Any] = {}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _run_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/fake/last" and method == "GET":
            await _send_json(send, 200, orjson.dumps(self.last))
            return
        if path != "/v1/messages" or method != "POST":
            await _send_json(send, 404, _error(404, f"Not found: {method} {path}"))
            return
        headers = {key.decode().lower(): value.decode() for key, value in scope["headers"]}
        raw = await _read_body(receive) or b""
        if headers.get("x-api-key") != API_KEY:
            await _send_json(send, 401, _error(401, "invalid x-api-key"))
            return
        if not headers.get("anthropic-version"):
            await _send_json(send, 400, _error(400, "anthropic-version: header is required"))
            return
        try:
            body = check_request(orjson.loads(raw))
        except orjson.JSONDecodeError:
            await _send_json(send, 400, _error(400, "The request body is not valid JSON."))
            return
        except Refused as refused:
            await _send_json(send, refused.status, _error(refused.status, str(refused)))
            return
        self.last = body
        answer = plan(body)
        if isinstance(answer, int):
            await _send_json(send, answer, _error(answer, "Overloaded"))
            return
        if body.get("stream"):
            await self._stream(send, body, answer)
            return
        message = {"id": "msg_01", "type": "message", "role": "assistant", "model": body["model"],
                   "content": answer.blocks, "stop_reason": answer.stop_reason,
                   "stop_sequence": None, "usage": _usage(answer, answer.output_tokens)}  # fmt: skip
        await _send_json(send, 200, orjson.dumps(message))

    async def _stream(self, send: Send, body: dict[str, Any], answer: Answer) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip

        async def emit(kind: str, data: dict[str, Any]) -> None:
            await send({"type": "http.response.body", "body": _sse(kind, data), "more_body": True})

        start = {"id": "msg_01", "type": "message", "role": "assistant", "model": body["model"],
                 "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": _usage(answer, 1)}  # fmt: skip
        await emit("message_start", {"type": "message_start", "message": start})
        for index, block in enumerate(answer.blocks):
            if block["type"] == "text":
                await emit("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {"type": "text", "text": ""}})
                await emit("ping", {"type": "ping"})
                for number, word in enumerate(block["text"].split(" ")):
                    piece = word if number == 0 else " " + word
                    await emit("content_block_delta", {"type": "content_block_delta",
                                                       "index": index,
                                                       "delta": {"type": "text_delta",
                                                                 "text": piece}})  # fmt: skip
                    if answer.stream_error:
                        await emit("error", {"type": "error", "error": {
                            "type": "overloaded_error", "message": "Overloaded"}})  # fmt: skip
                        await send({"type": "http.response.body", "body": b""})
                        return
            else:
                opened = {**block, "input": {}}
                await emit("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": opened})  # fmt: skip
                arguments = orjson.dumps(block["input"]).decode()
                for piece in (arguments[:5], arguments[5:]):
                    await emit("content_block_delta", {"type": "content_block_delta",
                                                       "index": index,
                                                       "delta": {"type": "input_json_delta",
                                                                 "partial_json": piece}})  # fmt: skip
            await emit("content_block_stop", {"type": "content_block_stop", "index": index})
        await emit("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": answer.stop_reason,
                                               "stop_sequence": None},
                                     "usage": {"output_tokens": answer.output_tokens}})  # fmt: skip
        await emit("message_stop", {"type": "message_stop"})
        await send({"type": "http.response.body", "body": b""})


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from dubhe.sim._server import _bind

    parser = argparse.ArgumentParser(description="A strict fake of Anthropic's Messages API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    listener = _bind(args.host, args.port)
    config = uvicorn.Config(FakeAnthropic(), loop="uvloop", http="httptools", lifespan="on",
                            access_log=False, log_level="warning", server_header=False)
    uvicorn.Server(config).run(sockets=[listener])


@dataclass
class RunningFake:
    base_url: str  # ends in /v1
    process: subprocess.Popen[bytes]

    def last(self) -> dict[str, Any]:
        root = self.base_url.removesuffix("/v1")
        return httpx.get(f"{root}/fake/last", timeout=10).json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_fake_anthropic(log: Path) -> RunningFake:
    from tests.conftest import free_port, wait_until_up

    port = free_port()
    handle = log.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.upstreams.anthropic_fake", "--port", str(port)],
        cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_until_up(f"http://127.0.0.1:{port}/fake/last", process, log)
    return RunningFake(f"http://127.0.0.1:{port}/v1", process)


if __name__ == "__main__":
    main()
