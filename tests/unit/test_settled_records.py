"""The cheap paths a settlement takes on its way to the database give what the general ones
would: the cached time formats equal ``isoformat`` and SQLAlchemy's SQLite DATETIME text, and
``record_problem``'s one-pass check accepts exactly the records its full check accepts."""

from __future__ import annotations

import enum
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy.dialects import sqlite

from dubhe.billing import spool
from dubhe.billing.spool import record_problem
from dubhe.models.base import UTCDateTime, sqlite_datetime_text, utc_isoformat

_INDIA = timezone(timedelta(hours=5, minutes=30))
MOMENTS = [
    datetime(2026, 12, 3, 13, 17, 50, 865194, tzinfo=UTC),
    datetime(2026, 12, 3, 13, 17, 50, 1, tzinfo=UTC),  # the same second again, cached
    datetime(2026, 12, 3, 13, 17, 51, tzinfo=UTC),  # no microseconds: isoformat drops them
    datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=_INDIA),  # another zone: moved to UTC
    datetime(1999, 1, 1, 0, 0, 0, 5, tzinfo=_INDIA),
    datetime(2027, 1, 1, 0, 0, 0, 5, tzinfo=UTC),  # same second fields as the one above, in UTC
    datetime(999, 3, 4, 5, 6, 7, 8, tzinfo=UTC),  # a year of three digits is written with four
]


def test_times_are_written_as_the_general_formatters_write_them() -> None:
    dialect = sqlite.dialect()
    bind = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    processed = UTCDateTime().process_bind_param
    for moment in MOMENTS:
        assert utc_isoformat(moment) == moment.astimezone(UTC).isoformat()
        assert sqlite_datetime_text(moment) == bind(processed(moment, dialect))
    with pytest.raises(ValueError, match="naive"):
        sqlite_datetime_text(datetime(2026, 1, 1))


def _record(**changes: Any) -> dict[str, Any]:
    record = {
        "request_id": "req_0123456789abcdef01234567", "user_id": 5, "api_key_id": 7,
        "lease_id": 12, "model": "dubhe-fast", "upstream": "fast-1", "stream": False,
        "prompt_tokens": 25, "completion_tokens": 10, "usage_source": "upstream",
        "outcome": "ok", "status_code": 200, "latency_ms": 3,
        "created_at": "2026-12-03T13:17:50.865194+00:00", "tokens_used": 35, "uusd_used": 0,
    }
    record.update(changes)
    return record


class _Count(enum.IntEnum):
    TEN = 10


_MISSING = object()
# (field, value): each makes a record the full check refuses.
BAD = [
    ("user_id", -1), ("user_id", 1.0), ("user_id", True), ("user_id", "5"), ("user_id", None),
    ("user_id", 2**62 + 1), ("user_id", _MISSING), ("api_key_id", -3), ("api_key_id", _MISSING),
    ("prompt_tokens", 2**31), ("completion_tokens", 10.5), ("latency_ms", None),
    ("status_code", 1000), ("request_id", ""), ("request_id", "x" * 65), ("request_id", None),
    ("request_id", 5), ("model", "gpt-4"), ("model", None), ("upstream", ""),
    ("upstream", ["a"]), ("stream", 0), ("stream", None), ("stream", _MISSING),
    ("usage_source", "guessed"), ("outcome", ""), ("created_at", "yesterday"),
    ("created_at", "2026-12-03T13:17:50"), ("created_at", 1700000000), ("tokens_used", 36),
    ("uusd_used", -1),
]
GOOD = [("api_key_id", None), ("upstream", None), ("completion_tokens", _Count.TEN),
        ("stream", True), ("usage_source", "estimated"), ("tokens_used", 0)]


def _with(field: str, value: object) -> dict[str, Any]:
    record = _record()
    if value is _MISSING:
        del record[field]
    else:
        record[field] = value
    return record


@pytest.mark.parametrize(("field", "value"), BAD)
def test_a_bad_field_is_refused_with_its_reason(field: str, value: object) -> None:
    problem = record_problem(_with(field, value), {"dubhe-fast": object()})
    assert problem is not None
    assert field in problem or "included tokens" in problem


@pytest.mark.parametrize(("field", "value"), GOOD)
def test_what_the_full_check_accepts_is_accepted(field: str, value: object) -> None:
    assert record_problem(_with(field, value), {"dubhe-fast": object()}) is None


def test_the_one_pass_check_never_accepts_what_the_full_check_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    models = {"dubhe-fast": object()}
    cases = [_record(), *(_with(f, v) for f, v in BAD + GOOD), [], "record", None]
    fast = [spool._sound(case, models) for case in cases]
    monkeypatch.setattr(spool, "_sound", lambda record, models: False)
    full = [record_problem(case, models) is None for case in cases]
    assert fast[0] and full[0]
    # The one pass may send a sound record to the full check (an int subclass), never the reverse.
    assert all(full_ok or not fast_ok for fast_ok, full_ok in zip(fast, full, strict=True))
    assert fast.count(True) >= len(GOOD)  # and it is the path sound records take
