"""Engines and sessions for SQLite (the embedded default) and PostgreSQL.

SQLite: every transaction begins with ``BEGIN IMMEDIATE``. SQLAlchemy renders nothing for
``FOR UPDATE`` there, and a transaction that reads first and then writes upgrades its lock and
fails with "database is locked" under load; taking the write lock up front serialises writers
instead. WAL lets readers proceed meanwhile.

Reads that only poll (the key cache, the account epochs) use an engine of their own
(``create_read_engine``, ``create_read_sessionmaker``): its own small pool, so a poll never waits
for a connection that writers hold while they queue for SQLite's write lock, and on SQLite its
transactions begin deferred, so they read the last committed state at once instead of queueing
for that lock themselves. On a loaded machine either queue held a key cache's refresh, and so a
revocation, for tens of seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

if TYPE_CHECKING:
    from sqlalchemy.dialects.postgresql import Insert as PostgresInsert
    from sqlalchemy.dialects.sqlite import Insert as SqliteInsert

_READ_ONLY = "dubhe_read_only"


def dialect_insert(session: AsyncSession) -> Callable[[Any], PostgresInsert | SqliteInsert]:
    """The INSERT construct of the session's dialect (for ON CONFLICT clauses). Only that
    dialect's module is imported: the other one costs start-up time for nothing."""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgres_insert

        return postgres_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            from pathlib import Path

            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, **kwargs)
        _make_sqlite_transactions_immediate(engine)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **kwargs)


def _make_sqlite_transactions_immediate(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Stop the driver from issuing its own deferred BEGIN; SQLAlchemy's "begin" event does.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        try:
            cursor.execute("SELECT value FROM json_each('[1]')")
        except Exception as exc:  # sqlite3.OperationalError: no such table: json_each
            import sqlite3

            raise RuntimeError(
                f"this SQLite ({sqlite3.sqlite_version}) has no JSON functions, which billing's "
                "statements use: use SQLite 3.38 or later, or a build with JSON1"
            ) from exc
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Any) -> None:
        if connection.get_execution_options().get(_READ_ONLY):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def create_read_engine(url: str) -> AsyncEngine:
    """A second engine, with a small pool of its own, for the polls that never write."""
    return create_engine(url, pool_size=2, max_overflow=4)


def create_read_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for queries that never write: on SQLite they do not take the write lock."""
    return async_sessionmaker(engine.execution_options(**{_READ_ONLY: True}),
                              expire_on_commit=False)
