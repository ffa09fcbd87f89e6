"""api key rate limits: per-key requests, tokens and concurrency overrides

Revision ID: 0009
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rpm_limit', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('tpm_limit', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('concurrency_limit', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('concurrency_limit')
        batch_op.drop_column('tpm_limit')
        batch_op.drop_column('rpm_limit')
