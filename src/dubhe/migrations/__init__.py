"""Alembic migrations, applied by ``dubhe migrate`` and at start (see :func:`upgrade`).

Every CLI command checks the schema first. Loading Alembic's machinery for that costs most of a
command's run time, so :func:`upgrade_if_needed` first reads the database's revision with one
query and compares it with the newest revision file's, and runs Alembic only when they differ.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config

_HERE = Path(__file__).parent
_REVISION = re.compile(r"^revision\s*(?::\s*str\s*)?=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)
_DOWN_REVISION = re.compile(
    r"^down_revision\s*(?::[^=]+)?=\s*(?:['\"]([^'\"]+)['\"]|None)", re.MULTILINE
)


def alembic_config(database_url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str) -> None:
    """Bring the database to the newest schema; safe to run when it already is."""
    from alembic import command

    command.upgrade(alembic_config(database_url), "head")


def upgrade_if_needed(database_url: str) -> None:
    """:func:`upgrade`, skipped when the database is already at the single head revision."""
    head = head_revision()
    if head is None or _current_revisions(database_url) != {head}:
        upgrade(database_url)


def head_revision() -> str | None:
    """The one revision no other revision builds on, read from the files; None if that is not
    exactly one (branches: leave it to Alembic)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (_HERE / "versions").glob("*.py"):
        text = path.read_text()
        revision = _REVISION.search(text)
        down = _DOWN_REVISION.search(text)
        if revision is None or down is None:
            return None  # a layout this parser does not know
        revisions.add(revision.group(1))
        if down.group(1):
            parents.add(down.group(1))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _current_revisions(database_url: str) -> set[str]:
    path = _sqlite_file(database_url)
    if path is None:
        return asyncio.run(_current_revisions_async(database_url))
    # A file database is read with the standard library, read-only: an async engine costs
    # ~50 ms of start to read one row. A file that is not there yet is a new database.
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return set()
    try:
        rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
        return {str(row[0]) for row in rows}
    except sqlite3.Error:
        return set()  # no alembic_version table yet: a new database
    finally:
        connection.close()


def _sqlite_file(database_url: str) -> Path | None:
    """The file of a ``sqlite+aiosqlite:///path`` URL without query options; None otherwise."""
    prefix = "sqlite+aiosqlite:///"
    if not database_url.startswith(prefix) or "?" in database_url:
        return None
    database = database_url[len(prefix) :]
    if not database or database == ":memory:":
        return None
    return Path(database)


async def _current_revisions_async(database_url: str) -> set[str]:
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.ext.asyncio import create_async_engine

    # A plain engine: dubhe.database's SQLite engine would take the write lock to read a row.
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(text("SELECT version_num FROM alembic_version"))
            return {str(row[0]) for row in rows}
    except DBAPIError:
        return set()  # no alembic_version table yet: a new database
    finally:
        await engine.dispose()
