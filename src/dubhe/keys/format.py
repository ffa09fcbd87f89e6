"""The API key format: ``sk-dubhe-`` + 32 random base62 characters + a 6-character checksum.

The checksum (CRC32 of the random part) lets the gateway reject a mistyped or made-up key
without touching the cache or the database. Only an HMAC of the full key is ever stored.
"""

from __future__ import annotations

import hmac
import secrets
import zlib

KEY_PREFIX = "sk-dubhe-"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ALPHABET_SET = frozenset(_ALPHABET)
_RANDOM_LENGTH = 32
_CHECKSUM_LENGTH = 6
KEY_LENGTH = len(KEY_PREFIX) + _RANDOM_LENGTH + _CHECKSUM_LENGTH


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def _checksum(random_part: str) -> str:
    return _base62(zlib.crc32(random_part.encode()), _CHECKSUM_LENGTH)


def generate_key() -> str:
    random_part = "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_LENGTH))
    return f"{KEY_PREFIX}{random_part}{_checksum(random_part)}"


def is_well_formed(key: str) -> bool:
    if len(key) != KEY_LENGTH or not key.startswith(KEY_PREFIX):
        return False
    body = key[len(KEY_PREFIX) :]
    if not _ALPHABET_SET.issuperset(body):
        return False
    random_part, checksum = body[:_RANDOM_LENGTH], body[_RANDOM_LENGTH:]
    return hmac.compare_digest(_checksum(random_part), checksum)


def hash_key(secret: bytes, key: str) -> str:
    # hmac.digest: OpenSSL's one-shot HMAC, a third of the cost of an hmac.new object.
    return hmac.digest(secret, key.encode(), "sha256").hex()


def display_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + 4] + "…"
