"""A trigger's journey, as its file states it: steps with waits, conditions, branches and
variants, and the goals that end it early.

A journey is a tree that a reviewer reads top to bottom: each step waits after the one
before it (the first after the entry), may require conditions, sends one mail (or one of
its variants) and may then branch, first match wins, with an ``else``. ``exit_when``
goals are checked before every step. Step names are the journey's keys (each step's send
key extends the entry's with its name), so they are unique across the whole tree and
every reference to a step names one that comes before it.

The models check each field on its own; ``journey_problems`` checks what only the whole
tree can tell (a duplicate name, a reference to a step that is not before it, a branch
that can never be taken), each located at its line.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import time, timedelta
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from flows.clock import parse_duration
from flows.spec.common import (
    MAX_AMOUNT,
    MAX_ORDERS,
    EmailSpec,
    Slug,
    StrictModel,
    _localised,
    known_stages,
)
from flows.spec.problems import Problem, format_path
from flows.spec.yaml_source import YamlDocument

Path_ = tuple[str | int, ...]
MAX_STEPS = 20  # in the whole tree: a longer series is several journeys
MAX_VARIANTS = 8
MAX_WAIT_DAYS = 365


def _clock_time(value: Any) -> Any:
    """``"10:00"`` → 10:00. Only HH:MM, as the file's reader writes it."""
    if isinstance(value, str):
        hours, sep, minutes = value.partition(":")
        if (sep and len(minutes) == 2 and hours.isdigit() and minutes.isdigit() and len(hours) <= 2
                and int(hours) < 24 and int(minutes) < 60):
            return time(int(hours), int(minutes))
        raise ValueError(f"expected a time of day such as 10:00, got {value!r}")
    raise ValueError(f"expected a time of day in quotes, such as \"10:00\", got {value!r}")


ClockTime = Annotated[time, BeforeValidator(_clock_time)]


def _wait(value: Any) -> Any:
    """A duration such as ``2h`` or ``3d``; ``0s`` too: a first step that goes at the entry."""
    if isinstance(value, str) and value.strip() in ("0", "0s"):
        return timedelta(0)
    wait = parse_duration(value)
    if wait > timedelta(days=MAX_WAIT_DAYS):
        raise ValueError(f"a wait of {value!r} is longer than {MAX_WAIT_DAYS}d: split the journey")
    return wait


Wait = Annotated[timedelta, BeforeValidator(_wait)]


def _stages_known(value: list[str] | None, info: ValidationInfo) -> list[str] | None:
    choices = known_stages(info)
    if value is not None and choices is not None:
        unknown = [name for name in value if name not in choices]
        if unknown:
            raise ValueError(f"unknown stage{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}; valid stages: {', '.join(choices)}")
    return value


class EventCondition(StrictModel):
    """A named event, optionally only with a numeric property within bounds, such as
    ``{name: NPS Answered, property: score, at_most: 6}``. A property that is missing or not
    a number (``"7"`` in quotes too) does not match."""

    name: str = Field(min_length=1, max_length=255)
    property: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$",
                                 description="A key of the event's properties.")
    at_least: float | None = Field(default=None, ge=-MAX_AMOUNT, le=MAX_AMOUNT, allow_inf_nan=False)
    at_most: float | None = Field(default=None, ge=-MAX_AMOUNT, le=MAX_AMOUNT, allow_inf_nan=False)

    @model_validator(mode="after")
    def _bounds_with_property(self) -> "EventCondition":
        bounded = self.at_least is not None or self.at_most is not None
        if self.property is not None and not bounded:
            raise ValueError(f"property {self.property!r} without a bound: add at_least, at_most or both")
        if bounded and self.property is None:
            raise ValueError("at_least and at_most bound a property: name it, such as property: score")
        if self.at_least is not None and self.at_most is not None and self.at_least > self.at_most:
            raise ValueError(f"at_least {self.at_least:g} is above at_most {self.at_most:g}")
        return self


def _event_condition(value: Any) -> Any:
    """An event's name alone is the condition on that event, whatever its properties."""
    return {"name": value} if isinstance(value, str) else value


EventWhen = Annotated[EventCondition, BeforeValidator(_event_condition)]


