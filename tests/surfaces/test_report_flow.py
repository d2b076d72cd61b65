"""lifecycle-report: the daily attribution and report, as a Prefect flow with artifacts (deployed daily from
prefect.yaml) and as a job of lifecycle serve."""

import re
from datetime import datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from apscheduler.executors.debug import DebugExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import func, select
from sqlmodel import Session
from typer.testing import CliRunner

from flows.settings import Settings
from flows.surfaces.deployments import deployments
from models import Attribution, Order, Send
from models.types import utcnow
from tests.support import ROOT
from tests.support.builders import NOW, Store
from tests.support.outcomes import Outcomes

TRIGGER = "abandoned-cart"


def delivered_and_ordered(store: Store, sent_at: datetime) -> None:
    """One cart mail delivered and an order a day later (credited to the delivery), and an order from a
    customer no mail went to (unattributed)."""
    buyer, stranger = store.customer("Bea"), store.customer("Sam")
    with Session(store.engine) as session:
        session.add(Send(send_key=f"{TRIGGER}/{buyer.external_id}/1", trigger=TRIGGER, customer_id=buyer.id,
                         occurrence="1", status="sent", run_id="run-1", stage="active",
                         template="abandoned_cart/default.de.html.j2", email=buyer.email,
                         message_id=f"<{buyer.external_id}@shop.example>", evaluated_at=sent_at, claimed_at=sent_at))
        session.commit()
    store.order(buyer, sent_at + timedelta(days=1), total=80.0)
    store.order(stranger, sent_at + timedelta(days=1), total=12.5)


def attributions(store: Store) -> tuple[int, int]:
    """(orders looked at, orders credited to a mail)."""
    with Session(store.engine) as session:
        seen = session.execute(select(func.count()).select_from(Attribution)).scalar_one()
        credited = session.execute(select(func.count()).select_from(Attribution)
                                   .where(Attribution.send_id.is_not(None))).scalar_one()  # type: ignore[union-attr]
    return seen, credited


