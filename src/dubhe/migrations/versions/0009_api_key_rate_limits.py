"""api key rate limits: per-key requests, tokens and concurrency overrides; on PostgreSQL, a
trigger that notifies every worker when keys or users change (dubhe.pubsub)

Revision ID: 0009
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rpm_limit', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('tpm_limit', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('concurrency_limit', sa.Integer(), nullable=True))
    # Only statements that set updated_at (what the key cache's poll reads) notify: the meter's
    # last_used_at touches do not wake every worker.
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("""
            CREATE FUNCTION dubhe_notify_change() RETURNS trigger AS $$
            BEGIN
                PERFORM pg_notify('dubhe_changes', TG_TABLE_NAME);
                RETURN NULL;
            END
            $$ LANGUAGE plpgsql
        """)
        for table in ('api_keys', 'users'):
            op.execute(f"""
                CREATE TRIGGER {table}_notify_change AFTER INSERT OR UPDATE OF updated_at
                ON {table}
                FOR EACH STATEMENT EXECUTE FUNCTION dubhe_notify_change()
            """)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        for table in ('api_keys', 'users'):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_notify_change ON {table}")
        op.execute("DROP FUNCTION IF EXISTS dubhe_notify_change()")
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('concurrency_limit')
        batch_op.drop_column('tpm_limit')
        batch_op.drop_column('rpm_limit')
