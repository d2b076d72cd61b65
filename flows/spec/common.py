"""The parts every trigger file shares: schedule, audience, email, re-entry.

Models forbid unknown keys so a typo fails loudly; cross-file facts (which stages
exist) arrive through pydantic's validation context.
"""

import re
from datetime import timedelta
from email.utils import parseaddr
from typing import Annotated, Any, Literal

from email_validator import EmailNotValidError, validate_email
from jinja2 import Environment, TemplateSyntaxError
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from flows import clock

Duration = Annotated[timedelta, BeforeValidator(clock.parse_duration)]
Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
LANGUAGE = re.compile(r"^[a-z]{2,3}$")
# Bounds of what a file may compare the store with: any larger number overflows the
# databases' integers (or a date, for days) at run time instead of failing validation.
MAX_ORDERS = 1_000_000
MAX_AMOUNT = 1e12
MAX_DAYS = 36_500  # a hundred years back from any evaluation time is still a date


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Schedule(StrictModel):
    """When the trigger is evaluated (for a campaign: when it goes out)."""

    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        return clock.check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        clock.zone(value)
        return value


def known_stages(info: ValidationInfo) -> list[str] | None:
    return (info.context or {}).get("stages")


class Audience(StrictModel):
    """Who, among the customers a trigger finds due, should get the mail.

    Consent and suppressions are not options here: they are always enforced.
    """

    stages: list[str] | None = Field(default=None, min_length=1, description="Only these lifecycle stages.")
    locales: list[str] | None = Field(default=None, min_length=1, description="Only these languages (de, en…).")
    min_orders: int | None = Field(default=None, ge=0, le=MAX_ORDERS)
    max_orders: int | None = Field(default=None, ge=0, le=MAX_ORDERS)
    min_lifetime_value: float | None = Field(default=None, ge=0, le=MAX_AMOUNT, allow_inf_nan=False,
                                             description="Sum of all orders, in currency units.")
    max_lifetime_value: float | None = Field(default=None, ge=0, le=MAX_AMOUNT, allow_inf_nan=False)

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        choices = known_stages(info)
        if value is None or choices is None:
            return value
        for name in value:
            if name not in choices:
                raise ValueError(f"unknown stage {name!r}; valid stages: {', '.join(choices)}")
        return value

    @field_validator("locales")
    @classmethod
    def _locales(cls, value: list[str] | None) -> list[str] | None:
        for lang in value or []:
            if not LANGUAGE.match(lang):
                raise ValueError(f"expected two-letter language codes such as de or en, got {lang!r}")
        return value


def _localised(value: Any) -> Any:
    return {"*": value} if isinstance(value, str) else value


_SUBJECT_ENV = Environment(autoescape=False)


class EmailSpec(StrictModel):
    template: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="A folder under templates/.")
    subject: Annotated[dict[str, str], BeforeValidator(_localised)] = Field(
        description="A Jinja string, or one per language (de: …, en: …)."
    )
    sender: str | None = Field(default=None, description='Overrides LIFECYCLE_SENDER, e.g. "Shop <hi@shop.example>".')

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("expected a subject, or one subject per language")
        for lang, text in value.items():
            if lang != "*" and not LANGUAGE.match(lang):
                raise ValueError(f"subject keys must be language codes such as de or en, got {lang!r}")
            try:
                _SUBJECT_ENV.parse(text)
            except TemplateSyntaxError as exc:
                raise ValueError(f"subject is not a valid Jinja template: {exc.message}") from None
        return value

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str | None) -> str | None:
        if value is not None:
            check_sender(value)
        return value

    def has_subject(self, lang: str) -> bool:
        return lang in self.subject or "*" in self.subject

    def subject_for(self, lang: str) -> str | None:
        """The subject written for ``lang``, or the one plain subject. Never another
        language's: a French reader must not get the file's first (German) subject."""
        return self.subject.get(lang) or self.subject.get("*")


def check_sender(value: str) -> str:
    _name, address = parseaddr(value)
    if "\n" in value or "\r" in value or not address:
        raise ValueError(f'expected a sender such as "Shop <hello@shop.example>", got {value!r}')
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"sender address {address!r} is not valid: {exc}") from None
    return value


class Reentry(StrictModel):
    """How often one customer may get this trigger: ``once``, ``every_occurrence``,
    or a cool-down such as ``7d`` (at most one mail from this trigger per 7 days)."""

    mode: Literal["once", "every_occurrence", "cooldown"]
    cooldown: timedelta | None = None

    @model_validator(mode="after")
    def _cooldown_with_its_mode(self) -> "Reentry":
        """The mapping form says as much as the short one: a cool-down has a length, and only it has one."""
        if self.mode == "cooldown" and self.cooldown is None:
            raise ValueError("mode cooldown needs a cooldown, such as cooldown: 7d (or write reentry: 7d)")
        if self.mode != "cooldown" and self.cooldown is not None:
            raise ValueError(f"only mode cooldown has a cooldown; mode {self.mode} takes none")
        return self

    def __str__(self) -> str:
        return clock.format_duration(self.cooldown) if self.cooldown else self.mode


def parse_reentry(value: Any) -> Any:
    if isinstance(value, str):
        if value in ("once", "every_occurrence"):
            return Reentry(mode=value)  # type: ignore[arg-type]  # a str, one of the two literals just checked
        try:
            cooldown = clock.parse_duration(value)
        except ValueError as exc:
            if str(exc).startswith("expected"):
                raise ValueError(
                    f"expected once, every_occurrence or a cool-down such as 7d, got {value!r}"
                ) from None
            raise  # too long, or 0s (for no cool-down at all, write every_occurrence)
        return Reentry(mode="cooldown", cooldown=cooldown)
    return value


ReentryRule = Annotated[Reentry, BeforeValidator(parse_reentry)]

_PERCENT = re.compile(r"^\s*(\d{1,2}(?:\.\d{1,2})?)\s*%\s*$")
MAX_HOLDOUT = 0.5  # a larger "holdout" is a different experiment: the mailed group would be the small one


def parse_share(value: Any) -> Any:
    """``10%`` → 0.1. Only the percent form: ``0.1`` or ``10`` alone would be read both ways."""
    if isinstance(value, str):
        match = _PERCENT.match(value)
        if match is None:
            raise ValueError(f"expected a share such as 10%, got {value!r}")
        return float(match.group(1)) / 100
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f"expected a share with a percent sign, such as {value}%, got the bare number {value!r}")
    return value


Share = Annotated[float, BeforeValidator(parse_share), Field(gt=0, le=MAX_HOLDOUT)]
