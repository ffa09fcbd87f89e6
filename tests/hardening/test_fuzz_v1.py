"""A Hypothesis fuzz of ``/v1/chat/completions`` bodies against a running server: whatever the
body, the answer is never a 5xx, and every non-2xx is the error envelope with a request id.

A fixed, derandomized budget (200 examples), so a run is reproducible and bounded. Models are
those served by the fast simulator: the dead upstream's 502 and the maintenance model's 503 are
correct answers to valid requests, not what this looks for.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Server
from tests.hardening.conftest import SLACK

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8,
)


def _either(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly well-typed values, sometimes anything at all."""
    return st.one_of(strategy, JSON)


PART = _either(st.fixed_dictionaries(
    {"type": _either(st.sampled_from(["text", "image_url", "input_audio"]))},
    optional={"text": _either(st.text(max_size=30)),
              "image_url": _either(st.fixed_dictionaries({"url": st.sampled_from([
                  "https://example.com/a.png", "data:image/png;base64,iVBORw0KGgo="])}))},
))
MESSAGE = _either(st.fixed_dictionaries(
    {"role": _either(st.sampled_from(["system", "user", "assistant", "tool", "developer"])),
     "content": _either(st.text(max_size=60) | st.lists(PART, max_size=3))},
    optional={"name": JSON, "tool_call_id": JSON, "tool_calls": JSON},
))
def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()


BODY = st.fixed_dictionaries(
    {"model": _either(st.sampled_from(["dubhe-fast", "dubhe-vision", "dubhe-reasoning"])),
     "messages": _either(st.lists(MESSAGE, max_size=3))},
    optional={
        "max_tokens": _either(st.integers(min_value=-3, max_value=40)),
        "max_completion_tokens": _either(st.integers(min_value=-3, max_value=40)),
        "temperature": _either(st.floats(min_value=-1, max_value=3)),
        "top_p": JSON, "n": _either(st.integers(min_value=-1, max_value=3)),
        "stream": _either(st.booleans()),
        "stream_options": _either(st.fixed_dictionaries({"include_usage": st.booleans()})),
        "stop": _either(st.lists(st.text(max_size=5), max_size=5)),
        "tools": JSON, "tool_choice": JSON, "response_format": JSON, "user": JSON,
        "seed": JSON, "logprobs": JSON, "presence_penalty": JSON, "unknown_field": JSON,
    },
)
# The standard library's encoder: it writes integers beyond 64 bits, which orjson refuses.
RAW = st.one_of(BODY.map(_encode), BODY.map(_encode), JSON.map(_encode), st.binary(max_size=40))


@pytest.fixture(scope="module")
def client(hardened: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hardened.base_url, timeout=SLACK * 3, headers={
        "authorization": f"Bearer {hardened.key('ultimate')}",
        "content-type": "application/json",
    }) as http:
        yield http


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=RAW)
def test_no_body_gets_a_5xx(client: httpx.Client, body: bytes) -> None:
    response = client.post("/chat/completions", content=body)
    assert response.status_code < 500, (body, response.status_code, response.text)
    assert response.headers["x-request-id"].startswith("req_")
    if response.status_code >= 300:
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert b"data: [DONE]" in response.content or b'"error"' in response.content
