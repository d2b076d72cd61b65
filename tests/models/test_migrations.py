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

    from flows.surfaces.cli import app
    from flows.surfaces.environment import settings_from_environment

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("LIFECYCLE_ENVIRONMENT", "production")
    monkeypatch.setenv("LIFECYCLE_SECRET", "a-production-secret-of-some-length")
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", f"sqlite:///{tmp_path / 'prod.db'}")
    settings_from_environment.cache_clear()
    runner = CliRunner()
    refused = runner.invoke(app, ["ledger", "in-doubt"])
    assert refused.exit_code == 2 and "run `lifecycle db upgrade` first" in refused.output
    upgraded = runner.invoke(app, ["db", "upgrade"])
    assert upgraded.exit_code == 0 and f"Store migrated from empty to {head_revision()}" in upgraded.output
    assert runner.invoke(app, ["ledger", "in-doubt"]).exit_code == 0
    settings_from_environment.cache_clear()


def head_revision() -> str:
    from models.db import make_engine

    return head(make_engine("sqlite://"))


def test_a_ledger_that_mailed_a_shared_mailbox_twice_upgrades_and_keeps_both_rows(db_url: str) -> None:
    """Before 0004 a mailbox shared by two customers could get the same occurrence twice; the
    unique index 0004 adds must not refuse such a store: the later row keeps its history."""
    from sqlalchemy import text

    from models.db import make_engine
    from models.migrate import upgrade

    engine = make_engine(db_url)
    upgrade(engine, "0003")
    with engine.begin() as connection:
        for n, email in ((1, "pat@example.com"), (2, "Pat@Example.com")):
            connection.execute(text("INSERT INTO customers (id, external_id, email, locale, marketing_consent, "
                                    "created_at) VALUES (:n, :x, :e, 'en', true, '2026-01-01')"),
                               {"n": n, "x": f"c-{n}", "e": email})
            connection.execute(text("INSERT INTO sends (send_key, trigger, customer_id, occurrence, category, status, "
                                    "run_id, stage, template, email, message_id, evaluated_at, claimed_at, smtp_reply, "
                                    "error) VALUES (:k, 'w', :n, 'slot:1', 'marketing', 'sent', 'r', 'lapsed', 't', "
                                    ":e, '', '2026-01-01', '2026-01-01', '', '')"),
                               {"k": f"w/{n}/slot:1", "n": n, "e": email})
    upgrade(engine)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT send_key, occurrence FROM sends ORDER BY id")).all()
    assert tuple(rows[0]) == ("w/1/slot:1", "slot:1")
    assert rows[1][0] == "w/2/slot:1" and rows[1][1].startswith("slot:1#")
    engine.dispose()


def test_0011_takes_the_status_out_of_the_ledgers_indexes_and_back_on_downgrade(db_url: str) -> None:
    """The due deferrals keep an index (partial: only rows with a moment), the status is in none,
    so a send's state changes are HOT updates on PostgreSQL, whose pages keep room for them."""
    from sqlalchemy import text

    from models.db import make_engine
    from models.migrate import downgrade, upgrade

    engine = make_engine(db_url)
    upgrade(engine, "0010")
    assert {"ix_sends_status", "ix_sends_trigger_status_not_before"} <= send_indexes(engine)
    upgrade(engine, "0011")
    indexes = send_indexes(engine)
    assert "ix_sends_trigger_not_before" in indexes
    assert not {"ix_sends_status", "ix_sends_trigger_status_not_before"} & indexes
    assert not [name for name, columns in index_columns(engine).items() if "status" in columns]
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            assert connection.execute(text("SELECT reloptions FROM pg_class WHERE relname = 'sends'")).scalar_one() \
                == ["fillfactor=45"]
    downgrade(engine, "0010")
    assert {"ix_sends_status", "ix_sends_trigger_status_not_before"} <= send_indexes(engine)
    assert "ix_sends_trigger_not_before" not in send_indexes(engine)
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            assert connection.execute(text("SELECT reloptions FROM pg_class WHERE relname = 'sends'")).scalar_one() \
                is None
    engine.dispose()


def send_indexes(engine) -> set[str]:
    return set(index_columns(engine))


def index_columns(engine) -> dict[str, str]:
    """Each index of ``sends`` and what it reads: its columns, expressions and WHERE, as the database has them."""
    from sqlalchemy import text

    query = ("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'sends'" if engine.dialect.name ==
             "postgresql" else "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'sends' "
             "AND sql IS NOT NULL")
    with engine.connect() as connection:
        return {name: definition.split(" ON ", 1)[1] for name, definition in connection.execute(text(query))}
