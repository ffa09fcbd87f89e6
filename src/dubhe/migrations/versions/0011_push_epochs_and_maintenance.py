"""push epochs and maintenance: on PostgreSQL, a trigger that notifies every worker when an
account's epoch moves (channel dubhe_epochs) or a maintenance switch changes (dubhe_changes)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite has no NOTIFY: one machine, the polls alone (dubhe.pubsub).
    if op.get_bind().dialect.name != 'postgresql':
        return
    # One row per account whose epoch moved, with the new epoch: a worker retires only a lease
    # of an older one. Only statements that set epoch fire it (a flush's counter updates do not).
    op.execute("""
        CREATE FUNCTION dubhe_notify_epoch() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('dubhe_epochs', NEW.user_id::text || ' ' || NEW.epoch::text);
            RETURN NULL;
        END
        $$ LANGUAGE plpgsql
    """)
    op.execute("""
        CREATE TRIGGER accounts_notify_epoch AFTER UPDATE OF epoch ON accounts
        FOR EACH ROW WHEN (NEW.epoch IS DISTINCT FROM OLD.epoch)
        EXECUTE FUNCTION dubhe_notify_epoch()
    """)
    # The maintenance switches notify like keys and users do (0009's function: the table name).
    op.execute("""
        CREATE TRIGGER model_maintenance_notify_change
        AFTER INSERT OR UPDATE OR DELETE ON model_maintenance
        FOR EACH STATEMENT EXECUTE FUNCTION dubhe_notify_change()
    """)


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute("DROP TRIGGER IF EXISTS model_maintenance_notify_change ON model_maintenance")
    op.execute("DROP TRIGGER IF EXISTS accounts_notify_epoch ON accounts")
    op.execute("DROP FUNCTION IF EXISTS dubhe_notify_epoch()")
