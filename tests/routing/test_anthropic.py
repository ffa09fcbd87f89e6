"""An Anthropic Messages deployment behind Dubhe, over real HTTP: the OpenAI SDK talks to
``dubhe serve``, which translates to the strict fake (tests/upstreams/anthropic_fake.py) and back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import orjson
import pytest
from openai import BadRequestError, InternalServerError, OpenAI, UnprocessableEntityError

from tests.conftest import Server, start_server
from tests.routing.conftest import assert_no_tracebacks
from tests.upstreams.anthropic_fake import (
    ANSWER,
    API_KEY,
    RunningFake,
    start_fake_anthropic,
)
from tests.upstreams.realistic import iter_events

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}  # fmt: skip
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
         "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")  # fmt: skip


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningFake]:
    running = start_fake_anthropic(tmp_path_factory.mktemp("anthropic") / "fake.log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def server(
    database_url: str, fake: RunningFake, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    config = f"""
[[upstreams]]
name = "claude"
kind = "anthropic"
base_url = "{fake.base_url}"
api_key_env = "TEST_ANTHROPIC_KEY"
models = ["dubhe-agent", "dubhe-code"]
model_map = {{ "dubhe-agent" = "claude-sonnet-4-5" }}
"""
    running = start_server(tmp_path_factory.mktemp("data"), database_url, config,
                           TEST_ANTHROPIC_KEY=API_KEY)  # fmt: skip
    yield running
    running.running.stop()
    log = running.running.log.read_text()
    assert_no_tracebacks(log)
    assert API_KEY not in log, "the upstream's key was logged"


@pytest.fixture
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=server.key("ultimate"), max_retries=0)


def test_the_fake_refuses_what_the_real_api_refuses(fake: RunningFake) -> None:
    url = fake.base_url + "/messages"
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    good = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}
    assert httpx.post(url, json=good, headers=headers).status_code == 200
    bad = [
        {k: v for k, v in good.items() if k != "max_tokens"},
        {**good, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {**good, "frequency_penalty": 0.5},
        {**good, "messages": [{"role": "system", "content": "x"}]},
    ]
    for body in bad:
        response = httpx.post(url, json=body, headers=headers)
        assert response.status_code == 400, body
        assert response.json()["type"] == "error"
    assert httpx.post(url, json=good, headers={"anthropic-version": "x"}).status_code == 401


def test_a_plain_answer_with_a_system_prompt(client: OpenAI, fake: RunningFake) -> None:
    answer = client.chat.completions.create(
        model="dubhe-agent", max_tokens=50, temperature=1.5, stop=["\n\n"], user="u-1",
        messages=[{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is the capital of France?"}],
    )  # fmt: skip
    assert answer.model == "dubhe-agent"
    assert answer.choices[0].message.content == ANSWER
    assert answer.choices[0].finish_reason == "stop"
    sent = fake.last()
    assert sent["model"] == "claude-sonnet-4-5"
    assert sent["max_tokens"] == 50  # the limit held, in Anthropic's own field
    assert sent["system"] == [{"type": "text", "text": "Answer briefly."}]
    assert (sent["temperature"], sent["stop_sequences"]) == (1.0, ["\n\n"])
    assert sent["metadata"] == {"user_id": "u-1"}
    assert answer.usage is not None and answer.usage.completion_tokens == len(ANSWER.split())


def test_the_output_limit_cuts_the_answer(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model="dubhe-code", max_tokens=2, messages=[{"role": "user", "content": "Capital?"}]
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 2


def test_cache_tokens_are_prompt_tokens(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model="dubhe-agent", max_tokens=20,
        messages=[{"role": "user", "content": "Hi [[anthropic:cache=100]]"}],
    )  # fmt: skip
    usage = answer.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 100
    # input + cache write (50) + cache read (100).
    assert usage.prompt_tokens >= 150
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_a_stream_translates_to_chunks(client: OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="dubhe-agent", max_tokens=50, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    ))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.model == "dubhe-agent" for c in chunks)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == len(ANSWER.split())


def test_tools_a_call_and_its_result(client: OpenAI, fake: RunningFake) -> None:
    question = {"role": "user", "content": "Weather in Paris? [[anthropic:tool]]"}
    answer = client.chat.completions.create(
        model="dubhe-agent", max_tokens=100, tools=[WEATHER], tool_choice="required",
        messages=[question],  # type: ignore[list-item]
    )  # fmt: skip
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    sent = fake.last()
    assert sent["tool_choice"] == {"type": "any"}
    assert sent["tools"][0]["input_schema"]["required"] == ["city"]
    # The conversation goes on with the tool's result (a user turn of tool_result blocks).
    follow = client.chat.completions.create(
        model="dubhe-agent", max_tokens=100, tools=[WEATHER],  # type: ignore[list-item]
        messages=[
            question,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": "get_weather", "arguments": call.function.arguments}}]},  # type: ignore[union-attr]
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
            {"role": "user", "content": "And so?"},
        ],
    )  # fmt: skip
    assert follow.choices[0].message.content == ANSWER
    turns = fake.last()["messages"]
    assert [turn["role"] for turn in turns] == ["user", "assistant", "user"]
    assert turns[2]["content"][0] == {"type": "tool_result", "tool_use_id": call.id,
                                      "content": "Sunny, 21 C"}  # fmt: skip


def test_a_tool_call_in_a_stream(client: OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="dubhe-agent", max_tokens=100, stream=True, tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather? [[anthropic:tool]]"}],
    ))  # fmt: skip
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert calls[0].id == "toolu_01A" and calls[0].function is not None
    assert calls[0].function.name == "get_weather"
    arguments = "".join(call.function.arguments or "" for call in calls if call.function)
    assert json.loads(arguments) == {"city": "Paris"}
    assert {call.index for call in calls} == {0}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_an_image_is_sent_as_a_base64_block(client: OpenAI, fake: RunningFake) -> None:
    client.chat.completions.create(
        model="dubhe-agent", max_tokens=20,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                               {"type": "image_url", "image_url": {"url": PIXEL}}]}],
    )  # fmt: skip
    image = fake.last()["messages"][0]["content"][1]
    assert image["type"] == "image"
    assert image["source"]["media_type"] == "image/png"
    assert PIXEL.endswith(image["source"]["data"])


def test_n_above_one_is_refused_where_no_deployment_takes_it(client: OpenAI) -> None:
    with pytest.raises(UnprocessableEntityError) as refused:
        client.chat.completions.create(
            model="dubhe-agent", max_tokens=20, n=2, messages=[{"role": "user", "content": "Hi"}]
        )
    assert refused.value.body["code"] == "unsupported_by_upstream"  # type: ignore[index]
    assert refused.value.body["param"] == "n"  # type: ignore[index]


def test_errors(client: OpenAI, server: Server) -> None:
    # The upstream refused the request (a 400): relayed as the client's error, not retried.
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(
            model="dubhe-agent", max_tokens=20, messages=[{"role": "assistant", "content": "Hi"}]
        )
    assert refused.value.body["code"] == "upstream_rejected"  # type: ignore[index]
    # Overloaded (529) every time: retried, then Dubhe's 500.
    with pytest.raises(InternalServerError) as failed:
        client.chat.completions.create(
            model="dubhe-agent", max_tokens=20,
            messages=[{"role": "user", "content": "Hi [[anthropic:status=529]]"}],
        )  # fmt: skip
    assert failed.value.body["code"] == "upstream_error"  # type: ignore[index]
    # An error event mid-stream ends the stream with Dubhe's error frame, after the text so far.
    body = {"model": "dubhe-agent", "max_tokens": 20, "stream": True,
            "messages": [{"role": "user", "content": "Hi [[anthropic:stream_error]]"}]}  # fmt: skip
    response = httpx.post(server.base_url + "/chat/completions", json=body, timeout=30,
                          headers={"authorization": f"Bearer {server.key('ultimate')}"})  # fmt: skip
    assert response.status_code == 200
    events = list(iter_events(response.content))
    assert b"[DONE]" not in events
    assert orjson.loads(events[-1])["error"]["code"] == "upstream_error"
    assert orjson.loads(events[1])["choices"][0]["delta"]["content"] == "The"


@pytest.mark.parametrize("functions", [5, True, [5], [{"name": 5}]])
def test_malformed_legacy_functions_are_a_400_not_a_500(server: Server, functions: object) -> None:
    """``functions`` (the legacy tools) was not validated: a number made the Anthropic
    translation iterate it (TypeError, a 500 and a traceback before anything was held)."""
    body = {"model": "dubhe-agent", "max_tokens": 20, "functions": functions,
            "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
    response = httpx.post(server.base_url + "/chat/completions", json=body, timeout=30,
                          headers={"authorization": f"Bearer {server.key('ultimate')}"})  # fmt: skip
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"]["param"].startswith("functions")
