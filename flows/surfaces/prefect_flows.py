"""The Prefect surface: a trigger run as a flow, its batches as tasks, its summary as artifacts.

One flow, ``lifecycle-trigger``, runs every trigger; its runs are named after the
trigger and the moment, and tagged ``lifecycle``, ``kind:KIND`` and ``trigger:NAME``,
however they start: a deployment (``prefect.yaml``, tags from ``run_tags``), ``lifecycle
run`` (``run_in_prefect``), or ``lifecycle serve`` when it reports to a Prefect server.
A run's final state carries its counts (``sent 9; deferred 5; skipped 53``), so the
runs list says more than "Completed".

A deployed run reads its settings from the environment here, at its start; a run
started in-process (the CLI, serve, the demo) hands in its own settings, loaded project
and store (``run_in_prefect``), so a run loads and validates the project once.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect import State, Task, flow, tags, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed
from prefect.utilities.annotations import quote
from sqlalchemy import Engine

from flows.audience.query import Candidate
from flows.clock import parse_now
from flows.content.links import preview_url
from flows.memory import one_malloc_arena
from flows.message.prepare import Failure, Prepared, render_candidates
from flows.redaction import redact_every_record
from flows.run import execute, run
from flows.run_context import RunContext, load, prepare
from flows.send.batch import BatchOutcome, Counts, dispatch_prepared
from flows.send.probe import check_smtp
from flows.send.senders import SenderPool
from flows.settings import Settings
from flows.spec.common import TriggerBase
from flows.spec.project import Project
from flows.summary import RunSummary
from flows.surfaces.deployments import run_tags
from flows.surfaces.environment import settings_from_environment
from models.types import utcnow

FLOW_NAME = "lifecycle-trigger"
DEFERRED_FLOW_NAME = "lifecycle-deferred"


@dataclass(frozen=True)
class _Handed:
    settings: Settings
    project: Project
    engine: Engine | None


# What an in-process caller hands the flow it starts (``run_in_prefect``); a deployed run has none.
_handed: ContextVar[_Handed | None] = ContextVar("lifecycle_handed", default=None)


@contextmanager
def _handing(settings: Settings, project: Project, engine: Engine | None) -> Iterator[None]:
    token = _handed.set(_Handed(settings, project, engine))
    try:
        yield
    finally:
        _handed.reset(token)


def _run_name() -> str:
    parameters = flow_run.parameters
    moment = parse_now(parameters.get("now"))
    suffix = " (dry run)" if parameters.get("dry_run") else ""
    return f"{parameters['trigger']} @ {moment:%Y-%m-%d %H:%M} UTC{suffix}"


def _in_sender(senders: SenderPool, candidates: list[Candidate], batch: int) -> BatchOutcome:
    return senders.submit(candidates, batch).result()


# Typed with any parameters (``...``): they are called with ``quote``-wrapped arguments, which Prefect
# unwraps before the call (see below).
render_batch: Task[..., tuple[list[Prepared], list[Failure]]] = task(
    name="render", task_run_name="render-batch-{batch}", cache_policy=NO_CACHE)(render_candidates)
dispatch_batch: Task[..., Counts] = task(
    name="dispatch", task_run_name="dispatch-batch-{batch}", cache_policy=NO_CACHE)(dispatch_prepared)
# A batch rendered and sent in a sender process: one task run per batch, submitted so batches overlap.
send_batch: Task[..., BatchOutcome] = task(
    name="send", task_run_name="send-batch-{batch}", cache_policy=NO_CACHE)(_in_sender)

# The steps as a flow run calls them. Prefect walks every task parameter, element by element,
# looking for futures (about 70 ms and a copy per 2,000 candidates); ``quote`` spares the batch
# and the context that walk: neither can hold a future.


def _render_task(context: RunContext, candidates: Sequence[Candidate], batch: int = 0) -> Any:
    return render_batch(quote(context), quote(candidates), batch=batch)


def _dispatch_task(context: RunContext, prepared: Sequence[Prepared], batch: int = 0) -> Any:
    return dispatch_batch(quote(context), quote(prepared), batch=batch)


def _send_task(senders: SenderPool, candidates: list[Candidate], batch: int) -> Any:
    return send_batch.submit(quote(senders), quote(candidates), batch)


def _start() -> tuple[Settings, Project | None, Engine | None]:
    """The settings, project and store of this run: handed in, or (a deployed run) from the environment."""
    redact_every_record()  # no password or token in any log record, Prefect's API log included
    one_malloc_arena()  # before the run's own threads start (see flows.memory)
    handed = _handed.get()
    if handed is not None:
        return handed.settings, handed.project, handed.engine
    return settings_from_environment(), None, None


@flow(name=FLOW_NAME, flow_run_name=_run_name, validate_parameters=True)
def trigger_flow(trigger: str, now: str | None = None, dry_run: bool = False) -> State:
    """Evaluate one trigger at ``now`` (ISO 8601; default: the current time) and send."""
    settings, project, engine = _start()
    context = prepare(trigger, parse_now(now), settings=settings, project=project, engine=engine, dry_run=dry_run,
                      run_id=str(flow_run.id or ""))
    summary = run(context, logger=get_run_logger(), render=_render_task, dispatch=_dispatch_task, submit=_send_task)
    publish(summary, context.settings)
    return Completed(message=summary.state_message(), data=summary)


def _deferred_run_name() -> str:
    return f"deferred sends @ {parse_now(flow_run.parameters.get('now')):%Y-%m-%d %H:%M} UTC"


@flow(name=DEFERRED_FLOW_NAME, flow_run_name=_deferred_run_name, validate_parameters=True)
def deferred_flow(now: str | None = None) -> State:
    """Send what the policy deferred, for every trigger, as soon as its moment has come
    (scheduled every few minutes, so a deferral does not wait for its trigger's next run)."""
    settings, project, engine = _start()
    moment = parse_now(now)
    project = project or load(settings)
    log = get_run_logger()
    summaries = {}
    if any(t.enabled for t in project.triggers.values()):
        check_smtp(settings)
    failed = []
    for name, trigger in project.triggers.items():
        if trigger.enabled:
            try:  # each trigger its own error boundary: one that fails never holds back the others' sends
                context = prepare(name, moment, settings=settings, project=project, engine=engine,
                                  run_id=str(flow_run.id or ""))
                summaries[name] = execute(context, render=_render_task, dispatch=_dispatch_task, audience=False,
                                          submit=_send_task, logger=log)
            except Exception as exc:  # noqa: BLE001 -- reported below, after the others had their turn
                log.error("Deferred sends of %s failed: %s", name, exc)
                failed.append(name)
    if failed:  # the run is Failed, honestly, once every healthy trigger has sent
        raise RuntimeError(f"deferred sends failed for {', '.join(failed)}; the other triggers' went out")
    message = "; ".join(f"{name}: {s.state_message()}" for name, s in summaries.items() if s.counts) or "nothing due"
    return Completed(message=message, data=summaries)


@dataclass(frozen=True)
class FlowRun:
    summary: RunSummary
    id: UUID | None


def run_in_prefect(trigger: TriggerBase, now: str, *, settings: Settings, project: Project,
                   engine: Engine | None = None) -> FlowRun:
    """A run of ``trigger`` as a run of the one flow, with the trigger's tags, from this
    process (``lifecycle run``, serve, the demo): the flow gets this caller's settings,
    project and store instead of reading them again. A failed run raises what failed it."""
    with _handing(settings, project, engine), tags(*run_tags(trigger)):
        state = trigger_flow(trigger=trigger.name, now=now, dry_run=False, return_state=True)
    summary = state.result()  # raises the run's own error when it failed
    assert isinstance(summary, RunSummary)
    return FlowRun(summary, state.state_details.flow_run_id)


def ui_link(flow_run_id: UUID | None) -> str | None:
    """The run's page in the Prefect UI, when runs go to a server that outlives them
    (``PREFECT_API_URL`` set); a temporary server's pages vanish with it."""
    from prefect.settings import get_current_settings

    current = get_current_settings()
    if flow_run_id is None or not current.api.url:
        return None
    ui = current.ui_url or current.api.url.removesuffix("/api")
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"


def publish(summary: RunSummary, settings: Settings) -> None:
    """Artifacts for the Prefect UI: the summary (with preview links to `lifecycle web`) and the counts."""
    key = "".join(ch if ch.isalnum() else "-" for ch in summary.trigger.lower())
    secret, made = settings.signing_secret, utcnow()  # a preview link expires after its making, not the run's --now

    def preview(stage: str, language: str) -> str:
        return preview_url(settings.base_url, secret, summary.trigger, stage, language, made)

    create_markdown_artifact(key=f"{key}-summary", markdown=summary.to_markdown(preview),
                             description=summary.headline())
    create_table_artifact(key=f"{key}-counts", table=summary.table(), description="Counts per stage and outcome")
