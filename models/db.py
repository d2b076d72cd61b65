"""Engines and sessions for the customer store, on SQLite or PostgreSQL alike."""

import json
from collections.abc import Collection
from typing import Any

from sqlalchemy import ARRAY, ColumnElement, Engine, any_, bindparam, event, func, literal_column, select
from sqlalchemy.engine import make_url
from sqlmodel import create_engine


def normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (the only PostgreSQL driver we install)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


_ENGINES: dict[str, Engine] = {}


def get_engine(url: str) -> Engine:
    """One engine (and connection pool) per URL per process."""
    if url not in _ENGINES:
        _ENGINES[url] = make_engine(url)
    return _ENGINES[url]


def dispose_engines() -> None:
    """Close every pooled connection (tests reset databases between cases)."""
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the audience stream read while dispatch writes the ledger.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_schema(engine: Engine) -> None:
    """Bring the schema to the newest migration (a new database gets every table)."""
    from models.migrate import upgrade

    upgrade(engine)


def one_of(column: Any, values: Collection[Any], dialect: str) -> ColumnElement[bool]:
    """``column IN values`` with the values bound as one parameter: an array on PostgreSQL,
    a JSON list on SQLite.

    A batch checks thousands of keys at once; as thousands of placeholders, the statement
    is rendered, sent and parsed anew every time (about 0.1 s per 5,000 keys on PostgreSQL).
    """
    values = list(values)
    if dialect == "postgresql":
        return column == any_(bindparam("one_of", values, type_=ARRAY(column.type)))
    listed = select(literal_column("value")).select_from(func.json_each(bindparam("one_of", json.dumps(values))))
    return column.in_(listed)
