"""Every error row of decisions.md §2 that the gateway owns: status, type, code and param."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import Server, execute

CHAT = "/chat/completions"


def post(server: Server, body: object, *, key: str | None = None, raw: bytes | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    sent = {"authorization": f"Bearer {key or server.key('ultimate')}"}
    sent.update(headers or {})
    content = raw if raw is not None else orjson.dumps(body)
    return httpx.post(server.base_url + CHAT, content=content, headers=sent, timeout=30)


def assert_error(response: httpx.Response, status: int, error_type: str, code: str | None,
                 param: str | None = None) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == (error_type, code, param)
    assert isinstance(error["message"], str) and error["message"]
    return error  # type: ignore[no-any-return]


HELLO = {"model": "dubhe-fast", "messages": [{"role": "user", "content": "Hello!"}]}


@pytest.mark.parametrize(
    ("raw", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b"[1, 2]", "invalid_json", None),
        (b'"text"', "invalid_json", None),
        (orjson.dumps({"messages": HELLO["messages"]}), "missing_required_parameter", "model"),
        (orjson.dumps({"model": "dubhe-fast"}), "missing_required_parameter", "messages"),
    ],
)
def test_400_bad_body(server: Server, raw: bytes, code: str, param: str | None) -> None:
    assert_error(post(server, None, raw=raw), 400, "invalid_request_error", code, param)


def test_400_body_over_the_size_limit(server: Server) -> None:
    body = {**HELLO, "messages": [{"role": "user", "content": "x" * 1_100_000}]}
    assert_error(post(server, body), 400, "invalid_request_error", "request_too_large")


def test_401_missing_key(server: Server) -> None:
    response = httpx.post(server.base_url + CHAT, json=HELLO)
    assert_error(response, 401, "authentication_error", "missing_api_key")


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer sk-not-a-dubhe-key",
        "Basic dXNlcjpwYXNz",
        # Well formed (valid checksum) but never issued:
        "Bearer sk-dubhe-00000000000000000000000000000000000000",
    ],
)
def test_401_malformed_or_unknown_key(server: Server, authorization: str) -> None:
    response = httpx.post(server.base_url + CHAT, json=HELLO, headers={"authorization": authorization})
    assert_error(response, 401, "authentication_error", "invalid_api_key")


def test_401_key_with_a_bad_checksum(server: Server) -> None:
    key = server.key("ultimate")
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert_error(post(server, HELLO, key=tampered), 401, "authentication_error", "invalid_api_key")


async def test_401_revoked_key_stops_within_a_second(server: Server, db: AsyncEngine) -> None:
    key = server.new_key("free")
    assert post(server, HELLO, key=key).status_code == 200  # warm in the cache
    now = datetime.now(UTC)
    await execute(
        db,
        "UPDATE api_keys SET revoked_at = :now, updated_at = :now WHERE id = "
        "(SELECT max(id) FROM api_keys)",
        now=now,
    )
    import asyncio

    await asyncio.sleep(2.5)
    assert_error(post(server, HELLO, key=key), 401, "authentication_error", "invalid_api_key")


async def test_401_expired_key(server: Server, db: AsyncEngine) -> None:
    key = server.new_key("free")
    past = datetime.now(UTC) - timedelta(minutes=1)
    await execute(
        db,
        "UPDATE api_keys SET expires_at = :past, updated_at = :now WHERE id = "
        "(SELECT max(id) FROM api_keys)",
        past=past,
        now=datetime.now(UTC),
    )
    assert_error(post(server, HELLO, key=key), 401, "authentication_error", "expired_api_key")


def test_404_unknown_url(server: Server) -> None:
    response = httpx.get(server.base_url + "/engines")
    assert_error(response, 404, "invalid_request_error", "unknown_url")


def test_404_unknown_model(server: Server) -> None:
    error = assert_error(
        post(server, {**HELLO, "model": "gpt-4o"}), 404, "invalid_request_error", "model_not_found", "model"
    )
    assert "gpt-4o" in str(error["message"])


def test_404_model_outside_the_plan_names_the_plans_that_include_it(server: Server) -> None:
    response = post(server, {**HELLO, "model": "dubhe-reasoning"}, key=server.key("free"))
    error = assert_error(response, 404, "invalid_request_error", "model_not_found", "model")
    assert "Pro" in str(error["message"]) and "Ultimate" in str(error["message"])


def test_405_wrong_method(server: Server) -> None:
    response = httpx.get(server.base_url + CHAT, headers={"authorization": f"Bearer {server.key('free')}"})
    assert_error(response, 405, "invalid_request_error", "method_not_allowed")


@pytest.mark.parametrize(
    ("change", "code", "param"),
    [
        ({"temperature": 3}, "invalid_value", "temperature"),
        ({"temperature": "hot"}, "invalid_type", "temperature"),
        ({"top_p": 1.5}, "invalid_value", "top_p"),
        ({"n": 0}, "invalid_value", "n"),
        ({"n": 1.5}, "invalid_type", "n"),
        ({"max_tokens": 0}, "invalid_value", "max_tokens"),
        ({"max_tokens": "ten"}, "invalid_type", "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "invalid_value", "stop"),
        ({"stop": [1]}, "invalid_type", "stop[0]"),
        ({"stream": "yes"}, "invalid_type", "stream"),
        ({"stream_options": {"include_usage": True}}, "invalid_value", "stream_options"),
        ({"presence_penalty": -3}, "invalid_value", "presence_penalty"),
        ({"model": 7}, "invalid_type", "model"),
        ({"messages": []}, "invalid_value", "messages"),
        ({"messages": "hi"}, "invalid_type", "messages"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},
            "invalid_value",
            "messages[1].role",
        ),
        ({"messages": [{"role": "user", "content": 5}]}, "invalid_type", "messages[0].content"),
        ({"messages": [{"content": "hi"}]}, "missing_required_parameter", "messages[0].role"),
        ({"tools": [{"type": "retrieval"}]}, "invalid_value", "tools[0].type"),
    ],
)
def test_422_wrong_type_or_value(server: Server, change: dict[str, object], code: str, param: str) -> None:
    assert_error(post(server, {**HELLO, **change}), 422, "invalid_request_error", code, param)


def test_422_tools_to_a_model_without_function_calling(server: Server) -> None:
    body = {
        **HELLO,
        "model": "dubhe-reasoning",
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    assert_error(post(server, body), 422, "invalid_request_error", "unsupported_parameter", "tools")


def test_422_image_to_a_model_without_vision(server: Server) -> None:
    body = {
        **HELLO,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                ],
            }
        ],
    }
    assert_error(
        post(server, body), 422, "invalid_request_error", "unsupported_content", "messages[0].content[1]"
    )
    # The same image goes through to a model with vision.
    assert post(server, {**body, "model": "dubhe-vision"}).status_code == 200


def test_422_context_length_exceeded(server: Server) -> None:
    error = assert_error(
        post(server, {**HELLO, "max_tokens": 200_000}),
        422,
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )
    assert "131072" in str(error["message"])


def test_unknown_fields_are_accepted(server: Server) -> None:
    # Dubhe does not reject fields it does not own; the simulator cannot show what it received,
    # so this checks acceptance, not the bytes forwarded.
    response = post(server, {**HELLO, "my_vendor_option": {"a": 1}, "seed": 3})
    assert response.status_code == 200


def test_500_upstream_error(server: Server) -> None:
    body = {**HELLO, "messages": [{"role": "user", "content": "x [[sim:status=503]]"}]}
    error = assert_error(post(server, body), 500, "server_error", "upstream_error")
    assert "503" in str(error["message"])


def test_502_upstream_unreachable(server: Server) -> None:
    assert_error(post(server, {**HELLO, "model": "dubhe-qwen"}), 502, "server_error", "upstream_unreachable")


def test_503_model_in_maintenance(server: Server) -> None:
    response = post(server, {**HELLO, "model": "dubhe-agent"})
    assert_error(response, 503, "server_error", "model_maintenance")
    assert int(response.headers["retry-after"]) > 0


def test_error_after_the_stream_began_is_one_frame_without_done(server: Server) -> None:
    body = {
        **HELLO,
        "stream": True,
        "messages": [{"role": "user", "content": "x [[sim:tokens=40]] [[sim:cut_after=6]]"}],
    }
    response = post(server, body)
    assert response.status_code == 200
    assert response.headers["x-request-id"].startswith("req_")
    events = [event for event in response.text.split("\n\n") if event]
    assert "[DONE]" not in response.text
    assert not any(event.startswith("id:") for event in events)
    last = orjson.loads(events[-1].removeprefix("data: "))
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert (last["error"]["type"], last["error"]["code"]) == ("server_error", "upstream_error")
    assert len(events) >= 3  # the chunks before the cut were relayed


def test_every_response_carries_a_request_id(server: Server) -> None:
    models = httpx.get(server.base_url + "/models", headers={"authorization": f"Bearer {server.key('free')}"})
    ok = post(server, HELLO)
    ids = {models.headers["x-request-id"], ok.headers["x-request-id"]}
    assert len(ids) == 2 and all(value.startswith("req_") for value in ids)