class When(StrictModel):
    """Conditions checked when a step is due; all must hold. ``clicked`` and ``not_clicked``
    name an earlier step (its mail clicked by a person, not a scanner). ``event_since_entry``
    names an event, or states one with a bound on a numeric property."""

    stage: list[str] | None = Field(default=None, min_length=1, description="The customer's stage is one of these.")
    min_cart_value: float | None = Field(default=None, ge=0, le=MAX_AMOUNT, allow_inf_nan=False,
                                         description="The entry's cart is worth at least this (currency units).")
    max_cart_value: float | None = Field(default=None, ge=0, le=MAX_AMOUNT, allow_inf_nan=False)
    min_cart_items: int | None = Field(default=None, ge=1, le=MAX_ORDERS)
    ordered_since_entry: bool | None = Field(default=None, description="true: has ordered since entering; "
                                                                       "false: has not.")
    clicked: Slug | None = Field(default=None, description="A person clicked this earlier step's mail.")
    not_clicked: Slug | None = Field(default=None, description="Nobody clicked this earlier step's mail (yet).")
    event_since_entry: EventWhen | None = Field(
        default=None, description="NAME, or {name, property, at_least, at_most}: such an event since entering.")
    no_event_since_entry: EventWhen | None = Field(default=None, description="No such event since entering.")
    customer: dict[Literal["locale", "timezone", "consent_source"], str] | None = Field(
        default=None, min_length=1, description="The customer's own fields equal these.")

    _stage = field_validator("stage")(_stages_known)

    @model_validator(mode="after")
    def _something(self) -> "When":
        if not self.model_fields_set:
            raise ValueError("an empty condition always holds: state one (stage, ordered_since_entry, clicked, …) "
                             "or leave `when` out")
        if self.min_cart_value is not None and self.max_cart_value is not None \
                and self.min_cart_value > self.max_cart_value:
            raise ValueError(f"min_cart_value {self.min_cart_value} is above max_cart_value {self.max_cart_value}")
        return self

    def steps_named(self) -> Iterator[tuple[str, str]]:
        """(field, step name) for each reference to a step."""
        for name in ("clicked", "not_clicked"):
            if (step := getattr(self, name)) is not None:
                yield name, step


class ExitGoal(StrictModel):
    """One goal that ends a customer's journey before any later step: exactly one of these."""

    ordered: Literal[True] | None = Field(default=None, description="Placed an order since entering.")
    event: str | None = Field(default=None, min_length=1, max_length=255, description="Sent this event since entering.")
    stage_changed_to: str | None = Field(default=None, description="Reached this stage.")
    unsubscribed: Literal[True] | None = None

    @field_validator("stage_changed_to")
    @classmethod
    def _stage(cls, value: str | None, info: ValidationInfo) -> str | None:
        _stages_known(None if value is None else [value], info)
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> "ExitGoal":
        if len(self.model_fields_set) != 1:
            raise ValueError("each exit goal is one of: ordered: true, event: NAME, stage_changed_to: STAGE, "
                             "unsubscribed: true")
        return self


class PickWinner(StrictModel):
    """When the experiment's winner takes all later traffic (``flows.analysis.experiments``)."""

    min_per_variant: int = Field(default=500, ge=100, le=1_000_000)
    probability: float = Field(default=0.95, ge=0.8, lt=1, allow_inf_nan=False)


class Variant(StrictModel):
    """One arm of a step's experiment: its own subject, template or both; the rest is the step's."""

    name: Slug
    weight: float = Field(default=1, ge=0, le=1000, allow_inf_nan=False)
    template: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")
    subject: Annotated[dict[str, str], BeforeValidator(_localised)] | None = None

    @model_validator(mode="after")
    def _differs(self) -> "Variant":
        if self.template is None and self.subject is None:
            raise ValueError(f"variant {self.name!r} changes nothing: give it a subject, a template or both")
        return self


def variant_email(email: EmailSpec, variant: Variant) -> EmailSpec:
    """A step's mail as one variant sends it: its own subject, template or both."""
    changes: dict[str, Any] = {}
    if variant.template is not None:
        changes["template"] = variant.template
    if variant.subject is not None:
        changes["subject"] = variant.subject
    return email.model_copy(update=changes)


