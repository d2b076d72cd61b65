"""``lifecycle simulate``: a trigger's real runs at every tick of a timeline, against a scratch
copy of the store; what they show (entries, each step's mails, exits by goal, passed steps,
branches, variants, the timeline), and that the store itself, and the relay, see nothing.

Over SQLite and PostgreSQL stores; the demo store too.
"""

import hashlib
import json
from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select, text
from sqlmodel import SQLModel
from typer.testing import CliRunner

from flows.outcomes import Outcome
from flows.settings import Settings
from flows.simulate import MAX_TICKS, SimulationError, StepTally, simulate, ticks
from flows.surfaces.cli import app
from flows.surfaces.demo import seed
from tests.audience.test_journey import BRANCHING, EXPERIMENT, SERIES, write
from tests.support.builders import NOW, Store, ago
from tests.support.runs import run
from tests.support.smtp_server import SmtpServer

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")


def fingerprint(engine: Engine) -> dict[str, object]:
    """Every table's row count, and a digest of every row of the ledger."""
    with engine.connect() as connection:
        counts: dict[str, object] = {table.name: connection.execute(select(func.count()).select_from(table))
                                     .scalar_one() for table in SQLModel.metadata.sorted_tables}
        sends = connection.execute(text("SELECT * FROM sends ORDER BY id")).all()
    counts["sends digest"] = hashlib.sha256(repr([tuple(row) for row in sends]).encode()).hexdigest()
    return counts


def by_step(tallies: list[StepTally]) -> dict[str, StepTally]:
    return {t.step: t for t in tallies}


