"""``/dashboard/keys``: create (the full key shown once, with a copy button), list and revoke.
HTML forms with their CSRF token; the JSON twins are in ``keys.endpoints``."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from dubhe.accounts.sessions import SessionUser, SessionUserDep, SessionWriterDep
from dubhe.billing.pricing import parse_usd
from dubhe.dashboard import render
from dubhe.errors import DubheError, UnprocessableRequest
from dubhe.keys import service
from dubhe.models.base import utcnow
from dubhe.web.dependencies import SessionDep, StateDep

router = APIRouter(include_in_schema=False)


async def _keys_page(request: Request, user: SessionUser, session: SessionDep, *,
                     status_code: int = 200, **context: object) -> HTMLResponse:
    rows = await service.list_keys(session, user.id, now=utcnow())
    context.setdefault("new_key", None)
    context.setdefault("new_key_name", None)
    return render(request, "keys/keys.html", status_code=status_code, title="API keys",
                  user=user, rows=rows, **context)


@router.get("/dashboard/keys", response_class=HTMLResponse)
async def keys_page(request: Request, user: SessionUserDep, session: SessionDep) -> Response:
    return await _keys_page(request, user, session)


@router.post("/dashboard/keys", response_class=HTMLResponse)
async def create_key_submit(
    request: Request, user: SessionWriterDep, session: SessionDep, state: StateDep,
    name: Annotated[str, Form(max_length=100)],
    expires_in_days: Annotated[str, Form(max_length=8)] = "",
    spend_cap_usd: Annotated[str, Form(max_length=32)] = "",
) -> Response:
    now = utcnow()
    try:
        expires_at = None
        if expires_in_days.strip():
            if not expires_in_days.strip().isdigit() or not 1 <= int(expires_in_days) <= 3650:
                raise UnprocessableRequest("the expiry must be 1 to 3650 days",
                                           param="expires_in_days")
            expires_at = now + timedelta(days=int(expires_in_days))
        cap = parse_usd(spend_cap_usd, param="spend_cap_usd") if spend_cap_usd.strip() else None
        created = await service.create_user_key(session, user.id,
                                                secret=state.settings.resolved_secret, name=name,
                                                expires_at=expires_at, spend_cap_uusd=cap, now=now)
    except DubheError as exc:
        return await _keys_page(request, user, session, status_code=exc.status_code,
                                error=exc.message)
    # Rendered, not redirected: the full key exists only in this response.
    return await _keys_page(request, user, session, status_code=201, new_key=created.secret,
                            new_key_name=created.key.name,
                            notice=f"Key “{created.key.name}” created.")


@router.post("/dashboard/keys/{key_id}/revoke")
async def revoke_key_submit(key_id: int, user: SessionWriterDep, session: SessionDep) -> Response:
    await service.revoke_key(session, user.id, key_id, now=utcnow())
    return RedirectResponse("/dashboard/keys", status_code=303)
