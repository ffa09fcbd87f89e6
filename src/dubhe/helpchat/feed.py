"""The live part of the help chat: one poll per worker, however many panels are open.

Twice a second, while anyone listens, the worker reads the ids of messages newer than the last
it saw (one indexed query) and wakes the listeners of those conversations (and the inbox's, which
listens to all). A woken listener reads its new messages and sends them as server-sent events.
A message written on any worker or instance reaches every open panel within about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Iterator

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dubhe.helpchat.repository import HelpChatRepository

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
# Which worker process serves a stream: the first event says so (tests use it to prove a
# message crossed workers). Random per process, so it tells nothing about the host.
WORKER_ID = secrets.token_hex(4)
ANY_CONVERSATION = 0


class HelpFeed:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], *,
                 poll_seconds: float = POLL_SECONDS) -> None:
        self._sessionmaker = sessionmaker
        self._poll_seconds = poll_seconds
        self._listeners: dict[int, set[asyncio.Event]] = {}
        self._watermark: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @contextlib.contextmanager
    def listen(self, conversation_id: int) -> Iterator[asyncio.Event]:
        """An event set whenever ``conversation_id`` (or, for ``ANY_CONVERSATION``, any) has
        new messages."""
        event = asyncio.Event()
        self._listeners.setdefault(conversation_id, set()).add(event)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll_forever(), name="help-chat-feed")
        try:
            yield event
        finally:
            listeners = self._listeners.get(conversation_id, set())
            listeners.discard(event)
            if not listeners:
                self._listeners.pop(conversation_id, None)

    async def stop(self) -> None:
        """End the poll (at shutdown, before the engines close): between two polls, never in
        the middle of one."""
        task, self._task = self._task, None
        self._listeners.clear()
        if task is not None and not task.done():
            self._stopping.set()
            await task

    async def _poll_forever(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._poll_seconds)
            if self._stopping.is_set():
                return
            if not self._listeners:
                continue
            try:
                await self._poll()
            except Exception:  # a database hiccup: the next poll catches up
                log.exception("polling the help chat failed; retrying")

    async def _poll(self) -> None:
        async with self._sessionmaker() as session:
            repository = HelpChatRepository.from_session(session)
            if self._watermark is None:
                self._watermark = await repository.max_message_id()
                # Listeners read from their own position, so a message written before the
                # first poll is not lost: wake them all once.
                changed = set(self._listeners)
            else:
                rows = await repository.latest_message_ids(self._watermark)
                if not rows:
                    return
                self._watermark = rows[-1][0]
                changed = {conversation_id for _, conversation_id in rows}
                changed.add(ANY_CONVERSATION)
        for conversation_id in changed:
            for event in self._listeners.get(conversation_id, ()):
                event.set()


async def sse_events(feed: HelpFeed, conversation_id: int, after: int, *,
                     sessionmaker: async_sessionmaker[AsyncSession],
                     lifetime_seconds: float = 300.0) -> AsyncIterator[bytes]:
    """The stream of one conversation's messages after ``after``, as server-sent events. It ends
    after ``lifetime_seconds`` (the browser's EventSource reconnects with Last-Event-ID), so no
    stream holds a worker's memory for ever; a comment every 15 s keeps proxies from closing it."""
    import orjson

    from dubhe.helpchat.schemas import message_out

    yield b"event: hello\ndata: " + orjson.dumps({"worker": WORKER_ID}) + b"\n\n"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + lifetime_seconds
    with feed.listen(conversation_id) as changed:
        changed.set()  # read once at start: anything written since the page's own read
        while loop.time() < deadline:
            try:
                await asyncio.wait_for(changed.wait(), 15)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            changed.clear()
            async with sessionmaker() as session:
                messages = await HelpChatRepository.from_session(session).messages(
                    conversation_id, after=after)
            for message in messages:
                after = message.id
                yield (f"id: {message.id}\n".encode() + b"data: "
                       + message_out(message).model_dump_json().encode() + b"\n\n")
