"""Engines and sessions for the customer store, on SQLite or PostgreSQL alike."""

import contextlib
import json
from collections.abc import Callable, Collection, Iterator
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    Engine,
    Select,
    any_,
    bindparam,
    event,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.engine.base import OptionEngineMixin
from sqlmodel import create_engine

# An execution option: transactions on a connection or engine carrying it are opened to write.
WRITE = "lifecycle_write"


def normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (the only PostgreSQL driver we install)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, pool_timeout: float = 30) -> Engine:
    """``pool_timeout``: how long a caller waits for a pooled PostgreSQL connection
    (``lifecycle web`` waits no longer than its statement timeout; SQLite's one writer at a
    time is bounded by the busy timeout instead)."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        engine.__class__ = _SqliteEngine  # its begin() writes
        return engine
    return create_engine(url, pool_pre_ping=True, pool_timeout=pool_timeout)


def writer(engine: Engine) -> Engine:
    """The engine for a session that reads, then writes (ingest): on SQLite each of its
    transactions begins IMMEDIATE. Elsewhere the option means nothing."""
    return engine.execution_options(**{WRITE: True})


class _SqliteEngine(Engine):
    """SQLite transactions: ``engine.begin()`` and ``writer(engine)`` take the write lock at
    BEGIN (``BEGIN IMMEDIATE``); everything else begins deferred, as a reader.

    A deferred transaction that has read and then writes must upgrade its snapshot to the
    write lock; when another connection committed in between, SQLite refuses at once
    (SQLITE_BUSY_SNAPSHOT: "database is locked", the busy timeout never waited). BEGIN
    IMMEDIATE waits for the lock (up to the busy timeout) before it reads anything. Readers
    stay deferred: the audience stream keeps its read transaction open for a whole run
    while dispatch writes the ledger (WAL), and would otherwise hold the write lock that long.
    """

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        with self.connect() as connection:
            connection.execution_options(**{WRITE: True})
            with connection.begin():
                yield connection


class _SqliteOptionEngine(OptionEngineMixin, _SqliteEngine):  # engine.execution_options(...), as OptionEngine
    def update_execution_options(self, **opt: Any) -> None:
        Engine.update_execution_options(self, **opt)


_SqliteEngine._option_cls = _SqliteOptionEngine  # type: ignore[assignment]


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
    # The driver begins no transactions of its own (it would begin each deferred, and only
    # before a write): ``_sqlite_begin`` does, as SQLAlchemy's pysqlite recipe describes.
    dbapi_connection.isolation_level = None
    # WAL lets the audience stream read while dispatch writes the ledger.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.get_execution_options().get(WRITE) else "BEGIN")


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
    condition: ColumnElement[bool]
    if dialect == "postgresql":
        condition = column == any_(bindparam("one_of", values, type_=ARRAY(column.type), unique=True))
        return condition
    listed: Select[Any] = select(literal_column("value")).select_from(
        func.json_each(bindparam("one_of", json.dumps(values), unique=True))
    )
    condition = column.in_(listed)
    return condition


def insert_for(engine: Engine) -> Callable[[Any], PgInsert | SqliteInsert]:
    """The dialect's INSERT, which has ``on_conflict_do_nothing`` on both stores."""
    return pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
