"""Dashboard sessions and CSRF protection: what pages and state-changing ``/api`` calls depend on.

A session is a random token in an HttpOnly, SameSite=Lax cookie (Secure when served over https);
the database keeps only its SHA-256 (``web_sessions``), so logging out, deleting the account or
an operator's change ends it on every worker at once.

CSRF uses a signed double-submit token: a random ``dubhe_csrf`` cookie, and a token that is the
HMAC of that cookie under the deployment secret. Forms post it as ``csrf_token``, JavaScript
sends it as ``x-csrf-token``. A page on another site can make the browser send the cookie but
cannot read it or forge its HMAC, and a sibling domain that manages to plant a cookie still cannot
compute the matching token. The same cookie protects the anonymous forms (log-in, sign-up), where
there is no session yet to bind a token to.

    SessionUserDep          the logged-in user; anonymous: HTML pages redirect to /login?next=...,
                            /api answers 401 session_required
    SessionWriterDep        the same, plus the CSRF check, for state-changing session-only calls
    OptionalSessionUserDep  the logged-in user or None (public pages that greet a user)
    csrf_token(request)     the token templates put in forms (sets the cookie when missing)
    require_csrf            the dependency that refuses a state-changing call without it (403)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy import select

from dubhe.accounts.session_tokens import hash_session_token
from dubhe.errors import AuthenticationFailed, DubheError
from dubhe.gateway.asgi import Message, Receive, Scope, Send
from dubhe.models import User, WebSession
from dubhe.models.base import utcnow
from dubhe.web.dependencies import SessionDep

SESSION_COOKIE = "dubhe_session"
CSRF_COOKIE = "dubhe_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
_CSRF_COOKIE_MAX_AGE = 365 * 24 * 3600
_NEW_CSRF_COOKIE = "dubhe_new_csrf_cookie"  # request.state: a cookie value to set on the response
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class SessionUser:
    """Who is logged in to the dashboard, as of this request."""

    id: int
    email: str
    plan_code: str
    is_admin: bool
    session_id: int


class LoginRequired(AuthenticationFailed):
    """No (valid) dashboard session. /api answers 401; an HTML page redirects to log in."""

    def __init__(self, message: str = "This needs a dashboard session: log in at /login. "
                 "API keys cannot do this, so a leaked key cannot.") -> None:
        super().__init__(message, code="session_required")


class CsrfRejected(DubheError):
    status_code = 403
    error_type = "invalid_request_error"

    def __init__(self) -> None:
        super().__init__(
            "The form or request is missing its CSRF token, or the token is stale. Reload the "
            f"page and try again (JavaScript sends it in the {CSRF_HEADER} header).",
            code="csrf_failed", param=CSRF_FIELD,
        )


# -- sessions -------------------------------------------------------------------------------------


def session_expiry(now: datetime, hours: int) -> datetime:
    return now + timedelta(hours=hours)


def is_secure_request(request: Request) -> bool:
    # Behind a TLS-terminating proxy the scheme comes from X-Forwarded-Proto (uvicorn trusts it
    # from the proxies it is told to); public_url covers proxies it was not told about.
    settings = request.app.state.dubhe.settings
    return request.url.scheme == "https" or bool(settings.https)


def set_session_cookie(response: Response, request: Request, token: str, hours: int) -> None:
    response.set_cookie(SESSION_COOKIE, token, max_age=hours * 3600, path="/", httponly=True,
                        secure=is_secure_request(request), samesite="lax")


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True,
                           secure=is_secure_request(request), samesite="lax")


async def load_session_user(request: Request, session: Any) -> SessionUser | None:
    token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > 128:
        return None
    cached = getattr(request.state, "session_user", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    statement = (
        select(WebSession.id, User.id, User.email, User.plan_code, User.is_admin)
        .join(User, User.id == WebSession.user_id)
        .where(WebSession.token_hash == hash_session_token(token),
               WebSession.expires_at > utcnow(),
               User.deleted_at.is_(None),
               User.email_verified_at.is_not(None))
    )
    row = (await session.execute(statement)).first()
    if row is None:
        return None
    user = SessionUser(id=int(row[1]), email=row[2], plan_code=row[3], is_admin=bool(row[4]),
                       session_id=int(row[0]))
    request.state.session_user = user
    return user


async def get_session_user(request: Request, session: SessionDep) -> SessionUser:
    user = await load_session_user(request, session)
    if user is None:
        raise LoginRequired()
    return user


async def get_optional_session_user(request: Request, session: SessionDep) -> SessionUser | None:
    return await load_session_user(request, session)


SessionUserDep = Annotated[SessionUser, Depends(get_session_user)]


async def get_session_writer(request: Request, session: SessionDep) -> SessionUser:
    """The logged-in user, for a state-changing call: session first, so an API key is told it
    needs a session (401) rather than that it lacks a CSRF token; then the token (403)."""
    user = await get_session_user(request, session)
    await require_csrf(request)
    return user


SessionWriterDep = Annotated[SessionUser, Depends(get_session_writer)]
OptionalSessionUserDep = Annotated[SessionUser | None, Depends(get_optional_session_user)]


def wants_html(request: Request) -> bool:
    """Pages are everything outside /api (and the admin's /admin/api); they get redirects and
    pages instead of JSON."""
    return not request.url.path.startswith(("/api", "/admin/api"))


async def login_required_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    if wants_html(request):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)


def safe_next(target: str | None, default: str = "/dashboard/keys") -> str:
    """Only a local path: ``next=https://evil.example`` or ``//evil.example`` must not redirect
    off-site after log-in."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


# -- CSRF -----------------------------------------------------------------------------------------


def _csrf_for(request: Request, cookie_value: str) -> str:
    secret: bytes = request.app.state.dubhe.settings.resolved_secret
    return hmac.new(secret, b"csrf:" + cookie_value.encode(), hashlib.sha256).hexdigest()


def _csrf_cookie(request: Request) -> str | None:
    value = request.cookies.get(CSRF_COOKIE)
    if value and 16 <= len(value) <= 64 and value.isalnum():
        return value
    return None


def csrf_token(request: Request) -> str:
    """The CSRF token for forms and ``<meta name="csrf-token">``. When the browser has no CSRF
    cookie yet, one is made now and set on this response (by ``CsrfCookieMiddleware``)."""
    value = _csrf_cookie(request) or getattr(request.state, _NEW_CSRF_COOKIE, None)
    if value is None:
        value = secrets.token_hex(16)
        setattr(request.state, _NEW_CSRF_COOKIE, value)
    return _csrf_for(request, value)


async def require_csrf(request: Request) -> None:
    """Refuse (403 csrf_failed) a state-changing request whose token does not match its cookie."""
    if request.method in _SAFE_METHODS:
        return
    sent = request.headers.get(CSRF_HEADER)
    if sent is None:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            value = (await request.form()).get(CSRF_FIELD)
            sent = value if isinstance(value, str) else None
    cookie = _csrf_cookie(request)
    if not sent or cookie is None or not hmac.compare_digest(_csrf_for(request, cookie), sent):
        raise CsrfRejected()


CsrfDep = Depends(require_csrf)


class CsrfCookieMiddleware:
    """Pure ASGI: sets the CSRF cookie that ``csrf_token`` made during this request, if any.

    Only the web app is wrapped, never ``/v1``."""

    def __init__(self, app: Any, *, secure: bool) -> None:
        self.app = app
        self.secure = secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                value = scope.get("state", {}).get(_NEW_CSRF_COOKIE)
                if value is not None:
                    secure = self.secure or scope.get("scheme") == "https"
                    cookie = (f"{CSRF_COOKIE}={value}; Max-Age={_CSRF_COOKIE_MAX_AGE}; Path=/; "
                              f"HttpOnly; SameSite=Lax{'; Secure' if secure else ''}")
                    message["headers"] = [*message.get("headers", []),
                                          (b"set-cookie", cookie.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_cookie)


__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "CsrfCookieMiddleware",
    "CsrfDep",
    "CsrfRejected",
    "LoginRequired",
    "OptionalSessionUserDep",
    "SessionUser",
    "SessionUserDep",
    "SessionWriterDep",
    "csrf_token",
    "login_required_response",
    "require_csrf",
    "safe_next",
]
