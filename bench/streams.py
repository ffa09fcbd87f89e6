"""Streaming clients for the benchmark: many concurrent SSE streams, and sequential TTFT probes
(over HTTP streaming and over the WebSocket chat).

wrk and hey only see whole responses, so streamed chunks are counted here with asyncio + aiohttp.
The client never parses the chunks it counts (only the TTFT probe parses, and only until the first
token), so its own CPU stays small next to the gateway's on a 2-core box.

Used by bench/run.py; also runnable alone for poking at a server by hand:

    python bench/streams.py URL --key KEY --streams 200 --tokens 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

_DONE = b"data: [DONE]"
# A stream that stalls this long is broken, not slow: fail it rather than hang the benchmark.
_STREAM_TIMEOUT_S = 60


def chat_body(model: str, tokens: int, *, stream: bool) -> dict:
    """The benchmark's request: a tiny prompt whose answer length the simulator obeys."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Hello! [[sim:tokens={tokens}]]"}],
        "max_tokens": max(100, tokens + 10),
    }
    if stream:
        body["stream"] = True
    return body


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one: 1,000 streams need >1,024 sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class StreamsResult:
    streams: int
    ok_status: int = 0  # streams answered 200
    ended_with_done: int = 0  # streams whose last event was data: [DONE]
    events: int = 0  # SSE data events received, [DONE] included
    errors: dict[str, int] = field(default_factory=dict)
    max_open: int = 0  # most streams open at the same moment
    elapsed_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class _OpenCounter:
    """Tracks how many streams have their first event and are not yet finished."""

    def __init__(self, total: int, on_all_open: Callable[[], None] | None) -> None:
        self.total = total
        self.opened = 0
        self.open_now = 0
        self.max_open = 0
        self._on_all_open = on_all_open

    def opened_one(self) -> None:
        self.opened += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        if self.opened == self.total and self._on_all_open is not None:
            self._on_all_open()

    def closed_one(self) -> None:
        self.open_now -= 1


async def _one_stream(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    body: dict,
    result: StreamsResult,
    counter: _OpenCounter,
) -> None:
    opened = False
    try:
        async with session.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                await response.read()
                _count_error(result, f"http_{response.status}")
                return
            result.ok_status += 1
            last = b""
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue  # the blank separators between events
                if not opened:
                    opened = True
                    counter.opened_one()
                result.events += 1
                last = line
            if last.rstrip() == _DONE:
                result.ended_with_done += 1
    except (TimeoutError, aiohttp.ClientError) as exc:
        _count_error(result, type(exc).__name__)
    finally:
        if opened:
            counter.closed_one()


def _count_error(result: StreamsResult, kind: str) -> None:
    result.errors[kind] = result.errors.get(kind, 0) + 1


async def run_streams(
    url: str,
    headers: dict[str, str],
    body: dict,
    count: int,
    *,
    on_all_open: Callable[[], None] | None = None,
) -> StreamsResult:
    """Open ``count`` streams at once, read each to its end; ``on_all_open`` fires when every
    stream has its first event (the moment the memory probe wants)."""
    result = StreamsResult(streams=count)
    counter = _OpenCounter(count, on_all_open)
    # limit=0: aiohttp's default pool of 100 would queue streams and hide the concurrency asked for.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=_STREAM_TIMEOUT_S)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(
            *(_one_stream(session, url, headers, body, result, counter) for _ in range(count))
        )
    result.elapsed_s = time.perf_counter() - started
    result.max_open = counter.max_open
    return result


async def _time_to_first_token(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: dict
) -> tuple[float | None, bool]:
    """Seconds until the first chunk carrying content (not the empty role chunk), and whether
    the stream ended with [DONE]. None when the request failed."""
    started = time.perf_counter()
    first: float | None = None
    last = b""
    async with session.post(url, json=body, headers=headers) as response:
        if response.status != 200:
            await response.read()
            return None, False
        async for line in response.content:
            if not line.startswith(b"data:"):
                continue
            last = line
            if first is None and _has_content(line):
                first = time.perf_counter() - started
    return first, last.rstrip() == _DONE


def _has_content(line: bytes) -> bool:
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return False
    choices = json.loads(payload).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


async def _ws_time_to_first_token(socket: ClientConnection, body: dict, request_id: str
                                  ) -> tuple[float | None, bool]:
    """The same probe over one open WebSocket (/v1/ws/chat): seconds from sending the request
    to its first chunk carrying content, and whether it ended with its done event."""
    started = time.perf_counter()
    first: float | None = None
    await socket.send(json.dumps({"type": "chat.completion.create", "request_id": request_id,
                                  **body}))
    while True:
        message = await asyncio.wait_for(socket.recv(), _STREAM_TIMEOUT_S)
        if first is None and _ws_has_content(message):
            first = time.perf_counter() - started
        elif '"type":"chat.completion.done"' in message or '"type":"error"' in message:
            event = json.loads(message)
            return (first, True) if event["type"] == "chat.completion.done" else (None, False)


def _ws_has_content(message: str | bytes) -> bool:
    event = json.loads(message)
    if event.get("type") != "chat.completion.chunk":
        return False
    choices = event.get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


async def ttft_pairs(
    targets: dict[str, tuple[str, dict[str, str]]],
    body: dict,
    rounds: int,
    *,
    budget_s: float = float("inf"),
) -> dict[str, dict]:
    """Sequential single streams, interleaving the targets request by request so drift on a
    shared, noisy machine hits each target alike. Returns per-target TTFT percentiles (us).
    Stops early after ``budget_s`` so a stalling server cannot stretch the run."""
    samples: dict[str, list[float]] = {name: [] for name in targets}
    failures = {name: 0 for name in targets}
    not_done = {name: 0 for name in targets}
    timeout = aiohttp.ClientTimeout(total=_STREAM_TIMEOUT_S)
    deadline = time.monotonic() + budget_s
    # A ws:// target is probed over one socket kept open, as the HTTP ones reuse a connection.
    sockets: dict[str, ClientConnection] = {}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for number in range(rounds):
            if time.monotonic() > deadline:
                break
            for name, (url, headers) in targets.items():
                try:
                    if url.startswith("ws"):
                        if name not in sockets:
                            sockets[name] = await connect(url, additional_headers=headers)
                        first, done = await _ws_time_to_first_token(
                            sockets[name], body, f"probe-{number}")
                    else:
                        first, done = await _time_to_first_token(session, url, headers, body)
                except (TimeoutError, aiohttp.ClientError, WebSocketException, OSError):
                    first, done = None, False
                    stale = sockets.pop(name, None)
                    if stale is not None:
                        await stale.close()
                if first is None:
                    failures[name] += 1
                else:
                    samples[name].append(first * 1e6)
                not_done[name] += 0 if done else 1
    for socket in sockets.values():
        await socket.close()
    return {
        name: {
            "n": len(values),
            "failures": failures[name],
            "not_ended_with_done": not_done[name],
            "p50_us": statistics.median(values) if values else None,
            "p99_us": _percentile(values, 99) if values else None,
        }
        for name, values in samples.items()
    }


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="e.g. http://127.0.0.1:8000/v1/chat/completions")
    parser.add_argument("--key", default="")
    parser.add_argument("--model", default="dubhe-fast")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=100)
    args = parser.parse_args()
    raise_fd_limit()
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    body = chat_body(args.model, args.tokens, stream=True)
    result = asyncio.run(run_streams(args.url, headers, body, args.streams))
    print(json.dumps(result.as_dict(), indent=2))


if __name__ == "__main__":
    _main()
