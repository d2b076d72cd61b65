"""Reading the send ledger (the ``sends`` table) as a test states what it should hold."""

from collections import Counter

from sqlalchemy import Engine, select
from sqlmodel import Session

from models import Send


def sends(engine: Engine, *, trigger: str | None = None, status: str | None = None) -> list[Send]:
    """The ledger's rows in the order they were made, of one trigger or in one status if given."""
    query = select(Send).order_by(Send.id)
    if trigger is not None:
        query = query.where(Send.trigger == trigger)
    if status is not None:
        query = query.where(Send.status == status)
    with Session(engine) as session:
        return list(session.execute(query).scalars())


def statuses(engine: Engine) -> Counter[str]:
    """How many rows are in each status (an empty ledger: ``Counter()``)."""
    with Session(engine) as session:
        return Counter(session.execute(select(Send.status)).scalars())


def addresses(engine: Engine, status: str) -> set[str]:
    """The addresses whose rows are in ``status``."""
    with Session(engine) as session:
        return set(session.execute(select(Send.email).where(Send.status == status)).scalars())


def status_of(engine: Engine, send_key: str) -> str:
    """The status of the one row with ``send_key``."""
    with Session(engine) as session:
        return session.execute(select(Send.status).where(Send.send_key == send_key)).scalar_one()
