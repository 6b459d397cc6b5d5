"""Jobs carry a batch key: queued jobs with equal keys may run in one pipeline call.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "batch_key" in {c["name"] for c in inspector.get_columns("jobs")}:  # made from the models, stamped 0001
        return
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("batch_key", sa.String(64), nullable=True))
    op.create_index("ix_jobs_batch", "jobs", ["batch_key", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_batch", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("batch_key")
