"""key cap leases: per-key monthly spend caps, enforced by the meter

Revision ID: 0010
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import dubhe.models.base


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('key_cap_leases',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('api_key_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('owner', sa.String(length=96), nullable=False),
    sa.Column('month_start', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.Column('uusd', sa.BigInteger(), nullable=False),
    sa.Column('uusd_used', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('expires_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.Column('created_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.Column('closed_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=True),
    sa.CheckConstraint('uusd >= 0 AND uusd_used >= 0', name=op.f('ck_key_cap_leases_amounts_nonnegative')),
    sa.ForeignKeyConstraint(['api_key_id'], ['api_keys.id'], name=op.f('fk_key_cap_leases_api_key_id_api_keys'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_key_cap_leases'))
    )
    with op.batch_alter_table('key_cap_leases', schema=None) as batch_op:
        batch_op.create_index('ix_key_cap_leases_key_month', ['api_key_id', 'month_start'], unique=False)
        batch_op.create_index('ix_key_cap_leases_status_expires', ['status', 'expires_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('key_cap_leases', schema=None) as batch_op:
        batch_op.drop_index('ix_key_cap_leases_status_expires')
        batch_op.drop_index('ix_key_cap_leases_key_month')
    op.drop_table('key_cap_leases')
