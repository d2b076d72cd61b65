"""What happened to one due mail in one run: the one vocabulary of outcomes.

Each outcome has one spelling, ``family:reason``, and that spelling is what the CLI's
tables, the Prefect artifacts, the logs and ``RunSummary.outcomes`` show. The family
says what becomes of the mail:

- ``sent`` and ``would_send`` (a dry run);
- ``held_out``: in the trigger's holdout group, so not mailed, on purpose; recorded in the
  ledger (``held_out``) so it counts for re-entry and the frequency cap like a send;
- ``retry``: the relay said "later" after every retry; the claim is released and the
  next run tries again;
- ``deferred``: held by the sending policy (quiet hours, a frequency cap) until a later
  moment, and recorded as a deferral in the ledger;
- ``skipped``: not sent, for a reason that holds (no consent, suppressed, sent before);
- ``failed``: refused for good, or never composed; recorded so no run tries again
  (``in_doubt``: the connection was lost during DATA, so the relay may have it).

The ledger's own states (``models.SendStatus``) are a different thing: where a send
key stands, not what a run did. ``ledger_status`` maps the outcomes of an SMTP attempt
onto them, in this one place.
"""

from enum import StrEnum

from models import FeedbackKind, SendStatus


class Outcome(StrEnum):
    SENT = "sent"
    WOULD_SEND = "would_send"
    HELD_OUT = "held_out"  # the trigger's holdout group: never mailed, recorded to measure lift
    RETRY = "retry:smtp_temporary"

    # Refused for good at SMTP time, counted by what the refusal says (``flows.feedback.bounces.classify``).
    BOUNCED = "failed:bounced"  # the address is bad (hard bounce): suppressed
    SOFT_BOUNCED = "failed:soft_bounce"  # the mailbox refused (full, disabled): counts toward the soft-bounce limit
    REJECTED = "failed:rejected"  # the message or the relay was refused (policy, content, size): nobody suppressed
    IN_DOUBT = "failed:in_doubt"  # the connection was lost during DATA: maybe accepted, never retried
    # Never composed: one recipient's bad data fails only that recipient.
    RENDER_ERROR = "failed:render_error"
    INVALID_MESSAGE = "failed:invalid_message"

    NO_EMAIL = "skipped:no_email"
    SUPPRESSED = "skipped:suppressed"
    NO_CONSENT = "skipped:no_consent"
    CONSENT_PENDING = "skipped:consent_pending"  # asked, not yet confirmed (double opt-in)
    OPTED_OUT = "skipped:opted_out"  # left this category on the preference page
    DUPLICATE_ADDRESS = "skipped:duplicate_address"  # another customer record with this mailbox gets the mail
    REENTRY = "skipped:reentry"
    ALREADY_SENT = "skipped:already_sent"
    EXPIRED = "skipped:expired"  # deferred longer than its trigger allows
    NO_LONGER_DUE = "skipped:no_longer_due"  # deferred, and by its moment its occurrence was no longer due
    UNSUBSCRIBED = "skipped:unsubscribed_during_run"  # checked again just before sending
    # A journey step: recorded in the ledger (``passed``, ``exited``), so the journey goes on, or ends, from it.
    CONDITION_NOT_MET = "skipped:condition_not_met"  # the step's ``when`` did not hold: the journey goes on
    EXITED = "skipped:exited"  # an ``exit_when`` goal was reached: no later step

    QUIET_HOURS = "deferred:quiet_hours"
    FREQUENCY_CAP = "deferred:frequency_cap"
    WAITING = "deferred:waiting"  # deferred by an earlier run, its moment not reached yet
    TIME_OF_DAY = "deferred:time_of_day"  # a journey step's ``at``: held until that time in the customer's zone

    @property
    def family(self) -> str:
        """``sent``, ``would_send``, ``held_out``, ``retry``, ``deferred``, ``skipped`` or ``failed``."""
        return self.value.partition(":")[0]

    @property
    def deferred(self) -> bool:
        return self.family == "deferred"

    @property
    def ledger_status(self) -> SendStatus | None:
        """Where an SMTP attempt with this outcome leaves its send key: sent, failed, or None,
        released so the next run tries again (``retry``). ``in_doubt`` is never recorded: its
        key stays ``sending`` for an operator (``lifecycle ledger in-doubt``)."""
        if self is Outcome.IN_DOUBT:
            raise ValueError("an in-doubt send is not recorded: it stays sending")
        return _LEDGER.get(self)

    @classmethod
    def refused(cls, kind: FeedbackKind) -> "Outcome":
        """A permanent refusal, by what it says about the address."""
        return _REFUSED[kind]


_REFUSED = {
    FeedbackKind.HARD_BOUNCE: Outcome.BOUNCED,
    FeedbackKind.SOFT_BOUNCE: Outcome.SOFT_BOUNCED,
    FeedbackKind.MESSAGE_FAILURE: Outcome.REJECTED,
}
_LEDGER = {
    Outcome.SENT: SendStatus.SENT,
    Outcome.BOUNCED: SendStatus.FAILED,
    Outcome.SOFT_BOUNCED: SendStatus.FAILED,
    Outcome.REJECTED: SendStatus.FAILED,
}
# The families as a run's headline groups them, in the order it lists them.
FAMILIES = ("sent", "would_send", "held_out", "retry", "deferred", "skipped", "failed")
