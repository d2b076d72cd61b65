"""Running triggers in tests, at ``NOW`` unless told: Prefect-free (``run``) or as the Prefect flow (``run_flow``)."""

from datetime import datetime
from typing import Any

from flows.run import execute
from flows.run_context import load, prepare
from flows.settings import Settings
from flows.summary import RunSummary
from tests.support.builders import NOW


def run(settings: Settings, trigger: str, now: datetime = NOW, dry_run: bool = False, **steps: Any) -> RunSummary:
    """One run of ``trigger`` at ``now``, Prefect-free (``steps``: ``execute``'s keyword arguments)."""
    return execute(prepare(trigger, now, settings=settings, dry_run=dry_run), **steps)


def run_flow(settings: Settings, trigger: str, now: datetime = NOW) -> RunSummary:
    """One run of ``trigger`` at ``now`` as a run of the Prefect flow, as ``lifecycle run`` starts it."""
    from flows.surfaces.prefect_flows import run_in_prefect

    project = load(settings)
    return run_in_prefect(project.trigger(trigger), now.isoformat(), settings=settings, project=project).summary
