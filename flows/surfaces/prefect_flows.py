"""The Prefect surface: a trigger run as a flow, its batches as tasks, its summary as artifacts;
and ``lifecycle-report``, the daily attribution and report.

One flow, ``lifecycle-trigger``, runs every trigger; its runs are named after the
trigger and the moment, and tagged ``lifecycle``, ``kind:KIND`` and ``trigger:NAME``,
however they start: a deployment (``prefect.yaml``, tags from ``run_tags``), ``lifecycle
run`` (``run_in_prefect``), or ``lifecycle serve`` when it reports to a Prefect server.
A run's final state carries its counts (``sent 9; deferred 5; skipped 53``), so the
runs list says more than "Completed".

``lifecycle-report`` (``report_flow``) attributes the orders no run has looked at yet, then
publishes the report of the last days (or since its last completed run) as artifacts: a
markdown summary, a table per trigger, and a link to the reports page of ``lifecycle web``.

A deployed run reads its settings from the environment here, at its start; a run
started in-process (the CLI, serve, the demo) hands in its own settings, loaded project
and store (``run_in_prefect``), so a run loads and validates the project once.
"""

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect import State, Task, flow, tags, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun as PrefectFlowRun
from prefect.logging import get_run_logger
from prefect.runtime import deployment, flow_run
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
from flows.spec.project import Project
from flows.spec.trigger import TriggerBase
from flows.summary import RunSummary
from flows.surfaces.deployments import artifact_key, run_tags
from flows.surfaces.environment import settings_from_environment
from flows.surfaces.prefect_shards import ShardOrder, run_slice, spread_for
from models.db import get_engine
from models.types import utcnow

if TYPE_CHECKING:
    from flows.analysis.attribution import AttributionTally
    from flows.analysis.report import Report

FLOW_NAME = "lifecycle-trigger"
DEFERRED_FLOW_NAME = "lifecycle-deferred"
REPORT_FLOW_NAME = "lifecycle-report"
REPORT_DAYS = 7
SINCE_LAST_RUN = "last-run"


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
    order = parameters.get("shard")
    if order:  # one slice of a deployed run's pass (``prefect_shards``)
        order = ShardOrder.model_validate(order)
        suffix += f", step {order.step}" if order.step else ""
        suffix += f", shard {order.label}"
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
def trigger_flow(trigger: str, now: str | None = None, dry_run: bool = False, shards: int | None = None,
                 shard: ShardOrder | None = None) -> State:
    """Evaluate one trigger at ``now`` (ISO 8601; default: the current time) and send
    (``shards``: in that many slices, instead of the trigger's own ``shards:``; a deployed
    run's slices are flow runs of its deployment, each given its ``shard``)."""
    settings, project, engine = _start()
    context = prepare(trigger, parse_now(now), settings=settings, project=project, engine=engine, dry_run=dry_run,
                      run_id=str(flow_run.id or ""), shards=shards)
    logger = get_run_logger()
    if shard is not None:
        if not context.dry_run:
            check_smtp(context.settings)
        part = run_slice(context, shard, logger)
        return Completed(message=part.state_message(), data=part)
    spread = spread_for(context, deployment.id, flow_run.id, flow_run.run_count, run_tags(context.trigger), logger)
    try:
        summary = run(context, logger=logger, render=_render_task, dispatch=_dispatch_task, submit=_send_task,
                      steps_wrap_real=True, spread=spread)
    finally:
        if spread is not None and spread.report:
            create_table_artifact(key=f"{artifact_key(context.trigger.name)}-shards", table=spread.report,
                                  description="Each shard's flow runs and outcome")
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
                   engine: Engine | None = None, shards: int | None = None) -> FlowRun:
    """A run of ``trigger`` as a run of the one flow, with the trigger's tags, from this
    process (``lifecycle run``, serve, the demo): the flow gets this caller's settings,
    project and store instead of reading them again. A failed run raises what failed it."""
    with _handing(settings, project, engine), tags(*run_tags(trigger)):
        state = trigger_flow(trigger=trigger.name, now=now, dry_run=False, shards=shards, return_state=True)
    summary = state.result()  # raises the run's own error when it failed
    assert isinstance(summary, RunSummary)
    return FlowRun(summary, state.state_details.flow_run_id)


