"""Exactly once: claim a send key before sending, mark it after.

The unique ``send_key`` decides every race. Two runs (or a retried task) may both
plan the same key; only one INSERT wins, and only the winner sends. See
``models.ledger`` for the states and what a crash leaves behind.
"""

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    and_,
    bindparam,
    delete,
    func,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.sql.dml import Update
from sqlmodel import col

from flows.audience.shards import Shard
from models import Send, SendStatus
from models.db import insert_for, one_of
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
    category: str = "marketing"
    ref_id: int | None = None
    links: tuple[str, ...] = ()  # the tracked links' destinations, by position (``flows.tracking``)
    step: str = ""  # the journey step; empty for a trigger's one mail
    variant: str = ""  # the step's experiment arm
    experiment: str = ""  # the salt of the experiment the arm was drawn in
    entered_at: datetime | None = None  # the journey's entry moment


IN_PROGRESS = (SendStatus.CLAIMED, SendStatus.SENDING)


@dataclass(frozen=True, slots=True)
class Decision:
    """``status`` None releases the claim: the server said "later", so the next run tries again."""

    send_key: str
    status: SendStatus | None
    reply: str = ""
    error: str = ""


def _rows(claims: Sequence[Claim], status: SendStatus, run_id: str, evaluated_at: datetime,
          **extra: object) -> list[dict[str, object]]:
    now = utcnow()
    return [
        {
            "send_key": c.send_key, "trigger": c.trigger, "customer_id": c.customer_id, "occurrence": c.occurrence,
            "category": c.category, "ref_id": c.ref_id, "status": status.value, "run_id": run_id, "stage": c.stage,
            "template": c.template, "email": c.email, "message_id": c.message_id, "evaluated_at": evaluated_at,
            "claimed_at": now, "links": "\n".join(c.links) or None, "step": c.step, "variant": c.variant,
            "experiment": c.experiment, "entered_at": c.entered_at, **extra,
        }
        for c in claims
    ]


def _unnested_insert(names: Sequence[str]) -> PgInsert:
    """``INSERT INTO sends (…) SELECT … FROM unnest(:send_key, :trigger, …)``: a batch as
    one array per column, each bound under its column's name and typed after it."""
    columns = [inspect(Send).local_table.c[name] for name in names]
    arrays = func.unnest(*(bindparam(c.name, type_=ARRAY(c.type)) for c in columns))
    rows = arrays.table_valued(*names).render_derived()
    return pg_insert(Send).from_select(list(names), select(*rows.c))


def claim(engine: Engine, claims: Sequence[Claim], run_id: str, evaluated_at: datetime,
          lease: timedelta = timedelta(minutes=10)) -> set[str]:
    """Reserve keys for this run (``claimed``); returns the keys it won (the others are taken).

    A new key is inserted. An existing one is taken over only when the policy deferred it
    and its moment has come, or when it is still ``claimed`` by a run whose lease ran out
    (that run died before handing it to the server). A single statement decides each key,
    so two runs never both win.
    """
    return _claim(engine, claims, run_id, evaluated_at, lease, SendStatus.CLAIMED)


def hand_over(engine: Engine, claims: Sequence[Claim], run_id: str, evaluated_at: datetime,
              lease: timedelta = timedelta(minutes=10)) -> set[str]:
    """Claim a window of keys as ``claim`` does and hand the keys won straight to the server
    (``sending``): the send path's one write per mail before its outcome.

    A separate ``claimed`` step before ``sending`` would cost a second write of every row,
    and it protects nothing here: the window goes to the server right after this statement,
    so no run can stall past its lease in between, and what a crash leaves in doubt is still
    this one window. Claiming straight into ``sending`` means a crash between this statement
    and the first DATA leaves the window in doubt rather than claimed: never sent twice.
    """
    return _claim(engine, claims, run_id, evaluated_at, lease, SendStatus.SENDING)


