"""The WebSocket chat against a running ``dubhe serve``, driven by the ``websockets`` client:
the protocol of decisions.md §7 and the same billing as HTTP, checked against the ledger."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from dubhe.client.ws import ChatSocket, ChatSocketError
from tests.billing.conftest import prompt_tokens
from tests.conftest import Sim, fetch_one, wait_for_row
from tests.ws.conftest import WsBilling, bearer, create, next_event, until_done


async def usage_record(ws: WsBilling, server_request_id: str) -> dict[str, object]:
    row = await wait_for_row(ws.engine, "SELECT * FROM usage_records WHERE request_id = :r",
                             r=server_request_id)
    assert row is not None, f"no usage record for {server_request_id}"
    return dict(row)


async def test_two_requests_interleave_on_one_socket_and_both_are_billed(ws: WsBilling) -> None:
    key, user_id = await ws.new_account("roomy")
    prompts = {"a": "first [[sim:tokens=40]]", "b": "second [[sim:tokens=40]]"}
    async with connect(ws.ws_url, additional_headers=bearer(key)) as socket:
        for request_id, prompt in prompts.items():
            await socket.send(create(request_id, "dubhe-code", prompt))  # the paced simulator
        order: list[str] = []
        done: dict[str, dict[str, object]] = {}
        text = {"a": "", "b": ""}
        while len(done) < 2:
            event = await next_event(socket)
            if event["type"] == "chat.completion.chunk":
                assert event["object"] == "chat.completion.chunk" and event["model"] == "dubhe-code"
                order.append(event["request_id"])
                text[event["request_id"]] += event["choices"][0]["delta"].get("content") or ""
            else:
                assert event["type"] == "chat.completion.done", event
                done[event["request_id"]] = event
    # Interleaved: a chunk of each arrived before the other request's last chunk.
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")
    assert order.index("a") < len(order) - 1 - order[::-1].index("b")
    ids = set()
    for request_id, event in done.items():
        usage = event["usage"]
        assert isinstance(usage, dict)
        assert usage["completion_tokens"] == 40
        assert usage["prompt_tokens"] == prompt_tokens(prompts[request_id])
        assert event["status"] == "completed" and text[request_id]
        record = await usage_record(ws, str(event["server_request_id"]))
        assert (record["prompt_tokens"], record["completion_tokens"]) == (
            usage["prompt_tokens"], 40)
        assert record["stream"] and record["outcome"] == "ok"
        ids.add(event["server_request_id"])
    assert len(ids) == 2
    await ws.assert_consistent(user_id)


async def test_cancel_stops_generation_and_bills_the_partial_output(
    ws: WsBilling, sims: dict[str, Sim]
) -> None:
    key, user_id = await ws.new_account("roomy")
    paced = sims["paced"]
    before = paced.stats()["disconnected"]
    async with connect(ws.ws_url, additional_headers=bearer(key)) as socket:
        await socket.send(create("long", "dubhe-code", "long [[sim:tokens=400]]"))
        chunks = 0
        while chunks < 6:
            event = await next_event(socket)
            assert event["type"] == "chat.completion.chunk", event
            chunks += 1
        await socket.send(json.dumps({"type": "chat.completion.cancel", "request_id": "long"}))
        events, done = await until_done(socket, "long")
        assert done["type"] == "chat.completion.done" and done["status"] == "cancelled", done
        usage = done["usage"]
        # The socket stays open.
        await socket.send(json.dumps({"type": "ping", "id": 7}))
        assert await next_event(socket) == {"type": "pong", "id": 7}
    deadline = time.monotonic() + 5
    while paced.stats()["disconnected"] == before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert paced.stats()["disconnected"] == before + 1, "the upstream was not cancelled"
    relayed = chunks - 1 + len(events)  # the role chunk carries no token
    assert relayed <= usage["completion_tokens"] < 100
    record = await usage_record(ws, done["server_request_id"])
    assert record["outcome"] == "client_cancelled"
    assert record["completion_tokens"] == usage["completion_tokens"]
    assert record["prompt_tokens"] == usage["prompt_tokens"] > 0
    await ws.assert_consistent(user_id)


async def test_a_bad_key_is_refused_at_the_handshake_with_http_401(ws: WsBilling) -> None:
    for headers in ({}, bearer("sk-dubhe-" + "x" * 40), {"Authorization": "Basic abc"}):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws.ws_url, additional_headers=headers):
                pass
        response = refused.value.response
        assert response.status_code == 401
        error = json.loads(response.body)["error"]
        assert error["type"] == "authentication_error"
        assert error["code"] in ("missing_api_key", "invalid_api_key")
        assert response.headers["x-request-id"].startswith("req_")


async def test_an_unknown_socket_path_is_404(ws: WsBilling) -> None:
    key, _ = await ws.new_account("roomy")
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws.ws_url.replace("/ws/chat", "/ws/other"),
                           additional_headers=bearer(key)):
            pass
    assert refused.value.response.status_code == 404


async def test_an_exhausted_balance_is_a_402_event_and_the_socket_stays_open(
    ws: WsBilling,
) -> None:
    key, user_id = await ws.new_account("tiny")  # 10 included tokens, no balance
    async with connect(ws.ws_url, additional_headers=bearer(key)) as socket:
        await socket.send(create("r1", "dubhe-fast", "hello there"))
        _, error = await until_done(socket, "r1")
        assert error["type"] == "error" and error["status"] == 402
        assert error["error"]["type"] == "insufficient_quota"
        assert error["error"]["code"] == "insufficient_quota"
        assert set(error["error"]) == {"message", "type", "param", "code"}
        # Same rules as HTTP: a model outside the plan is a 404 event, a bad value a 422 one.
        await socket.send(create("r2", "dubhe-vision", "hi"))
        _, error = await until_done(socket, "r2")
        assert (error["status"], error["error"]["code"]) == (404, "model_not_found")
        await socket.send(create("r3", "dubhe-fast", "hi", temperature=3))
        _, error = await until_done(socket, "r3")
        assert (error["status"], error["error"]["param"]) == (422, "temperature")
        await socket.send(json.dumps({"type": "ping", "id": "still-open"}))
        assert await next_event(socket) == {"type": "pong", "id": "still-open"}
    assert await fetch_one(
        ws.engine, "SELECT count(*) AS n FROM usage_records WHERE user_id = :u", u=user_id
    ) == {"n": 0}
    await ws.assert_consistent(user_id)


async def test_the_plans_rate_limit_counts_a_sockets_requests_as_http_does(
    ws: WsBilling,
) -> None:
    key, user_id = await ws.new_account("limited")  # 2 requests a minute
    async with connect(ws.ws_url, additional_headers=bearer(key)) as socket:
        ends = []
        for number in range(4):
            await socket.send(create(f"r{number}", "dubhe-fast", "hi", max_tokens=5))
            ends.append((await until_done(socket, f"r{number}"))[1])
        assert [end["type"] for end in ends[:2]] == ["chat.completion.done"] * 2
        for end in ends[2:]:
            assert (end["type"], end["status"]) == ("error", 429)
            assert end["error"]["code"] == "rate_limit_exceeded"
    # The socket's requests and an HTTP request share one budget.
    response = httpx.post(ws.server.base_url + "/chat/completions",
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": "dubhe-fast", "max_tokens": 5,
                                "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 429
    await ws.assert_consistent(user_id)  # the leases are back: every usage record is written
    assert await fetch_one(
        ws.engine, "SELECT count(*) AS n FROM usage_records WHERE user_id = :u", u=user_id
    ) == {"n": 2}


async def test_the_same_request_id_twice_is_billed_twice(ws: WsBilling) -> None:
    key, user_id = await ws.new_account("roomy")
    async with connect(ws.ws_url, additional_headers=bearer(key)) as socket:
        # Twice at once, then once more after both ended.
        await socket.send(create("same", "dubhe-fast", "x [[sim:tokens=5]]"))
        await socket.send(create("same", "dubhe-fast", "x [[sim:tokens=7]]"))
        dones = []
        while len(dones) < 2:
            event = await next_event(socket)
            if event["type"] != "chat.completion.chunk":
                dones.append(event)
        await socket.send(create("same", "dubhe-fast", "x [[sim:tokens=9]]"))
        _, last = await until_done(socket, "same")
        dones.append(last)
    assert all(done["type"] == "chat.completion.done" for done in dones), dones
    assert sorted(done["usage"]["completion_tokens"] for done in dones) == [5, 7, 9]
    server_ids = {done["server_request_id"] for done in dones}
    assert len(server_ids) == 3
    charged = 0
    for server_id in server_ids:
        record = await usage_record(ws, server_id)
        charged += int(record["prompt_tokens"]) + int(record["completion_tokens"])
    account = await ws.assert_consistent(user_id)
    assert account["tokens_available"] == 10_000_000 - charged


async def test_a_key_revoked_while_connected_closes_the_socket_with_4401(ws: WsBilling) -> None:
    key, user_id = await ws.new_account("roomy")
    async with connect(ws.ws_url, additional_headers=bearer(key)) as socket:
        # A stream is running when the key is revoked: it is cut and charged for what was sent.
        await socket.send(create("long", "dubhe-code", "long [[sim:tokens=2000]]"))
        assert (await next_event(socket))["type"] == "chat.completion.chunk"


        async def read_until_closed() -> None:
            while True:
                await next_event(socket, timeout=30)

        # Read on while the CLI runs (in a thread): a client that stops reading stops answering
        # the server's pings too, and is dropped as half-open.
        reader = asyncio.create_task(read_until_closed())
        await asyncio.to_thread(ws.server.cli, "keys", "revoke", key)
        revoked_at = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            await reader
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        # Generous bound for a loaded machine; the cache sees a revocation within about a
        # second and the socket re-checks four times a second.
        assert time.monotonic() - revoked_at < 8
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws.ws_url, additional_headers=bearer(key)):
            pass
    assert refused.value.response.status_code == 401
    record = await wait_for_row(ws.engine, "SELECT * FROM usage_records WHERE user_id = :u",
                                u=user_id)
    assert record is not None and record["outcome"] == "client_cancelled"
    assert 0 < record["completion_tokens"] < 2000
    await ws.assert_consistent(user_id)


async def test_a_malformed_event_gets_an_error_event_and_the_next_request_works(
    ws: WsBilling,
) -> None:
    key, _ = await ws.new_account("roomy")
    async with connect(ws.ws_url, additional_headers=bearer(key)) as socket:
        for bad, code in (
            ("{not json", "invalid_json"),
            ("[1, 2]", "invalid_event"),
            (json.dumps({"type": "chat.completion.explode", "request_id": "z"}), "unknown_event"),
            (json.dumps({"type": "chat.completion.create", "model": "dubhe-fast"}),
             "missing_required_parameter"),
            (json.dumps({"type": "chat.completion.create", "request_id": "m"}),
             "missing_required_parameter"),
        ):
            await socket.send(bad)
            event = await next_event(socket)
            assert event["type"] == "error" and event["status"] == 400, event
            assert event["error"]["code"] == code
        await socket.send(b"\x00binary")
        assert (await next_event(socket))["error"]["code"] == "invalid_event"
        await socket.send(create("ok", "dubhe-fast", "fine [[sim:tokens=3]]"))
        chunks, done = await until_done(socket, "ok")
        assert done["type"] == "chat.completion.done" and done["usage"]["completion_tokens"] == 3
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_usage_chunk_when_asked_and_the_http_twin_agrees(ws: WsBilling) -> None:
    key, _ = await ws.new_account("roomy")
    body = {"model": "dubhe-fast", "messages": [{"role": "user", "content": "same [[sim:tokens=6]]"}],
            "stream": True, "stream_options": {"include_usage": True}}
    async with connect(ws.ws_url, additional_headers=bearer(key)) as socket:
        await socket.send(json.dumps({"type": "chat.completion.create", "request_id": "u", **body}))
        chunks, done = await until_done(socket, "u")
    usage_chunks = [c for c in chunks if c.get("usage")]
    assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == []
    assert usage_chunks[0]["usage"]["cost_usd"] == done["usage"]["cost_usd"]
    http = httpx.post(ws.server.base_url + "/chat/completions", json=body,
                      headers=bearer(key), timeout=30)
    http_usage = [json.loads(line[6:]) for line in http.text.splitlines()
                  if line.startswith("data: {") and '"usage":{' in line][0]["usage"]
    assert http_usage["prompt_tokens"] == done["usage"]["prompt_tokens"]
    assert http_usage["completion_tokens"] == done["usage"]["completion_tokens"]


async def test_the_python_client(ws: WsBilling) -> None:
    key, _ = await ws.new_account("roomy")
    async with ChatSocket.connect(ws.ws_url, api_key=key) as socket:
        await socket.ping()
        first = await socket.create(model="dubhe-fast",
                                    messages=[{"role": "user", "content": "a [[sim:tokens=4]]"}])
        second = await socket.create(model="dubhe-code",
                                     messages=[{"role": "user", "content": "b [[sim:tokens=3]]"}])
        texts = []
        for stream in (first, second):
            texts.append("".join([chunk["choices"][0]["delta"].get("content") or ""
                                  async for chunk in stream if chunk["choices"]]))
            assert stream.done is not None and stream.done["status"] == "completed"
        assert all(texts)
        refused = await socket.create(model="dubhe-agent", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(ChatSocketError) as error:
            async for _ in refused:
                pass
        assert error.value.status == 404 and error.value.code == "model_not_found"
