"""The shipped example journeys, as a customer lives them: each validates with its templates in
German and English, and real runs at several moments send each step to whom it is for.

The runs are Prefect-free (``tests.support.runs.run``) over SQLite and PostgreSQL, with the
shipped policy (caps, quiet hours) and mail to a real SMTP server on loopback. As everywhere
in the tests, the shipped holdouts are left out unless a test puts them back.
"""

import json
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, select
from sqlmodel import Session, col

from flows.audience.variants import assign
from flows.ingest import ingest_lines
from flows.outcomes import Outcome
from flows.settings import Settings
from flows.spec.project import load_project
from models import Customer, Engagement, Send, SendStatus
from tests.support import ROOT
from tests.support.builders import NOW, Store, ago
from tests.support.children import lifecycle
from tests.support.runs import run
from tests.support.smtp_server import SmtpServer

EXAMPLES = {"abandoned-cart": "abandoned_cart.yaml", "onboarding-day-0": "onboarding_day_0.yaml",
            "post-purchase-nps": "post_purchase_nps.yaml", "referral-loyal": "referral.yaml",
            "we-miss-you": "inactivity.yaml"}


def rows(engine: Engine, trigger: str) -> list[Send]:
    with Session(engine) as session:
        return list(session.execute(select(Send).where(col(Send.trigger) == trigger).order_by(col(Send.id)))
                    .scalars())


def steps_of(engine: Engine, trigger: str) -> dict[tuple[int, str], SendStatus]:
    """(customer, step) → what became of it."""
    return {(r.customer_id, r.step): r.status for r in rows(engine, trigger)}


def mail_to(smtp: SmtpServer, customer: Customer) -> list[str]:
    """The subjects ``customer`` received, in order."""
    return [str(m.message["Subject"]) for m in smtp.received if customer.email and customer.email in m.recipients]


def click(engine: Engine, send: Send, at: datetime) -> None:
    with Session(engine) as session:
        session.add(Engagement(send_id=send.id, customer_id=send.customer_id, kind="click", link=0, at=at))
        session.commit()


def track(engine: Engine, customer: Customer, event: str, at: datetime, **properties: object) -> None:
    """The shop's event, through ingest as it arrives."""
    line = {"type": "track", "userId": customer.external_id, "event": event, "timestamp": at.isoformat(),
            "messageId": f"{customer.external_id}-{event}-{at.isoformat()}", "properties": properties}
    report = ingest_lines(engine, [json.dumps(line)])
    assert report.errors == [], report.errors


# -- every example is valid, in both languages ------------------------------------------

