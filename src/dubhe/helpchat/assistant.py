"""The optional automatic first answer (off unless ``DUBHE_HELP_CHAT_ASSISTANT_MODEL`` and
``DUBHE_HELP_CHAT_ASSISTANT_API_KEY`` are set).

It goes through the real ``/v1/chat/completions`` of this worker (in process, through the same
ASGI application a client reaches: key check, admission, plan limits, metering), paid by the
operator's support account whose key is configured, never by the visitor. An anonymous visitor
cannot turn it into free tokens: it drafts once per conversation (the first message only), its
output is capped (``help_chat_assistant_max_tokens``), and conversations are bounded by the chat's
per-address message limit. Its answer is stored as an ``assistant`` message, shown as automatic.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dubhe.catalog import Catalog
from dubhe.helpchat.repository import HelpChatRepository
from dubhe.models import HelpMessage
from dubhe.models.base import utcnow
from dubhe.settings import Settings

log = logging.getLogger(__name__)

FOLLOW_UP = "(Automatic answer: a person from our team will follow up here.)"


def assistant_enabled(settings: Settings) -> bool:
    return bool(settings.help_chat_assistant_model and settings.help_chat_assistant_api_key)


def documentation(catalog: Catalog, public_url: str) -> str:
    """What the assistant knows: the API's address and the catalog's models, prices and plans,
    the same facts the homepage's documentation shows."""
    lines = [
        "You are the support assistant of Dubhe, an OpenAI-compatible LLM API. Answer briefly and "
        "only from these facts; if they do not cover the question, say a person will answer.",
        f"Base URL: {public_url.rstrip('/')}/v1 (use any OpenAI SDK with base_url set to it and "
        "an API key from the dashboard, sent as 'Authorization: Bearer sk-dubhe-...').",
        "Errors use the OpenAI envelope; 401 bad key, 402 out of credit, 429 rate limit, "
        "503 model in maintenance.",
        "Models (USD per million input / output tokens):",
    ]
    for model in catalog.models.values():
        lines.append(f"- {model.id}: {model.name}, context {model.context_window:,} tokens, "
                     f"{model.input_price_uusd_per_mtok / 1e6:g} / "
                     f"{model.output_price_uusd_per_mtok / 1e6:g}")
    lines.append("Plans (monthly price in USD, included tokens, models):")
    for plan in catalog.plans.values():
        lines.append(f"- {plan.name}: {plan.price_cents / 100:g}, {plan.included_tokens:,} "
                     f"tokens, {', '.join(sorted(plan.models))}")
    return "\n".join(lines)


async def draft_first_answer(asgi_app: Any, sessionmaker: async_sessionmaker[AsyncSession], *,
                             settings: Settings, catalog: Catalog, conversation_id: int,
                             question: str) -> None:
    """Ask the configured model, store its answer; on any failure, log and leave it to a
    person (the visitor's message is already stored and in the inbox)."""
    assert settings.help_chat_assistant_api_key is not None
    body = {
        "model": settings.help_chat_assistant_model,
        "max_tokens": settings.help_chat_assistant_max_tokens,
        "messages": [{"role": "system", "content": documentation(catalog, settings.public_url)},
                     {"role": "user", "content": question}],
    }
    headers = {"authorization": "Bearer "
               + settings.help_chat_assistant_api_key.get_secret_value()}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi_app),
                                     base_url="http://dubhe.internal", timeout=60) as client:
            response = await client.post("/v1/chat/completions", json=body, headers=headers)
        if response.status_code != 200:
            log.warning("the help-chat assistant got HTTP %s (%s); no automatic answer",
                        response.status_code, response.headers.get("x-request-id"))
            return
        answer = response.json()["choices"][0]["message"]["content"]
        if not isinstance(answer, str) or not answer.strip():
            return
    except Exception:
        log.exception("the help-chat assistant failed; no automatic answer")
        return
    text = answer.strip()[: settings.help_chat_max_message_chars - len(FOLLOW_UP) - 2]
    async with sessionmaker() as session, session.begin():
        repository = HelpChatRepository.from_session(session)
        conversation = await repository.get(conversation_id)
        if conversation is None:
            return
        repository.add(HelpMessage(conversation_id=conversation_id, author="assistant",
                                   body=f"{text}\n\n{FOLLOW_UP}", created_at=utcnow()))
