"""Settings from DUBHE_* variables: every value parsed to its type and range, a bad one refused
with a message that names the variable, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from dubhe.settings import ConfigurationError, Secret, Settings, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("DUBHE_"):
            monkeypatch.delenv(name)


def test_values_are_parsed_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUBHE_PORT", " 9001 ")
    monkeypatch.setenv("dubhe_access_log", "Yes")  # any case, as before
    monkeypatch.setenv("DUBHE_DATA_DIR", "/srv/dubhe")
    monkeypatch.setenv("DUBHE_BODY_TIMEOUT_SECONDS", "2.5")
    monkeypatch.setenv("DUBHE_SIGNUP_MODE", "invite")
    monkeypatch.setenv("DUBHE_REDIS_URL", "redis://:hunter2@127.0.0.1:6379/0")
    monkeypatch.setenv("DUBHE_NOT_A_SETTING", "ignored")
    settings = load_settings()
    assert settings.port == 9001 and settings.access_log is True
    assert settings.data_dir == Path("/srv/dubhe")
    assert settings.body_timeout_seconds == 2.5
    assert settings.signup_mode == "invite"
    assert isinstance(settings.redis_url, Secret)
    assert settings.redis_url.get_secret_value() == "redis://:hunter2@127.0.0.1:6379/0"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.redis_url)
    assert settings.session_hours == 24 * 14 and settings.secret_key is None  # defaults


def test_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUBHE_PORT", "9001")
    settings = Settings(port=9002, secret_key="k" * 40)
    assert settings.port == 9002
    assert settings.secret_key == Secret("k" * 40)
    with pytest.raises(TypeError, match="no field"):
        Settings(prot=1)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DUBHE_PORT", "eighty", "DUBHE_PORT must be an integer, not 'eighty'"),
        ("DUBHE_PORT", "80.5", "DUBHE_PORT must be an integer"),
        ("DUBHE_SESSION_HOURS", "0", "DUBHE_SESSION_HOURS must be an integer >= 1, not '0'"),
        ("DUBHE_HELP_CHAT_MAX_MESSAGE_CHARS", "20001", ">= 1 and <= 20000"),
        ("DUBHE_HEADER_TIMEOUT_SECONDS", "0", "must be a number > 0"),
        ("DUBHE_HEADER_TIMEOUT_SECONDS", "nan", "must be a number > 0"),
        ("DUBHE_HEADER_TIMEOUT_SECONDS", "inf", "must be a number > 0"),
        ("DUBHE_ENV", "prod", "DUBHE_ENV must be one of development, production, not 'prod'"),
        ("DUBHE_ACCESS_LOG", "maybe", "DUBHE_ACCESS_LOG must be true or false"),
    ],
)
def test_a_bad_value_names_its_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                        message: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(")):
        load_settings()
