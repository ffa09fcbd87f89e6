"""billing: accounts, periods, reservations, ledger, codes, payments

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import dubhe.models.base


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('accounts',
    sa.Column('user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('plan_code', sa.String(length=32), nullable=False),
    sa.Column('next_plan_code', sa.String(length=32), nullable=True),
    sa.Column('period_start', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.Column('period_end', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.Column('tokens_available', sa.BigInteger(), nullable=False),
    sa.Column('tokens_reserved', sa.BigInteger(), nullable=False),
    sa.Column('balance_uusd', sa.BigInteger(), nullable=False),
    sa.Column('balance_reserved_uusd', sa.BigInteger(), nullable=False),
    sa.Column('uncollected_uusd', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.CheckConstraint('balance_reserved_uusd >= 0', name=op.f('ck_accounts_balance_reserved_nonnegative')),
    sa.CheckConstraint('balance_uusd >= 0', name=op.f('ck_accounts_balance_nonnegative')),
    sa.CheckConstraint('period_end > period_start', name=op.f('ck_accounts_period_ordered')),
    sa.CheckConstraint('tokens_available >= 0', name=op.f('ck_accounts_tokens_available_nonnegative')),
    sa.CheckConstraint('tokens_reserved >= 0', name=op.f('ck_accounts_tokens_reserved_nonnegative')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_accounts_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('user_id', name=op.f('pk_accounts'))
    )
    op.create_table('ledger_entries',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('ref', sa.String(length=128), nullable=False),
    sa.Column('tokens_available', sa.BigInteger(), nullable=False),
    sa.Column('tokens_reserved', sa.BigInteger(), nullable=False),
    sa.Column('balance_uusd', sa.BigInteger(), nullable=False),
    sa.Column('balance_reserved_uusd', sa.BigInteger(), nullable=False),
    sa.Column('uncollected_uusd', sa.BigInteger(), nullable=False),
    sa.Column('description', sa.String(length=255), nullable=False),
    sa.Column('created_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_ledger_entries_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_entries')),
    sa.UniqueConstraint('kind', 'ref', name=op.f('uq_ledger_entries_kind_ref'))
    )
    with op.batch_alter_table('ledger_entries', schema=None) as batch_op:
        batch_op.create_index('ix_ledger_entries_user_id_id', ['user_id', 'id'], unique=False)

    op.create_table('payments',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('provider', sa.String(length=16), nullable=False),
    sa.Column('event_id', sa.String(length=128), nullable=False),
    sa.Column('user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('purpose', sa.String(length=16), nullable=False),
    sa.Column('amount_uusd', sa.BigInteger(), nullable=False),
    sa.Column('plan_code', sa.String(length=32), nullable=True),
    sa.Column('created_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_payments_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_payments')),
    sa.UniqueConstraint('provider', 'event_id', name=op.f('uq_payments_provider_event_id'))
    )
    op.create_table('redemption_codes',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('code_hash', sa.String(length=64), nullable=False),
    sa.Column('amount_uusd', sa.BigInteger(), nullable=False),
    sa.Column('created_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.Column('redeemed_by', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('redeemed_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=True),
    sa.CheckConstraint('amount_uusd > 0', name=op.f('ck_redemption_codes_amount_positive')),
    sa.ForeignKeyConstraint(['redeemed_by'], ['users.id'], name=op.f('fk_redemption_codes_redeemed_by_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_redemption_codes')),
    sa.UniqueConstraint('code_hash', name=op.f('uq_redemption_codes_code_hash'))
    )
    op.create_table('reservations',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('api_key_id', sa.BigInteger(), nullable=True),
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('balance_uusd', sa.BigInteger(), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('max_tokens', sa.BigInteger(), nullable=False),
    sa.Column('period_start', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('expires_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.Column('created_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.Column('finished_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=True),
    sa.CheckConstraint('tokens >= 0 AND balance_uusd >= 0', name=op.f('ck_reservations_amounts_nonnegative')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_reservations_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reservations')),
    sa.UniqueConstraint('request_id', name=op.f('uq_reservations_request_id'))
    )
    with op.batch_alter_table('reservations', schema=None) as batch_op:
        batch_op.create_index('ix_reservations_status_expires', ['status', 'expires_at'], unique=False)

    op.create_table('subscription_periods',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('plan_code', sa.String(length=32), nullable=False),
    sa.Column('period_start', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.Column('period_end', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.Column('included_tokens', sa.BigInteger(), nullable=False),
    sa.Column('created_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_subscription_periods_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subscription_periods')),
    sa.UniqueConstraint('user_id', 'period_start', name=op.f('uq_subscription_periods_user_id_period_start'))
    )
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tokens_from_plan', sa.BigInteger(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('uncollected_uusd', sa.BigInteger(), nullable=False, server_default='0'))



def downgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_column('uncollected_uusd')
        batch_op.drop_column('tokens_from_plan')

    op.drop_table('subscription_periods')
    with op.batch_alter_table('reservations', schema=None) as batch_op:
        batch_op.drop_index('ix_reservations_status_expires')

    op.drop_table('reservations')
    op.drop_table('redemption_codes')
    op.drop_table('payments')
    with op.batch_alter_table('ledger_entries', schema=None) as batch_op:
        batch_op.drop_index('ix_ledger_entries_user_id_id')

    op.drop_table('ledger_entries')
    op.drop_table('accounts')
