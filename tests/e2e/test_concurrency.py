"""Several processes at once: workers sending the same trigger (each key once), ingests beside a run."""

import json
import multiprocessing
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlmodel import Session

from flows.settings import Settings
from models import CartItem, Event, Send
from tests.conftest import POSTGRES_URL
from tests.support.builders import NOW, Store
from tests.support.children import child_env, lifecycle_bin
from tests.support.ledger import statuses
from tests.support.smtp_server import SmtpServer

RECIPIENTS = 400


def in_batches(db_url: str, smtp: SmtpServer, project_dir: Path) -> Settings:
    """The shipped project on ``db_url`` and ``smtp``, sent in batches of 50, 8 claims open at once."""
    return Settings(database_url=db_url, smtp_url=smtp.url, triggers_dir=project_dir / "triggers",
                    templates_dir=project_dir / "templates", batch_size=50, in_flight=8,
                    secret=SecretStr("concurrency-test-secret"))


def dispatching_process(env: dict[str, str], barrier, results) -> None:  # runs in a child process
    os.environ.update(env)
    from flows.run import execute
    from flows.run_context import prepare
    from flows.surfaces.environment import settings_from_environment

    job = prepare("winback-lapsed", NOW, settings=settings_from_environment())
    barrier.wait()
    summary = execute(job)
    results.put(dict(summary.outcomes))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_processes_sending_the_same_campaign_send_every_mail_once(db_url: str, store: Store, smtp: SmtpServer,
                                                                      project_dir: Path) -> None:
    assert db_url == POSTGRES_URL
    store.lapsed(RECIPIENTS)
    env = child_env(in_batches(db_url, smtp, project_dir))
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=dispatching_process, args=(env, barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=240) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    print(f"\nprocess outcomes: {outcomes}")
    received = Counter(r.recipients[0] for r in smtp.received)
    assert len(received) == RECIPIENTS and set(received.values()) == {1}  # zero duplicates at the server
    assert sum(o.get("sent", 0) for o in outcomes) == RECIPIENTS
    assert all(o.get("sent", 0) > 0 for o in outcomes), outcomes  # both really sent: they did overlap
    assert statuses(store.engine)["sent"] == RECIPIENTS


# -- SQLite: ingests and a run writing at once ---------------------------------------------

INGESTED = 3_000  # per ingest: 6,000 lines loading while the run dispatches


def _events(tag: str) -> str:
    """Identify, cart and page events for a few thousand customers: reads and writes in every line."""
    lines = []
    for n in range(INGESTED):
        user, moment = f"{tag}-{n // 3}", f"2026-03-0{1 + n % 9}T10:{n % 60:02d}:00Z"
        if n % 3 == 0:
            lines.append(json.dumps({"type": "identify", "userId": user, "timestamp": moment, "messageId": f"{tag}-{n}",
                                     "traits": {"email": f"{user}@example.de", "first_name": "Kim"}}))
        elif n % 3 == 1:
            lines.append(json.dumps({"type": "track", "userId": user, "event": "Product Added", "timestamp": moment,
                                     "messageId": f"{tag}-{n}", "properties": {"product_id": f"p{n}", "price": 9.99}}))
        else:
            lines.append(json.dumps({"type": "page", "userId": user, "timestamp": moment, "messageId": f"{tag}-{n}",
                                     "name": "Home"}))
    return "\n".join(lines) + "\n"


def _until_loading_began(store: Store, ingests: list[subprocess.Popen[str]]) -> None:
    """Wait for the first ingested event: a run started before it would not overlap the loading."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and all(ingest.poll() is None for ingest in ingests):
        with Session(store.engine) as session:
            if session.execute(select(func.count()).select_from(Event)).scalar_one():
                return
        time.sleep(0.01)
    raise AssertionError("the ingests wrote nothing, or finished before the run could start")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_two_ingests_and_a_run_at_once_on_sqlite_lose_nothing(db_url: str, store: Store, project_dir: Path,
                                                              tmp_path: Path) -> None:
    server = SmtpServer(data_delay=0.002).start()  # the run lasts as long as the ingests
    try:
        store.lapsed(RECIPIENTS)
        settings = in_batches(db_url, server, project_dir)
        files = []
        for tag in ("east", "west"):
            files.append(tmp_path / f"{tag}.jsonl")
            files[-1].write_text(_events(tag))
        ingests = [subprocess.Popen([lifecycle_bin(), "ingest", str(f)], env=child_env(settings, COLUMNS="250"),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for f in files]
        context = multiprocessing.get_context("spawn")
        barrier, results = context.Barrier(2), context.Queue()
        run = context.Process(target=dispatching_process, args=(child_env(settings), barrier, results))
        run.start()
        _until_loading_began(store, ingests)  # the run claims only once the ingests are writing
        barrier.wait(timeout=120)
        outputs = [ingest.communicate(timeout=600)[0] for ingest in ingests]
        run.join(timeout=600)
        outcome = results.get(timeout=5) if run.exitcode == 0 else {}
    finally:
        server.stop()

    print(f"\nrun outcome: {outcome}")
    for ingest, output in zip(ingests, outputs, strict=True):
        assert ingest.returncode == 0, output[-3000:]
        assert f"Loaded {INGESTED} event(s), 0 already known, 0 bad line(s) skipped." in output, output[-3000:]
    assert run.exitcode == 0  # its traceback is on stderr
    assert outcome.get("sent", 0) == RECIPIENTS
    received = Counter(r.recipients[0] for r in server.received)
    assert len(received) == RECIPIENTS and set(received.values()) == {1}
    with Session(store.engine) as session:
        assert session.execute(select(func.count()).select_from(Event)).scalar_one() == 2 * INGESTED
        assert session.execute(select(func.count()).select_from(CartItem)).scalar_one() == 2 * INGESTED // 3
        assert session.execute(select(func.count()).select_from(Send).where(Send.status == "sent")).scalar_one() \
            == RECIPIENTS
        # They did overlap: the run began claiming mail while the ingests were writing.
        loading = session.execute(select(func.min(Event.received_at), func.max(Event.received_at))).one()
        claiming = session.execute(select(func.min(Send.claimed_at))).scalar_one()
        assert loading[0] < claiming < loading[1], (loading, claiming)
