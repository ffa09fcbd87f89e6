"""What of an upstream's error answer may reach a client.

An upstream's error text is written for its operator, not for Dubhe's users: it can name the
upstream's own API key (or its prefix), internal host names, URLs and addresses. Dubhe relays it
only where it tells the user what to fix (the request itself was refused), cut short, with
anything that looks like a secret or an address replaced by ``[redacted]``. The redaction errs
towards removing too much: a dotted word such as ``file.json`` reads like a host name.
"""

from __future__ import annotations

import re

MAX_RELAYED_MESSAGE_CHARS = 500
_REDACTED = "[redacted]"
_PATTERNS = re.compile(
    "|".join(
        (
            # URLs of any scheme, up to whitespace or a closing quote/bracket.
            r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>)\]]+",
            # API keys and tokens: common prefixes, "Bearer x", and long mixed strings.
            r"\b(?:sk|pk|rk|ak|key|api[_-]?key|token|secret)[-_][A-Za-z0-9_*.-]{3,}",
            r"(?i:bearer)\s+\S+",
            r"\b(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{24,}\b",
            # IPv4 (with a port), and IPv6 (two or more groups around a colon pair or 5+ groups).
            r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b",
            r"\b(?:[0-9a-fA-F]{1,4}:){2,7}(?::|[0-9a-fA-F]{1,4})\b",
            r"(?<![\w:])(?:[0-9a-fA-F]{1,4})?::(?:[0-9a-fA-F]{1,4}:?)+",
            # Host names: dotted labels ending in a letter TLD, not part of a longer identifier.
            r"(?<![\w.@-])(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?::\d+)?(?![\w.-])",
        )
    )
)


def redact_upstream_message(message: str) -> str:
    """The upstream's message cut to ``MAX_RELAYED_MESSAGE_CHARS`` with secrets redacted."""
    # Cut generously first, so the regexes never run over a huge message.
    redacted = _PATTERNS.sub(_REDACTED, message[: 4 * MAX_RELAYED_MESSAGE_CHARS])
    if len(redacted) > MAX_RELAYED_MESSAGE_CHARS:
        redacted = redacted[: MAX_RELAYED_MESSAGE_CHARS - 1] + "…"
    return redacted
