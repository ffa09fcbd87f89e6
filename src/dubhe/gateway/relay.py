"""Relaying an upstream SSE stream: bytes pass through as they arrive, never re-encoded.

Only whole events are forwarded (a TCP read can end mid-event), so the relay can hold back the
two events the gateway must act on: the usage chunk (Dubhe always asks the upstream for one, and
strips it if the client did not) and ``[DONE]`` (sent only after the request is metered). They are
found by a byte search; no other chunk is parsed.

The upstream is untrusted, so its framing is checked at this boundary without parsing every
chunk: an event is at most ``max_event_bytes`` (the bytes of an unfinished event are kept as a
list of reads, never re-joined per read); lines end with LF or CRLF (a lone CR, a line end to a
client, fails); an event must be valid UTF-8; every ``data:`` line must hold a JSON object (it starts
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
_USAGE_FIELD = b'"usage":'
_NULL_USAGE_TAIL = b',"usage":null}\n\n'
# [DONE] and the upstream's error are recognised on an event's data line whatever precedes it
# (comments, event: or id: lines) and however "data:" and the object are spaced.
_ERROR_EVENT = b'data: {"error"'
_DONE_MARK = b"[DONE]"
_ERROR_KEY = b'"error"'
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
        # The common read: one whole event, one data line holding an object (JSON escapes the
        # newlines inside strings, so the line's only newlines are the event's end), not an
        # error, valid UTF-8. One scan for a usage field decides it; every other read takes
        # ``_split``.
        if (data.endswith(b"}\n\n") and data.startswith(b'data: {"')
                and data.find(b"\n") == len(data) - 2 and b"\r" not in data
                and not data.startswith(_ERROR_EVENT) and _utf8(data)):
            ready = data if self._rename is None else data.replace(*self._rename)
            at = ready.find(_USAGE_FIELD)
            if at != -1:
                if at == len(ready) - len(_NULL_USAGE_TAIL) + 1 and ready.endswith(_NULL_USAGE_TAIL):
                    # The "usage":null OpenAI ends every chunk with when usage was asked for.
                    if self._strip_usage_nulls:
                        ready = ready[: -len(_NULL_USAGE_TAIL)] + b"}\n\n"
                else:
                    ready = self._inspect(ready)
        else:
            ready = self._split(data)
        if ready:
            self.relayed_size += len(ready)
            self._batch.append(ready)
            self._batch_size += len(ready)
            if self._batch_size >= _COUNT_BATCH:
                self._count_batch()
        return ready

    def _split(self, data: bytes) -> bytes:
        """The whole events of a read (the rest is kept for the next), checked and inspected."""
        # The later of the two ends (a read may mix LF and CRLF framing).
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
        if lf == -1 and crlf == -1:
            self._keep(data)
            return b""
        end = max(lf + 2 if lf != -1 else 0, crlf + 4 if crlf != -1 else 0)
        ready = data[:end]
        if end < len(data):
            self._keep(data[end:])
        if self._rename is not None:
            ready = ready.replace(*self._rename)
        return self._inspect(ready)

    def _inspect(self, ready: bytes) -> bytes:
        if self._strip_usage_nulls:
            ready = ready.replace(b',"usage":null', b"")
        if not (ready.startswith(b"data: {") and ready.endswith(b"}\n\n")
                and ready.find(b"\n") == len(ready) - 2 and b"\r" not in ready
                and _utf8(ready)):  # fmt: skip
            ready = self._check_events(ready)  # anything but one data line holding an object
        # Three scans find every event ``_hold_back`` may act on (it decides; "[DONE]" or
        # "error" inside content only costs this slower path).
        if _USAGE_MARK in ready or _DONE_MARK in ready or _ERROR_KEY in ready:
            ready = self._hold_back(ready)
        return ready

    def _joined(self, data: bytes) -> bytes:
        """The pending event plus this read, joined only if an event end (the ``\\n\\n`` or
        ``\\r\\n\\r\\n`` that ``_split`` cuts at) lies in the read or across its start: then
        the join always makes progress. (Joining on anything less, such as LF then CR, let an
        upstream have the whole pending event re-joined and rescanned on every read: seconds
        of CPU per stream for an 8 MiB event in 1 KiB reads.)"""
        if b"\n\n" not in data and b"\r\n\r\n" not in data:
            tail = self._pending[-1][-3:]
            if len(tail) < 3:
                tail = b"".join(self._pending[-3:])[-3:]
            across = tail + data[:3]
            if b"\n\n" not in across and b"\r\n\r\n" not in across:
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
        """Each event is comments and at most one ``data:`` line, holding an object or [DONE]
        (an OpenAI stream has nothing else); ``event:``, ``id:`` and ``retry:`` lines are
        dropped, not relayed. Returns the valid events before the first that is not (then
        ``fault`` is set)."""
        valid: list[bytes] = []
        for event in ready.replace(b"\r\n", b"\n").split(b"\n\n"):
            lines, fault = _event_lines(event)
            if fault is not None:
                self.fault = StreamFault(fault)
                break
            if lines:
                valid.append(b"\n".join(lines) + b"\n\n")
        return b"".join(valid)

    def _hold_back(self, ready: bytes) -> bytes:
        kept: list[bytes] = []
        for event in ready.replace(b"\r\n", b"\n").split(b"\n\n"):
            if not event or self.ended:
                continue
            payload = _payload(event)  # its one data line's (events here are checked)
            if payload is None:
                kept.append(event)  # comments only
                continue
            if payload == b"[DONE]":
                self.saw_done = True
                continue
            if payload[1:].lstrip().startswith(b'"error"'):
                # The upstream's own error: relayed once, in Dubhe's envelope with its message
                # redacted (it may name the upstream's key, hosts or addresses), and the stream
                # ends with it. The original is kept for the log.
                self.upstream_error = True
                self.upstream_error_event = event
                self.error_before_events = self.relayed_size == 0 and not kept
                kept.append(_redacted_error_event(payload))
                continue
            if _USAGE_MARK in payload:
                try:
                    parsed = orjson.loads(payload)
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
                        if self._strip_usage_nulls:
                            del content["usage"]  # the client did not ask for usage
                        else:
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


def _event_lines(event: bytes) -> tuple[list[bytes], str | None]:
    """The lines of ``event`` to relay (comments and its data line), or why it is refused."""
    lines: list[bytes] = []
    data = False
    if not _utf8(event):
        # JSON is UTF-8: a client's SSE parser (the openai SDK's among them) fails on the
        # line instead of showing an error event.
        return lines, f"an event is not valid UTF-8: {event[:80]!r}"
    for line in event.split(b"\n"):
        if b"\r" in line:
            # A lone CR ends a line for a client's SSE parser, not for this check: it would
            # let an event carry lines (an unredacted error, a [DONE]) never checked here.
            return lines, f"a line ends with a lone carriage return: {line[:80]!r}"
        if not line:
            continue
        if line.startswith(b":"):
            lines.append(line)  # a comment (a keep-alive)
        elif line.startswith(b"data:"):
            # Several data lines are one payload to a client (joined by newlines), checked
            # here line by line: a [DONE] or an error could ride in the second.
            if data:
                return lines, "an event has more than one data line"
            data = True
            payload = line[5:].strip()
            if payload != b"[DONE]" and not (payload[:1] == b"{" and payload[-1:] == b"}"):
                return lines, f"a data line is not a JSON object: {payload[:80]!r}"
            lines.append(line)
        elif not line.startswith((b"event:", b"id:", b"retry:")):
            return lines, f"a line is not server-sent events: {line[:80]!r}"
    return lines, None


def _utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _payload(event: bytes) -> bytes | None:
    """The payload of a checked event's data line, or None when it has none."""
    if event.startswith(b"data:"):
        start = 0
    else:
        start = event.find(b"\ndata:") + 1
        if start == 0:
            return None
    end = event.find(b"\n", start)
    return event[start + 5 : end if end != -1 else len(event)].strip()


def _redacted_error_event(payload: bytes) -> bytes:
    """An upstream's in-stream error event as Dubhe relays it: the four-key envelope of
    ``decisions.md`` with the upstream's message redacted and cut, never its other fields."""
    message = "The upstream failed while streaming; retry the request."
    try:
        parsed = orjson.loads(payload)
    except orjson.JSONDecodeError:
        parsed = None
    detail = parsed.get("error") if isinstance(parsed, dict) else None
    text = detail.get("message") if isinstance(detail, dict) else None
    if isinstance(text, str) and text.strip():
        message = redact_upstream_message(text)
    return b"data: " + UpstreamError(message, code="upstream_error").body()
