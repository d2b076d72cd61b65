"""Journeys at their edges: deferrals and dead claims, steps added to a live journey, a deferred
entry's moment, and the winner rule with a renamed, salted, switched-off or raced experiment."""

from datetime import timedelta

from sqlalchemy import Engine
from sqlmodel import Session

from flows.analysis import experiment_looks
from flows.outcomes import Outcome
from flows.run_context import prepare
from flows.settings import Settings
from models import Engagement, ExperimentLook, Send, SendStatus
from models.types import utcnow
from tests.audience.test_journey import EXPERIMENT, SERIES, rows, subjects, write
from tests.support.builders import NOW, Store, ago
from tests.support.runs import run
from tests.support.smtp_server import SmtpServer

NUDGE = """  - name: nudge
    wait: 22h
    email: {template: abandoned_cart, subject: "Nudge for {{ customer.first_name }}"}
"""


def test_single_mail_deferral_sent_by_first_step_gets_the_later_steps(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    """A single mail's deferral that the journey's first step sends becomes that step's row, so
    the later steps follow it."""
    anna = store.customer("Anna")
    store.cart(anna, NOW + timedelta(hours=6))
    run(settings, "abandoned-cart", NOW + timedelta(hours=9))  # quiet hours: deferred, step ""
    write(settings, SERIES.replace("name: cart-series", "name: abandoned-cart"), "abandoned_cart")
    run(settings, "abandoned-cart", NOW + timedelta(hours=19))  # the journey's first step sends it
    assert subjects(smtp) == ["Reminder for Anna"]
    run(settings, "abandoned-cart", NOW + timedelta(hours=19 + 25))  # past 22 h, and 09:00 in Berlin
    assert subjects(smtp) == ["Nudge for Anna", "Reminder for Anna"], [(r.step, r.status) for r in
                                                                        rows(engine, "abandoned-cart")]


def test_a_dead_runs_claim_of_a_later_step_is_taken_over(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    """A later step's claim left by a run that died before sending is taken over once its lease
    is out, as a single mail's is: the step and those after it still go."""
    write(settings, SERIES)
    anna = store.customer("Anna")
    store.cart(anna, ago(hours=3))
    run(settings, "cart-series")
    (entry,) = rows(engine)
    with Session(engine) as session:  # what a run killed between claim and SMTP leaves behind
        session.add(Send(send_key=f"{entry.send_key}/nudge", trigger="cart-series", customer_id=anna.id,
                         occurrence=f"{entry.occurrence}/nudge", ref_id=entry.ref_id, status=SendStatus.CLAIMED,
                         run_id="dead", stage=entry.stage, template="abandoned_cart", email=entry.email,
                         evaluated_at=NOW + timedelta(hours=22, minutes=5),
                         claimed_at=utcnow() - timedelta(hours=2), step="nudge"))
        session.commit()
    run(settings, "cart-series", NOW + timedelta(hours=23))
    assert subjects(smtp) == ["Nudge for Anna", "Reminder for Anna"]


def test_a_step_inserted_before_the_one_reached_is_not_sent_after_it(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    """A step inserted into a live journey goes only to who has not passed it: who already had a
    step after it gets nothing late."""
    write(settings, SERIES.replace(NUDGE, ""))
    store.cart(store.customer("Anna"), ago(hours=3), [("Zelt", 249.0, 1)])
    run(settings, "cart-series")
    run(settings, "cart-series", NOW + timedelta(hours=48))
    assert subjects(smtp) == ["Incentive for Anna", "Reminder for Anna"]
    write(settings, SERIES)  # the nudge added between them
    run(settings, "cart-series", NOW + timedelta(hours=49))
    run(settings, "cart-series", NOW + timedelta(hours=68))  # past the frequency cap and quiet hours
    assert subjects(smtp) == ["Incentive for Anna", "Reminder for Anna"], [(r.step, r.status) for r in rows(engine)]


WINNER_RULE = EXPERIMENT.replace("holdout: 20%\n", "").replace(
    "      metric: clicks\n", "      metric: clicks\n      pick_winner: {min_per_variant: 100}\n")


def test_a_recorded_winner_no_longer_in_the_file_does_not_break_every_run(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    """A recorded winner the file no longer has (renamed, removed) is not applied: the split as
    written goes on, and every run still runs."""
    write(settings, WINNER_RULE.replace("name: b,", "name: c,"), "winback-ab")
    store.customer("Pia", last_seen=ago(days=200))
    with Session(engine) as session:
        session.add(ExperimentLook(trigger="winback-ab", step="first", salt="", look=1, checkpoint=100,
                                   winner="b", reason="b beats a", figures="{}", decided_at=ago(days=1)))
        session.commit()
    summary = run(settings, "winback-ab")
    assert summary.steps["first"][Outcome.SENT] == 1


def _mailed(store: Store, engine: Engine, per_arm: int, clicks_for: str) -> None:
    """``per_arm`` mature mails of arms a and b of winback-ab's step ``first``; every mail of
    ``clicks_for`` clicked by a person, none of the other."""
    people = [store.customer(f"P{i}", last_seen=ago(days=200)) for i in range(2 * per_arm)]
    with Session(engine) as session:
        for i, p in enumerate(people):
            arm = "ab"[i % 2]
            send = Send(send_key=f"winback-ab/{p.id}/old", trigger="winback-ab", customer_id=p.id,
                        occurrence="old", status=SendStatus.SENT, run_id="old", template="we_miss_you",
                        email=p.email or "", evaluated_at=ago(days=30), claimed_at=ago(days=30),
                        step="first", variant=arm)
            session.add(send)
            session.flush()
            if arm == clicks_for:
                session.add(Engagement(send_id=send.id, customer_id=p.id, kind="click", link=0,
                                       at=ago(days=29)))
        session.commit()


def test_a_new_salt_is_a_new_experiment_and_reads_none_of_the_old_ones_mails(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    """A new salt is a new experiment: its looks read only its own mails, none of the old one's."""
    _mailed(store, engine, 100, clicks_for="a")
    write(settings, WINNER_RULE.replace("      metric: clicks\n", "      metric: clicks\n      salt: round-2\n"),
          "winback-ab")
    context = prepare("winback-ab", NOW, settings=settings)
    (part,) = context.passes()
    winner, said = experiment_looks.decide(part)
    assert winner is None and said is None, said


def test_an_arm_switched_off_does_not_stall_the_winner_rule(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    """An arm switched off (weight 0) grows no more: the rule compares the arms with a weight."""
    _mailed(store, engine, 100, clicks_for="a")
    write(settings, WINNER_RULE.replace("        - {name: b, weight: 3, subject: \"Subject B\"}\n",
                                        "        - {name: b, weight: 3, subject: \"Subject B\"}\n"
                                        "        - {name: c, weight: 0, subject: \"Subject C\"}\n"), "winback-ab")
    (part,) = prepare("winback-ab", NOW, settings=settings).passes()
    winner, said = experiment_looks.decide(part)
    assert said is not None and winner == "a"


WELCOME = """\
name: welcome-series
description: Welcome, then tips; exits on order.
kind: onboarding
day: 0
schedule: {cron: "0 9 * * *", timezone: Europe/Berlin}
reentry: once
steps:
  - name: welcome
    wait: 0s
    email: {template: onboarding_welcome, subject: "Welcome {{ customer.first_name }}"}
  - name: tips
    wait: 3d
    email: {template: onboarding_tips, subject: "Tips {{ customer.first_name }}"}
exit_when:
  - ordered: true
"""


def test_an_order_after_entering_exits_though_the_entry_was_deferred(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    """The entry's moment is when the customer entered, not when a deferred first mail went out:
    an order in between exits them."""
    write(settings, WELCOME, "welcome-series")
    olga = store.customer("Olga", created=NOW + timedelta(hours=8))
    run(settings, "welcome-series", NOW + timedelta(hours=9))  # 22:00 in Berlin
    (entry,) = rows(engine, "welcome-series")
    assert entry.status == SendStatus.DEFERRED
    store.order(olga, NOW + timedelta(hours=10))  # 23:00: after she entered
    run(settings, "welcome-series", NOW + timedelta(hours=19))  # 08:00: the welcome goes
    run(settings, "welcome-series", NOW + timedelta(days=3, hours=20))
    assert subjects(smtp) == ["Welcome Olga"]


def test_two_runs_taking_the_same_look_do_not_crash(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer, monkeypatch) -> None:
    """Two runs taking the same look at once (the scheduled run and the deferred sweep, a retried
    flow): the first records it, the other takes its decision, and neither fails."""
    _mailed(store, engine, 100, clicks_for="a")
    write(settings, WINNER_RULE, "winback-ab")
    real = experiment_looks.pick_winner
    inner: list[object] = []

    def racing(*args, **kwargs):  # the other run takes the very same look meanwhile
        if not inner:
            inner.append(None)
            (other,) = prepare("winback-ab", NOW, settings=settings).passes()
            inner.append(experiment_looks.decide(other))
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment_looks, "pick_winner", racing)
    (part,) = prepare("winback-ab", NOW, settings=settings).passes()
    winner, _ = experiment_looks.decide(part)
    assert winner == "a" and inner[1][0] == "a"


def test_a_step_skipped_for_consent_is_not_sent_weeks_late(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    """A later step that could not go for longer than ``step_expires_after`` (no consent, here)
    is not sent when the customer can be mailed again weeks later."""
    write(settings, SERIES)
    anna = store.customer("Anna")
    store.cart(anna, ago(hours=3))
    run(settings, "cart-series")
    with Session(engine) as session:
        customer = session.get(type(anna), anna.id)
        customer.marketing_consent = False
        session.add(customer)
        session.commit()
    skipped = run(settings, "cart-series", NOW + timedelta(hours=23))
    assert sum(skipped.steps["nudge"].values()) == 1 and len(smtp.received) == 1
    with Session(engine) as session:  # a month later the customer subscribes again
        customer = session.get(type(anna), anna.id)
        customer.marketing_consent, customer.consent_at = True, NOW + timedelta(days=30)
        session.add(customer)
        session.commit()
    run(settings, "cart-series", NOW + timedelta(days=31))
    assert subjects(smtp) == ["Reminder for Anna"]  # no "Noch da?" about a month-old cart