def run_on_pool(trigger: TriggerBase, now: str, *, shards: int | None,
                started: Callable[[UUID], None] = lambda _: None, poll: float = 2.0) -> tuple[UUID, State]:
    """A run of ``trigger`` as a flow run of its deployment, for any worker of its pool
    (``lifecycle run --on-pool``; its shards spread over the pool too), waited for to its
    end: its id (told to ``started`` at once) and final state."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    parameters: dict[str, Any] = {"now": now, **({"shards": shards} if shards else {})}
    run_ = run_deployment(f"{FLOW_NAME}/{trigger.name}", parameters=parameters, timeout=0, as_subflow=False)
    assert isinstance(run_, PrefectFlowRun)  # called from sync code: the value, not a coroutine
    started(run_.id)
    with get_client(sync_client=True) as client:
        while (state := client.read_flow_run(run_.id).state) is None or not state.is_final():
            time.sleep(poll)
    return run_.id, state


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
    key = artifact_key(summary.trigger)
    secret, made = settings.signing_secret, utcnow()  # a preview link expires after its making, not the run's --now

    def preview(stage: str, language: str, step: str, variant: str) -> str:
        return preview_url(settings.base_url, secret, summary.trigger, stage, language, made, step, variant)

    create_markdown_artifact(key=f"{key}-summary", markdown=summary.to_markdown(preview),
                             description=summary.headline())
    create_table_artifact(key=f"{key}-counts", table=summary.table(), description="Counts per stage and outcome")
    if summary.steps:
        create_table_artifact(key=f"{key}-steps", table=summary.step_table(),
                              description="A journey's counts per step and outcome")


# -- lifecycle-report: the daily attribution and report ---------------------------------------------

def _report_run_name() -> str:
    return f"report @ {parse_now(flow_run.parameters.get('now')):%Y-%m-%d %H:%M} UTC"


def last_completed_report(before: datetime) -> datetime | None:
    """When the latest completed run of ``lifecycle-report`` began (its ``now``), before ``before``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[REPORT_FLOW_NAME])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.COMPLETED]))),
            sort=FlowRunSort.START_TIME_DESC, limit=20)
    moments = [parse_now(run.parameters.get("now")) if run.parameters.get("now") else run.start_time
               for run in runs if run.id != flow_run.id]
    earlier = [moment for moment in moments if moment is not None and moment < before]
    return max(earlier) if earlier else None


def report_period(now: datetime, since: str | None, days: int) -> tuple[datetime, datetime]:
    """``[since, now)``: the given moment, the previous completed run's (``last-run``; the last
    ``days`` days if there was none), or by default the last ``days`` days."""
    if since == SINCE_LAST_RUN:
        return last_completed_report(now) or now - timedelta(days=days), now
    return (parse_now(since) if since else now - timedelta(days=days)), now


def _attribute_orders(engine: Engine, project: Project, now: datetime) -> "AttributionTally":
    """The incremental attribution: orders placed by ``now`` that have no attribution yet (and
    clicks older than the policy's ``keep_for`` deleted)."""
    from flows.analysis.attribution import attribute

    return attribute(engine, project.policy.attribution, now, keep_for=project.policy.tracking.keep_for)


def _build_report(engine: Engine, project: Project, since: datetime, until: datetime, now: datetime) -> "Report":
    """The report of ``[since, until)`` as of ``now``: clicks and orders after it are left out."""
    from flows.analysis.report import build_report

    return build_report(engine, since=since, until=until, policy=project.policy, now=now)


# ``quote``-wrapped arguments, as the trigger flow's tasks (see above): typed with any parameters.
attribute_orders: "Task[..., AttributionTally]" = task(name="attribute", cache_policy=NO_CACHE)(_attribute_orders)
build_report_task: "Task[..., Report]" = task(name="report", cache_policy=NO_CACHE)(_build_report)


