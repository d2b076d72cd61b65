"""Real parts: SQLite files and the local PostgreSQL, an SMTP server on loopback, Prefect's test server."""

import atexit
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

# Under pytest-xdist (-n N) each worker gw0, gw1, ... gets its own PostgreSQL database and its
# own Prefect home; without xdist WORKER is "" and nothing below changes.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if WORKER and "PREFECT_HOME" not in os.environ:
    # Set before prefect is imported: Prefect reads its settings once, at import. The
    # temporary server's memo store and result storage live here; ~/.prefect is shared.
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"prefect-home-{WORKER}-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
# The terminal size as the controller's tests would see it (pytest_configure below): importing
# readline there exported COLUMNS=80 and LINES=24 to the process environment the workers
# inherit, which would pin rich's console at 80 columns whatever COLUMNS a test sets.
_TERMINAL = os.environ.pop("LIFECYCLE_TEST_TERMINAL", None)
if WORKER and _TERMINAL is not None:
    for _name, _value in json.loads(_TERMINAL).items():
        if _value is None:
            os.environ.pop(_name, None)
        else:
            os.environ[_name] = _value

import pytest  # noqa: E402 - after the environment set-up above
from hypothesis import HealthCheck, Phase  # noqa: E402 - after the environment set-up above
from hypothesis import settings as hypothesis_settings  # noqa: E402 - after the environment set-up above
from sqlalchemy import Connection, Engine, create_engine, make_url, text  # noqa: E402 - after the environment set-up above
from sqlalchemy.exc import DBAPIError  # noqa: E402 - after the environment set-up above
from sqlmodel import SQLModel  # noqa: E402 - after the environment set-up above

from flows.settings import Settings  # noqa: E402 - after the environment set-up above
from flows.surfaces.environment import settings_from_environment  # noqa: E402 - after the environment set-up above
from models.db import create_schema, dispose_engines, make_engine  # noqa: E402 - after the environment set-up above
from tests.support import copy_project  # noqa: E402 - after the environment set-up above
from tests.support.builders import Store  # noqa: E402 - after the environment set-up above
from tests.support.smtp_server import SmtpServer  # noqa: E402 - after the environment set-up above
from tests.support.stores import empty_tables  # noqa: E402 - after the environment set-up above

ROOT = Path(__file__).resolve().parent.parent

# Property tests (tests/e2e/test_properties.py): derandomized in CI, so a failure is the same
# on every run; new random examples nightly (HYPOTHESIS_PROFILE=nightly), kept in
# hypothesis's example database. Each example plays a whole timeline against a fresh
# store: no deadline, and fixtures are per test, not per example.
_PROPERTY_CHECKS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
# Without "explain": replaying a shrunk timeline a hundred times to say which parts matter
# costs a minute, and the shrunk timeline already reads as the story.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
hypothesis_settings.register_profile("ci", max_examples=80, derandomize=True, database=None, deadline=None,
                                     suppress_health_check=_PROPERTY_CHECKS, phases=_PHASES, print_blob=False)
