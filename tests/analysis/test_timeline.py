"""A customer's timeline: what support reads to answer "why did I get this?"."""

from datetime import timedelta

import pytest
from sqlmodel import Session

from flows.analysis.timeline import AmbiguousCustomer, timeline
from models import CategoryOptOut, ConsentChange, Feedback
from tests.support.builders import NOW, Store, ago
from tests.support.outcomes import Outcomes


def test_the_timeline_shows_each_mail_click_and_order_with_its_attribution(store: Store) -> None:
    outcomes = Outcomes(store)
    lea = store.customer("Lea")
    mail = outcomes.send(lea, "abandoned-cart", ago(days=3), links=("https://shop.example/cart", "https://shop.example/"))
    outcomes.click(mail, ago(days=3) + timedelta(seconds=2), machine="too_soon")
    outcomes.click(mail, ago(days=2), link=1, repeats=2)
    attributed = outcomes.converted(mail, ago(days=2) + timedelta(hours=1), total=89.9)
    alone = outcomes.order(lea, ago(days=1), total=15.0, currency="CHF")
    outcomes.attributed(alone, None)
    outcomes.order(lea, ago(hours=2))  # the attribution has not looked at it yet
    outcomes.send(lea, "winback-lapsed", ago(days=10), "held_out", stage="lapsed")

    found = timeline(store.engine, lea.external_id, now=NOW)
    assert found is not None and found.external_id == lea.external_id and found.email == lea.email
    assert [e.kind for e in found.entries] == ["mail", "mail", "click", "click", "order", "order", "order"]
    assert [e.at for e in found.entries] == sorted(e.at for e in found.entries)
    held, sent = found.of_kind("mail")
    assert held.detail["status"] == "held_out" and "holdout group" in held.what
    assert sent.detail["status"] == "sent" and sent.send_id == mail.id
    machine, person = found.of_kind("click")
    assert machine.detail["person"] is False and "too soon after the send" in machine.what
    assert person.detail == {"machine": "", "person": True, "repeats": 2, "link": 1,
                             "destination": "https://shop.example/"}  # the mail's own second link
    first, second, third = found.of_kind("order")
    assert first.detail["order"] == attributed.external_id and first.send_id == mail.id
    assert first.detail["attribution"] == "click" and "attributed to abandoned-cart" in first.what
    assert "EUR 89.90" in first.what
    assert second.detail["attribution"] == "unattributed" and "CHF 15.00" in second.what
    assert third.detail["attribution"] is None and "not attributed yet" in third.what


def test_skips_are_explained_by_the_ledger_s_reasons_consent_and_suppression(store: Store) -> None:
    outcomes = Outcomes(store)
    ben = store.customer("Ben")
    outcomes.send(ben, "abandoned-cart", ago(days=9), "failed", error="550 5.1.1 mailbox unknown")
    outcomes.send(ben, "we-miss-you", ago(days=8), "expired", error="no longer due when its moment came")
    outcomes.send(ben, "winback-lapsed", ago(days=7), "deferred", not_before=ago(days=6))
    bounced = outcomes.send(ben, "onboarding-day-3", ago(days=5), "bounced")
    with Session(store.engine) as session:
        session.add(Feedback(report_id="dsn-1", send_key=bounced.send_key, trigger=bounced.trigger, email=ben.email,
                             kind="hard_bounce", status="5.1.1", diagnostic="user unknown", source="dsn",
                             occurred_at=ago(days=4)))
        session.add(ConsentChange(customer_id=ben.id, at=ago(days=3), change="withdrawn", source="unsubscribe link"))
        session.add(CategoryOptOut(customer_id=ben.id, category="campaign", created_at=ago(days=2)))
        session.commit()
    store.suppress(ben.email, reason="hard_bounce")

    found = timeline(store.engine, ben.external_id, now=NOW + timedelta(days=365))
    assert found is not None
    mails = {e.trigger: e for e in found.of_kind("mail")}
    assert "550 5.1.1 mailbox unknown" in mails["abandoned-cart"].what
    assert "no longer due when its moment came" in mails["we-miss-you"].what
    assert "deferred" in mails["winback-lapsed"].what and ago(days=6).strftime("%Y-%m-%d %H:%M") in \
        mails["winback-lapsed"].what
    assert "then bounced" in mails["onboarding-day-3"].what
    (bounce,) = found.of_kind("bounce")
    assert bounce.send_id == bounced.id and "hard bounce 5.1.1 (user unknown)" in bounce.what
    (consent,) = found.of_kind("consent")
    assert "withdrawn" in consent.what and "unsubscribe link" in consent.what
    assert "campaign" in found.of_kind("opt_out")[0].what
    assert found.of_kind("suppression")[0].detail["reason"] == "hard_bounce"


def test_nothing_after_now_is_shown(store: Store) -> None:
    outcomes = Outcomes(store)
    kim = store.customer("Kim")
    early = outcomes.send(kim, "abandoned-cart", ago(days=3))
    outcomes.click(early, ago(days=1))
    outcomes.send(kim, "we-miss-you", ago(hours=1))
    outcomes.order(kim, ago(minutes=30))
    found = timeline(store.engine, kim.external_id, now=ago(days=2))
    assert found is not None and [e.kind for e in found.entries] == ["mail"]


def test_a_shared_mailbox_shows_only_the_named_customer_s_own_rows(store: Store) -> None:
    outcomes = Outcomes(store)
    one = store.customer("Eins", email="familie@example.de")
    other = store.customer("Zwei", email="Familie@example.de")
    mine = outcomes.send(one, "abandoned-cart", ago(days=2))
    theirs = outcomes.send(other, "we-miss-you", ago(days=1))
    outcomes.click(theirs, ago(hours=20))
    outcomes.converted(theirs, ago(hours=10))
    found = timeline(store.engine, one.external_id, now=NOW)
    assert found is not None
    assert {e.send_id for e in found.entries} == {mine.id}
    assert all(e.trigger != "we-miss-you" for e in found.entries)
    with pytest.raises(AmbiguousCustomer, match=r"2 customers share the address familie@example\.de"):
        timeline(store.engine, "FAMILIE@example.de", now=NOW)


def test_a_customer_is_found_by_address_and_an_unknown_one_is_none(store: Store) -> None:
    ida = store.customer("Ida", email="ida@example.de")
    found = timeline(store.engine, "Ida@Example.de", now=NOW)
    assert found is not None and found.external_id == ida.external_id and found.entries == []
    assert timeline(store.engine, "nobody", now=NOW) is None
    assert timeline(store.engine, "nobody@example.de", now=NOW) is None
