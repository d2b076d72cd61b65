"""A journey as its file states it: every field checked on its own, the tree as a whole
checked for what only it can tell, and every problem located at its line."""

from datetime import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.spec.journey import Journey, journey_problems, plans, walk
from flows.spec.problems import Problem
from flows.spec.project import problems_from
from flows.spec.yaml_source import load_yaml

STAGES = ["prospect", "new", "active", "loyal", "at_risk", "lapsed"]

ABANDONED_CART_SERIES = """\
steps:
  - name: reminder
    wait: 0s
    email: {template: abandoned_cart, subject: "Noch da?"}
  - name: nudge
    wait: 24h
    email: {template: abandoned_cart, subject: "Dein Warenkorb wartet"}
  - name: incentive
    wait: 48h
    at: "10:00"
    when: {min_cart_value: 80}
    email: {template: abandoned_cart, subject: "10 % auf deinen Warenkorb"}
exit_when:
  - ordered: true
  - unsubscribed: true
"""

WELCOME_SERIES = """\
steps:
  - name: day-0
    wait: 0s
    email: {template: welcome, subject: Willkommen}
  - name: day-3
    wait: 3d
    email: {template: welcome, subject: "Unsere Lieblinge"}
    experiment:
      metric: clicks
      pick_winner: {min_per_variant: 500, probability: 0.95}
      variants:
        - {name: a, subject: "Unsere Lieblinge"}
        - {name: b, subject: "Drei Dinge, die du kennen solltest"}
    branches:
      - when: {clicked: day-3}
        steps:
          - name: day-7-engaged
            wait: 4d
            email: {template: welcome, subject: "Schön, dass du da bist"}
      - else: true
        steps:
          - name: day-7-reminder
            wait: 4d
            when: {not_clicked: day-0}
            email: {template: welcome, subject: "Hast du schon gesehen?"}
exit_when:
  - ordered: true
  - stage_changed_to: loyal
"""


def check(tmp_path: Path, text: str) -> tuple[Journey | None, list[Problem]]:
    file = tmp_path / "journey.yaml"
    file.write_text(text, encoding="utf-8")
    doc = load_yaml(file)
    try:
        journey = Journey.model_validate(doc.data, context={"stages": STAGES})
    except ValidationError as exc:
        return None, problems_from(doc, exc, Journey)
    return journey, journey_problems(journey, doc)


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


@pytest.mark.parametrize("text", [ABANDONED_CART_SERIES, WELCOME_SERIES], ids=["abandoned cart", "welcome"])
def test_a_series_with_waits_conditions_branches_and_variants_validates(tmp_path: Path, text: str) -> None:
    journey, problems = check(tmp_path, text)
    assert problems == [] and journey is not None


def test_the_tree_is_walked_in_reading_order_with_the_path_each_step_is_reached_by(tmp_path: Path) -> None:
    journey, _ = check(tmp_path, WELCOME_SERIES)
    assert journey is not None
    assert [(spot.step.name, spot.before) for spot in walk(journey.steps)] == [
        ("day-0", ()), ("day-3", ("day-0",)), ("day-7-engaged", ("day-0", "day-3")),
        ("day-7-reminder", ("day-0", "day-3"))]
    assert journey.steps[0].wait.total_seconds() == 0  # day 0: at the entry
    series, _ = check(tmp_path, ABANDONED_CART_SERIES)
    assert series is not None
    incentive = series.steps[2]
    assert (incentive.name, incentive.at, incentive.wait.total_seconds()) == ("incentive", time(10, 0), 48 * 3600)


def test_a_step_name_used_twice_is_located_at_the_second_and_names_the_first(tmp_path: Path) -> None:
    text = ABANDONED_CART_SERIES.replace("name: nudge", "name: reminder")
    problem = only(check(tmp_path, text)[1])
    assert (problem.line, problem.field) == (5, "steps[1].name")
    assert "'reminder' is used twice (first at line 2)" in problem.message


