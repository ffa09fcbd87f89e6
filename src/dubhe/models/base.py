from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime, Integer, MetaData, TypeDecorator
from sqlalchemy.orm import DeclarativeBase

# Stable constraint names, so Alembic migrations name the same things on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both databases (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


# SQLite only makes INTEGER PRIMARY KEY an alias of the rowid; BIGINT keeps PostgreSQL wide.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class _SecondText:
    """A UTC datetime as text, the part up to the second formatted once per second: every
    request settled within one second shares it, and what is left is the microseconds (half of
    ``isoformat``'s cost here, where each settlement formats its time twice)."""

    __slots__ = ("_cached", "_separator", "_suffix", "_always_micro")

    def __init__(self, separator: str, suffix: str, always_micro: bool) -> None:
        # (the second's fields, their text): one attribute, so a reader never pairs one
        # second's fields with another's text.
        self._cached: tuple[tuple[int, ...], str] = ((), "")
        self._separator = separator
        self._suffix = suffix
        self._always_micro = always_micro

    def __call__(self, moment: datetime) -> str:
        if moment.tzinfo is not UTC:
            if moment.tzinfo is None:
                raise ValueError("naive datetime given as UTC")
            moment = moment.astimezone(UTC)
        key = (moment.second, moment.minute, moment.hour, moment.day, moment.month, moment.year)
        cached_key, prefix = self._cached
        if key != cached_key:
            prefix = (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}{self._separator}"
                      f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}")
            self._cached = (key, prefix)
        micro = moment.microsecond
        if micro or self._always_micro:
            return f"{prefix}.{micro:06d}{self._suffix}"
        return prefix + self._suffix


# ``moment.isoformat()`` of a UTC datetime (moved to UTC first if it is in another zone).
utc_isoformat = _SecondText("T", "+00:00", always_micro=False)
# What SQLAlchemy's SQLite DATETIME stores for a UTCDateTime value: naive UTC, microseconds
# always written (``sqlite_datetime_text`` is its bind processor on the bulk-insert path).
sqlite_datetime_text = _SecondText(" ", "", always_micro=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
