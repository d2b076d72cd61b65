"""Who is due for a journey step: one query over the ledger at ``now``, never a workflow per customer.

A journey's state is its rows in ``sends`` (``models.ledger``). The first step is the entry:
the trigger's kind finds who enters, exactly as for a single mail, and the first step's key
is the entry's own key. Every later step's key extends the entry's key with ``/`` and the
step's name, and its row says what became of it: sent, held out, passed (its ``when`` did
not hold), exited (a goal was reached), or deferred by the policy. So who is due for step
*k* is: the rows of the step before it (sent, held out or passed) at least ``wait`` old,
with no decided row of step *k* yet, no sibling branch taken, and then, as columns of the
same query, whether a goal was reached since the entry and whether the step's conditions
hold. Replaying any ``now`` replays the journey: nothing else holds its state.
"""

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import (
    ColumnElement,
    Engine,
    Float,
    String,
    and_,
    case,
    exists,
    func,
    literal,
    not_,
    null,
    or_,
    select,
    true,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import aliased
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlmodel import col

from flows.kinds.base import DueQuery
from flows.spec.journey import EventCondition, ExitGoal, StepPlan, When, plans
from flows.spec.trigger import TriggerBase
from models import CartItem, CategoryOptOut, Customer, Engagement, EngagementKind, Event, Order, Send, SendStatus

# A step's row that the next step follows: the mail went (or was held out, or the step was
# passed). A bounce or a complaint suppresses the address: the next step skips it as
# suppressed, in place. A failed step (refused, not renderable) ends the journey there.
DONE = (SendStatus.SENT, SendStatus.BOUNCED, SendStatus.COMPLAINED, SendStatus.HELD_OUT, SendStatus.PASSED)
# What counts as an entry for re-entry: the first step's row, whatever became of it but a
# release; rows from before the trigger had steps (step "") are entries too.
ENTERED = (SendStatus.CLAIMED, SendStatus.SENDING, SendStatus.SENT, SendStatus.BOUNCED, SendStatus.COMPLAINED,
           SendStatus.HELD_OUT, SendStatus.PASSED)


@dataclass(frozen=True)
class Refs:
    """What a step's conditions compare with: the entry's moment, key, stage and reference
    (the cart), and the customer's current stage, all as columns of the audience query."""

    entered: ColumnElement[datetime]
    entry_key: ColumnElement[str]
    ref_id: ColumnElement[int | None]
    entry_stage: ColumnElement[str] | None
    stage: ColumnElement[str]
    category: str


def step_key(entry_key: ColumnElement[str], step: str, first_step: str) -> ColumnElement[str]:
    """A step's send key: the entry's own for the first step, the entry's + ``/step`` after it."""
    return entry_key if step == first_step else entry_key + literal("/" + step, String())


def _strip(value: ColumnElement[str], suffix: str) -> ColumnElement[str]:
    """``value`` without its last ``len(suffix)`` characters."""
    return func.substr(value, 1, func.length(value) - len(suffix))


def entry_key_of(key: ColumnElement[str], step: str) -> ColumnElement[str]:
    """The entry's key from a later step's own key (``ENTRY/step``)."""
    return _strip(key, "/" + step)


def step_due(trigger: str, plan: StepPlan, now: datetime, expires_after: timedelta) -> DueQuery:
    """The rows due for a later step (not the first): ``customer_id``, ``ref_id``, ``ref_time``
    (the entry's moment), ``occurrence``, ``send_key``, ``previous_at`` and ``entry_stage``.

    Only rows whose step fell due within ``expires_after`` (the trigger's
    ``step_expires_after``): a step that could not go for that long is not sent late, and the
    query reads the last days' rows of the step before, never every entry there ever was."""
    assert plan.previous is not None, "the first step's audience is its kind's"
    previous = aliased(Send, name="previous")
    first = plan.previous == plan.first_step
    suffix = "" if first else "/" + plan.previous
    previous_key = cast(ColumnElement[str], previous.send_key)
    previous_occurrence = cast(ColumnElement[str], previous.occurrence)
    entry_key = previous_key if first else _strip(previous_key, suffix)
    entry_occurrence = previous_occurrence if first else _strip(previous_occurrence, suffix)
    key = step_key(entry_key, plan.name, plan.first_step)
    decided = aliased(Send, name="decided")
    query: DueQuery = (select(col(previous.customer_id).label("customer_id"), col(previous.ref_id).label("ref_id"))
             .where(col(previous.trigger) == trigger, col(previous.step) == plan.previous,
                    col(previous.status).in_(DONE), col(previous.evaluated_at) <= now - plan.step.wait,
                    col(previous.evaluated_at) > now - plan.step.wait - expires_after,
                    # A deferral of this step is still due (the policy held it), and so is a claim (a
                    # dead run's is taken over once its lease is out: ``_mark_already_sent``); any
                    # other row decided it.
                    ~exists().where(col(decided.send_key) == key, col(decided.trigger) == trigger,
                                    col(decided.step) == plan.name,
                                    col(decided.status).not_in((SendStatus.DEFERRED, SendStatus.CLAIMED)))))
    # A step added to a live journey is not sent to who is already past it, and a sibling
    # branch taken rules this one out.
    for other in (*plan.rivals, *plan.later):
        taken = aliased(Send, name="taken")
        # The trigger and step as well as the key, though the key alone decides: PostgreSQL
        # otherwise hashes the whole ledger to probe it (1.5 s at 900,000 rows).
        query = query.where(~exists().where(col(taken.send_key) == step_key(entry_key, other, plan.first_step),
                                            col(taken.trigger) == trigger, col(taken.step) == other))
    if first:
        entered = func.coalesce(col(previous.entered_at), col(previous.evaluated_at))
        entry_stage = col(previous.stage)
    else:
        entry = aliased(Send, name="entry")
        query = query.join(entry, col(entry.send_key) == entry_key)
        entered = func.coalesce(col(previous.entered_at), col(entry.evaluated_at))
        entry_stage = col(entry.stage)
    return query.add_columns(entered.label("ref_time"),
                             (entry_occurrence + literal("/" + plan.name, String())).label("occurrence"),
                             key.label("send_key"), col(previous.evaluated_at).label("previous_at"),
                             entry_stage.label("entry_stage"))


def condition(when: When | None, refs: Refs, now: datetime, first_step: str) -> ColumnElement[bool]:
    """``when`` as one boolean column (all of its parts hold); true without one."""
    if when is None:
        return true()
    parts: list[ColumnElement[bool]] = []
    if when.stage is not None:
        parts.append(refs.stage.in_(when.stage))
    cart_value = (select(func.coalesce(func.sum(col(CartItem.price_cents) * col(CartItem.quantity)), 0))
                  .where(col(CartItem.cart_id) == refs.ref_id).scalar_subquery())
    if when.min_cart_value is not None:
        parts.append(cart_value >= round(when.min_cart_value * 100))
    if when.max_cart_value is not None:
        parts.append(cart_value <= round(when.max_cart_value * 100))
    if when.min_cart_items is not None:
        items = (select(func.coalesce(func.sum(col(CartItem.quantity)), 0))
                 .where(col(CartItem.cart_id) == refs.ref_id).scalar_subquery())
        parts.append(items >= when.min_cart_items)
    if when.ordered_since_entry is not None:
        ordered = ordered_since(refs, now)
        parts.append(ordered if when.ordered_since_entry else not_(ordered))
    if when.clicked is not None:
        parts.append(_clicked(refs, when.clicked, first_step, now))
    if when.not_clicked is not None:
        parts.append(not_(_clicked(refs, when.not_clicked, first_step, now)))
    if when.event_since_entry is not None:
        parts.append(event_since(refs, when.event_since_entry, now))
    if when.no_event_since_entry is not None:
        parts.append(not_(event_since(refs, when.no_event_since_entry, now)))
    for field, value in (when.customer or {}).items():
        parts.append(func.coalesce(getattr(Customer, field), "") == value)
    return and_(*parts) if parts else true()


def ordered_since(refs: Refs, now: datetime) -> ColumnElement[bool]:
    # Its own alias: the audience query joins ``orders`` for the stage, and a subquery over
    # the same table would correlate to that join instead of reading the table.
    order = aliased(Order, name="since_entry")
    return exists().where(col(order.customer_id) == col(Customer.id), col(order.placed_at) > refs.entered,
                          col(order.placed_at) <= now)


def event_since(refs: Refs, event: str | EventCondition, now: datetime) -> ColumnElement[bool]:
    """Such an event since the entry: by its name (an exit goal), or as a step's condition
    states it, with its property within bounds."""
    stated = event if isinstance(event, EventCondition) else EventCondition(name=event)
    parts = [col(Event.user_id) == col(Customer.external_id), col(Event.name) == stated.name,
             col(Event.timestamp) > refs.entered, col(Event.timestamp) <= now]
    if stated.property is not None:
        value = JsonNumber(col(Event.payload), literal("properties", String()), literal(stated.property, String()))
        if stated.at_least is not None:
            parts.append(value >= stated.at_least)
        if stated.at_most is not None:
            parts.append(value <= stated.at_most)
    return exists().where(*parts)


class JsonNumber(FunctionElement[float]):
    """A JSON document's number at a path of keys, NULL for anything else there: a missing
    key, ``null``, or a string (``"7"``), which PostgreSQL would refuse to cast and so fail
    the whole audience over one odd event."""

    type = Float()
    name = "json_number"
    inherit_cache = True


@compiles(JsonNumber, "sqlite")
def _json_number_sqlite(element: JsonNumber, compiler: SQLCompiler, **kw: Any) -> str:
    document, *keys = (compiler.process(clause, **kw) for clause in element.clauses)
    # Keys are plain names (``EventCondition.property``, "properties"): no quoting needed.
    path = " || ".join(["'$'", *(f"'.' || {key}" for key in keys)])
    return (f"CASE WHEN json_type({document}, {path}) IN ('integer', 'real') "
            f"THEN json_extract({document}, {path}) END")


@compiles(JsonNumber, "postgresql")
def _json_number_postgresql(element: JsonNumber, compiler: SQLCompiler, **kw: Any) -> str:
    document, *keys = (compiler.process(clause, **kw) for clause in element.clauses)
    value = f"({document})" + "".join(f" -> {key}" for key in keys)
    text = f"({document})" + "".join(f" -> {key}" for key in keys[:-1]) + f" ->> {keys[-1]}"
    return f"CASE WHEN json_typeof({value}) = 'number' THEN CAST({text} AS DOUBLE PRECISION) END"


def _clicked(refs: Refs, step: str, first_step: str, now: datetime) -> ColumnElement[bool]:
    """A person (not a scanner) clicked the mail of ``step`` of this very entry by ``now``."""
    clicked = aliased(Send, name="clicked_send")
    return exists().where(col(clicked.send_key) == step_key(refs.entry_key, step, first_step),
                          col(Engagement.send_id) == col(clicked.id),
                          col(Engagement.kind) == EngagementKind.CLICK, col(Engagement.machine) == "",
                          col(Engagement.at) <= now)


def goal_label(goal: ExitGoal) -> str:
    """How the ledger (``error``) and the reports name a goal: ``ordered``, ``event:NAME``…"""
    if goal.ordered:
        return "ordered"
    if goal.event is not None:
        return f"event:{goal.event}"
    if goal.stage_changed_to is not None:
        return f"stage_changed_to:{goal.stage_changed_to}"
    return "unsubscribed"


def exit_reason(goals: tuple[ExitGoal, ...], refs: Refs, now: datetime) -> ColumnElement[str | None]:
    """The first goal the customer reached since the entry (its label), or NULL."""
    if not goals:
        return cast(ColumnElement[str | None], null())
    whens: list[tuple[ColumnElement[bool], str]] = []
    for goal in goals:
        if goal.ordered:
            reached = ordered_since(refs, now)
        elif goal.event is not None:
            reached = event_since(refs, goal.event, now)
        elif goal.stage_changed_to is not None:
            target = goal.stage_changed_to
            reached = and_(refs.stage == target,
                           true() if refs.entry_stage is None else refs.entry_stage != target)
        else:
            reached = or_(col(Customer.marketing_consent).is_(False),
                          exists().where(col(CategoryOptOut.customer_id) == col(Customer.id),
                                         col(CategoryOptOut.category) == refs.category))
        whens.append((reached, goal_label(goal)))
    return case(*whens, else_=null())


def step_columns(plan: StepPlan, refs: Refs, now: datetime) -> list[ColumnElement[Any]]:
    """The audience's extra columns for a step, read by the classifier in this order: whether
    the step's conditions hold, the goal reached since the entry, and for a later step the
    previous row's moment, the occurrence and the key (NULL for the first: its kind names them)."""
    holds = condition(plan.step.when, refs, now, plan.first_step).label("holds")
    if plan.first:  # nothing to exit yet: every goal is "since the entry"
        return [holds, null().label("exit_goal"), null().label("previous_at"), null().label("step_occurrence"),
                null().label("step_key")]
    return [holds, exit_reason(plan.exits, refs, now).label("exit_goal")]


def branch_taken(plan: StepPlan, refs: Refs, now: datetime) -> ColumnElement[bool]:
    """For a step that opens a branch: its branch is the one taken (first match wins). The
    customers another branch takes are no rows of this step's audience at all."""
    if not plan.opens_branch:
        return true()
    return and_(condition(plan.branch, refs, now, plan.first_step),
                *(not_(condition(when, refs, now, plan.first_step)) for when in plan.passed_over))


def entry_rows(first_step: str) -> ColumnElement[bool]:
    """The ledger rows that are entries of a journey whose first step is ``first_step`` (rows
    written before the trigger had steps, with the empty step, are entries too)."""
    return col(Send.step).in_(("", first_step))


def at_moment(previous_at: datetime, wait: timedelta, at: time, zone: ZoneInfo) -> datetime:
    """The first ``at`` (local, in ``zone``) once ``wait`` after ``previous_at`` is over."""
    ready = (previous_at + wait).astimezone(zone)
    moment = datetime.combine(ready.date(), at, tzinfo=zone)
    if moment < ready:
        moment = datetime.combine(ready.date() + timedelta(days=1), at, tzinfo=zone)
    return moment.astimezone(previous_at.tzinfo)



def stranded(engine: Engine, trigger: TriggerBase) -> dict[str, int]:
    """Customers a changed journey file leaves with no way on, by the removed step(s) they reached.

    A customer goes on from the step they reached, matched by name: a removed step is
    skipped, since the step after it follows the row before it. Stranded are those whose
    rows name a step the file no longer has and from which no step of the file follows (a
    renamed first step, a removed branch): neither exited nor at the end of a path. Only
    read when some row names a step the file does not have, so an unchanged journey costs
    one index lookup.
    """
    journey = trigger.journey
    if journey is None:
        return {}
    steps = plans(journey)
    current = {plan.name for plan in steps}
    with engine.connect() as connection:
        gone = connection.execute(select(col(Send.step)).where(
            col(Send.trigger) == trigger.name, col(Send.step) != "", col(Send.step).not_in(current)).limit(1)).first()
        if gone is None:
            return {}
        rows = connection.execute(select(col(Send.send_key), col(Send.step), col(Send.status)).where(
            col(Send.trigger) == trigger.name, col(Send.step) != ""))
        entries: dict[str, dict[str, str]] = {}
        for key, step, status in rows:
            entry = key[: -len(step) - 1] if key.endswith("/" + step) else key
            entries.setdefault(entry, {})[step] = status
    leaves = current - {plan.previous for plan in steps if plan.previous is not None}
    counts: Counter[str] = Counter()
    for reached in entries.values():
        removed = sorted(step for step in reached if step not in current)
        if not removed or SendStatus.EXITED in reached.values() or leaves & reached.keys():
            continue
        if any(plan.previous in reached and reached[plan.previous] in DONE and plan.name not in reached
               and not any(rival in reached for rival in plan.rivals) for plan in steps if plan.previous):
            continue
        counts[", ".join(removed)] += 1
    return dict(counts)
