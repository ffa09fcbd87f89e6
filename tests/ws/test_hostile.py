"""The WebSocket chat against a hostile client (oversized messages, floods, half-open and cut
sockets, too many requests, forged origins) and a lying upstream (tests/upstreams/realistic.py).
Every request a socket loses is charged once, for what was sent: the ledger reconciles."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import wait_for_row
from tests.upstreams.realistic import Realistic
from tests.ws.conftest import MAX_REQUEST_BYTES, WsBilling, bearer, create, next_event, until_done


async def closed_with(socket: ClientConnection, timeout: float = 15) -> int:
    """Read until the server closes the socket; its close code."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await next_event(socket, timeout=timeout)
    assert closed.value.rcvd is not None, "the server did not send a close frame"
    return closed.value.rcvd.code


async def only_record(ws: WsBilling, user_id: int) -> dict[str, object]:
    row = await wait_for_row(ws.engine, "SELECT * FROM usage_records WHERE user_id = :u",
                             timeout=15, u=user_id)
    assert row is not None, "the lost request left no usage record"
    rows = await wait_for_row(ws.engine,
                              "SELECT count(*) AS n FROM usage_records WHERE user_id = :u",
                              u=user_id)
    assert rows["n"] == 1
    return dict(row)


async def test_an_oversized_message_closes_with_1009(ws: WsBilling) -> None:
    key, _ = await ws.new_account("roomy")
    async with connect(ws.ws_url, additional_headers=bearer(key)) as socket:
        # Just under the limit is an ordinary request (refused for its size as HTTP would be,
        # or served): the socket stays open.
        await socket.send(create("big", "dubhe-fast", "x" * (MAX_REQUEST_BYTES - 200)))
        _, end = await until_done(socket, "big")
        assert end["type"] in ("chat.completion.done", "error")
        await socket.send(create("huge", "dubhe-fast", "x" * (MAX_REQUEST_BYTES + 2048)))
        assert await closed_with(socket) == 1009


async def test_a_message_flood_closes_with_4429(ws: WsBilling) -> None:
    key, _ = await ws.new_account("roomy")
    async with connect(ws.ws_url, additional_headers=bearer(key)) as socket:
        for number in range(200):
            try:
                await socket.send(json.dumps({"type": "ping", "id": number}))
            except ConnectionClosed:
                break
        assert await closed_with(socket) == 4429


async def test_an_idle_socket_is_closed(ws: WsBilling) -> None:
    key, _ = await ws.new_account("roomy")
    async with connect(ws.ws_url, additional_headers=bearer(key)) as socket:
        assert await closed_with(socket, timeout=30) == 1000
        assert socket.close_reason == "idle timeout"


async def test_requests_beyond_the_socket_cap_wait_then_are_refused(ws: WsBilling) -> None:
    key, user_id = await ws.new_account("roomy")
    async with connect(ws.ws_url, additional_headers=bearer(key)) as socket:
        # Two run (DUBHE_WS_MAX_CONCURRENT=2), one waits (DUBHE_WS_MAX_QUEUED=1), one is refused.
        for request_id in ("r1", "r2", "r3", "r4"):
            await socket.send(create(request_id, "dubhe-code", "x [[sim:tokens=20]]"))
        seen: list[tuple[str, str]] = []
        ended: dict[str, dict[str, object]] = {}
        while len(ended) < 4:
            event = await next_event(socket)
            seen.append((event["type"], event["request_id"]))
            if event["type"] != "chat.completion.chunk":
                ended[event["request_id"]] = event
    refused = ended["r4"]
    assert refused["type"] == "error" and refused["status"] == 429
    assert refused["error"]["code"] == "rate_limit_exceeded"
    assert all(ended[r]["type"] == "chat.completion.done" for r in ("r1", "r2", "r3"))
    first_done = min(seen.index(("chat.completion.done", r)) for r in ("r1", "r2"))
    assert seen.index(("chat.completion.chunk", "r3")) > first_done, "r3 did not wait"
    await ws.assert_consistent(user_id)


async def test_a_socket_cut_mid_stream_is_charged_once_for_what_was_sent(ws: WsBilling) -> None:
    key, user_id = await ws.new_account("roomy")
    socket = await connect(ws.ws_url, additional_headers=bearer(key))
    await socket.send(create("cut", "dubhe-code", "long [[sim:tokens=400]]"))
    for _ in range(6):
        assert (await next_event(socket))["type"] == "chat.completion.chunk"
    socket.transport.abort()  # no close frame: the TCP connection just ends
    record = await only_record(ws, user_id)
    assert record["outcome"] == "client_cancelled"
    assert 5 <= int(record["completion_tokens"]) < 100  # type: ignore[call-overload]
    await ws.assert_consistent(user_id)


async def test_a_half_open_socket_is_dropped_and_its_request_charged(ws: WsBilling) -> None:
    key, user_id = await ws.new_account("roomy")
    async with connect(ws.ws_url, additional_headers=bearer(key)) as socket:
        await socket.send(create("gone", "dubhe-code", "long [[sim:tokens=2000]]"))
        assert (await next_event(socket))["type"] == "chat.completion.chunk"
        # The peer stops reading (its pongs stop too, as a vanished peer's would): the server's
        # pings go unanswered, and within the ping timeout the socket is dropped.
        socket.transport.pause_reading()
        record = await only_record(ws, user_id)
        socket.transport.resume_reading()
        assert record["outcome"] == "client_cancelled"
        assert 0 < int(record["completion_tokens"]) < 2000  # type: ignore[call-overload]
        with pytest.raises(ConnectionClosed):
            while True:
                await next_event(socket)
    await ws.assert_consistent(user_id)


