"""The lifecycle command as marketers and ops use it."""

import json
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.settings import Settings
from flows.surfaces.cli import app
from tests.support.builders import NOW, Store, ago
from tests.support.children import lifecycle
from tests.support.smtp_server import SmtpServer

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")


def test_validate_passes_on_the_shipped_project(settings: Settings) -> None:
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 0, result.output
    assert "All good: 8 triggers" in result.output


def test_validate_reports_every_problem_with_file_and_line_and_exits_1(settings: Settings) -> None:
    triggers = Path(settings.triggers_dir)
    text = (triggers / "winback.yaml").read_text()
    (triggers / "winback.yaml").write_text(text.replace("  stages: [lapsed]", "  stages: [lapsd]"))
    text = (triggers / "complaint.yaml").read_text()
    (triggers / "complaint.yaml").write_text(text.replace("max_age: 7d", "max_age: 7 days"))
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 1
    assert "winback.yaml:9: audience.stages: unknown stage 'lapsd'; valid stages: prospect, lapsed" in result.output
    assert "complaint.yaml:4: max_age: expected a duration" in result.output
    assert "> 4 | max_age: 7 days" in result.output  # the offending line is shown
    assert "2 problem(s) in 2 file(s). 6 trigger(s) are valid." in result.output


def test_a_files_own_words_are_shown_as_text_never_as_markup(settings: Settings) -> None:
    triggers = Path(settings.triggers_dir)
    text = (triggers / "winback.yaml").read_text()
    (triggers / "winback.yaml").write_text(text.replace("name: winback-lapsed", 'name: "[/x] [a-z0-9]"'))
    result = runner.invoke(app, ["validate"])
    assert (result.exit_code == 1 and result.exception is None) or isinstance(result.exception, SystemExit)
    assert "[/x] [a-z0-9]" in result.output and "winback.yaml:1: name:" in result.output


def test_validate_as_an_installed_command(settings: Settings) -> None:
    done = lifecycle("validate", settings=settings, timeout=120)
    assert done.returncode == 0, done.stderr


