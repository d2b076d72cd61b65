"""One flow identity, however a run starts: a run of ``lifecycle run`` and a deployed run
of the same trigger, executed by ``prefect flow-run execute`` in its own process, read
back from a real Prefect server: the same flow, the same tags, the counts as the message."""

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from uuid import UUID

import pytest
from sqlalchemy import select
from sqlmodel import Session
from typer.testing import CliRunner

from flows.outcomes import Outcome
from flows.run_context import load
from flows.settings import Settings
from flows.summary import RunSummary
from flows.surfaces.cli import app
from flows.surfaces.deployments import deployment, run_tags
from flows.surfaces.environment import settings_from_environment
from models import Send
from tests.support import ROOT
from tests.support.builders import NOW, Store, ago
from tests.support.smtp_server import SmtpServer

TRIGGER = "complaint-ack"
LINK = re.compile(r"^Prefect run: (http://\S+)/runs/flow-run/([0-9a-f-]{36})$", re.MULTILINE)


pytestmark = [pytest.mark.usefixtures("prefect"),
              # The production store; a SQLite file would do as well (the deployed run is another process).
              pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)]


def api_url() -> str:
    """The server this process reports to: ``PREFECT_API_URL`` (set by the ``prefect`` fixture)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    assert url, "the prefect fixture points PREFECT_API_URL at its server"
    return url


def sends(store: Store) -> list[Send]:
    with Session(store.engine) as session:
        return list(session.execute(select(Send).where(Send.trigger == TRIGGER)).scalars())


def deploy(settings: Settings) -> UUID:
    """The trigger's deployment, as ``prefect deploy`` registers it from ``prefect.yaml``: its
    flow loaded from the entrypoint, and the entrypoint, tags and parameters that
    ``flows.surfaces.deployments.deployment`` writes there."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    entry = deployment(load(settings).trigger(TRIGGER))
    path, _, name = entry["entrypoint"].partition(":")
    flow = load_flow_from_entrypoint(f"{ROOT / path}:{name}")
    with get_client(sync_client=True) as client:
        pool = entry["work_pool"]["name"]
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:  # as `prefect work-pool create lifecycle --type process` makes it
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        return client.create_deployment(
            flow_id=client.create_flow(flow), name=entry["name"], entrypoint=entry["entrypoint"],
            description=entry["description"], tags=entry["tags"], parameters=entry["parameters"],
            work_pool_name=pool, path=str(ROOT), parameter_openapi_schema=parameter_schema(flow).model_dump(),
            enforce_parameter_schema=True,
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}])


def execute_as_a_worker(flow_run_id: UUID, home: Path) -> None:
    """``prefect flow-run execute``, what a process worker does with a flow run: in its own
    process, at the project root, with the ``LIFECYCLE_*`` environment and the server's API URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=api_url(), PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="INFO")
    prefect = shutil.which("prefect")
    assert prefect, "prefect is installed with the project"
    done = subprocess.run([prefect, "flow-run", "execute", str(flow_run_id)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def test_a_cli_run_and_a_deployed_run_are_runs_of_one_flow_with_the_same_tags_and_their_counts(
        settings: Settings, store: Store, smtp: SmtpServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    monkeypatch.setenv("COLUMNS", "250")  # the link on one line
    early = store.customer("Ida")
    store.complaint(early, ago(hours=1))
    spec = load(settings).trigger(TRIGGER)

    # 1. As `lifecycle run` starts it, with PREFECT_API_URL pointing at the server.
    settings_from_environment.cache_clear()
    result = CliRunner().invoke(app, ["run", TRIGGER, "--now", NOW.isoformat()])
    assert result.exit_code == 0, result.output
    links = LINK.findall(result.output)
    assert len(links) == 1, result.output
    [(base, linked)] = links
    assert base == api_url().removesuffix("/api")
    cli_run_id = UUID(linked)
    first_sends = sends(store)
    # The linked run is the run that sent.
    assert [(r.customer_id, r.status, r.run_id) for r in first_sends] == [(early.id, "sent", str(cli_run_id))]

    # 2. The same trigger deployed, a run created from the deployment (its parameters plus
    # `now`, as `prefect deployment run --param now=...`), executed in its own process. A
    # complaint came in meanwhile: that run has one mail to send and one already sent.
    late = store.customer("Jo")
    store.complaint(late, ago(minutes=30))
    deployment_id = deploy(settings)
    with get_client(sync_client=True) as client:
        created = client.create_flow_run_from_deployment(deployment_id, parameters={"now": NOW.isoformat()})
    assert created.state is not None and created.state.is_scheduled()
    execute_as_a_worker(created.id, tmp_path / "prefect-home")
    second_sends = [r for r in sends(store) if r.run_id == str(created.id)]
    assert [(r.customer_id, r.status) for r in second_sends] == [(late.id, "sent")]
    assert [len(smtp.handler.to(c.email)) for c in (early, late)] == [1, 1]  # each mail once

    with get_client(sync_client=True) as client:
        cli_run, deployed_run = client.read_flow_run(cli_run_id), client.read_flow_run(created.id)
        flow = client.read_flow(cli_run.flow_id)
        registered = client.read_deployment(deployment_id)

    assert cli_run.deployment_id is None and deployed_run.deployment_id == deployment_id
    assert deployed_run.parameters == {"trigger": TRIGGER, "now": NOW.isoformat()}
    # One flow, whichever way the run started.
    assert flow.name == "lifecycle-trigger"
    assert deployed_run.flow_id == cli_run.flow_id == registered.flow_id
    # The same tags: the deployment's, given to its run, and the ones `lifecycle run` gives its run.
    assert registered.tags == run_tags(spec) == ["lifecycle", "kind:complaint", f"trigger:{TRIGGER}"]
    assert set(cli_run.tags) == set(deployed_run.tags) == set(run_tags(spec))
    assert cli_run.name == deployed_run.name == f"{TRIGGER} @ {NOW:%Y-%m-%d %H:%M} UTC"
    # Each run's final state says its counts, as the ledger has them: the first sent its mail;
    # the second sent the new one and found the first already sent.
    first = RunSummary(TRIGGER, NOW, counts=Counter((r.stage, Outcome.SENT) for r in first_sends))
    second = RunSummary(TRIGGER, NOW, counts=Counter(
        [(r.stage, Outcome.SENT) for r in second_sends] + [(r.stage, Outcome.ALREADY_SENT) for r in first_sends]))
    assert cli_run.state is not None and deployed_run.state is not None
    assert cli_run.state.is_completed() and deployed_run.state.is_completed()
    assert (cli_run.state.message, deployed_run.state.message) == (first.state_message(), second.state_message())
