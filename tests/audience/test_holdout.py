"""Holdouts: a stable, salted share of customers is never mailed, and is recorded as such."""

import hashlib
import math
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from flows.audience.holdout import draw, held_out
from flows.settings import Settings
from flows.spec.project import load_project
from models import Customer, SendStatus
from tests.support.builders import NOW, Store, ago
from tests.support.ledger import sends, statuses
from tests.support.runs import run
from tests.support.smtp_server import SmtpServer


def with_holdout(project_dir: Path, file: str = "winback.yaml", share: str = "20%",
                 salt: str | None = "spring") -> None:
    trigger = project_dir / "triggers" / file
    extra = f"holdout: {share}\n" + (f"holdout_salt: {salt}\n" if salt else "")
    trigger.write_text(trigger.read_text() + extra)


def lapsed(store: Store, count: int, zone: str | None = None) -> list[Customer]:
    """``count`` customers of the win-back's audience (last order 500 days ago)."""
    customers = []
    for i in range(count):
        customer = store.customer(f"K{i}")
        store.order(customer, ago(days=500))
        if zone:
            with Session(store.engine) as session:
                row = session.get(Customer, customer.id)
                assert row is not None
                row.timezone = zone
                session.add(row)
                session.commit()
        customers.append(customer)
    return customers


def held(customers: list[Customer], share: float = 0.5, salt: str = "spring") -> list[Customer]:
    return [c for c in customers if held_out(share, "winback-lapsed", salt, c.external_id)]


def test_the_draw_is_fixed_by_trigger_salt_and_customer_and_uniform() -> None:
    assert draw("t", "s", "c-1") == draw("t", "s", "c-1")
    assert draw("t", "s", "c-1") != draw("t", "u", "c-1")
    assert draw("t", "s", "c-1") != draw("v", "s", "c-1")  # two triggers stating one salt: two groups
    ids = [f"c-{n}" for n in range(20_000)]
    share = sum(held_out(0.2, "t", "spring", c) for c in ids) / len(ids)
    # Binomial(20 000, 0.2): standard deviation 0.28 points; five of them is a bug, not chance.
    assert abs(share - 0.2) < 5 * math.sqrt(0.2 * 0.8 / len(ids))
    other = {c for c in ids if held_out(0.2, "t", "autumn", c)}
    mine = {c for c in ids if held_out(0.2, "t", "spring", c)}
    assert 0.1 < len(other & mine) / len(mine) < 0.3  # a new salt draws a new, independent group
    beside = {c for c in ids if held_out(0.2, "v", "spring", c)}
    assert 0.1 < len(beside & mine) / len(mine) < 0.3  # so does another trigger with the same salt
    assert not held_out(None, "t", "spring", "c-1")


def test_the_group_is_the_same_on_another_machine() -> None:
    """The draw is SHA-256 of the trigger, the salt and the shop's id, not Python's per-process hash()."""
    assert draw("winback-lapsed", "winback-2026", "demo-00001") == int.from_bytes(
        hashlib.sha256(b"winback-lapsed\x1fwinback-2026\x1fdemo-00001").digest()[:8], "big") / 2**64


def test_held_out_customers_are_recorded_not_mailed(settings: Settings, store: Store, smtp: SmtpServer,
                                                     project_dir: Path) -> None:
    with_holdout(project_dir, share="50%")
    customers = lapsed(store, 40)
    summary = run(settings, "winback-lapsed")
    out = held(customers)
    assert 0 < len(out) < 40  # both groups exist (a fixed draw over these ids)
    assert summary.outcomes == {"sent": 40 - len(out), "held_out": len(out)}
    rows = {r.customer_id: r for r in sends(store.engine)}
    assert {r.customer_id for r in rows.values() if r.status == SendStatus.HELD_OUT} == {c.id for c in out}
    assert len(smtp.received) == 40 - len(out)
    mailed = {address for message in smtp.received for address in message.recipients}
    assert all(r.email not in mailed for r in rows.values() if r.status == SendStatus.HELD_OUT)
    assert all(r.evaluated_at == NOW for r in rows.values())  # the would-be send's moment, for the lift

    again = run(settings, "winback-lapsed", NOW + timedelta(hours=1))
    assert again.outcomes == {"skipped:already_sent": 40}  # decided once: nobody moves between groups
    assert len(smtp.received) == 40 - len(out)


