"""The queue can be paused: one row per queue (``default``) saying whether workers may claim jobs.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("queue_state"):  # made from the models, stamped 0001
        return
    op.create_table(
        "queue_state",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("changed_at", sa.Float(), nullable=True),
        sa.Column("changed_by", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("queue_state")
