"""Job outputs kept in the database (``IMAGESMITH_OUTPUT_STORE=database``), so any API node can serve a file that a
worker on another machine made.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("output_blobs"):  # made from the models, stamped 0001
        return
    op.create_table(
        "output_blobs",
        sa.Column("id", sa.String(48), primary_key=True),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_output_blobs_job", "output_blobs", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_output_blobs_job", "output_blobs")
    op.drop_table("output_blobs")
