"""Alembic migrations, applied by ``dubhe migrate`` and at start (see :func:`upgrade`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

_HERE = Path(__file__).parent


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str) -> None:
    """Bring the database to the newest schema; safe to run when it already is."""
    command.upgrade(alembic_config(database_url), "head")
