"""Uploads have owners: one row per uploaded image (owner, bytes, pixels, time).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("uploads"):  # a database made from the models (then stamped 0001)
        return
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_uploads_user", "uploads", ["user", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_uploads_user", "uploads")
    op.drop_table("uploads")
