"""What a refusal says about an address, and what Lifecycle does about it.

One classification (RFC 3463 enhanced status codes) serves every way a failure comes
back: the SMTP reply during a run, a delivery status notification read later, and a
provider's webhook. Only codes that say the address is bad suppress it at once; the
mailbox's own trouble (full, disabled) is counted per address and suppresses after
``LIFECYCLE_SOFT_BOUNCE_LIMIT`` within ``LIFECYCLE_SOFT_BOUNCE_WINDOW_DAYS``; what is
wrong with the message or the relay (policy, authentication, size, content, routing)
is recorded against the send and never against the address.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlalchemy import Engine, func, select, update
from sqlmodel import col

from flows.privacy import is_placeholder
from models import (
    Feedback,
    FeedbackKind,
    Send,
    SendStatus,
    Suppression,
    SuppressionReason,
    suppression_key,
)
from models.db import insert_for
from models.ledger import message_digest
from models.types import utcnow

# The address itself is bad (RFC 3463 §3.2): bad mailbox, bad system, bad syntax, moved,
# and (RFC 3886 / 6.8) the newer "recipient address has null MX" 5.1.10.
ADDRESS_CODES = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10"})
# Not inside a longer dotted number: "client host [5.1.2.3] blocked" names an IP, not 5.1.2.
ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d]|\.\d)")
STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
# Without an enhanced code, only a plain 550/551/553 worded like "user unknown" means the address.
USER_UNKNOWN = re.compile(
    r"user unknown|unknown user|no such (user|mailbox|recipient)|mailbox (unavailable|not found|does not exist)"
    r"|recipient (address )?rejected: (user unknown|undeliverable)|does not exist|invalid (recipient|mailbox)"
    r"|address rejected|not a valid mailbox|unrouteable address",
    re.IGNORECASE,
)
RELAY_WORDS = re.compile(r"relay(ing)? (access )?denied|not permitted to relay|authentication (required|failed)"
                         r"|sender address rejected|access denied", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: FeedbackKind
    status: str  # the enhanced code, or "" when the reply had none

    @property
    def about_the_address(self) -> bool:
        return self.kind in (FeedbackKind.HARD_BOUNCE, FeedbackKind.SOFT_BOUNCE)


def enhanced_code(text: str) -> str:
    """The first RFC 3463 code in a reply or diagnostic (``550 5.1.1 …`` → ``5.1.1``), or ""."""
    match = ENHANCED.search(text)
    return ".".join(match.groups()) if match else ""


def classify(code: int | None, text: str, status: str | None = None) -> Verdict:
    """A permanent or final refusal of one recipient: what it says about the address.

    ``code`` is the SMTP reply code (None in a DSN without one), ``text`` the reply or
    diagnostic, ``status`` an enhanced code given apart (a DSN's ``Status:`` field).
    """
    status = status.strip() if status and STATUS.fullmatch(status.strip()) else ""  # a malformed one says nothing
    if not status or status.endswith(".0.0"):
        # x.0.0 says nothing ("other or undefined"; Exim writes it in every DSN): a specific code in the text decides.
        status = next((c for c in map(".".join, ENHANCED.findall(text)) if not c.endswith(".0.0")), status)
    if status and not status.endswith(".0.0"):
        klass, subject = status.split(".")[0], status.split(".")[1]
        if status in ADDRESS_CODES:
            return Verdict(FeedbackKind.HARD_BOUNCE, status)
        if subject == "2" or klass == "4":  # mailbox status (full, disabled), or still temporary when given up
            return Verdict(FeedbackKind.SOFT_BOUNCE, status)
        return Verdict(FeedbackKind.MESSAGE_FAILURE, status)  # 5.7 policy, 5.3 size, 5.6 content, 5.4 routing…
    if code in (550, 551, 553) and USER_UNKNOWN.search(text) and not RELAY_WORDS.search(text):
        return Verdict(FeedbackKind.HARD_BOUNCE, status)
    if (code is not None and 400 <= code < 500) or status.startswith("4."):
        return Verdict(FeedbackKind.SOFT_BOUNCE, status)
    return Verdict(FeedbackKind.MESSAGE_FAILURE, status)


@dataclass(frozen=True, slots=True)
class Report:
    """One bounce or complaint about one recipient, from wherever it came."""

    report_id: str  # unique per source: processing the same report twice changes nothing
    email: str
    kind: FeedbackKind
    source: str  # smtp, dsn, arf, ses, postmark
    occurred_at: datetime
    status: str = ""
    diagnostic: str = ""
    send_key: str | None = None  # from the VERP token; else matched by ``message_id``
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class SoftBounceRule:
    limit: int = 3
    window: timedelta = timedelta(days=30)


@dataclass
class Recorded:
    """What recording a set of reports did (new reports only)."""

    new: int = 0
    duplicates: int = 0
    unmatched: int = 0  # no send found by token or Message-ID: recorded, never suppresses
    suppressed: dict[str, str] = field(default_factory=dict)  # address → reason


_SEND_STATUS = {FeedbackKind.HARD_BOUNCE: SendStatus.BOUNCED, FeedbackKind.SOFT_BOUNCE: SendStatus.BOUNCED,
                FeedbackKind.MESSAGE_FAILURE: SendStatus.BOUNCED, FeedbackKind.COMPLAINT: SendStatus.COMPLAINED}
_SUPPRESS = {FeedbackKind.HARD_BOUNCE: SuppressionReason.HARD_BOUNCE,
             FeedbackKind.COMPLAINT: SuppressionReason.SPAM_COMPLAINT}


def record(engine: Engine, reports: Sequence[Report], rule: SoftBounceRule = SoftBounceRule(),
           update_sends: bool = True) -> Recorded:
    """Store each new report once, mark its send, and suppress by the rules above.

    ``update_sends`` is False for refusals at RCPT during a run: their send is already
    recorded ``failed`` by dispatch. A later report moves a ``sent`` send to ``bounced``
    or ``complained`` (a complaint wins over a bounce of the same send).
    """
    result = Recorded()
    if not reports:
        return result
    now = utcnow()
    with engine.begin() as connection:
        for report in reports:
            key, trigger = report.send_key, None
            if key is None and report.message_id:
                key = connection.execute(select(col(Send.send_key)).where(
                    message_digest(Send.message_id) == report.message_id[1:33],
                    col(Send.message_id) == report.message_id)).scalar()
            email = suppression_key(report.email)
            if key is not None:
                send = connection.execute(
                    select(col(Send.trigger), col(Send.email)).where(col(Send.send_key) == key)).first()
                if send is None:
                    key = None  # a token for a send this store does not have
                else:
                    # The address we mailed, whatever the report claims: a report can only
                    # ever speak for the send it names.
                    trigger, email = send[0], suppression_key(send[1])
            erased = is_placeholder(email)
            if erased:  # a late report on a forgotten customer's mail: its text may name them
                report = replace(report, diagnostic="")
            inserted = connection.execute(
                insert_for(engine)(Feedback).values(
                    report_id=report.report_id[:255], send_key=key, trigger=trigger, email=email,
                    kind=report.kind.value, status=report.status[:16], diagnostic=report.diagnostic[:1000],
                    source=report.source, occurred_at=report.occurred_at, recorded_at=now)
                .on_conflict_do_nothing(index_elements=["report_id"]).returning(col(Feedback.id))).scalar()
            if inserted is None:
                result.duplicates += 1
                continue
            result.new += 1
            if key is None:
                # Anyone can mail the bounce address: a report naming no send of ours is kept
                # for the record, and never suppresses (or counts toward) any address.
                result.unmatched += 1
                continue
            if update_sends:
                allowed = [SendStatus.SENT, SendStatus.BOUNCED] if report.kind == FeedbackKind.COMPLAINT \
                    else [SendStatus.SENT]
                connection.execute(update(Send).where(col(Send.send_key) == key, col(Send.status).in_(allowed)).values(
                    status=_SEND_STATUS[report.kind], error=f"{report.source}: {report.status} {report.diagnostic}"
                    .strip()[:1000]))
            reason = None if erased else _SUPPRESS.get(report.kind)  # the erasure already suppressed them
            if reason is None and report.kind == FeedbackKind.SOFT_BOUNCE and not erased:
                recent = connection.execute(select(func.count()).select_from(Feedback).where(
                    func.lower(Feedback.email) == email, col(Feedback.kind) == FeedbackKind.SOFT_BOUNCE,
                    col(Feedback.send_key).is_not(None),
                    col(Feedback.occurred_at) > report.occurred_at - rule.window,
                    col(Feedback.occurred_at) <= report.occurred_at)).scalar_one()
                if recent >= rule.limit:
                    reason = SuppressionReason.SOFT_BOUNCE
            if reason is not None:
                detail = f"{report.source}: {report.status} {report.diagnostic}".strip()[:1000]
                done = connection.execute(
                    insert_for(engine)(Suppression).values(email=email, reason=reason.value,
                                                        detail=detail, created_at=now)
                    .on_conflict_do_nothing(index_elements=["email"]).returning(col(Suppression.email))).scalar()
                if done:
                    result.suppressed[done] = reason.value
    return result


def complaint_rates(engine: Engine, since: datetime | None = None) -> dict[str, tuple[int, int]]:
    """Per trigger: (spam complaints, mails sent) since ``since``; Gmail asks senders to stay under 0.3 %."""
    with engine.connect() as connection:
        sent_statuses = [SendStatus.SENT, SendStatus.BOUNCED, SendStatus.COMPLAINED]
        query = select(col(Send.trigger), func.count()).where(col(Send.status).in_(sent_statuses)).group_by(
            col(Send.trigger))
        complaints = select(col(Feedback.trigger), func.count()).where(
            col(Feedback.kind) == FeedbackKind.COMPLAINT, col(Feedback.trigger).is_not(None)).group_by(
            col(Feedback.trigger))
        if since is not None:
            query = query.where(col(Send.evaluated_at) >= since)
            complaints = complaints.where(col(Feedback.occurred_at) >= since)
        sent = dict(connection.execute(query).all())
        complained = dict(connection.execute(complaints).all())
    return {trigger: (complained.get(trigger, 0), n) for trigger, n in sent.items()}


COMPLAINT_RATE_WARNING = 0.001  # 0.1 %: warn well before Gmail's 0.3 % line


def trigger_complaints(engine: Engine, trigger: str, now: datetime, days: float = 30) -> tuple[int, int] | None:
    """(spam complaints, mails sent) of one trigger over the last ``days``: the run summary's warning."""
    return complaint_rates(engine, now - timedelta(days=days)).get(trigger)
