"""Alembic environment: the engine comes from ``lifecycle db upgrade`` (or the tests)."""

from alembic import context
from sqlmodel import SQLModel

import models  # noqa: F401  (registers every table)

target_metadata = SQLModel.metadata
connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `lifecycle db upgrade`, which passes the connection")

context.configure(connection=connection, target_metadata=target_metadata, compare_type=True,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
