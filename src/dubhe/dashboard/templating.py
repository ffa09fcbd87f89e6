"""Rendering pages: one Jinja2 environment per process, over the templates of every domain.

A domain keeps its pages next to its code (``src/dubhe/<domain>/templates/``); all of them extend
the one layout, ``base.html`` (here, in ``dashboard/templates``). Template names share one
namespace, so a domain prefixes its own (``accounts_login.html`` or ``accounts/login.html``).
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, pass_context
from jinja2.runtime import Context
from markupsafe import Markup

from dubhe.billing.pricing import format_usd

# The domains whose templates/ folders the loader searches, in this order.
TEMPLATE_PACKAGES = ("dubhe.dashboard", "dubhe.accounts", "dubhe.keys", "dubhe.admin")
STATIC_DIR = Path(str(resources.files("dubhe.dashboard").joinpath("static")))


def render(
    request: Request, template: str, *, status_code: int = 200, **context: Any
) -> HTMLResponse:
    """The page ``template`` with ``context``; the layout also reads ``user`` (the signed-in
    user, or absent), ``title``, ``notice`` and ``error`` from it when given."""
    context.setdefault("user", None)
    context.setdefault("notice", None)
    context.setdefault("error", None)
    html = _environment().get_template(template).render(request=request, **context)
    return HTMLResponse(html, status_code=status_code, headers={"cache-control": "no-store"})


def static_url(name: str) -> str:
    """The URL of a static asset, versioned by its content so it can be cached for a year."""
    return f"/static/{name}?v={_asset_version(name)}"


def usd(uusd: int, *, places: int = 2) -> str:
    """Integer micro-dollars for people: ``$12.50``, ``$0.000123``; exact, never through a float.
    Keeps at least ``places`` decimals and every non-zero micro-dollar digit."""
    text = format_usd(uusd)
    sign = "-" if text.startswith("-") else ""
    whole, micro = text.lstrip("-").split(".")
    decimals = micro.rstrip("0").ljust(places, "0")
    return f"{sign}${int(whole):,}" + (f".{decimals}" if decimals else "")


def tokens(count: int) -> str:
    """A token count with thousands separators: 1,048,576."""
    return f"{count:,}"


def compact_tokens(count: int) -> str:
    """A context size as model cards say it: 131,072 -> 128K, 1,048,576 -> 1M (binary multiples,
    as context windows are), 100,000 -> 100K; anything else with separators."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10), ("M", 1_000_000), ("K", 1_000)):
        if count >= size and count % size == 0:
            return f"{count // size:,}{unit}"
    return f"{count:,}"


@pass_context
def csrf_field(context: Context) -> Markup:
    """The hidden input every form posts: ``<input name="csrf_token">`` for this session."""
    # Imported here: accounts' session code imports this module for its own pages.
    from dubhe.accounts.sessions import csrf_token

    token = csrf_token(context["request"])
    return Markup('<input type="hidden" name="csrf_token" value="{}">').format(token)


@pass_context
def csrf_value(context: Context) -> str:
    """The session's CSRF token, for the ``<meta>`` tag that JavaScript sends as a header."""
    from dubhe.accounts.sessions import csrf_token

    return csrf_token(context["request"])


@cache
def _environment() -> Environment:
    folders = []
    for package in TEMPLATE_PACKAGES:
        try:
            folder = Path(str(resources.files(package).joinpath("templates")))
        except ModuleNotFoundError:
            continue
        if folder.is_dir():
            folders.append(FileSystemLoader(folder))
    environment = Environment(
        loader=ChoiceLoader(folders),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(usd=usd, tokens=tokens, compact_tokens=compact_tokens)
    environment.globals.update(
        static_url=static_url, csrf_field=csrf_field, csrf_value=csrf_value
    )
    return environment


@cache
def _asset_version(name: str) -> str:
    return hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()[:12]
