"""Time: evaluation moments, durations as marketers write them, and cron slots."""

import re
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

_DURATION = re.compile(r"^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
DURATION_HINT = "a duration such as 45m, 2h, 3d, 1w or 1d12h"


def parse_duration(value: object) -> timedelta:
    """``'1d12h'`` → ``timedelta(days=1, hours=12)``; a timedelta passes through."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match and any(match.groups()):
            weeks, days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
            return timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=seconds)
    raise ValueError(f"expected {DURATION_HINT}, got {value!r}")


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
        return datetime.now(timezone.utc)
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


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
    return slot.astimezone(timezone.utc)


def next_slot(expression: str, tz: str, after: datetime) -> datetime:
    return next(CronSim(expression, after.astimezone(zone(tz)))).astimezone(timezone.utc)
