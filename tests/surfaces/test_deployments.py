"""prefect.yaml's deployments are generated from triggers/ and checked against it."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.surfaces.cli import app
from flows.surfaces.environment import settings_from_environment
from tests.support import ROOT

runner = CliRunner()


@pytest.fixture
def project(project_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of the project as the working directory, with the default settings."""
    shutil.copy(ROOT / "prefect.yaml", project_dir / "prefect.yaml")
    monkeypatch.chdir(project_dir)
    monkeypatch.setenv("COLUMNS", "200")
    for name in ("LIFECYCLE_TRIGGERS_DIR", "LIFECYCLE_TEMPLATES_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings_from_environment.cache_clear()
    yield project_dir
    settings_from_environment.cache_clear()


def deployments(project: Path) -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load((project / "prefect.yaml").read_text())["deployments"]}


def test_the_shipped_prefect_yaml_matches_the_shipped_triggers(project: Path) -> None:
    result = runner.invoke(app, ["deployments", "--check"])
    assert result.exit_code == 0, result.output
    assert "matches triggers/ (10 deployments)" in result.output


def test_one_deployment_per_trigger_with_its_schedule_tags_and_parameters(project: Path) -> None:
    found = deployments(project)
    assert set(found) == {"abandoned-cart", "complaint-ack", "we-miss-you", "onboarding-day-0", "post-purchase-nps",
                          "referral-loyal", "winback-lapsed", "confirm-subscription", "deferred-sends",
                          "lifecycle-report"}
    winback = found["winback-lapsed"]
    assert winback["entrypoint"] == "flows/surfaces/prefect_flows.py:trigger_flow"
    assert winback["parameters"] == {"trigger": "winback-lapsed"}
    assert winback["schedules"] == [{"cron": "0 10 * * 1", "timezone": "Europe/Berlin", "active": True}]
    assert winback["tags"] == ["lifecycle", "kind:campaign", "trigger:winback-lapsed"]  # as every run of it
    assert winback["work_pool"] == {"name": "lifecycle"}
    assert winback["description"].startswith("Weekly win-back offer")
    [event] = found["complaint-ack"]["triggers"]
    assert event["expect"] == ["lifecycle.complaint.received"] and event["parameters"] == {"trigger": "complaint-ack"}


def test_a_hand_edit_fails_the_check_with_a_diff_and_write_repairs_it(project: Path) -> None:
    path = project / "prefect.yaml"
    path.write_text(path.read_text().replace("cron: 0 10 * * 1", "cron: 0 11 * * 1"))
    result = runner.invoke(app, ["deployments", "--check"])
    assert result.exit_code == 1
    assert "-  - cron: 0 11 * * 1" in result.output and "+  - cron: 0 10 * * 1" in result.output
    assert "run `lifecycle deployments --write`" in result.output
    assert runner.invoke(app, ["deployments", "--write"]).exit_code == 0
    assert runner.invoke(app, ["deployments", "--check"]).exit_code == 0
    assert path.read_text().startswith("# Prefect deployments: one per trigger file")  # the header survives


def test_a_new_or_disabled_trigger_file_needs_no_python_change(project: Path) -> None:
    triggers = project / "triggers"
    text = (triggers / "onboarding_day_0.yaml").read_text()
    (triggers / "onboarding_day_7.yaml").write_text(
        text.replace("onboarding-day-0", "onboarding-day-7").replace("day: 0", "day: 7")
        .replace("enabled: true", "enabled: false"))
    assert runner.invoke(app, ["deployments", "--check"]).exit_code == 1
    assert runner.invoke(app, ["deployments", "--write"]).exit_code == 0
    added = deployments(project)["onboarding-day-7"]
    assert added["schedules"][0]["active"] is False  # a disabled trigger's schedule is paused
    assert added["parameters"] == {"trigger": "onboarding-day-7"}


def test_the_entrypoint_is_importable_as_a_flow() -> None:
    from flows.surfaces.prefect_flows import trigger_flow

    assert trigger_flow.name == "lifecycle-trigger"
    assert set(trigger_flow.parameters.properties) == {"trigger", "now", "dry_run", "shards", "shard"}
