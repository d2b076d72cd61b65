"""Faults at the SMTP server: every deliverable mail arrives exactly once, counted at the server."""

import random
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import select
from sqlmodel import Session

from flows.send.smtp import RelayRefused, SmtpUnavailable
from flows.settings import Settings
from flows.surfaces.environment import settings_from_environment
from models import Send, Suppression
from tests.support import ledger
from tests.support.builders import NOW, Store, ago
from tests.support.runs import run
from tests.support.smtp_server import PostfixSink, Script, SmtpServer


def sent_in_ledger(store: Store) -> set[str]:
    return ledger.addresses(store.engine, "sent")


def test_a_mix_of_temporary_rejections_dropped_connections_and_hard_bounces(settings: Settings, store: Store,
                                                                           smtp: SmtpServer) -> None:
    emails = store.lapsed(120)
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
    summary = run(settings.model_copy(update={"in_flight": 10}), "winback-lapsed")

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
        emails = store.lapsed(12)
        # Half a second allowed per reply: 0.3 s is slow but fine; then slower than the timeout.
        for url, expect_in_doubt in ((f"smtp://127.0.0.1:{slow.port}?connections=4&timeout=0.5", False),
                                     (f"smtp://127.0.0.1:{slow.port}?connections=4&timeout=0.2", True)):
            monkeypatch.setenv("LIFECYCLE_DATABASE_URL", db_url)
            monkeypatch.setenv("LIFECYCLE_SMTP_URL", url)
            monkeypatch.setenv("LIFECYCLE_TRIGGERS_DIR", str(project_dir / "triggers"))
            monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(project_dir / "templates"))
            monkeypatch.setenv("LIFECYCLE_SMTP_BACKOFF_SECONDS", "0.01")
            settings_from_environment.cache_clear()
            if expect_in_doubt:
                for i in range(5):
                    store.order(store.customer(f"Neu{i}"), ago(days=500))
            summary = run(settings_from_environment(), "winback-lapsed")
            if expect_in_doubt:
                # The server took longer than the timeout to answer DATA: the mail may or may not
                # be accepted, so it is never retried — at most once, reported in doubt.
                assert summary.outcomes == {"failed:in_doubt": 5, "skipped:already_sent": 12}
            else:
                assert summary.outcomes == {"sent": 12}
    finally:
        settings_from_environment.cache_clear()
        slow.stop()  # lets the slow handlers finish their last accepts
    received = Counter(r.recipients[0] for r in slow.received)
    assert set(received.values()) == {1}  # in doubt or not: never twice
    assert set(emails) <= set(received)


# -- against Postfix's smtp-sink, counted at the sink's own dump ------------------------

def with_sink(settings: Settings, sink: PostfixSink, monkeypatch: pytest.MonkeyPatch, **update: object) -> Settings:
    monkeypatch.setenv("LIFECYCLE_SMTP_URL", sink.url)  # for flows, which read the environment
    settings_from_environment.cache_clear()
    return settings.model_copy(update={"smtp_url": sink.url, **update})


