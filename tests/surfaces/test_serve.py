"""lifecycle serve: APScheduler runs the trigger files' schedules in-process, driven here by a controlled clock."""

import os
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import apscheduler.schedulers.base as scheduler_base
import pytest
from apscheduler.executors.debug import DebugExecutor
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.base import BaseScheduler

from flows.run import execute
from flows.run_context import prepare
from flows.send.batch import dispatch_prepared
from flows.settings import Settings
from flows.spec.project import load_project
from flows.surfaces.serve import JOB_DEFAULTS, TriggerScheduler
from tests.support import ROOT
from tests.support.builders import NOW, Store
from tests.support.children import child_env
from tests.support.runs import run
from tests.support.smtp_server import SmtpServer

RUNS: list[str] = []  # what the scheduled job function was called with


def record(trigger: str) -> None:
    RUNS.append(trigger)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """APScheduler reads the time through its module's `datetime`; we hand it ours."""
    clock = Clock(datetime(2026, 3, 16, 7, 0, tzinfo=UTC))

    class ControlledDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return clock.now.astimezone(tz) if tz else clock.now.replace(tzinfo=None)

    monkeypatch.setattr(scheduler_base, "datetime", ControlledDatetime)
    RUNS.clear()
    return clock


class SteppedScheduler(BaseScheduler):
    """Processes due jobs only when the test calls step()."""

    def wakeup(self) -> None:
        pass

    def shutdown(self, wait: bool = True) -> None:
        super().shutdown(wait)

    def step(self) -> None:
        self._process_jobs()


def only_trigger(project_dir: Path, cron: str = "0 9 * * *", timezone_name: str = "Europe/Berlin") -> Path:
    """Keep one trigger file (winback) with the given schedule."""
    triggers = project_dir / "triggers"
    for path in triggers.glob("*.yaml"):
        if path.name not in ("stages.yaml", "winback.yaml"):
            path.unlink()
    text = (triggers / "winback.yaml").read_text()
    text = text.replace('  cron: "0 10 * * 1"      # Mondays, 10:00 Berlin time', f'  cron: "{cron}"')
    (triggers / "winback.yaml").write_text(text.replace("timezone: Europe/Berlin", f"timezone: {timezone_name}"))
    return triggers


def make(project_dir: Path, jobstore=None, executor=None, run=record) -> tuple[SteppedScheduler, TriggerScheduler]:
    scheduler = SteppedScheduler(jobstores={"default": jobstore or MemoryJobStore()},
                                 executors={"default": executor or DebugExecutor()},
                                 job_defaults=JOB_DEFAULTS, timezone="UTC")
    triggers = TriggerScheduler(scheduler, lambda: load_project(project_dir / "triggers", project_dir / "templates"),
                                [project_dir / "triggers", project_dir / "templates"], run=run)
    scheduler.start(paused=True)
    triggers.sync()
    scheduler.resume()
    return scheduler, triggers


