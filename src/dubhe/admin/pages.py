"""The console's pages (``/admin/...``), admins only. They only read: every action on them calls
its ``/admin/api`` twin from the page's script (``admin.js``), as a script would."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse

from dubhe.admin.access import AdminDep
from dubhe.admin.endpoints import (
    audit,
    list_codes,
    list_models,
    list_upstreams,
    search_users,
    show_user,
    totals,
)
from dubhe.billing.queries import BillingQueries
from dubhe.dashboard.templating import render
from dubhe.helpchat.endpoints import conversation, inbox
from dubhe.web.dependencies import SessionDep, StateDep

router = APIRouter(prefix="/admin", include_in_schema=False)
Id = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.get("", response_class=HTMLResponse)
async def overview(request: Request, admin: AdminDep, session: SessionDep) -> HTMLResponse:
    days = await totals(admin, session, days=30)
    unread = (await inbox(admin, session, limit=1)).unread_total
    return render(request, "admin/overview.html", title="Admin", user=admin, days=days,
                  unread=unread)


@router.get("/users", response_class=HTMLResponse)
async def users(request: Request, admin: AdminDep, session: SessionDep,
                q: Annotated[str, Query(max_length=320)] = "") -> HTMLResponse:
    rows = await search_users(admin, session, q=q, limit=100)
    return render(request, "admin/users.html", title="Users · Admin", user=admin, rows=rows, q=q)


@router.get("/users/{user_id}", response_class=HTMLResponse)
async def user(request: Request, user_id: Id, admin: AdminDep, session: SessionDep,
               state: StateDep) -> HTMLResponse:
    shown = await show_user(user_id, admin, session, state)
    statement = await BillingQueries.from_session(session).statement_page(user_id, limit=20)
    return render(request, "admin/user.html", title=f"{shown.email} · Admin", user=admin,
                  shown=shown, plans=list(state.catalog.plans.values()), statement=statement)


@router.get("/models", response_class=HTMLResponse)
async def models(request: Request, admin: AdminDep, session: SessionDep,
                 state: StateDep) -> HTMLResponse:
    rows = await list_models(admin, session, state)
    return render(request, "admin/models.html", title="Models · Admin", user=admin, rows=rows)


@router.get("/upstreams", response_class=HTMLResponse)
async def upstreams(request: Request, admin: AdminDep, session: SessionDep,
                    state: StateDep) -> HTMLResponse:
    rows = await list_upstreams(admin, session, state)
    return render(request, "admin/upstreams.html", title="Upstreams · Admin", user=admin,
                  rows=rows)


@router.get("/codes", response_class=HTMLResponse)
async def codes(request: Request, admin: AdminDep, session: SessionDep) -> HTMLResponse:
    rows = await list_codes(admin, session, limit=200)
    return render(request, "admin/codes.html", title="Codes · Admin", user=admin, rows=rows)


@router.get("/inbox", response_class=HTMLResponse)
async def inbox_page(request: Request, admin: AdminDep, session: SessionDep) -> HTMLResponse:
    shown = await inbox(admin, session, limit=200)
    return render(request, "admin/inbox.html", title="Inbox · Admin", user=admin, inbox=shown)


@router.get("/inbox/{conversation_id}", response_class=HTMLResponse)
async def conversation_page(request: Request, conversation_id: Id, admin: AdminDep,
                            session: SessionDep) -> HTMLResponse:
    shown = await conversation(conversation_id, admin, session, after=0)
    return render(request, "admin/conversation.html", title="Conversation · Admin", user=admin,
                  conversation_id=conversation_id, shown=shown,
                  status_code=200 if shown.conversation_id else 404)


@router.get("/audit", response_class=HTMLResponse)
async def audit_page(request: Request, admin: AdminDep, session: SessionDep) -> HTMLResponse:
    rows = await audit(admin, session, limit=200)
    return render(request, "admin/audit.html", title="Audit · Admin", user=admin, rows=rows)
