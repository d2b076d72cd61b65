"""What a trigger file holds as a whole: its entry (kind, schedule, audience, re-entry), and
either one mail (``email:``) or a journey of them (``steps:``, ``exit_when:``).

Each kind adds its own parameters to ``TriggerBase``. A trigger without steps is a one-step
journey whose keys are exactly those of a single mail, so a file can grow steps later without
mailing anyone twice (``flows.audience.journey``).
"""

from datetime import timedelta
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from flows.spec.common import Audience, Duration, EmailSpec, ReentryRule, Schedule, Share, Slug, StrictModel
from flows.spec.journey import ExitGoal, Journey, Step, variant_email, walk


class TriggerBase(StrictModel):
    """What every trigger file holds; each kind adds its own parameters."""

    name: Slug = Field(description="Unique; names the Prefect flow and the send keys.")
    description: str = Field(min_length=1)
    kind: str
    enabled: bool = True
    schedule: Schedule
    audience: Audience = Audience()
    email: EmailSpec | None = Field(default=None, description="The one mail; a journey gives each step its own.")
    steps: list[Step] | None = Field(
        default=None, min_length=1,
        description="A journey: mails in order, each after a wait, with conditions, branches and variants.")
    exit_when: list[ExitGoal] | None = Field(
        default=None, min_length=1, description="Goals that end a customer's journey before any later step.")
    step_expires_after: Duration = Field(
        default=timedelta(days=7),
        description="A journey step not sent within this long after it fell due (runs missed, consent missing, "
                    "the policy holding it) is not sent any more: the customer goes no further.")
    reentry: ReentryRule
    deferred_expires_after: Duration | None = Field(
        default=None, description="Drop a mail the sending policy deferred for longer than this (default: never)."
    )
    holdout: Share | None = Field(
        default=None, description="Hold this share of customers out (never mailed, recorded held_out) to measure lift.")
    holdout_salt: str | None = Field(
        default=None, min_length=1, max_length=64,
        description="Mixed into the holdout's hash with the trigger's name (default: the name alone); a new salt "
                    "draws a new group.")
    shards: int = Field(
        default=1, ge=1, le=64,
        description="Split each run's audience into this many slices, read and sent at once by as many processes "
                    "(each customer in exactly one). For large audiences; one per core is the most that helps.")
    # Service mail (complaint replies, confirmations) must reach everyone: never held out.
    service: ClassVar[bool] = False

    @field_validator("holdout")
    @classmethod
    def _no_holdout_for_service_mail(cls, value: float | None) -> float | None:
        if value is not None and cls.service:
            raise ValueError("service mail is never held out: every customer it is due for must get it")
        return value

    @field_validator("steps")
    @classmethod
    def _no_journey_for_service_mail(cls, value: list[Step] | None) -> list[Step] | None:
        if value is not None and cls.service:
            raise ValueError("service mail is one mail, never a journey: give it `email:`")
        return value

    @model_validator(mode="after")
    def _salt_with_holdout(self) -> "TriggerBase":
        if self.holdout_salt is not None and self.holdout is None:
            raise ValueError("holdout_salt without holdout: set holdout, such as holdout: 10%")
        return self

    @model_validator(mode="after")
    def _one_mail_or_steps(self) -> "TriggerBase":
        if self.email is None and self.steps is None:
            raise ValueError("a trigger sends `email:` (one mail) or `steps:` (a journey of mails): give one")
        if self.email is not None and self.steps is not None:
            raise ValueError("a trigger has `email:` (one mail) or `steps:` (each step its own email), not both")
        if self.exit_when is not None and self.steps is None:
            raise ValueError("exit_when ends a journey early: it needs `steps:`")
        if "step_expires_after" in self.model_fields_set and self.steps is None:
            raise ValueError("step_expires_after is about a journey's steps: it needs `steps:`")
        return self

    @property
    def salt(self) -> str:
        """What the holdout hash mixes in: stated in the file, or the trigger's name."""
        return self.holdout_salt or self.name

    @property
    def journey(self) -> Journey | None:
        """The journey the file states, or None for one mail."""
        if self.steps is None:
            return None
        return Journey.model_construct(steps=self.steps, exit_when=list(self.exit_when or ()))

    def mails(self) -> list[tuple[tuple[str | int, ...], EmailSpec]]:
        """Every mail the file can send, with where the file states it: the one, or each
        step's, and each variant's as that variant sends it."""
        if self.email is not None:
            return [(("email",), self.email)]
        out: list[tuple[tuple[str | int, ...], EmailSpec]] = []
        for placed in walk(self.steps or []):
            step = placed.step
            out.append(((*placed.path, "email"), step.email))
            for number, variant in enumerate(step.experiment.variants if step.experiment else []):
                out.append(((*placed.path, "experiment", "variants", number), variant_email(step.email, variant)))
        return out
