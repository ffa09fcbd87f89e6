"""The suite closes the async HTTP clients a test leaves open (tests/conftest.py:
``pytest_runtest_call``): the tests share one event loop, and open clients of earlier tests once
stalled a later one. The two tests run in this order, in one process (``--dist loadfile``)."""

from __future__ import annotations

import httpx
import openai

_left_open: list[httpx.AsyncClient | openai.AsyncOpenAI] = []


async def test_a_test_leaves_an_httpx_and_an_sdk_client_open() -> None:
    _left_open.append(httpx.AsyncClient())
    _left_open.append(openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="x"))
    assert not _left_open[0].is_closed and not _left_open[1].is_closed()


async def test_the_next_test_finds_them_closed() -> None:
    assert len(_left_open) == 2
    assert _left_open[0].is_closed and _left_open[1].is_closed()
