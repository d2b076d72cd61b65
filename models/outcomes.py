"""What each mail earned: the clicks and opens it drew, and the orders attributed to it.

``engagements`` keeps one row per recorded click or open: which send, which link, when,
and whether a machine made it. It never keeps the IP address or the user agent, only
what the request was judged to be (``machine``: empty for a person; ``head``,
``scanner`` or ``too_soon`` otherwise, see ``flows.tracking.clicks``). A repeat of the
same click within the de-duplication window adds to ``repeats`` instead of a row.

``attributions`` keeps one row per order the attribution has looked at, attributed or
not (``send_id`` NULL), so a report reads attributions and never the event log, and the
next incremental run knows which orders it has already seen.

``experiment_looks`` keeps each look the winner rule took at a journey step's experiment,
with its figures: the last one with a winner decides who gets later mail.
"""

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Column, Index, Text
from sqlmodel import Field, SQLModel

from models.types import UtcDateTime


class EngagementKind(StrEnum):
    CLICK = "click"
    OPEN = "open"


class Engagement(SQLModel, table=True):
    __tablename__ = "engagements"
    __table_args__ = (
        # Attribution: a customer's touches before an order, newest first.
        Index("ix_engagements_customer_at", "customer_id", "at"),
        # De-duplication: the latest recorded click on one link of one send.
        Index("ix_engagements_send_link_at", "send_id", "link", "at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    send_id: int = Field(foreign_key="sends.id")
    customer_id: int = Field(foreign_key="customers.id")
    kind: str = Field(max_length=8, description="click or open")
    link: int = Field(default=-1, description="The link's position in the mail; -1 for an open.")
    at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    machine: str = Field(default="", max_length=16, description="Empty for a person; else why not.")
    repeats: int = Field(default=0, description="Further requests folded into this one.")


class AttributionBasis(StrEnum):
    CLICK = "click"
    DELIVERY = "delivery"
    OPEN = "open"


class Attribution(SQLModel, table=True):
    __tablename__ = "attributions"
    __table_args__ = (Index("ix_attributions_trigger_placed", "trigger", "placed_at"),)

    order_id: int = Field(foreign_key="orders.id", primary_key=True)
    customer_id: int = Field(foreign_key="customers.id", index=True)
    placed_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False, index=True))
    total_cents: int = Field(default=0)
    currency: str = Field(max_length=3)
    send_id: int | None = Field(default=None, foreign_key="sends.id", index=True)
    trigger: str | None = Field(default=None, max_length=64)
    stage: str = Field(default="", max_length=32)
    template: str = Field(default="", max_length=255)
    basis: str = Field(default="", max_length=8, description="click, delivery or open; empty if unattributed")
    touched_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime()))


class ExperimentLook(SQLModel, table=True):
    """One look of the winner rule (``flows.analysis.experiments.pick_winner``) at one step's
    experiment; a new ``salt`` is a new experiment, with looks of its own."""

    __tablename__ = "experiment_looks"

    trigger: str = Field(max_length=64, primary_key=True)
    step: str = Field(max_length=64, primary_key=True)
    salt: str = Field(max_length=64, primary_key=True)
    look: int = Field(primary_key=True)
    checkpoint: int
    winner: str | None = Field(default=None, max_length=64)
    reason: str = Field(max_length=1000)
    figures: str = Field(sa_column=Column(Text, nullable=False), description="The decision as JSON.")
    decided_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
