"""``/api/auth`` and ``/api/account``: sign-up, log-in, log-out, password reset and change,
e-mail verification, account deletion. The JSON twins of the account pages.

Everything here that changes state needs the CSRF token (header ``x-csrf-token``; fetch it with
the cookie from ``GET /api/auth/session``). The account routes need a dashboard session: an API
key cannot change a password or delete an account.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, BackgroundTasks, Request, Response

from dubhe.accounts import service
from dubhe.accounts.mail import MailUnavailable, mail_configured, send_mail
from dubhe.accounts.schemas import (
    Credentials,
    EmailIn,
    MessageOut,
    PasswordChangeIn,
    PasswordIn,
    ResetIn,
    SessionOut,
    SignUpIn,
    SignUpOut,
    TokenIn,
    UserOut,
)
from dubhe.accounts.sessions import (
    CsrfDep,
    SessionUserDep,
    SessionWriterDep,
    clear_session_cookie,
    csrf_token,
    load_session_user,
    set_session_cookie,
)
from dubhe.errors import Forbidden, ServiceUnavailable
from dubhe.models import User
from dubhe.models.base import utcnow
from dubhe.settings import Settings
from dubhe.web.dependencies import SessionDep, StateDep, WebState

log = logging.getLogger(__name__)
router = APIRouter(tags=["accounts"])

RESET_SENT = ("If an account uses that address, we sent it a link to choose a new password. "
              "It works for an hour.")
CHECK_EMAIL = "Check your e-mail: we sent a link to finish signing up."


def client_ip(request: Request) -> str:
    # uvicorn has already replaced this with X-Forwarded-For when the peer is a trusted proxy.
    return request.client.host if request.client else "unknown"


def user_out(user: User) -> UserOut:
    return UserOut(id=user.id, email=user.email, plan=user.plan_code, is_admin=user.is_admin)


async def deliver(settings: Settings, mail: service.Mail) -> None:
    """Send after the response: how long it takes must not tell whether an address exists."""
    if not mail_configured(settings):
        log.warning("no mail sent to a user: DUBHE_SMTP_URL is not set")
        return
    try:
        await send_mail(settings, to=mail.to, subject=mail.subject, body=mail.body)
    except MailUnavailable:
        pass  # logged by send_mail; the user can ask again


# -- shared by the JSON routes and the pages -------------------------------------------------------


async def do_log_in(request: Request, response: Response, state: WebState, email: str,
                    password: str) -> User:
    limits = service.login_limits(state.settings, client_ip(request), email.strip().lower())
    user, token = await service.log_in(state.sessionmaker, email, password, limits=limits,
                                       session_hours=state.settings.session_hours, now=utcnow())
    set_session_cookie(response, request, token, state.settings.session_hours)
    return user


async def log_in_as(request: Request, response: Response, session: SessionDep, state: WebState,
                    user: User) -> None:
    token, _ = await service.open_session(session, user.id, hours=state.settings.session_hours,
                                          now=utcnow())
    set_session_cookie(response, request, token, state.settings.session_hours)


async def do_sign_up(request: Request, response: Response, session: SessionDep, state: WebState,
                     background: BackgroundTasks, body: SignUpIn) -> SignUpOut:
    now = utcnow()
    # Counted first, in a transaction of its own: before this request's touches the database.
    await service.check_and_count(state.sessionmaker,
                                  [service.signup_limit(state.settings, client_ip(request))], now)
    result = await service.sign_up(session, email=body.email, password=body.password,
                                   invite=body.invite, settings=state.settings,
                                   catalog=state.catalog, ip=client_ip(request), now=now)
    if result.mail is not None:
        background.add_task(deliver, state.settings, result.mail)
    if result.user is None:
        return SignUpOut(status="check_email")
    await log_in_as(request, response, session, state, result.user)
    return SignUpOut(status="logged_in", user=user_out(result.user))


async def do_log_out(request: Request, response: Response, session: SessionDep) -> None:
    user = await load_session_user(request, session)
    if user is not None:
        await service.close_session(session, user.session_id, now=utcnow())
    clear_session_cookie(response, request)


async def do_request_reset(request: Request, session: SessionDep, state: WebState,
                           background: BackgroundTasks, email: str) -> None:
    if not mail_configured(state.settings):
        raise ServiceUnavailable("Password reset by e-mail is not set up on this deployment; "
                                 "ask its operator to reset your password.",
                                 code="mail_not_configured")
    now = utcnow()
    await service.check_and_count(state.sessionmaker,
                                  [service.reset_limit(state.settings, client_ip(request))], now)
    mail = await service.request_password_reset(session, email, settings=state.settings, now=now)
    if mail is not None:
        background.add_task(deliver, state.settings, mail)


# -- routes -----------------------------------------------------------------------------------------


@router.get("/auth/session")
async def get_auth_session(request: Request, session: SessionDep, state: StateDep) -> SessionOut:
    user = await load_session_user(request, session)
    return SessionOut(
        authenticated=user is not None,
        user=UserOut(id=user.id, email=user.email, plan=user.plan_code, is_admin=user.is_admin)
        if user else None,
        csrf_token=csrf_token(request),
        signup_mode=state.settings.resolved_signup_mode,
    )


@router.post("/auth/signup", dependencies=[CsrfDep], status_code=201)
async def sign_up(body: SignUpIn, request: Request, response: Response, session: SessionDep,
                  state: StateDep, background: BackgroundTasks) -> SignUpOut:
    return await do_sign_up(request, response, session, state, background, body)


@router.post("/auth/login", dependencies=[CsrfDep])
async def log_in(body: Credentials, request: Request, response: Response,
                 state: StateDep) -> UserOut:
    return user_out(await do_log_in(request, response, state, body.email, body.password))


@router.post("/auth/logout", dependencies=[CsrfDep])
async def log_out(request: Request, response: Response, session: SessionDep) -> MessageOut:
    await do_log_out(request, response, session)
    return MessageOut(message="Logged out.")


@router.post("/auth/verify-email", dependencies=[CsrfDep])
async def verify_email(body: TokenIn, session: SessionDep, state: StateDep) -> MessageOut:
    user = await service.verify_email(session, body.token, secret=state.settings.resolved_secret,
                                      now=utcnow())
    if user is None:
        raise Forbidden("This link is invalid or expired; sign up again for a new one.",
                        code="invalid_verification_link", param="token")
    return MessageOut(message="Your e-mail address is confirmed; log in.")


@router.post("/auth/password-reset", dependencies=[CsrfDep], status_code=202)
async def request_reset(body: EmailIn, request: Request, session: SessionDep, state: StateDep,
                        background: BackgroundTasks) -> MessageOut:
    await do_request_reset(request, session, state, background, body.email)
    return MessageOut(message=RESET_SENT)


@router.post("/auth/password-reset/confirm", dependencies=[CsrfDep])
async def confirm_reset(body: ResetIn, session: SessionDep, state: StateDep) -> MessageOut:
    await service.reset_password(session, body.token, body.password,
                                 secret=state.settings.resolved_secret, now=utcnow())
    return MessageOut(message="Your password is changed; log in with it.")


@router.get("/account/me")
async def who_am_i(user: SessionUserDep) -> UserOut:
    return UserOut(id=user.id, email=user.email, plan=user.plan_code, is_admin=user.is_admin)


@router.post("/account/password")
async def change_password(body: PasswordChangeIn, user: SessionWriterDep,
                          session: SessionDep) -> MessageOut:
    await service.change_password(session, user.id, body.current_password, body.new_password,
                                  keep_session=user.session_id)
    return MessageOut(message="Password changed; other sessions were logged out.")


@router.post("/account/delete")
async def delete_account(body: PasswordIn, request: Request, response: Response,
                         user: SessionWriterDep, session: SessionDep) -> MessageOut:
    await service.delete_account(session, user.id, body.password, now=utcnow())
    clear_session_cookie(response, request)
    return MessageOut(message="Your account is deleted and its keys are revoked.")
