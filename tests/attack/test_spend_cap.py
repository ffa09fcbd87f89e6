"""A key's spend cap must never be a promise the meter does not keep. Caps are not enforced yet,
so asking for one is refused, loudly, on every path that could set one (found by the red team: a
key "capped" at $0.0002 kept spending). The API's refusal is in tests/web/test_accounts_api.py."""

from __future__ import annotations

import secrets

from tests.billing.conftest import Billing


def test_the_cli_has_no_cap_to_promise(honest: Billing) -> None:
    email = f"capped-{secrets.token_hex(4)}@example.com"
    honest.server.cli("users", "create", email, "--password", "correct-horse-battery",
                      "--plan", "metered")
    refused = honest.server.cli("keys", "create", email, "--spend-cap-usd", "0.0002", check=False)
    assert refused.returncode != 0 and "--spend-cap-usd" in refused.stderr
    assert refused.stdout == ""  # no key was printed, so none exists believing it is capped

