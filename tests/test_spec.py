"""Trigger files: every mistake is reported with file, line, field and the valid choices."""

from pathlib import Path
from textwrap import dedent

import pytest

from flows.spec.problems import SpecError
from flows.spec.project import load_project

VALID = dedent("""\
    name: cart-reminder
    description: Remind shoppers of their cart.
    kind: abandoned_cart
    idle_for: 2h
    schedule:
      cron: "*/15 * * * *"
      timezone: Europe/Berlin
    audience:
      stages: [new, active]
    email:
      template: abandoned_cart
      subject: "Dein Warenkorb"
    reentry: 1d
    """)


def load(project_dir: Path, text: str, file: str = "broken.yaml"):
    (project_dir / "triggers" / file).write_text(text, encoding="utf-8")
    return load_project(project_dir / "triggers", project_dir / "templates")


def test_shipped_triggers_and_templates_are_valid(project_dir: Path) -> None:
    project = load_project(project_dir / "triggers", project_dir / "templates")
    assert project.problems == []
    assert {t.kind for t in project.triggers.values()} == {
        "abandoned_cart", "inactivity", "onboarding", "complaint", "campaign", "consent_confirmation"}


def test_a_valid_file_loads_with_its_parameters(project_dir: Path) -> None:
    project = load(project_dir, VALID)
    spec = project.triggers["cart-reminder"]
    assert spec.idle_for.total_seconds() == 7200
    assert spec.reentry.mode == "cooldown" and spec.reentry.cooldown.days == 1
    assert spec.email.subject_for("en") == "Dein Warenkorb"


# (replace this line of VALID, with this one) → (line, field, fragment of the message)
CASES = [
    ("idle_for: 2h", "idle_fro: 2h", 4, "idle_fro", "did you mean 'idle_for'?"),
    ("idle_for: 2h", "idle_for: two hours", 4, "idle_for", "a duration such as 45m, 2h"),
    ("kind: abandoned_cart", "kind: abandoned", 3, "kind", "valid kinds: abandoned_cart, inactivity"),
    ('  cron: "*/15 * * * *"', '  cron: "*/15 * *"', 6, "schedule.cron", "expected five fields"),
    ("  timezone: Europe/Berlin", "  timezone: Berlin", 7, "schedule.timezone", "unknown time zone 'Berlin'"),
    ("  stages: [new, active]", "  stages: [new, actve]", 9, "audience.stages", "valid stages: prospect, lapsed"),
    ("  template: abandoned_cart", "  template: abandonned", 11, "email.template", "valid templates: abandoned_cart"),
    ('  subject: "Dein Warenkorb"', '  subject: "{{ customer.first_name "', 12, "email.subject", "not a valid Jinja"),
    ("reentry: 1d", "reentry: sometimes", 13, "reentry", "expected once, every_occurrence or a cool-down"),
    ("name: cart-reminder", "name: Cart Reminder!", 1, "name", "should match pattern"),
    ("description: Remind shoppers of their cart.", "", 1, "description", "required field is missing"),
    ("audience:", "audience:\n  max_orderz: 3", 9, "audience.max_orderz", "did you mean 'max_orders'?"),
]


@pytest.mark.parametrize(("old", "new", "line", "field", "fragment"), CASES, ids=[c[1] or "missing" for c in CASES])
def test_invalid_trigger_file_names_file_line_and_field(project_dir: Path, old: str, new: str, line: int,
                                                        field: str, fragment: str) -> None:
    text = VALID.replace(old + "\n", new + "\n" if new else "", 1)
    assert text != VALID
    project = load(project_dir, text)
    messages = [str(p) for p in project.problems]
    expected = f"broken.yaml:{line}: {field}: "
    assert any(expected in m and fragment in m for m in messages), messages
    assert "cart-reminder" not in project.triggers


def test_duplicate_keys_cite_both_lines(project_dir: Path) -> None:
    project = load(project_dir, VALID + "idle_for: 3h\n")
    assert any("broken.yaml:14: idle_for: duplicate key (first defined on line 4)" in str(p) for p in project.problems)


def test_yaml_syntax_errors_have_a_line(project_dir: Path) -> None:
    project = load(project_dir, VALID.replace("audience:\n", "audience: [\n"))
    assert any(p.file.name == "broken.yaml" and p.line and "invalid YAML" in p.message for p in project.problems)


def test_a_trigger_whose_file_yaml_cannot_parse_is_named_by_that_error(project_dir: Path) -> None:
    project = load(project_dir, VALID.replace("audience:\n", "audience: [\n"))
    with pytest.raises(SpecError, match=r"broken.yaml:\d+: invalid YAML"):
        project.trigger("cart-reminder")  # its name line survived the broken syntax


def test_all_problems_of_all_files_are_reported_at_once_and_healthy_triggers_survive(project_dir: Path) -> None:
    (project_dir / "triggers" / "a.yaml").write_text(VALID.replace("idle_for: 2h", "idle_for: soon"))
    (project_dir / "triggers" / "b.yaml").write_text(VALID.replace("kind: abandoned_cart", "kind: nope"))
    project = load_project(project_dir / "triggers", project_dir / "templates")
    assert {p.file.name for p in project.problems} == {"a.yaml", "b.yaml"}
    assert "winback-lapsed" in project.triggers and "complaint-ack" in project.triggers


