"""Random timelines of a shop and of trigger runs, played against the real store and SMTP server.

A timeline is a list of steps in time order: facts (orders, carts, complaints, sign-ups,
unsubscribes, consent) and runs (a trigger, the deferred sweep, a dry run, a run killed
mid-send). The player writes each fact to the store at its moment, keeps its own record
of what held when, and notes which mails the SMTP server received during which run.
The properties judge that record (``tests/e2e/test_properties.py``), never the engine's own
reasoning: the only thing read back from the ledger is which send a received Message-ID
belongs to.
"""

import shutil
import smtplib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from hypothesis import strategies as st
from sqlalchemy import Engine, select, update
from sqlmodel import Session

from flows.message.prepare import Prepared
from flows.run import execute
from flows.run_context import RunContext, prepare
from flows.send import claims as ledger
from flows.send.batch import dispatch_prepared
from flows.settings import Settings
from flows.spec.project import Project, load_project
from flows.summary import RunSummary
from models import (
    CART_OPEN,
    Cart,
    CartItem,
    CategoryOptOut,
    Complaint,
    Customer,
    Order,
    Send,
    Suppression,
)
from models.db import create_schema, dispose_engines, make_engine
from models.types import utcnow
from tests.support.smtp_server import SmtpServer
from tests.support.stores import empty_tables

# The shipped triggers, marketing first; a shrunk example names the first that still fails.
TRIGGERS = ("winback-lapsed", "abandoned-cart", "we-miss-you", "onboarding-day-0",
            "complaint-ack", "confirm-subscription")
ZONES = ("Europe/Berlin", "America/New_York", "Australia/Sydney", "Mars/Olympus_Mons", None, "UTC")
# Categories a customer may leave on the preference page: the marketing kinds.
CATEGORIES = ("campaign", "abandoned_cart", "inactivity", "onboarding")
# Starts a few days before a daylight-saving change, so timelines cross it.
STARTS = (
    datetime(2026, 3, 27, 6, 0, tzinfo=UTC),    # Europe/Berlin springs forward on the 29th
    datetime(2026, 10, 23, 6, 0, tzinfo=UTC),   # and falls back on 25 October
    datetime(2026, 3, 6, 15, 0, tzinfo=UTC),    # America/New_York springs forward on 8 March
    datetime(2026, 10, 30, 15, 0, tzinfo=UTC),  # and falls back on 1 November
    datetime(2026, 4, 2, 12, 0, tzinfo=UTC),    # Australia/Sydney falls back on 5 April
    datetime(2026, 10, 2, 12, 0, tzinfo=UTC),   # and springs forward on 4 October
    datetime(2026, 12, 14, 8, 0, tzinfo=UTC),   # a Monday, the win-back's slot an hour later
)
MAILBOXES = ("ada@example.de", "ben@example.de", "cem@example.de", "dora@example.de")


# -- the sending policy, as written into policy.yaml --------------------------------

@dataclass(frozen=True)
class Cap:
    max: int
    per: timedelta


@dataclass(frozen=True)
class PolicyVariant:
    """A ``policy.yaml``; the shipped one is the first of each choice."""

    caps: tuple[Cap, ...] = (Cap(1, timedelta(hours=16)), Cap(3, timedelta(days=7)))
    quiet: tuple[str, str] | None = ("21:00", "08:00")
    default_timezone: str = "Europe/Berlin"

    def yaml(self) -> str:
        lines = [f"default_timezone: {self.default_timezone}"]
        if self.caps:
            lines.append("frequency_caps:")
            lines += [f"  - {{max: {c.max}, per: {int(c.per.total_seconds() // 60)}m}}" for c in self.caps]
        else:
            lines.append("frequency_caps: []")
        if self.quiet:
            lines += ["quiet_hours:", f'  start: "{self.quiet[0]}"', f'  end: "{self.quiet[1]}"']
        return "\n".join(lines) + "\n"


SHIPPED_POLICY = PolicyVariant()


# -- the timeline -------------------------------------------------------------------

Consent = Literal["confirmed", "requested", "none"]


