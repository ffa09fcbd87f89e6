"""Signed, expiring tokens for the links Dubhe e-mails: verify an address, reset a password,
and join in sign-up mode ``invite``.

No table: a token is ``base64url(payload).hmac`` under the deployment secret. A reset token also
carries a fingerprint of the password hash it was issued against, so it works once: the new
password changes the hash and every earlier reset link with it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime

PURPOSES = ("verify", "reset", "invite")


@dataclass(frozen=True, slots=True)
class LinkClaim:
    purpose: str
    subject: str  # a user id (verify, reset) or an e-mail (invite)
    fingerprint: str
    expires: int  # epoch seconds


def password_fingerprint(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def _mac(secret: bytes, body: str) -> str:
    return hmac.new(secret, b"link:" + body.encode(), hashlib.sha256).hexdigest()


def sign_link(secret: bytes, claim: LinkClaim) -> str:
    payload = json.dumps([claim.purpose, claim.subject, claim.fingerprint, claim.expires],
                         separators=(",", ":"))
    body = base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")
    return f"{body}.{_mac(secret, body)}"


def read_link(secret: bytes, token: str, purpose: str, now: datetime) -> LinkClaim | None:
    """The claim, if the token is intact, for ``purpose`` and not expired; else None."""
    body, _, mac = token.strip().partition(".")
    if not body or len(token) > 1024 or not hmac.compare_digest(_mac(secret, body), mac):
        return None
    try:
        fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        claim = LinkClaim(purpose=str(fields[0]), subject=str(fields[1]),
                          fingerprint=str(fields[2]), expires=int(fields[3]))
    except (ValueError, IndexError, TypeError):
        return None
    if claim.purpose != purpose or claim.expires < now.timestamp():
        return None
    return claim