def test_every_enabled_trigger_is_scheduled_with_its_cron_and_time_zone(project_dir: Path, clock: Clock) -> None:
    disabled = project_dir / "triggers" / "referral.yaml"
    disabled.write_text(disabled.read_text().replace("enabled: true", "enabled: false"))
    scheduler, _ = make(project_dir)
    jobs = {job.id: job for job in scheduler.get_jobs()}
    assert set(jobs) == {"abandoned-cart", "complaint-ack", "we-miss-you", "onboarding-day-0", "winback-lapsed",
                         "confirm-subscription", "post-purchase-nps"}
    # Monday 2026-03-16 07:00 UTC = 08:00 in Berlin (CET): the win-back fires at 10:00 Berlin, 09:00 UTC.
    assert jobs["winback-lapsed"].next_run_time == datetime(2026, 3, 16, 9, 0, tzinfo=UTC)
    assert jobs["we-miss-you"].next_run_time == datetime(2026, 3, 16, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(("weekday", "expected"), [
    ("1", "mon"), ("0", "sun"), ("1-5", "mon,tue,wed,thu,fri"), ("*/2", "sun,tue,thu,sat"),
    ("mon-fri", "mon,tue,wed,thu,fri"), ("*", "*"), ("5,6,0", "sun,fri,sat"), ("sun-tue", "sun,mon,tue"),
    ("sun-sat", "sun,mon,tue,wed,thu,fri,sat"), ("mon,3", "mon,wed"), ("SUN", "sun"),
])
def test_standard_cron_weekdays_mean_the_same_to_apscheduler(weekday: str, expected: str) -> None:
    from flows.clock import apscheduler_fields

    assert apscheduler_fields(f"0 9 * * {weekday}")["day_of_week"] == expected


def test_apscheduler_and_the_cron_slots_of_the_engine_agree() -> None:
    from flows.clock import next_slot
    from flows.surfaces.serve import cron_trigger

    start = datetime(2026, 3, 16, 7, 0, tzinfo=UTC)
    for cron in ("0 10 * * 1", "30 9 * * 1-5", "0 8 1 * *", "*/15 * * * 0", "0 10 * * sun-tue", "0 10 * * mon,3"):
        ours = next_slot(cron, "Europe/Berlin", start)
        theirs = cron_trigger(cron, "Europe/Berlin").get_next_fire_time(None, start)
        assert ours == theirs, cron


def test_a_trigger_runs_at_its_slot_and_only_once_per_slot(project_dir: Path, clock: Clock) -> None:
    only_trigger(project_dir)  # 09:00 Berlin = 08:00 UTC in March
    scheduler, _ = make(project_dir)
    clock.now = datetime(2026, 3, 16, 7, 59, 59, tzinfo=UTC)
    scheduler.step()
    assert RUNS == []
    clock.now = datetime(2026, 3, 16, 8, 0, tzinfo=UTC)
    scheduler.step()
    scheduler.step()
    assert RUNS == ["winback-lapsed"]
    assert scheduler.get_job("winback-lapsed").next_run_time == datetime(2026, 3, 17, 8, 0, tzinfo=UTC)


def test_daylight_saving_time_keeps_local_time(project_dir: Path, clock: Clock) -> None:
    only_trigger(project_dir)
    clock.now = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)  # Berlin switches to CEST on the 29th
    scheduler, _ = make(project_dir)
    scheduler.step()
    assert RUNS == []
    clock.now = datetime(2026, 3, 29, 7, 0, tzinfo=UTC)  # 09:00 CEST, no longer 08:00 UTC
    scheduler.step()
    assert RUNS == ["winback-lapsed"]
    assert scheduler.get_job("winback-lapsed").next_run_time.astimezone(UTC) == \
        datetime(2026, 3, 30, 7, 0, tzinfo=UTC)


def test_runs_missed_while_down_are_coalesced_into_one(project_dir: Path, clock: Clock, tmp_path: Path) -> None:
    only_trigger(project_dir, cron="0 * * * *", timezone_name="UTC")  # hourly
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    first, _ = make(project_dir, SQLAlchemyJobStore(url=url), run="tests.surfaces.test_serve:record")
    first.shutdown(wait=False)
    clock.now += timedelta(hours=5, minutes=30)  # down for five slots
    second, _ = make(project_dir, SQLAlchemyJobStore(url=url), run="tests.surfaces.test_serve:record")
    second.step()
    assert RUNS == ["winback-lapsed"]
    assert second.get_job("winback-lapsed").next_run_time == datetime(2026, 3, 16, 13, 0, tzinfo=UTC)


def test_a_run_still_going_at_the_next_slot_is_not_overlapped(project_dir: Path, clock: Clock) -> None:
    only_trigger(project_dir, cron="*/5 * * * *", timezone_name="UTC")
    release, started = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow(trigger: str) -> None:
        calls.append(trigger)
        started.set()
        release.wait(10)

    scheduler, _ = make(project_dir, executor=ThreadPoolExecutor(4), run=slow)
    clock.now = datetime(2026, 3, 16, 7, 5, tzinfo=UTC)
    scheduler.step()
    assert started.wait(5)
    clock.now = datetime(2026, 3, 16, 7, 10, tzinfo=UTC)
    scheduler.step()
    release.set()
    scheduler.shutdown(wait=True)
    assert calls == ["winback-lapsed"]


