"""credit leases replace per-request reservations

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import dubhe.models.base


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('leases',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('owner', sa.String(length=96), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('uusd', sa.BigInteger(), nullable=False),
    sa.Column('tokens_used', sa.BigInteger(), nullable=False),
    sa.Column('uusd_used', sa.BigInteger(), nullable=False),
    sa.Column('period_start', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('expires_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.Column('created_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.Column('closed_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=True),
    sa.CheckConstraint('tokens_used >= 0 AND tokens_used <= tokens AND uusd_used >= 0 AND uusd_used <= uusd', name=op.f('ck_leases_used_within_granted')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_leases_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_leases'))
    )
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index('ix_leases_status_expires', ['status', 'expires_at'], unique=False)

    with op.batch_alter_table('reservations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reservations_status_expires'))

    op.drop_table('reservations')


def downgrade() -> None:
    op.create_table('reservations',
    sa.Column('id', sa.INTEGER(), nullable=False),
    sa.Column('request_id', sa.VARCHAR(length=64), nullable=False),
    sa.Column('user_id', sa.INTEGER(), nullable=False),
    sa.Column('api_key_id', sa.BIGINT(), nullable=True),
    sa.Column('model', sa.VARCHAR(length=64), nullable=False),
    sa.Column('tokens', sa.BIGINT(), nullable=False),
    sa.Column('balance_uusd', sa.BIGINT(), nullable=False),
    sa.Column('prompt_tokens', sa.BIGINT(), nullable=False),
    sa.Column('max_tokens', sa.BIGINT(), nullable=False),
    sa.Column('period_start', sa.DATETIME(), nullable=False),
    sa.Column('status', sa.VARCHAR(length=16), nullable=False),
    sa.Column('expires_at', sa.DATETIME(), nullable=False),
    sa.Column('created_at', sa.DATETIME(), nullable=False),
    sa.Column('finished_at', sa.DATETIME(), nullable=True),
    sa.CheckConstraint('tokens >= 0 AND balance_uusd >= 0', name=op.f('ck_reservations_amounts_nonnegative')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_reservations_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reservations')),
    sa.UniqueConstraint('request_id', name=op.f('uq_reservations_request_id'))
    )
    with op.batch_alter_table('reservations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reservations_status_expires'), ['status', 'expires_at'], unique=False)

    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.drop_index('ix_leases_status_expires')

    op.drop_table('leases')
