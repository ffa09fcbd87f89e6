"""The account pages: /signup, /login, /logout, password reset, e-mail verification and
/dashboard/account. Plain HTML forms (they work without JavaScript), each posting its CSRF token;
each action is the same code as its JSON twin in ``accounts.endpoints``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from dubhe.accounts import service
from dubhe.accounts.endpoints import (
    CHECK_EMAIL,
    RESET_SENT,
    do_log_in,
    do_log_out,
    do_request_reset,
    do_sign_up,
)
from dubhe.accounts.passwords import MIN_PASSWORD_LENGTH
from dubhe.accounts.schemas import SignUpIn
from dubhe.accounts.sessions import (
    CsrfDep,
    OptionalSessionUserDep,
    SessionUserDep,
    SessionWriterDep,
    clear_session_cookie,
    safe_next,
)
from dubhe.dashboard import render
from dubhe.errors import DubheError
from dubhe.models.base import utcnow
from dubhe.web.dependencies import SessionDep, StateDep

router = APIRouter(include_in_schema=False)

FormText = Annotated[str, Form(max_length=1024)]


def _redirect(to: str) -> RedirectResponse:
    return RedirectResponse(to, status_code=303)


@router.get("/signup", response_class=HTMLResponse)
async def signup_page(request: Request, user: OptionalSessionUserDep, state: StateDep,
                      invite: str = "", email: str = "") -> Response:
    if user is not None:
        return _redirect("/dashboard/keys")
    return _signup(request, state, invite=invite[:1024], email=email[:320])


def _signup(request: Request, state: StateDep, *, status_code: int = 200, **context: object) -> HTMLResponse:
    context.setdefault("invite", "")
    context.setdefault("email", "")
    context.setdefault("sent", False)
    plan = state.catalog.plans[state.catalog.default_plan]
    return render(request, "accounts/signup.html", status_code=status_code, title="Sign up",
                  mode=state.settings.resolved_signup_mode, default_plan=plan.name,
                  min_password=MIN_PASSWORD_LENGTH, **context)


@router.post("/signup", response_class=HTMLResponse, dependencies=[CsrfDep])
async def signup_submit(request: Request, session: SessionDep, state: StateDep,
                        background: BackgroundTasks, email: FormText, password: FormText,
                        invite: Annotated[str, Form(max_length=1024)] = "") -> Response:
    response = _redirect("/dashboard/keys")
    try:
        result = await do_sign_up(request, response, session, state, background,
                                  SignUpIn(email=email[:320], password=password,
                                           invite=invite or None))
    except DubheError as exc:
        return _signup(request, state, status_code=exc.status_code, error=exc.message,
                       email=email[:320], invite=invite)
    if result.status == "check_email":
        page = _signup(request, state, sent=True, notice=CHECK_EMAIL)
        page.background = background
        return page
    return response


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, user: OptionalSessionUserDep, next: str = "") -> Response:
    if user is not None:
        return _redirect(safe_next(next))
    return render(request, "accounts/login.html", title="Log in", next=safe_next(next), email="")


@router.post("/login", response_class=HTMLResponse, dependencies=[CsrfDep])
async def login_submit(request: Request, state: StateDep, email: FormText, password: FormText,
                       next: Annotated[str, Form(max_length=2048)] = "") -> Response:
    response = _redirect(safe_next(next))
    try:
        await do_log_in(request, response, state, email, password)
    except DubheError as exc:
        return render(request, "accounts/login.html", status_code=exc.status_code, title="Log in",
                      error=exc.message, next=safe_next(next), email=email[:320])
    return response


@router.post("/logout", dependencies=[CsrfDep])
async def logout_submit(request: Request, session: SessionDep) -> Response:
    response = _redirect("/")
    await do_log_out(request, response, session)
    return response


@router.get("/forgot-password", response_class=HTMLResponse)
async def forgot_page(request: Request) -> Response:
    return render(request, "accounts/forgot_password.html", title="Reset your password")


@router.post("/forgot-password", response_class=HTMLResponse, dependencies=[CsrfDep])
async def forgot_submit(request: Request, session: SessionDep, state: StateDep,
                        background: BackgroundTasks, email: FormText) -> Response:
    try:
        await do_request_reset(request, session, state, background, email)
    except DubheError as exc:
        return render(request, "accounts/forgot_password.html", status_code=exc.status_code,
                      title="Reset your password", error=exc.message)
    page = render(request, "accounts/forgot_password.html", title="Reset your password",
                  notice=RESET_SENT)
    page.background = background
    return page


@router.get("/reset-password", response_class=HTMLResponse)
async def reset_page(request: Request, token: str = "") -> Response:
    return render(request, "accounts/reset_password.html", title="Choose a new password",
                  token=token[:1024], done=False, min_password=MIN_PASSWORD_LENGTH)


@router.post("/reset-password", response_class=HTMLResponse, dependencies=[CsrfDep])
async def reset_submit(request: Request, session: SessionDep, state: StateDep, token: FormText,
                       password: FormText) -> Response:
    try:
        await service.reset_password(session, token, password,
                                     secret=state.settings.resolved_secret, now=utcnow())
    except DubheError as exc:
        return render(request, "accounts/reset_password.html", status_code=exc.status_code,
                      title="Choose a new password", error=exc.message, token=token, done=False,
                      min_password=MIN_PASSWORD_LENGTH)
    return render(request, "accounts/reset_password.html", title="Password changed",
                  notice="Your password is changed.", token="", done=True,
                  min_password=MIN_PASSWORD_LENGTH)


@router.get("/verify-email", response_class=HTMLResponse)
async def verify_page(request: Request, session: SessionDep, state: StateDep,
                      token: str = "") -> Response:
    # A GET that writes, deliberately: it is what a link in an e-mail can do. It is idempotent
    # and needs the signed token, so a cross-site request can do nothing with it.
    user = await service.verify_email(session, token[:1024],
                                      secret=state.settings.resolved_secret, now=utcnow())
    return render(request, "accounts/verify_email.html", title="Confirm your e-mail address",
                  status_code=200 if user else 400, verified=user is not None,
                  notice="Your e-mail address is confirmed." if user else None)


@router.get("/dashboard/account", response_class=HTMLResponse)
async def account_page(request: Request, user: SessionUserDep) -> Response:
    return _account(request, user)


def _account(request: Request, user: SessionUserDep, *, status_code: int = 200,
             **context: object) -> HTMLResponse:
    return render(request, "accounts/account.html", status_code=status_code, title="Account",
                  user=user, min_password=MIN_PASSWORD_LENGTH, **context)


@router.post("/dashboard/account/password", response_class=HTMLResponse)
async def password_submit(request: Request, user: SessionWriterDep, session: SessionDep,
                          current_password: FormText, new_password: FormText) -> Response:
    try:
        await service.change_password(session, user.id, current_password, new_password,
                                      keep_session=user.session_id)
    except DubheError as exc:
        return _account(request, user, status_code=exc.status_code, error=exc.message)
    return _account(request, user, notice="Password changed; your other sessions are logged out.")


@router.post("/dashboard/account/delete")
async def delete_submit(request: Request, user: SessionWriterDep, session: SessionDep,
                        password: FormText) -> Response:
    try:
        await service.delete_account(session, user.id, password, now=utcnow())
    except DubheError as exc:
        return _account(request, user, status_code=exc.status_code, error=exc.message)
    response = render(request, "accounts/deleted.html", title="Account deleted",
                      notice="Your account is deleted and its keys are revoked.")
    clear_session_cookie(response, request)
    return response
