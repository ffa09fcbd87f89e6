"""Tenant isolation, over every route the web app has: the routes are read from the app's own
route table, so a route added later is checked without anyone remembering to add it here.

- Anonymous callers get 401 (``/api``) or a redirect to ``/login`` (pages) on everything but the
  short, explicit list of public routes below.
- User B, logged in with a valid CSRF token and also holding an API key, calls every route with
  user A's ids in the path. Afterwards A's keys, balance, ledger and usage are exactly as before,
  and nothing B was answered mentions A's e-mail, key names, key prefixes or request ids.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import iter_route_contexts

from dubhe.catalog import load_catalog
from dubhe.database import create_engine, create_sessionmaker
from dubhe.keys.cache import KeyCache
from dubhe.ratelimit import UnauthenticatedLimiter
from dubhe.settings import Settings
from dubhe.web import WebState, create_web_app
from tests.conftest import fetch_one
from tests.web.conftest import WebServer

# Reachable without a session or key, each for its reason. Adding to this list is a decision.
PUBLIC = {
    ("GET", "/"),  # the homepage
    ("GET", "/billing"),  # Stripe Checkout's return address: a redirect into the dashboard
    ("GET", "/signup"), ("POST", "/signup"),
    ("GET", "/login"), ("POST", "/login"),
    ("POST", "/logout"),  # ends the caller's own session, if any
    ("GET", "/forgot-password"), ("POST", "/forgot-password"),
    ("GET", "/reset-password"), ("POST", "/reset-password"),  # the e-mailed token authorizes
    ("GET", "/verify-email"),  # the e-mailed token authorizes
    ("GET", "/api/auth/session"),  # says whether the caller is logged in; hands out a CSRF token
    ("POST", "/api/auth/signup"), ("POST", "/api/auth/login"), ("POST", "/api/auth/logout"),
    ("POST", "/api/auth/verify-email"), ("POST", "/api/auth/password-reset"),
    ("POST", "/api/auth/password-reset/confirm"),
    ("POST", "/api/stripe/webhook"),  # Stripe's signature authorizes
    ("GET", "/api/openapi.json"),
    # The help chat: anyone may write to support; a visitor reads only their own conversation
    # (by their cookie, or their session).
    ("GET", "/api/chat"), ("GET", "/api/chat/events"), ("POST", "/api/chat/messages"),
}
# Run last: they end the caller's session.
SESSION_ENDING = ("/logout", "/api/auth/logout", "/api/account/delete", "/dashboard/account/delete")


def route_table() -> list[tuple[str, str]]:
    """(method, path) of every route of the web app, built the way a worker builds it."""
    settings = Settings(data_dir=Path("/nonexistent"), secret_key="x" * 40)  # type: ignore[arg-type]
    engine = create_engine("sqlite+aiosqlite://")
    sessionmaker = create_sessionmaker(engine)
    app = create_web_app(WebState(
        settings=settings, catalog=load_catalog(None), sessionmaker=sessionmaker,
        keys=KeyCache(sessionmaker, b"x" * 40),
        unauthenticated=UnauthenticatedLimiter(per_minute=60, burst=10),
    ))
    routes = sorted({(method, route.path) for route in iter_route_contexts(app.routes)
                     for method in (route.methods or ()) if method != "HEAD"})
    asyncio.run(engine.dispose())
    return sorted(routes, key=lambda route: route[1] in SESSION_ENDING)


ROUTES = route_table()


def test_the_route_table_covers_the_product() -> None:
    paths = {path for _, path in ROUTES}
    for expected in ("/api/keys", "/api/account", "/api/usage", "/api/ledger", "/dashboard/keys",
                     "/dashboard/usage", "/dashboard/billing", "/dashboard/playground",
                     "/dashboard/account", "/api/billing/checkout"):
        assert expected in paths
    assert {route for route in PUBLIC if route not in ROUTES} == set(), "stale PUBLIC entries"


def concrete(path: str, ids: dict[str, int]) -> str:
    """The path with its parameters filled with user A's ids (or 1 where A has none)."""
    return re.sub(r"\{(\w+)\}", lambda m: str(ids.get(m.group(1), 1)), path)


@pytest.mark.parametrize(("method", "path"), [route for route in ROUTES if route not in PUBLIC])
def test_anonymous_callers_are_refused(web: WebServer, method: str, path: str) -> None:
    with web.client() as anonymous:
        anonymous.csrf()  # even with a valid CSRF cookie and token
        response = anonymous.api(method, concrete(path, {}), json={})
    if path.startswith(("/api/", "/admin/api/")):
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"] == "authentication_error"
    else:
        assert response.status_code == 303, response.text
        assert response.headers["location"].startswith("/login?next=")