def _claim(engine: Engine, claims: Sequence[Claim], run_id: str, evaluated_at: datetime, lease: timedelta,
           status: SendStatus) -> set[str]:
    if not claims:
        return set()
    rows = _rows(claims, status, run_id, evaluated_at)
    insert: PgInsert | SqliteInsert
    parameters: dict[str, list[object]] | list[dict[str, object]]
    if engine.dialect.name == "postgresql":
        # One array per column, unnested by the server: a multi-row VALUES list of 14,000
        # parameters cost the driver three times as much to parse as the server to insert.
        names = list(rows[0])
        insert, parameters = _unnested_insert(names), {name: [row[name] for row in rows] for name in names}
    else:
        # executemany: compiled once and cached, sent as a few multi-row INSERTs.
        insert, parameters = insert_for(engine)(Send), rows
    # Any conflict: the key's own row, or the mailbox's row for the same occurrence (another
    # customer record with the same address, see ``models.ledger``).
    inserted = insert.on_conflict_do_nothing().returning(col(Send.send_key))
    stale = utcnow() - lease
    with engine.begin() as connection:
        won = set(connection.execute(inserted, parameters).scalars())
        for c in (c for c in claims if c.send_key not in won):  # usually none or few
            resumed = connection.execute(
                update(Send).where(col(Send.send_key) == c.send_key, or_(
                    and_(col(Send.status) == SendStatus.DEFERRED, col(Send.not_before) <= evaluated_at,
                         or_(col(Send.expires_at).is_(None), col(Send.expires_at) > evaluated_at)),
                    and_(col(Send.status) == SendStatus.CLAIMED, col(Send.claimed_at) < stale)))
                .values(status=status, run_id=run_id, claimed_at=utcnow(), evaluated_at=evaluated_at,
                        stage=c.stage, template=c.template, message_id=c.message_id,
                        links="\n".join(c.links) or None, step=c.step, variant=c.variant, experiment=c.experiment,
                        # A deferral's own entry moment stays; one of a single mail (before the trigger
                        # had steps) enters the journey when it was deferred, not now.
                        entered_at=func.coalesce(col(Send.entered_at), col(Send.evaluated_at)) if c.step else None)
                .returning(col(Send.send_key))).scalar_one_or_none()
            if resumed:
                won.add(resumed)
    return won


def hold_out(engine: Engine, claims: Sequence[Claim], run_id: str, evaluated_at: datetime,
             lease: timedelta = timedelta(minutes=10)) -> set[str]:
    """Record these occurrences as ``held_out``: claimed first, so a run racing for the same
    key decides it once, then closed. Returns the keys this run held out."""
    won = claim(engine, claims, run_id, evaluated_at, lease)
    if won:
        with engine.begin() as connection:
            connection.execute(update(Send).where(one_of(Send.send_key, sorted(won), engine.dialect.name),
                                                  col(Send.status) == SendStatus.CLAIMED, col(Send.run_id) == run_id)
                               .values(status=SendStatus.HELD_OUT, finished_at=utcnow()))
    return won


def defer(engine: Engine, claims: Sequence[tuple[Claim, datetime, datetime | None]], run_id: str,
          evaluated_at: datetime) -> None:
    """Record sends the policy held back: ``(claim, not_before, expires_at)``.

    Deferring again (the moment came, but a cap still applies) moves ``not_before`` on.
    """
    if not claims:
        return
    rows = [row | {"not_before": not_before, "expires_at": expires_at}
            for (_claim, not_before, expires_at), row in zip(
                claims, _rows([c for c, _, _ in claims], SendStatus.DEFERRED, run_id, evaluated_at), strict=True)]
    # Any conflict leaves the row there: this key's own earlier deferral (moved on below),
    # or the mailbox's row for the same occurrence under another customer record.
    insert = insert_for(engine)(Send).on_conflict_do_nothing()  # executemany, as in ``claim``
    move_on = (update(Send).where(col(Send.send_key) == bindparam("b_key"), col(Send.status) == SendStatus.DEFERRED)
               .values(not_before=bindparam("b_not_before")).execution_options(synchronize_session=False))
    with engine.begin() as connection:
        connection.execute(insert, rows)
        connection.execute(move_on, [{"b_key": row["send_key"], "b_not_before": row["not_before"]} for row in rows])


EXPIRED_AFTER = "deferred longer than deferred_expires_after"
NO_LONGER_DUE = "no longer due when its moment came"


