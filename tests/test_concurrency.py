"""Several workers running the same trigger at the same time against PostgreSQL: each key is sent once."""

import multiprocessing
import os
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from models import Send
from tests.builders import NOW, Store
from tests.conftest import POSTGRES_URL
from tests.smtp_server import SmtpServer

RECIPIENTS = 400


def dispatching_process(env: dict[str, str], barrier, results) -> None:  # runs in a child process
    os.environ.update(env)
    from flows.pipeline import execute, prepare_job
    from flows.settings import get_settings

    job = prepare_job("winback-lapsed", NOW, settings=get_settings())
    barrier.wait()
    summary = execute(job)
    results.put(dict(summary.outcomes))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_processes_sending_the_same_campaign_send_every_mail_once(db_url: str, store: Store, smtp: SmtpServer,
                                                                      project_dir: Path) -> None:
    assert db_url == POSTGRES_URL
    store.lapsed(RECIPIENTS)
    env = {"LIFECYCLE_DATABASE_URL": db_url, "LIFECYCLE_SMTP_URL": smtp.url,
           "LIFECYCLE_TRIGGERS_DIR": str(project_dir / "triggers"),
           "LIFECYCLE_TEMPLATES_DIR": str(project_dir / "templates"),
           "LIFECYCLE_BATCH_SIZE": "50", "LIFECYCLE_IN_FLIGHT": "8", "LIFECYCLE_SECRET": "concurrency-test-secret"}
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
    with Session(store.engine) as session:
        assert session.execute(select(func.count()).select_from(Send).where(Send.status == "sent")).scalar_one() \
            == RECIPIENTS