def test_the_five_example_journeys_validate_with_every_step_rendered_and_no_warning(tmp_path: Path) -> None:
    project = load_project(ROOT / "triggers", ROOT / "templates")
    assert project.problems == []
    assert [w for w in project.warnings if w.file.name in EXAMPLES.values()] == []
    for name in EXAMPLES:
        trigger = project.triggers[name]
        assert trigger.journey is not None and len(trigger.mails()) >= 2, name
        for _, email in trigger.mails():
            assert set(project.catalog.languages_for(email)) >= {"de", "en"}, (name, email.template)
    result = lifecycle("validate", settings=Settings(database_url=f"sqlite:///{tmp_path / 'store.db'}"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in (result.stdout + result.stderr).lower()


# -- 1. the abandoned-cart series ----------------------------------------------------------

def test_the_cart_series_reminds_then_nudges_then_offers_big_carts_an_incentive_until_they_order(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    big, small, buyer = store.customer("Berta"), store.customer("Sven"), store.customer("Olga")
    store.cart(big, ago(hours=3), [("Zelt", 249.0, 1)])
    store.cart(small, ago(hours=3), [("Socken", 9.9, 2)])
    store.cart(buyer, ago(hours=3), [("Rucksack", 119.0, 1)])

    run(settings, "abandoned-cart")
    assert {tuple(mail_to(smtp, c)) for c in (big, small, buyer)} == {
        (f"{c.first_name}, dein Warenkorb wartet auf dich",) for c in (big, small, buyer)}
    # The series' first step keeps the one-mail reminder's keys: trigger/customer/cart state.
    for entry in rows(engine, "abandoned-cart"):
        assert entry.send_key == f"abandoned-cart/{entry.customer_id}/{entry.occurrence}"
        assert entry.occurrence.startswith("cart:") and entry.step == "reminder"

    store.order(buyer, NOW + timedelta(hours=6), total=119.0)
    run(settings, "abandoned-cart", NOW + timedelta(hours=21))  # 22 h after the reminder: not yet
    assert len(smtp.received) == 3
    run(settings, "abandoned-cart", NOW + timedelta(hours=22, minutes=15))
    assert mail_to(smtp, big)[-1] == mail_to(smtp, small)[-1] == "Noch da: deine Artikel im Warenkorb"
    assert len(mail_to(smtp, buyer)) == 1

    run(settings, "abandoned-cart", NOW + timedelta(hours=70))  # 48 h after the nudge: not yet
    assert len(smtp.received) == 5
    last = run(settings, "abandoned-cart", NOW + timedelta(hours=70, minutes=30))
    assert mail_to(smtp, big)[-1] == "10 % auf deinen Warenkorb, nur bis morgen"
    assert len(mail_to(smtp, small)) == 2
    assert last.steps["incentive"][Outcome.SENT] == 1
    assert steps_of(engine, "abandoned-cart") == {
        (big.id, "reminder"): SendStatus.SENT, (big.id, "nudge"): SendStatus.SENT,
        (big.id, "incentive"): SendStatus.SENT,
        (small.id, "reminder"): SendStatus.SENT, (small.id, "nudge"): SendStatus.SENT,
        (small.id, "incentive"): SendStatus.PASSED,  # a cart under 80 gets no incentive
        (buyer.id, "reminder"): SendStatus.SENT, (buyer.id, "nudge"): SendStatus.EXITED}
    run(settings, "abandoned-cart", NOW + timedelta(days=5))
    assert len(smtp.received) == 6  # each step once


# -- 2. the welcome series -----------------------------------------------------------------

def test_the_welcome_series_sends_day_3_and_on_day_7_follows_the_day_3_click_until_the_first_order(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    clicker, quiet, buyer = (store.customer(name, created=ago(hours=2), locale="en-GB")
                             for name in ("Clara", "Quinn", "Bea"))
    run(settings, "onboarding-day-0")
    assert {tuple(mail_to(smtp, c)) for c in (clicker, quiet, buyer)} == {
        (f"Welcome, {c.first_name}!",) for c in (clicker, quiet, buyer)}

    run(settings, "onboarding-day-0", NOW + timedelta(days=3, hours=1))
    assert {mail_to(smtp, c)[-1] for c in (clicker, quiet, buyer)} == {"Three tips for shopping with us"}
    day3 = {r.customer_id: r for r in rows(engine, "onboarding-day-0") if r.step == "day-3"}
    click(engine, day3[clicker.id], NOW + timedelta(days=4))
    store.order(buyer, NOW + timedelta(days=5))

    run(settings, "onboarding-day-0", NOW + timedelta(days=7, hours=2))
    assert mail_to(smtp, clicker)[-1] == "What other customers love right now"
    assert mail_to(smtp, quiet)[-1] == "Your welcome gift: €10 off your first order"
    assert len(mail_to(smtp, buyer)) == 2
    done = steps_of(engine, "onboarding-day-0")
    assert done[(clicker.id, "day-7-bestsellers")] == done[(quiet.id, "day-7-offer")] == SendStatus.SENT
    assert (clicker.id, "day-7-offer") not in done and (quiet.id, "day-7-bestsellers") not in done
    assert SendStatus.EXITED in {done.get((buyer.id, "day-7-bestsellers")), done.get((buyer.id, "day-7-offer"))}
    run(settings, "onboarding-day-0", NOW + timedelta(days=8))
    assert len(smtp.received) == 8


# -- 3. the post-purchase NPS question -----------------------------------------------------

def test_ten_days_after_delivery_the_nps_question_goes_and_only_a_detractor_hears_from_service(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    detractor, promoter, silent, odd = (store.customer(name) for name in ("Dirk", "Paula", "Sina", "Otto"))
    for customer in (detractor, promoter, silent, odd):
        track(engine, customer, "Order Delivered", ago(days=10, hours=3), order_id=f"o-{customer.external_id}")
    recent = store.customer("Rita")  # delivered three days ago: not yet
    track(engine, recent, "Order Delivered", ago(days=3), order_id="o-recent")

    run(settings, "post-purchase-nps")
    asked = (detractor, promoter, silent, odd)
    assert [mail_to(smtp, c) for c in asked] == [["Wie zufrieden bist du mit deiner Bestellung?"]] * 4
    assert mail_to(smtp, recent) == []

    track(engine, detractor, "NPS Answered", NOW + timedelta(hours=5), score=4)
    track(engine, promoter, "NPS Answered", NOW + timedelta(hours=6), score=9)
    track(engine, odd, "NPS Answered", NOW + timedelta(hours=7), score="schlecht")  # not a number: no match
    run(settings, "post-purchase-nps", NOW + timedelta(days=1))
    assert len(smtp.received) == 4  # the follow-up waits two days
    run(settings, "post-purchase-nps", NOW + timedelta(days=2, minutes=5))
    assert mail_to(smtp, detractor)[-1] == "Das tut uns leid: wir melden uns bei dir"
    (follow_up,) = [m for m in smtp.received if str(m.message["Subject"]).startswith("Das tut uns leid")]
    assert "service@shop.example" in str(follow_up.message["From"])
    assert [len(mail_to(smtp, c)) for c in (promoter, silent, odd)] == [1, 1, 1]
    follow_ups = {c: s for (c, step), s in steps_of(engine, "post-purchase-nps").items() if step == "service-follow-up"}
    assert follow_ups == {detractor.id: SendStatus.SENT, promoter.id: SendStatus.PASSED,
                          silent.id: SendStatus.PASSED, odd.id: SendStatus.PASSED}


# -- 4. the referral invitation ------------------------------------------------------------

def test_loyal_customers_are_invited_once_and_reminded_only_if_they_did_not_click(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    keen, busy, newcomer = store.customer("Karl"), store.customer("Berit"), store.customer("Nina")
    for customer in (keen, busy):
        for days in (300, 200, 100, 50, 20):
            store.order(customer, ago(days=days))
    store.order(newcomer, ago(days=20))

    run(settings, "referral-loyal")
    assert mail_to(smtp, keen) == mail_to(smtp, busy) == ["Empfiehl uns weiter: 15 € für dich und deine Freunde"]
    assert mail_to(smtp, newcomer) == []  # not loyal
    invitation = {r.customer_id: r for r in rows(engine, "referral-loyal")}
    click(engine, invitation[keen.id], NOW + timedelta(hours=3))

    for day in range(1, 9):  # the campaign runs daily: invited once, reminded once
        run(settings, "referral-loyal", NOW + timedelta(days=day))
    assert len(mail_to(smtp, keen)) == 1
    assert mail_to(smtp, busy)[-1] == "Noch nicht dazu gekommen? Dein Empfehlungslink wartet"
    assert len(mail_to(smtp, busy)) == 2
    assert steps_of(engine, "referral-loyal")[(keen.id, "reminder")] == SendStatus.PASSED


# -- 5. the win-back with an A/B test on the subject ---------------------------------------

SUBJECTS = {"greeting": "Lange nicht gesehen, {name}!", "news": "Neu seit deinem letzten Besuch: schau mal rein"}


def test_the_winback_nudge_goes_out_under_the_subject_each_customers_arm_draws_and_the_offer_skips_buyers(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    people = [store.customer(f"K{i}", last_seen=ago(days=70)) for i in range(30)]
    for person in people:
        store.order(person, ago(days=90))
    summary = run(settings, "we-miss-you")
    assert summary.steps["nudge"][Outcome.SENT] == 30
    nudges = {r.customer_id: r for r in rows(engine, "we-miss-you")}
    for person in people:
        arm = assign([("greeting", 1), ("news", 1)], "we-miss-you", "nudge", "", person.external_id)
        assert nudges[person.id].variant == arm
        # The first step keeps the one-mail nudge's key: trigger/customer/quiet spell.
        assert nudges[person.id].send_key == f"we-miss-you/{person.id}/{nudges[person.id].occurrence}"
        assert mail_to(smtp, person) == [SUBJECTS[arm].format(name=person.first_name)]
    assert {r.variant for r in nudges.values()} == {"greeting", "news"}

    buyers = people[:5]
    for person in buyers:
        store.order(person, NOW + timedelta(days=2))
    run(settings, "we-miss-you", NOW + timedelta(days=6))  # the offer waits a week
    assert len(smtp.received) == 30
    offered = run(settings, "we-miss-you", NOW + timedelta(days=7, minutes=5))
    assert offered.steps["offer"][Outcome.SENT] == 25 and offered.steps["offer"][Outcome.EXITED] == 5
    for person in people:
        assert len(mail_to(smtp, person)) == (1 if person in buyers else 2), person.first_name
    assert {mail_to(smtp, p)[-1] for p in people[5:]} == {"Komm zurück: 10 % auf deine nächste Bestellung"}
    offers = steps_of(engine, "we-miss-you")
    assert {offers[(p.id, "offer")] for p in buyers} == {SendStatus.EXITED}
    run(settings, "we-miss-you", NOW + timedelta(days=8, minutes=5))
    assert len(smtp.received) == 55  # each step once
