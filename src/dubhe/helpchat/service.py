"""Help-chat rules: who a visitor's conversation is, what a message may be, how often.

A visitor without an account is known by a random cookie (only its SHA-256 is stored); when they
sign in, that conversation joins their account (or its messages join the one the account already
has). Message text is stored and shown as plain text, never as HTML. Limits per conversation and
per client address keep the chat from being a spam channel; both are counted in the database, so
every worker and instance shares them.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.admin.service import Actor, audit
from dubhe.errors import NotFound, RateLimited, UnprocessableRequest
from dubhe.helpchat.repository import HelpChatRepository
from dubhe.models import HelpConversation, HelpMessage
from dubhe.settings import Settings

VISITOR_COOKIE = "dubhe_chat"


def visitor_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_visitor_token() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True, slots=True)
class Visitor:
    user_id: int | None  # signed in
    token: str | None  # the chat cookie, if the browser has one


async def find_conversation(session: AsyncSession, visitor: Visitor) -> HelpConversation | None:
    repository = HelpChatRepository.from_session(session)
    by_cookie = await repository.by_visitor(visitor_hash(visitor.token)) if visitor.token else None
    if visitor.user_id is None:
        # A cookie's conversation that has joined an account is that account's: only its
        # owner, signed in, reads it.
        return by_cookie if by_cookie is not None and by_cookie.user_id is None else None
    mine = await repository.by_user(visitor.user_id)
    if by_cookie is not None and by_cookie.user_id is None:
        # Written before signing in: it joins the account.
        if mine is None:
            by_cookie.user_id = visitor.user_id
            return by_cookie
        await repository.move_messages(by_cookie.id, mine.id)
        if by_cookie.last_message_at > mine.last_message_at:
            mine.last_message_at = by_cookie.last_message_at
    return mine


def clean_body(text: str, settings: Settings) -> str:
    body = text.strip()
    if not body:
        raise UnprocessableRequest("Write a message first.", code="invalid_value", param="body")
    if len(body) > settings.help_chat_max_message_chars:
        raise UnprocessableRequest(
            f"A message may be at most {settings.help_chat_max_message_chars:,} characters.",
            code="invalid_value", param="body")
    return body


def _too_many(message: str, retry_after: int) -> RateLimited:
    return RateLimited(message, code="rate_limit_exceeded",
                       headers={"retry-after": str(retry_after),
                                "retry-after-ms": str(retry_after * 1000)})


@dataclass(frozen=True, slots=True)
class Posted:
    conversation: HelpConversation
    message: HelpMessage
    new_token: str | None  # a cookie to set: this anonymous visitor's first message
    first: bool  # the conversation's first message (the automatic answer drafts only then)


async def post_visitor_message(session: AsyncSession, visitor: Visitor, text: str, *,
                               client_ip: str, settings: Settings, now: datetime) -> Posted:
    body = clean_body(text, settings)
    repository = HelpChatRepository.from_session(session)
    # The limits below count, then insert: posts from one address, or by one account (which
    # has one conversation), wait for each other so that racing them cannot pass a limit or
    # open a second conversation.
    await repository.serialize(f"ip:{client_ip}", *(
        [f"user:{visitor.user_id}"] if visitor.user_id is not None else []))
    if await repository.visitor_messages_since(
            since=now - timedelta(hours=1), client_ip=client_ip
    ) >= settings.help_chat_messages_per_ip_per_hour:
        raise _too_many("Too many help-chat messages from your address; try again later.", 600)
    conversation = await find_conversation(session, visitor)
    if conversation is not None and await repository.visitor_messages_since(
            since=now - timedelta(minutes=1), conversation_id=conversation.id
    ) >= settings.help_chat_messages_per_minute:
        raise _too_many("You are sending messages too fast; wait a minute.", 60)
    new_token = None
    first = conversation is None
    if conversation is None:
        if visitor.user_id is None:
            # Always a fresh cookie: the old one may name a conversation that has since joined
            # an account, which this anonymous visitor must not reach (nor collide with).
            new_token = new_visitor_token()
        conversation = HelpConversation(
            visitor_hash=visitor_hash(new_token) if new_token else None,
            user_id=visitor.user_id, created_at=now, last_message_at=now, admin_read_message_id=0)
        repository.add(conversation)
        await session.flush()
    message = HelpMessage(conversation_id=conversation.id, author="visitor",
                          author_user_id=visitor.user_id, body=body, client_ip=client_ip,
                          created_at=now)
    repository.add(message)
    conversation.last_message_at = now
    await session.flush()
    return Posted(conversation, message, new_token, first)


async def post_admin_reply(session: AsyncSession, actor: Actor, *, conversation_id: int,
                           text: str, settings: Settings, now: datetime) -> HelpMessage:
    body = clean_body(text, settings)
    repository = HelpChatRepository.from_session(session)
    conversation = await repository.get(conversation_id)
    if conversation is None:
        raise NotFound(f"No conversation {conversation_id}.", code="conversation_not_found",
                       param="conversation_id")
    message = HelpMessage(conversation_id=conversation.id, author="admin",
                          author_user_id=actor.user_id, body=body, created_at=now)
    repository.add(message)
    conversation.last_message_at = now
    await session.flush()
    # Answering reads everything before the answer.
    await repository.mark_read(conversation.id, message.id)
    audit(session, actor, "chat.reply", f"conversation {conversation.id}", body[:120], now)
    return message