def test_sender_processes_deliver_every_mail_once_to_postfix(settings: Settings, store: Store,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    emails = store.lapsed(90)
    sink = PostfixSink().start()
    try:
        to_sink = with_sink(settings, sink, monkeypatch, batch_size=10, workers=2, in_flight=4)
        summary = run(to_sink, "winback-lapsed")
        received = Counter(sink.recipients())
    finally:
        sink.stop()
    assert summary.outcomes == {"sent": 90}
    assert set(received) == set(emails) and set(received.values()) == {1}
    assert sent_in_ledger(store) == set(emails)


@pytest.mark.parametrize("flags", [
    ["-r", "RCPT"],  # 450 at every RCPT
    ["-Q", "RCPT"],  # 421 and the connection dropped mid-session
])
def test_postfix_deferring_every_recipient_sends_and_marks_nothing(settings: Settings, store: Store,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   flags: list[str]) -> None:
    store.lapsed(6)
    sink = PostfixSink(*flags).start()
    try:
        to_sink = with_sink(settings, sink, monkeypatch, smtp_attempts=2)
        summary = run(to_sink, "winback-lapsed")
        received = sink.recipients()
    finally:
        sink.stop()
    assert summary.outcomes == {"retry:smtp_temporary": 6}
    assert received == [] and sent_in_ledger(store) == set()
    with Session(store.engine) as session:
        assert session.execute(select(Send.status)).scalars().all() == []  # released for the next run
        assert session.execute(select(Suppression)).scalars().all() == []


@pytest.mark.parametrize("flags", [
    ["-f", "RCPT"],  # 500 5.3.0 at every RCPT
    ["-f", "MAIL"],  # ... at every MAIL FROM
    ["-f", "DATA"],  # ... at every DATA
])
def test_postfix_refusing_every_mail_stops_the_run_and_blames_nobody(settings: Settings, store: Store,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     flags: list[str]) -> None:
    store.lapsed(6)
    sink = PostfixSink(*flags).start()
    try:
        to_sink = with_sink(settings, sink, monkeypatch, smtp_attempts=2)
        with pytest.raises(RelayRefused, match=r"refused 3 of the batch's first 6 recipients.*5.3.0 Error: command"):
            run(to_sink, "winback-lapsed")
        received = sink.recipients()
    finally:
        sink.stop()
    assert received == [] and sent_in_ledger(store) == set()
    with Session(store.engine) as session:
        assert session.execute(select(Send.status)).scalars().all() == []  # every claim released
        assert session.execute(select(Suppression)).scalars().all() == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_server_down_for_a_while_is_waited_for_with_backoff(settings: Settings, store: Store,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    emails = store.lapsed(5)
    sink = PostfixSink()
    comes_back = threading.Timer(1.0, sink.start)
    to_sink = with_sink(settings, sink, monkeypatch, smtp_attempts=6, smtp_backoff_seconds=0.3,
                    smtp_backoff_max_seconds=1.0)
    comes_back.start()
    try:
        summary = run(to_sink, "winback-lapsed")
        received = Counter(sink.recipients())
    finally:
        comes_back.join()
        sink.stop()
    assert summary.outcomes == {"sent": 5}
    assert set(received) == set(emails) and set(received.values()) == {1}


@pytest.mark.usefixtures("prefect")
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_server_lost_mid_run_fails_the_flow_and_a_rerun_completes_it_once(settings: Settings, store: Store,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.surfaces.prefect_flows import trigger_flow

    emails = set(store.lapsed(600))
    sink = PostfixSink().start()
    monkeypatch.setenv("LIFECYCLE_BATCH_SIZE", "40")
    monkeypatch.setenv("LIFECYCLE_WORKERS", "2")
    monkeypatch.setenv("LIFECYCLE_SMTP_ATTEMPTS", "3")
    with_sink(settings, sink, monkeypatch)  # the flow reads the environment, as a deployed run does
    flow = trigger_flow

    def lose_the_server() -> None:
        deadline = time.monotonic() + 60
        while len(sink.recipients()) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        sink.process.kill()  # type: ignore[union-attr]

    killer = threading.Thread(target=lose_the_server)
    killer.start()
    try:
        with pytest.raises(SmtpUnavailable, match="unreachable after 3 attempts"):
            flow(trigger="winback-lapsed", now=NOW.isoformat())
    finally:
        killer.join()
    first = sink.recipients()
    statuses, in_doubt = ledger.statuses(store.engine), ledger.addresses(store.engine, "sending")
    assert 60 <= len(first) < 600 and statuses["claimed"] == 0
    assert sent_in_ledger(store) == set(first) - in_doubt  # nothing reported sent that the sink did not take
    assert len(in_doubt) <= 2 * 2  # what each sender's 2 connections were handing over

    back = PostfixSink(port=sink.port).start()
    try:
        flow(trigger="winback-lapsed", now=NOW.isoformat())
        second = back.recipients()
    finally:
        back.stop()
        sink.stop()
    received = Counter(first + second)
    assert set(received.values()) == {1}  # nobody twice across both runs
    assert set(received) | in_doubt == emails
