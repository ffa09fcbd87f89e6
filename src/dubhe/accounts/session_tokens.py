"""Dashboard session tokens: the random token the cookie carries, and the hash the table keeps.

Apart from ``sessions.py`` (which needs FastAPI) so that the account service, which the CLI
imports, starts without loading the web framework.
"""

from __future__ import annotations

import hashlib
import secrets


def new_session_token() -> str:
    return secrets.token_urlsafe(32)


def hash_session_token(token: str) -> str:
    # Only the hash is stored: a leaked sessions table does not log anyone in.
    return hashlib.sha256(token.encode()).hexdigest()
