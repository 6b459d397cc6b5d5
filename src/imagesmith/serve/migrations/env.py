"""Alembic environment of the job store: run by JobStore on the connection it hands over."""

from alembic import context

from imagesmith.serve.store import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
