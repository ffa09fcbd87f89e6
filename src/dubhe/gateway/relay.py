"""Relaying an upstream SSE stream: bytes pass through as they arrive, never re-encoded.

Only whole events are forwarded (a TCP read can end mid-event), so the relay can hold back the
two events the gateway must act on: the usage chunk (Dubhe always asks the upstream for one, and
strips it if the client did not) and ``[DONE]`` (sent only after the request is metered). They are
found by a byte search; no other chunk is parsed.
"""

from __future__ import annotations

from typing import Any

import orjson

_USAGE_MARK = b'"usage":{'
_DONE_EVENT = b"data: [DONE]"
# Keep at most this much relayed text for counting tokens if the upstream never reports usage.
_RETAIN_LIMIT = 4 * 1024 * 1024


class StreamRelay:
    def __init__(self, *, public_model: str, upstream_model: str, strip_usage_nulls: bool) -> None:
        self._pending = b""
        # The client did not ask for usage, but Dubhe did: drop the "usage":null OpenAI adds
        # to every chunk then, so the client sees the chunks it would have seen without it.
        self._strip_usage_nulls = strip_usage_nulls
        self.usage: dict[str, Any] | None = None
        self.usage_event: dict[str, Any] | None = None
        self.saw_done = False
        self.relayed: list[bytes] = []
        self._retained = 0
        self._rename: tuple[bytes, bytes] | None = None
        if upstream_model != public_model:
            self._rename = (
                b'"model":"' + upstream_model.encode() + b'"',
                b'"model":"' + public_model.encode() + b'"',
            )

    def feed(self, data: bytes) -> bytes:
        """Take bytes from the upstream; return the whole events ready for the client."""
        if self._pending:
            data = self._pending + data
        end = data.rfind(b"\n\n")
        if end == -1:
            end = data.rfind(b"\r\n\r\n")
            if end == -1:
                self._pending = data
                return b""
            end += 4
        else:
            end += 2
        ready, self._pending = data[:end], data[end:]
        if self._rename is not None:
            ready = ready.replace(*self._rename)
        if self._strip_usage_nulls:
            ready = ready.replace(b',"usage":null', b"")
        if _USAGE_MARK in ready or _DONE_EVENT in ready:
            ready = self._hold_back(ready)
        if ready and self._retained < _RETAIN_LIMIT:
            self.relayed.append(ready)
            self._retained += len(ready)
        return ready

    def _hold_back(self, ready: bytes) -> bytes:
        kept: list[bytes] = []
        for event in ready.replace(b"\r\n", b"\n").split(b"\n\n"):
            if not event:
                continue
            if event.startswith(_DONE_EVENT):
                self.saw_done = True
                continue
            if _USAGE_MARK in event and event.startswith(b"data:"):
                parsed = orjson.loads(event[5:].strip())
                if isinstance(parsed.get("usage"), dict):
                    self.usage = parsed["usage"]
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

    @property
    def relayed_bytes(self) -> bytes:
        return b"".join(self.relayed)
