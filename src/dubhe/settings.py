"""Process-wide settings: environment variables with the ``DUBHE_`` prefix.

The catalog (models, plans, prices, limits, upstreams) is data, loaded from TOML by
:mod:`dubhe.catalog`; this module only holds what differs per deployment.
"""

from __future__ import annotations

import math
import os
import secrets
import typing
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar

_T = TypeVar("_T")


class ConfigurationError(Exception):
    """The deployment's configuration cannot be used; the message says what to fix."""


class Secret:
    """A setting that must never reach a log or a traceback: its repr is masked."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _bounded(default: _T, *, ge: float | None = None, gt: float | None = None,
             le: float | None = None) -> _T:
    """A numeric field's default and the range its value must fall in."""
    bounds = {"ge": ge, "gt": gt, "le": le}
    metadata = {key: value for key, value in bounds.items() if value is not None}
    default_and_bounds: _T = field(default=default, metadata=metadata)
    return default_and_bounds


@dataclass(init=False, eq=False)
class Settings:
    """Every field from ``DUBHE_<FIELD>`` (any case), unless given as an argument. A plain
    dataclass that parses its own strings rather than a pydantic model: every CLI call and
    worker starts ~0.1 s sooner without importing pydantic (the web app still uses it, loaded
    on first use)."""

    def __init__(self, **values: Any) -> None:
        known = _fields()
        unknown = set(values) - set(known)
        if unknown:
            raise TypeError(f"Settings has no field {', '.join(sorted(unknown))}")
        given = {**_environment(), **values}
        for name, spec in known.items():
            if name in given:
                value = _parse(name, spec, given[name])
            else:
                value = spec.default
            setattr(self, name, value)

    env: Literal["development", "production"] = "development"
    data_dir: Path = Path("data")
    database_url: str | None = None
    config: Path = Path("dubhe.toml")
    # Keys API keys' HMAC and the dashboard's sessions. Generated once per data directory in
    # development; required in production.
    secret_key: Secret | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    # Where users reach this deployment; Stripe Checkout sends them back under it.
    public_url: str = "http://127.0.0.1:8000"
    # Card payments through Stripe Checkout: off until both are set.
    stripe_secret_key: Secret | None = None
    stripe_webhook_secret: Secret | None = None
    # Only to point the stripe package at a stand-in server (tests, stripe-mock).
    stripe_api_base: str | None = None
    # Outgoing mail (verification and password reset): smtp://user:pass@host:port, or smtps://
    # for TLS from the start; "?starttls=1" upgrades a plain connection.
    smtp_url: Secret | None = None
    smtp_from: str = "Dubhe <no-reply@localhost>"
    # Who may create an account: open | email-verified | invite | closed. Unset: email-verified
    # when mail can be sent, else open (with the per-address limit below).
    signup_mode: Literal["open", "email-verified", "invite", "closed"] | None = None
    # The first admin, created at start when no admin exists (nothing is created otherwise).
    admin_email: str | None = None
    admin_password: Secret | None = None
    # Dashboard sessions and the limits on guessing and on scripted sign-ups. Attempts are rows
    # in the database, so every worker and instance counts the same ones.
    session_hours: int = _bounded(24 * 14, ge=1)
    login_failures_per_ip: int = _bounded(20, ge=1)
    login_failures_per_account: int = _bounded(10, ge=1)
    login_window_minutes: int = _bounded(15, ge=1)
    signups_per_ip_per_hour: int = _bounded(10, ge=1)
    # In "open" mode, accounts one address may create per day (each gets the default plan's
    # included tokens, so this bounds farming them).
    accounts_per_ip_per_day: int = _bounded(3, ge=1)
    reset_requests_per_ip_per_hour: int = _bounded(10, ge=1)
    # The help chat (dubhe.helpchat): how long a message may be, and how many a visitor may send,
    # so it cannot be used as a spam channel.
    help_chat_max_message_chars: int = _bounded(2000, ge=1, le=20_000)
    help_chat_messages_per_minute: int = _bounded(6, ge=1)
    help_chat_messages_per_ip_per_hour: int = _bounded(60, ge=1)
    # Optional, off by default: a Dubhe model drafts the first answer of each conversation,
    # marked as automatic. It calls this deployment's own /v1 (the real gateway path: admission,
    # limits and billing) with an API key of the operator's support account, which pays for it;
    # each conversation gets one draft, of at most this many tokens.
    help_chat_assistant_model: str | None = None
    help_chat_assistant_api_key: Secret | None = None
    help_chat_assistant_max_tokens: int = _bounded(300, ge=16, le=4096)

    @property
    def resolved_signup_mode(self) -> str:
        if self.signup_mode is not None:
            return self.signup_mode
        return "email-verified" if self.smtp_url is not None else "open"

    @property
    def https(self) -> bool:
        return self.public_url.startswith("https://")

    # Connection limits, per worker (enforced by dubhe.server's protocol; see README, Limits).
    max_header_bytes: int = _bounded(32_768, ge=1024)
    max_header_count: int = _bounded(100, ge=8)
    header_timeout_seconds: float = _bounded(10.0, gt=0)
    body_timeout_seconds: float = _bounded(30.0, gt=0)
    keepalive_timeout_seconds: int = _bounded(30, ge=1)
    max_connections: int = _bounded(2048, ge=1)
    # Bodies outside /v1 (whose limit is the catalog's max_request_bytes): /api routes, and the
    # Stripe webhook, which is read before its signature can be checked.
    api_max_body_bytes: int = _bounded(65_536, ge=1024)
    webhook_max_body_bytes: int = _bounded(262_144, ge=1024)
    # Requests that fail authentication, per client address: a sustained rate and a burst.
    unauthenticated_per_minute: int = _bounded(600, ge=1)
    unauthenticated_burst: int = _bounded(100, ge=1)
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
    ws_ping_interval_seconds: float = _bounded(20.0, gt=0)
    ws_ping_timeout_seconds: float = _bounded(20.0, gt=0)
    ws_idle_timeout_seconds: float = _bounded(300.0, gt=0)
    ws_max_concurrent: int = _bounded(4, ge=1)
    ws_max_queued: int = _bounded(16, ge=0)
    ws_messages_per_second: float = _bounded(10.0, gt=0)
    ws_message_burst: int = _bounded(50, ge=1)
    # Open WebSockets one API key may hold on one worker (more: HTTP 429 before the upgrade).
    ws_max_sockets_per_key: int = _bounded(32, ge=1)
    # Redis (redis://host:6379/0): plan rate limits shared by every worker and instance, and
    # changes pushed to every worker. Unset: limits are kept per worker process.
    redis_url: Secret | None = None
    # Prefix of every Redis key Dubhe writes (several deployments may share one Redis).
    redis_prefix: str = "dubhe:"
    # While Redis is unreachable: "open" limits each worker on its own counts; "closed" refuses
    # /v1 requests with 503 rate_limiter_unavailable.
    redis_failure_policy: Literal["open", "closed"] = "open"
    # One JSON line per /v1 request on the "dubhe.access" logger (at info): ids, key prefix,
    # model, upstream, status, tokens, cost, latency; never a key or a prompt.
    access_log: bool = False
    # On SIGTERM: how long requests in flight (streams included) may take to finish.
    shutdown_grace_seconds: int = _bounded(30, ge=1)

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
    known = _fields()
    found: dict[str, str] = {}
    for name, value in os.environ.items():
        if name.upper().startswith(_PREFIX):
            setting = name[len(_PREFIX):].lower()
            if setting in known:
                found[setting] = value
    return found


