"""Single-machine mode: every enabled trigger on its own cron schedule, in-process (APScheduler).

No Prefect server is involved: each scheduled run calls the engine directly. Policy:

- **Schedules** are the trigger files' cron expressions in their time zones.
- **No overlap**: at most one run of a trigger at a time (``max_instances=1``); a run
  still going at the next tick makes that tick skip, with a warning.
- **Missed runs** (the machine was down): jobs live in the store's database, so after
  a restart each trigger whose slot passed runs *once* right away (``coalesce``, no
  misfire grace limit). Whether anything is still due then is the trigger's own call:
  a campaign's ``send_window``, onboarding's ``catch_up``, a cart's ``give_up_after``.
- **Reload**: trigger files and templates are re-read on SIGHUP and when a file under
  them changes (checked every few seconds); a broken file is reported (file, line,
  field) and its trigger keeps its previous schedule until fixed. Validation accepts
  only the cron forms APScheduler, cronsim and Prefect read alike (``clock.CRON_FORMS``),
  and each trigger's scheduling, and a reload as a whole, has its own error boundary.
- **Deferred sends** (quiet hours, frequency caps) go out every 5 minutes once their
  moment has come, whatever their trigger's own schedule.
- **Attribution and report**, daily (``REPORT_CRON``, UTC): new orders are attributed
  (incrementally; clicks past the policy's ``keep_for`` are deleted) and the last 7
  days' report is logged, or published as a ``lifecycle-report`` flow run's artifacts
  when a Prefect server is configured.
- **Shutdown**: SIGTERM (or Ctrl-C) stops scheduling, lets each running trigger
  finish the batch it is dispatching, and exits.
"""

import logging
import pickle
import signal
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import Engine

from flows.clock import apscheduler_fields
from flows.run import execute, run
from flows.run_context import load, prepare
from flows.send.probe import check_smtp
from flows.settings import Settings
from flows.signing_secret import resolved
from flows.spec.problems import Problem
from flows.spec.project import Project
from flows.spec.trigger import TriggerBase
from models.db import get_engine, normalise_url
from models.types import utcnow

log = logging.getLogger("lifecycle.serve")
JOBS_TABLE = "apscheduler_jobs"
WATCH_SECONDS = 5
JOB_DEFAULTS = {"coalesce": True, "max_instances": 1, "misfire_grace_time": None}

# Set on SIGTERM: running triggers stop after the batch they are dispatching.
stopping = threading.Event()


def run_scheduled(trigger: str) -> None:
    """One scheduled run (module level, so the persistent job store can refer to it). The
    trigger's file and templates are read again at each run, so an edit counts at the next tick."""
    service = _service()
    project = service.load(only=[trigger])
    if service.report_to_prefect:  # one flow, one set of tags, whoever starts the run
        from flows.surfaces.prefect_flows import run_in_prefect

        summary = run_in_prefect(project.trigger(trigger), utcnow().isoformat(), settings=service.settings,
                                 project=project, engine=service.engine).summary
    else:
        context = prepare(trigger, utcnow(), settings=service.settings, project=project, engine=service.engine)
        summary = run(context, should_stop=stopping.is_set, logger=log)
    log.info(summary.headline())


def cron_trigger(expression: str, timezone: str) -> CronTrigger:
    """A cron expression of ``CRON_FORMS`` as an APScheduler trigger (``apscheduler_fields``:
    the one translation, which ``check_cron`` builds too, so what validates is scheduled)."""
    return CronTrigger(**apscheduler_fields(expression), timezone=timezone)


DEFERRED_JOB = "lifecycle:deferred-sends"
DEFERRED_MINUTES = 5


def run_deferred() -> None:
    """Every few minutes: send what the policy deferred, for every trigger, once its moment has come."""
    service = _service()
    project = service.load()
    now = utcnow()
    enabled = [name for name, trigger in project.triggers.items() if trigger.enabled]
    if enabled:
        check_smtp(service.settings)
    for name in enabled:
        if stopping.is_set():
            return
        try:  # each trigger its own error boundary: one that fails never holds back the others' sends
            context = prepare(name, now, settings=service.settings, project=project, engine=service.engine)
            summary = execute(context, audience=False, should_stop=stopping.is_set, logger=log)
        except Exception:  # logged with its cause; the next trigger goes ahead
            log.exception("Deferred sends of %s failed", name)
            continue
        if summary.counts:
            log.info(summary.headline())


REPORT_JOB = "lifecycle:attribution-report"
REPORT_CRON = "30 5 * * *"  # as the lifecycle-report deployment's (flows.surfaces.deployments.REPORT)


