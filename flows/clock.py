"""Time: evaluation moments, durations as marketers write them, and cron slots."""

import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

_DURATION = re.compile(r"^(?:(\d{1,20})w)?(?:(\d{1,20})d)?(?:(\d{1,20})h)?(?:(\d{1,20})m)?(?:(\d{1,20})s)?$")
DURATION_HINT = "a duration such as 45m, 2h, 3d, 1w or 1d12h"
# Every duration a file may write: about ten years. Evaluation times are today's, so
# ``now - duration`` and ``now + duration`` stay far inside what datetimes and both
# databases represent (years 1 to 9999), and nothing a marketer means is longer.
MAX_DURATION = timedelta(days=3650)


def parse_duration(value: object) -> timedelta:
    """``'1d12h'`` → ``timedelta(days=1, hours=12)``; a timedelta passes through. Longer than 0s (a
    zero ``catch_up``, ``max_age`` or ``send_window`` could never fire) and at most ``MAX_DURATION``."""
    if isinstance(value, timedelta):
        return check_duration(value)
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match and any(match.groups()):
            weeks, days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
            total = (((weeks * 7 + days) * 24 + hours) * 60 + minutes) * 60 + seconds  # no OverflowError
            if total > MAX_DURATION.total_seconds():
                raise ValueError(f"{value!r} is too long: at most {format_duration(MAX_DURATION)} (about ten years)")
            if total == 0:
                raise ValueError(f"{value!r} must be longer than 0s: with it the trigger could never fire "
                                 "(or would not wait at all)")
            return timedelta(seconds=total)
    raise ValueError(f"expected {DURATION_HINT}, got {value!r}")


def check_duration(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError(f"{format_duration(value)} must be longer than 0s")
    if value > MAX_DURATION:
        raise ValueError(f"{format_duration(value)} is too long: at most {format_duration(MAX_DURATION)} "
                         "(about ten years)")
    return value


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def parse_now(value: str | None) -> datetime:
    """An ISO-8601 moment (naive means UTC), or the current time."""
    if value is None:
        return datetime.now(UTC)
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}; expected an IANA name such as Europe/Berlin or UTC") from None


# The cron forms every scheduler here reads the same way: cronsim (campaign slots),
# APScheduler (``lifecycle serve``) and croniter (Prefect's deployments). Anything else
# (L, W, #, ?, six fields, @daily, a step after a single value, a range that wraps) is
# read differently by at least one of them, or refused by one: refused here, named.
CRON_FORMS = ("five fields: minute hour day-of-month month weekday; each *, a number, a range a-b, "
              "*/step or a-b/step (not in day-of-month), or a comma list of these; months jan-dec, weekdays "
              "0-6 or sun-sat (0 is Sunday); day-of-month and weekday not both restricted")
