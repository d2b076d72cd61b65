"""The send ledger: one row per send key, claimed before sending and marked after.

States (a row only ever moves forward):

``claimed``  reserved by a run, not yet handed to the SMTP server (a holdout's row on its
             way to ``held_out``; or a lapsed claim a later window takes over). If the run
             dies, a later run takes it over once the claim is older than the lease
             (``LIFECYCLE_CLAIM_LEASE_SECONDS``), and sends it: nothing reached the server,
             so nothing is sent twice.
``sending``  handed to the SMTP server: the send path claims a window of keys straight
             into this state (``flows.send.claims.hand_over``), just before the window's
             first DATA; it becomes ``sent`` when its window is recorded. If the run is
             killed in between, the server may or may not have accepted it: the row is "in
             doubt" — at most ``LIFECYCLE_IN_FLIGHT`` per sending process. It is never
             sent again automatically (a duplicate is worse than a gap); ``lifecycle
             ledger in-doubt`` lists them and ``lifecycle ledger release`` frees
             them once ops have checked the SMTP server's log.
``sent``     the server accepted it (``smtp_reply`` holds the reply).
``failed``   permanently rejected (5xx) or not renderable; never retried.
``deferred`` held back by the sending policy (frequency cap, quiet hours) until
             ``not_before``; the next run after that moment claims and sends it.
``expired``  deferred past its trigger's ``deferred_expires_after``, or no longer due
             when its moment came (its campaign slot's send window passed, the cart
             was ordered…): not sent. ``error`` says which.
``bounced``  sent, then reported undeliverable by a DSN or a provider (``feedback``).
``complained`` sent, then reported as spam by its recipient (``feedback``).
``held_out`` in the trigger's holdout group (``holdout:``): never sent, on purpose. It
             counts for re-entry and the frequency cap exactly like a send, so the held-out
             and the mailed stay comparable (``flows.audience.holdout``).
``passed``   a journey step whose conditions (``when:``) did not hold when it was due: not
             sent, and the journey goes on from it as from a sent step.
``exited``   the customer reached one of the journey's ``exit_when`` goals before this step
             (``error`` names it): not sent, and no later step follows.

A journey keeps its state in these rows alone (``flows.audience.journey``): each step's row
has the step's name in ``step`` and its key extends the entry's key (the first step's key is
the entry's own), so who is due for a step is one query over the ledger at any ``now``.

A temporary failure that outlasts its retries deletes the claim, so the next run
tries again: the server said no, so nothing was sent.
"""

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Column, ColumnElement, Index, Text, func, literal_column
from sqlmodel import Field, SQLModel

from models.types import UtcDateTime

# Percent of a ``sends`` page that inserts fill on PostgreSQL: the rest is for the rows' HOT updates.
FILLFACTOR = 45


class SendStatus(StrEnum):
    CLAIMED = "claimed"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    DEFERRED = "deferred"
    EXPIRED = "expired"
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    HELD_OUT = "held_out"
    PASSED = "passed"
    EXITED = "exited"


class Send(SQLModel, table=True):
    __tablename__ = "sends"
    __table_args__ = (
        Index("ix_sends_trigger_customer_evaluated", "trigger", "customer_id", "evaluated_at"),
        Index("ix_sends_customer_category_evaluated", "customer_id", "category", "evaluated_at"),
        # Deferrals whose moment has come: every deferral has a ``not_before`` (and keeps it once
        # sent), most sends never had one, so the partial index holds a small share of the rows.
        Index("ix_sends_trigger_not_before", "trigger", "not_before",
              postgresql_where=Column("not_before").is_not(None), sqlite_where=Column("not_before").is_not(None)),
        # A journey step's audience: the rows of the step before it, old enough.
        Index("ix_sends_trigger_step_evaluated", "trigger", "step", "evaluated_at"),
        # One mailbox, one mail: customers sharing an address are one recipient, so the same
        # occurrence of a trigger goes to a mailbox once, whichever runs race for it. Frequency
        # caps and re-entry find the mailbox's sends through it too.
        Index("ux_sends_address_trigger_occurrence", func.lower(Column("email")), "trigger", "occurrence", unique=True),
        # Bounces name a send by its Message-ID's digest (a VERP token) or its whole Message-ID.
        Index("ix_sends_message_digest", func.substr(Column("message_id"), literal_column("2"), literal_column("32"))),
        # A send's state changes (``sending``, then ``sent`` with its reply) touch no indexed
        # column, not even an index's WHERE: PostgreSQL then updates the row in place on its page
        # (a HOT update), writing no index entry. The free room a page keeps for that new row
        # version is the fillfactor's; a run's own read transaction keeps old versions alive
        # until it ends, so each row needs room for two on its page (migration 0011).
        {"postgresql_with": {"fillfactor": FILLFACTOR}},
    )

    id: int | None = Field(default=None, primary_key=True)
    send_key: str = Field(max_length=255, unique=True, description="trigger/customer/occurrence")
    trigger: str = Field(max_length=64)
    customer_id: int = Field(foreign_key="customers.id")
    occurrence: str = Field(max_length=128)
    category: str = Field(default="marketing", max_length=16, description="marketing or transactional")
    ref_id: int | None = Field(default=None, description="The cart or complaint the mail is about.")
    status: str = Field(max_length=16)  # in no index: see ``__table_args__``
    run_id: str = Field(max_length=64)
    stage: str = Field(default="", max_length=32)
    template: str = Field(default="", max_length=255)
    email: str = Field(max_length=320)
    message_id: str = Field(default="", max_length=255)
    evaluated_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    claimed_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    finished_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime()))
    not_before: datetime | None = Field(default=None, sa_column=Column(UtcDateTime()))
    expires_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime()))
    smtp_reply: str = Field(default="", max_length=1000)
    error: str = Field(default="", max_length=1000)
    # The destinations of the mail's tracked links, one per line, in order: a click token names
    # a position here, so the destination always comes from the mail that was sent
    # (``flows.tracking``). Text, not JSON: PostgreSQL's batch insert unnests arrays.
    links: str | None = Field(default=None, sa_column=Column(Text))
    step: str = Field(default="", max_length=64, description="The journey step; empty for a trigger's one mail.")
    variant: str = Field(default="", max_length=64, description="The step's experiment arm; empty if none.")
    experiment: str = Field(default="", max_length=64,
                            description="The salt of the experiment the arm was drawn in: a new salt, a new one.")
    # A journey's entry moment, on each of its rows: "since the entry" is measured from it, never
    # from the moment a deferred first mail went out (NULL before journeys).
    entered_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime()))


def message_digest(message_id: Any) -> ColumnElement[str]:
    """The send key's digest a Message-ID starts with (``<DIGEST@domain>``), as the index has it.

    Spelt with literal positions: a database matches an expression index only to the very
    same expression, and bound parameters are not.
    """
    return func.substr(message_id, literal_column("2"), literal_column("32"))
