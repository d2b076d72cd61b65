"""Journeys as runs decide them: each step's audience is one query over the ledger at ``now``;
the entry is the first step, whose key is the entry's own; a later step goes only after its
wait, only while no exit goal is reached, only if its conditions hold (or it is passed and
recorded so), down the branch that matched, to the experiment arm the hash drew.

Real runs (Prefect-free) over SQLite and PostgreSQL, mail to a real SMTP server on loopback.
"""

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlmodel import Session, col

from flows.audience.journey import stranded
from flows.audience.variants import assign
from flows.outcomes import Outcome
from flows.run_context import load
from flows.settings import Settings
from models import Engagement, Send, SendStatus
from tests.support import ROOT
from tests.support.builders import NOW, Store, ago
from tests.support.runs import run
from tests.support.smtp_server import SmtpServer

SERIES = """\
name: cart-series
description: The abandoned-cart series, three mails.
kind: abandoned_cart
idle_for: 2h
give_up_after: 3d
schedule: {cron: "*/15 * * * *", timezone: Europe/Berlin}
reentry: 1d
steps:
  - name: reminder
    wait: 0s
    email: {template: abandoned_cart, subject: "Reminder for {{ customer.first_name }}"}
  - name: nudge
    wait: 22h
    email: {template: abandoned_cart, subject: "Nudge for {{ customer.first_name }}"}
  - name: incentive
    wait: 48h
    when: {min_cart_value: 80}
    email: {template: abandoned_cart, subject: "Incentive for {{ customer.first_name }}"}
exit_when:
  - ordered: true
"""


def write(settings: Settings, text: str, name: str = "cart-series") -> None:
    (Path(settings.triggers_dir) / f"{name}.yaml").write_text(text, encoding="utf-8")


def rows(engine: Engine, trigger: str = "cart-series") -> list[Send]:
    with Session(engine) as session:
        return list(session.execute(select(Send).where(col(Send.trigger) == trigger).order_by(col(Send.id)))
                    .scalars())


def subjects(smtp: SmtpServer) -> list[str]:
    return sorted(str(m.message["Subject"]) for m in smtp.received)