@dataclass(frozen=True)
class Person:
    """A customer: who shares a mailbox (``mailbox``), where they live, what they did before."""

    mailbox: int = 0  # index into MAILBOXES: equal numbers share one address
    shout: bool = False  # the same address written in capitals (still one mailbox)
    locale: str = "de-DE"
    zone: str | None = "Europe/Berlin"
    consent: Consent = "confirmed"
    last_order_days: int | None = 500  # before the start; None: never ordered
    last_seen_days: int = 1
    signed_up_days: int = 600


FactKind = Literal["order", "cart", "complaint", "answer", "activity", "unsubscribe", "withdraw",
                   "suppress_unsubscribed", "suppress_manual", "opt_out", "request_consent", "confirm_consent"]


@dataclass(frozen=True)
class Fact:
    """Something a customer did (``who`` counts round the customers known at that moment)."""

    what: FactKind
    who: int = 0
    category: str = "campaign"  # for opt_out


@dataclass(frozen=True)
class SignUp:
    person: Person


@dataclass(frozen=True)
class Crash:
    """Killed mid-send, in the first batch with anyone due: the first ``sent`` mails went out
    and were recorded, the next ``doubt_accepted`` reached the server but the run died before
    recording them, the next ``doubt_lost`` were handed over but never arrived, and the next
    ``claimed`` were claimed but never handed over."""

    sent: int = 0
    doubt_accepted: int = 0
    doubt_lost: int = 0
    claimed: int = 1


RunMode = Literal["real", "dry_then_real", "crash"]


@dataclass(frozen=True)
class Run:
    trigger: str
    mode: RunMode = "real"
    crash: Crash = Crash()


@dataclass(frozen=True)
class Sweep:
    """The deferred sweep: every trigger's deferred sends whose moment has come."""


Step = Fact | SignUp | Run | Sweep


@dataclass(frozen=True)
class Timeline:
    start: datetime
    people: tuple[Person, ...]
    steps: tuple[tuple[timedelta, Step], ...]  # each after the one before by that much (at least a minute)
    policy: PolicyVariant = SHIPPED_POLICY
    batch_size: int = 500
    in_flight: int = 32

    def moments(self) -> list[datetime]:
        out, moment = [], self.start
        for gap, _ in self.steps:
            moment += gap
            out.append(moment)
        return out


# -- what held when: the player's own record ---------------------------------------

@dataclass
class Facts:
    """One customer as the timeline made them."""

    external_id: str
    address: str
    zone: str | None
    consent: bool
    requested: int = 0  # number of the pending consent request, 0 when none is pending
    opt_outs: set[str] = field(default_factory=set)
    signed_up: datetime | None = None
    last_order: datetime | None = None

    def copy(self) -> "Facts":
        return replace(self, opt_outs=set(self.opt_outs))


@dataclass(frozen=True)
class Mail:
    """One message the SMTP server accepted, with what held for its recipient at that moment."""

    moment: datetime
    run: int  # index of the step that sent it
    recipient: str  # as in RCPT TO
    customer: str  # external id, from the ledger row of its Message-ID ("" when there is none)
    trigger: str  # from the ledger row ("" when there is none)
    occurrence: str
    message_id: str
    list_id: str | None
    subject: str
    consent: bool
    suppression: str | None  # the address's suppression reason at that moment
    opt_outs: frozenset[str]
    zone: str | None
    requested: int

    @property
    def mailbox(self) -> str:
        return self.recipient.lower()


@dataclass(frozen=True)
class Prediction:
    """A dry run and the real run right after it, at the same moment."""

    moment: datetime
    trigger: str
    would_send: int
    planned: tuple[str, ...]
    dry_received: int
    dry_ledger_changed: bool
    sent: int
    received: tuple[str, ...]  # external ids of the customers whose mail the server got


@dataclass(frozen=True)
class Snapshot:
    """A trigger run that completed, with every customer as they were at its moment."""

    run: int
    moment: datetime
    trigger: str
    audience: bool
    customers: tuple[Facts, ...]
    suppressed: dict[str, str]
    crashed_before: bool  # a run died earlier in the timeline (its claims may still hold keys)


@dataclass
class Record:
    timeline: Timeline
    runs: list[Snapshot] = field(default_factory=list)
    mails: list[Mail] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)
    complaints: dict[int, str] = field(default_factory=dict)  # complaint number → customer external id
    requests: dict[tuple[str, int], datetime] = field(default_factory=dict)  # (customer, request number) → when


class Killed(RuntimeError):
    """A run's process dying mid-send, as far as the store and the server can tell."""


