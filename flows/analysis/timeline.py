"""One customer's story, in time order: so support can answer "why did I get this?" (and
"why did I not?").

Each mail the ledger has for them (sent, held out, deferred, expired or failed with the
ledger's reason, bounced or reported as spam), each click and open (a person's, or a
machine's with what gave it away), each order with the mail it is attributed to and on what
basis (or "unattributed"), and the consent changes, category opt-outs and suppressions that
explain the mails a run skipped (a skip leaves no row in the ledger; its cause does here).

Only this customer's rows are read: their sends by customer id, the feedback on those
sends by send key, never by address (customers sharing a mailbox are separate records),
and the suppression of their own address. Nothing after ``now`` is shown. A status is the
ledger's current one: a mail sent before ``now`` and bounced after it shows as bounced.
"""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlmodel import Session, col

from models import (
    Attribution,
    CategoryOptOut,
    ConsentChange,
    Customer,
    Engagement,
    ExperimentLook,
    Feedback,
    FeedbackKind,
    Order,
    Send,
    SendStatus,
    Suppression,
    suppression_key,
)
from models.identity import customer_by_id
from models.types import display_address

# Same moment: the cause before its effect (consent before a mail, a mail before its click,
# a click before the order it earned).
_KIND_ORDER = {"consent": 0, "opt_out": 1, "suppression": 2, "mail": 3, "bounce": 4, "complaint": 4, "open": 5,
               "click": 6, "order": 7}
MACHINE_REASONS = {"head": "a HEAD request (link checker)", "scanner": "a known security scanner",
                   "too_soon": "too soon after the send to be a person"}


class AmbiguousCustomer(LookupError):
    """An address shared by several customer records: name one by its id instead."""

    def __init__(self, address: str, count: int) -> None:
        super().__init__(f"{count} customers share the address {address}; name one by its id")
        self.count = count


@dataclass(frozen=True)
class Entry:
    at: datetime
    kind: str  # consent, opt_out, suppression, mail, bounce, complaint, open, click, order
    what: str  # one sentence for a person
    trigger: str = ""
    send_id: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "kind": self.kind, "what": self.what, "trigger": self.trigger,
                "send_id": self.send_id, "detail": self.detail}


@dataclass(frozen=True)
class Timeline:
    external_id: str
    email: str | None
    name: str
    created_at: datetime
    now: datetime
    entries: list[Entry]
    untracked_at: datetime | None = None
    forgotten_at: datetime | None = None

    def of_kind(self, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]

    def to_json(self) -> dict[str, Any]:
        return {"customer": {"external_id": self.external_id, "email": self.email, "name": self.name,
                             "created_at": self.created_at.isoformat(),
                             "untracked_at": self.untracked_at.isoformat() if self.untracked_at else None,
                             "forgotten_at": self.forgotten_at.isoformat() if self.forgotten_at else None},
                "as_of": self.now.isoformat(), "entries": [e.as_dict() for e in self.entries]}


def find_customer(session: Session, key: str) -> Customer | None:
    """By external id (or an id merged into one), else by address when ``key`` is one."""
    customer = customer_by_id(session, key)
    if customer is not None or "@" not in key:
        return customer
    address = suppression_key(key)
    found = list(session.execute(select(Customer).where(func.lower(col(Customer.email)) == address)
                                 .limit(10)).scalars())
    if len(found) > 1:
        raise AmbiguousCustomer(address, len(found))
    return found[0] if found else None


def timeline(engine: Engine, customer_external_id: str, *, now: datetime) -> Timeline | None:
    """The customer's timeline up to ``now`` (by external id, or by email), or None if no
    customer has that id; ``AmbiguousCustomer`` for an address several records share."""
    with Session(engine) as session:
        customer = find_customer(session, customer_external_id)
        if customer is None or customer.id is None:
            return None
        entries = [*_consent(session, customer.id, now), *_mails_and_feedback(session, customer.id, now),
                   *_engagements(session, customer.id, now), *_orders(session, customer.id, now)]
        if customer.email:
            suppression = session.get(Suppression, suppression_key(customer.email))
            if suppression is not None and suppression.created_at <= now:
                entries.append(Entry(suppression.created_at, "suppression",
                                     f"address suppressed ({suppression.reason}): no trigger may write to it",
                                     detail={"reason": suppression.reason, "detail": suppression.detail}))
        name = " ".join(p for p in (customer.first_name, customer.last_name) if p)
        entries.sort(key=lambda e: (e.at, _KIND_ORDER[e.kind], e.send_id or 0))
        return Timeline(external_id=customer.external_id, email=display_address(customer.email)
                        if customer.email else None, name=name, created_at=customer.created_at, now=now,
                        entries=entries, untracked_at=customer.untracked_at, forgotten_at=customer.forgotten_at)


