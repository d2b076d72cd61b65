"""Sending policy: frequency caps and quiet hours defer marketing mail to the next allowed moment."""

import logging
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select
from sqlmodel import Session

from flows.audience.query import stream_candidates
from flows.audience.timing import capped, customer_zone, next_allowed
from flows.message.prepare import claim_for
from flows.run import execute
from flows.run_context import prepare
from flows.send import claims as ledger
from flows.settings import Settings
from flows.spec.policy import Policy
from flows.spec.project import load_project
from models import Customer, Send
from tests.support.builders import NOW, Store, ago
from tests.support.ledger import sends, status_of, statuses
from tests.support.runs import run
from tests.support.smtp_server import SmtpServer

BERLIN = ZoneInfo("Europe/Berlin")
POLICY = Policy.model_validate({"default_timezone": "Europe/Berlin",
                                "frequency_caps": [{"max": 1, "per": "16h"}, {"max": 3, "per": "7d"}],
                                "quiet_hours": {"start": "21:00", "end": "08:00"}})


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 3, day, hour, minute, tzinfo=UTC)


def test_earlier_mail_that_no_cap_counts_up_to_its_max_changes_nothing() -> None:
    """What lets a run work out the moment once per zone for everyone no cap holds back: a
    seeded walk over earlier mails, moments of day, caps and zones."""
    import random

    draw = random.Random(20261203)
    zones = [BERLIN, ZoneInfo("America/New_York"), ZoneInfo("Asia/Tokyo")]
    held = free = 0
    for _ in range(3000):
        now = at(16, 0) + timedelta(minutes=draw.randrange(24 * 60))
        policy = Policy.model_validate({"default_timezone": "Europe/Berlin", "frequency_caps": [
            {"max": draw.randint(1, 3), "per": f"{draw.randint(1, 48)}h"}, {"max": draw.randint(2, 5), "per": "7d"}],
            "quiet_hours": {"start": "21:00", "end": "08:00"}})
        earlier = [now - timedelta(minutes=draw.randrange(10 * 24 * 60)) for _ in range(draw.randint(1, 5))]
        zone = draw.choice(zones)
        if capped(now, earlier, policy):
            held += 1
            assert next_allowed(now, earlier, zone, policy)[1] == "frequency_cap"
        else:
            free += 1
            assert next_allowed(now, earlier, zone, policy) == next_allowed(now, [], zone, policy)
    assert held > 300 and free > 300  # both sides of the rule were walked


def test_a_mail_may_go_now_when_no_rule_applies() -> None:
    assert next_allowed(at(16, 12), [], BERLIN, POLICY) == (at(16, 12), None)


def test_quiet_hours_are_the_customers_own_local_time() -> None:
    new_york = ZoneInfo("America/New_York")  # 12:00 UTC in March is 08:00 in New York (EDT since the 8th)
    assert next_allowed(at(16, 11, 30), [], new_york, POLICY) == (at(16, 12), "quiet_hours")
    assert next_allowed(at(16, 11, 30), [], BERLIN, POLICY) == (at(16, 11, 30), None)  # 12:30 in Berlin
    # 22:00 in Berlin (21:00 UTC) waits for 08:00 the next morning (07:00 UTC).
    assert next_allowed(at(16, 21), [], BERLIN, POLICY) == (at(17, 7), "quiet_hours")


def test_frequency_caps_wait_for_the_window_to_free() -> None:
    assert next_allowed(at(16, 12), [at(16, 10)], BERLIN, POLICY) == (at(17, 7), "frequency_cap")  # 02:00 UTC: quiet
    three = [at(15, 9), at(13, 9), at(10, 9)]
    assert next_allowed(at(16, 12), three, BERLIN, POLICY) == (at(17, 9), "frequency_cap")  # the 10th + 7 days


