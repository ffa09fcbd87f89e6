"""What the account routes take and return."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class Credentials(BaseModel):
    email: str = Field(max_length=320)
    password: str = Field(max_length=1024)


class SignUpIn(Credentials):
    invite: str | None = Field(default=None, max_length=1024)


class EmailIn(BaseModel):
    email: str = Field(max_length=320)


class ResetIn(BaseModel):
    token: str = Field(max_length=1024)
    password: str = Field(max_length=1024)


class TokenIn(BaseModel):
    token: str = Field(max_length=1024)


class PasswordChangeIn(BaseModel):
    current_password: str = Field(max_length=1024)
    new_password: str = Field(max_length=1024)


class PasswordIn(BaseModel):
    password: str = Field(max_length=1024)


class UserOut(BaseModel):
    id: int
    email: str
    plan: str
    is_admin: bool


class SessionOut(BaseModel):
    """``GET /api/auth/session``: who is logged in, and the CSRF token scripts send as
    ``x-csrf-token`` (it matches the ``dubhe_csrf`` cookie set alongside)."""

    authenticated: bool
    user: UserOut | None
    csrf_token: str
    signup_mode: str


class SignUpOut(BaseModel):
    # "logged_in": the account exists and this response set the session cookie;
    # "check_email": follow the link we e-mailed (sent whether or not the address was new).
    status: str
    user: UserOut | None = None


class MessageOut(BaseModel):
    message: str


class SessionInfo(BaseModel):
    created_at: datetime
    expires_at: datetime
