"""Outgoing e-mail (verification and password-reset links) over SMTP, from ``DUBHE_SMTP_URL``.

``smtp://user:password@host:587?starttls=1``, ``smtps://host:465`` or ``smtp://host:25``. The
standard library's client runs in a thread: mail is rare, and a slow mail server must not stall
the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
from email.message import EmailMessage
from urllib.parse import parse_qs, unquote, urlsplit

from dubhe.settings import ConfigurationError, Settings

log = logging.getLogger(__name__)
_TIMEOUT_SECONDS = 15


class MailUnavailable(Exception):
    """The message could not be handed to the mail server."""


def mail_configured(settings: Settings) -> bool:
    return settings.smtp_url is not None and bool(settings.smtp_url.get_secret_value())


def _send(settings: Settings, message: EmailMessage) -> None:
    assert settings.smtp_url is not None
    url = urlsplit(settings.smtp_url.get_secret_value())
    if url.scheme not in ("smtp", "smtps") or not url.hostname:
        raise ConfigurationError("DUBHE_SMTP_URL must look like smtp://user:pass@host:587")
    port = url.port or (465 if url.scheme == "smtps" else 25)
    client: smtplib.SMTP
    if url.scheme == "smtps":
        client = smtplib.SMTP_SSL(url.hostname, port, timeout=_TIMEOUT_SECONDS)
    else:
        client = smtplib.SMTP(url.hostname, port, timeout=_TIMEOUT_SECONDS)
    with client:
        if url.scheme == "smtp" and parse_qs(url.query).get("starttls") == ["1"]:
            client.starttls()
        if url.username:
            client.login(unquote(url.username), unquote(url.password or ""))
        client.send_message(message)


async def send_mail(settings: Settings, *, to: str, subject: str, body: str) -> None:
    message = EmailMessage()
    message["From"] = settings.smtp_from
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    try:
        await asyncio.to_thread(_send, settings, message)
    except (OSError, smtplib.SMTPException) as exc:
        log.warning("sending mail to the SMTP server failed: %s", exc)
        raise MailUnavailable(str(exc)) from exc
