"""Reading and seeding the send ledger (the ``sends`` table), and what feedback did to it, as a test
states what it should hold."""

from collections import Counter

from sqlalchemy import Engine, select
from sqlmodel import Session

from flows.content.links import send_digest
from flows.send import claims
from models import Feedback, Send, SendStatus, Suppression
from tests.support import SECRET
from tests.support.builders import NOW, Store


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


def seed_send(store: Store, key: str, email: str, status: SendStatus = SendStatus.SENT) -> None:
    """A send in the ledger as a run leaves it: handed over, then recorded as sent (or ``status``)."""
    customer = store.customer("Kim", email=email)
    claim = claims.Claim(key, key.split("/")[0], customer.id, key.rsplit("/", 1)[1], "lapsed", "winback_lapsed",
                         email, f"<{send_digest(SECRET, key)}@shop.example>")
    assert claims.hand_over(store.engine, [claim], "run-1", NOW) == {key}
    claims.record(store.engine, [claims.Decision(key, status)])


def suppressions(engine: Engine) -> dict[str, str]:
    """Suppressed address → reason."""
    with Session(engine) as session:
        return dict(session.execute(select(Suppression.email, Suppression.reason)).all())


def feedback_rows(engine: Engine) -> list[Feedback]:
    """Every bounce and complaint recorded, by address."""
    with Session(engine) as session:
        return list(session.execute(select(Feedback).order_by(Feedback.email)).scalars())