def run_report() -> None:
    """Daily: attribute the orders no run has looked at yet, then report the last days."""
    from flows.analysis.attribution import attribute
    from flows.analysis.report import build_report
    from flows.surfaces.prefect_flows import REPORT_DAYS

    service = _service()
    project = service.load(only=[])  # the policy: window, basis, retention
    now = utcnow()
    if service.report_to_prefect:  # the same artifacts as the deployed lifecycle-report's
        from flows.surfaces.prefect_flows import run_report_in_prefect

        run_report_in_prefect(now, settings=service.settings, project=project, engine=service.engine)
        return
    policy = project.policy
    tally = attribute(service.engine, policy.attribution, now, keep_for=policy.tracking.keep_for)
    log.info("Attribution: %d new order(s), %d attributed, %d with no mail to credit", tally.orders_seen,
             tally.attributed, tally.unattributed)
    report = build_report(service.engine, since=now - timedelta(days=REPORT_DAYS), until=now, policy=policy)
    for line in report.lines():
        log.info("Report, last %d days: %s", REPORT_DAYS, line)


def schedule_jobs(scheduler: BaseScheduler) -> None:
    """serve's own jobs, beside the triggers': the deferred sends and the daily attribution and report."""
    scheduler.add_job("flows.surfaces.serve:run_deferred", "interval", minutes=DEFERRED_MINUTES, id=DEFERRED_JOB,
                      name="deferred sends", replace_existing=True)
    daily = cron_trigger(REPORT_CRON, "UTC")
    existing = scheduler.get_job(REPORT_JOB)
    # Known from the persistent store (a restart): kept, so a day missed while down is reported once.
    if existing is None or repr(existing.trigger) != repr(daily):
        scheduler.add_job("flows.surfaces.serve:run_report", daily, id=REPORT_JOB, name="attribution and report",
                          replace_existing=True)


@dataclass(frozen=True)
class Service:
    """What every scheduled run of this ``serve`` shares: its settings (resolved once, at
    start) and its store. The trigger files are read again at each run, so an edit takes
    effect at the next tick."""

    settings: Settings
    engine: Engine
    report_to_prefect: bool = False  # PREFECT_API_URL set: runs go to that server, as flow runs

    def load(self, only: Collection[str] | None = None) -> Project:
        return load(self.settings, only=only)


_SERVICE: list[Service] = []  # the one ``serve`` of this process (set by ``serve``)


def _service() -> Service:
    if not _SERVICE:
        raise RuntimeError("run_scheduled and run_deferred run inside `lifecycle serve`")
    return _SERVICE[-1]


# Where the job store's jobs pointed before the engine was laid out in stage packages: a
# store that a serve of that release filled keeps its jobs (and their next run times).
_MOVED = {"flows.serve:run_scheduled": "flows.surfaces.serve:run_scheduled",
          "flows.serve:run_deferred": "flows.surfaces.serve:run_deferred"}


def upgrade_jobs(engine: Engine) -> int:
    """Point stored jobs at the functions' new home; returns how many were changed."""
    from sqlalchemy import inspect, text

    if not inspect(engine).has_table(JOBS_TABLE):
        return 0
    changed = 0
    with engine.begin() as connection:
        for job_id, blob in connection.execute(text(f"SELECT id, job_state FROM {JOBS_TABLE}")).all():
            state = pickle.loads(blob)  # written by APScheduler's own store, in this database
            if state.get("func") in _MOVED:
                state["func"] = _MOVED[state["func"]]
                connection.execute(text(f"UPDATE {JOBS_TABLE} SET job_state = :state WHERE id = :id"),
                                   {"state": pickle.dumps(state, pickle.HIGHEST_PROTOCOL), "id": job_id})
                changed += 1
    return changed


def job_store(settings: Settings) -> SQLAlchemyJobStore:
    return SQLAlchemyJobStore(url=normalise_url(settings.database_url), tablename=JOBS_TABLE)