async def test_browser_style_subprotocol_auth_and_origins(ws: WsBilling) -> None:
    key, _ = await ws.new_account("roomy")
    async with connect(ws.ws_url, subprotocols=["dubhe.chat.v1", key]) as socket:  # type: ignore[list-item]
        assert socket.subprotocol == "dubhe.chat.v1"
        assert key not in str(socket.response.headers)
        await socket.send(create("s", "dubhe-fast", "hi [[sim:tokens=2]]"))
        _, done = await until_done(socket, "s")
        assert done["type"] == "chat.completion.done"
    # The server's own origin may connect; another page's may not (CORS is off here).
    host = ws.ws_url.split("/")[2]
    async with connect(ws.ws_url, subprotocols=["dubhe.chat.v1", key],  # type: ignore[list-item]
                       origin=f"http://{host}") as socket:  # type: ignore[arg-type]
        assert socket.subprotocol == "dubhe.chat.v1"
    for kwargs, status, code in (
        ({"origin": "https://evil.example"}, 403, "origin_not_allowed"),
        ({"subprotocols": ["chat"]}, 400, "unsupported_subprotocol"),
        ({"subprotocols": ["dubhe.chat.v1", "sk-dubhe-nope"]}, 401, "invalid_api_key"),
    ):
        options = {"subprotocols": ["dubhe.chat.v1", key], **kwargs}
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws.ws_url, **options):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == status
        assert json.loads(refused.value.response.body)["error"]["code"] == code


async def test_a_lying_upstream_is_charged_on_dubhes_count(
    ws: WsBilling, realistic: Realistic
) -> None:
    key, user_id = await ws.new_account("roomy")
    async with connect(ws.ws_url, additional_headers=bearer(key)) as socket:
        await socket.send(create("lie", "dubhe-qwen", "x [[up:tokens=20]] [[up:usage=inflated]]"))
        chunks, done = await until_done(socket, "lie")
        assert done["type"] == "chat.completion.done"
        usage = done["usage"]
        assert usage["estimated"] is True
        honest = realistic.charged(done["server_request_id"])
        assert honest is not None and honest["completion_tokens"] == 20
        assert usage["completion_tokens"] == 20

        # Its own error event mid-stream: relayed once as this request's error event (redacted),
        # no done after it, the socket open; billed for the tokens sent.
        await socket.send(create("err", "dubhe-qwen",
                                 "x [[up:tokens=20]] [[up:fault=error_frame]] [[up:at=4]]"))
        chunks, end = await until_done(socket, "err")
        assert end["type"] == "error" and end["status"] == 500
        assert end["error"]["code"] == "upstream_error"
        assert set(end["error"]) == {"message", "type", "param", "code"}
        error_id = end["server_request_id"]
        # A broken event mid-stream: an error event (502) after the valid chunks.
        await socket.send(create("bad", "dubhe-qwen",
                                 "x [[up:tokens=20]] [[up:fault=bad_json]] [[up:at=3]]"))
        chunks, end = await until_done(socket, "bad")
        assert end["type"] == "error" and end["status"] == 502
        await socket.send(create("after", "dubhe-fast", "x [[sim:tokens=2]]"))
        later, after = await until_done(socket, "after")
        assert after["type"] == "chat.completion.done"
        assert all(event["request_id"] == "after" for event in later)
    record = await wait_for_row(ws.engine, "SELECT * FROM usage_records WHERE request_id = :r",
                                r=error_id)
    assert record is not None and record["completion_tokens"] == 4
    await ws.assert_consistent(user_id)


async def test_an_account_in_debt_with_requests_coming_closes_with_4402(ws: WsBilling) -> None:
    key, user_id = await ws.new_account("metered")  # no included tokens: the balance pays
    await ws.credit(user_id, 200)  # $0.0002
    async with connect(ws.ws_url, additional_headers=bearer(key)) as socket:
        # The upstream ignores its limit of 10 tokens and generates 3,000 (about $0.0036):
        # what the balance cannot pay is a debt.
        await socket.send(create("overrun", "dubhe-qwen",
                                 "x [[up:tokens=3000]] [[up:ignore_limit=1]]", max_tokens=10))
        _, done = await until_done(socket, "overrun")
        assert done["type"] == "chat.completion.done", done
        # Every worker refuses the account within about a second; until then a request may pass.
        for attempt in range(40):
            await socket.send(create(f"probe-{attempt}", "dubhe-fast", "x [[sim:tokens=1]]",
                                     max_tokens=1))
            _, end = await until_done(socket, f"probe-{attempt}")
            if end["type"] == "error":
                break
            await asyncio.sleep(0.1)
        assert end["status"] == 402 and "owes" in end["error"]["message"], end
        # More requests after a refusal for debt: the socket closes rather than refuse each.
        for request_id in ("q1", "q2", "q3"):
            await socket.send(create(request_id, "dubhe-fast", "x [[sim:tokens=1]]"))
        assert await closed_with(socket) == 4402
    account = await ws.assert_consistent(user_id)
    assert account["debt_uusd"] > 0
