"""Operations: prefect deploy --all against a real Prefect server, a process worker, event-driven complaints
(from `lifecycle ingest` and from the tracking API of `lifecycle web`)."""

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import count
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from flows.audience.holdout import held_out
from flows.settings import Settings
from flows.spec.project import load_project
from flows.surfaces.outbox import free_port
from flows.surfaces.prefect_events import COMPLAINT_EVENT, COMPLAINT_RESOURCE_PREFIX
from models.db import create_schema, make_engine
from tests.support.builders import NOW, Store, ago
from tests.support.children import lifecycle_bin, lifecycle_variables
from tests.support.ledger import sends
from tests.support.prefect_server import PrefectServer, copy_site, stop
from tests.support.smtp_server import SmtpServer

# One worker for the module under pytest-xdist (--dist loadgroup): its site, a Prefect server and a
# deployed project, is set up once instead of once on every worker that gets one of its tests.
pytestmark = pytest.mark.xdist_group("operations-site")


class Site:
    """A deployed project: its folder, store, SMTP server, Prefect server and one worker."""

    def __init__(self, root: Path, server: PrefectServer, smtp: SmtpServer, database_url: str) -> None:
        self.root, self.server, self.smtp, self.database_url = root, server, smtp, database_url
        self.engine = make_engine(database_url)
        self.store = Store(self.engine)

    def env(self) -> dict[str, str]:
        """What the worker and the commands get on top of the Prefect server's environment."""
        settings = Settings(database_url=self.database_url, smtp_url=self.smtp.url,
                            secret=SecretStr("operations-test-secret"))
        return {**lifecycle_variables(settings), "PREFECT_LOGGING_LEVEL": "INFO"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = copy_site(tmp_path_factory.mktemp("site"))
    server = PrefectServer(tmp_path_factory.mktemp("prefect-home")).start()
    smtp = SmtpServer().start()
    site = Site(root, server, smtp, f"sqlite:///{root / 'store.db'}")
    worker = None
    try:
        server.deploy(root)
        create_schema(site.engine)
        worker = server.worker(root, root / "worker.log", **site.env())
        yield site
    finally:
        if worker:
            stop(worker)
        server.stop()
        smtp.stop()


def test_deploy_all_registers_every_trigger(site: Site) -> None:
    response = httpx.post(f"{site.server.api_url}/deployments/filter", json={"limit": 50, "offset": 0})
    deployments = {d["name"]: d for d in response.json()}
    assert set(deployments) == {"abandoned-cart", "complaint-ack", "we-miss-you", "onboarding-day-0",
                                "post-purchase-nps", "referral-loyal", "winback-lapsed", "confirm-subscription",
                                "deferred-sends", "lifecycle-report"}
    complaint = deployments["complaint-ack"]
    assert complaint["tags"] == ["lifecycle", "kind:complaint", "trigger:complaint-ack"]
    assert complaint["parameters"] == {"trigger": "complaint-ack"}
    assert complaint["work_pool_name"] == "lifecycle"
    [schedule] = complaint["schedules"]
    assert schedule["schedule"]["cron"] == "* * * * *" and schedule["active"] is True


def outside_the_holdout(site: Site, trigger: str) -> str:
    """An external id the trigger's holdout does not draw: builders number customers per process,
    so a plain `customer()` would be held out (and not mailed) depending on which tests ran first."""
    spec = load_project(site.root / "triggers", site.root / "templates", only=[trigger]).triggers[trigger]
    return next(f"{trigger}-{n}" for n in count() if not held_out(spec.holdout, trigger, spec.salt, f"{trigger}-{n}"))


def test_a_worker_runs_a_deployment_to_completion_and_the_mail_arrives(site: Site) -> None:
    lapsed = site.store.customer("Lena", external_id=outside_the_holdout(site, "winback-lapsed"))
    site.store.order(lapsed, ago(days=500))
    done = site.server.run("deployment", "run", "lifecycle-trigger/winback-lapsed", "--param",
                           f"now={NOW.isoformat()}", "--watch", "--watch-timeout", "150", cwd=site.root, timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr + (site.root / "worker.log").read_text()[-3000:]
    assert "Completed" in done.stdout
    [mail] = site.smtp.handler.to(lapsed.email)
    assert mail.message["Subject"] == "Lena, 15 % Rabatt nur für dich"
    assert [r.status for r in sends(site.engine, trigger="winback-lapsed")] == ["sent"]


def test_a_new_complaint_starts_a_run_within_seconds(site: Site, tmp_path: Path) -> None:
    customer = site.store.customer("Karla")
    received = datetime.now(UTC).isoformat()
    events = tmp_path / "complaint.jsonl"
    events.write_text(json.dumps({
        "type": "track", "userId": customer.external_id, "event": "Complaint Received", "timestamp": received,
        "messageId": f"complaint-{customer.id}", "properties": {"complaint_id": f"K-{customer.id}",
                                                                "subject": "Ware fehlt"}}) + "\n")
    ingested = subprocess.run([lifecycle_bin(), "ingest", str(events)], env=site.server.env(**site.env()),
                              capture_output=True, text=True, timeout=120)
    assert ingested.returncode == 0, ingested.stdout + ingested.stderr
    assert "Announced 1 new complaint(s) to Prefect." in ingested.stdout
    announced = time.monotonic()
    deadline = announced + 90
    while time.monotonic() < deadline and not site.smtp.handler.to(customer.email):
        time.sleep(0.2)
    latency = time.monotonic() - announced
    worker_log = (site.root / "worker.log").read_text()
    assert site.smtp.handler.to(customer.email), f"no acknowledgement after {latency:.0f}s\n{worker_log[-3000:]}"
    print(f"\ncomplaint event → acknowledgement received by SMTP: {latency:.1f} s")
    assert latency < 60  # within a minute, not at the next cron tick
    [mail] = site.smtp.handler.to(customer.email)
    assert mail.message["Subject"] == "Wir kümmern uns: Ware fehlt"


def test_a_complaint_tracked_through_the_api_reaches_its_acknowledgement_within_a_minute(site: Site) -> None:
    """The promise as the shop sees it: its backend tracks a complaint with Segment's own Python
    library at T, pointed at `lifecycle web` with only the host and write key changed; the
    acknowledgement reaches the mailbox within a minute (announced to Prefect at once, not
    picked up at the next cron tick)."""
    from segment.analytics import Client

    customer = site.store.customer("Mira")
    write_key = secrets.token_urlsafe(24)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = site.root / "web.log"
    env = site.server.env(**site.env(), LIFECYCLE_WRITE_KEYS=f"backend:{write_key}")
    web = subprocess.Popen([lifecycle_bin(), "web", "--host", "127.0.0.1", "--port", str(port)], cwd=site.root,
                           env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert web.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        backend = Client(write_key, host=url, sync_mode=True, max_retries=0)  # a refusal raises here
        backend.identify(customer.external_id, {"email": customer.email, "firstName": "Mira"})
        tracked, at = time.monotonic(), datetime.now(UTC)
        backend.track(customer.external_id, "Complaint Received",
                      {"complaint_id": f"K-{customer.id}", "subject": "Paket beschädigt"})
        deadline = tracked + 90
        while time.monotonic() < deadline and not site.smtp.handler.to(customer.email):
            time.sleep(0.2)
        latency = time.monotonic() - tracked
    finally:
        stop(web)
    logs = log.read_text()[-3000:] + (site.root / "worker.log").read_text()[-3000:]
    assert site.smtp.handler.to(customer.email), f"no acknowledgement after {latency:.0f}s\n{logs}"
    print(f"\ncomplaint tracked through the API at {at:%H:%M:%S.%f} → acknowledgement received by SMTP: "
          f"{latency:.1f} s")
    assert latency < 60  # within a minute, not at the next cron tick
    [mail] = site.smtp.handler.to(customer.email)
    assert mail.message["Subject"] == "Wir kümmern uns: Paket beschädigt"
    # Through the Prefect event, not the schedule's every-minute run that could have come first.
    found = httpx.post(f"{site.server.api_url}/events/filter", json={
        "filter": {"event": {"name": [COMPLAINT_EVENT]},
                   "resource": {"id": [f"{COMPLAINT_RESOURCE_PREFIX}K-{customer.id}"]}}}).json()
    assert found["total"] == 1, found
    runs = httpx.post(f"{site.server.api_url}/flow_runs/filter", json={"limit": 200}).json()
    assert any(run["created_by"] and run["created_by"]["type"] == "AUTOMATION" and run["state_name"] == "Completed"
               and datetime.fromisoformat(run["created"]) >= at for run in runs), runs