_FIELDS = (("minute", 0, 59, None), ("hour", 0, 23, None), ("day-of-month", 1, 31, None),
           ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
           ("weekday", 0, 6, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")))
_ITEM = re.compile(r"^(?:\*(?:/(?P<every>\d{1,2}))?|(?P<first>[a-z]{3}|\d{1,2})"
                   r"(?:-(?P<last>[a-z]{3}|\d{1,2})(?:/(?P<step>\d{1,2}))?)?)$")


def check_cron(expression: str) -> str:
    """``expression`` if it is one of ``CRON_FORMS`` and can ever fire; otherwise a ValueError."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"invalid cron expression {expression!r}: {len(fields)} field(s); expected {CRON_FORMS}")
    for text, (name, low, high, names) in zip(fields, _FIELDS, strict=True):
        for item in text.lower().split(","):
            problem = _cron_item(item, low, high, names)
            if problem:
                raise ValueError(f"invalid cron expression {expression!r}: {name} {item!r} {problem}; "
                                 f"expected {CRON_FORMS}")
    if fields[2] != "*" and fields[4] != "*":
        raise ValueError(f"invalid cron expression {expression!r}: day-of-month and weekday are both restricted, "
                         "which schedulers read differently (either day, or both); use two triggers, or restrict "
                         f"only one; expected {CRON_FORMS}")
    try:
        CronSim(expression, datetime(2000, 1, 1))
    except (CronSimError, ValueError) as exc:  # e.g. 0 0 30 2 *: a day that never comes
        raise ValueError(f"invalid cron expression {expression!r} ({exc}): it would never fire") from None
    # Every form this accepts, APScheduler (`lifecycle serve`, through ``apscheduler_fields``)
    # and Prefect schedule alike: tests/test_clock.py builds each with both.
    return expression


_APSCHEDULER_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # spelled out: it counts from Monday = 0


def apscheduler_fields(expression: str) -> dict[str, str]:
    """An expression of ``CRON_FORMS`` as APScheduler's ``CronTrigger`` fields. Weekdays, as
    numbers (Sunday = 0) or names, become the list of the days they mean, by name: APScheduler
    numbers them from Monday, and its ranges of names stop at Sunday."""
    minute, hour, day, month, weekday = expression.split()
    return {"minute": minute, "hour": hour, "day": day, "month": month.lower(),
            "day_of_week": "*" if weekday == "*" else ",".join(_APSCHEDULER_DAYS[d] for d in weekdays(weekday))}


def weekdays(field: str) -> list[int]:
    """The days (Sunday = 0 … Saturday = 6) a weekday field of ``CRON_FORMS`` means."""
    names = _FIELDS[4][3]
    assert names is not None
    days: set[int] = set()
    for item in field.lower().split(","):
        match = _ITEM.match(item)
        if not match:
            raise ValueError(f"weekday {item!r} is not a supported form")
        if match["first"] is None:  # * or */step
            first, last = 0, 6
        else:
            first = _weekday_number(match["first"], names)
            last = _weekday_number(match["last"], names) if match["last"] else first
        step = int(match["every"] or match["step"] or 1)
        days.update(d % 7 for d in range(first, last + 1, step))
    return sorted(days)


def _weekday_number(value: str, names: tuple[str, ...]) -> int:
    return names.index(value) if value in names else int(value)


def _cron_item(item: str, low: int, high: int, names: tuple[str, ...] | None) -> str | None:
    match = _ITEM.match(item)
    if not match:
        return "is not a supported form"
    step = match["every"] or match["step"]
    if step is not None and low == 1 and high == 31:  # croniter (Prefect) skips the 1st after a short month
        return "has a step, which Prefect's scheduler reads differently after a short month; list the days"
    if step is not None and not 1 <= int(step) <= high:
        return f"has a step outside 1-{high}"
    values = []
    for part in (match["first"], match["last"]):
        if part is None:
            continue
        if part.isdigit():
            value = int(part)
        elif names and part in names:
            value = names.index(part) + low
        else:
            return "names no " + ("value" if not names else f"{'month' if len(names) == 12 else 'weekday'}")
        if not low <= value <= high:
            return f"is outside {low}-{high}"
        values.append(value)
    if len(values) == 2 and values[0] > values[1]:
        return "is a range that runs backwards"
    return None


@lru_cache(maxsize=64)
def last_slot(expression: str, tz: str, now: datetime) -> datetime:
    """The latest cron slot at or before ``now`` in time zone ``tz`` (as UTC).

    Cached: a campaign's audience names the same slot in every one of its keys."""
    local = now.astimezone(zone(tz))
    # CronSim in reverse yields slots strictly before its start; nudge by a microsecond.
    slot = next(CronSim(expression, local + timedelta(microseconds=1), reverse=True))
    return slot.astimezone(UTC)


def next_slot(expression: str, tz: str, after: datetime) -> datetime:
    return next(CronSim(expression, after.astimezone(zone(tz)))).astimezone(UTC)
