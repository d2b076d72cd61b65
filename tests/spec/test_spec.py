"""Trigger files: every mistake is reported with file, line, field and the valid choices."""

from pathlib import Path
from textwrap import dedent

import pytest

from flows.settings import Settings
from flows.spec.problems import SpecError
from flows.spec.project import load_project
from tests.support import FIXTURES
from tests.support.children import lifecycle

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
        "abandoned_cart", "inactivity", "onboarding", "complaint", "campaign", "consent_confirmation", "post_purchase"}


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
    # The mapping form must say as much as the short one: a cool-down needs its length, and only it has one.
    ("reentry: 1d", "reentry: {mode: cooldown}", 13, "reentry", "mode cooldown needs a cooldown"),
    ("reentry: 1d", "reentry: {mode: once, cooldown: 1d}", 13, "reentry", "only mode cooldown has a cooldown"),
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
    template.write_text('{% extends "_layout/base.html.j2" %}\n{% block content %}\n'
                        '<p>{{ customer.frist_name }}</p>\n{% endblock %}\n')
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


# -- hostile input: one broken file fails its own trigger, located, never the others ----

HOSTILE = FIXTURES / "spec_hostile"
HEALTHY = {"abandoned-cart", "complaint-ack", "onboarding-day-0", "post-purchase-nps", "referral-loyal",
           "winback-lapsed", "confirm-subscription"}


def hostile(project_dir: Path, fixture: str, target: str):
    """Put a hostile fixture at ``target`` (relative to the project) and load the project."""
    (project_dir / target).write_bytes((HOSTILE / fixture).read_bytes())
    return load_project(project_dir / "triggers", project_dir / "templates")


def test_a_yaml_alias_bomb_is_refused_located_and_the_other_triggers_load(project_dir: Path) -> None:
    assert (HOSTILE / "alias_bomb.yaml").stat().st_size < 1024
    project = hostile(project_dir, "alias_bomb.yaml", "triggers/bomb.yaml")
    [problem] = [p for p in project.problems if p.file.name == "bomb.yaml"]
    assert problem.line == 4 and "aliases" in problem.message and "at most" in problem.message, str(problem)
    assert HEALTHY | {"we-miss-you"} <= set(project.triggers)
    with pytest.raises(SpecError, match=r"bomb.yaml:4: "):
        project.trigger("alias-bomb")


def test_an_oversized_yaml_file_is_refused_located(project_dir: Path) -> None:
    (project_dir / "triggers" / "huge.yaml").write_text(VALID + "# padding\n" * 20_000)
    project = load_project(project_dir / "triggers", project_dir / "templates")
    [problem] = [p for p in project.problems if p.file.name == "huge.yaml"]
    assert "KiB" in problem.message and "at most" in problem.message, str(problem)
    assert set(project.triggers) >= HEALTHY


def test_an_astronomical_duration_is_refused_located(project_dir: Path) -> None:
    text = (project_dir / "triggers" / "inactivity.yaml").read_text().replace("inactive_for: 60d",
                                                                              "inactive_for: 1000000000d")
    project = load(project_dir, text, "inactivity.yaml")
    messages = [str(p) for p in project.problems]
    assert any("inactivity.yaml:5: inactive_for: " in m and "at most 3650d" in m for m in messages), messages
    assert set(project.triggers) >= HEALTHY and "we-miss-you" not in project.triggers


def test_a_latin1_trigger_file_is_named_and_the_others_load(project_dir: Path) -> None:
    project = hostile(project_dir, "latin1_trigger.yaml", "triggers/latin.yaml")
    [problem] = [p for p in project.problems if p.file.name == "latin.yaml"]
    assert problem.line == 2 and "not UTF-8" in problem.message and "0xe9" in problem.message, str(problem)
    assert HEALTHY | {"we-miss-you"} <= set(project.triggers)


def test_a_latin1_template_is_named_with_its_line_and_fails_only_its_trigger(project_dir: Path) -> None:
    project = hostile(project_dir, "latin1_template.html.j2", "templates/we_miss_you/default.en.html.j2")
    problems = [p for p in project.problems if p.file.name == "default.en.html.j2"]
    assert problems and all(p.line == 3 and "not UTF-8" in p.message for p in problems), problems
    assert "we_miss_you" in str(problems[0].file)
    assert "we-miss-you" not in project.triggers and set(project.triggers) >= HEALTHY


def test_a_list_as_a_yaml_key_is_refused_located(project_dir: Path) -> None:
    project = hostile(project_dir, "list_key.yaml", "triggers/list_key.yaml")
    [problem] = [p for p in project.problems if p.file.name == "list_key.yaml"]
    assert problem.line == 4 and "key" in problem.message, str(problem)
    assert HEALTHY | {"we-miss-you"} <= set(project.triggers)