def test_a_condition_naming_a_step_not_before_it_is_refused_with_the_steps_that_are(tmp_path: Path) -> None:
    later = WELCOME_SERIES.replace("when: {not_clicked: day-0}", "when: {not_clicked: day-7-engaged}")
    problem = only(check(tmp_path, later)[1])
    assert problem.field == "steps[1].branches[1].steps[0].when.not_clicked" and problem.line == 24
    assert "no earlier step named 'day-7-engaged' on this path; earlier steps: day-0, day-3" in problem.message
    typo = WELCOME_SERIES.replace("when: {clicked: day-3}", "when: {clicked: day-33}")
    problem = only(check(tmp_path, typo)[1])
    assert problem.field == "steps[1].branches[0].when.clicked" and problem.line == 15
    itself = ABANDONED_CART_SERIES.replace("when: {min_cart_value: 80}", "when: {clicked: incentive}")
    assert "no earlier step named 'incentive'" in only(check(tmp_path, itself)[1]).message


def test_branches_need_an_else_and_only_last(tmp_path: Path) -> None:
    no_else = WELCOME_SERIES.replace("      - else: true\n", "      - when: {stage: [new]}\n")
    problem = only(check(tmp_path, no_else)[1])
    assert problem.field == "steps[1].branches" and "no `else` branch" in problem.message
    first = WELCOME_SERIES.replace("      - when: {clicked: day-3}\n", "      - else: true\n", 1) \
        .replace("      - else: true\n        steps:\n          - name: day-7-reminder",
                 "      - when: {stage: [new]}\n        steps:\n          - name: day-7-reminder")
    messages = [p.message for p in check(tmp_path, first)[1]]
    assert any("`else` is branch 1 of 2" in m for m in messages) and any("no `else`" in m for m in messages)


@pytest.mark.parametrize(("before", "after", "field", "words"), [
    ("{name: a, subject: \"Unsere Lieblinge\"}", "{name: a}", "steps[1].experiment.variants[0]", "changes nothing"),
    ("metric: clicks", "metric: opens", "steps[1].experiment.metric", "clicks"),
    ("- ordered: true", "- {ordered: true, unsubscribed: true}", "exit_when[0]", "each exit goal is one of"),
    ("stage_changed_to: loyal", "stage_changed_to: loyl", "exit_when[1].stage_changed_to", "valid stages: prospect"),
    ("wait: 3d", "wait: soon", "steps[1].wait", "soon"),
    ("name: day-0\n    wait: 0s", "name: day-0\n    wait: 0s\n    at: \"25:00\"", "steps[0].at", "10:00"),
    ("name: day-0\n    wait: 0s", "name: day-0\n    wait: 0s\n    when: {}", "steps[0].when", "always holds"),
    ("name: day-0\n    wait: 0s", "name: day-0\n    wiat: 0s", "steps[0].wiat", "did you mean 'wait'"),
    ("- else: true\n", "- else: true\n        when: {stage: [new]}\n", "steps[1].branches[1]", "either `when:`"),
    ("wait: 3d", "wait: 400d", "steps[1].wait", "longer than 365d"),
])
def test_each_new_field_is_checked_and_located(tmp_path: Path, before: str, after: str, field: str,
                                               words: str) -> None:
    assert before in WELCOME_SERIES
    journey, problems = check(tmp_path, WELCOME_SERIES.replace(before, after, 1))
    assert journey is None or problems
    assert any(p.field.startswith(field) and words in p.message and p.line for p in problems), \
        [str(p) for p in problems]


def test_weights_that_add_up_to_nothing_are_refused(tmp_path: Path) -> None:
    zero = WELCOME_SERIES.replace("{name: a, subject", "{name: a, weight: 0, subject") \
        .replace("{name: b, subject", "{name: b, weight: 0, subject")
    problem = only(check(tmp_path, zero)[1])
    assert (problem.field, problem.line) == ("steps[1].experiment.variants", 11)
    assert "add up to nothing" in problem.message
    one_zero = WELCOME_SERIES.replace("{name: b, subject", "{name: b, weight: 0, subject")
    assert check(tmp_path, one_zero)[1] == []  # an arm switched off, the other takes everyone


def test_the_first_step_goes_at_the_entry(tmp_path: Path) -> None:
    text = ABANDONED_CART_SERIES.replace("wait: 0s", "wait: 2h", 1)
    problem = only(check(tmp_path, text)[1])
    assert (problem.line, problem.field) == (3, "steps[0].wait")
    assert "goes at the entry" in problem.message and "idle_for" in problem.message


