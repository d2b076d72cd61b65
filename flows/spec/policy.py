"""The sending policy (``triggers/policy.yaml``): pressure and timing for all marketing mail."""

import re
from datetime import time

from pydantic import Field, field_validator

from flows import clock
from flows.spec.common import Duration, StrictModel

_CLOCK_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class FrequencyCap(StrictModel):
    max: int = Field(ge=1, description="At most this many marketing mails…")
    per: Duration = Field(description="…within this long, across every trigger.")


class QuietHours(StrictModel):
    """A span of local clock time (in each customer's time zone) with no marketing mail."""

    start: time
    end: time

    @field_validator("start", "end", mode="before")
    @classmethod
    def _clock(cls, value: object) -> object:
        if isinstance(value, int):  # YAML reads 21:00 unquoted as 1260 (sexagesimal minutes)
            value = f"{value // 60:02d}:{value % 60:02d}"
        if isinstance(value, str) and not _CLOCK_TIME.match(value):
            raise ValueError(f"expected a clock time such as 21:00, got {value!r}")
        return value


class Policy(StrictModel):
    default_timezone: str = Field("UTC", description="For customers without a valid time zone.")
    frequency_caps: list[FrequencyCap] = Field(default_factory=list)
    quiet_hours: QuietHours | None = None

    @field_validator("default_timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        clock.zone(value)
        return value