def test_an_invalid_time_zone_falls_back_to_the_default_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert customer_zone("Mars/Olympus_Mons", POLICY, "c-9") == BERLIN
    assert "Customer c-9 has an invalid time zone 'Mars/Olympus_Mons'; using Europe/Berlin" in caplog.text
    assert customer_zone(None, POLICY) == BERLIN


def test_policy_file_mistakes_are_located(project_dir: Path) -> None:
    policy = project_dir / "triggers" / "policy.yaml"
    policy.write_text(policy.read_text().replace('start: "21:00"', 'start: "9pm"').replace("per: 7d", "per: a week"))
    problems = [str(p) for p in load_project(project_dir / "triggers", project_dir / "templates").problems]
    assert any("policy.yaml:12: frequency_caps[1].per: expected a duration" in p for p in problems), problems
    assert any("policy.yaml:16: quiet_hours.start: expected a clock time such as 21:00" in p
               for p in problems), problems


def customer_in(store: Store, zone: str | None, name: str = "Nora") -> Customer:
    customer = store.customer(name)
    with Session(store.engine) as session:
        row = session.get(Customer, customer.id)
        row.timezone = zone
        session.add(row)
        session.commit()
    store.order(customer, ago(days=500))
    return customer


def test_dry_run_shows_deferrals_as_their_own_reasons(settings: Settings, store: Store, smtp: SmtpServer) -> None:
    customer_in(store, "Europe/Berlin", "Berta")
    customer_in(store, "America/Los_Angeles", "Liz")  # 05:00 there at 12:00 UTC
    customer_in(store, "Not/A_Zone", "Otto")  # falls back to Berlin: not quiet
    summary = run(settings, "winback-lapsed", dry_run=True)
    assert summary.outcomes == {"would_send": 2, "deferred:quiet_hours": 1}
    assert smtp.received == []


def test_a_deferred_mail_is_sent_once_at_its_moment_not_dropped(settings: Settings, store: Store,
                                                               smtp: SmtpServer) -> None:
    la = customer_in(store, "America/Los_Angeles", "Liz")
    first = run(settings, "winback-lapsed")
    assert first.outcomes == {"deferred:quiet_hours": 1} and smtp.received == []
    [row] = sends(store.engine)
    assert row.status == "deferred" and row.not_before == at(16, 15)  # 08:00 in Los Angeles (PDT)

    early = run(settings, "winback-lapsed", at(16, 14), audience=False)
    assert early.outcomes == {} and smtp.received == []
    swept = run(settings, "winback-lapsed", at(16, 15, 5), audience=False)
    assert swept.outcomes == {"sent": 1}
    assert [r.recipients for r in smtp.received] == [[la.email]]
    again = run(settings, "winback-lapsed", at(16, 16))
    assert again.outcomes == {"skipped:already_sent": 1} and len(smtp.received) == 1


def test_a_trigger_may_let_deferred_mail_expire(settings: Settings, store: Store, smtp: SmtpServer,
                                                project_dir: Path) -> None:
    winback = project_dir / "triggers" / "winback.yaml"
    winback.write_text(winback.read_text() + "deferred_expires_after: 2h\n")
    customer_in(store, "America/Los_Angeles", "Liz")
    run(settings, "winback-lapsed")
    later = run(settings, "winback-lapsed", NOW + timedelta(hours=3), audience=False)
    assert later.outcomes == {"skipped:expired": 1} and smtp.received == []
    assert statuses(store.engine) == {"expired": 1}


def test_a_dead_runs_claim_of_the_same_mail_does_not_count_against_its_cap(settings: Settings, store: Store,
                                                                            smtp: SmtpServer) -> None:
    customer = customer_in(store, "Europe/Berlin")
    job = prepare("winback-lapsed", NOW, settings=settings)
    [candidate] = [c for batch in stream_candidates(store.engine, job.trigger, job.kind, job.stages, NOW, 10, "en",
                                                    job.policy) for c in batch]
    ledger.claim(store.engine, [claim_for(job, candidate)], "a-run-killed-before-sending", NOW)

    rerun = settings.model_copy(update={"claim_lease_seconds": 0})  # the killed run's lease is over
    summary = run(rerun, "winback-lapsed")
    assert summary.outcomes == {"sent": 1}  # taken over, not held back by a cap it would break only with itself
    assert [r.recipients for r in smtp.received] == [[customer.email]]