@dataclass
class TriggerScheduler:
    """Keeps an APScheduler scheduler's jobs in step with the trigger files."""

    scheduler: BaseScheduler
    load_project: Callable[[], Any]
    roots: list[Path]
    run: Callable[[str], None] | str = "flows.surfaces.serve:run_scheduled"
    schedules: dict[str, tuple[str, str]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    _stamp: tuple[tuple[str, int], ...] = ()
    # The file watcher's thread and the SIGHUP handler (main thread) both reload: one at a
    # time. Re-entrant: a SIGHUP that lands while the main thread is reloading waits for nothing.
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def sync(self) -> list[str]:
        """(Re)load the trigger files and add, change or remove jobs; returns what changed."""
        with self._lock:
            return self._sync()

    def _sync(self) -> list[str]:
        project = self.load_project()
        self.problems = project.problems
        for problem in project.problems:
            log.warning("Not loaded: %s", problem)
        wanted: dict[str, TriggerBase] = {n: t for n, t in project.triggers.items() if t.enabled}
        broken = set(project.rejected)
        changes = []
        for name in list(self.schedules):
            if name not in wanted and name not in broken:  # removed or disabled (a broken file keeps its job)
                self.scheduler.remove_job(name)
                del self.schedules[name]
                changes.append(f"removed {name}")
        for name, trigger in wanted.items():
            try:  # each trigger its own error boundary: one schedule that fails never stops the others
                change = self._schedule(name, (trigger.schedule.cron, trigger.schedule.timezone))
            except Exception as exc:  # noqa: BLE001 -- logged, located; the trigger keeps its schedule, if any
                log.error("Not scheduled: %s: schedule.cron: %s: %s; %s", project.files.get(name, name), name, exc,
                          "it keeps its previous schedule" if self.scheduler.get_job(name) else "it is not scheduled")
                continue
            if change:
                changes.append(change)
        for change in changes:
            log.info(change.capitalize())
        self._stamp = self.stamp()
        return changes

    def _schedule(self, name: str, schedule: tuple[str, str]) -> str | None:
        """Add or change ``name``'s job; returns what changed, if anything."""
        if self.schedules.get(name) == schedule and self.scheduler.get_job(name):
            return None
        existing = self.scheduler.get_job(name)
        cron = cron_trigger(*schedule)
        # Known from the persistent store (a restart): keep its next run time, so a
        # slot missed while we were down still fires (once) — unless the cron changed.
        if existing is not None and name not in self.schedules and repr(existing.trigger) == repr(cron):
            self.schedules[name] = schedule
            return None
        self.scheduler.add_job(self.run, cron, args=[name], id=name, name=name, replace_existing=True)
        change = f"{'rescheduled' if name in self.schedules else 'scheduled'} {name} ({schedule[0]} {schedule[1]})"
        self.schedules[name] = schedule
        return change

    def stamp(self) -> tuple[tuple[str, int], ...]:
        """Names and modification times of every file under the watched folders."""
        return tuple(sorted((str(p), p.stat().st_mtime_ns) for root in self.roots if root.is_dir()
                            for p in root.rglob("*") if p.is_file()))

    def reload_if_changed(self) -> list[str]:
        return self.sync() if self.stamp() != self._stamp else []


def serve(settings: Settings, workers: int = 4, engine: Engine | None = None,
          report_to_prefect: bool = False) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    engine = engine or get_engine(settings.database_url)
    _SERVICE.append(Service(resolved(settings, engine), engine, report_to_prefect))
    if upgrade_jobs(engine):
        log.info("Job store: jobs of an earlier release now point at flows.surfaces.serve")
    scheduler = BackgroundScheduler(jobstores={"default": job_store(settings)},
                                    executors={"default": ThreadPoolExecutor(workers)},
                                    job_defaults=JOB_DEFAULTS, timezone="UTC")
    triggers = TriggerScheduler(scheduler, lambda: load(settings), [settings.triggers_dir, settings.templates_dir])
    scheduler.start(paused=True)  # jobs from the store are loaded, nothing runs before we sync
    triggers.sync()
    schedule_jobs(scheduler)
    watcher = threading.Thread(target=_watch, args=(triggers,), daemon=True)
    done = threading.Event()

    def on_hangup(*_: Any) -> None:
        log.info("SIGHUP: reloading trigger files")
        try:  # a handler's exception would end serve: a reload that fails keeps the schedules as they are
            triggers.sync()
        except Exception:
            log.exception("Reloading trigger files failed; the previous schedules stay")

    def on_stop(signum: int, *_: Any) -> None:
        log.info("%s: finishing running batches, then stopping", signal.Signals(signum).name)
        stopping.set()
        done.set()

    signal.signal(signal.SIGHUP, on_hangup)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    scheduler.resume()
    watcher.start()
    for job in scheduler.get_jobs():
        log.info("Next run of %s: %s", job.id, job.next_run_time)
    done.wait()
    scheduler.shutdown(wait=True)  # waits for running triggers, which stop after their batch
    log.info("Stopped")
    return 0


def _watch(triggers: TriggerScheduler) -> None:
    while not stopping.wait(WATCH_SECONDS):
        try:
            triggers.reload_if_changed()
        except Exception:  # a reload must never kill the scheduler
            log.exception("Reloading trigger files failed")
