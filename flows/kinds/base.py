"""What a trigger kind is: a strict spec model plus the SQL that finds who is due."""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal

from sqlalchemy import Select
from typing_extensions import TypeVar

from flows.spec.trigger import TriggerBase

Category = Literal["marketing", "transactional"]
Reference = Literal["cart", "complaint", "consent"]
# A due query: ``customer_id``, ``ref_id`` and ``ref_time``, each kind with its own column types.
DueQuery = Select[*tuple[Any, ...]]
# Each kind's functions take its own spec model; a bare ``Kind`` (the registry's) is any of them.
SpecT = TypeVar("SpecT", bound=TriggerBase, default=Any)


@dataclass(frozen=True)
class Kind(Generic[SpecT]):
    """One trigger kind.

    ``due(spec, now)`` selects ``customer_id``, ``ref_id`` and ``ref_time``: one row per
    occurrence that is due at ``now``. A query over customers alone must be a plain filter
    (no grouping, one row per customer): the audience folds it into its own query.
    ``occurrence(spec, now, ref_id, ref_time)`` names that occurrence for the send key
    (``ref_time`` comes in naive UTC, as stored), so the same cart state, complaint,
    onboarding day or campaign slot is never mailed twice.
    """

    name: str
    spec: type[SpecT]
    category: Category
    due: Callable[[SpecT, datetime], DueQuery]
    occurrence: Callable[[SpecT, datetime, int | None, datetime | None], str]
    reference: Reference | None = None


def stamp(moment: datetime | None) -> str:
    """A compact, sortable UTC stamp for send keys (``moment`` in UTC, aware or naive)."""
    assert moment is not None
    # strftime's "%Y%m%dT%H%M%SZ" at a third of the cost: audiences stamp hundreds of thousands of keys.
    m = moment
    return f"{m.year * 10000 + m.month * 100 + m.day:08d}T{m.hour * 10000 + m.minute * 100 + m.second:06d}Z"