# -- databases, one fresh store per example -----------------------------------------

class Stores:
    """A fresh, migrated store for every example: a copy of one migrated SQLite file, or the
    PostgreSQL database with every table emptied (migrating anew costs a third of a second)."""

    def __init__(self, db_url: str, folder: Path) -> None:
        self.db_url, self.folder, self.count = db_url, folder, 0
        if db_url.startswith("sqlite"):
            self.template = folder / "template.db"
            engine = make_engine(f"sqlite:///{self.template}")
            create_schema(engine)
            with engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            engine.dispose()
        else:  # the db_url fixture emptied the database: migrate it once
            engine = make_engine(db_url)
            create_schema(engine)
            engine.dispose()

    def fresh(self) -> tuple[str, Engine]:
        dispose_engines()
        self.count += 1
        if self.db_url.startswith("sqlite"):
            for old in self.folder.glob("example-*.db*"):
                old.unlink()
            path = self.folder / f"example-{self.count}.db"
            shutil.copy(self.template, path)
            url = f"sqlite:///{path}"
            return url, make_engine(url)
        engine = make_engine(self.db_url)
        with engine.begin() as connection:
            empty_tables(connection)
        return self.db_url, engine


class Projects:
    """The shipped triggers and templates with one policy.yaml each, loaded once per variant."""

    def __init__(self, project_dir: Path) -> None:
        self.project_dir = project_dir
        self.loaded: dict[PolicyVariant, Project] = {}

    def get(self, policy: PolicyVariant) -> Project:
        if policy not in self.loaded:
            folder = self.project_dir.parent / f"policy-{len(self.loaded)}"
            shutil.copytree(self.project_dir / "triggers", folder / "triggers")
            (folder / "triggers" / "policy.yaml").write_text(policy.yaml())
            project = load_project(folder / "triggers", self.project_dir / "templates")
            assert not project.problems, project.problems
            self.loaded[policy] = project
        return self.loaded[policy]


# -- the player ---------------------------------------------------------------------

