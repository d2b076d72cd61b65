"""Lifecycle stage rules (``triggers/stages.yaml``): ordered, first match wins."""

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, field_validator

from flows.spec.common import MAX_AMOUNT, MAX_DAYS, MAX_ORDERS, Slug, StrictModel


class StageCondition(StrictModel):
    """All given bounds must hold. Days are counted back from the evaluation time."""

    min_orders: int | None = Field(default=None, ge=0, le=MAX_ORDERS)
    max_orders: int | None = Field(default=None, ge=0, le=MAX_ORDERS)
    min_lifetime_value: float | None = Field(default=None, ge=0, le=MAX_AMOUNT, allow_inf_nan=False)
    max_lifetime_value: float | None = Field(default=None, ge=0, le=MAX_AMOUNT, allow_inf_nan=False)
    min_days_since_last_order: int | None = Field(default=None, ge=0, le=MAX_DAYS)
    max_days_since_last_order: int | None = Field(default=None, ge=0, le=MAX_DAYS)
    min_days_since_first_order: int | None = Field(default=None, ge=0, le=MAX_DAYS)
    max_days_since_first_order: int | None = Field(default=None, ge=0, le=MAX_DAYS)


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value


class StageRule(StrictModel):
    name: Slug
    description: str = ""
    when: Annotated[list[StageCondition], BeforeValidator(_as_list)] = Field(
        default_factory=list,
        description="One condition, or a list of which any may match; omitted: matches everyone left.",
    )


class StageRules(StrictModel):
    stages: list[StageRule] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _ordered(cls, rules: list[StageRule]) -> list[StageRule]:
        names = [rule.name for rule in rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(duplicates)}")
        if rules[-1].when:
            raise ValueError(
                f"the last stage ({rules[-1].name!r}) must have no 'when' so that every customer gets a stage"
            )
        return rules

    @property
    def names(self) -> list[str]:
        return [rule.name for rule in self.stages]
