"""When may a marketing mail go out? Frequency caps and quiet hours, as pure functions."""

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from flows import clock
from flows.spec.policy import Policy, QuietHours

log = logging.getLogger("lifecycle.policy")

FREQUENCY_CAP = "frequency_cap"
QUIET_HOURS = "quiet_hours"


def customer_zone(name: str | None, policy: Policy, customer: str = "") -> ZoneInfo:
    """The customer's time zone; a missing or invalid one falls back to the policy's default."""
    if name:
        try:
            return clock.zone(name)
        except ValueError:
            log.warning("Customer %s has an invalid time zone %r; using %s", customer, name, policy.default_timezone)
    return clock.zone(policy.default_timezone)


def quiet_until(moment: datetime, zone: ZoneInfo, quiet: QuietHours) -> datetime | None:
    """The end of the quiet hours ``moment`` falls in (UTC), or None if it does not."""
    local = moment.astimezone(zone)
    now, start, end = local.time(), quiet.start, quiet.end
    if start == end:
        return None
    overnight = start > end
    inside = (now >= start or now < end) if overnight else (start <= now < end)
    if not inside:
        return None
    day = local.date() + timedelta(days=1) if overnight and now >= start else local.date()
    return datetime.combine(day, end, tzinfo=zone).astimezone(UTC)


def next_allowed(now: datetime, recent: Sequence[datetime], zone: ZoneInfo,
                 policy: Policy) -> tuple[datetime, str | None]:
    """The earliest moment from ``now`` that respects every cap and the quiet hours.

    ``recent`` are the customer's marketing sends (any trigger). Returns the moment and
    the rule that pushed it past ``now`` (None when the mail may go now).
    """
    moment, reason = now, None
    for _ in range(len(policy.frequency_caps) + 2):  # caps and quiet hours may push each other once
        pushed = False
        for cap in policy.frequency_caps:
            inside = sorted((t for t in recent if t > moment - cap.per), reverse=True)
            if len(inside) >= cap.max:
                free = inside[cap.max - 1] + cap.per
                if free > moment:
                    moment, reason, pushed = free, reason or FREQUENCY_CAP, True
        if policy.quiet_hours is not None:
            end = quiet_until(moment, zone, policy.quiet_hours)
            if end is not None:
                moment, reason, pushed = end, reason or QUIET_HOURS, True
        if not pushed:
            break
    return moment, reason


def capped(now: datetime, recent: Sequence[datetime], policy: Policy) -> bool:
    """Whether a cap holds at ``now`` given ``recent`` (none later than ``now``). If none
    does, ``recent`` changes nothing: every window only slides forward from ``now``, so
    ``next_allowed`` is what it is with no earlier mail, the same for everyone in a zone
    (a run works that out once per zone rather than once per customer)."""
    return any(sum(t > now - cap.per for t in recent) >= cap.max for cap in policy.frequency_caps)


def longest_window(policy: Policy) -> timedelta:
    return max((cap.per for cap in policy.frequency_caps), default=timedelta(0))