def test_the_first_step_has_no_time_of_day(tmp_path: Path) -> None:
    text = ABANDONED_CART_SERIES.replace("    wait: 0s\n", "    wait: 0s\n    at: \"10:00\"\n", 1)
    problem = only(check(tmp_path, text)[1])
    assert (problem.line, problem.field) == (4, "steps[0].at")


def test_a_step_after_a_branching_step_is_refused(tmp_path: Path) -> None:
    text = WELCOME_SERIES.replace("exit_when:", """  - name: day-10
    wait: 3d
    email: {template: welcome, subject: Hallo}
exit_when:""")
    problem = only(check(tmp_path, text)[1])
    assert problem.field == "steps[2]" and "day-3" in problem.message and "inside the branches" in problem.message
    assert problem.line == text.splitlines().index("  - name: day-10") + 1


def test_plans_name_the_row_each_step_follows_and_the_branch_it_opens(tmp_path: Path) -> None:
    journey, _ = check(tmp_path, WELCOME_SERIES)
    assert journey is not None
    by_name = {plan.name: plan for plan in plans(journey)}
    assert list(by_name) == ["day-0", "day-3", "day-7-engaged", "day-7-reminder"]
    assert by_name["day-0"].first and by_name["day-0"].previous is None
    assert by_name["day-3"].previous == "day-0" and not by_name["day-3"].opens_branch
    engaged, reminder = by_name["day-7-engaged"], by_name["day-7-reminder"]
    assert engaged.previous == reminder.previous == "day-3"
    assert engaged.branch is not None and engaged.branch.clicked == "day-3" and engaged.passed_over == ()
    assert reminder.branch is None and reminder.passed_over == (engaged.branch,)
    assert engaged.rivals == ("day-7-reminder",) and reminder.rivals == ("day-7-engaged",)
    assert {plan.first_step for plan in by_name.values()} == {"day-0"}
    assert [goal.model_dump(exclude_none=True) for goal in engaged.exits] == [{"ordered": True},
                                                                             {"stage_changed_to": "loyal"}]
    assert by_name["day-3"].variant_weights() == [("a", 1.0), ("b", 1.0)]


PROJECT_SERIES = """\
name: cart-series
description: The abandoned-cart series.
kind: abandoned_cart
idle_for: 2h
schedule: {cron: "*/15 * * * *", timezone: Europe/Berlin}
reentry: 1d
steps:
  - name: reminder
    wait: 0s
    email: {template: abandoned_cart, subject: {de: "Noch da?", en: "Still there?"}}
  - name: nudge
    wait: 22h
    email: {template: abandoned_cart, subject: {de: "Dein Warenkorb", en: "Your cart"}}
    experiment:
      metric: clicks
      variants:
        - {name: a, subject: {de: "A", en: "A"}}
        - {name: b, subject: {de: "{{ customer.first_name | nosuchfilter }}", en: "B"}}
exit_when:
  - ordered: true
"""


def load_series(project_dir: Path, text: str):  # type: ignore[no-untyped-def]
    from flows.spec.project import load_project

    (project_dir / "triggers" / "cart_series.yaml").write_text(text, encoding="utf-8")
    return load_project(project_dir / "triggers", project_dir / "templates")


def test_every_variant_is_test_rendered_and_its_failure_located(project_dir: Path) -> None:
    project = load_series(project_dir, PROJECT_SERIES)
    problems = [p for p in project.problems if p.file.name == "cart_series.yaml"]
    assert len(problems) == 1, [str(p) for p in problems]
    (problem,) = problems
    line = PROJECT_SERIES.splitlines().index(
        '        - {name: b, subject: {de: "{{ customer.first_name | nosuchfilter }}", en: "B"}}') + 1
    assert problem.field == "steps[1].experiment.variants[1].subject.de" and problem.line == line
    assert "nosuchfilter" in problem.message


def test_a_steps_unknown_template_is_located_at_that_step(project_dir: Path) -> None:
    text = PROJECT_SERIES.replace('{name: b, subject: {de: "{{ customer.first_name | nosuchfilter }}", en: "B"}}',
                                  '{name: b, subject: {de: "B", en: "B"}}')
    text = text.replace("    email: {template: abandoned_cart, subject: {de: \"Dein Warenkorb\"",
                        "    email: {template: abandoned_carts, subject: {de: \"Dein Warenkorb\"")
    problems = [p for p in load_series(project_dir, text).problems if p.file.name == "cart_series.yaml"]
    (problem,) = problems
    assert problem.field == "steps[1].email.template" and "no folder templates/abandoned_carts/" in problem.message
    assert problem.line == text.splitlines().index("  - name: nudge") + 3