def awaiting(trigger: str, now: datetime, steps: tuple[str, ...] = ("",)) -> ColumnElement[bool]:
    """Deferrals of ``trigger``'s mail (a journey's: of one step, ``steps`` naming it; its first
    step's also those from before the trigger had steps) whose moment, or expiry, has come."""
    return and_(col(Send.trigger) == trigger, col(Send.not_before).is_not(None),  # every deferral's (the index's)
                col(Send.step).in_(steps), col(Send.status) == SendStatus.DEFERRED,
                or_(col(Send.not_before) <= now, col(Send.expires_at) <= now))


def awaiting_keys(engine: Engine, trigger: str, now: datetime, steps: tuple[str, ...] = ("",),
                  shard: Shard | None = None) -> set[str]:
    """The keys of ``awaiting`` deferrals, as a pass over the audience begins (a ``shard``'s
    pass: of its customers)."""
    query = select(col(Send.send_key)).where(awaiting(trigger, now, steps))
    if shard is not None:
        query = query.where(shard.where(col(Send.customer_id)))
    with engine.connect() as connection:
        return set(connection.execute(query).scalars())


def close_steps(engine: Engine, claims: Sequence[tuple[Claim, SendStatus, str]], run_id: str,
                evaluated_at: datetime) -> None:
    """Record journey steps decided without a mail: ``passed`` (its conditions did not hold)
    or ``exited`` (a goal reached; ``error`` names it). A deferral of the same key (the policy
    held the step, then the customer ordered) is closed the same way; any other row already
    there (a racing run's decision) stays as it is."""
    if not claims:
        return
    rows = [row | {"status": status.value, "error": why, "finished_at": row["claimed_at"]}
            for (_, status, why), row in zip(claims, _rows([c for c, _, _ in claims], SendStatus.PASSED, run_id,
                                                          evaluated_at), strict=True)]
    insert = insert_for(engine)(Send).on_conflict_do_nothing()  # executemany, as in ``claim``
    close = (update(Send).where(col(Send.send_key) == bindparam("b_key"), col(Send.status) == SendStatus.DEFERRED)
             .values(status=bindparam("b_status"), error=bindparam("b_error"), finished_at=bindparam("b_at"),
                     evaluated_at=evaluated_at, run_id=run_id)
             .execution_options(synchronize_session=False))
    with engine.begin() as connection:
        connection.execute(insert, rows)
        connection.execute(close, [{"b_key": r["send_key"], "b_status": r["status"], "b_error": r["error"],
                                    "b_at": r["finished_at"]} for r in rows])


def close_deferred(engine: Engine, trigger: str, now: datetime, among: Collection[str], handled: Collection[str],
                   expired: Collection[str], dry_run: bool = False,
                   steps: tuple[str, ...] = ("",)) -> list[tuple[str, str]]:
    """End the deferrals that a complete pass over the trigger's audience did not keep.

    ``among`` are the deferrals awaiting when the pass began (``awaiting_keys``): one
    another run wrote meanwhile is that run's to decide. The pass decided those it met
    (``handled``) like fresh mail, and found ``expired`` ones among them past their
    ``deferred_expires_after``. Those it did not meet are no longer due: their campaign
    slot's send window passed, the cart was ordered, the customer left the audience.
    Both become ``expired``, with the reason in ``error`` (a dry run changes nothing).
    Returns ``(stage, reason)`` of those it did not meet, the reason being
    ``EXPIRED_AFTER`` or ``NO_LONGER_DUE``.
    """
    if not among:
        return []
    with engine.begin() as connection:
        rows = connection.execute(select(col(Send.send_key), col(Send.stage), col(Send.expires_at))
                                  .where(awaiting(trigger, now, steps),
                                         one_of(Send.send_key, among, engine.dialect.name))).all()
        closing: dict[str, tuple[str, str]] = {}
        for key, stage, expires_at in rows:
            if key in expired or (key not in handled and expires_at is not None and expires_at <= now):
                closing[key] = (stage, EXPIRED_AFTER)
            elif key not in handled:
                closing[key] = (stage, NO_LONGER_DUE)
        if closing and not dry_run:
            finished = utcnow()
            for reason in (EXPIRED_AFTER, NO_LONGER_DUE):
                keys = [key for key, (_, why) in closing.items() if why == reason]
                if keys:
                    connection.execute(update(Send).where(one_of(Send.send_key, keys, engine.dialect.name),
                                                          col(Send.status) == SendStatus.DEFERRED)
                                       .values(status=SendStatus.EXPIRED, finished_at=finished, error=reason))
    return [closing[key] for key in closing if key not in handled]


