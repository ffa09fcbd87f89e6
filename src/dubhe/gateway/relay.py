"""Relaying an upstream SSE stream: bytes pass through as they arrive, never re-encoded.

Only whole events are forwarded (a TCP read can end mid-event), so the relay can hold back the
two events the gateway must act on: the usage chunk (Dubhe always asks the upstream for one, and
strips it if the client did not) and ``[DONE]`` (sent only after the request is metered). They are
found by a byte search; no other chunk is parsed.

The upstream is untrusted, so its framing is checked at this boundary without parsing every
chunk: an event is at most ``max_event_bytes`` (the bytes of an unfinished event are kept as a
list of reads, never re-joined per read); every ``data:`` line must hold a JSON object (it starts
with ``{`` and ends with ``}``: arrays, strings, numbers and cut-off JSON fail) or ``[DONE]``; an
error event of the upstream's own is relayed once and ends the stream; nothing after ``[DONE]`` is
relayed. A violation ends the relay with ``fault`` set (the valid events before it are
still returned). The usage chunk, the one event that is parsed, becomes
a ``UsageReport`` (or the reason it cannot be trusted) right here.

What was relayed is counted incrementally for when the upstream's usage cannot be trusted: whole
events are kept in batches of ``_COUNT_BATCH`` bytes, and each full batch is counted with tiktoken
in a worker thread (which releases the GIL) and dropped, so a stream of any length is counted in
full with bounded memory and without stalling the event loop.
"""

from __future__ import annotations

import asyncio

import orjson

from dubhe.errors import UpstreamError
from dubhe.providers.errors import redact_upstream_message
from dubhe.usage import tokens
from dubhe.usage.reports import Untrusted, UsageReport, parse_usage

_USAGE_MARK = b'"usage":{'
# The space after "data:" is optional in server-sent events: both spellings are matched.
_DONE_EVENT = b"data: [DONE]"
_DONE_UNSPACED = b"data:[DONE]"
_ERROR_EVENT = b'data: {"error"'
_ERROR_UNSPACED = b'data:{"error"'
_DONE_MARK = b"[DONE]"
_ERROR_MARK = b'{"error"'
_COUNT_BATCH = 1024 * 1024


class StreamFault(Exception):
    """How the upstream's stream broke the protocol (for the log); kept, not raised."""


