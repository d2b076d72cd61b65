"""Alembic environment: the engine comes from ``lifecycle db upgrade`` (or the tests)."""

from alembic import context
from sqlmodel import SQLModel

import models  # noqa: F401  (registers every table)

target_metadata = SQLModel.metadata
connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `lifecycle db upgrade`, which passes the connection")

# `lifecycle serve` keeps APScheduler's jobs in the same database; they are not ours to migrate.
NOT_OURS = {"apscheduler_jobs"}


def include_object(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    return not (type_ == "table" and name in NOT_OURS)


context.configure(connection=connection, target_metadata=target_metadata, compare_type=True,
                  include_object=include_object, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
