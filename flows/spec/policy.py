"""The sending policy (``triggers/policy.yaml``): pressure and timing for all marketing mail."""

import re
from datetime import time, timedelta
from typing import Literal

from pydantic import Field, field_validator

from flows import clock
from flows.spec.common import Duration, StrictModel

_CLOCK_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_LABEL = r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
_HOST = re.compile(rf"^(?=.{{1,253}}$)({_LABEL}\.)*{_LABEL}$")


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


class Tracking(StrictModel):
    """What marketing mail may measure. Service mail is never tracked, nor a customer who
    left tracking on the preference page (``flows.tracking``)."""

    clicks: bool = Field(True, description="Rewrite links to LIFECYCLE_BASE_URL/c/TOKEN and record clicks.")
    opens: bool = Field(False, description="Add a tracking pixel. Unreliable: Apple Mail fetches every image.")
    machine_click_within: Duration = Field(
        timedelta(seconds=5), description="A click this soon after the send is a security scanner's, not a person's.")
    repeat_within: Duration = Field(
        timedelta(seconds=60), description="A repeat of the same click this soon is folded into it, not a new click.")
    keep_for: Duration = Field(
        timedelta(days=400), description="Clicks and opens older than this are deleted (lifecycle attribute).")
    domains: list[str] = Field(
        default_factory=list, description="Hosts whose links are tracked besides LIFECYCLE_SHOP_URL's (and their "
                                          "subdomains); links anywhere else go straight to their destination.")

    @field_validator("domains")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not _HOST.match(host):
                raise ValueError(f"expected a host name such as blog.shop.example, got {host!r}")
        return [host.lower() for host in value]


Basis = Literal["click", "delivery", "open"]


class Attribution(StrictModel):
    """Last touch: an order goes to the latest marketing mail the customer touched within the window."""

    window: Duration = Field(timedelta(days=5), description="How long after a touch an order is credited to it.")
    basis: list[Basis] = Field(default_factory=lambda: list[Basis](["click", "delivery"]), min_length=1,
                               description="What counts as a touch: click, delivery, and (not by default) open.")

    @field_validator("basis")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each basis once, got {value}")
        return value


class Policy(StrictModel):
    default_timezone: str = Field("UTC", description="For customers without a valid time zone.")
    frequency_caps: list[FrequencyCap] = Field(default_factory=list)
    quiet_hours: QuietHours | None = None
    tracking: Tracking = Tracking()
    attribution: Attribution = Attribution()

    @field_validator("default_timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        clock.zone(value)
        return value
