"""prefect.yaml holds one deployment per trigger file, with the trigger's own schedule."""

from pathlib import Path

import yaml

from flows.spec.project import load_project

ROOT = Path(__file__).resolve().parent.parent


def test_every_trigger_has_a_matching_deployment() -> None:
    project = load_project(ROOT / "triggers", ROOT / "templates")
    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert set(deployments) == set(project.triggers)
    for name, trigger in project.triggers.items():
        deployment = deployments[name]
        assert deployment["entrypoint"] == "flows/pipeline.py:trigger_flow"
        assert deployment["parameters"] == {"trigger": name}
        assert deployment["schedules"] == [{"cron": trigger.schedule.cron, "timezone": trigger.schedule.timezone}]
        assert f"kind:{trigger.kind}" in deployment["tags"]
        assert deployment["description"] == trigger.description


def test_the_entrypoint_is_importable_as_a_flow() -> None:
    from flows.pipeline import trigger_flow

    assert trigger_flow.name == "lifecycle-trigger"
    assert set(trigger_flow.parameters.properties) == {"trigger", "now", "dry_run"}
