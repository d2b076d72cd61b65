"""Exactly once: claim a send key before sending, mark it after.

The unique ``send_key`` decides every race. Two runs (or a retried task) may both
plan the same key; only one INSERT wins, and only the winner sends. See
``models.ledger`` for the states and what a crash leaves behind.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, bindparam, delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from models import Send, SendStatus, Suppression, SuppressionReason
from models.types import utcnow


@dataclass(frozen=True, slots=True)
class Claim:
    send_key: str
    trigger: str
    customer_id: int
    occurrence: str
    stage: str
    template: str
    email: str
    message_id: str


@dataclass(frozen=True, slots=True)
class Outcome:
    send_key: str
    status: SendStatus
    reply: str = ""
    error: str = ""


def _insert(engine: Engine):
    return pg_insert if engine.dialect.name == "postgresql" else sqlite_insert


def claim(engine: Engine, claims: Sequence[Claim], run_id: str, evaluated_at: datetime) -> set[str]:
    """Insert ``sending`` rows; returns the keys this run won (the others are taken)."""
    if not claims:
        return set()
    now = utcnow()
    rows = [
        {
            "send_key": c.send_key,
            "trigger": c.trigger,
            "customer_id": c.customer_id,
            "occurrence": c.occurrence,
            "status": SendStatus.SENDING.value,
            "run_id": run_id,
            "stage": c.stage,
            "template": c.template,
            "email": c.email,
            "message_id": c.message_id,
            "evaluated_at": evaluated_at,
            "claimed_at": now,
        }
        for c in claims
    ]
    statement = (
        _insert(engine)(Send).values(rows).on_conflict_do_nothing(index_elements=["send_key"]).returning(Send.send_key)
    )
    with engine.begin() as connection:
        return set(connection.execute(statement).scalars())


def record(engine: Engine, outcomes: Iterable[Outcome]) -> None:
    """Mark sent and failed keys; delete claims the server deferred, so a later run retries."""
    now = utcnow()
    finished = [
        {"b_key": o.send_key, "b_status": o.status.value, "b_reply": o.reply[:1000], "b_error": o.error[:1000], "b_at": now}
        for o in outcomes
        if o.status in (SendStatus.SENT, SendStatus.FAILED)
    ]
    released = [o.send_key for o in outcomes if o.status == SendStatus.SENDING]
    with engine.begin() as connection:
        if finished:
            connection.execute(
                update(Send)
                .where(Send.send_key == bindparam("b_key"), Send.status == SendStatus.SENDING)
                .values(status=bindparam("b_status"), smtp_reply=bindparam("b_reply"), error=bindparam("b_error"),
                        finished_at=bindparam("b_at"))
                .execution_options(synchronize_session=False),
                finished,
            )
        if released:
            connection.execute(
                delete(Send).where(Send.send_key.in_(released), Send.status == SendStatus.SENDING)
            )


def release(engine: Engine, keys: Sequence[str]) -> int:
    """Free claims that never reached the server (or that ops checked by hand)."""
    if not keys:
        return 0
    with engine.begin() as connection:
        result = connection.execute(delete(Send).where(Send.send_key.in_(keys), Send.status == SendStatus.SENDING))
        return result.rowcount or 0


def suppress(engine: Engine, emails: Iterable[str], reason: SuppressionReason, detail: str = "") -> None:
    rows = [{"email": e.lower(), "reason": reason.value, "detail": detail[:1000], "created_at": utcnow()}
            for e in set(emails)]
    if not rows:
        return
    with engine.begin() as connection:
        connection.execute(
            _insert(engine)(Suppression).values(rows).on_conflict_do_nothing(index_elements=["email"])
        )


def in_doubt(engine: Engine, older_than: timedelta = timedelta(minutes=10)) -> list[Send]:
    """Claims left in ``sending`` longer than any live run keeps them: their run died."""
    cutoff = utcnow() - older_than
    with engine.connect() as connection:
        rows = connection.execute(
            select(Send).where(Send.status == SendStatus.SENDING, Send.claimed_at < cutoff).order_by(Send.claimed_at)
        )
        return [Send.model_validate(row._mapping) for row in rows]