def test_step_two_goes_only_after_its_wait_and_only_to_who_did_not_order(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    write(settings, SERIES)
    anna, ben = store.customer("Anna"), store.customer("Ben")
    store.cart(anna, ago(hours=3))
    store.cart(ben, ago(hours=3))

    first = run(settings, "cart-series")
    assert subjects(smtp) == ["Reminder for Anna", "Reminder for Ben"]
    assert first.steps["reminder"][Outcome.SENT] == 2
    entries = rows(engine)
    # The first step's key is the entry's own: what the trigger's one mail would have had.
    assert {r.send_key for r in entries} == {f"cart-series/{r.customer_id}/{r.occurrence}" for r in entries}
    assert {r.step for r in entries} == {"reminder"} and all(r.occurrence.startswith("cart:") for r in entries)

    run(settings, "cart-series", NOW + timedelta(hours=21))  # the nudge's 22 h are not over
    assert len(smtp.received) == 2
    store.order(ben, NOW + timedelta(hours=5))

    later = run(settings, "cart-series", NOW + timedelta(hours=23))
    assert subjects(smtp) == ["Nudge for Anna", "Reminder for Anna", "Reminder for Ben"]
    assert later.steps["nudge"][Outcome.SENT] == 1 and later.steps["nudge"][Outcome.EXITED] == 1
    nudges = {r.customer_id: r for r in rows(engine) if r.step == "nudge"}
    assert nudges[anna.id].status == SendStatus.SENT
    entry_of = {r.customer_id: r.send_key for r in entries}
    assert nudges[anna.id].send_key == f"{entry_of[anna.id]}/nudge"
    occurrence_of = {r.customer_id: r.occurrence for r in entries}
    assert nudges[anna.id].occurrence == f"{occurrence_of[anna.id]}/nudge"
    assert nudges[ben.id].status == SendStatus.EXITED and nudges[ben.id].error == "exit: ordered"

    run(settings, "cart-series", NOW + timedelta(hours=24))  # each step once
    run(settings, "cart-series", NOW + timedelta(hours=23 + 47))  # the incentive's 48 h are not over
    assert len(smtp.received) == 3


def test_a_step_whose_condition_fails_is_passed_and_recorded(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    write(settings, SERIES)
    big, small = store.customer("Big"), store.customer("Small")
    store.cart(big, ago(hours=3), [("Zelt", 249.0, 1)])
    store.cart(small, ago(hours=3), [("Socken", 9.9, 2)])
    for hours in (0, 23, 23 + 49):
        run(settings, "cart-series", NOW + timedelta(hours=hours))
    assert subjects(smtp).count("Incentive for Big") == 1 and "Incentive for Small" not in subjects(smtp)
    incentive = {r.customer_id: r.status for r in rows(engine) if r.step == "incentive"}
    assert incentive == {big.id: SendStatus.SENT, small.id: SendStatus.PASSED}


def test_nothing_is_recorded_by_a_dry_run(settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    write(settings, SERIES)
    store.cart(store.customer("Anna"), ago(hours=3))
    summary = run(settings, "cart-series", dry_run=True)
    assert summary.steps["reminder"][Outcome.WOULD_SEND] == 1
    assert rows(engine) == [] and smtp.received == []


ONE_MAIL_CART_REMINDER = """\
name: abandoned-cart
description: Remind shoppers of a cart they left behind, two hours after their last change.
kind: abandoned_cart
idle_for: 2h
give_up_after: 3d
schedule: {cron: "*/15 * * * *", timezone: Europe/Berlin}
email:
  template: abandoned_cart
  subject:
    de: "{{ customer.first_name or 'Hallo' }}, dein Warenkorb wartet auf dich"
    en: "{{ customer.first_name or 'Hi' }}, your cart is waiting for you"
reentry: 1d
"""


def test_a_single_mail_trigger_keeps_its_keys_and_becomes_a_journey_without_a_second_mail(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    """The abandoned-cart reminder as it shipped as one mail, run, then the shipped series that
    replaced it under the same name: its rows keep their keys (``trigger/customer/occurrence``,
    no step), and the series mails nobody the reminder already reached; its later steps follow
    from its own entries only."""
    write(settings, ONE_MAIL_CART_REMINDER, "abandoned_cart")
    anna = store.customer("Anna")
    store.cart(anna, ago(hours=3))
    run(settings, "abandoned-cart")
    (single,) = rows(engine, "abandoned-cart")
    assert single.send_key == f"abandoned-cart/{anna.id}/{single.occurrence}" and single.step == ""
    assert len(smtp.received) == 1

    write(settings, (ROOT / "triggers" / "abandoned_cart.yaml").read_text(encoding="utf-8"), "abandoned_cart")
    run(settings, "abandoned-cart", NOW + timedelta(minutes=15))
    run(settings, "abandoned-cart", NOW + timedelta(hours=23))
    assert len(smtp.received) == 1
    assert [(r.send_key, r.step) for r in rows(engine, "abandoned-cart")] == [(single.send_key, "")]


BRANCHING = """\
name: welcome-series
description: Welcome, then a follow-up that depends on the first mail's click.
kind: onboarding
day: 0
schedule: {cron: "0 9 * * *", timezone: Europe/Berlin}
reentry: once
steps:
  - name: welcome
    wait: 0s
    email: {template: onboarding_welcome, subject: "Welcome {{ customer.first_name }}"}
    branches:
      - when: {clicked: welcome}
        steps:
          - name: engaged
            wait: 3d
            email: {template: onboarding_tips, subject: "Engaged {{ customer.first_name }}"}
      - else: true
        steps:
          - name: reminder
            wait: 3d
            email: {template: onboarding_tips, subject: "Reminder {{ customer.first_name }}"}
"""


def test_the_branch_taken_is_the_first_that_matches(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    write(settings, BRANCHING, "welcome-series")
    clicker, quiet = (store.customer(name, created=ago(hours=2)) for name in ("Clara", "Quentin"))
    run(settings, "welcome-series")
    welcome = {r.customer_id: r for r in rows(engine, "welcome-series")}
    assert set(welcome) == {clicker.id, quiet.id}
    with Session(engine) as session:
        session.add(Engagement(send_id=welcome[clicker.id].id, customer_id=clicker.id, kind="click", link=0,
                               at=NOW + timedelta(hours=1)))
        # A scanner's click is no person's: it takes nobody down the clicked branch.
        session.add(Engagement(send_id=welcome[quiet.id].id, customer_id=quiet.id, kind="click", link=0,
                               at=NOW + timedelta(seconds=2), machine="too_soon"))
        session.commit()
    summary = run(settings, "welcome-series", NOW + timedelta(days=3, hours=1))
    assert subjects(smtp) == ["Engaged Clara", "Reminder Quentin", "Welcome Clara", "Welcome Quentin"]
    assert summary.steps["engaged"][Outcome.SENT] == summary.steps["reminder"][Outcome.SENT] == 1
    run(settings, "welcome-series", NOW + timedelta(days=4))
    assert len(smtp.received) == 4  # one branch each, once


EXPERIMENT = """\
name: winback-ab
description: A win-back with two subjects.
kind: inactivity
inactive_for: 90d
schedule: {cron: "0 10 * * 1", timezone: Europe/Berlin}
reentry: once
holdout: 20%
steps:
  - name: first
    wait: 0s
    email: {template: we_miss_you, subject: "Plain"}
    experiment:
      metric: clicks
      variants:
        - {name: a, subject: "Subject A"}
        - {name: b, weight: 3, subject: "Subject B"}
"""


def test_each_customer_gets_the_arm_the_hash_draws_and_the_held_out_are_their_own_arm(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    write(settings, EXPERIMENT, "winback-ab")
    people = [store.customer(f"P{i}", last_seen=ago(days=200)) for i in range(40)]
    run(settings, "winback-ab")
    ledger = {r.customer_id: r for r in rows(engine, "winback-ab")}
    assert set(ledger) == {p.id for p in people}
    held = [p for p in people if ledger[p.id].status == SendStatus.HELD_OUT]
    mailed = [p for p in people if ledger[p.id].status == SendStatus.SENT]
    assert held and len(held) + len(mailed) == len(people)
    assert {ledger[p.id].variant for p in held} == {""}
    for p in mailed:
        assert ledger[p.id].variant == assign([("a", 1), ("b", 3)], "winback-ab", "first", "", p.external_id)
    by_address = {str(m.message["To"]).split("<")[-1].rstrip(">"): str(m.message["Subject"]) for m in smtp.received}
    assert {by_address[p.email] for p in mailed if p.email} <= {"Subject A", "Subject B"}
    for p in mailed:
        assert by_address[p.email] == f"Subject {ledger[p.id].variant.upper()}"
    assert {ledger[p.id].variant for p in mailed} == {"a", "b"}


@pytest.mark.parametrize("wait", ["22h"])
def test_a_step_with_a_time_of_day_waits_for_it_in_the_customers_zone(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer, wait: str) -> None:
    write(settings, SERIES.replace("    wait: 22h\n", f"    wait: {wait}\n    at: \"10:00\"\n"))
    store.cart(store.customer("Anna"), ago(hours=3))
    run(settings, "cart-series")
    # 22 h after Monday 13:00 in Berlin (12:00 UTC) is Tuesday 11:00: past 10:00, so Wednesday
    # 10:00 in Berlin, 09:00 UTC (CET until the end of March).
    held = run(settings, "cart-series", NOW + timedelta(hours=23))
    assert held.steps["nudge"][Outcome.TIME_OF_DAY] == 1 and len(smtp.received) == 1
    (nudge,) = [r for r in rows(engine) if r.step == "nudge"]
    assert nudge.status == SendStatus.DEFERRED and nudge.not_before == NOW + timedelta(hours=45)
    run(settings, "cart-series", NOW + timedelta(hours=44, minutes=59))
    assert len(smtp.received) == 1
    run(settings, "cart-series", NOW + timedelta(hours=45))
    assert subjects(smtp) == ["Nudge for Anna", "Reminder for Anna"]


def test_a_renamed_step_strands_who_reached_it_and_validate_says_how_many(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    from typer.testing import CliRunner

    from flows.surfaces.cli import app

    write(settings, SERIES)
    for name in ("Anna", "Ben"):
        store.cart(store.customer(name), ago(hours=3))
    run(settings, "cart-series")
    project = load(settings)
    assert stranded(engine, project.trigger("cart-series")) == {}

    # The middle step removed: who got the reminder goes on to the incentive, skipping the nudge.
    write(settings, SERIES.replace("""  - name: nudge
    wait: 22h
    email: {template: abandoned_cart, subject: "Nudge for {{ customer.first_name }}"}
""", ""))
    assert stranded(engine, load(settings).trigger("cart-series")) == {}

    renamed = SERIES.replace("name: reminder", "name: first-reminder")
    write(settings, renamed)
    assert stranded(engine, load(settings).trigger("cart-series")) == {"reminder": 2}
    result = CliRunner().invoke(app, ["validate"])
    assert result.exit_code == 0, result.output
    line = renamed.splitlines().index("steps:") + 1
    assert f"cart-series.yaml:{line}" in result.output
    assert "2 customer(s) are inside this journey at steps it no longer has (2 at reminder)" in " ".join(
        result.output.split())


def test_a_removed_step_is_skipped_by_who_was_before_it(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    write(settings, SERIES)
    store.cart(store.customer("Anna"), ago(hours=3), [("Zelt", 249.0, 1)])
    run(settings, "cart-series")
    write(settings, SERIES.replace("""  - name: nudge
    wait: 22h
    email: {template: abandoned_cart, subject: "Nudge for {{ customer.first_name }}"}
""", ""))
    run(settings, "cart-series", NOW + timedelta(hours=47))  # the incentive waits 48 h after the reminder
    assert subjects(smtp) == ["Reminder for Anna"]
    run(settings, "cart-series", NOW + timedelta(hours=48))
    assert subjects(smtp) == ["Incentive for Anna", "Reminder for Anna"]


def test_a_deferral_of_the_single_mail_is_sent_by_the_journeys_first_step_once(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    anna, ben = store.customer("Anna"), store.customer("Ben")
    store.cart(anna, NOW + timedelta(hours=6))
    store.cart(ben, NOW + timedelta(hours=6))
    late = run(settings, "abandoned-cart", NOW + timedelta(hours=9))  # 22:00 in Berlin: quiet hours
    assert late.outcomes[Outcome.QUIET_HOURS] == 2 and smtp.received == []
    store.order(ben, NOW + timedelta(hours=12))  # Ben's deferral is no longer due
    write(settings, SERIES.replace("name: cart-series", "name: abandoned-cart"), "abandoned_cart")
    summary = run(settings, "abandoned-cart", NOW + timedelta(hours=19))  # 08:00 in Berlin
    run(settings, "abandoned-cart", NOW + timedelta(hours=19, minutes=15))
    assert subjects(smtp) == ["Reminder for Anna"]
    assert summary.steps["reminder"][Outcome.NO_LONGER_DUE] == 1
    status = {r.customer_id: r.status for r in rows(engine, "abandoned-cart")}
    assert status == {anna.id: SendStatus.SENT, ben.id: SendStatus.EXPIRED}


@pytest.mark.parametrize(("late", "sent"), [(timedelta(days=6, hours=23), True), (timedelta(days=7, hours=1), False)])
def test_a_step_that_could_not_go_for_step_expires_after_is_not_sent_late(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer, late: timedelta, sent: bool) -> None:
    write(settings, SERIES)  # step_expires_after: 7d, the default
    store.cart(store.customer("Anna"), ago(hours=3))
    run(settings, "cart-series")
    run(settings, "cart-series", NOW + timedelta(hours=22) + late)  # no run since the nudge fell due
    assert ("Nudge for Anna" in subjects(smtp)) is sent
