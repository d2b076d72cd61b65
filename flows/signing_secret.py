"""The secret that signs every link, Message-ID and VERP token.

``LIFECYCLE_SECRET`` when it is set (production refuses to start without it). Otherwise
the store's own: a random secret generated the first time a process needs one, kept in
``store_meta`` and read by every later process on that store, so links mailed by a run
work in ``lifecycle web``. There is no built-in default: a known secret would let anyone
forge an unsubscribe, or a confirmation of consent, for any customer.
"""

import logging
import secrets

from pydantic import SecretStr
from sqlalchemy import Engine, select

from flows.settings import Settings
from models import StoreMeta
from models.db import get_engine, insert_for

log = logging.getLogger(__name__)
STORE_KEY = "signing_secret"
_warned: set[str] = set()


def store_secret(engine: Engine) -> str:
    """The store's secret, made on first use; two processes racing to make it agree on the first written."""
    table = StoreMeta.__table__  # type: ignore[attr-defined]  # set by SQLModel at class creation, not declared
    query = select(table.c.value).where(table.c.key == STORE_KEY)
    with engine.begin() as connection:
        found = connection.execute(query).scalar()
        if found is None:
            connection.execute(insert_for(engine)(table).values(key=STORE_KEY, value=secrets.token_urlsafe(48))
                               .on_conflict_do_nothing(index_elements=["key"]))
            found = connection.execute(query).scalar_one()
    url = engine.url.render_as_string(hide_password=True)
    if url not in _warned:
        _warned.add(url)
        log.warning("LIFECYCLE_SECRET is not set: links are signed with a random secret kept in the store "
                    "(store_meta %r). Set LIFECYCLE_SECRET to keep links valid if the store is replaced; "
                    "production requires it.", STORE_KEY)
    return str(found)


def resolved(settings: Settings, engine: Engine | None = None) -> Settings:
    """``settings`` with its signing secret filled in (unchanged when ``LIFECYCLE_SECRET`` is set)."""
    if settings.secret is not None:
        return settings
    secret = store_secret(engine or get_engine(settings.database_url))
    return settings.model_copy(update={"secret": SecretStr(secret)})
