"""``/v1/ws/chat``: chat completions over one WebSocket (``decisions.md`` §7), around the same
``ChatCompletion`` the HTTP handler drives (validation, plan check, hold, settlement and the
usage rule are not repeated here). This module only frames events and keeps the socket's limits.

The upgrade is authenticated like ``/v1`` (``Authorization: Bearer``, or for browsers the key as a
``Sec-WebSocket-Protocol`` entry beside ``dubhe.chat.v1``); a refusal is an ordinary HTTP answer
in the error envelope. A browser's ``Origin`` must be the server's own or one that ``/v1``'s CORS
allows. Once open, the client sends ``chat.completion.create`` (the HTTP body plus its own
``request_id``), ``chat.completion.cancel`` and ``ping``. Each chunk goes out as the upstream's
``chat.completion.chunk`` object with ``type`` and ``request_id`` spliced in as bytes (appended
last, so they win over any key of those names a lying upstream put in its chunk; nothing is
parsed per chunk). Each request ends with exactly one ``chat.completion.done`` or ``error``.

Limits of the socket itself: the message size (uvicorn's ``ws_max_size``, 1009), keep-alive pings
(uvicorn's, for half-open sockets), an idle timeout, a cap on requests running at once and on
requests waiting behind them, and a message rate (4429). Backpressure: uvicorn's protocol awaits
the socket's drain before each send, and each request sends from its own task, so a slow reader
holds at most one unsent chunk per running request while the upstream's reads wait.

Close codes: 1000 (idle, or the client's own close), 1011 (an internal error), 4401 (the key was
revoked or expired while open: the key cache is looked at four times a second, and the key
re-checked when an identity in it changed), 4402 (the
account is in debt while requests wait on the socket, or another comes after a refusal for
debt), 4429 (message rate).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from dubhe.billing.pricing import format_usd
from dubhe.errors import (
    AccountInDebt,
    AuthenticationFailed,
    DubheError,
    Forbidden,
    InvalidRequest,
    RateLimited,
)
from dubhe.gateway.asgi import Message, Receive, Scope, Send, header, new_request_id
from dubhe.gateway.completion import ChatCompletion, Settled

if TYPE_CHECKING:
    from dubhe.gateway.app import GatewayState
    from dubhe.ratelimit import Ticket
    from dubhe.settings import Settings

log = logging.getLogger(__name__)

PATH = "/v1/ws/chat"
SUBPROTOCOL = "dubhe.chat.v1"
# How often an open socket re-checks its key against the worker's key cache (a dict lookup; the
# cache itself sees a revocation within about a second).
_KEY_CHECK_SECONDS = 0.25
_MAX_CLIENT_ID_CHARS = 128
_CHUNK_TYPE = b'"type":"chat.completion.chunk","request_id":'
_ERROR_TYPE = b'"type":"error","status":500,"request_id":'


@dataclass(frozen=True, slots=True)
class SocketLimits:
    ping_interval_seconds: float
    idle_timeout_seconds: float
    max_concurrent: int
    max_queued: int
    messages_per_second: float
    message_burst: int
    max_sockets_per_key: int = 32
    # A send the peer does not let finish this long (it stopped reading) gives the socket up.
    send_timeout_seconds: float = 40.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SocketLimits:
        return cls(
            ping_interval_seconds=settings.ws_ping_interval_seconds,
            idle_timeout_seconds=settings.ws_idle_timeout_seconds,
            max_concurrent=settings.ws_max_concurrent,
            max_queued=settings.ws_max_queued,
            messages_per_second=settings.ws_messages_per_second,
            message_burst=settings.ws_message_burst,
            max_sockets_per_key=settings.ws_max_sockets_per_key,
            # As long as a peer that stopped answering pings is kept: by then it is gone.
            send_timeout_seconds=settings.ws_ping_interval_seconds
            + settings.ws_ping_timeout_seconds,
        )


class ChatSocketEndpoint:
    """The raw-ASGI endpoint: the handshake, then one ``_Connection`` per socket."""

    def __init__(self, state: GatewayState, limits: SocketLimits, origins: frozenset[str]) -> None:
        self.state = state
        self.limits = limits
        self.origins = {origin.encode() for origin in origins}
        self.open_sockets: dict[int, int] = {}  # key id -> sockets open on this worker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        connection_id = new_request_id()
        try:
            self._check_origin(scope)
            subprotocol, authorization = _credentials(scope)
            identity = await self.state.keys.authenticate(authorization)
            if self.open_sockets.get(identity.key_id, 0) >= self.limits.max_sockets_per_key:
                # Every per-socket limit multiplies with the sockets: a key holds a bounded few.
                raise RateLimited(
                    f"This API key already holds {self.limits.max_sockets_per_key} open "
                    "WebSocket connections on this server; close one, or run more requests on "
                    "each (they multiplex).", code="rate_limit_exceeded",
                    headers={"retry-after": "1", "retry-after-ms": "1000"})
        except DubheError as error:
            if isinstance(error, AuthenticationFailed):
                error = self.state.unauthenticated.judge(error, scope.get("client"))
            await deny(send, error, connection_id)
            return
        assert authorization is not None
        key_id = identity.key_id
        self.open_sockets[key_id] = self.open_sockets.get(key_id, 0) + 1
        try:
            await send({"type": "websocket.accept", "subprotocol": subprotocol,
                        "headers": [(b"x-request-id", connection_id.encode())]})
            await _Connection(self, receive, send, authorization).run()
        finally:
            left = self.open_sockets.pop(key_id) - 1
            if left:
                self.open_sockets[key_id] = left

    def _check_origin(self, scope: Scope) -> None:
        """A browser names the page's origin: it must be this server's own or one allowed to
        call ``/v1`` (the CORS list). Other clients send none."""
        origin = header(scope, b"origin")
        if origin is None or origin in self.origins:
            return
        host = header(scope, b"host")
        if host is not None and origin.partition(b"://")[2].lower() == host.lower():
            return
        raise Forbidden(
            "This page's origin may not open the API's WebSocket; the operator allows browser "
            "origins with DUBHE_CORS_ALLOW_ORIGINS.",
            code="origin_not_allowed",
        )


async def deny(send: Send, error: DubheError, request_id: str) -> None:
    """Refuse an upgrade with an ordinary HTTP answer in the error envelope."""
    body = error.body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        *((name.encode(), value.encode()) for name, value in error.headers.items()),
    ]
    await send({"type": "websocket.http.response.start", "status": error.status_code,
                "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


def _credentials(scope: Scope) -> tuple[str | None, bytes | None]:
    """The subprotocol to answer and the Authorization value to check. A browser offers
    ``dubhe.chat.v1`` and the key as a second entry; the key is never echoed."""
    offered: list[str] = list(scope.get("subprotocols") or ())
    authorization = header(scope, b"authorization")
    if not offered:
        return None, authorization
    if SUBPROTOCOL not in offered:
        raise InvalidRequest(
            f"Offer the subprotocol '{SUBPROTOCOL}' (and, from a browser, your API key as a "
            "second entry).",
            code="unsupported_subprotocol",
        )
    others = [entry for entry in offered if entry != SUBPROTOCOL]
    if len(others) > 1:
        raise InvalidRequest(
            f"Offer '{SUBPROTOCOL}' and at most one other entry, your API key.",
            code="unsupported_subprotocol",
        )
    if authorization is None and others:
        authorization = b"Bearer " + others[0].encode("latin-1")
    return SUBPROTOCOL, authorization


class _SocketGone(Exception):
    """The socket closed; a request still running is charged for what was sent."""


class _Request:
    __slots__ = ("client_id", "task", "completion", "phase", "admitted", "cancelled_by", "ended")

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.task: asyncio.Task[None] | None = None
        self.completion: ChatCompletion | None = None
        # "new" (its task has not started), "waiting" (for a slot), "running", or "shielded":
        # admission (a hold half-made) and the end of a finished stream are not interrupted; a
        # cancel then only marks the request, and the task looks at the mark itself.
        self.phase = "new"
        self.admitted = False  # its hold is made: it streams, whatever the account does next
        self.cancelled_by: str | None = None  # "client" or "socket"
        self.ended = False  # its done or error event is sent

    def cancel(self, by: str) -> None:
        if self.cancelled_by is not None or self.ended:
            return
        self.cancelled_by = by
        if self.phase in ("waiting", "running") and self.task is not None:
            self.task.cancel()


class _Connection:
    def __init__(self, endpoint: ChatSocketEndpoint, receive: Receive, send: Send,
                 authorization: bytes) -> None:
        self.state = endpoint.state
        self.limits = endpoint.limits
        self.receive = receive
        self._send = send
        self.authorization = authorization
        self.requests: set[_Request] = set()
        self.slots = asyncio.Semaphore(self.limits.max_concurrent)
        self.refused_for_debt = False
        self.closed = False
        self.last_activity = time.monotonic()
        self._tokens = float(self.limits.message_burst)
        self._tokens_at = self.last_activity

    async def run(self) -> None:
        watchdog = asyncio.create_task(self._watch())
        try:
            while not self.closed:
                message = await self.receive()
                if message["type"] == "websocket.disconnect":
                    self.closed = True
                    break
                if message["type"] != "websocket.receive":
                    continue
                self.last_activity = time.monotonic()
                if not self._take_token():
                    await self.close(4429, "message rate exceeded")
                    break
                text = message.get("text")
                if text is None:
                    await self._error(None, InvalidRequest(
                        "Send events as text frames holding JSON objects.", code="invalid_event"))
                    continue
                await self._handle(text)
        except _SocketGone:
            pass
        except Exception:
            log.exception("the WebSocket connection failed")
            await self.close(1011, "internal error")
        finally:
            watchdog.cancel()
            self.closed = True
            for request in list(self.requests):
                request.cancel("socket")
            tasks = [request.task for request in self.requests if request.task is not None]
            # Every request still running is settled (charged for what was sent) before the
            # connection's task ends.
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- sending ------------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        if self.closed:
            raise _SocketGone
        try:
            # uvicorn waits for the socket to drain before each send, and its own close waits
            # for the same: a peer that stops reading would hold this send, and the request's
            # settlement behind it, for as long as it likes.
            async with asyncio.timeout(self.limits.send_timeout_seconds):
                await self._send(message)
        except TimeoutError:
            self.closed = True
            raise _SocketGone from None
        except OSError:  # uvicorn's ClientDisconnected: the peer is gone
            self.closed = True
            raise _SocketGone from None
        except RuntimeError:
            # uvicorn refuses anything after a close frame: ours (a send that waited for a slow
            # reader while the socket was closed) or its own (the peer stopped answering pings).
            self.closed = True
            raise _SocketGone from None

    async def send_event(self, event: dict[str, Any]) -> None:
        await self.send({"type": "websocket.send", "text": orjson.dumps(event).decode()})

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except (OSError, RuntimeError):  # the peer is gone, or uvicorn already closed it
            pass
        for request in list(self.requests):
            request.cancel("socket")

    async def _error(self, client_id: str | None, error: DubheError,
                     server_request_id: str | None = None) -> None:
        event: dict[str, Any] = {"type": "error", "request_id": client_id,
                                 "status": error.status_code, **error.to_dict()}
        if server_request_id is not None:
            event["server_request_id"] = server_request_id
        retry_after = error.headers.get("retry-after")
        if retry_after is not None:
            event["retry_after"] = retry_after
        await self.send_event(event)

    # -- the socket's own limits --------------------------------------------------------------

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(self.limits.message_burst),
                           self._tokens + (now - self._tokens_at) * self.limits.messages_per_second)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def _watch(self) -> None:
        """The key is re-checked while the socket is open (when the key cache changed, or its
        expiry passed); an idle socket is closed."""
        keys = self.state.keys
        seen = -1
        expires_at: float | None = None
        while not self.closed:
            await asyncio.sleep(_KEY_CHECK_SECONDS)
            if keys.revision != seen or (expires_at is not None and expires_at <= time.time()):
                seen = keys.revision
                try:
                    expires_at = (await keys.authenticate(self.authorization)).expires_at
                except AuthenticationFailed as error:
                    await self.close(4401, error.code or "invalid_api_key")
                    return
                except Exception:  # the cache could not be read (the database is down)
                    log.exception("re-checking a WebSocket's key failed")
            idle = time.monotonic() - self.last_activity
            if not self.requests and idle > self.limits.idle_timeout_seconds:
                await self.close(1000, "idle timeout")
                return

    # -- client events ------------------------------------------------------------------------

    async def _handle(self, text: str) -> None:
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            await self._error(None, InvalidRequest(
                f"The event is not valid JSON ({exc.args[0]}); send a JSON object.",
                code="invalid_json"))
            return
        if not isinstance(event, dict):
            await self._error(None, InvalidRequest(
                "An event must be a JSON object with a 'type'.", code="invalid_event"))
            return
        kind = event.get("type")
        if kind == "ping":
            ping_id = event.get("id")
            if not isinstance(ping_id, str | int | float) or isinstance(ping_id, bool):
                ping_id = None
            elif isinstance(ping_id, str):
                ping_id = ping_id[:_MAX_CLIENT_ID_CHARS]
            await self.send_event({"type": "pong", "id": ping_id})
            return
        if kind not in ("chat.completion.create", "chat.completion.cancel"):
            await self._error(_client_id_or_none(event), InvalidRequest(
                f"Unknown event type {str(kind)[:40]!r}; send 'chat.completion.create', "
                "'chat.completion.cancel' or 'ping'.", code="unknown_event", param="type"))
            return
        client_id = event.get("request_id")
        if not isinstance(client_id, str) or not 0 < len(client_id) <= _MAX_CLIENT_ID_CHARS:
            await self._error(None, InvalidRequest(
                f"'{kind}' needs a 'request_id': a string of 1 to {_MAX_CLIENT_ID_CHARS} "
                "characters of your choice, which the server's events for it carry.",
                code="missing_required_parameter", param="request_id"))
            return
        if kind == "chat.completion.cancel":
            for request in list(self.requests):
                if request.client_id == client_id:
                    request.cancel("client")
            return
        if len(self.requests) >= self.limits.max_concurrent + self.limits.max_queued:
            await self._error(client_id, RateLimited(
                f"This connection already runs {self.limits.max_concurrent} requests with "
                f"{self.limits.max_queued} waiting; wait for one to end, or open another "
                "connection.", code="rate_limit_exceeded", headers={"retry-after": "1"}))
            return
        del event["type"], event["request_id"]
        # Over the socket every answer streams; the body's own size is what admission measures.
        event["stream"] = True
        request = _Request(client_id)
        self.requests.add(request)
        request.task = asyncio.create_task(self._serve(request, event, len(text.encode())))

    # -- one request --------------------------------------------------------------------------

    async def _serve(self, request: _Request, body: dict[str, Any], size: int) -> None:
        try:
            if request.cancelled_by is None:
                request.phase = "waiting"
                await self.slots.acquire()
                try:
                    request.phase = "running"
                    await self._run(request, body, size)
                finally:
                    self.slots.release()
            else:
                await self._end_cancelled(request, None)
        except asyncio.CancelledError:
            # Cancelled while waiting for a slot: nothing was held.
            if request.cancelled_by is None:
                raise
            await self._end_cancelled(request, None)
        except _SocketGone:
            pass
        finally:
            self.requests.discard(request)

    async def _run(self, request: _Request, body: dict[str, Any], size: int) -> None:
        try:
            identity = await self.state.keys.authenticate(self.authorization)
        except AuthenticationFailed as error:
            await self.close(4401, error.code or "invalid_api_key")
            return
        completion = request.completion = ChatCompletion(self.state, new_request_id(), identity)
        catalog = self.state.catalog
        plan = catalog.plans.get(identity.plan_code) or catalog.plans[catalog.default_plan]
        task = asyncio.current_task()
        assert task is not None
        ticket: Ticket | None = None
        settled: Settled | None = None
        try:
            request.phase = "shielded"
            # The plan's rate limits count a socket's requests as HTTP counts its own.
            ticket = completion.ticket = await self.state.limits.admit_key(identity, plan)
            await completion.admit_body(body, size)
            request.admitted = True
            request.phase = "running"
            if request.cancelled_by is not None:
                raise asyncio.CancelledError
            await self._stream(request, completion)
            end = completion.stream_end
            settled = end.settled if end is not None else None
        except asyncio.CancelledError:
            if task.cancelling():
                task.uncancel()
            settled = await completion.abandon()
            if request.cancelled_by is None:
                raise
            await self._end_cancelled(request, settled)
        except _SocketGone:
            settled = await completion.abandon()
        except DubheError as error:
            if request.cancelled_by == "socket" or self.closed:
                return
            request.ended = True
            await self._error(request.client_id, error, completion.request_id)
            if isinstance(error, AccountInDebt):
                # Requests still waiting on this socket, or coming after a refusal for debt,
                # would all be refused the same way: the socket closes instead.
                if self.refused_for_debt or any(
                    not other.admitted for other in self.requests if other is not request
                ):
                    await self.close(4402, "account in debt")
                self.refused_for_debt = True
        except Exception:
            log.exception("request %s on a WebSocket failed", completion.request_id)
            # Charged for what was delivered, as if the client had left (never released unused).
            settled = await completion.abandon()
            if not request.ended and not self.closed:
                request.ended = True
                await self._error(request.client_id, DubheError(
                    f"The server had an error processing your request (request id "
                    f"{completion.request_id}); retry, and contact support with the request "
                    "id if it persists.", code="internal_error"), completion.request_id)
        finally:
            completion.close()
            if ticket is not None:
                # Tokens per minute count what was used once it is known (none for a request
                # refused before the upstream call); otherwise what was held stands.
                used = (settled.prompt_tokens + settled.completion_tokens if settled is not None
                        else None if request.admitted else 0)
                ticket.finish(used)

    async def _stream(self, request: _Request, completion: ChatCompletion) -> None:
        events = await completion.open_stream()
        client_id = orjson.dumps(request.client_id)
        suffix = _CHUNK_TYPE + client_id + b"}"
        error_suffix = (_ERROR_TYPE + client_id + b',"server_request_id":'
                        + orjson.dumps(completion.request_id) + b"}")
        async with aclosing(events):
            async for ready in events:
                for frame in _frames(ready, suffix, error_suffix):
                    await self.send({"type": "websocket.send",
                                     "text": frame.decode("utf-8", "replace")})
        # Settled: a cancel arriving now would only take the done event away.
        request.phase = "shielded"
        end = completion.stream_end
        if end is not None and end.upstream_error:
            request.ended = True  # its error event was the last frame relayed
            return
        if end is not None and end.usage_chunk is not None:
            await self.send_event({**end.usage_chunk, "type": "chat.completion.chunk",
                                   "request_id": request.client_id})
        request.ended = True
        await self.send_event(_done(request, end.settled if end else None, "completed"))

    async def _end_cancelled(self, request: _Request, settled: Settled | None) -> None:
        if request.cancelled_by != "client" or self.closed or request.ended:
            return
        request.ended = True
        try:
            await self.send_event(_done(request, settled, "cancelled"))
        except _SocketGone:
            pass


def _frames(ready: bytes, suffix: bytes, error_suffix: bytes) -> list[bytes]:
    """Each ``data:`` object of the relayed events with ``type`` and ``request_id`` appended."""
    frames: list[bytes] = []
    for line in ready.split(b"\n"):
        if not line.startswith(b"data:"):
            continue  # blank separators, keep-alive comments, event: and id: fields
        payload = line[5:].strip()
        if payload[:1] != b"{" or payload[-1:] != b"}":
            continue  # [DONE] is held back by the relay; nothing else passes it
        tail = error_suffix if payload.startswith(b'{"error"') else suffix
        frames.append(payload[:-1] + (b"," if len(payload) > 2 else b"") + tail)
    return frames


def _done(request: _Request, settled: Settled | None, status: str) -> dict[str, Any]:
    completion = request.completion
    event: dict[str, Any] = {
        "type": "chat.completion.done",
        "request_id": request.client_id,
        "server_request_id": completion.request_id if completion is not None else None,
        "status": status,
        "usage": None,
    }
    if settled is not None:
        event["usage"] = {
            "prompt_tokens": settled.prompt_tokens,
            "completion_tokens": settled.completion_tokens,
            "total_tokens": settled.prompt_tokens + settled.completion_tokens,
            "cost_usd": format_usd(settled.cost_uusd),
            "estimated": settled.estimated,
        }
        event["balance"] = {
            "tokens_remaining": settled.balance.tokens_remaining,
            "balance_usd": format_usd(settled.balance.balance_uusd),
        }
    elif status == "cancelled" and completion is None:
        event["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                          "cost_usd": format_usd(0), "estimated": False}
    if completion is not None and completion.clamped_to is not None:
        event["max_tokens_clamped"] = completion.clamped_to
    return event


def _client_id_or_none(event: dict[str, Any]) -> str | None:
    value = event.get("request_id")
    return value if isinstance(value, str) and len(value) <= _MAX_CLIENT_ID_CHARS else None