def test_service_mail_ignores_the_policy(settings: Settings, store: Store, smtp: SmtpServer) -> None:
    customer = customer_in(store, "America/Los_Angeles", "Liz")
    store.complaint(customer, ago(hours=1))
    assert run(settings, "complaint-ack").outcomes == {"sent": 1}


# -- deferral obeys the trigger's own rules (re-entry, send window, audience) ------------

def sent_earlier(store: Store, customer: Customer, trigger: str, moment: datetime) -> None:
    """Another marketing mail on record for ``customer`` (so the 16-hour cap applies)."""
    claim = ledger.Claim(f"{trigger}/{customer.id}/x", trigger, customer.id, "x", "lapsed", "t", customer.email,
                         f"<{trigger}.{customer.id}@shop.example>")
    ledger.claim(store.engine, [claim], "an-earlier-run", moment)
    ledger.record(store.engine, [ledger.Decision(claim.send_key, ledger.SendStatus.SENT)])


def winback_keys(store: Store) -> dict[str, str]:
    with Session(store.engine) as session:
        return dict(session.execute(select(Send.occurrence, Send.status).where(Send.trigger == "winback-lapsed")).all())


def test_a_deferred_campaign_slot_is_never_sent_after_its_window_nor_besides_a_newer_one(
        settings: Settings, store: Store, smtp: SmtpServer) -> None:
    """Issue: deferred win-backs went out 21 days late and again 25 hours later (reentry 60d)."""
    customer = customer_in(store, "Europe/Berlin")
    sent_earlier(store, customer, "abandoned-cart", NOW - timedelta(hours=1))
    first = run(settings, "winback-lapsed")  # the 16 March slot
    assert first.outcomes == {"deferred:frequency_cap": 1}

    sunday = datetime(2026, 4, 5, 9, 0, tzinfo=UTC)  # the 30 March slot is due; the 16 March one is past its 7 days
    monday = datetime(2026, 4, 6, 10, 0, tzinfo=UTC)  # the 6 April slot: 25 hours later, inside re-entry's 60 days
    for moment, expected in ((sunday, 1), (monday, 0)):
        planned = run(settings, "winback-lapsed", moment, dry_run=True)
        real = run(settings, "winback-lapsed", moment)
        assert planned.outcomes["would_send"] == real.outcomes["sent"] == expected
        assert [p.customer for p in planned.planned] == [customer.external_id] * expected
    assert [r.recipients for r in smtp.received] == [[customer.email]]
    assert winback_keys(store) == {"slot:20260316T090000Z": "expired", "slot:20260330T080000Z": "sent"}


def test_a_deferred_mail_is_checked_again_when_its_moment_comes(settings: Settings, store: Store,
                                                                smtp: SmtpServer) -> None:
    """Consent, suppression and the audience's own filters hold for a deferral as for a fresh mail."""
    withdrawn, suppressed, ordered = (customer_in(store, "America/Los_Angeles", name) for name in ("W", "S", "O"))
    assert run(settings, "winback-lapsed").outcomes == {"deferred:quiet_hours": 3}
    with Session(store.engine) as session:
        row = session.get(Customer, withdrawn.id)
        row.marketing_consent = False
        session.add(row)
        session.commit()
    store.suppress(suppressed.email)
    store.order(ordered, NOW + timedelta(hours=1))  # no longer lapsed: out of the win-back's audience
    swept = run(settings, "winback-lapsed", at(16, 15, 5), audience=False)
    assert swept.outcomes == {"skipped:no_consent": 1, "skipped:suppressed": 1, "skipped:no_longer_due": 1}
    assert smtp.received == []