class Player:
    def __init__(self, engine: Engine, settings: Settings, project: Project, smtp: SmtpServer) -> None:
        self.engine, self.settings, self.project, self.smtp = engine, settings, project, smtp
        self.people: list[Facts] = []
        self.ids: dict[str, int] = {}  # external id → store id
        self.suppressed: dict[str, str] = {}  # lower-case address → reason
        self.crashed = False
        self.record: Record

    def play(self, timeline: Timeline) -> Record:
        self.record = Record(timeline)
        self.smtp.handler.received.clear()
        for person in timeline.people:
            self.sign_up(person, timeline.start, before=True)
        for index, (moment, (_, step)) in enumerate(zip(timeline.moments(), timeline.steps, strict=True)):
            if isinstance(step, SignUp):
                self.sign_up(step.person, moment, before=False)
            elif isinstance(step, Fact):
                self.fact(step, moment)
            elif isinstance(step, Sweep):
                self.runs(index, moment, [(name, "real", Crash()) for name in TRIGGERS], audience=False)
            else:
                self.runs(index, moment, [(step.trigger, step.mode, step.crash)], audience=True)
        return self.record

    # facts ------------------------------------------------------------------------

    def sign_up(self, person: Person, moment: datetime, *, before: bool) -> None:
        number = len(self.people) + 1
        address = MAILBOXES[person.mailbox % len(MAILBOXES)]
        address = address.upper() if person.shout else address
        created = moment - timedelta(days=person.signed_up_days) if before else moment
        seen = moment - timedelta(days=person.last_seen_days) if before else moment
        requested_at = (moment - timedelta(hours=1) if before else moment) if person.consent == "requested" else None
        customer = Customer(external_id=f"p-{number}", email=address, first_name=f"P{number}", last_name=None,
                            locale=person.locale, timezone=person.zone,
                            marketing_consent=person.consent == "confirmed",
                            consent_at=created if person.consent == "confirmed" else None,
                            consent_requested_at=requested_at, created_at=created, last_seen_at=max(seen, created))
        with Session(self.engine, expire_on_commit=False) as session:
            session.add(customer)
            session.commit()
            assert customer.id is not None
            self.ids[customer.external_id] = customer.id
            if before and person.last_order_days is not None:
                session.add(Order(external_id=f"o-{number}-0", customer_id=customer.id,
                                  placed_at=moment - timedelta(days=person.last_order_days), total_cents=4990,
                                  currency="EUR", products=[]))
                session.commit()
        last_order = moment - timedelta(days=person.last_order_days) if before and person.last_order_days else None
        facts = Facts(customer.external_id, address, person.zone, person.consent == "confirmed", signed_up=created,
                      last_order=last_order)
        if requested_at is not None:
            self.request(facts, requested_at)
        self.people.append(facts)

    def request(self, facts: Facts, moment: datetime) -> None:
        facts.requested = 1 + max((n for (who, n) in self.record.requests if who == facts.external_id), default=0)
        self.record.requests[(facts.external_id, facts.requested)] = moment

    def fact(self, fact: Fact, moment: datetime) -> None:
        facts = self.people[fact.who % len(self.people)]
        customer_id = self.ids[facts.external_id]
        with Session(self.engine) as session:
            customer = session.get(Customer, customer_id)
            assert customer is not None
            if fact.what in ("order", "cart", "complaint", "answer", "activity"):  # track events: activity
                customer.last_seen_at = max(customer.last_seen_at or moment, moment)
            open_cart = session.execute(select(Cart).where(Cart.customer_id == customer_id,
                                                           Cart.status == CART_OPEN)).scalar_one_or_none()
            if fact.what == "order":
                facts.last_order = moment
                session.add(Order(external_id=f"o-{customer_id}-{moment:%Y%m%d%H%M}", customer_id=customer_id,
                                  placed_at=moment, total_cents=2990, currency="EUR", products=[]))
                if open_cart is not None:
                    open_cart.status = "ordered"
            elif fact.what == "cart":  # add a product: a new cart, or the open one edited
                if open_cart is None:
                    open_cart = Cart(external_id=f"cart-{customer_id}-{moment:%Y%m%d%H%M}", customer_id=customer_id,
                                     created_at=moment, updated_at=moment)
                    session.add(open_cart)
                    session.flush()
                open_cart.updated_at = moment
                assert open_cart.id is not None
                session.add(CartItem(cart_id=open_cart.id, product_id=f"p-{moment:%Y%m%d%H%M}", name="Wanderschuh",
                                     price_cents=12990, quantity=1))
            elif fact.what == "complaint":
                number = len(self.record.complaints) + 1
                self.record.complaints[number] = facts.external_id
                session.add(Complaint(external_id=f"k-{number}", customer_id=customer_id,
                                      subject=f"Beschwerde #{number}", received_at=moment))
            elif fact.what == "answer":
                session.execute(update(Complaint).where(Complaint.customer_id == customer_id,
                                                        Complaint.answered_at.is_(None)).values(answered_at=moment))
            elif fact.what in ("unsubscribe", "withdraw"):  # the Unsubscribed event; marketing_consent: false
                customer.marketing_consent, customer.consent_at, customer.consent_requested_at = False, None, None
                facts.consent, facts.requested = False, 0
                if fact.what == "unsubscribe":
                    self.suppress(session, facts.address, "unsubscribed", moment)
            elif fact.what == "suppress_unsubscribed":  # lifecycle suppress add --reason unsubscribed
                self.suppress(session, facts.address, "unsubscribed", moment)
            elif fact.what == "suppress_manual":
                self.suppress(session, facts.address, "manual", moment)
            elif fact.what == "opt_out":
                if fact.category not in facts.opt_outs:
                    session.add(CategoryOptOut(customer_id=customer_id, category=fact.category, created_at=moment))
                    facts.opt_outs.add(fact.category)
            elif (fact.what == "request_consent"  # identify with marketing_consent: true
                  and not customer.marketing_consent and customer.consent_requested_at is None):
                customer.consent_requested_at = moment
                self.request(facts, moment)
            elif fact.what == "confirm_consent" and not customer.marketing_consent:  # the double opt-in link
                customer.marketing_consent, customer.consent_at = True, moment
                customer.consent_source = "double opt-in link"
                facts.consent, facts.requested = True, 0
                lifted = session.get(Suppression, facts.address.lower())
                if lifted is not None and lifted.reason == "unsubscribed":  # it lifts an old unsubscribe
                    session.delete(lifted)
                    del self.suppressed[facts.address.lower()]
            session.add(customer)
            session.commit()

    def suppress(self, session: Session, address: str, reason: str, moment: datetime) -> None:
        if address.lower() not in self.suppressed:
            session.add(Suppression(email=address.lower(), reason=reason, created_at=moment))
            session.flush()
            self.suppressed[address.lower()] = reason

    # runs -------------------------------------------------------------------------

    def runs(self, index: int, moment: datetime, runs: Sequence[tuple[str, RunMode, Crash]], audience: bool) -> None:
        for name, mode, crash in runs:
            if mode == "dry_then_real":
                before, ledger_before = len(self.smtp.received), self.ledger_rows()
                dry = self.execute(name, moment, audience, dry_run=True)
                dry_received, changed = len(self.smtp.received) - before, self.ledger_rows() != ledger_before
                start = len(self.smtp.received)
                real = self.execute(name, moment, audience)
                mails = self.collect(index, moment, start)
                self.record.predictions.append(Prediction(
                    moment, name, dry.outcomes["would_send"], tuple(p.customer for p in dry.planned), dry_received,
                    changed, real.sent, tuple(m.customer for m in mails)))
            elif mode == "crash":
                start = len(self.smtp.received)
                job = prepare(name, moment, settings=self.settings, project=self.project)
                try:
                    execute(job, dispatch=self.crashing(crash), audience=audience)
                except Killed:
                    self.after_death(job.run_id)
                self.collect(index, moment, start)
            else:
                start = len(self.smtp.received)
                self.execute(name, moment, audience)
                self.collect(index, moment, start)
            if mode != "crash":
                self.record.runs.append(Snapshot(index, moment, name, audience, tuple(f.copy() for f in self.people),
                                                 dict(self.suppressed), self.crashed))
            else:
                self.crashed = True

    def execute(self, name: str, moment: datetime, audience: bool, dry_run: bool = False) -> RunSummary:
        job = prepare(name, moment, settings=self.settings, project=self.project, dry_run=dry_run)
        return execute(job, audience=audience)

    def ledger_rows(self) -> list[tuple[object, ...]]:
        with self.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(
                select(Send.send_key, Send.status, Send.not_before).order_by(Send.send_key))]

    def crashing(self, crash: Crash) -> Callable[..., Counter[tuple[str, str]]]:
        """A dispatch step that sends part of its batch for real and then dies (see ``Crash``)."""
        host, port = "127.0.0.1", self.smtp.port

        def dispatch(job: RunContext, prepared: Sequence[Prepared], batch: int = 0) -> Counter[tuple[str, str]]:
            cut = [crash.sent, crash.doubt_accepted, crash.doubt_lost, crash.claimed]
            parts, rest = [], list(prepared)
            for n in cut:
                parts.append(rest[:n])
                rest = rest[n:]
            sent, accepted, lost, claimed = parts
            if sent:
                dispatch_prepared(job, sent, batch)
            lease = job.settings.claim_lease
            doubt = accepted + lost
            handing = ledger.hand_over(self.engine, [p.claim for p in doubt], job.run_id, job.now, lease)
            with smtplib.SMTP(host, port, timeout=5) as client:
                for p in accepted:
                    if p.claim.send_key in handing:
                        client.sendmail(p.envelope.sender, [p.envelope.recipient], p.envelope.data)
            ledger.claim(self.engine, [p.claim for p in claimed], job.run_id, job.now, lease)
            raise Killed(f"run {job.run_id} killed in batch {batch}")

        return dispatch

    def after_death(self, run_id: str) -> None:
        """Time passes for the dead run's claims: its lease runs out before the next run."""
        with self.engine.begin() as connection:
            connection.execute(update(Send).where(Send.run_id == run_id,
                                                  Send.status.in_(["claimed", "sending"]))
                               .values(claimed_at=utcnow() - timedelta(days=1)))

    def collect(self, index: int, moment: datetime, start: int) -> list[Mail]:
        """The mails the server accepted since ``start``, each with what held for its recipient."""
        new = self.smtp.received[start:]
        ids = [r.message["Message-ID"] for r in new]
        with self.engine.connect() as connection:
            rows = {mid: (ext, trig, occ) for mid, ext, trig, occ in connection.execute(
                select(Send.message_id, Customer.external_id, Send.trigger, Send.occurrence)
                .join(Customer, Customer.id == Send.customer_id).where(Send.message_id.in_(ids)))}
        by_id = {f.external_id: f for f in self.people}
        mails = []
        for received, mid in zip(new, ids, strict=True):
            message = received.message
            external, trigger, occurrence = rows.get(mid, ("", "", ""))
            facts = by_id.get(external) or Facts("", received.recipients[0], None, False)
            [recipient] = received.recipients
            mails.append(Mail(moment, index, recipient, external, trigger, occurrence, mid,
                              message["List-Id"], str(message["Subject"]), facts.consent,
                              self.suppressed.get(recipient.lower()), frozenset(facts.opt_outs), facts.zone,
                              facts.requested))
        self.record.mails.extend(mails)
        return mails


