"""Who is due: one set-based query per trigger, streamed in batches, with skip reasons.

The query joins the kind's due occurrences to customers, their stage, suppressions
and the trigger's send history, so each row arrives with everything needed to decide
"send" or "skip, because …" without another query per customer.
"""

from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    Connection,
    DateTime,
    Engine,
    Row,
    Select,
    String,
    and_,
    exists,
    false,
    func,
    inspect,
    literal,
    or_,
    select,
    true,
    type_coerce,
)
from sqlmodel import Session, col

from flows.audience import journey
from flows.audience.shards import Shard
from flows.audience.stage_sql import customer_stage, order_count, order_value, with_orders
from flows.audience.timing import QUIET_HOURS, capped, customer_zone, longest_window, next_allowed
from flows.consent import suppressed_for
from flows.content.render import language_of
from flows.kinds.base import Kind
from flows.memory import frozen_heap
from flows.outcomes import Outcome
from flows.send.claims import awaiting
from flows.spec.common import Reentry
from flows.spec.journey import StepPlan
from flows.spec.policy import Policy
from flows.spec.stages import StageRules
from flows.spec.trigger import TriggerBase
from models import (
    CategoryOptOut,
    Customer,
    Send,
    SendStatus,
)
from models.db import one_of
from models.types import UtcDateTime, utcnow


class Candidate(NamedTuple):
    """One customer due for one occurrence (a tuple: audiences run to hundreds of thousands)."""

    customer_id: int
    external_id: str
    email: str | None
    first_name: str | None
    last_name: str | None
    locale: str
    language: str
    stage: str
    ref_id: int | None
    occurrence: str
    send_key: str
    skip: Outcome | None = None
    timezone: str | None = None
    not_before: datetime | None = None  # set when deferred by the policy
    deferred: bool = False  # the ledger holds a deferral of this very key
    shared: bool = False  # another customer record has the same mailbox (marketing only)
    variant: str = ""  # a journey step's experiment arm, drawn when the mail is due
    reason: str = ""  # why a journey step was exited (the goal), for the ledger
    entered_at: datetime | None = None  # a journey's entry moment (its first step: this run's)


def send_key(trigger: str, customer_id: int, occurrence: str) -> str:
    return f"{trigger}/{customer_id}/{occurrence}"


# A query of any columns (the audience's are read positionally, see ``_classifier``).
AnySelect = Select[*tuple[Any, ...]]
AnyRow = Row[*tuple[Any, ...]]


