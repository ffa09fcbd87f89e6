"""payment reversals: refunds and disputes of card payments

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import dubhe.models.base


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('payment_intent', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('refunded_uusd', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('reversed_uusd', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.create_index(batch_op.f('ix_payments_payment_intent'), ['payment_intent'], unique=False)
        batch_op.create_check_constraint(
            op.f('ck_payments_reversed_within_amount'),
            'reversed_uusd >= 0 AND reversed_uusd <= amount_uusd')
    op.create_table('payment_reversals',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('provider', sa.String(length=16), nullable=False),
    sa.Column('ref', sa.String(length=160), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('payment_intent', sa.String(length=128), nullable=False),
    sa.Column('amount_uusd', sa.BigInteger(), nullable=False),
    sa.Column('event_id', sa.String(length=128), nullable=False),
    sa.Column('applied_uusd', sa.BigInteger(), nullable=False),
    sa.Column('owed_uusd', sa.BigInteger(), nullable=False),
    sa.Column('applied_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.CheckConstraint('amount_uusd >= 0 AND applied_uusd >= 0 AND owed_uusd >= 0', name=op.f('ck_payment_reversals_amounts_nonnegative')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_payment_reversals')),
    sa.UniqueConstraint('provider', 'ref', name=op.f('uq_payment_reversals_provider_ref'))
    )
    with op.batch_alter_table('payment_reversals', schema=None) as batch_op:
        batch_op.create_index('ix_payment_reversals_intent', ['provider', 'payment_intent'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('payment_reversals', schema=None) as batch_op:
        batch_op.drop_index('ix_payment_reversals_intent')
    op.drop_table('payment_reversals')
    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_payments_reversed_within_amount'), type_='check')
        batch_op.drop_index(batch_op.f('ix_payments_payment_intent'))
        batch_op.drop_column('reversed_uusd')
        batch_op.drop_column('refunded_uusd')
        batch_op.drop_column('payment_intent')