def play(timeline: Timeline, stores: Stores, projects: Projects, settings: Settings, smtp: SmtpServer) -> Record:
    url, engine = stores.fresh()
    run_settings = settings.model_copy(update={"database_url": url, "workers": 1, "batch_size": timeline.batch_size,
                                               "in_flight": timeline.in_flight})
    try:
        return Player(engine, run_settings, projects.get(timeline.policy), smtp).play(timeline)
    finally:
        engine.dispose()


# -- strategies ---------------------------------------------------------------------

GAPS = (timedelta(minutes=10), timedelta(hours=1), timedelta(hours=2), timedelta(hours=3), timedelta(hours=5),
        timedelta(hours=9), timedelta(hours=16),
        timedelta(days=1), timedelta(days=2), timedelta(days=3), timedelta(days=7), timedelta(days=20),
        timedelta(days=61))


gaps = st.builds(lambda gap, minutes: gap + timedelta(minutes=minutes), st.sampled_from(GAPS), st.integers(0, 59))


people = st.builds(
    Person,
    mailbox=st.integers(0, 2),
    shout=st.booleans(),
    locale=st.sampled_from(("de-DE", "en-GB")),
    zone=st.sampled_from(ZONES),
    consent=st.sampled_from(("confirmed", "confirmed", "confirmed", "requested", "none")),
    last_order_days=st.sampled_from((500, None, 10, 130, 400)),
    last_seen_days=st.sampled_from((1, 58, 65, 170)),
    signed_up_days=st.sampled_from((600, 0, 2, 3, 4)),
)