# -- one mailbox, one mail ---------------------------------------------------------------

def test_customers_sharing_an_address_get_one_mail_personalised_by_the_first_record_due(
        settings: Settings, store: Store, smtp: SmtpServer) -> None:
    """Issue: a guest checkout and an account with the same address got the campaign twice in one run."""
    guest = store.customer("Gast", email="pat@example.com", last_seen=ago(days=3))
    account = store.customer("Pat", email="Pat@Example.com", last_seen=ago(hours=2))
    for customer in (guest, account):
        store.order(customer, ago(days=500))
    planned = run(settings, "winback-lapsed", dry_run=True)
    summary = run(settings, "winback-lapsed")
    assert planned.outcomes == {"would_send": 1, "skipped:duplicate_address": 1}
    assert summary.outcomes == {"sent": 1, "skipped:duplicate_address": 1}
    [mail] = smtp.received
    assert mail.recipients == ["pat@example.com"] and mail.message["Subject"].startswith("Gast,")

    # Next week re-entry holds for the mailbox, under either record.
    next_week = run(settings, "winback-lapsed", NOW + timedelta(days=7))
    assert next_week.outcomes == {"skipped:reentry": 2}
    assert len(smtp.received) == 1


def test_the_mailbox_gets_its_mail_through_whichever_record_is_due(settings: Settings, store: Store,
                                                                   smtp: SmtpServer) -> None:
    """The record that may not be written to, or is not in the audience, does not stand in the way."""
    store.customer("Ohne", email="ada@example.de", consent=False)
    store.order(store.customer("Ada", email="ada@example.de"), ago(days=500))
    store.order(store.customer("Neu", email="ADA@example.de"), ago(days=10))  # a new customer: not lapsed
    assert run(settings, "winback-lapsed").outcomes == {"sent": 1}
    assert [r.message["Subject"] for r in smtp.received] == ["Ada, 15 % Rabatt nur für dich"]


def test_frequency_caps_count_every_mail_to_the_mailbox(settings: Settings, store: Store, smtp: SmtpServer) -> None:
    lapsed = customer_in(store, "Europe/Berlin", "Neu")
    other = store.customer("Alt", email=lapsed.email.upper())  # never ordered: not in the win-back's audience
    sent_earlier(store, other, "abandoned-cart", NOW - timedelta(hours=2))  # to the mailbox, as the other record
    summary = run(settings, "winback-lapsed")
    assert summary.outcomes == {"deferred:frequency_cap": 1}
    assert smtp.received == []


@pytest.mark.parametrize("batch_size", [10, 1])  # the customer's two carts in one batch, or split across two
def test_two_carts_of_one_customer_make_one_reminder_and_the_dry_run_says_so(
        settings: Settings, store: Store, smtp: SmtpServer, batch_size: int) -> None:
    customer = store.customer("Carla")
    store.cart(customer, ago(hours=3))
    store.cart(customer, ago(hours=4))
    batched = settings.model_copy(update={"batch_size": batch_size, "workers": 1})
    planned = run(batched, "abandoned-cart", dry_run=True)
    summary = run(batched, "abandoned-cart")
    assert planned.outcomes == {"would_send": 1, "skipped:reentry": 1}
    assert summary.outcomes == {"sent": 1, "skipped:reentry": 1}
    assert [r.recipients for r in smtp.received] == [[customer.email]]


