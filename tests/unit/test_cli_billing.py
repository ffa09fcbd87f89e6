"""The operator CLI's billing commands: exact forms, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

DUBHE = str(Path(sys.executable).parent / "dubhe")
COUNTERS = ("tokens_available", "tokens_reserved", "balance_uusd", "balance_reserved_uusd", "uncollected_uusd")


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DUBHE_DATA_DIR": str(tmp_path), "DUBHE_CONFIG": str(tmp_path / "none.toml")}
    env.pop("DUBHE_DATABASE_URL", None)
    return subprocess.run([DUBHE, *args], env=env, capture_output=True, text=True, timeout=60)


def ok(tmp_path: Path, *args: str) -> str:
    result = run(tmp_path, *args)
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout


def ledger_matches(tmp_path: Path, email: str) -> dict[str, int]:
    with sqlite3.connect(tmp_path / "dubhe.db") as db:
        (user_id,), = db.execute("SELECT id FROM users WHERE email = ?", (email,))
        account = db.execute(f"SELECT {', '.join(COUNTERS)} FROM accounts WHERE user_id = ?", (user_id,)).fetchone()
        sums = ", ".join(f"COALESCE(SUM({name}), 0)" for name in COUNTERS)
        ledger = db.execute(f"SELECT {sums} FROM ledger_entries WHERE user_id = ?", (user_id,)).fetchone()
    assert account == ledger
    return dict(zip(COUNTERS, account, strict=False))


def test_show_balance_add_and_plan_changes(tmp_path: Path) -> None:
    ok(tmp_path, "users", "create", "ada@example.com", "--password", "longenough", "--plan", "starter")
    shown = json.loads(ok(tmp_path, "users", "show", "Ada@Example.com"))
    assert shown["email"] == "ada@example.com" and shown["plan"] == "starter"
    assert shown["next_plan"] is None
    assert shown["tokens_remaining"] == 1_000_000 and shown["tokens_reserved"] == 0
    assert shown["balance_usd"] == shown["balance_reserved_usd"] == shown["uncollected_usd"] == "0.000000"
    for name in ("period_start", "period_end"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)", shown[name]), shown[name]

    assert ok(tmp_path, "balance", "add", "ada@example.com", "12.5") == ""
    assert ok(tmp_path, "balance", "add", "ada@example.com", "0.000001") == ""
    assert json.loads(ok(tmp_path, "users", "show", "ada@example.com"))["balance_usd"] == "12.500001"
    assert ledger_matches(tmp_path, "ada@example.com")["balance_uusd"] == 12_500_001
    with sqlite3.connect(tmp_path / "dubhe.db") as db:
        refs = [ref for (ref,) in db.execute("SELECT ref FROM ledger_entries WHERE kind = 'credit'")]
    assert len(refs) == 2 and len(set(refs)) == 2  # each admin credit is its own event

    ok(tmp_path, "users", "plan", "ada@example.com", "pro")  # an upgrade: now
    upgraded = json.loads(ok(tmp_path, "users", "show", "ada@example.com"))
    assert (upgraded["plan"], upgraded["next_plan"]) == ("pro", None)
    assert upgraded["tokens_remaining"] == 10_000_000
    assert upgraded["balance_usd"] == "12.500001"  # an operator's plan change is free
    assert upgraded["period_start"] > shown["period_start"]

    ok(tmp_path, "users", "plan", "ada@example.com", "free")  # a downgrade: at period end
    downgraded = json.loads(ok(tmp_path, "users", "show", "ada@example.com"))
    assert (downgraded["plan"], downgraded["next_plan"]) == ("pro", "free")
    assert downgraded["period_start"] == upgraded["period_start"]
    assert downgraded["tokens_remaining"] == 10_000_000
    with sqlite3.connect(tmp_path / "dubhe.db") as db:
        assert db.execute("SELECT plan_code FROM users").fetchone() == ("pro",)
    ledger_matches(tmp_path, "ada@example.com")


def test_codes_create_and_redeem(tmp_path: Path) -> None:
    ok(tmp_path, "users", "create", "bo@example.com", "--password", "longenough")
    codes = ok(tmp_path, "codes", "create", "--usd", "5", "--count", "2").splitlines()
    assert len(codes) == 2 and all(re.fullmatch(r"DUBHE(-[A-HJ-NP-Z2-9]{4}){4}", code) for code in codes)
    assert ok(tmp_path, "codes", "redeem", "bo@example.com", codes[0]) == ""
    again = run(tmp_path, "codes", "redeem", "bo@example.com", codes[0])
    assert again.returncode == 1 and "already been redeemed" in again.stderr
    assert json.loads(ok(tmp_path, "users", "show", "bo@example.com"))["balance_usd"] == "5.000000"
    with sqlite3.connect(tmp_path / "dubhe.db") as db:
        stored = {hash_ for (hash_,) in db.execute("SELECT code_hash FROM redemption_codes")}
    assert len(stored) == 2 and not stored & set(codes)
    ledger_matches(tmp_path, "bo@example.com")


def test_bad_input_is_one_line_and_non_zero_and_writes_nothing(tmp_path: Path) -> None:
    ok(tmp_path, "users", "create", "cy@example.com", "--password", "longenough")
    code = ok(tmp_path, "codes", "create", "--usd", "1").strip()
    cases = [
        ("codes", "create", "--usd", "0"),
        ("codes", "create", "--usd", "-3"),
        ("codes", "create", "--usd", "1.0000001"),
        ("codes", "create", "--usd", "abc"),
        ("codes", "create", "--usd", "2000000"),
        ("codes", "create", "--usd", "1", "--count", "0"),
        ("codes", "create", "--usd", "1", "--count", "x"),
        ("codes", "create"),
        ("codes", "redeem", "nobody@example.com", code),
        ("codes", "redeem", "cy@example.com", "DUBHE-AAAA-AAAA-AAAA-AAAA"),
        ("balance", "add", "nobody@example.com", "5"),
        ("balance", "add", "cy@example.com", "five"),
        ("users", "plan", "cy@example.com", "platinum"),
        ("users", "show", "nobody@example.com"),
    ]
    for args in cases:
        result = run(tmp_path, *args)
        assert result.returncode != 0, args
        assert result.stdout == "", args
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert "error" in result.stderr
    shown = json.loads(ok(tmp_path, "users", "show", "cy@example.com"))
    assert (shown["plan"], shown["next_plan"], shown["balance_usd"]) == ("free", None, "0.000000")
    with sqlite3.connect(tmp_path / "dubhe.db") as db:
        assert db.execute("SELECT count(*) FROM redemption_codes").fetchone() == (1,)
        assert db.execute("SELECT count(*) FROM redemption_codes WHERE redeemed_at IS NOT NULL").fetchone() == (0,)
    # The code the failed redemption named is still good.
    assert ok(tmp_path, "codes", "redeem", "cy@example.com", code) == ""
    assert ledger_matches(tmp_path, "cy@example.com")["balance_uusd"] == 1_000_000