def test_a_held_out_mail_counts_for_reentry_and_the_frequency_cap(settings: Settings, store: Store,
                                                                 smtp: SmtpServer, project_dir: Path) -> None:
    with_holdout(project_dir, share="50%")
    customers = lapsed(store, 30)
    assert 0 < len(held(customers)) < 30
    run(settings, "winback-lapsed")
    # A week later the next campaign slot: re-entry (60d) stops both groups alike.
    later = run(settings, "winback-lapsed", NOW + timedelta(days=7))
    assert later.outcomes == {"skipped:reentry": 30}
    # Another trigger within the 16h cap: the held-out are deferred exactly like the mailed.
    for c in customers:
        store.cart(c, NOW - timedelta(hours=1))
    cart = run(settings, "abandoned-cart", NOW + timedelta(hours=1, minutes=30))
    assert cart.outcomes == {"deferred:frequency_cap": 30}


def test_a_dry_run_counts_the_held_out_and_records_nothing(settings: Settings, store: Store, smtp: SmtpServer,
                                                           project_dir: Path) -> None:
    with_holdout(project_dir, share="50%")
    out = len(held(lapsed(store, 20)))
    summary = run(settings, "winback-lapsed", dry_run=True)
    assert summary.outcomes == {"would_send": 20 - out, "held_out": out}
    assert statuses(store.engine) == {} and smtp.received == []


def test_the_salt_defaults_to_the_trigger_name(settings: Settings, store: Store, smtp: SmtpServer,
                                               project_dir: Path) -> None:
    with_holdout(project_dir, share="50%", salt=None)
    customers = lapsed(store, 20)
    summary = run(settings, "winback-lapsed")
    assert summary.outcomes["held_out"] == len(held(customers, salt="winback-lapsed")) > 0  # the name, twice


def test_a_deferred_mail_is_drawn_when_its_moment_comes(settings: Settings, store: Store, smtp: SmtpServer,
                                                        project_dir: Path) -> None:
    """Quiet hours defer both groups alike; the draw happens when the mail would go."""
    with_holdout(project_dir, share="50%")
    out = len(held(lapsed(store, 16, zone="America/Los_Angeles")))  # 05:00 there at NOW
    first = run(settings, "winback-lapsed")
    assert first.outcomes == {"deferred:quiet_hours": 16}
    swept = run(settings, "winback-lapsed", NOW + timedelta(hours=3, minutes=5), audience=False)
    assert swept.outcomes == {"sent": 16 - out, "held_out": out}
    assert statuses(store.engine) == {"sent": 16 - out, "held_out": out}


@pytest.mark.parametrize(("value", "message"), [
    ("10", "expected a share with a percent sign, such as 10%"),
    ("0.1", "expected a share with a percent sign"),
    ('"ten percent"', "expected a share such as 10%"),
    ("60%", "less than or equal to 0.5"),
    ("0%", "greater than 0"),
])
def test_a_bad_holdout_is_located(project_dir: Path, value: str, message: str) -> None:
    trigger = project_dir / "triggers" / "winback.yaml"
    lines = trigger.read_text().count("\n")
    trigger.write_text(trigger.read_text() + f"holdout: {value}\n")
    problems = [str(p) for p in load_project(project_dir / "triggers", project_dir / "templates").problems]
    assert any(f"winback.yaml:{lines + 1}: holdout:" in p and message in p for p in problems), problems


def test_service_mail_is_never_held_out(project_dir: Path) -> None:
    trigger = project_dir / "triggers" / "complaint.yaml"
    line = trigger.read_text().count("\n") + 1
    trigger.write_text(trigger.read_text() + "holdout: 10%\n")
    problems = [str(p) for p in load_project(project_dir / "triggers", project_dir / "templates").problems]
    assert any(f"complaint.yaml:{line}: holdout: service mail is never held out" in p for p in problems), problems


def test_a_salt_needs_a_holdout(project_dir: Path) -> None:
    trigger = project_dir / "triggers" / "winback.yaml"
    trigger.write_text(trigger.read_text() + "holdout_salt: x\n")
    problems = [str(p) for p in load_project(project_dir / "triggers", project_dir / "templates").problems]
    assert any("holdout_salt without holdout" in p for p in problems), problems


def test_the_shipped_win_back_campaign_holds_out_a_fifth() -> None:
    from tests.support import ROOT

    project = load_project(ROOT / "triggers", ROOT / "templates")
    winback = project.triggers["winback-lapsed"]
    assert (winback.holdout, winback.salt) == (0.2, "winback-2026")
