"""The pages: the public homepage and the signed-in dashboard.

Thin routes: each gathers what its page shows through the owning domain's service and renders a
template. The actions on these pages call the ``/api`` JSON routes, not routes of their own.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from dubhe.dashboard.homepage import build_homepage
from dubhe.dashboard.templating import render
from dubhe.web.dependencies import StateDep

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def homepage(request: Request, state: StateDep) -> HTMLResponse:
    page = build_homepage(state.catalog, state.settings.public_url)
    return render(request, "home.html", title="OpenAI-compatible LLM API", page=page)