@flow(name=REPORT_FLOW_NAME, flow_run_name=_report_run_name, validate_parameters=True)
def report_flow(now: str | None = None, since: str | None = None, days: int = REPORT_DAYS) -> State:
    """Attribute new orders at ``now`` (default: the current time), then publish the report of
    ``[since, now)``: ``since`` an ISO 8601 moment, ``last-run`` (since the previous completed
    run), or by default the last ``days`` days."""
    settings, project, engine = _start()
    moment = parse_now(now)
    project = project or load(settings, only=[])  # the policy (window, basis, retention), no trigger
    engine = engine or get_engine(settings.database_url)
    tally = attribute_orders(quote(engine), quote(project), moment)
    start, stop = report_period(moment, since, days)
    report = build_report_task(quote(engine), quote(project), start, stop, moment)
    publish_report(report, tally, settings)
    message = (f"attributed {tally.attributed} of {tally.orders_seen} new order(s); "
               f"{len(report.triggers)} trigger(s) reported")
    return Completed(message=message, data=report)


def run_report_in_prefect(now: datetime, *, settings: Settings, project: Project,
                          engine: Engine | None = None) -> "Report":
    """``lifecycle-report`` as a flow run from this process (``lifecycle serve`` reporting to a
    Prefect server): the same artifacts as a deployed run's."""
    with _handing(settings, project, engine), tags("lifecycle", "report"):
        state = report_flow(now=now.isoformat(), return_state=True)
    from flows.analysis.report import Report

    report = state.result()  # raises the run's own error when it failed
    assert isinstance(report, Report)
    return report


def reports_link(settings: Settings, report: "Report") -> str:
    """The reports page of ``lifecycle web`` for the report's very period (UTC moments)."""
    def moment(value: datetime) -> str:
        return f"{value.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"

    return f"{settings.base_url.rstrip('/')}/reports?since={moment(report.since)}&until={moment(report.until)}"


def report_markdown(report: "Report", tally: "AttributionTally", link: str, page_on: bool) -> str:
    from flows.analysis.report import money

    lines = [f"# Lifecycle report, {report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC", "",
             f"Attribution: last touch ({' or '.join(report.basis)}) within {report.window.days} day(s). "
             f"This run looked at {tally.orders_seen} new order(s): {tally.attributed} attributed "
             f"({', '.join(f'{n} by {basis}' for basis, n in tally.by_basis.items()) or 'none'}), "
             f"{tally.unattributed} with no mail to credit.", ""]
    lines += [f"- {line}" for line in report.lines()] or ["No marketing mail in this period."]
    missing = report.unattributed
    lines += ["", f"Orders in the period with no mail to credit: {missing.orders} ({money(missing.revenue)})."]
    if missing.pending:
        lines.append(f"Orders not attributed yet: {missing.pending}.")
    lines += ["", f"[The reports page]({link})" + ("" if page_on else
                                                    " (off until LIFECYCLE_ADMIN_TOKEN is set for lifecycle web)")]
    return "\n".join(lines)


def report_table(report: "Report") -> list[dict[str, Any]]:
    """One row per trigger: counts, rates, revenue per currency (cents), and each holdout's verdict."""
    currencies = report.currencies
    rows = []
    for row in report.rows_of("trigger"):
        entry: dict[str, Any] = {
            "trigger": row.trigger, "delivered": row.delivered, "bounced": row.bounced,
            "unique_clicks": row.unique_clicks, "click_rate": _rate(row.click_rate), "conversions": row.conversions,
            "conversion_rate": _rate(row.conversion_rate)}
        for currency in currencies:
            entry[f"revenue_cents_{currency}"] = row.revenue.get(currency, 0)
        entry["holdout"] = "; ".join(f"{lift.currency + ': ' if lift.currency else ''}{lift.verdict}"
                                     for lift in report.holdouts if lift.trigger == row.trigger) or "-"
        rows.append(entry)
    return rows


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


def publish_report(report: "Report", tally: "AttributionTally", settings: Settings) -> None:
    """The report's artifacts: a markdown summary, a table, and a link to the reports page."""
    link = reports_link(settings, report)
    page_on = settings.reports_page_on
    headline = f"{len(report.triggers)} trigger(s), {tally.attributed} new order(s) attributed"
    create_markdown_artifact(key="lifecycle-report-summary", markdown=report_markdown(report, tally, link, page_on),
                             description=headline)
    create_table_artifact(key="lifecycle-report-table", table=report_table(report),
                          description="Per trigger: delivered, clicks, conversions, revenue (cents), holdout")
    create_link_artifact(key="lifecycle-report-page", link=link, link_text="Lifecycle reports page",
                         description="The charts and cards of this period in lifecycle web (needs the admin token)")