def test_the_tree_is_checked_when_the_project_loads(project_dir: Path) -> None:
    text = PROJECT_SERIES.replace("  - name: nudge", "  - name: reminder")
    project = load_series(project_dir, text)
    (problem,) = [p for p in project.problems if p.file.name == "cart_series.yaml"]
    assert problem.field == "steps[1].name" and "used twice" in problem.message
    assert "cart-series" not in project.triggers


def test_a_valid_series_loads_as_a_journey(project_dir: Path) -> None:
    text = PROJECT_SERIES.replace("{{ customer.first_name | nosuchfilter }}", "{{ customer.first_name }}")
    project = load_series(project_dir, text)
    assert [p for p in project.problems if p.file.name == "cart_series.yaml"] == []
    journey = project.triggers["cart-series"].journey
    assert journey is not None and [step.name for step in journey.steps] == ["reminder", "nudge"]
    assert project.triggers["cart-series"].email is None


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.replace("steps:\n", "email: {template: abandoned_cart, subject: Hi}\nsteps:\n"), "not both"),
    (lambda t: t[:t.index("steps:")], "give one"),
    (lambda t: t.replace("kind: abandoned_cart", "kind: complaint").replace("idle_for: 2h\n", ""),
     "service mail is one mail, never a journey"),
])
def test_one_mail_or_steps(project_dir: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    project = load_series(project_dir, change(PROJECT_SERIES.replace("{{ customer.first_name | nosuchfilter }}",
                                                                     "B")))
    assert any(message in p.message for p in project.problems if p.file.name == "cart_series.yaml"), \
        [str(p) for p in project.problems]
NPS = """\
steps:
  - name: question
    wait: 0s
    email: {template: nps_question, subject: "Wie war's?"}
  - name: follow-up
    wait: 2d
    when:
      event_since_entry: {name: NPS Answered, property: score, at_most: 6}
    email: {template: nps_follow_up, subject: "Das tut uns leid"}
"""


def test_an_event_condition_is_a_name_or_a_name_with_a_bounded_property(tmp_path: Path) -> None:
    journey, problems = check(tmp_path, NPS)
    assert problems == [] and journey is not None
    when = journey.steps[1].when
    assert when is not None and when.event_since_entry is not None
    assert (when.event_since_entry.name, when.event_since_entry.property, when.event_since_entry.at_least,
            when.event_since_entry.at_most) == ("NPS Answered", "score", None, 6)
    plain, problems = check(tmp_path, NPS.replace("{name: NPS Answered, property: score, at_most: 6}",
                                                  "NPS Detractor"))
    assert problems == [] and plain is not None and plain.steps[1].when is not None
    assert plain.steps[1].when.event_since_entry is not None
    assert plain.steps[1].when.event_since_entry.model_dump(exclude_none=True) == {"name": "NPS Detractor"}


@pytest.mark.parametrize(("condition", "words"), [
    ("{name: NPS Answered, property: score}", "without a bound"),
    ("{name: NPS Answered, at_most: 6}", "name it"),
    ("{name: NPS Answered, property: score, at_least: 7, at_most: 6}", "at_least 7 is above at_most 6"),
    ("{name: NPS Answered, property: \"score'; --\", at_most: 6}", "pattern"),
    ("{name: NPS Answered, property: score, at_most: .nan}", "finite"),
    ("{name: NPS Answered, propety: score, at_most: 6}", "did you mean 'property'"),
    ("{name: '', property: score, at_most: 6}", "at least 1 character"),
])
def test_an_event_condition_is_checked_and_located(tmp_path: Path, condition: str, words: str) -> None:
    journey, problems = check(tmp_path, NPS.replace("{name: NPS Answered, property: score, at_most: 6}", condition))
    assert journey is None
    problem = only(problems)
    assert problem.field.startswith("steps[1].when.event_since_entry") and problem.line == 8, str(problem)
    assert words in problem.message, str(problem)