def test_changed_added_removed_and_broken_files_are_picked_up(project_dir: Path, clock: Clock) -> None:
    triggers = only_trigger(project_dir)
    scheduler, watcher = make(project_dir)
    assert watcher.reload_if_changed() == []  # nothing changed: nothing done
    winback = triggers / "winback.yaml"
    winback.write_text(winback.read_text().replace('cron: "0 9 * * *"', 'cron: "30 9 * * *"'))
    os.utime(winback, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert watcher.reload_if_changed() == ["rescheduled winback-lapsed (30 9 * * * Europe/Berlin)"]
    (triggers / "complaint.yaml").write_text((ROOT / "triggers" / "complaint.yaml").read_text())
    assert watcher.reload_if_changed() == ["scheduled complaint-ack (* * * * * UTC)"]
    winback.write_text(winback.read_text().replace("send_window: 7d", "send_window: soon"))
    assert watcher.reload_if_changed() == []  # broken: keeps its schedule, the problem is reported
    assert scheduler.get_job("winback-lapsed") is not None and watcher.problems
    (triggers / "complaint.yaml").unlink()
    assert watcher.reload_if_changed() == ["removed complaint-ack"]


def test_a_shutdown_lets_the_running_batch_finish_and_stops_before_the_next(
        settings: Settings, store: Store, smtp: SmtpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    store.lapsed(12)
    # In-process sending (workers 1), where the test can signal between batches.
    job = prepare("winback-lapsed", NOW, settings=settings.model_copy(update={"batch_size": 5, "workers": 1}))
    stop = threading.Event()

    def dispatch_then_get_signalled(job, prepared, batch=0):
        counts = dispatch_prepared(job, prepared, batch)
        stop.set()  # SIGTERM arrives while batch 1 is being dispatched
        return counts

    summary = execute(job, dispatch=dispatch_then_get_signalled, should_stop=stop.is_set)
    assert summary.interrupted and summary.outcomes == {"sent": 5}
    assert len(smtp.received) == 5
    rest = run(settings, "winback-lapsed")
    assert rest.outcomes == {"sent": 7, "skipped:already_sent": 5}


def test_the_serve_command_reloads_on_sighup_and_stops_on_sigterm(project_dir: Path, tmp_path: Path) -> None:
    only_trigger(project_dir)
    log = tmp_path / "serve.log"
    process = serve(project_dir / "triggers", project_dir, tmp_path, log)
    try:
        wait_for(log, "Next run of winback-lapsed")
        process.send_signal(signal.SIGHUP)
        wait_for(log, "SIGHUP: reloading trigger files")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert "SIGTERM: finishing running batches, then stopping" in log.read_text()
    assert log.read_text().rstrip().endswith("Stopped")


def serve(triggers: Path, project_dir: Path, tmp_path: Path, log: Path) -> subprocess.Popen[bytes]:
    """`lifecycle serve` as its own process, on a store of its own, writing to ``log``."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'store.db'}", triggers_dir=triggers,
                        templates_dir=project_dir / "templates")
    return subprocess.Popen(["lifecycle", "serve"], env=child_env(settings), stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


def wait_for(log: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in log:\n{log.read_text() if log.exists() else ''}")


def test_serve_survives_cron_forms_it_cannot_run_at_start_and_on_sighup(project_dir: Path, tmp_path: Path) -> None:
    """`0 0 L 2 *` and `0 10 * * 1#2` passed validate, then crashed serve at start and on SIGHUP."""
    triggers = only_trigger(project_dir)
    (triggers / "leap.yaml").write_text((triggers / "winback.yaml").read_text()
                                        .replace("name: winback-lapsed", "name: leap-day")
                                        .replace('cron: "0 9 * * *"', 'cron: "0 0 L 2 *"'))
    log = tmp_path / "serve.log"
    process = serve(triggers, project_dir, tmp_path, log)
    try:
        wait_for(log, "Next run of winback-lapsed")  # the healthy trigger is scheduled
        cron_line = (triggers / "leap.yaml").read_text().splitlines().index('  cron: "0 0 L 2 *"') + 1
        assert f"leap.yaml:{cron_line}: schedule.cron: invalid cron expression '0 0 L 2 *'" in log.read_text()
        winback = triggers / "winback.yaml"
        winback.write_text(winback.read_text().replace('cron: "0 9 * * *"', 'cron: "0 10 * * 1#2"'))
        process.send_signal(signal.SIGHUP)
        wait_for(log, "winback.yaml:")
        time.sleep(1)  # what the handler did next, if it did anything, would be in the log by now
        assert process.poll() is None, log.read_text()  # still serving
        text = log.read_text()
        assert "schedule.cron: invalid cron expression '0 10 * * 1#2'" in text and "Traceback" not in text, text
        assert "removed winback-lapsed" not in text.lower()  # keeps its previous schedule
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert log.read_text().rstrip().endswith("Stopped")


def test_jobs_stored_by_an_earlier_release_keep_their_schedule_after_the_upgrade(tmp_path: Path) -> None:
    """serve's job store outlives a release: a job pointing at the old module is repointed,
    with its next run time, before the scheduler loads it."""
    import pickle

    from apscheduler.schedulers.background import BackgroundScheduler
    from sqlalchemy import text

    from flows.surfaces.serve import JOBS_TABLE, cron_trigger, run_scheduled, upgrade_jobs
    from models.db import make_engine

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = SQLAlchemyJobStore(url=url, tablename=JOBS_TABLE)
    before = BackgroundScheduler(jobstores={"default": store}, timezone="UTC")
    before.start(paused=True)
    before.add_job("flows.surfaces.serve:run_scheduled", cron_trigger("0 10 * * 1", "Europe/Berlin"),
                   args=["winback-lapsed"], id="winback-lapsed", name="winback-lapsed")
    due = before.get_job("winback-lapsed").next_run_time
    before.shutdown(wait=False)
    engine = make_engine(url)
    with engine.begin() as connection:  # as the earlier release stored it
        blob = connection.execute(text(f"SELECT job_state FROM {JOBS_TABLE}")).scalar_one()
        state = pickle.loads(blob)
        state["func"] = "flows.serve:run_scheduled"
        connection.execute(text(f"UPDATE {JOBS_TABLE} SET job_state = :s"), {"s": pickle.dumps(state)})

    assert upgrade_jobs(engine) == 1
    assert upgrade_jobs(engine) == 0  # once
    after = BackgroundScheduler(jobstores={"default": SQLAlchemyJobStore(url=url, tablename=JOBS_TABLE)},
                                timezone="UTC")
    after.start(paused=True)
    try:
        [job] = after.get_jobs()
        assert job.func is run_scheduled and job.args == ("winback-lapsed",) and job.next_run_time == due
    finally:
        after.shutdown(wait=False)


@pytest.mark.usefixtures("prefect")
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_scheduled_run_reports_to_a_prefect_server_as_a_run_of_the_one_flow(settings: Settings, store: Store,
                                                                            smtp: SmtpServer) -> None:
    """With a server configured, serve's runs look like deployed ones: same flow, same tags, counts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    from flows.surfaces import serve as serving
    from models.db import get_engine
    from models.types import utcnow

    store.complaint(store.customer("Ida"), utcnow() - timedelta(hours=1))  # serve runs at the real now
    engine = get_engine(settings.database_url)
    serving._SERVICE.append(serving.Service(settings, engine, report_to_prefect=True))
    try:
        serving.run_scheduled("complaint-ack")
    finally:
        serving._SERVICE.pop()
    assert len(smtp.received) == 1
    with get_client(sync_client=True) as client:
        recent = client.read_flow_runs(limit=50, sort=FlowRunSort.START_TIME_DESC)  # this worker's newest first
        runs = [r for r in recent if r.name.startswith("complaint-ack @ ")]
        assert runs, "the scheduled run is not on the server"
        flow = client.read_flow(runs[0].flow_id)
    assert flow.name == "lifecycle-trigger"
    assert set(runs[0].tags) == {"lifecycle", "kind:complaint", "trigger:complaint-ack"}
    assert runs[0].state.message == "sent 1"