def _consent(session: Session, customer_id: int, now: datetime) -> list[Entry]:
    entries = [Entry(c.at, "consent", f"consent {c.change} (via {c.source})" + (f": {c.detail}" if c.detail else ""),
                     detail={"change": c.change, "source": c.source, "detail": c.detail})
               for c in session.execute(select(ConsentChange).where(col(ConsentChange.customer_id) == customer_id,
                                                                    col(ConsentChange.at) <= now)).scalars()]
    entries += [Entry(o.created_at, "opt_out", f"left the {o.category} mails on the preference page",
                      detail={"category": o.category})
                for o in session.execute(select(CategoryOptOut).where(col(CategoryOptOut.customer_id) == customer_id,
                                                                      col(CategoryOptOut.created_at) <= now)).scalars()]
    return entries


def _mail_sentence(send: Send, decided: dict[tuple[str, str], ExperimentLook]) -> str:
    step = f" step {send.step}" if send.step else ""
    variant = f", variant {send.variant}" if send.variant else ""
    look = decided.get((send.trigger, send.step)) if send.variant else None
    if look is not None:
        variant += f"; {look.winner} won the experiment on {look.decided_at:%Y-%m-%d} (look {look.look})"
    what = f"{send.trigger}{step} ({send.stage or 'no stage'}, {send.template or 'no template'}{variant})"
    status = send.status
    if status == SendStatus.PASSED:
        return f"passed {send.trigger}{step}: its conditions did not hold when it was due; the journey went on"
    if status == SendStatus.EXITED:
        goal = send.error.removeprefix("exit: ") or "a goal"
        return f"left {send.trigger} before{step}: reached its exit goal ({goal})"
    if status == SendStatus.SENT:
        return f"sent {what}"
    if status == SendStatus.HELD_OUT:
        return f"held out of {send.trigger}: in its holdout group, not sent on purpose (measures the mail's lift)"
    if status == SendStatus.DEFERRED:
        until = send.not_before.strftime("%Y-%m-%d %H:%M UTC") if send.not_before else "later"
        return f"deferred {what} by the sending policy (quiet hours or a frequency cap) until {until}"
    if status == SendStatus.EXPIRED:
        return f"not sent {what}: expired, {send.error or 'deferred too long'}"
    if status == SendStatus.FAILED:
        return f"failed {what}: {send.error or send.smtp_reply or 'refused'}"
    if status == SendStatus.BOUNCED:
        return f"sent {what}, then bounced"
    if status == SendStatus.COMPLAINED:
        return f"sent {what}, then reported as spam"
    if status == SendStatus.SENDING:
        return f"in doubt {what}: the run stopped while handing it to the SMTP server"
    return f"being sent {what} (claimed by a run)"