def test_a_template_with_nested_range_loops_fails_its_own_trigger_located(project_dir: Path) -> None:
    project = hostile(project_dir, "nested_range.html.j2", "templates/we_miss_you/default.en.html.j2")
    problems = [p for p in project.problems if p.file.name == "default.en.html.j2"]
    assert problems and all(p.line == 4 and "budget" in p.message for p in problems), problems
    assert "we-miss-you" not in project.triggers and set(project.triggers) >= HEALTHY


def hostile_project(project_dir: Path) -> None:
    for fixture, target in [("alias_bomb.yaml", "triggers/bomb.yaml"), ("latin1_trigger.yaml", "triggers/latin.yaml"),
                            ("list_key.yaml", "triggers/list_key.yaml"),
                            ("nested_range.html.j2", "templates/we_miss_you/default.en.html.j2"),
                            ("latin1_template.html.j2", "templates/winback/default.de.html.j2")]:
        (project_dir / target).write_bytes((HOSTILE / fixture).read_bytes())
    referral = project_dir / "triggers" / "referral.yaml"
    referral.write_text(referral.read_text() + "send_window: 1000000000d\n")


def test_validate_reports_every_hostile_file_located_and_checks_the_rest(project_dir: Path, tmp_path: Path) -> None:
    hostile_project(project_dir)
    result = lifecycle("validate", "--triggers", str(project_dir / "triggers"),
                       "--templates", str(project_dir / "templates"), settings=store_only(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    out = " ".join(result.stderr.split())
    for located in ("bomb.yaml:4:", "latin.yaml:2:", "list_key.yaml:4:", "we_miss_you/default.en.html.j2:4:",
                    "winback/default.de.html.j2:3:", "referral.yaml:"):
        assert located in out, (located, result.stderr)
    assert "Traceback" not in result.stderr
    assert "5 trigger(s) are valid" in out, result.stderr  # cart, complaint, welcome, consent, NPS


def test_a_run_of_every_trigger_goes_ahead_beside_hostile_files(project_dir: Path, tmp_path: Path) -> None:
    hostile_project(project_dir)
    result = lifecycle("run", "--all", "--dry-run", "--now", "2026-03-16T09:00:00Z",
                       settings=store_only(tmp_path).model_copy(update={"triggers_dir": project_dir / "triggers",
                                                                        "templates_dir": project_dir / "templates"}))
    assert result.returncode == 1, result.stdout + result.stderr  # some files have problems: not all ran
    assert "Traceback" not in result.stderr, result.stderr
    for name in ("abandoned-cart", "complaint-ack", "onboarding-day-0", "confirm-subscription"):
        assert name in result.stdout, result.stdout


def store_only(tmp_path: Path) -> Settings:
    """The defaults, with a store of the test's own."""
    return Settings(database_url=f"sqlite:///{tmp_path / 'store.db'}")


# -- values that would make a trigger silently dead, or fail its run later -------------

def with_line(project_dir: Path, file: str, old: str, new: str) -> tuple[object, int]:
    path = project_dir / "triggers" / file
    text = path.read_text()
    text = text.replace(old, new, 1) if old in text else text + new + "\n"
    path.write_text(text)
    line = text.splitlines().index(new.splitlines()[-1]) + 1
    return load_project(project_dir / "triggers", project_dir / "templates"), line


ZERO = [
    ("onboarding_day_0.yaml", "onboarding-day-0", "catch_up: 0s", "catch_up"),
    ("complaint.yaml", "complaint-ack", "max_age: 0s", "max_age"),
    ("consent_confirmation.yaml", "confirm-subscription", "max_age: 0s", "max_age"),
    ("winback.yaml", "winback-lapsed", "send_window: 0s", "send_window"),
    ("winback.yaml", "winback-lapsed", "deferred_expires_after: 0s", "deferred_expires_after"),
    ("abandoned_cart.yaml", "abandoned-cart", "idle_for: 0m", "idle_for"),
    ("inactivity.yaml", "we-miss-you", "reentry: 0d", "reentry"),
]


@pytest.mark.parametrize(("file", "name", "line_text", "field"), ZERO, ids=[z[2] for z in ZERO])
def test_a_zero_duration_that_could_never_fire_is_refused_located(project_dir: Path, file: str, name: str,
                                                                    line_text: str, field: str) -> None:
    key = line_text.split(":")[0]
    text = (project_dir / "triggers" / file).read_text()
    old = next((line for line in text.splitlines() if line.startswith(key + ":")), "\0")
    project, line = with_line(project_dir, file, old, line_text)
    messages = [str(p) for p in project.problems]
    assert any(f"{file}:{line}: {field}: " in m and "longer than 0s" in m for m in messages), messages
    assert name not in project.triggers


def test_a_zero_frequency_cap_window_is_refused_located(project_dir: Path) -> None:
    policy = project_dir / "triggers" / "policy.yaml"
    text = policy.read_text()
    assert "per: 16h" in text
    policy.write_text(text.replace("per: 16h", "per: 0s", 1))
    project = load_project(project_dir / "triggers", project_dir / "templates")
    assert any(p.file.name == "policy.yaml" and p.field.endswith(".per") and "longer than 0s" in p.message
               for p in project.problems), project.problems


def test_inactive_for_beyond_the_bound_is_refused_located_not_at_run_time(project_dir: Path) -> None:
    project, line = with_line(project_dir, "inactivity.yaml", "inactive_for: 60d", "inactive_for: 999999d")
    messages = [str(p) for p in project.problems]
    assert any(f"inactivity.yaml:{line}: inactive_for: '999999d' is too long: at most 3650d" in m
               for m in messages), messages


@pytest.mark.parametrize(("condition", "fragment"), [
    ("min_days_since_last_order: 10000000", "less than or equal to 36500"),
    ("max_days_since_first_order: 999999999999", "less than or equal to 36500"),
    ("min_orders: 100000000000000000000", "less than or equal to 1000000"),
    ("min_lifetime_value: .inf", "finite number"),
])
def test_stage_rules_beyond_what_a_date_or_the_database_holds_are_refused_located(
        project_dir: Path, condition: str, fragment: str) -> None:
    stages = project_dir / "triggers" / "stages.yaml"
    text = stages.read_text()
    first_when = next(line for line in text.splitlines() if "when:" in line)
    indent = " " * (len(first_when) - len(first_when.lstrip()) + 2)
    stages.write_text(text.replace(first_when, f"{first_when.rstrip()}\n{indent}{condition}", 1)
                      if first_when.rstrip().endswith("when:") else text.replace(
                          first_when, first_when.replace("when: {", "when: {" + condition + ", "), 1))
    project = load_project(project_dir / "triggers", project_dir / "templates")
    assert any(p.file.name == "stages.yaml" and p.line and fragment in p.message for p in project.problems), \
        project.problems


def test_audience_bounds_beyond_what_the_database_holds_are_refused_located(project_dir: Path) -> None:
    project = load(project_dir, VALID.replace("audience:\n", "audience:\n  min_orders: 100000000000000000000\n"))
    assert any("broken.yaml:9: audience.min_orders: " in str(p) and "1000000" in str(p) for p in project.problems)


@pytest.mark.parametrize(("subject", "fragment"), [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}Hi", "over the render budget"),
    ("{{ 'x'.center(10**9) }}", "over the render budget"),
    ("{{ customer.nope }}", "has no attribute 'nope'"),
])
def test_a_subject_that_fails_its_test_render_names_the_trigger_file_and_line(project_dir: Path, subject: str,
                                                                              fragment: str) -> None:
    text = VALID.replace('  subject: "Dein Warenkorb"', f'  subject: "{subject}"')
    project = load(project_dir, text)
    problems = [p for p in project.problems if fragment in p.message]
    assert problems and all(p.file.name == "broken.yaml" and p.line == 12 and p.field == "email.subject"
                            for p in problems), [str(p) for p in project.problems]
    assert "cart-reminder" not in project.triggers


def test_a_localised_subject_that_fails_names_its_own_line(project_dir: Path) -> None:
    text = VALID.replace('  subject: "Dein Warenkorb"',
                         '  subject:\n    de: "Dein Warenkorb"\n    en: "{{ \'x\'.center(10**9) }}"')
    project = load(project_dir, text)
    problems = [p for p in project.problems if "render budget" in p.message]
    assert problems and all((p.file.name, p.line, p.field) == ("broken.yaml", 14, "email.subject.en")
                            for p in problems), [str(p) for p in project.problems]


@pytest.mark.parametrize("value", [
    "!!python/object/apply:os.system [id]",
    "!!python/object/apply:os.system\n    args: [id]",
    "!!python/tuple [1, 2]",
    "!!set {a: null}",
    "!!omap [a: 1]",
    "!custom [1]",
    "!custom {a: 1}",
    "!!python/name:os.system",
    "!!binary aGVsbG8=",
])
def test_a_non_standard_yaml_tag_is_refused_located(project_dir: Path, value: str) -> None:
    text = VALID.replace("  stages: [new, active]", f"  stages: {value}")
    project = load(project_dir, text)
    [problem] = [p for p in project.problems if p.file.name == "broken.yaml"]
    assert (problem.line, problem.field) == (9, "audience.stages") and "tag" in problem.message, str(problem)
    assert "cart-reminder" not in project.triggers


def test_standard_yaml_tags_still_load(project_dir: Path) -> None:
    text = VALID.replace("  stages: [new, active]", "  stages: !!seq [!!str new, active]").replace(
        "reentry: 1d", "reentry: !!str 1d")
    project = load(project_dir, text)
    assert "cart-reminder" in project.triggers, [str(p) for p in project.problems]
