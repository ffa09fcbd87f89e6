"""What the help chat's routes take and answer."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from dubhe.models import HelpMessage


class ChatMessageOut(BaseModel):
    id: int
    author: Literal["visitor", "admin", "assistant"]  # assistant: the automatic answer
    body: str  # plain text: shown as text, never as HTML
    at: datetime


def message_out(message: HelpMessage) -> ChatMessageOut:
    return ChatMessageOut(id=message.id, author=message.author,  # type: ignore[arg-type]
                          body=message.body, at=message.created_at)


class ChatIn(BaseModel):
    # The configured limit (DUBHE_HELP_CHAT_MAX_MESSAGE_CHARS) is checked by the service; this
    # bound only stops a huge body before it is parsed further.
    body: str = Field(max_length=20_000)


class ConversationOut(BaseModel):
    conversation_id: int | None
    messages: list[ChatMessageOut]


class InboxRowOut(BaseModel):
    conversation_id: int
    who: str
    unread: int
    last_message: str
    last_message_at: datetime


class InboxOut(BaseModel):
    unread_total: int
    conversations: list[InboxRowOut]