def _mails_and_feedback(session: Session, customer_id: int, now: datetime) -> list[Entry]:
    sends = list(session.execute(select(Send).where(col(Send.customer_id) == customer_id,
                                                    col(Send.evaluated_at) <= now).order_by(col(Send.id))).scalars())
    decided: dict[tuple[str, str], ExperimentLook] = {}
    experiments = {(s.trigger, s.step) for s in sends if s.variant}
    if experiments:  # the winners named by now, for the mails of steps with an experiment
        for look in session.execute(select(ExperimentLook).where(
                col(ExperimentLook.trigger).in_({t for t, _ in experiments}), col(ExperimentLook.winner).is_not(None),
                col(ExperimentLook.decided_at) <= now).order_by(col(ExperimentLook.look))).scalars():
            decided.setdefault((look.trigger, look.step), look)
    entries = [Entry(s.evaluated_at, "mail", _mail_sentence(s, decided), s.trigger, s.id,
                     {"status": s.status, "stage": s.stage, "template": s.template, "category": s.category,
                      "step": s.step, "variant": s.variant,
                      "error": s.error, "smtp_reply": s.smtp_reply,
                      "not_before": s.not_before.isoformat() if s.not_before else None})
               for s in sends]
    by_key = {s.send_key: s for s in sends}
    if by_key:
        reports = session.execute(select(Feedback).where(col(Feedback.send_key).in_(list(by_key)),
                                                         col(Feedback.occurred_at) <= now)).scalars()
        for report in reports:
            send = by_key[report.send_key or ""]
            complaint = report.kind == FeedbackKind.COMPLAINT
            what = (f"reported {send.trigger} as spam" if complaint else
                    f"{send.trigger} came back: {report.kind.replace('_', ' ')} {report.status}".rstrip()
                    + (f" ({report.diagnostic})" if report.diagnostic else ""))
            entries.append(Entry(report.occurred_at, "complaint" if complaint else "bounce", what, send.trigger,
                                 send.id, {"kind": report.kind, "status": report.status,
                                           "diagnostic": report.diagnostic, "source": report.source}))
    return entries


def _engagements(session: Session, customer_id: int, now: datetime) -> list[Entry]:
    rows = session.execute(select(Engagement, col(Send.trigger), col(Send.links))
                           .join(Send, col(Send.id) == col(Engagement.send_id))
                           .where(col(Engagement.customer_id) == customer_id, col(Send.customer_id) == customer_id,
                                  col(Engagement.at) <= now)).all()
    entries = []
    for engagement, trigger, links in rows:
        who = ("a person" if not engagement.machine
               else f"a machine: {MACHINE_REASONS.get(engagement.machine, engagement.machine)}")
        repeats = f", {engagement.repeats} repeat(s) folded in" if engagement.repeats else ""
        detail = {"machine": engagement.machine, "person": not engagement.machine, "repeats": engagement.repeats}
        if engagement.kind == "click":
            destinations = (links or "").split("\n")
            link = destinations[engagement.link] if 0 <= engagement.link < len(destinations) else ""
            detail |= {"link": engagement.link, "destination": link}
            entries.append(Entry(engagement.at, "click", f"clicked {link or 'link ' + str(engagement.link)} in "
                                 f"{trigger}, by {who}{repeats}", trigger, engagement.send_id, detail))
        else:
            entries.append(Entry(engagement.at, "open", f"opened {trigger}, by {who}{repeats} (opens are unreliable)",
                                 trigger, engagement.send_id, detail))
    return entries


def _orders(session: Session, customer_id: int, now: datetime) -> list[Entry]:
    rows = session.execute(select(Order, Attribution).outerjoin(Attribution, col(Attribution.order_id) == col(Order.id))
                           .where(col(Order.customer_id) == customer_id, col(Order.placed_at) <= now)).all()
    entries = []
    for order, attribution in rows:
        amount = f"{order.currency} {order.total_cents / 100:,.2f}"
        detail: dict[str, Any] = {"order": order.external_id, "total_cents": order.total_cents,
                                  "currency": order.currency}
        if attribution is None:
            what, trigger, send_id = f"ordered {order.external_id} ({amount}): not attributed yet", "", None
            detail["attribution"] = None
        elif attribution.send_id is None:
            what, trigger, send_id = (f"ordered {order.external_id} ({amount}): unattributed (no marketing mail "
                                      "touched within the window)", "", None)
            detail["attribution"] = "unattributed"
        else:
            touched = attribution.touched_at.strftime("%Y-%m-%d %H:%M UTC") if attribution.touched_at else "?"
            trigger, send_id = attribution.trigger or "", attribution.send_id
            what = (f"ordered {order.external_id} ({amount}): attributed to {trigger} (send {send_id}), by its "
                    f"{attribution.basis} at {touched}")
            detail |= {"attribution": attribution.basis, "send_id": send_id, "trigger": trigger,
                       "touched_at": attribution.touched_at.isoformat() if attribution.touched_at else None}
        entries.append(Entry(order.placed_at, "order", what, trigger, send_id, detail))
    return entries
