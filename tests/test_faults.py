"""Faults at the SMTP server: every deliverable mail arrives exactly once, counted at the server."""

import random
from collections import Counter

import pytest
from sqlalchemy import select
from sqlmodel import Session

from flows.pipeline import execute, prepare_job
from flows.settings import Settings, get_settings
from models import Send, Suppression
from tests.builders import NOW, Store, ago
from tests.smtp_server import Script, SmtpServer


def lapsed_customers(store: Store, count: int) -> list[str]:
    emails = []
    for i in range(count):
        customer = store.customer(f"K{i}")
        store.order(customer, ago(days=500))
        emails.append(customer.email)
    return emails


def sent_in_ledger(store: Store) -> set[str]:
    with Session(store.engine) as session:
        return set(session.execute(select(Send.email).where(Send.status == "sent")).scalars())


def test_a_mix_of_temporary_rejections_dropped_connections_and_hard_bounces(settings: Settings, store: Store,
                                                                           smtp: SmtpServer) -> None:
    emails = lapsed_customers(store, 120)
    rng = random.Random(7)
    bounced, flaky = set(), set()
    for email in emails:
        roll = rng.random()
        if roll < 0.15:
            smtp.handler.scripts[email] = Script(rcpt=["451 4.7.1 Try again later"] * rng.randint(1, 2))
            flaky.add(email)
        elif roll < 0.25:
            smtp.handler.scripts[email] = Script(drop_at_rcpt=1)
            flaky.add(email)
        elif roll < 0.32:
            smtp.handler.scripts[email] = Script(rcpt=["550 5.1.1 No such user"])
            bounced.add(email)
    summary = execute(prepare_job("winback-lapsed", NOW, settings=settings.model_copy(update={"in_flight": 10})))

    received = Counter(r.recipients[0] for r in smtp.received)
    deliverable = set(emails) - bounced
    assert set(received) == deliverable and set(received.values()) == {1}  # each exactly once
    assert flaky <= deliverable and len(flaky) > 10 and len(bounced) > 3
    assert sent_in_ledger(store) == set(received)  # nothing reported sent that the server did not accept
    assert summary.outcomes == {"sent": len(deliverable), "failed:bounced": len(bounced)}
    with Session(store.engine) as session:
        assert {s.email for s in session.execute(select(Suppression)).scalars()} == bounced


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_slow_server_slows_the_run_but_never_causes_duplicates(db_url: str, store: Store, project_dir,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    slow = SmtpServer(data_delay=0.3).start()
    try:
        emails = lapsed_customers(store, 12)
        # Half a second allowed per reply: 0.3 s is slow but fine; then slower than the timeout.
        for url, expect_in_doubt in ((f"smtp://127.0.0.1:{slow.port}?connections=4&timeout=0.5", False),
                                     (f"smtp://127.0.0.1:{slow.port}?connections=4&timeout=0.2", True)):
            monkeypatch.setenv("LIFECYCLE_DATABASE_URL", db_url)
            monkeypatch.setenv("LIFECYCLE_SMTP_URL", url)
            monkeypatch.setenv("LIFECYCLE_TRIGGERS_DIR", str(project_dir / "triggers"))
            monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(project_dir / "templates"))
            monkeypatch.setenv("LIFECYCLE_SMTP_BACKOFF_SECONDS", "0.01")
            get_settings.cache_clear()
            if expect_in_doubt:
                for i in range(5):
                    store.order(store.customer(f"Neu{i}"), ago(days=500))
            summary = execute(prepare_job("winback-lapsed", NOW, settings=get_settings()))
            if expect_in_doubt:
                # The server took longer than the timeout to answer DATA: the mail may or may not
                # be accepted, so it is never retried — at most once, reported in doubt.
                assert summary.outcomes == {"failed:in_doubt": 5, "skipped:already_sent": 12}
            else:
                assert summary.outcomes == {"sent": 12}
    finally:
        get_settings.cache_clear()
        slow.stop()  # lets the slow handlers finish their last accepts
    received = Counter(r.recipients[0] for r in slow.received)
    assert set(received.values()) == {1}  # in doubt or not: never twice
    assert set(emails) <= set(received)
