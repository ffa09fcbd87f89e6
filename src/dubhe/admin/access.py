"""Who may use the console: an admin's dashboard session, checked on every route.

Anonymous: pages redirect to /login, /admin/api answers 401. A signed-in user who is not an
admin: 403 everywhere. API keys never reach the console (a leaked key must not run it), and every
state-changing call needs the session's CSRF token.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from dubhe.accounts.sessions import LoginRequired, SessionUser, load_session_user, require_csrf
from dubhe.errors import Forbidden
from dubhe.web.dependencies import SessionDep


async def get_admin(request: Request, session: SessionDep) -> SessionUser:
    user = await load_session_user(request, session)
    if user is None:
        raise LoginRequired("The admin console needs an admin's dashboard session: log in at "
                            "/login. API keys cannot use it.")
    if not user.is_admin:
        raise Forbidden("This needs an admin account.", code="admin_required")
    await require_csrf(request)  # a no-op on reads
    return user


AdminDep = Annotated[SessionUser, Depends(get_admin)]