hypothesis_settings.register_profile("nightly", max_examples=1000, deadline=None,
                                     suppress_health_check=_PROPERTY_CHECKS, phases=_PHASES, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
BASE_POSTGRES_URL = os.environ.get("LIFECYCLE_TEST_BASE_POSTGRES_URL") or os.environ.get(
    "LIFECYCLE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def postgres_url(suffix: str = "") -> str:
    """The base URL with its database renamed ``<base><suffix>``, plus ``_<worker>`` under xdist."""
    if not suffix and not WORKER:
        return BASE_POSTGRES_URL
    url = make_url(BASE_POSTGRES_URL)
    name = f"{url.database}{suffix}" + (f"_{WORKER}" if WORKER else "")
    return url.set(database=name).render_as_string(hide_password=False)


def ensure_database(url: str) -> None:
    """CREATE DATABASE for the URL's database if it is missing, connected to the base database."""
    name = make_url(url).database
    admin = create_engine(make_url(BASE_POSTGRES_URL).set(drivername="postgresql+psycopg"),
                          isolation_level="AUTOCOMMIT")
    try:
        for attempt in range(40):
            with admin.connect() as connection:
                if connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :name"),
                                      {"name": name}).first() is not None:
                    return
                try:
                    connection.execute(text(f'CREATE DATABASE "{name}"'))
                    return
                except DBAPIError as error:  # another run creating it too, or the template in use
                    if attempt == 39:
                        raise error
            time.sleep(0.25)
    finally:
        admin.dispose()


POSTGRES_URL = postgres_url()
if WORKER:
    # What child processes and every test module read: the worker's own database.
    os.environ["LIFECYCLE_TEST_BASE_POSTGRES_URL"] = BASE_POSTGRES_URL
    os.environ["LIFECYCLE_TEST_POSTGRES_URL"] = POSTGRES_URL


def pytest_configure(config: pytest.Config) -> None:
    if WORKER:
        ensure_database(POSTGRES_URL)
    elif getattr(config.option, "dist", "no") != "no":  # the xdist controller, before it starts workers
        terminal = {name: os.environ.get(name) for name in ("COLUMNS", "LINES")}
        os.environ["LIFECYCLE_TEST_TERMINAL"] = json.dumps(terminal)


# A store migrated from nothing costs about a second on PostgreSQL and under half a second on
# SQLite, and most store tests begin with one. The migrations give every such store the same empty
# tables, so each is made once per worker and then handed out again: on SQLite a copy of a
# migrated file, on PostgreSQL the same tables emptied, as long as nothing changed the schema
# since they were migrated (a catalog fingerprint says so; anything else is dropped and migrated
# anew, as before). The engine fixture still runs the migrations on it: at head, they check
# the version and do nothing.
_SQLITE_TEMPLATE: Path | None = None
_MIGRATED: str | None = None  # the PostgreSQL catalog's fingerprint just after the last migration from nothing

# Every object outside the system schemas, as the migrations (or a test) left it, and alembic's version.
_CATALOG = """
SELECT md5(string_agg(item, E'\\n' ORDER BY item)) FROM (
  SELECT format('rel %s.%s %s', n.nspname, c.relname, c.relkind) AS item
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
         AND n.nspname NOT LIKE 'pg_temp%'
  UNION ALL
  SELECT format('col %s.%s %s %s %s %s %s', n.nspname, c.relname, a.attnum, a.attname,
                format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid))
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
         AND n.nspname NOT LIKE 'pg_temp%' AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT format('idx %s.%s %s', schemaname, indexname, indexdef) FROM pg_indexes
   WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
  UNION ALL
  SELECT format('con %s.%s %s %s', n.nspname, c.conname, c.conrelid::regclass, pg_get_constraintdef(c.oid))
    FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  UNION ALL
  SELECT format('trg %s', pg_get_triggerdef(t.oid)) FROM pg_trigger t WHERE NOT t.tgisinternal
  UNION ALL
  SELECT format('fn %s.%s %s', n.nspname, p.proname, md5(p.prosrc))
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  UNION ALL
  SELECT format('view %s.%s %s', schemaname, viewname, md5(definition)) FROM pg_views
   WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
  UNION ALL
  SELECT format('type %s.%s %s', n.nspname, t.typname, t.typtype) FROM pg_type t
    JOIN pg_namespace n ON n.oid = t.typnamespace
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND t.typtype IN ('e', 'd', 'r', 'm')
  UNION ALL
  SELECT format('schema %s', nspname) FROM pg_namespace
   WHERE nspname NOT LIKE 'pg_temp%' AND nspname NOT LIKE 'pg_toast_temp%'
  UNION ALL
  SELECT format('ext %s %s', extname, extversion) FROM pg_extension
) catalog
"""


def _catalog(connection: Connection) -> str:
    version = connection.execute(text(
        "SELECT string_agg(version_num, ',' ORDER BY version_num) FROM alembic_version"
        if connection.execute(text("SELECT to_regclass('public.alembic_version')")).scalar() else "SELECT ''")).scalar()
    return f"{connection.execute(text(_CATALOG)).scalar()} {version}"


def _empty_migrated_tables(engine: Engine) -> bool:
    """Empty the model tables if the schema is as the last migration from nothing left it."""
    import models  # noqa: F401

    with engine.begin() as connection:
        if _MIGRATED is None or _catalog(connection) != _MIGRATED:
            return False
        empty_tables(connection)
    return True


def _sqlite_template(folder: Path) -> Path:
    """One file per worker, migrated from nothing, its WAL folded in: what every copy starts as."""
    global _SQLITE_TEMPLATE
    if _SQLITE_TEMPLATE is None:
        path = folder / "migrated.db"
        engine = make_engine(f"sqlite:///{path}")
        create_schema(engine)
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        engine.dispose()
        _SQLITE_TEMPLATE = path
    return _SQLITE_TEMPLATE


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every store test runs on a fresh SQLite file and on a clean PostgreSQL database (its tables
    emptied, when the test asks for the migrated ``engine`` and the schema is unchanged)."""
    global _MIGRATED
    dispose_engines()
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    engine = make_engine(POSTGRES_URL)
    import models  # noqa: F401

    if "engine" not in request.fixturenames or not _empty_migrated_tables(engine):
        _MIGRATED = None
        SQLModel.metadata.drop_all(engine)
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()
    yield POSTGRES_URL


@pytest.fixture
def engine(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    global _MIGRATED
    if db_url.startswith("sqlite:///") and not Path(db_url.removeprefix("sqlite:///")).exists():
        shutil.copy(_sqlite_template(tmp_path_factory.getbasetemp()), db_url.removeprefix("sqlite:///"))
    engine = make_engine(db_url)
    create_schema(engine)
    if engine.dialect.name == "postgresql" and _MIGRATED is None:  # migrated from nothing just now
        with engine.connect() as connection:
            _MIGRATED = _catalog(connection)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> Store:
    return Store(engine)


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    """A copy of the shipped triggers and templates that a test may edit, without the shipped
    holdouts: a test that counts mails to a handful of customers must not depend on which of
    them a hash holds out. The holdout tests set their own (tests/audience/test_holdout.py)."""
    return copy_project(tmp_path / "project")


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, db_url: str, smtp: SmtpServer, project_dir: Path) -> Iterator[Settings]:
    """Settings through the environment, as a worker would get them."""
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", db_url)
    monkeypatch.setenv("LIFECYCLE_SMTP_URL", smtp.url)
    monkeypatch.setenv("LIFECYCLE_TRIGGERS_DIR", str(project_dir / "triggers"))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(project_dir / "templates"))
    monkeypatch.setenv("LIFECYCLE_SMTP_BACKOFF_SECONDS", "0.01")
    monkeypatch.setenv("LIFECYCLE_SMTP_BACKOFF_MAX_SECONDS", "0.05")
    monkeypatch.setenv("LIFECYCLE_SECRET", "test-secret-0123456789")
    settings_from_environment.cache_clear()
    yield settings_from_environment()
    settings_from_environment.cache_clear()


@pytest.fixture(scope="session")
def prefect() -> Iterator[None]:
    """One temporary Prefect server for every test that runs a real flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield
