"""The help chat's routes: ``/api/chat`` for visitors (signed in or not), ``/admin/api/inbox``
for admins. A stream (``.../events``) is server-sent events when the client asks for
``text/event-stream``, and otherwise the same JSON as its plain twin (so a script, or a client
that cannot stream, polls it)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dubhe.accounts.endpoints import client_ip
from dubhe.accounts.sessions import OptionalSessionUserDep, is_secure_request, require_csrf
from dubhe.admin.access import AdminDep
from dubhe.admin.service import Actor
from dubhe.helpchat import service
from dubhe.helpchat.assistant import assistant_enabled, draft_first_answer
from dubhe.helpchat.feed import HelpFeed, sse_events
from dubhe.helpchat.repository import HelpChatRepository
from dubhe.helpchat.schemas import (
    ChatIn,
    ChatMessageOut,
    ConversationOut,
    InboxOut,
    InboxRowOut,
    message_out,
)
from dubhe.models.base import utcnow
from dubhe.web.dependencies import SessionDep, StateDep, WebState

router = APIRouter(prefix="/api/chat", tags=["help chat"])
admin_router = APIRouter(prefix="/admin/api/inbox", tags=["admin"])

_COOKIE_MAX_AGE = 365 * 24 * 3600
After = Annotated[int, Query(ge=0, le=2**63 - 1)]
ConversationId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def feed(request: Request, state: WebState) -> HelpFeed:
    app_state = request.app.state
    if getattr(app_state, "help_feed", None) is None:
        app_state.help_feed = HelpFeed(state.read_sessionmaker or state.sessionmaker)
    return app_state.help_feed  # type: ignore[no-any-return]


def visitor(request: Request, user_id: int | None) -> service.Visitor:
    token = request.cookies.get(service.VISITOR_COOKIE)
    if token is not None and not (16 <= len(token) <= 64):
        token = None
    return service.Visitor(user_id=user_id, token=token)


def _wants_stream(accept: str | None) -> bool:
    return accept is not None and "text/event-stream" in accept


def _stream(request: Request, state: WebState, conversation_id: int, after: int) -> Response:
    return StreamingResponse(
        sse_events(feed(request, state), conversation_id, after,
                   sessionmaker=state.read_sessionmaker or state.sessionmaker),
        media_type="text/event-stream",
        headers={"cache-control": "no-store", "x-accel-buffering": "no"})


def _last_event_id(value: str | None, after: int) -> int:
    return max(after, int(value)) if value is not None and value.isdigit() and len(value) < 19 \
        else after


@router.get("")
async def my_conversation(request: Request, user: OptionalSessionUserDep, session: SessionDep,
                          after: After = 0) -> ConversationOut:
    conversation = await service.find_conversation(
        session, visitor(request, user.id if user else None))
    if conversation is None:
        return ConversationOut(conversation_id=None, messages=[])
    messages = await HelpChatRepository.from_session(session).messages(conversation.id,
                                                                       after=after)
    return ConversationOut(conversation_id=conversation.id,
                           messages=[message_out(message) for message in messages])


@router.get("/events", response_model=None)
async def my_events(request: Request, user: OptionalSessionUserDep, session: SessionDep,
                    state: StateDep, after: After = 0,
                    accept: Annotated[str | None, Header()] = None,
                    last_event_id: Annotated[str | None, Header()] = None,
                    ) -> ConversationOut | Response:
    conversation = await service.find_conversation(
        session, visitor(request, user.id if user else None))
    if not _wants_stream(accept) or conversation is None:
        return await my_conversation(request, user, session, after)
    # The request's transaction ends when this returns; the stream reads in its own.
    return _stream(request, state, conversation.id, _last_event_id(last_event_id, after))


@router.post("/messages", status_code=201)
async def send_message(body: ChatIn, request: Request, user: OptionalSessionUserDep,
                       session: SessionDep, state: StateDep,
                       background: BackgroundTasks) -> JSONResponse:
    await require_csrf(request)
    posted = await service.post_visitor_message(
        session, visitor(request, user.id if user else None), body.body,
        client_ip=client_ip(request), settings=state.settings, now=utcnow())
    asgi_app = getattr(request.app.state, "dubhe_asgi", None)
    if posted.first and asgi_app is not None and assistant_enabled(state.settings):
        # After the response, and so after this transaction committed the message.
        background.add_task(draft_first_answer, asgi_app, state.sessionmaker,
                            settings=state.settings, catalog=state.catalog,
                            conversation_id=posted.conversation.id, question=posted.message.body)
    response = JSONResponse(
        {"conversation_id": posted.conversation.id,
         "message": message_out(posted.message).model_dump(mode="json")}, status_code=201)
    if posted.new_token is not None:
        response.set_cookie(service.VISITOR_COOKIE, posted.new_token, max_age=_COOKIE_MAX_AGE,
                            path="/", httponly=True, secure=is_secure_request(request),
                            samesite="lax")
    return response


# -- the admins' inbox ---------------------------------------------------------------------------


@admin_router.get("")
async def inbox(admin: AdminDep, session: SessionDep,
                limit: Annotated[int, Query(ge=1, le=500)] = 100) -> InboxOut:
    repository = HelpChatRepository.from_session(session)
    rows = await repository.inbox(limit=limit)
    return InboxOut(unread_total=await repository.unread_total(), conversations=[
        InboxRowOut(conversation_id=row.conversation.id,
                    who=row.email or f"Visitor #{row.conversation.id}", unread=row.unread,
                    last_message=row.last_body[:200],
                    last_message_at=row.conversation.last_message_at)
        for row in rows])


@admin_router.get("/{conversation_id}")
async def conversation(conversation_id: ConversationId, admin: AdminDep, session: SessionDep,
                       after: After = 0) -> ConversationOut:
    repository = HelpChatRepository.from_session(session)
    if await repository.get(conversation_id) is None:
        return ConversationOut(conversation_id=None, messages=[])
    messages = await repository.messages(conversation_id, after=after)
    if messages:
        # Reading is not an audited change: it only clears the unread count.
        await repository.mark_read(conversation_id, messages[-1].id)
    return ConversationOut(conversation_id=conversation_id,
                           messages=[message_out(message) for message in messages])


@admin_router.get("/{conversation_id}/events", response_model=None)
async def conversation_events(conversation_id: ConversationId, request: Request,
                              admin: AdminDep, session: SessionDep, state: StateDep,
                              after: After = 0,
                              accept: Annotated[str | None, Header()] = None,
                              last_event_id: Annotated[str | None, Header()] = None,
                              ) -> ConversationOut | Response:
    if not _wants_stream(accept):
        return await conversation(conversation_id, admin, session, after)
    return _stream(request, state, conversation_id, _last_event_id(last_event_id, after))


@admin_router.post("/{conversation_id}/messages", status_code=201)
async def reply(conversation_id: ConversationId, body: ChatIn, admin: AdminDep,
                session: SessionDep, state: StateDep) -> ChatMessageOut:
    message = await service.post_admin_reply(session, Actor.of(admin),
                                             conversation_id=conversation_id, text=body.body,
                                             settings=state.settings, now=utcnow())
    return message_out(message)


__all__ = ["admin_router", "router"]