def test_customers_enter_reach_step_two_after_its_wait_and_exit_when_they_ordered(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    write(settings, SERIES)
    anna, ben, cleo = store.customer("Anna"), store.customer("Ben"), store.customer("Cleo")
    store.cart(anna, ago(hours=3))
    store.cart(ben, ago(hours=3))
    store.cart(cleo, ago(hours=3), [("Socken", 9.9, 2)])  # too small a cart for the incentive
    store.order(ben, NOW + timedelta(hours=5, minutes=30))  # between two ticks, after his entry
    store.order(store.customer("Old"), ago(days=500))
    run(settings, "winback-lapsed")  # a real send before: the ledger is not empty
    assert len(smtp.received) == 1
    before = fingerprint(engine)

    found = simulate("cart-series", NOW, NOW + timedelta(days=3), timedelta(hours=1), settings=settings,
                     source=engine)

    steps = by_step(found.steps)
    assert [t.step for t in found.steps] == ["reminder", "nudge", "incentive"]
    assert found.entered == 3 and steps["reminder"].sent == 3  # Ben's later order is not seen at his entry
    assert (steps["nudge"].sent, steps["nudge"].exited) == (2, {"ordered": 1})
    assert (steps["incentive"].sent, steps["incentive"].passed) == (1, 1)
    assert len(found.ticks) == 73
    at = {tick.at: tick for tick in found.ticks}
    assert at[NOW].entered == 3 and at[NOW].mails("reminder") == 3
    assert at[NOW + timedelta(hours=21)].mails("nudge") == 0  # its 22 h are not over
    assert at[NOW + timedelta(hours=22)].mails("nudge") == 2
    assert at[NOW + timedelta(hours=22)].steps["nudge"][Outcome.EXITED] == 1
    assert at[NOW + timedelta(hours=70)].mails("incentive") == 1
    assert sum(tick.mails("nudge") for tick in found.ticks) == 2  # each step once

    assert fingerprint(engine) == before  # the store is untouched
    assert len(smtp.received) == 1  # and the relay saw nothing


def test_a_past_period_is_replayed_not_found_already_sent(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    """The trigger really ran in the period: the copy leaves out its rows from the start on,
    so the simulation decides them again; the rows before the start are the journey's state."""
    write(settings, SERIES)
    store.cart(store.customer("Anna"), ago(hours=3))
    run(settings, "cart-series")
    run(settings, "cart-series", NOW + timedelta(hours=23))
    assert len(smtp.received) == 2

    again = by_step(simulate("cart-series", NOW, NOW + timedelta(hours=23), timedelta(hours=1),
                             settings=settings, source=engine).steps)
    assert (again["reminder"].sent, again["nudge"].sent) == (1, 1)
    later = by_step(simulate("cart-series", NOW + timedelta(hours=1), NOW + timedelta(hours=23),
                             timedelta(hours=1), settings=settings, source=engine).steps)
    assert (later["reminder"].reached, later["nudge"].sent) == (0, 1)  # already in, it goes on
    assert len(smtp.received) == 2


def test_branches_and_variants_are_counted_where_they_happen(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    write(settings, BRANCHING, "welcome-series")
    for name in ("Clara", "Quentin"):
        store.customer(name, created=ago(hours=2))
    found = by_step(simulate("welcome-series", NOW, NOW + timedelta(days=4), timedelta(hours=6),
                             settings=settings, source=engine).steps)
    assert found["welcome"].sent == 2
    assert found["engaged"].branch == "after welcome: clicked=welcome" and found["engaged"].reached == 0
    assert found["reminder"].branch == "after welcome: else" and found["reminder"].sent == 2

    write(settings, EXPERIMENT, "winback-ab")
    for i in range(20):  # ids of their own: the draws must not depend on which tests ran before
        store.customer(f"P{i}", last_seen=ago(days=200), external_id=f"ab-{i}")
    (arm,) = simulate("winback-ab", NOW, NOW, timedelta(hours=1), settings=settings, source=engine).steps
    assert arm.held_out and arm.held_out + arm.sent == 20
    assert set(arm.variants) == {"a", "b"} and sum(arm.variants.values()) == arm.sent
    assert smtp.received == []


def test_a_single_mail_trigger_is_one_step(settings: Settings, store: Store, engine: Engine,
                                           smtp: SmtpServer) -> None:
    store.complaint(store.customer("Anna"), NOW + timedelta(minutes=45))
    found = simulate("complaint-ack", NOW, NOW + timedelta(hours=2), timedelta(minutes=30), settings=settings,
                     source=engine)
    (mail,) = found.steps
    assert (mail.step, mail.sent, found.entered) == ("", 1, 1)
    assert [tick.at for tick in found.ticks if tick.entered] == [NOW + timedelta(hours=1)]  # the first tick after
    assert smtp.received == []


def test_a_trigger_in_shards_is_simulated_in_one_process_and_sends_nothing(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    write(settings, SERIES.replace("reentry:", "shards: 3\nreentry:", 1))
    for name in ("Anna", "Ben", "Cleo", "Dora"):
        store.cart(store.customer(name), ago(hours=3))
    found = simulate("cart-series", NOW, NOW + timedelta(days=1), timedelta(hours=1), settings=settings,
                     source=engine)
    steps = by_step(found.steps)
    assert found.entered == 4 and steps["reminder"].sent == 4 and steps["nudge"].sent == 4
    assert smtp.received == []  # a slice in its own process would have dispatched for real


def test_a_timeline_must_run_forward_in_steps_and_end(settings: Settings) -> None:
    assert ticks(NOW, NOW, timedelta(hours=1)) == [NOW]
    assert ticks(NOW, NOW + timedelta(minutes=150), timedelta(hours=1))[-1] == NOW + timedelta(hours=2)
    with pytest.raises(SimulationError, match="is after --to"):
        ticks(NOW, NOW - timedelta(hours=1), timedelta(hours=1))
    with pytest.raises(SimulationError, match="longer than 0s"):
        ticks(NOW, NOW, timedelta(0))
    with pytest.raises(SimulationError, match=f"at most {MAX_TICKS}"):
        ticks(NOW, NOW + timedelta(days=420), timedelta(hours=1))


def test_the_command_prints_each_step_and_the_timeline(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    write(settings, SERIES)
    store.cart(store.customer("Anna"), ago(hours=3))
    store.order(store.customer("Ben"), NOW + timedelta(hours=1))
    before = fingerprint(engine)
    window = ["--from", NOW.isoformat(), "--to", (NOW + timedelta(days=1)).isoformat()]
    result = runner.invoke(app, ["simulate", "cart-series", *window, "--every", "1h"])
    assert result.exit_code == 0, result.output
    assert "Simulated cart-series from 2026-03-16 12:00 to 2026-03-17 12:00 UTC every 1h, 25 tick(s): " \
           "1 entered; nothing was sent or recorded." in result.output
    lines = [" ".join(line.replace("│", " ").replace("┃", " ").split()) for line in result.output.splitlines()]
    assert "step reached sent held out passed exited deferred" in lines  # no branches, no variants
    assert "reminder 1 1 0 0 0 0" in lines and "nudge 1 1 0 0 0 0" in lines
    assert "2026-03-16 12:00 1 1 0 0 0" in lines and "2026-03-17 10:00 0 0 1 0 0" in lines

    as_json = runner.invoke(app, ["simulate", "cart-series", *window, "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    found = json.loads(as_json.stdout)
    assert found["entered"] == 1 and [s["sent"] for s in found["steps"]] == [1, 1, 0]
    nudged = found["timeline"][1]
    assert (nudged["at"], nudged["entered"], nudged["steps"]["nudge"]) == ("2026-03-17T10:00:00+00:00", 0,
                                                                          {"sent": 1})
    assert nudged["steps"]["reminder"] == {"skipped:already_sent": 1}  # her cart is still idle: in once
    assert fingerprint(engine) == before and smtp.received == []


@pytest.mark.parametrize(("arguments", "code", "said"), [
    (["no-such", "--from", "2026-03-16", "--to", "2026-03-17"], 1, "no trigger named 'no-such'"),
    (["cart-series", "--from", "2026-03-17", "--to", "2026-03-16"], 2, "is after --to"),
    (["cart-series", "--from", "2026-03-16", "--to", "2026-03-17", "--every", "hourly"], 2,
     "--every: expected a duration"),
    (["cart-series", "--from", "2026-03-16", "--to", "2027-03-16", "--every", "1m"], 2, "at most 10000"),
    (["cart-series", "--from", "monday", "--to", "2026-03-17"], 2, "--from must be a date"),
])
def test_the_command_refuses_what_it_cannot_simulate(settings: Settings, arguments: list[str], code: int,
                                                     said: str) -> None:
    write(settings, SERIES)
    result = runner.invoke(app, ["simulate", *arguments])
    assert result.exit_code == code, result.output
    assert said in " ".join(result.output.split())


def test_customers_move_through_a_journeys_steps_in_the_demo_store(
        settings: Settings, engine: Engine, smtp: SmtpServer) -> None:
    seed(engine, NOW, customers=300)
    write(settings, SERIES)
    before = fingerprint(engine)
    found = simulate("cart-series", NOW - timedelta(days=1), NOW + timedelta(days=3), timedelta(hours=1),
                     settings=settings, source=engine)
    steps = by_step(found.steps)
    assert found.entered > 10 and steps["reminder"].sent > 10
    assert 0 < steps["nudge"].sent <= steps["reminder"].sent
    assert steps["incentive"].sent > 0 and steps["incentive"].passed > 0  # the cart's value decides
    first = min(tick.at for tick in found.ticks if tick.mails("nudge"))
    entered = min(tick.at for tick in found.ticks if tick.entered)
    assert first >= entered + timedelta(hours=22)
    assert fingerprint(engine) == before and smtp.received == []
