"""The operator CLI's contract: exact forms, one-line errors, nothing half-written."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

DUBHE = str(Path(sys.executable).parent / "dubhe")


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DUBHE_DATA_DIR": str(tmp_path), "DUBHE_CONFIG": str(tmp_path / "none.toml")}
    env.pop("DUBHE_DATABASE_URL", None)
    return subprocess.run([DUBHE, *args], env=env, capture_output=True, text=True, timeout=60)


def test_users_and_keys(tmp_path: Path) -> None:
    created = run(tmp_path, "users", "create", "Ada@Example.com", "--password", "longenough", "--plan", "pro")
    assert created.returncode == 0, created.stderr
    key = run(tmp_path, "keys", "create", "ada@example.com", "--name", "laptop")
    assert key.returncode == 0
    assert key.stdout.startswith("sk-dubhe-") and key.stdout.count("\n") == 1  # the key, alone
    with sqlite3.connect(tmp_path / "dubhe.db") as db:
        (email, plan, password_hash), = db.execute("SELECT email, plan_code, password_hash FROM users")
        (name, stored_hash, prefix), = db.execute("SELECT name, key_hash, prefix FROM api_keys")
    assert (email, plan, name) == ("ada@example.com", "pro", "laptop")
    assert password_hash.startswith("$argon2id$")
    assert key.stdout.strip() not in stored_hash and len(stored_hash) == 64
    assert key.stdout.startswith(prefix.rstrip("…"))


def test_bad_input_is_one_line_and_non_zero(tmp_path: Path) -> None:
    cases = [
        ("users", "create", "not-an-email", "--password", "longenough"),
        ("users", "create", "a@example.com", "--password", "short"),
        ("users", "create", "a@example.com", "--password", "longenough", "--plan", "platinum"),
        ("keys", "create", "nobody@example.com"),
        ("users", "create", "a@example.com"),
        ("serve", "--workers", "0"),
        ("frobnicate",),
    ]
    for args in cases:
        result = run(tmp_path, *args)
        assert result.returncode != 0, args
        assert result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert "error" in result.stderr
    # None of the failed commands wrote a user.
    with sqlite3.connect(tmp_path / "dubhe.db") as db:
        assert db.execute("SELECT count(*) FROM users").fetchone() == (0,)


def test_duplicate_user_is_refused(tmp_path: Path) -> None:
    assert run(tmp_path, "users", "create", "b@example.com", "--password", "longenough").returncode == 0
    again = run(tmp_path, "users", "create", "B@example.com", "--password", "longenough")
    assert again.returncode == 1 and "already exists" in again.stderr


def test_production_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    env = {**os.environ, "DUBHE_DATA_DIR": str(tmp_path), "DUBHE_ENV": "production"}
    env.pop("DUBHE_SECRET_KEY", None)
    result = subprocess.run([DUBHE, "serve", "--port", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "DUBHE_SECRET_KEY is required" in result.stderr