def test_ingest_reports_bad_lines_and_exits_1(settings: Settings, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    good = {"type": "identify", "userId": "u1", "timestamp": "2026-03-01T10:00:00Z", "traits": {"email": "a@b.de"}}
    events.write_text(json.dumps(good) + "\n" + '{"type": "track"}\n')
    result = runner.invoke(app, ["ingest", str(events)])
    assert result.exit_code == 1
    assert f"{events}:2: " in result.output and "userId" in result.output
    assert "Loaded 1 event(s), 0 already known, 1 bad line(s) skipped." in result.output
    again = runner.invoke(app, ["ingest", "-"], input=json.dumps(good) + "\n")
    assert again.exit_code == 0 and "Loaded 0 event(s), 1 already known" in again.output


def test_dry_run_prints_counts_and_who_would_get_what(settings: Settings, store: Store, smtp: SmtpServer) -> None:
    store.order(store.customer("Lea"), ago(days=500))
    store.order(store.customer("Ohne", consent=False), ago(days=500))
    result = runner.invoke(app, ["run", "winback-lapsed", "--dry-run", "--now", NOW.isoformat()])
    assert result.exit_code == 0, result.output
    assert "winback-lapsed @ 2026-03-16 12:00:00 UTC: would send 1; skipped:no_consent 1" in result.output
    assert "Lea, 15 % Rabatt nur für dich" in result.output
    assert smtp.received == []


def test_run_names_an_unknown_trigger_and_suggests_one(settings: Settings) -> None:
    result = runner.invoke(app, ["run", "winback", "--dry-run"])
    assert result.exit_code == 1
    assert "no trigger named 'winback'; did you mean 'winback-lapsed'?" in result.output


def test_run_needs_names_or_all(settings: Settings) -> None:
    assert runner.invoke(app, ["run"]).exit_code == 2


def test_preview_renders_every_stage_and_language_to_files(settings: Settings, tmp_path: Path) -> None:
    out = tmp_path / "preview"
    result = runner.invoke(app, ["preview", "abandoned-cart", "--stage", "loyal", "--stage", "new", "--out", str(out)])
    assert result.exit_code == 0, result.output
    # A journey: each step's mails in a folder of their own, and the diagram beside them.
    assert sorted(p.name for p in (out / "abandoned-cart").iterdir()) == ["incentive", "journey.mmd", "nudge",
                                                                          "reminder"]
    reminder = out / "abandoned-cart" / "reminder"
    names = sorted(p.name for p in reminder.iterdir())
    assert names == sorted(f"{s}.{lang}.{ext}" for s in ("loyal", "new") for lang in ("de", "en")
                           for ext in ("eml", "html", "txt"))
    assert "Stammkunde" in (reminder / "loyal.de.html").read_text()
    assert "Stammkunde" not in (reminder / "new.de.html").read_text()
    assert "KORB10" in (out / "abandoned-cart" / "incentive" / "new.de.html").read_text()


def test_preview_with_a_real_customer_uses_their_cart(settings: Settings, store: Store, tmp_path: Path) -> None:
    customer = store.customer("Jürgen")
    store.cart(customer, ago(hours=3), items=[("Rucksack 28 l", 99.0, 1)])
    out = tmp_path / "p"
    result = runner.invoke(app, ["preview", "abandoned-cart", "--customer", customer.external_id, "--out", str(out),
                                 "--now", NOW.isoformat()])
    assert result.exit_code == 0, result.output
    html = (out / "abandoned-cart" / "reminder" / f"{customer.external_id}.prospect.de.html").read_text()
    assert "Rucksack 28 l" in html and "Hallo Jürgen" in html


# The demo makes its own SQLite store unless told otherwise; the runs it makes are the
# pipeline's, tested on both databases elsewhere (tests/e2e/test_pipeline.py).
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.usefixtures("prefect")
def test_demo_sends_into_the_outbox_and_a_second_run_sends_nothing(settings: Settings, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = runner.invoke(app, ["demo", "--customers", "80"])
    assert first.exit_code == 0, first.output
    sent = sorted((tmp_path / "outbox").glob("*.eml"))
    assert len(sent) > 10
    assert f"{len(sent)} message(s) received by the capture server this run" in first.output
    second = runner.invoke(app, ["demo", "--customers", "80"])
    assert second.exit_code == 0, second.output
    assert "0 message(s) received by the capture server this run" in second.output
    assert sorted((tmp_path / "outbox").glob("*.eml")) == sent


def test_run_all_reports_a_broken_file_and_still_runs_the_healthy_triggers(settings: Settings, store: Store) -> None:
    store.order(store.customer("Lea"), ago(days=500))
    (Path(settings.triggers_dir) / "broken.yaml").write_text("name: broken\nkind: abandoned_cart\nidle_for: soon\n")
    result = runner.invoke(app, ["run", "--all", "--dry-run", "--now", NOW.isoformat()])
    assert result.exit_code == 1
    assert "broken.yaml:3: idle_for: expected a duration" in result.output
    assert "winback-lapsed @ 2026-03-16 12:00:00 UTC: would send 1" in result.output
    assert "abandoned-cart @ 2026-03-16 12:00:00 UTC: would send 0" in result.output


def test_suppress_add_list_remove(settings: Settings, store: Store) -> None:
    customer = store.customer("Sina", last_seen=ago(days=70))
    store.order(customer, ago(days=80))
    added = runner.invoke(app, ["suppress", "add", customer.email.upper(), "--reason", "spam_complaint",
                                "--note", "FBL report 4711"])
    assert added.exit_code == 0 and "Suppressed 1 address(es) (spam_complaint)." in added.output
    listed = runner.invoke(app, ["suppress", "list"])
    assert customer.email in listed.output and "spam_complaint" in listed.output and "FBL report 4711" in listed.output
    dry = runner.invoke(app, ["run", "we-miss-you", "--dry-run", "--now", NOW.isoformat()])
    assert "skipped:suppressed 1" in dry.output
    removed = runner.invoke(app, ["suppress", "remove", customer.email])
    assert removed.exit_code == 0 and "Removed 1 suppression(s)." in removed.output
    assert "would send 1" in runner.invoke(app, ["run", "we-miss-you", "--dry-run", "--now", NOW.isoformat()]).output
    assert runner.invoke(app, ["suppress", "add", "x@example.de", "--reason", "whim"]).exit_code == 2


def test_validate_warns_about_a_language_without_a_subject_and_still_exits_0(settings: Settings) -> None:
    (Path(settings.templates_dir) / "winback" / "default.fr.html.j2").write_text("<p>Bonjour</p>")
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 0, result.output
    assert ("winback.yaml:12: email.subject: warning: language 'fr' is targeted (templates/winback/ has fr files) "
            "but has no subject for 'fr'; fr customers get the whole mail in 'en'") in result.output
    assert "All good: 8 triggers" in result.output and "1 warning(s)." in result.output


def test_preview_shows_the_subject_and_says_when_another_language_was_used(settings: Settings,
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "preview"
    result = runner.invoke(app, ["preview", "winback-lapsed", "--stage", "lapsed", "--language", "fr",
                                 "--language", "de", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert ("lapsed (language en, not fr: the trigger has no subject or template for fr): "
            "subject: Jürgen, 15% off just for you") in result.output
    assert "lapsed (language de): subject: Jürgen, 15 % Rabatt nur für dich" in result.output
    html = (out / "winback-lapsed" / "lapsed.fr.html").read_text()
    assert "Subject: Jürgen, 15% off just for you" in html and "Language: en (asked for fr" in html
    assert "it has been more than a year" in html and "Rabatt" not in html
    eml = message_from_bytes((out / "winback-lapsed" / "lapsed.fr.eml").read_bytes(), policy=policy.default)
    assert eml["Subject"] == "Jürgen, 15% off just for you"
    german = (out / "winback-lapsed" / "lapsed.de.html").read_text()
    assert "Language: de</div>" in german


def test_preview_of_a_french_customer_uses_the_default_language_and_says_so(settings: Settings, store: Store,
                                                                            tmp_path: Path) -> None:
    lea = store.customer("Léa", locale="fr-FR")
    store.order(lea, ago(days=500))
    result = runner.invoke(app, ["preview", "winback-lapsed", "--customer", lea.external_id, "--out", str(tmp_path),
                                 "--now", NOW.isoformat()])
    assert result.exit_code == 0, result.output
    assert "lapsed (language en, not fr: " in result.output and "subject: Léa, 15% off just for you" in result.output
    assert (tmp_path / "winback-lapsed" / f"{lea.external_id}.lapsed.en.html").is_file()


def test_preview_by_a_merged_guest_s_id_renders_the_account(settings: Settings, store: Store, tmp_path: Path) -> None:
    from flows.ingest import ingest_lines

    account = store.customer("Pat", locale="en-GB")
    store.order(account, ago(days=500))
    alias = {"type": "alias", "previousId": "guest-1", "userId": account.external_id, "timestamp": NOW.isoformat()}
    assert ingest_lines(store.engine, [json.dumps(alias)]).errors == []
    result = runner.invoke(app, ["preview", "winback-lapsed", "--customer", "guest-1", "--out", str(tmp_path),
                                 "--now", NOW.isoformat()])
    assert result.exit_code == 0, result.output
    assert "subject: Pat, 15% off just for you" in result.output


def test_web_refuses_to_start_with_a_broken_policy_and_says_where(settings: Settings, project_dir: Path) -> None:
    policy_file = project_dir / "triggers" / "policy.yaml"
    policy_file.write_text(policy_file.read_text().replace("repeat_within: 60s", "repeat_within: soon"))
    result = runner.invoke(app, ["web", "--port", "1"])
    assert result.exit_code == 2, result.output
    line = next(n for n, text in enumerate(policy_file.read_text().splitlines(), start=1) if "repeat_within" in text)
    assert f"policy.yaml:{line}: tracking.repeat_within: expected a duration" in result.output