def audience_query(trigger: TriggerBase, kind: Kind, rules: StageRules, now: datetime,
                   deferred_only: bool = False, step: StepPlan | None = None,
                   customer: int | None = None, shard: Shard | None = None) -> AnySelect:
    """Everyone due, in customer order, each customer's stage computed once.

    ``deferred_only`` keeps the customers with a deferral of this trigger that has come
    due (the deferred sweep): their deferrals are decided exactly as fresh mail is, by
    the same query, so a deferral never outlives its occurrence's window or audience.

    For a journey ``step``, the first step's audience is the kind's (the entry) and a later
    step's is the ledger's (``flows.audience.journey.step_due``); either way the step's
    conditions and the goals reached come out as columns (``journey.step_columns``).
    ``customer``: only that customer's rows (``lifecycle customer``: what a run would decide now).
    ``shard``: only its slice (``flows.audience.shards``), filtered with the due rows themselves,
    before anything is looked up for them.
    """
    due = kind.due(trigger, now) if step is None or step.first else journey.step_due(trigger.name, step, now,
                                                                                      trigger.step_expires_after)
    if shard is not None:
        due = due.where(shard.where(due.selected_columns.customer_id))
    extra: list[Any] = []  # a later step's own columns of its due rows, grouped like the occurrence
    if _over_customers(due):
        # The kind's filter goes straight into this query: joining customers to a
        # subquery over customers cost a second lookup per customer.
        columns = due.selected_columns
        ref_id, ref_time = columns.ref_id, columns.ref_time
        occurrence: list[Any] = [col(Customer.id)]  # one row per customer; both databases accept its columns
        base: AnySelect = select().select_from(Customer).where(true() if due.whereclause is None else due.whereclause)
    else:
        subquery = due.subquery("due")
        ref_id, ref_time = subquery.c.ref_id, subquery.c.ref_time
        if step is not None and not step.first:
            extra = [subquery.c.previous_at, subquery.c.occurrence, subquery.c.send_key]
        # One group per occurrence (the kind's due rows are one per occurrence).
        occurrence = [col(Customer.id), ref_id, ref_time, *extra]
        base = select().select_from(subquery).join(Customer, col(Customer.id) == subquery.c.customer_id)
    stage = customer_stage(rules, now)
    audience = trigger.audience
    refs = None
    if step is not None:
        later = not step.first
        refs = journey.Refs(entered=ref_time if later else literal(now, UtcDateTime()),
                            entry_key=journey.entry_key_of(subquery.c.send_key, step.name) if later else literal(""),
                            ref_id=ref_id, entry_stage=subquery.c.entry_stage if later else None, stage=stage,
                            category=kind.name)
        if later:
            occurrence.append(subquery.c.entry_stage)

    query = base.add_columns(  # read positionally by _classifier: keep the order
        col(Customer.id),
        col(Customer.external_id),
        col(Customer.email),
        col(Customer.first_name),
        col(Customer.last_name),
        col(Customer.locale),
        col(Customer.marketing_consent),
        col(Customer.consent_requested_at).is_not(None).label("consent_requested"),
        col(Customer.timezone),
        ref_id,
        # Naive UTC as stored: occurrences only stamp it, and attaching a zone costs
        # more than parsing (a microsecond a row).
        type_coerce(ref_time, DateTime()).label("ref_time"),
        stage.label("stage"),
        suppressed_for(kind).label("suppressed"),
        exists().where(col(CategoryOptOut.customer_id) == col(Customer.id),
                       col(CategoryOptOut.category) == kind.name).label("opted_out"),
        _reentry_blocked(trigger, now, step).label("reentry_blocked"),
    )
    if step is not None and refs is not None:
        query = query.add_columns(*journey.step_columns(step, refs, now), *extra)
    if customer is not None:
        query = query.where(col(Customer.id) == customer)
    if deferred_only:  # driven by the few deferrals, not by a probe per customer
        query = query.where(col(Customer.id).in_(select(col(Send.customer_id))
                                                 .where(awaiting(trigger.name, now, ledger_steps(step)))))
    if audience.locales:
        query = query.where(func.lower(func.substr(Customer.locale, 1, 2)).in_(audience.locales))
    # Grouped and ordered alike, so that both databases stream it without sorting.
    query = with_orders(query, Customer.id, now).group_by(*occurrence).order_by(*occurrence)
    if audience.stages:
        query = query.having(stage.in_(audience.stages))
    if audience.min_orders is not None:
        query = query.having(order_count() >= audience.min_orders)
    if audience.max_orders is not None:
        query = query.having(order_count() <= audience.max_orders)
    if audience.min_lifetime_value is not None:
        query = query.having(order_value() >= round(audience.min_lifetime_value * 100))
    if audience.max_lifetime_value is not None:
        query = query.having(order_value() <= round(audience.max_lifetime_value * 100))
    if step is not None and step.opens_branch and refs is not None:
        query = query.having(journey.branch_taken(step, refs, now))
    return query


def ledger_steps(step: StepPlan | None) -> tuple[str, ...]:
    """What ``sends.step`` holds for the mail of ``step``: empty for a trigger's one mail; for a
    journey's first step, its name, or empty on rows from before the trigger had steps (the
    same keys: a deferral of the single mail is the first step's)."""
    if step is None:
        return ("",)
    return ("", step.name) if step.first else (step.name,)


def _over_customers(due: AnySelect) -> bool:
    """A kind's due query that only filters customers (see ``Kind``)."""
    return due.get_final_froms() == [inspect(Customer).local_table]


# A send that happened (or may have): it counts for re-entry and frequency caps. So does a
# held-out one, exactly like a send: otherwise the held-out would be mailed sooner by other
# triggers and the two groups would no longer be alike.
DELIVERED = (SendStatus.CLAIMED, SendStatus.SENDING, SendStatus.SENT, SendStatus.BOUNCED, SendStatus.COMPLAINED,
             SendStatus.HELD_OUT)


def address(email: Any) -> ColumnElement[str]:
    """A mailbox as Lifecycle compares them: customers sharing one are one recipient."""
    return func.lower(email, type_=String())