@dataclass(frozen=True)
class _Field:
    default: Any
    kind: Any  # the annotation, resolved: str, int, float, bool, Path, Secret or a Literal
    optional: bool
    bounds: dict[str, float]


_FIELDS: dict[str, _Field] = {}


def _fields() -> dict[str, _Field]:
    if not _FIELDS:
        hints = typing.get_type_hints(Settings)
        for spec in fields(Settings):
            kind = hints[spec.name]
            arguments = typing.get_args(kind)
            optional = type(None) in arguments and typing.get_origin(kind) is not Literal
            if optional:
                (kind,) = (a for a in arguments if a is not type(None))
            _FIELDS[spec.name] = _Field(spec.default, kind, optional, dict(spec.metadata))
    return _FIELDS


_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


def _parse(name: str, spec: _Field, raw: Any) -> Any:
    """``raw`` (a string from the environment, or a value given in code) as the field's type,
    or a ConfigurationError that names the variable and says what it must be."""
    where = f"{_PREFIX}{name.upper()}"
    if raw is None and spec.optional:
        return None
    kind = spec.kind
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if raw in choices:
            return raw
        if raw == "" and spec.optional:
            return None
        raise ConfigurationError(f"{where} must be one of {', '.join(choices)}, not {raw!r}")
    if kind is Secret:
        if isinstance(raw, Secret):
            return raw
        if isinstance(raw, str):
            return Secret(raw)
        raise ConfigurationError(f"{where} must be a string")
    if kind is str:
        if isinstance(raw, str):
            return raw
        raise ConfigurationError(f"{where} must be a string")
    if kind is Path:
        if isinstance(raw, (str, Path)):
            return Path(raw)
        raise ConfigurationError(f"{where} must be a path")
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ConfigurationError(f"{where} must be true or false, not {raw!r}")
    value = _number(kind, raw)
    if value is None:
        raise ConfigurationError(f"{where} must be {_describe(kind, spec.bounds)}, not {raw!r}")
    bounds = spec.bounds
    if (
        ("ge" in bounds and not value >= bounds["ge"])
        or ("gt" in bounds and not value > bounds["gt"])
        or ("le" in bounds and not value <= bounds["le"])
    ):
        raise ConfigurationError(f"{where} must be {_describe(kind, bounds)}, not {raw!r}")
    return value


def _number(kind: Any, raw: Any) -> int | float | None:
    if isinstance(raw, bool):
        return None
    if kind is int:
        if isinstance(raw, int):
            return raw
        try:
            return int(raw.strip()) if isinstance(raw, str) else None
        except ValueError:
            return None
    if isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            return None
    else:
        return None
    return value if math.isfinite(value) else None


def _describe(kind: Any, bounds: dict[str, float]) -> str:
    what = "an integer" if kind is int else "a number"
    symbols = (("ge", ">="), ("gt", ">"), ("le", "<="))
    limits = [f"{symbol} {bounds[key]:g}" for key, symbol in symbols if key in bounds]
    return f"{what} {' and '.join(limits)}" if limits else what


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
    """The settings from the environment; a ConfigurationError names the first bad variable."""
    return Settings()