class Experiment(StrictModel):
    variants: list[Variant] = Field(min_length=2, max_length=MAX_VARIANTS)
    metric: Literal["clicks", "conversions"] = Field(
        description="clicks: a person's click rate; conversions: orders attributed to the mail.")
    pick_winner: PickWinner | None = None
    salt: str | None = Field(default=None, min_length=1, max_length=64,
                             description="Mixed into the assignment's hash; a new salt draws new groups.")

    @field_validator("variants")
    @classmethod
    def _weights(cls, value: list[Variant]) -> list[Variant]:
        if sum(variant.weight for variant in value) <= 0:
            raise ValueError("the variants' weights add up to nothing: give at least one a positive weight")
        return value


class Branch(StrictModel):
    """``when`` the customer is as stated, these steps follow (``else: true`` for everyone left)."""

    when: When | None = None
    else_: Literal[True] | None = Field(default=None, alias="else")
    steps: list["Step"] = Field(min_length=1)

    @model_validator(mode="after")
    def _when_or_else(self) -> "Branch":
        if (self.when is None) == (self.else_ is None):
            raise ValueError("a branch has either `when:` (its conditions) or `else: true` (everyone left)")
        return self


class Step(StrictModel):
    name: Slug = Field(description="Unique in the journey: it names the step's send keys and its reports.")
    wait: Wait = Field(description="After the previous step's send (the first step: after the entry).")
    at: ClockTime | None = Field(default=None, description='The first such time of day, in the customer\'s time '
                                                           'zone, once the wait is over, e.g. "10:00".')
    when: When | None = None
    email: EmailSpec
    experiment: Experiment | None = None
    branches: list[Branch] | None = Field(default=None, min_length=2)


class Journey(StrictModel):
    """What a trigger file with ``steps:`` adds to its entry (the trigger's kind and parameters)."""

    steps: list[Step] = Field(min_length=1)
    exit_when: list[ExitGoal] = Field(default_factory=list)


@dataclass(frozen=True)
class Placed:
    """A step where the tree has it: its path in the file and the steps before it."""

    step: Step
    path: Path_
    before: tuple[str, ...]


def walk(steps: list[Step], path: Path_ = ("steps",), before: tuple[str, ...] = ()) -> Iterator[Placed]:
    """Every step of the tree in reading order, with the steps a customer passed to reach it."""
    for index, step in enumerate(steps):
        here = (*path, index)
        yield Placed(step, here, before)
        before = (*before, step.name)
        for number, branch in enumerate(step.branches or []):
            yield from walk(branch.steps, (*here, "branches", number, "steps"), before)


@dataclass(frozen=True)
class StepPlan:
    """One step as a run decides it: whose row it follows, and what its customers must meet.

    ``previous`` is the step whose row (sent, held out or passed) this step waits after;
    None for the journey's first step, which goes at the entry and whose key is the entry's
    own. A step that opens a branch is taken only if its branch's condition holds
    (``branch``; None for ``else``) and no earlier branch's does (``passed_over``), and never
    after a sibling branch was taken (``rivals``: those branches' first steps).
    """

    step: Step
    first_step: str
    previous: str | None
    branch: When | None = None
    opens_branch: bool = False
    passed_over: tuple[When, ...] = ()
    rivals: tuple[str, ...] = ()
    exits: tuple[ExitGoal, ...] = ()
    later: tuple[str, ...] = ()  # the steps after this one on its paths: who reached one is past it

    @property
    def name(self) -> str:
        return self.step.name

    @property
    def first(self) -> bool:
        return self.previous is None

    def variant_weights(self) -> list[tuple[str, float]]:
        experiment = self.step.experiment
        return [(v.name, v.weight) for v in experiment.variants] if experiment else []


def plans(journey: Journey) -> list[StepPlan]:
    """Every step of the tree in reading order, as the runs decide them (``StepPlan``)."""
    exits = tuple(journey.exit_when)
    first = journey.steps[0].name
    out: list[StepPlan] = []

    def after(steps: list[Step]) -> tuple[str, ...]:
        return tuple(placed.step.name for placed in walk(steps))

    def visit(steps: list[Step], previous: str | None, opening: dict[str, Any] | None) -> None:
        for index, step in enumerate(steps):
            extra = opening if index == 0 and opening is not None else {}
            later = after(steps[index + 1:]) + after([s for b in step.branches or [] for s in b.steps])
            out.append(StepPlan(step, first, previous, exits=exits, later=later, **extra))
            previous = step.name
            branches = step.branches or []
            for number, branch in enumerate(branches):
                rivals = tuple(other.steps[0].name for other in branches if other is not branch)
                visit(branch.steps, step.name, {
                    "branch": branch.when, "opens_branch": True, "rivals": rivals,
                    "passed_over": tuple(b.when for b in branches[:number] if b.when is not None)})

    visit(journey.steps, None, None)
    return out


