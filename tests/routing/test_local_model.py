"""The bundled local model (Gemma 3 270M under llama.cpp, ``dubhe local-model``) behind
``dubhe serve``, which starts it as a process of its own and restarts it when it dies. Greedy
decoding: the answers are deterministic."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from openai import OpenAI, UnprocessableEntityError

from tests.conftest import Server, free_port, fresh_database, pids_running, start_server
from tests.routing.conftest import assert_no_tracebacks

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    tmp = tmp_path_factory.mktemp("local")
    port = free_port()
    config = f"""
[[upstreams]]
name = "bundled"
kind = "local"
base_url = "http://127.0.0.1:{port}/v1"
models = ["dubhe-fast"]
context_window = 2048
"""
    with fresh_database("sqlite", tmp) as url:
        server = start_server(tmp, url, config)
        try:
            yield server, port
        finally:
            server.running.stop()
        assert_no_tracebacks(server.running.log.read_text())


def client(server: Server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=server.key("free"), max_retries=0,
                  timeout=120)  # fmt: skip


def test_a_real_answer_streaming_and_not(local: tuple[Server, int]) -> None:
    server, _ = local
    answer = client(server).chat.completions.create(
        model="dubhe-fast", messages=QUESTION, max_tokens=24  # type: ignore[arg-type]
    )
    text = answer.choices[0].message.content or ""
    assert "Paris" in text, text
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    chunks = list(client(server).chat.completions.create(
        model="dubhe-fast", messages=QUESTION, max_tokens=24, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    ))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == text.strip()
    usage = chunks[-1].usage
    # Exact and the same both ways: the model's own tokenizer and every token generated.
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        answer.usage.prompt_tokens, answer.usage.completion_tokens
    )


def test_tools_are_refused_since_the_local_model_cannot_call_them(
    local: tuple[Server, int],
) -> None:
    server, _ = local
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(UnprocessableEntityError) as refused:
        client(server).chat.completions.create(
            model="dubhe-fast", messages=QUESTION, max_tokens=8, tools=[tool]  # type: ignore[arg-type, list-item]
        )
    assert refused.value.body["code"] == "unsupported_by_upstream"  # type: ignore[index]


def _model_pid(port: int) -> int | None:
    found = pids_running(b"local-model", str(port).encode())
    return found[0] if found else None


def test_a_crashed_model_process_is_restarted(local: tuple[Server, int]) -> None:
    server, port = local
    first = _model_pid(port)
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        try:
            answer = client(server).chat.completions.create(
                model="dubhe-fast", messages=QUESTION, max_tokens=8  # type: ignore[arg-type]
            )
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert answer.choices[0].message.content
    second = _model_pid(port)
    assert second is not None and second != first


def test_the_model_process_ends_with_dubhe_serve_even_killed(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tmp = tmp_path_factory.mktemp("local-killed")
    port = free_port()
    config = f"""
[[upstreams]]
name = "bundled"
kind = "local"
base_url = "http://127.0.0.1:{port}/v1"
models = ["dubhe-fast"]
context_window = 512
"""
    with fresh_database("sqlite", tmp) as url:
        server = start_server(tmp, url, config)
        try:
            model = _model_pid(port)
            assert model is not None
            # A SIGKILL runs no atexit handler: the kernel ends the child (PR_SET_PDEATHSIG).
            server.running.process.kill()
            server.running.process.wait()
            deadline = time.monotonic() + 30
            while _model_pid(port) is not None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _model_pid(port) is None, "the model process outlived dubhe serve"
        finally:
            server.running.stop()