class StreamRelay:
    def __init__(
        self,
        *,
        public_model: str,
        upstream_model: str,
        strip_usage_nulls: bool,
        max_event_bytes: int,
    ) -> None:
        # An unfinished event: the reads so far, joined only once its end arrives.
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._max_event_bytes = max_event_bytes
        # The client did not ask for usage, but Dubhe did: drop the "usage":null OpenAI adds
        # to every chunk then, so the client sees the chunks it would have seen without it.
        self._strip_usage_nulls = strip_usage_nulls
        self.usage: UsageReport | Untrusted | None = None
        self.usage_event: dict[str, object] | None = None
        self.saw_done = False
        self.upstream_error = False  # the upstream sent its own error event (relayed)
        self.upstream_error_event = b""  # that event as the upstream sent it (for the log)
        # ...and it came before any other event was relayed: the client has nothing from this
        # upstream yet, so another deployment may still answer (see ``gateway/completion.py``).
        self.error_before_events = False
        self.fault: StreamFault | None = None  # how the upstream broke the protocol
        self.relayed_size = 0
        self._batch: list[bytes] = []
        self._batch_size = 0
        self._counts: list[asyncio.Future[tuple[int, int]]] = []
        self._measuring: asyncio.Future[tuple[int, int]] | None = None
        self._rename: tuple[bytes, bytes] | None = None
        if upstream_model != public_model:
            self._rename = (
                b'"model":"' + upstream_model.encode() + b'"',
                b'"model":"' + public_model.encode() + b'"',
            )

    @property
    def ended(self) -> bool:
        """Nothing more from the upstream is relayed."""
        return self.saw_done or self.upstream_error or self.fault is not None

    def feed(self, data: bytes) -> bytes:
        """Take bytes from the upstream; return the whole events ready for the client. After a
        fault (``fault`` is set) only the valid events before it are returned, then nothing."""
        if self.saw_done or self.upstream_error or self.fault is not None:
            return b""  # content after [DONE], its own error or a fault is never relayed
        if self._pending:
            data = self._joined(data)
            if not data:
                return b""
        end = data.rfind(b"\n\n")
        if end == -1:
            end = data.rfind(b"\r\n\r\n")
            if end == -1:
                self._keep(data)
                return b""
            end += 4
        else:
            end += 2
        ready = data[:end]
        if end < len(data):
            self._keep(data[end:])
        if self._rename is not None:
            ready = ready.replace(*self._rename)
        if self._strip_usage_nulls:
            ready = ready.replace(b',"usage":null', b"")
        if not (ready.startswith(b"data: {") and ready.endswith(b"}\n\n")
                and ready.find(b"\n\n") == len(ready) - 2):  # fmt: skip
            ready = self._check_events(ready)
        # Three scans of each read cover both spellings of both events (``_hold_back`` decides;
        # the text "[DONE]" inside content only costs that slower path).
        if _USAGE_MARK in ready or _DONE_MARK in ready or _ERROR_MARK in ready:
            ready = self._hold_back(ready)
        if ready:
            self.relayed_size += len(ready)
            self._batch.append(ready)
            self._batch_size += len(ready)
            if self._batch_size >= _COUNT_BATCH:
                self._count_batch()
        return ready

    def _joined(self, data: bytes) -> bytes:
        """The pending event plus this read, joined only if the read may end an event."""
        last = self._pending[-1]
        if b"\n\n" not in data and b"\r\n\r\n" not in data and not (
            last[-1:] == b"\n" and data[:1] in (b"\n", b"\r")
            or last[-3:].endswith(b"\r") and data[:3].startswith(b"\n")
        ):
            self._keep(data)
            return b""
        data = b"".join((*self._pending, data))
        self._pending.clear()
        self._pending_size = 0
        return data

    def _keep(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > self._max_event_bytes:
            self.fault = StreamFault(
                f"an event exceeded {self._max_event_bytes} bytes without ending"
            )
            self._pending.clear()

    def _check_events(self, ready: bytes) -> bytes:
        """Each event is comments, fields, and ``data:`` lines holding an object or [DONE].
        Returns the valid events before the first that is not (then ``fault`` is set)."""
        valid: list[bytes] = []
        for event in ready.replace(b"\r\n", b"\n").split(b"\n\n"):
            fault = _event_fault(event)
            if fault is not None:
                self.fault = StreamFault(fault)
                break
            if event:
                valid.append(event + b"\n\n")
        return b"".join(valid)

    def _hold_back(self, ready: bytes) -> bytes:
        kept: list[bytes] = []
        for event in ready.replace(b"\r\n", b"\n").split(b"\n\n"):
            if not event or self.ended:
                continue
            if event.startswith((_DONE_EVENT, _DONE_UNSPACED)):
                self.saw_done = True
                continue
            if event.startswith((_ERROR_EVENT, _ERROR_UNSPACED)):
                # The upstream's own error: relayed once, in Dubhe's envelope with its message
                # redacted (it may name the upstream's key, hosts or addresses), and the stream
                # ends with it. The original is kept for the log.
                self.upstream_error = True
                self.upstream_error_event = event
                self.error_before_events = self.relayed_size == 0 and not kept
                kept.append(_redacted_error_event(event))
                continue
            if _USAGE_MARK in event and event.startswith(b"data:"):
                try:
                    parsed = orjson.loads(event[5:].strip())
                except orjson.JSONDecodeError as exc:
                    self.fault = StreamFault(f"an event is not valid JSON ({exc})")
                    break
                if not isinstance(parsed, dict):
                    self.fault = StreamFault("an event is not a JSON object")
                    break
                if isinstance(parsed.get("usage"), dict):
                    try:
                        # Re-encoded when the stream ends (with its cost): an event nested
                        # deeper than orjson writes (it reads 1024 levels, writes 254) would
                        # break the stream after it was settled.
                        orjson.dumps(parsed)
                    except orjson.JSONEncodeError:
                        self.fault = StreamFault("an event nests deeper than Dubhe re-encodes")
                        break
                    self.usage = parse_usage(parsed["usage"])
                    if parsed.get("choices"):
                        # A provider that puts usage on a content chunk: relay the content now.
                        content = dict(parsed)
                        content["usage"] = None
                        kept.append(b"data: " + orjson.dumps(content))
                        parsed["choices"] = []
                    self.usage_event = parsed
                    continue
            kept.append(event)
        return b"".join(event + b"\n\n" for event in kept)

    # -- counting what was relayed ------------------------------------------------------------

    def _count_batch(self) -> None:
        batch = b"".join(self._batch)
        self._batch.clear()
        self._batch_size = 0
        self._counts.append(
            asyncio.ensure_future(asyncio.to_thread(tokens.measure_completion_events, batch))
        )

    async def completion_tokens(self) -> int:
        """Dubhe's own count of every generated token relayed (content, reasoning, tools)."""
        return (await self.measured())[0]

    async def measured(self) -> tuple[int, int]:
        """Dubhe's own count of every generated token relayed (content, reasoning, tools), and
        the UTF-8 bytes of that generated text. Counted once, in a task of its own: a caller
        cancelled while it runs (a client hanging up at the last chunk) leaves it running, and
        the next caller (the settlement of the abandoned request) gets the same, whole count."""
        if self._measuring is None:
            rest = b"".join(self._batch)
            self._batch.clear()
            self._batch_size = 0
            self._measuring = asyncio.ensure_future(self._measure(rest))
        return await asyncio.shield(self._measuring)

    async def _measure(self, rest: bytes) -> tuple[int, int]:
        if len(rest) > _COUNT_BATCH // 16:
            last = await asyncio.to_thread(tokens.measure_completion_events, rest)
        else:
            last = tokens.measure_completion_events(rest)
        parts = [*await asyncio.gather(*self._counts), last]
        return sum(part[0] for part in parts), sum(part[1] for part in parts)

    def forget_counts(self) -> None:
        """Cancel batch counts nobody will read (the upstream's usage was trusted)."""
        for count in self._counts:
            count.cancel()


def _event_fault(event: bytes) -> str | None:
    for line in event.split(b"\n"):
        if not line or line.startswith(b":"):
            continue  # a comment (a keep-alive)
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload == b"[DONE]" or (payload[:1] == b"{" and payload[-1:] == b"}"):
                continue
            return f"a data line is not a JSON object: {payload[:80]!r}"
        if not line.startswith((b"event:", b"id:", b"retry:")):
            return f"a line is not server-sent events: {line[:80]!r}"
    return None


def _redacted_error_event(event: bytes) -> bytes:
    """An upstream's in-stream error event as Dubhe relays it: the four-key envelope of
    ``decisions.md`` with the upstream's message redacted and cut, never its other fields."""
    message = "The upstream failed while streaming; retry the request."
    try:
        parsed = orjson.loads(event[5:].strip())
    except orjson.JSONDecodeError:
        parsed = None
    detail = parsed.get("error") if isinstance(parsed, dict) else None
    text = detail.get("message") if isinstance(detail, dict) else None
    if isinstance(text, str) and text.strip():
        message = redact_upstream_message(text)
    return b"data: " + UpstreamError(message, code="upstream_error").body()
