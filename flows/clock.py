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
    """``'1d12h'`` → ``timedelta(days=1, hours=12)``; a timedelta passes through. At most ``MAX_DURATION``."""
    if isinstance(value, timedelta):
        return check_duration(value)
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match and any(match.groups()):
            weeks, days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
            total = (((weeks * 7 + days) * 24 + hours) * 60 + minutes) * 60 + seconds  # no OverflowError
            if total > MAX_DURATION.total_seconds():
                raise ValueError(f"{value!r} is too long: at most {format_duration(MAX_DURATION)} (about ten years)")
            return timedelta(seconds=total)
    raise ValueError(f"expected {DURATION_HINT}, got {value!r}")


def check_duration(value: timedelta) -> timedelta:
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


def check_cron(expression: str) -> str:
    try:
        CronSim(expression, datetime(2000, 1, 1))
    except (CronSimError, ValueError) as exc:
        raise ValueError(
            f"invalid cron expression {expression!r} ({exc}); expected five fields: minute hour day month weekday"
        ) from None
    return expression


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