def record(engine: Engine, outcomes: Sequence[Decision]) -> None:
    """Mark sent and failed keys; delete claims the server deferred, so a later run retries."""
    now = utcnow()
    finished = [o for o in outcomes if o.status in (SendStatus.SENT, SendStatus.FAILED)]
    released = [o.send_key for o in outcomes if o.status is None]
    with engine.begin() as connection:
        if finished and engine.dialect.name == "postgresql":
            # The window in one statement: as executemany, one UPDATE a mail, each parsed,
            # planned and run by the server, was the ledger's largest cost per send.
            connection.execute(_recorded(now), {
                "b_send_key": [o.send_key for o in finished], "b_status": [str(o.status) for o in finished],
                "b_smtp_reply": [o.reply[:1000] for o in finished], "b_error": [o.error[:1000] for o in finished]})
        elif finished:  # SQLite: executemany, compiled once, run in process
            connection.execute(
                update(Send)
                .where(col(Send.send_key) == bindparam("b_key"), _in_progress())
                .values(status=bindparam("b_status"), smtp_reply=bindparam("b_reply"), error=bindparam("b_error"),
                        finished_at=now)
                .execution_options(synchronize_session=False),
                [{"b_key": o.send_key, "b_status": str(o.status), "b_reply": o.reply[:1000],
                  "b_error": o.error[:1000]} for o in finished],
            )
        if released:
            _release(connection, released)


def _in_progress() -> ColumnElement[bool]:
    """``status IN ('claimed', 'sending')``, spelt out: executemany cannot expand an IN list."""
    return or_(*(col(Send.status) == status for status in IN_PROGRESS))


def _recorded(finished_at: datetime) -> Update:
    """``UPDATE sends SET status = outcome.status, … FROM unnest(:b_send_key, …) AS outcome``: the
    outcomes of a window as one array per column, as ``_unnested_insert`` binds a claim."""
    names = ("send_key", "status", "smtp_reply", "error")
    columns = [inspect(Send).local_table.c[name] for name in names]
    given = (func.unnest(*(bindparam(f"b_{c.name}", type_=ARRAY(c.type)) for c in columns))
             .table_valued(*names).render_derived(name="outcome"))
    return (update(Send).where(col(Send.send_key) == given.c.send_key, _in_progress())
            .values(status=given.c.status, smtp_reply=given.c.smtp_reply, error=given.c.error,
                    finished_at=finished_at)
            .execution_options(synchronize_session=False))


def release(engine: Engine, keys: Sequence[str]) -> int:
    """Free claims that never reached the server (or that ops checked by hand)."""
    if not keys:
        return 0
    with engine.begin() as connection:
        return _release(connection, keys)


def _release(connection: Connection, keys: Sequence[str]) -> int:
    """A claim taken over from a deferral goes back to being that deferral, its moment and
    expiry kept (relay trouble must not stretch ``deferred_expires_after``); any other is
    deleted, as if never claimed."""
    dialect = connection.dialect.name
    undeferred = connection.execute(
        update(Send).where(one_of(Send.send_key, keys, dialect), col(Send.status).in_(IN_PROGRESS),
                           col(Send.not_before).is_not(None)).values(status=SendStatus.DEFERRED)).rowcount or 0
    deleted = connection.execute(
        delete(Send).where(one_of(Send.send_key, keys, dialect), col(Send.status).in_(IN_PROGRESS))).rowcount or 0
    return undeferred + deleted


def in_doubt(engine: Engine, older_than: timedelta = timedelta(minutes=10)) -> list[Send]:
    """Claims left in ``sending`` longer than any live run keeps them: their run died."""
    cutoff = utcnow() - older_than
    with engine.connect() as connection:
        rows = connection.execute(
            select(Send).where(col(Send.status) == SendStatus.SENDING, col(Send.claimed_at) < cutoff)
            .order_by(col(Send.claimed_at))
        )
        return [Send.model_validate(row._mapping) for row in rows]