def test_two_files_may_not_share_a_trigger_name(project_dir: Path) -> None:
    project = load(project_dir, VALID.replace("cart-reminder", "abandoned-cart"))
    assert any("already used by" in p.message for p in project.problems)


def test_stage_rules_need_a_catch_all_last_stage(project_dir: Path) -> None:
    stages = project_dir / "triggers" / "stages.yaml"
    stages.write_text(stages.read_text() + "    when: {min_orders: 1}\n")
    project = load_project(project_dir / "triggers", project_dir / "templates")
    assert any(p.file.name == "stages.yaml" and "must have no 'when'" in p.message for p in project.problems)


def test_a_template_error_names_the_template_file_and_line(project_dir: Path) -> None:
    template = project_dir / "templates" / "winback" / "default.en.html.j2"
    template.write_text('{% extends "_layout/base.html.j2" %}\n{% block content %}\n<p>{{ customer.frist_name }}</p>\n{% endblock %}\n')
    project = load_project(project_dir / "triggers", project_dir / "templates")
    [problem] = [p for p in project.problems if p.file.name == "default.en.html.j2"]
    assert problem.line == 3
    assert "did you mean 'first_name'?" in problem.message
    assert "winback-lapsed" not in project.triggers


def test_a_template_that_fails_only_for_prospects_is_caught_before_any_send(project_dir: Path) -> None:
    # Prospects have no order: `order.total_cents` works in a quick test but fails for them.
    template = project_dir / "templates" / "onboarding_tips" / "default.de.html.j2"
    template.write_text('{% extends "_layout/base.html.j2" %}{% block content %}{{ order.total_cents }}{% endblock %}')
    project = load_project(project_dir / "triggers", project_dir / "templates")
    assert any("stage prospect" in p.message and p.file.name == "default.de.html.j2" for p in project.problems)


def test_template_syntax_errors_are_reported_even_in_unused_templates(project_dir: Path) -> None:
    (project_dir / "templates" / "unused").mkdir()
    (project_dir / "templates" / "unused" / "default.html.j2").write_text("line one\n{% if %}\n")
    project = load_project(project_dir / "triggers", project_dir / "templates")
    assert any(p.file.name == "default.html.j2" and p.line == 2 for p in project.problems)


# -- languages: one language per mail ------------------------------------------------

BILINGUAL = VALID.replace('  subject: "Dein Warenkorb"', '  subject:\n    de: "Dein Warenkorb"\n    en: "Your cart"')


def test_a_targeted_language_without_a_subject_is_a_warning_with_file_line_and_field(project_dir: Path) -> None:
    text = BILINGUAL.replace("  stages: [new, active]\n", "  stages: [new, active]\n  locales: [de, en, fr]\n")
    project = load(project_dir, text)
    assert project.problems == [] and "cart-reminder" in project.triggers  # a warning rejects nothing
    [warning] = project.warnings
    assert warning.severity == "warning"
    assert str(warning).endswith("/broken.yaml:13: email.subject: language 'fr' is targeted (audience.locales "
                                 "(line 10)) but has no subject for 'fr'; fr customers get the whole mail in 'en'")


def test_a_language_with_templates_but_no_subject_is_a_warning(project_dir: Path) -> None:
    (project_dir / "templates" / "abandoned_cart" / "default.fr.html.j2").write_text("<p>Bonjour</p>")
    project = load(project_dir, BILINGUAL)
    messages = [str(w).removeprefix(f"{w.file.parent}/") for w in project.warnings if w.file.name == "broken.yaml"]
    assert messages == [("broken.yaml:12: email.subject: language 'fr' is targeted (templates/abandoned_cart/ has fr "
                         "files) but has no subject for 'fr'; fr customers get the whole mail in 'en'")]


def test_a_subject_without_templates_for_its_language_is_a_warning(project_dir: Path) -> None:
    project = load(project_dir, BILINGUAL.replace('    en: "Your cart"', '    en: "Your cart"\n    fr: "Votre panier"'))
    [warning] = [w for w in project.warnings if w.file.name == "broken.yaml"]
    assert warning.line == 11 and warning.field == "email.template"
    assert "no templates/abandoned_cart/default.fr.html.j2" in warning.message
    assert project.problems == []


def test_no_subject_for_the_default_language_is_an_error_when_anyone_can_get_it(project_dir: Path) -> None:
    german_only = VALID.replace('  subject: "Dein Warenkorb"', '  subject:\n    de: "Dein Warenkorb"')
    project = load(project_dir, german_only)
    assert any("/broken.yaml:12: email.subject: no subject for the default language 'en'" in str(p)
               for p in project.problems), project.problems
    assert "cart-reminder" not in project.triggers
    only_germans = german_only.replace("  stages: [new, active]\n", "  stages: [new, active]\n  locales: [de]\n")
    project = load(project_dir, only_germans)
    assert project.problems == [] and project.warnings == []
    assert "cart-reminder" in project.triggers


def test_the_shipped_project_has_no_language_warnings(project_dir: Path) -> None:
    assert load_project(project_dir / "triggers", project_dir / "templates").warnings == []
