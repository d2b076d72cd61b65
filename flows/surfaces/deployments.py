"""``prefect.yaml``'s deployments, generated from the trigger files.

One deployment per trigger file (plus ``deferred-sends``, which sends what the policy
deferred once its moment has come, and ``lifecycle-report``, the daily attribution and
report published as artifacts): the shared entrypoint, the trigger's name as its
parameter, its cron schedule (paused when the trigger is disabled), a ``kind:`` tag,
and the trigger's description. Complaint triggers also get a Prefect deployment
trigger (event automation) so a new complaint starts a run within seconds instead of
waiting for the next cron tick. Everything above ``deployments:`` in the file is kept.
"""

import difflib
from pathlib import Path
from typing import Any

import yaml

from flows.spec.trigger import TriggerBase
from flows.surfaces.prefect_events import COMPLAINT_EVENT, COMPLAINT_RESOURCE_PREFIX

ENTRYPOINT = "flows/surfaces/prefect_flows.py:trigger_flow"
DEFERRED = {
    "name": "deferred-sends",
    "entrypoint": "flows/surfaces/prefect_flows.py:deferred_flow",
    "description": "Sends what the sending policy deferred (quiet hours, frequency caps) once its moment has come.",
    "tags": ["lifecycle", "policy"],
    "parameters": {},
    "schedules": [{"cron": "*/5 * * * *", "timezone": "UTC", "active": True}],
}
REPORT = {
    "name": "lifecycle-report",
    "entrypoint": "flows/surfaces/prefect_flows.py:report_flow",
    "description": "Daily: attributes the new orders, then publishes the last 7 days' report as artifacts "
                   "(a summary, a table per trigger, a link to the reports page of lifecycle web).",
    "tags": ["lifecycle", "report"],
    "parameters": {},
    "schedules": [{"cron": "30 5 * * *", "timezone": "UTC", "active": True}],
}
WORK_POOL = "lifecycle"
SECTION = "deployments:"


def run_tags(trigger: TriggerBase) -> list[str]:
    """The tags of every run of ``trigger``, deployed or started by ``lifecycle run`` or serve."""
    return ["lifecycle", f"kind:{trigger.kind}", f"trigger:{trigger.name}"]


def deployment(trigger: TriggerBase) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": trigger.name,
        "entrypoint": ENTRYPOINT,
        "description": trigger.description,
        "tags": run_tags(trigger),
        "parameters": {"trigger": trigger.name},
        "schedules": [{"cron": trigger.schedule.cron, "timezone": trigger.schedule.timezone,
                       "active": trigger.enabled}],
        "work_pool": {"name": WORK_POOL},
    }
    if trigger.kind == "complaint":
        entry["triggers"] = [{
            "type": "event",
            "enabled": trigger.enabled,
            "match": {"prefect.resource.id": f"{COMPLAINT_RESOURCE_PREFIX}*"},
            "expect": [COMPLAINT_EVENT],
            "posture": "Reactive",
            "threshold": 1,
            "within": 0,
            "parameters": {"trigger": trigger.name},
        }]
    return entry


def deployments(triggers: list[TriggerBase]) -> list[dict[str, Any]]:
    """One per trigger (sorted by name, stable), then the deferred-sends sweep and the daily report."""
    return [deployment(t) for t in sorted(triggers, key=lambda t: t.name)] + [
        {**fixed, "work_pool": {"name": WORK_POOL}} for fixed in (DEFERRED, REPORT)]


def render(existing: str, triggers: list[TriggerBase]) -> str:
    """The file with its deployments section regenerated."""
    head, _, _ = existing.partition("\n" + SECTION)
    if existing.startswith(SECTION):
        head = ""
    body = yaml.safe_dump({"deployments": deployments(triggers)}, sort_keys=False, allow_unicode=True, width=120)
    return (head.rstrip("\n") + "\n\n" if head.strip() else "") + body


def diff(path: Path, triggers: list[TriggerBase]) -> str:
    """Where the file's deployments differ from the triggers' (as a unified diff); empty when they agree.

    The comparison is of the parsed deployments, so formatting and comments do not matter.
    """
    current = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
    have = (current or {}).get("deployments") or []
    want = deployments(triggers)
    if have == want:
        return ""

    def lines(value: list[dict[str, Any]]) -> list[str]:
        return yaml.safe_dump(value, sort_keys=False, allow_unicode=True, width=120).splitlines(keepends=True)

    return "".join(difflib.unified_diff(lines(have), lines(want), fromfile=f"{path} (deployments as they are)",
                                        tofile=f"{path} (deployments from triggers/)"))


def artifact_key(trigger: str) -> str:
    """A trigger's name as an artifact key (lowercase letters, digits and dashes)."""
    return "".join(ch if ch.isalnum() else "-" for ch in trigger.lower())