def _reentry_blocked(trigger: TriggerBase, now: datetime, step: StepPlan | None = None) -> ColumnElement[bool]:
    """True when an earlier send of this trigger to the customer forbids another now (to
    the customer's mailbox under another record: ``_mailbox_history``, for the few shared).

    A journey's re-entry rule is about entries: its first step's rows, whatever became of
    them; a later step is never "re-entered" (its key is the entry's, once)."""
    rule = trigger.reentry
    if rule.mode == "every_occurrence" or (step is not None and not step.first):
        return false()
    if step is None:
        earlier = and_(col(Send.trigger) == trigger.name, col(Send.status).in_(DELIVERED),
                       col(Send.customer_id) == col(Customer.id))
    else:
        earlier = and_(col(Send.trigger) == trigger.name, journey.entry_rows(step.first_step),
                       col(Send.status).in_(journey.ENTERED), col(Send.customer_id) == col(Customer.id))
    if rule.mode == "cooldown":
        earlier = and_(earlier, col(Send.evaluated_at) > now - _cooldown(rule), col(Send.evaluated_at) <= now)
    return exists().where(earlier)


def _cooldown(rule: Reentry) -> timedelta:
    """The cool-down of a ``cooldown`` rule (``parse_reentry`` gives it one)."""
    assert rule.cooldown is not None
    return rule.cooldown


