"""What a refusal says about an address (RFC 3463), and what recording a report may do."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select
from sqlmodel import Session

from flows.feedback.bounces import (
    Report,
    SoftBounceRule,
    Verdict,
    classify,
    enhanced_code,
    record,
)
from flows.feedback.reports import process
from flows.privacy import forget
from flows.send import claims as ledger
from models import Customer, Feedback, FeedbackKind, Send, Suppression
from tests.support.builders import NOW, Store
from tests.support.ledger import statuses

HARD, SOFT, MESSAGE = FeedbackKind.HARD_BOUNCE, FeedbackKind.SOFT_BOUNCE, FeedbackKind.MESSAGE_FAILURE
SECRET = "test-secret-0123456789"


@pytest.mark.parametrize(("code", "text", "kind", "status"), [
    (550, "5.1.1 <a@example.de>: Recipient address rejected: User unknown", HARD, "5.1.1"),
    (550, "5.1.2 Host unknown", HARD, "5.1.2"),
    (553, "5.1.3 Bad destination mailbox address syntax", HARD, "5.1.3"),
    (550, "5.1.6 Mailbox has moved", HARD, "5.1.6"),
    (550, "5.1.10 Recipient address has null MX", HARD, "5.1.10"),
    (550, "User unknown", HARD, ""),  # a plain 550 worded like "user unknown", no enhanced code
    (554, "5.7.1 Relay access denied", MESSAGE, "5.7.1"),
    (550, "Relay access denied", MESSAGE, ""),
    (535, "5.7.8 Authentication credentials invalid", MESSAGE, "5.7.8"),
    (552, "5.2.2 Mailbox full", SOFT, "5.2.2"),
    (552, "5.3.4 Message too big for system", MESSAGE, "5.3.4"),
    (554, "5.6.0 Message content rejected", MESSAGE, "5.6.0"),
    (554, "5.4.4 Unable to route", MESSAGE, "5.4.4"),
    (500, "Error: command not recognized", MESSAGE, ""),
])
def test_only_codes_that_say_the_address_is_bad_are_hard_bounces(code: int, text: str, kind: FeedbackKind,
                                                                 status: str) -> None:
    assert classify(code, text) == Verdict(kind, status)


def test_an_ip_address_in_a_reply_is_not_a_status_code() -> None:
    """"[5.1.2.3] blocked" is a blocked IP (the relay's or ours), not "bad destination system"."""
    assert classify(550, "Rejected: client host [5.1.2.3] blocked using zen.spamhaus.org").kind == MESSAGE
    assert classify(554, "5.7.1 Service unavailable; client host [10.5.1.1] blocked") == Verdict(MESSAGE, "5.7.1")
    assert enhanced_code("550 5.1.1.") == "5.1.1" and enhanced_code("host 4.2.2.2 said") == ""


def test_a_malformed_status_field_says_nothing_and_the_text_decides() -> None:
    assert classify(None, "smtp; 550 5.1.1 no such user", status="5") == Verdict(HARD, "5.1.1")
    assert classify(None, "gone", status="x.y").kind == MESSAGE


FORGED = b"""From: MAILER-DAEMON@elsewhere.example
To: bounces@shop.example
Subject: Undelivered Mail Returned to Sender
Message-ID: <forged-1@elsewhere.example>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

gone
--B
Content-Type: message/delivery-status

Reporting-MTA: dns; elsewhere.example

Final-Recipient: rfc822; customer@example.com
Action: failed
Status: 5.1.1

--B--
"""


def test_a_report_naming_no_send_of_ours_is_kept_but_suppresses_nobody(engine: Engine) -> None:
    """Anyone can mail the bounce address: without a genuine token or one of our Message-IDs,
    a report cannot silence a customer."""
    tally = process(engine, FORGED, SECRET)
    assert (tally.new, tally.unmatched, tally.suppressed) == (1, 1, {})
    with Session(engine) as session:
        assert session.execute(select(Suppression)).all() == []
        assert [f.send_key for f in session.execute(select(Feedback)).scalars()] == [None]


def sent(store: Store, email: str, key: str = "winback-lapsed/1/x") -> str:
    customer = store.customer("Kim", email=email)
    claim = ledger.Claim(key, "winback-lapsed", customer.id, key.rsplit("/", 1)[1], "lapsed", "t", email,
                         f"<{key}@shop.example>")
    ledger.claim(store.engine, [claim], "run-1", NOW)
    ledger.record(store.engine, [ledger.Decision(key, ledger.SendStatus.SENT)])
    return key


def test_a_report_speaks_only_for_the_address_its_send_was_mailed_to(store: Store) -> None:
    key = sent(store, "kim@example.de")
    report = Report("dsn:1", "someone.else@example.com", HARD, "dsn", NOW, "5.1.1", send_key=key)
    assert record(store.engine, [report]).suppressed == {"kim@example.de": "hard_bounce"}
    assert statuses(store.engine) == {"bounced": 1}
    with Session(store.engine) as session:
        assert session.get(Suppression, "someone.else@example.com") is None


def test_a_late_report_on_a_forgotten_customers_mail_keeps_nothing_that_could_name_them(store: Store) -> None:
    key = sent(store, "kim@example.de")
    with Session(store.engine) as session:
        send = session.execute(select(Send).where(Send.send_key == key)).scalar_one()
        customer = session.get(Customer, send.customer_id)
        assert customer is not None
    assert forget(store.engine, customer.external_id, secret=SECRET, at=NOW).changed
    report = Report("dsn:late", "kim@example.de", HARD, "dsn", NOW, "5.1.1", send_key=key,
                    diagnostic="550 5.1.1 <kim@example.de>: Recipient address rejected")
    tally = record(store.engine, [report])
    assert (tally.new, tally.suppressed) == (1, {})
    with Session(store.engine) as session:
        [row] = session.execute(select(Feedback)).scalars().all()
        assert row.diagnostic == "" and "kim" not in row.email
        [kept] = session.execute(select(Suppression)).scalars().all()  # the erasure's own, not a bounce's
        assert (kept.email, kept.reason) == ("kim@example.de", "unsubscribed")
        assert "kim" not in session.execute(select(Send)).scalar_one().error


def test_soft_bounces_suppress_after_the_limit_within_the_window_and_only_once(store: Store) -> None:
    keys = [sent(store, "full@example.de", f"winback-lapsed/1/x{i}") for i in range(4)]
    rule = SoftBounceRule(limit=3, window=timedelta(days=30))
    at = datetime(2026, 3, 1, tzinfo=UTC)

    def soft(i: int, days: float) -> Report:
        return Report(f"dsn:soft{i}", "full@example.de", SOFT, "dsn", at + timedelta(days=days), "5.2.2",
                      send_key=keys[i])

    assert record(store.engine, [soft(0, 0), soft(1, 31)], rule).suppressed == {}  # 31 days apart: one at a time
    assert record(store.engine, [soft(2, 40)], rule).suppressed == {}  # two within 30 days
    third = record(store.engine, [soft(3, 45)], rule)
    assert third.suppressed == {"full@example.de": "soft_bounce"}
    again = record(store.engine, [soft(3, 45)], rule)  # the same report twice changes nothing
    assert (again.new, again.duplicates, again.suppressed) == (0, 1, {})
