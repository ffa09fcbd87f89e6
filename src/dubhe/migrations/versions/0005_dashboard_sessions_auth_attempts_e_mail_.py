"""dashboard sessions, auth attempts, e-mail verification, account deletion

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import dubhe.models.base


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('auth_attempts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('subject', sa.String(length=320), nullable=False),
    sa.Column('created_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_auth_attempts'))
    )
    with op.batch_alter_table('auth_attempts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_auth_attempts_created_at'), ['created_at'], unique=False)
        batch_op.create_index('ix_auth_attempts_kind_subject_created', ['kind', 'subject', 'created_at'], unique=False)

    op.create_table('web_sessions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('created_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_web_sessions_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_web_sessions')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_web_sessions_token_hash'))
    )
    with op.batch_alter_table('web_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_web_sessions_user_id'), ['user_id'], unique=False)

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('web_session_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True))
        batch_op.create_index(batch_op.f('ix_api_keys_web_session_id'), ['web_session_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_api_keys_web_session_id_web_sessions'), 'web_sessions', ['web_session_id'], ['id'], ondelete='SET NULL')

    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('email_verified_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('deleted_at', dubhe.models.base.UTCDateTime(timezone=True), nullable=True))

    # Users made before sign-up existed were made by the operator: their addresses count as known.
    op.execute("UPDATE users SET email_verified_at = created_at")



def downgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('deleted_at')
        batch_op.drop_column('email_verified_at')

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_api_keys_web_session_id_web_sessions'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_api_keys_web_session_id'))
        batch_op.drop_column('web_session_id')

    with op.batch_alter_table('web_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_web_sessions_user_id'))

    op.drop_table('web_sessions')
    with op.batch_alter_table('auth_attempts', schema=None) as batch_op:
        batch_op.drop_index('ix_auth_attempts_kind_subject_created')
        batch_op.drop_index(batch_op.f('ix_auth_attempts_created_at'))

    op.drop_table('auth_attempts')