def plain_plans(connection: Connection) -> None:
    """No JIT compilation for this connection's transaction (PostgreSQL): an audience query
    is costed above ``jit_above_cost`` and compiled anew each run, for longer than it runs
    (at 1,000,000 customers: 3.1 s of a 3.3 s second step, 1.4 s of 5.8 s for the third).
    Nothing to do on SQLite."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET LOCAL jit = off")


def shared_addresses(connection: Connection) -> frozenset[str]:
    """Mailboxes that several customer records share (few; a walk of one index, once per
    run, where a probe per audience row cost a third of the audience's time)."""
    return frozenset(connection.execute(_shared_mailboxes()).scalars())


def shared_records(connection: Connection) -> tuple[frozenset[int], frozenset[str]]:
    """The customer records whose mailbox another record shares, and those mailboxes: what
    a run split in shards reads once (``flows.audience.shards``)."""
    shared = _shared_mailboxes().subquery()
    rows = connection.execute(select(col(Customer.id), address(Customer.email))
                              .where(address(Customer.email).in_(select(shared.c.mailbox)))).all()
    return frozenset(customer for customer, _ in rows if customer is not None), frozenset(m for _, m in rows)


def mailboxes_of(connection: Connection, records: Collection[int]) -> frozenset[str]:
    """The mailboxes of these customer records (a shard run elsewhere gets the records its
    parent read with ``shared_records``, ids only, and looks their mailboxes up)."""
    if not records:
        return frozenset()
    rows = connection.execute(select(address(Customer.email)).where(
        one_of(col(Customer.id), records, connection.dialect.name), col(Customer.email).is_not(None)))
    return frozenset(rows.scalars())


def _shared_mailboxes() -> Select[str]:
    mailbox = address(Customer.email).label("mailbox")
    return (select(mailbox).where(col(Customer.email).is_not(None)).group_by(address(Customer.email))
            .having(func.count() > 1))


def stream_candidates(
    engine: Engine,
    trigger: TriggerBase,
    kind: Kind,
    rules: StageRules,
    now: datetime,
    batch_size: int,
    default_language: str,
    policy: Policy | None = None,
    deferred_only: bool = False,
    lease: timedelta = timedelta(minutes=10),
    languages: frozenset[str] | None = None,
    step: StepPlan | None = None,
    customer: int | None = None,
    shard: Shard | None = None,
) -> Generator[list[Candidate]]:
    """Batches of candidates, each already classified (``skip`` set or ``None`` for due).

    Marketing candidates also pass the sending ``policy``: those it holds back come out
    deferred, with the moment they may go (``not_before``). With ``deferred_only`` only
    candidates whose deferral is on record come out (the deferred sweep). Each gets one
    language for the whole mail: its own if in ``languages`` (those the trigger's email
    has a subject and a body for), else the default.

    A customer's rows are adjacent (customer order), so a second occurrence of the same
    customer within this run is seen as what it is, even across a batch boundary: blocked
    by re-entry, or held back by the caps, exactly as the run that sends the first would
    find it in the ledger. That is what makes a dry run predict the run.

    A ``shard`` reads its slice of the audience (``flows.audience.shards``), with the shared
    mailboxes its run read once.
    """
    query = audience_query(trigger, kind, rules, now, deferred_only, step, customer, shard)
    # A journey's later step is never "re-entered": its key is the entry's, once.
    rule = trigger.reentry if step is None or step.first else Reentry(mode="every_occurrence")
    in_run = _InRun(rule.mode != "every_occurrence")
    # Batches are handled (sent, in a run) while this waits at ``yield``, still frozen.
    with frozen_heap(), engine.connect() as reader, Session(engine) as ledger:
        plain_plans(reader)
        shared = frozenset() if kind.category != "marketing" else (
            shared_addresses(reader) if shard is None else shard.shared)
        classify = _classifier(trigger, kind, now, default_language, languages, shared, step, policy)
        chunks = reader.execution_options(yield_per=batch_size).execute(query).partitions(batch_size)
        for rows in chunks if engine.dialect.name == "sqlite" else _read_ahead(chunks):
            batch = _mark_already_sent(ledger, trigger, [classify(row) for row in rows], now, lease, rule, shard)
            if deferred_only:
                batch = [c for c in batch if c.deferred]
            batch = in_run.mailbox(in_run.reentry(batch))
            if policy is not None and kind.category == "marketing":
                batch = _apply_policy(ledger, batch, policy, now, in_run)
            yield batch


class _InRun:
    """This run's own earlier occurrences and mails for the customer at hand (rows come in
    customer order). Re-entry and the caps each walk the batch on their own, so each keeps
    its own place."""

    def __init__(self, once: bool) -> None:
        self.once = once  # re-entry forbids a second occurrence at the same moment
        self.taken: int | None = None  # the customer with an occurrence due (or deferred) in this run
        self.customer: int | None = None
        self.planned: list[str] = []  # keys this run sends (or would send) to ``customer`` so far
        self.mailboxes: set[str] = set()  # shared mailboxes this run already writes to (few)

    def reentry(self, batch: list[Candidate]) -> list[Candidate]:
        if not self.once:
            return batch
        out = []
        for c in batch:
            if c.skip is None or c.skip.deferred:
                if self.taken == c.customer_id:
                    c = c._replace(skip=Outcome.REENTRY, not_before=None)
                self.taken = c.customer_id  # a deferred one too: it keeps its place
            out.append(c)
        return out

    def mailbox(self, batch: list[Candidate]) -> list[Candidate]:
        """One mail per mailbox: of the records sharing one, the first this run would write
        to (customer order: the earliest record) gets it; a deferral holds its place."""
        out = []
        for c in batch:
            if c.shared and (c.skip is None or c.skip.deferred):
                mailbox = (c.email or "").lower()
                if mailbox in self.mailboxes:
                    c = c._replace(skip=Outcome.DUPLICATE_ADDRESS, not_before=None)
                self.mailboxes.add(mailbox)
            out.append(c)
        return out

    def earlier(self, customer_id: int) -> list[str]:
        if customer_id != self.customer:
            self.customer, self.planned = customer_id, []
        return self.planned

    def plan(self, customer_id: int, key: str) -> None:
        self.earlier(customer_id).append(key)


def _read_ahead(chunks: Iterator[Sequence[AnyRow]]) -> Iterator[Sequence[AnyRow]]:
    """Fetch the next chunk in a thread while the caller works on this one, so a database
    server computes it meanwhile on another core. Not for SQLite: it computes in this
    process, and its driver lets go of the GIL at every row, so the two threads would pass
    it back and forth all along."""
    with ThreadPoolExecutor(1, thread_name_prefix="audience-read") as reader:
        upcoming = reader.submit(next, chunks, None)
        while (chunk := upcoming.result()) is not None:
            upcoming = reader.submit(next, chunks, None)
            yield chunk


def _classifier(trigger: TriggerBase, kind: Kind, now: datetime, default_language: str,
                supported: frozenset[str] | None, shared_mailboxes: frozenset[str], step: StepPlan | None = None,
                policy: Policy | None = None) -> Callable[[AnyRow], Candidate]:
    """Turns an audience row into a candidate, skipped or not. Runs once per row of
    audiences of hundreds of thousands, so everything that does not vary is settled here.

    A journey step's row says more (``journey.step_columns``): a goal reached exits the
    customer before anything else is asked; a step whose conditions do not hold is passed
    (after consent and the rest: a customer in no state to be mailed keeps their place); a
    step with ``at`` waits for that time of day in the customer's zone."""
    marketing = kind.category == "marketing"
    languages: dict[str | None, str] = {}
    at = step.step.at if step is not None else None

    def classify(row: AnyRow) -> Candidate:
        # Unpacked in audience_query's column order: by far the cheapest way to read a row.
        (customer_id, external_id, email, first_name, last_name, locale, consent, consent_requested, timezone,
         ref_id, ref_time, stage, suppressed, opted_out, reentry_blocked, *steps) = row
        reason, not_before, entered_at = "", None, None
        if steps:
            holds, reason, previous_at, occurrence, key = steps
            reason = reason or ""
            entered_at = now if occurrence is None else ref_time  # a later step's ref_time: the entry's
        if not steps or occurrence is None:
            occurrence = kind.occurrence(trigger, now, ref_id, ref_time)
            key = send_key(trigger.name, customer_id, occurrence)
        skip = None
        if reason:
            skip = Outcome.EXITED
        elif not email:
            skip = Outcome.NO_EMAIL
        elif suppressed:
            skip = Outcome.SUPPRESSED
        elif marketing and not consent:
            skip = Outcome.CONSENT_PENDING if consent_requested else Outcome.NO_CONSENT
        elif marketing and opted_out:
            skip = Outcome.OPTED_OUT
        elif reentry_blocked:
            skip = Outcome.REENTRY
        elif steps and not holds:
            skip = Outcome.CONDITION_NOT_MET
        elif at is not None and step is not None and policy is not None and previous_at is not None:
            moment = journey.at_moment(previous_at, step.step.wait, at, customer_zone(timezone, policy, external_id))
            if moment > now:
                skip, not_before = Outcome.TIME_OF_DAY, moment
        language = languages.get(locale)
        if language is None:
            language = languages[locale] = language_of(locale, default_language, supported)
        shared = bool(shared_mailboxes) and bool(email) and email.lower() in shared_mailboxes
        return Candidate(customer_id, external_id, email, first_name, last_name, locale or default_language,
                         language, stage, ref_id, occurrence, key, skip, timezone, not_before, False, shared,
                         "", reason, entered_at)

    return classify


def _mark_already_sent(session: Session, trigger: TriggerBase, batch: list[Candidate], now: datetime,
                       lease: timedelta, rule: Reentry, shard: Shard | None = None) -> list[Candidate]:
    """One lookup per batch; the claim at dispatch remains the real guard.

    A key deferred earlier is decided like a fresh one: whatever skips a fresh mail
    (consent, suppression, re-entry) skips it; otherwise it waits for its moment, or
    goes once the moment has come (the claim picks it up). The lookup walks the
    trigger's sends over the batch's range of customers (the audience comes in customer
    order), for the batch's occurrences: an index range scan, where thousands of
    single-key probes cost ten times more. A slice's batch spans its count times as many
    ids: the other slices' rows in that range are left in the database.
    """
    if not batch:
        return batch
    ids = [c.customer_id for c in batch]
    rows = session.execute(select(col(Send.send_key), col(Send.status), col(Send.not_before), col(Send.expires_at),
                                  col(Send.claimed_at))
                           .where(col(Send.trigger) == trigger.name, col(Send.customer_id).between(min(ids), max(ids)),
                                  one_of(Send.occurrence, {c.occurrence for c in batch},
                                         session.get_bind().dialect.name),
                                  true() if shard is None else shard.where(col(Send.customer_id))))
    known = {key: rest for key, *rest in rows}
    stale = utcnow() - lease
    marked = []
    for c in batch:
        if c.send_key in known:
            status, not_before, expires_at, claimed_at = known[c.send_key]
            if status == SendStatus.DEFERRED:
                c = c._replace(deferred=True)
                if expires_at is not None and expires_at <= now:
                    c = c._replace(skip=Outcome.EXPIRED)
                elif c.skip is None and not_before > now:
                    c = c._replace(skip=Outcome.WAITING, not_before=not_before)
            elif status == SendStatus.CLAIMED and claimed_at < stale:
                # Its run died before sending it: the claim takes it over, unless something
                # other than that very claim forbids the mail now.
                if c.skip == Outcome.REENTRY and not _blocked_by_another(session, trigger, c, now):
                    c = c._replace(skip=None)
            elif c.skip is None or c.skip == Outcome.REENTRY:
                c = c._replace(skip=Outcome.EXPIRED if status == SendStatus.EXPIRED else Outcome.ALREADY_SENT)
        marked.append(c)
    marked = _mailbox_history(session, trigger, marked, now, rule)
    session.rollback()  # end the read transaction so SQLite can checkpoint
    return marked


def _mailbox_history(session: Session, trigger: TriggerBase, batch: list[Candidate], now: datetime,
                     rule: Reentry) -> list[Candidate]:
    """A shared mailbox's sends under its other customer records count as the customer's own:
    the same occurrence on record under another record (sent, in progress, deferred or
    closed) is not mailed again, whatever the re-entry rule, and an earlier mail of this
    trigger to the mailbox blocks re-entry. One lookup per batch, for shared addresses only
    (few): a probe per audience row would cost every run a third of its audience time."""
    shared = {(c.email or "").lower() for c in batch if c.shared and (c.skip is None or c.skip.deferred)}
    if not shared:
        return batch
    rows = session.execute(select(address(Send.email), col(Send.occurrence), col(Send.send_key), col(Send.status),
                                  col(Send.evaluated_at)).where(
        col(Send.trigger) == trigger.name, one_of(address(Send.email), shared, session.get_bind().dialect.name)))
    history: dict[str, list[tuple[str, str, str, datetime]]] = {}
    for mailbox, *rest in rows:
        history.setdefault(mailbox, []).append(tuple(rest))
    out = []
    for c in batch:
        if c.shared and (c.skip is None or c.skip.deferred):
            others = [(occurrence, status, at) for occurrence, key, status, at in
                      history.get((c.email or "").lower(), ()) if key != c.send_key]
            if any(occurrence == c.occurrence for occurrence, _, _ in others):
                c = c._replace(skip=Outcome.DUPLICATE_ADDRESS, not_before=None)
            elif rule.mode != "every_occurrence" and any(
                    status in DELIVERED and (rule.mode == "once" or now - _cooldown(rule) < at <= now)
                    for _, status, at in others):
                c = c._replace(skip=Outcome.REENTRY, not_before=None)
        out.append(c)
    return out


def _blocked_by_another(session: Session, trigger: TriggerBase, c: Candidate, now: datetime) -> bool:
    """Re-entry for a claim about to be taken over, not counting that claim (rare: crash reruns)."""
    rule = trigger.reentry
    earlier = and_(col(Send.trigger) == trigger.name, col(Send.status).in_(DELIVERED), col(Send.send_key) != c.send_key,
                   or_(col(Send.customer_id) == c.customer_id, address(Send.email) == (c.email or "").lower()))
    if rule.mode == "cooldown":
        earlier = and_(earlier, col(Send.evaluated_at) > now - _cooldown(rule), col(Send.evaluated_at) <= now)
    blocked: bool = session.execute(select(exists().where(earlier))).scalar_one()
    return blocked


def _apply_policy(session: Session, batch: list[Candidate], policy: Policy, now: datetime,
                  in_run: "_InRun") -> list[Candidate]:
    """Frequency caps and quiet hours, with one query for the whole batch's recent sends.

    Caps count per mailbox: every marketing mail to the address, under any customer
    record. A candidate's own key does not count against it: a dead run's unsent claim
    of that very mail, about to be taken over, is not an earlier mail. The mails this run
    planned for the customer count from the plan (``in_run``), never from the ledger,
    whatever its senders have written by now: so a dry run and the run decide alike.
    """
    due = [c for c in batch if c.skip is None]
    if not due:
        return batch
    recent: dict[str, list[tuple[str, datetime]]] = {}
    window = longest_window(policy)
    if window:
        addresses = {(c.email or "").lower() for c in due}
        rows = session.execute(select(address(Send.email), col(Send.send_key), col(Send.evaluated_at)).where(
            one_of(address(Send.email), addresses, session.get_bind().dialect.name), col(Send.category) == "marketing",
            col(Send.status).in_(DELIVERED), col(Send.evaluated_at) > now - window, col(Send.evaluated_at) <= now))
        for mailbox, key, at in rows:
            recent.setdefault(mailbox, []).append((key, at))
        session.rollback()
    out = []
    unsent: dict[str | None, tuple[datetime, str | None]] = {}  # by time zone, for customers no cap holds back
    for c in batch:
        if c.skip is None:
            planned = in_run.earlier(c.customer_id)
            earlier = [at for key, at in recent.get((c.email or "").lower(), ())
                       if key != c.send_key and key not in planned]
            earlier += [now] * len(planned)
            free = not earlier or not capped(now, earlier, policy)  # then only the zone matters
            if free and c.timezone in unsent:
                moment, reason = unsent[c.timezone]
            else:
                zone = customer_zone(c.timezone, policy, c.external_id)
                moment, reason = next_allowed(now, earlier, zone, policy)
                if free:
                    unsent[c.timezone] = moment, reason
            if reason is not None:
                c = c._replace(skip=Outcome.QUIET_HOURS if reason == QUIET_HOURS else Outcome.FREQUENCY_CAP,
                               not_before=moment)
            else:
                in_run.plan(c.customer_id, c.send_key)
        out.append(c)
    return out