def journey_problems(journey: Journey, doc: YamlDocument, path: Path_ = ()) -> list[Problem]:
    """What the tree as a whole gets wrong, each at its line (``path``: where the journey's
    fields are in the file, the top level of a trigger file)."""
    problems: list[Problem] = []
    first: dict[str, Path_] = {}
    placed = list(walk(journey.steps, (*path, "steps")))
    if len(placed) > MAX_STEPS:
        problems.append(doc.problem((*path, "steps"), "steps",
                                    f"{len(placed)} steps; at most {MAX_STEPS} in one journey"))
    opening = journey.steps[0]
    at = (*path, "steps", 0)
    if opening.wait:
        problems.append(doc.problem((*at, "wait"), f"{format_path(at)}.wait",
                                    "the first step goes at the entry: expected wait: 0s (the kind's own "
                                    "parameters, such as idle_for or days_after_signup, say when customers enter)"))
    if opening.at is not None:
        problems.append(doc.problem((*at, "at"), f"{format_path(at)}.at",
                                    "the first step goes at the entry: `at` applies to later steps (the policy's "
                                    "quiet hours hold the first)"))
    if opening.when is not None and any(True for _ in opening.when.steps_named()):
        problems.append(doc.problem((*at, "when"), f"{format_path(at)}.when",
                                    "the first step has no earlier step to have clicked"))
    for spot in placed:
        name = spot.step.name
        where = format_path(spot.path)
        if name in first:
            line = doc.line_of((*first[name], "name"))
            problems.append(doc.problem((*spot.path, "name"), f"{where}.name",
                                        f"step name {name!r} is used twice (first at line {line}); each step's "
                                        "name must be unique, as it names the step's send keys"))
        else:
            first[name] = spot.path
        conditions: list[tuple[When, Path_, tuple[str, ...]]] = []  # and the steps it may name
        if spot.step.when is not None:
            conditions.append((spot.step.when, (*spot.path, "when"), spot.before))
        for number, branch in enumerate(spot.step.branches or []):
            if branch.when is not None:  # taken after its step's send: that step is before it too
                conditions.append((branch.when, (*spot.path, "branches", number, "when"), (*spot.before, name)))
        for when, at, reachable in conditions:
            for field, step_name in when.steps_named():
                if step_name not in reachable:
                    label = format_path((*at, field))
                    known = ", ".join(reachable) or "none"
                    problems.append(doc.problem((*at, field), label,
                                                f"no earlier step named {step_name!r} on this path; "
                                                f"earlier steps: {known}"))
        problems.extend(_branch_problems(spot, doc))
    problems.extend(_after_branching(journey.steps, (*path, "steps"), doc))
    return problems


def _after_branching(steps: list[Step], path: Path_, doc: YamlDocument) -> list[Problem]:
    """A step after a branching one in the same list would follow every path at once: refused."""
    problems = []
    for index, step in enumerate(steps):
        if step.branches and index < len(steps) - 1:
            at = (*path, index + 1)
            problems.append(doc.problem(at, format_path(at),
                                        f"a step after {step.name!r}, which branches: put it inside the branches, "
                                        "where each path goes on"))
        for number, branch in enumerate(step.branches or []):
            problems.extend(_after_branching(branch.steps, (*path, index, "branches", number, "steps"), doc))
    return problems


def _branch_problems(spot: Placed, doc: YamlDocument) -> list[Problem]:
    """Branches are tried in order: an ``else`` anywhere but last hides the ones after it, and
    without an ``else`` the customers no branch takes would be stranded: both are refused."""
    branches = spot.step.branches or []
    problems = []
    for number, branch in enumerate(branches):
        if branch.else_ and number != len(branches) - 1:
            at = (*spot.path, "branches", number)
            problems.append(doc.problem(at, format_path(at),
                                        f"`else` is branch {number + 1} of {len(branches)}: the branches after it "
                                        "can never be taken; put `else` last"))
    if branches and not branches[-1].else_:
        at = (*spot.path, "branches")
        problems.append(doc.problem(at, format_path(at),
                                    "no `else` branch: customers no branch matches would have no next step; end "
                                    "the list with `- else: true` and its steps"))
    return problems
