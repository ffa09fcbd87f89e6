"""account epochs and debt

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('debt_uusd', sa.BigInteger(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('debt_tokens', sa.BigInteger(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('epoch', sa.BigInteger(), nullable=False, server_default='0'))
        batch_op.create_check_constraint(op.f('ck_accounts_debt_nonnegative'), 'debt_uusd >= 0')
        batch_op.create_check_constraint(op.f('ck_accounts_debt_tokens_nonnegative'), 'debt_tokens >= 0')
    with op.batch_alter_table('ledger_entries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('debt_uusd', sa.BigInteger(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('debt_tokens', sa.BigInteger(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('ledger_entries', schema=None) as batch_op:
        batch_op.drop_column('debt_tokens')
        batch_op.drop_column('debt_uusd')
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_accounts_debt_tokens_nonnegative'), type_='check')
        batch_op.drop_constraint(op.f('ck_accounts_debt_nonnegative'), type_='check')
        batch_op.drop_column('epoch')
        batch_op.drop_column('debt_tokens')
        batch_op.drop_column('debt_uusd')