def test_one_deferred_sweep_over_every_trigger_still_keeps_to_the_caps(settings: Settings, store: Store,
                                                                       smtp: SmtpServer) -> None:
    """The sweep runs every trigger under one flow run: a mail it sent for one trigger counts
    against the next trigger's, as any earlier mail does."""
    evening = datetime(2026, 3, 16, 20, 30, tzinfo=UTC)  # 21:30 in Berlin: quiet
    customer = customer_in(store, "Europe/Berlin")
    store.cart(customer, evening - timedelta(hours=3))
    for trigger in ("abandoned-cart", "winback-lapsed"):
        assert run(settings, trigger, evening).outcomes == {"deferred:quiet_hours": 1}
    morning = datetime(2026, 3, 17, 7, 5, tzinfo=UTC)
    swept = [execute(prepare(trigger, morning, settings=settings, run_id="one-sweep"), audience=False).outcomes
             for trigger in ("abandoned-cart", "winback-lapsed")]
    assert swept == [{"sent": 1}, {"deferred:frequency_cap": 1}]
    assert len(smtp.received) == 1


def every_occurrence(project_dir: Path) -> None:
    winback = project_dir / "triggers" / "winback.yaml"
    winback.write_text(winback.read_text().replace("reentry: 60d", "reentry: every_occurrence"))


def test_a_shared_mailbox_gets_a_campaign_slot_once_whatever_the_reentry_rule(
        settings: Settings, store: Store, smtp: SmtpServer, project_dir: Path) -> None:
    """Re-runs within the slot's window once mailed the slot again through the other record."""
    every_occurrence(project_dir)
    for name, email in (("Gast", "pat@example.com"), ("Pat", "Pat@Example.com")):
        store.order(store.customer(name, email=email), ago(days=500))
    outcomes = [run(settings, "winback-lapsed", NOW + timedelta(hours=hours)).outcomes
                for hours in (0, 1, 72)]
    assert outcomes[0] == {"sent": 1, "skipped:duplicate_address": 1}
    assert outcomes[1:] == [{"skipped:already_sent": 1, "skipped:duplicate_address": 1}] * 2
    assert len(smtp.received) == 1


def test_two_runs_racing_for_a_shared_mailbox_send_it_one_mail(settings: Settings, store: Store,
                                                               smtp: SmtpServer, project_dir: Path) -> None:
    """The ledger decides, not the run's memory: run A sends while run B is between batches."""
    policy = project_dir / "triggers" / "policy.yaml"
    policy.write_text(policy.read_text().replace("  - {max: 1, per: 16h}\n  - {max: 3, per: 7d}",
                                                 "  - {max: 5, per: 1h}"))
    one_by_one = settings.model_copy(update={"batch_size": 1, "workers": 1})
    first = store.customer("Erst")
    store.order(first, ago(days=500))
    for name, email in (("Gast", "pat@example.com"), ("Pat", "Pat@Example.com")):
        store.order(store.customer(name, email=email), ago(days=500))
    other: dict[str, object] = {}

    def meanwhile() -> bool:
        if not other:  # B has read its first batch: A runs now, start to end
            other["a"] = run(one_by_one, "winback-lapsed").outcomes
        return False

    run(one_by_one, "winback-lapsed", should_stop=meanwhile)
    received = Counter(r.recipients[0].lower() for r in smtp.received)
    assert received == {first.email: 1, "pat@example.com": 1}


def test_a_deferral_written_while_a_run_is_under_way_is_not_that_runs_to_close(
        settings: Settings, store: Store, smtp: SmtpServer) -> None:
    """Only deferrals awaiting when the pass began are closed as no longer due."""
    store.lapsed(2)
    outsider = store.customer("Neu")  # not in the win-back's audience
    late = ledger.Claim(f"winback-lapsed/{outsider.id}/slot:x", "winback-lapsed", outsider.id, "slot:x", "new", "t",
                        outsider.email, "<late@shop.example>")

    def meanwhile() -> bool:  # another run defers a mail while this one is between batches
        ledger.defer(store.engine, [(late, NOW - timedelta(minutes=1), None)], "another-run", NOW)
        return False

    one_by_one = settings.model_copy(update={"batch_size": 1, "workers": 1})
    summary = run(one_by_one, "winback-lapsed", should_stop=meanwhile)
    assert summary.outcomes == {"sent": 2}
    assert status_of(store.engine, late.send_key) == "deferred"