async def snapshot(web: WebServer, user_id: int) -> dict[str, Any]:
    engine = create_engine(web.server.database_url)
    try:
        # Totals, not the available/reserved split: a worker's lease of A's credit may return
        # meanwhile (lease and release entries), which moves credit but changes nothing A owns.
        account = await fetch_one(
            engine, "SELECT plan_code, next_plan_code, tokens_available + tokens_reserved AS "
            "tokens, balance_uusd + balance_reserved_uusd AS balance FROM accounts "
            "WHERE user_id = :u", u=user_id)
        keys = await fetch_one(
            engine, "SELECT COUNT(*) AS n, SUM(CASE WHEN revoked_at IS NULL THEN 1 ELSE 0 END) "
            "AS live, MAX(updated_at) AS changed FROM api_keys WHERE user_id = :u", u=user_id)
        ledger = await fetch_one(engine, "SELECT COUNT(*) AS n, MAX(id) AS last FROM "
                                 "ledger_entries WHERE user_id = :u AND kind NOT IN "
                                 "('lease', 'release')", u=user_id)
        usage = await fetch_one(engine, "SELECT COUNT(*) AS n FROM usage_records WHERE user_id = :u",
                                u=user_id)
        user = await fetch_one(engine, "SELECT email, password_hash, plan_code, deleted_at "
                               "FROM users WHERE id = :u", u=user_id)
        sessions = await fetch_one(engine, "SELECT COUNT(*) AS n FROM web_sessions WHERE "
                                   "user_id = :u", u=user_id)
        return {"account": dict(account), "keys": dict(keys), "ledger": dict(ledger),
                "usage": dict(usage), "user": dict(user), "sessions": dict(sessions)}
    finally:
        await engine.dispose()


def test_user_b_can_never_read_or_change_user_a(web: WebServer) -> None:
    marker = secrets.token_hex(6)
    with web.client() as alice:
        alice_email = alice.sign_up(f"alice-{marker}@example.com")
        alice_key = alice.create_key(f"alice-key-{marker}")
        alice.api("POST", "/api/playground/key")
        called = httpx.post(f"{web.base_url}/chat/completions",
                            headers={"authorization": f"Bearer {alice_key['key']}"},
                            json={"model": "dubhe-fast", "max_tokens": 4,
                                  "messages": [{"role": "user", "content": "hi"}]})
        assert called.status_code == 200
        alice_request_id = called.headers["x-request-id"]
        alice_id = alice.get("/api/account/me").json()["id"]
        secrets_of_alice = [alice_email, f"alice-key-{marker}", alice_key["prefix"].rstrip("…"),
                            alice_request_id, alice_key["key"]]
        # Wait until A's request is on disk, so "unchanged" below is not a race with the meter.
        assert asyncio.run(_usage_count(web, alice_id)) >= 1
        before = asyncio.run(snapshot(web, alice_id))

        with web.client() as bob:
            bob.sign_up()
            bob_key = bob.create_key("bob")["key"]
            answers = []
            for method, path in ROUTES:
                url = concrete(path, {"key_id": alice_key["id"], "user_id": alice_id})
                for auth in ("session", "key"):
                    headers = {"authorization": f"Bearer {bob_key}"} if auth == "key" else {}
                    body = {"email": alice_email, "user_id": alice_id, "name": "x", "code": "x"}
                    response = bob.api(method, url, json=body, headers=headers)
                    # 503 is only allowed for what this server has no configuration for.
                    assert (response.status_code < 500 or response.json()["error"]["code"]
                            == "payments_not_configured"), (method, url, auth, response.text)
                    answers.append((method, url, auth, response))
            for method, url, auth, response in answers:
                for secret in secrets_of_alice:
                    assert secret not in response.text, (method, url, auth, secret)

        after = asyncio.run(snapshot(web, alice_id))
        assert after == before
        # And A still works: her key, her session.
        assert alice.get("/api/keys").status_code == 200
        assert httpx.get(f"{web.base_url}/models",
                         headers={"authorization": f"Bearer {alice_key['key']}"}).status_code == 200


async def _usage_count(web: WebServer, user_id: int, timeout: float = 10) -> int:
    engine = create_engine(web.server.database_url)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            row = await fetch_one(engine, "SELECT COUNT(*) AS n FROM usage_records WHERE "
                                  "user_id = :u", u=user_id)
            if int(row["n"]) >= 1 or loop.time() > deadline:
                return int(row["n"])
            await asyncio.sleep(0.05)
    finally:
        await engine.dispose()
