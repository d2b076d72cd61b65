"""Cron: the forms validate accepts are read the same way by cronsim (campaign slots),
APScheduler (`lifecycle serve`) and Prefect's scheduler (deployments); the rest are refused."""

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prefect.server.schemas.schedules import CronSchedule

from flows.clock import check_cron, last_slot, next_slot
from flows.spec.project import load_project
from flows.surfaces.serve import cron_trigger

ACCEPTED = ["*/15 * * * *", "0 10 * * 1", "30 9 * * 1-5", "0 8 1 * *", "*/15 * * * 0", "0 9 * * mon-fri",
            "0 12 * jan-mar,oct *", "5,35 10-18/2 * * *", "0 7 1,11,21 * *", "0 10 * * sun,wed", "45 23 31 * *",
            "0 0 29 2 *", "0 6 * * */2", "0 4 1-7 * *", "15 14 * 12 5", "0 10 * * 0-6/3",
            # Weekday names in ranges and lists, mixed with numbers: names are days from Sunday too.
            "0 9 * * sun-tue", "0 9 * * sun-sat", "0 9 * * mon,3", "0 9 * * SUN-Tue", "0 9 * * fri-sat",
            "0 9 * * sun-sat/2", "0 9 * * 0,sat", "0 9 * * tue-5", "0 9 * * sun"]


def fire_times(expression: str, tz: str, start: datetime, count: int) -> tuple[list, list, list]:
    ours, theirs, prefect = [], [], []
    moment = start
    for _ in range(count):
        moment = next_slot(expression, tz, moment)
        ours.append(moment)
    trigger, previous, moment = cron_trigger(expression, tz), None, start
    for _ in range(count):
        moment = trigger.get_next_fire_time(previous, moment + timedelta(microseconds=1) if previous else moment)
        previous = moment
        theirs.append(moment.astimezone(UTC))
    dates = asyncio.run(CronSchedule(cron=expression, timezone=tz).get_dates(count, start=start + timedelta(seconds=1)))
    prefect = [d.astimezone(UTC) for d in dates]
    return ours, theirs, prefect


@pytest.mark.parametrize("expression", ACCEPTED)
@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin", "America/New_York"])
def test_cronsim_apscheduler_and_prefect_fire_at_the_same_moments(expression: str, tz: str) -> None:
    assert check_cron(expression) == expression
    start = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)
    ours, theirs, prefect = fire_times(expression, tz, start, 40)
    assert ours == theirs == prefect, expression


def test_the_campaign_slot_is_the_one_the_schedulers_fired() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for expression in ACCEPTED:
        for fired in fire_times(expression, "Europe/Berlin", start, 5)[1]:
            assert last_slot(expression, "Europe/Berlin", fired) == fired


# Each of these passed validation before and then crashed `serve` (or meant something else to one scheduler).
REFUSED = [
    ("0 10 * * 1#2", "weekday '1#2' is not a supported form"),
    ("0 0 L 2 *", "day-of-month 'l' is not a supported form"),
    ("0 0 10 * * *", "6 field(s)"),
    ("0 0 * * * 2026", "6 field(s)"),
    ("0 10 1 * 1", "day-of-month and weekday are both restricted"),
    ("0 0 30 2 *", "it would never fire"),
    ("0 0 1W * *", "is not a supported form"),
    ("0 0 ? * 1", "is not a supported form"),
    ("@daily", "1 field(s)"),
    ("5/15 * * * *", "minute '5/15' is not a supported form"),
    ("0 0 * * 5-1", "runs backwards"),
    ("0 0 * * 7-7", "weekday '7-7' is outside 0-6"),
    ("*/0 * * * *", "step outside"),
    ("0 7 */10 * *", "day-of-month '*/10' has a step"),  # Prefect's croniter skips March 1st
]


@pytest.mark.parametrize(("expression", "fragment"), REFUSED, ids=[r[0] for r in REFUSED])
def test_cron_forms_the_schedulers_read_differently_are_refused_located(project_dir: Path, expression: str,
                                                                          fragment: str) -> None:
    winback = project_dir / "triggers" / "winback.yaml"
    text = winback.read_text().replace('  cron: "0 10 * * 1"      # Mondays, 10:00 Berlin time',
                                       f'  cron: "{expression}"')
    winback.write_text(text)
    line = text.splitlines().index(f'  cron: "{expression}"') + 1
    project = load_project(project_dir / "triggers", project_dir / "templates")
    [problem] = [p for p in project.problems if p.file.name == "winback.yaml"]
    assert (problem.line, problem.field) == (line, "schedule.cron")
    assert fragment in problem.message, problem.message
    assert "expected five fields: minute hour day-of-month month weekday" in problem.message or \
        "never fire" in problem.message, problem.message
    assert "winback-lapsed" not in project.triggers and "we-miss-you" in project.triggers


WEEKDAY_FORMS = [f"0 9 * * {w}" for w in (
    "*", "*/2", "*/3", "0", "6", "sun", "sat", "mon-fri", "sun-tue", "sun-sat", "0-6", "1-5", "mon,3", "0,sat",
    "tue-5", "2-sat", "sun-sat/3", "1-6/2", "fri,sun,tue", "wed-wed")]


@pytest.mark.parametrize("expression", WEEKDAY_FORMS)
def test_every_weekday_form_validate_accepts_is_scheduled_by_serve_at_the_cronsim_moments(expression: str) -> None:
    assert check_cron(expression) == expression
    start = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)
    ours, theirs, _ = fire_times(expression, "Europe/Berlin", start, 21)
    assert ours == theirs, expression


_FIELD_PIECES = [  # per field: valid items, and a few out-of-range or malformed ones
    ["*", "*/7", "0", "59", "0-59/15", "0,30", "60", "5-1", "*/0"],
    ["*", "*/2", "0", "23", "9-17", "8,12,18", "24", "10-18/2"],
    ["*", "1", "31", "1-7", "1,15", "1-31/10", "32", "0"],
    ["*", "1", "12", "jan-mar", "feb", "oct,dec", "13", "*/3"],
    ["*", "0", "6", "7", "mon", "sun-sat", "fri-mon", "1-5", "sat", "0-6/3", "tue-5", "8"],
]


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.tuples(*(st.lists(st.sampled_from(p), min_size=1, max_size=1) for p in _FIELD_PIECES)))
def test_every_expression_validate_accepts_is_one_serve_can_schedule(fields: tuple[list[str], ...]) -> None:
    """The spec check needs no scheduler of its own: what it accepts, APScheduler builds."""
    expression = " ".join(",".join(items) for items in fields)
    try:
        check_cron(expression)
    except ValueError:
        return
    ACCEPTED_SEEN.append(expression)
    cron_trigger(expression, "Europe/Berlin")  # raises if `lifecycle serve` could not schedule it


ACCEPTED_SEEN: list[str] = []


def test_the_property_above_met_many_accepted_expressions() -> None:
    """It is not vacuous: most of its examples passed validation and were scheduled."""
    if not ACCEPTED_SEEN:
        test_every_expression_validate_accepts_is_one_serve_can_schedule()
    assert len(ACCEPTED_SEEN) >= 25