facts = st.builds(
    Fact,
    what=st.sampled_from(("cart", "order", "cart", "complaint", "answer", "activity", "unsubscribe", "withdraw",
                          "suppress_unsubscribed", "suppress_manual", "opt_out", "request_consent",
                          "confirm_consent")),
    who=st.integers(0, 7),
    category=st.sampled_from(CATEGORIES),
)

crashes = st.builds(Crash, sent=st.integers(0, 2), doubt_accepted=st.integers(0, 2), doubt_lost=st.integers(0, 1),
                    claimed=st.integers(0, 2))

# The win-back and cart reminders most often: they reach the most customers of a timeline.
runs = st.builds(Run, trigger=st.sampled_from(TRIGGERS[:2] * 2 + TRIGGERS),
                 mode=st.sampled_from(("real", "dry_then_real", "crash")), crash=crashes)

_STEPS: dict[str, st.SearchStrategy[Step]] = {"run": runs, "fact": facts, "sign_up": st.builds(SignUp, people),
                                              "sweep": st.just(Sweep())}
steps = st.sampled_from(["run"] * 5 + ["fact"] * 3 + ["sign_up", "sweep"]).flatmap(_STEPS.__getitem__)

policies = st.builds(
    PolicyVariant,
    caps=st.sampled_from((SHIPPED_POLICY.caps, (), (Cap(2, timedelta(days=1)),))),
    quiet=st.sampled_from((SHIPPED_POLICY.quiet, None, ("22:00", "06:00"), ("02:00", "03:00"))),
    default_timezone=st.sampled_from(("Europe/Berlin", "UTC")),
)

timelines = st.builds(
    Timeline,
    start=st.sampled_from(STARTS),
    people=st.lists(people, min_size=1, max_size=5).map(tuple),
    steps=st.lists(st.tuples(gaps, steps), min_size=3, max_size=16).map(tuple),
    policy=policies,
    batch_size=st.sampled_from((500, 1, 2)),
    in_flight=st.sampled_from((32, 1)),
)