def artifacts_of(run_id: str) -> dict[str, dict]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        # The client's read_artifacts sends nulls this server version rejects; ask the API directly.
        response = client.request("POST", "/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 50, "offset": 0, "sort": "ID_DESC"})
    return {a["key"]: a for a in response.json()}


@pytest.mark.usefixtures("prefect")
@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_a_run_attributes_new_orders_and_publishes_summary_table_and_link(settings: Settings, store: Store) -> None:
    from flows.surfaces.prefect_flows import report_flow

    delivered_and_ordered(store, NOW - timedelta(days=3))
    state = report_flow(now=NOW.isoformat(), return_state=True)  # as a deployed run: settings from the environment
    assert state.is_completed(), state
    assert attributions(store) == (2, 1)
    assert state.message == "attributed 1 of 2 new order(s); 1 trigger(s) reported"

    artifacts = artifacts_of(str(state.state_details.flow_run_id))
    assert set(artifacts) == {"lifecycle-report-summary", "lifecycle-report-table", "lifecycle-report-page"}
    summary = artifacts["lifecycle-report-summary"]
    assert summary["type"] == "markdown"
    week = NOW - timedelta(days=7)
    assert f"# Lifecycle report, {week:%Y-%m-%d %H:%M} to {NOW:%Y-%m-%d %H:%M} UTC" in summary["data"]
    assert "2 new order(s): 1 attributed (1 by delivery), 1 with no mail to credit" in summary["data"]
    assert f"- {TRIGGER}: 1 delivered" in summary["data"] and "EUR 80.00" in summary["data"]

    table = artifacts["lifecycle-report-table"]
    assert table["type"] == "table"
    [row] = yaml.safe_load(table["data"])  # JSON, which YAML reads too
    assert row["trigger"] == TRIGGER and row["delivered"] == 1 and row["conversions"] == 1
    assert row["revenue_cents_EUR"] == 8_000 and row["conversion_rate"] == "100.0%"

    link = artifacts["lifecycle-report-page"]  # Prefect stores a link artifact as markdown: [text](url)
    text, url = re.fullmatch(r"\[([^\]]+)\]\(([^)]+)\)", link["data"]).groups()
    assert text == "Lifecycle reports page"
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == settings.base_url and parts.path == "/reports"
    period = parse_qs(parts.query)
    assert period == {"since": [f"{week:%Y-%m-%dT%H:%M:%SZ}"], "until": [f"{NOW:%Y-%m-%dT%H:%M:%SZ}"]}

    again = report_flow(now=(NOW + timedelta(hours=1)).isoformat(), return_state=True)
    assert again.message == "attributed 0 of 0 new order(s); 1 trigger(s) reported"  # incremental
    assert attributions(store) == (2, 1)


@pytest.mark.usefixtures("prefect")
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_since_the_last_run_reports_from_the_previous_completed_runs_moment(settings: Settings,
                                                                           store: Store) -> None:
    from flows.surfaces.prefect_flows import report_flow

    first = NOW + timedelta(days=30)  # later than any other test's run on this server
    assert report_flow(now=first.isoformat(), return_state=True).is_completed()
    state = report_flow(now=(first + timedelta(days=1)).isoformat(), since="last-run", return_state=True)
    report = state.result()
    assert (report.since, report.until) == (first, first + timedelta(days=1))


def test_without_since_the_period_is_the_last_days() -> None:
    from flows.surfaces.prefect_flows import report_period

    assert report_period(NOW, None, 7) == (NOW - timedelta(days=7), NOW)
    assert report_period(NOW, "2026-03-01T00:00:00", 7)[0] == datetime(2026, 3, 1, tzinfo=NOW.tzinfo)


def test_the_report_is_deployed_daily_from_prefect_yaml_and_the_check_accepts_it(
        project_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.surfaces.cli import app
    from flows.surfaces.environment import settings_from_environment
    from flows.surfaces.prefect_flows import report_flow

    shipped = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    report = shipped["lifecycle-report"]
    assert report == next(d for d in deployments([]) if d["name"] == "lifecycle-report")
    assert report["entrypoint"] == "flows/surfaces/prefect_flows.py:report_flow"
    [schedule] = report["schedules"]
    minute, hour, *rest = schedule["cron"].split()
    assert minute.isdigit() and hour.isdigit() and rest == ["*", "*", "*"] and schedule["active"]  # once a day
    assert report_flow.name == "lifecycle-report"
    assert set(report_flow.parameters.properties) == {"now", "since", "days"}

    (project_dir / "prefect.yaml").write_text((ROOT / "prefect.yaml").read_text())
    monkeypatch.chdir(project_dir)
    for name in ("LIFECYCLE_TRIGGERS_DIR", "LIFECYCLE_TEMPLATES_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings_from_environment.cache_clear()
    try:
        result = CliRunner().invoke(app, ["deployments", "--check"])
    finally:
        settings_from_environment.cache_clear()
    assert result.exit_code == 0, result.output


# -- lifecycle serve's daily job -------------------------------------------------------------------

def test_serve_schedules_the_daily_attribution_and_report() -> None:
    from flows.surfaces.serve import DEFERRED_JOB, REPORT_CRON, REPORT_JOB, schedule_jobs

    scheduler = BackgroundScheduler(jobstores={"default": MemoryJobStore()}, executors={"default": DebugExecutor()},
                                    timezone="UTC")
    scheduler.start(paused=True)
    try:
        schedule_jobs(scheduler)
        job = scheduler.get_job(REPORT_JOB)
        assert job is not None and job.func_ref == "flows.surfaces.serve:run_report"
        minute, hour = (int(part) for part in REPORT_CRON.split()[:2])
        now = utcnow()
        upcoming = job.trigger.get_next_fire_time(None, now)
        assert (upcoming.hour, upcoming.minute) == (hour, minute) and upcoming - now <= timedelta(days=1)
        assert scheduler.get_job(DEFERRED_JOB) is not None
        kept = job.next_run_time
        schedule_jobs(scheduler)  # a restart over the persistent store keeps the stored next run
        assert scheduler.get_job(REPORT_JOB).next_run_time == kept
    finally:
        scheduler.shutdown(wait=False)


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_serve_s_daily_job_attributes_the_new_orders(settings: Settings, store: Store,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from flows.surfaces import serve as serving

    delivered_and_ordered(store, utcnow() - timedelta(days=3))  # serve runs at the real now
    serving._SERVICE.append(serving.Service(settings, store.engine))
    try:
        with caplog.at_level("INFO", logger="lifecycle.serve"):
            serving.run_report()
    finally:
        serving._SERVICE.pop()
    assert attributions(store) == (2, 1)
    with Session(store.engine) as session:
        assert session.execute(select(func.count()).select_from(Order)).scalar_one() == 2
    assert "Attribution: 2 new order(s), 1 attributed, 1 with no mail to credit" in caplog.text
    assert f"{TRIGGER}: 1 delivered" in caplog.text


@pytest.mark.usefixtures("prefect")
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_run_as_of_a_past_moment_leaves_out_the_clicks_and_orders_that_came_later(settings: Settings,
                                                                                  store: Store) -> None:
    from flows.surfaces.prefect_flows import report_flow

    o = Outcomes(store)
    customer = store.customer("Lea")
    sent = NOW - timedelta(days=3)
    send = o.send(customer, TRIGGER, sent)
    o.click(send, sent + timedelta(days=1))
    o.order(customer, sent + timedelta(days=1, hours=1), total=59.0)
    assert report_flow(now=NOW.isoformat(), return_state=True).is_completed()  # the order is attributed now
    today = report_flow(now=NOW.isoformat(), return_state=True).result().row(TRIGGER)
    assert (today.delivered, today.unique_clicks, today.conversions, today.revenue) == (1, 1, 1, {"EUR": 5_900})

    back_then = report_flow(now=(sent + timedelta(hours=12)).isoformat(), return_state=True).result()
    row = back_then.row(TRIGGER)
    assert (row.delivered, row.unique_clicks, row.conversions, row.revenue) == (1, 0, 0, {})


@pytest.mark.parametrize("token, page_on", [(None, False), ("", False), ("reports-token-0123456789", True)])
def test_the_artifacts_say_the_page_is_off_exactly_when_lifecycle_web_serves_none(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, token: str | None, page_on: bool) -> None:
    from fastapi import FastAPI
    from pydantic import SecretStr

    from flows.analysis.attribution import AttributionTally
    from flows.analysis.report import Report, Unattributed
    from flows.surfaces import prefect_flows
    from flows.surfaces.web_reports import PATH, add_reports

    made: dict[str, str] = {}
    monkeypatch.setattr(prefect_flows, "create_markdown_artifact", lambda **kw: made.update(kw))
    monkeypatch.setattr(prefect_flows, "create_table_artifact", lambda **kw: None)
    monkeypatch.setattr(prefect_flows, "create_link_artifact", lambda **kw: None)
    configured = settings.model_copy(update={"admin_token": None if token is None else SecretStr(token)})
    report = Report(since=NOW - timedelta(days=7), until=NOW, window=timedelta(days=5), basis=("click",), rows=[],
                    unattributed=Unattributed(orders=0, revenue={}, pending=0), holdouts=[])
    prefect_flows.publish_report(report, AttributionTally(), configured)
    assert ("off until LIFECYCLE_ADMIN_TOKEN is set" not in made["markdown"]) is page_on

    app = FastAPI()
    add_reports(app, configured, engine=None)  # type: ignore[arg-type]  # no request is made
    assert any(getattr(route, "path", None) == PATH for route in app.routes) is page_on
