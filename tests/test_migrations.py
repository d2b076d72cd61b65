"""The schema comes from Alembic migrations, and the migrations match the models."""

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlmodel import SQLModel

import models  # noqa: F401
from models.migrate import current, head


def test_migrations_create_exactly_what_the_models_declare(engine) -> None:
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                       SQLModel.metadata)
    assert differences == []
    assert set(inspect(engine).get_table_names()) == set(SQLModel.metadata.tables) | {"alembic_version"}


def test_the_store_is_at_the_newest_migration(engine) -> None:
    assert current(engine) == head(engine) is not None


def test_production_commands_refuse_an_unmigrated_store_until_db_upgrade(monkeypatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.settings import get_settings

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("LIFECYCLE_ENVIRONMENT", "production")
    monkeypatch.setenv("LIFECYCLE_SECRET", "a-production-secret-of-some-length")
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", f"sqlite:///{tmp_path / 'prod.db'}")
    get_settings.cache_clear()
    runner = CliRunner()
    refused = runner.invoke(app, ["ledger", "in-doubt"])
    assert refused.exit_code == 2 and "run `lifecycle db upgrade` first" in refused.output
    upgraded = runner.invoke(app, ["db", "upgrade"])
    assert upgraded.exit_code == 0 and f"Store migrated from empty to {head_revision()}" in upgraded.output
    assert runner.invoke(app, ["ledger", "in-doubt"]).exit_code == 0
    get_settings.cache_clear()


def head_revision() -> str:
    from models.db import make_engine

    return head(make_engine("sqlite://"))
