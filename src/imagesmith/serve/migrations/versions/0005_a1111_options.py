"""A1111 options per user, persisted: what ``POST /sdapi/v1/options`` sets (the checkpoint, VAE, clip skip, ...)
is that user's default for their later requests, also after a restart.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("a1111_options"):  # made from the models, stamped 0001
        return
    op.create_table(
        "a1111_options",
        sa.Column("user", sa.String(64), primary_key=True),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("a1111_options")
