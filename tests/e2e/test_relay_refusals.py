"""Refusals at SMTP time: the address is believed only when the code says so, and a relay
that refuses everyone stops the run instead of silencing the customer base."""

from collections import Counter
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlmodel import Session

from flows.send.probe import check_smtp
from flows.send.smtp import RelayRefused
from flows.settings import Settings
from flows.surfaces.environment import settings_from_environment
from models import Feedback, Suppression
from tests.support import ledger
from tests.support.builders import NOW, Store
from tests.support.runs import run
from tests.support.smtp_server import Script, SmtpServer

PASSWORD = "s3cret-Pa55"


def rows(store: Store) -> tuple[Counter[str], set[str], int]:
    """Send states, suppressed addresses, feedback reports."""
    with Session(store.engine) as session:
        suppressed = set(session.execute(select(Suppression.email)).scalars())
        feedback = len(session.execute(select(Feedback.id)).scalars().all())
    return ledger.statuses(store.engine), suppressed, feedback


@pytest.fixture
def relay() -> Iterator[SmtpServer]:
    """A relay that takes our login, then (until fixed) denies relaying to anyone."""
    server = SmtpServer(credentials=("shop", PASSWORD)).start()
    server.handler.refuse_every_rcpt = "554 5.7.1 Relay access denied"
    yield server
    server.stop()


def logged_in(settings: Settings, server: SmtpServer, **update: object) -> Settings:
    url = f"smtp://shop:{PASSWORD}@127.0.0.1:{server.port}?connections=2&timeout=5"
    return settings.model_copy(update={"smtp_url": url, **update})


def test_a_relay_denying_every_recipient_suppresses_nobody_and_fails_the_run(settings: Settings, store: Store,
                                                                            relay: SmtpServer) -> None:
    emails = store.lapsed(40)
    relayed = logged_in(settings, relay)
    with pytest.raises(RelayRefused) as error:
        run(relayed, "winback-lapsed")
    message = str(error.value)
    assert "554 5.7.1 Relay access denied" in message and f"127.0.0.1:{relay.port}" in message
    assert PASSWORD not in message and "\n" not in message
    statuses, suppressed, feedback = rows(store)
    assert statuses == Counter() and suppressed == set() and feedback == 0  # every claim released, nobody blamed
    # The batch stopped at the trip: not 40 refusals, only the streak that tripped (and what was in flight).
    assert sum(relay.handler.rcpt_attempts.values()) <= 10 + 1
    assert relay.received == []

    relay.handler.refuse_every_rcpt = None  # the operator fixes the relay's configuration
    summary = run(relayed, "winback-lapsed")
    assert summary.outcomes == {"sent": 40}
    received = Counter(r.recipients[0] for r in relay.received)
    assert set(received) == set(emails) and set(received.values()) == {1}


def test_a_relay_calling_every_address_unknown_suppresses_nobody(settings: Settings, store: Store,
                                                                 smtp: SmtpServer) -> None:
    emails = store.lapsed(30)
    for email in emails:
        smtp.handler.scripts[email] = Script(rcpt=[f"550 5.1.1 <{email}>: Recipient address rejected: User unknown"])
    with pytest.raises(RelayRefused, match="most as unknown addresses"):
        run(settings, "winback-lapsed")
    statuses, suppressed, feedback = rows(store)
    assert statuses == Counter() and suppressed == set() and feedback == 0


def test_only_a_bad_address_suppresses_and_every_refusal_is_recorded_once(settings: Settings, store: Store,
                                                                          smtp: SmtpServer) -> None:
    emails = store.lapsed(30)
    gone, full, spam = emails[0:3], emails[10:12], emails[20:22]
    for email in gone:
        smtp.handler.scripts[email] = Script(rcpt=[f"550 5.1.1 <{email}>: Recipient address rejected: User unknown"])
    for email in full:
        smtp.handler.scripts[email] = Script(rcpt=["552 5.2.2 Mailbox full"])
    for email in spam:
        smtp.handler.scripts[email] = Script(data=["554 5.7.1 Message rejected as spam"])
    summary = run(settings.model_copy(update={"in_flight": 8}), "winback-lapsed")

    assert summary.outcomes == {"sent": 23, "failed:bounced": 3, "failed:soft_bounce": 2, "failed:rejected": 2}
    received = Counter(r.recipients[0] for r in smtp.received)
    assert set(received) == set(emails) - set(gone + full + spam) and set(received.values()) == {1}
    with Session(store.engine) as session:
        suppressions = {s.email: s.reason for s in session.execute(select(Suppression)).scalars()}
        reports = session.execute(select(Feedback)).scalars().all()
    failed = {s.email: s.error for s in ledger.sends(store.engine, status="failed")}
    assert suppressions == {email.lower(): "hard_bounce" for email in gone}  # one soft bounce is not three
    assert Counter((r.kind, r.source) for r in reports) == {("hard_bounce", "smtp"): 3, ("soft_bounce", "smtp"): 2,
                                                            ("message_failure", "smtp"): 2}
    assert {r.report_id for r in reports} == {f"smtp:{r.send_key}" for r in reports} and len(reports) == 7
    assert {r.email: r.status for r in reports if r.kind == "soft_bounce"} == {e.lower(): "5.2.2" for e in full}
    assert set(failed) == set(gone + full + spam) and failed[spam[0]] == "554 5.7.1 Message rejected as spam"


def test_soft_bounces_at_smtp_time_count_toward_the_soft_bounce_limit(settings: Settings, store: Store,
                                                                     smtp: SmtpServer) -> None:
    emails = store.lapsed(4)
    smtp.handler.scripts[emails[0]] = Script(rcpt=["552 5.2.2 Mailbox full"])
    limited = settings.model_copy(update={"soft_bounce_limit": 1})
    summary = run(limited, "winback-lapsed")
    assert summary.outcomes == {"sent": 3, "failed:soft_bounce": 1}
    _, suppressed, feedback = rows(store)
    assert suppressed == {emails[0].lower()} and feedback == 1


def test_a_login_the_relay_refuses_fails_the_run_before_the_first_send(settings: Settings, store: Store) -> None:
    store.lapsed(5)
    server = SmtpServer(credentials=("shop", "another-password")).start()
    try:
        relayed = logged_in(settings, server)
        with pytest.raises(RelayRefused, match=r"refused our login: 535 5.7.8 Authentication credentials invalid"):
            check_smtp(relayed)
        with pytest.raises(RelayRefused, match="refused our login"):  # and a run without the probe: its first mail
            run(relayed, "winback-lapsed")
        assert server.handler.rcpt_attempts == {} and server.received == []
    finally:
        server.stop()
    assert rows(store) == (Counter(), set(), 0)


def test_a_relay_that_wants_a_login_we_do_not_give_fails_the_run_at_its_first_mail(settings: Settings,
                                                                                   store: Store) -> None:
    store.lapsed(5)
    server = SmtpServer(credentials=("shop", PASSWORD), auth_required=True).start()
    try:
        anonymous = settings.model_copy(update={"smtp_url": f"smtp://127.0.0.1:{server.port}?connections=2&timeout=5"})
        with pytest.raises(RelayRefused, match=r"refused our login: 530 5.7.0 Authentication required"):
            run(anonymous, "winback-lapsed")
    finally:
        server.stop()
    assert rows(store) == (Counter(), set(), 0) and server.received == []


@pytest.mark.usefixtures("prefect")
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_prefect_flow_run_fails_and_the_command_exits_1_with_the_relays_words(
        settings: Settings, store: Store, relay: SmtpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from flows.surfaces.cli import app
    from flows.surfaces.prefect_flows import trigger_flow

    emails = store.lapsed(30)
    relayed = logged_in(settings, relay)
    monkeypatch.setenv("LIFECYCLE_SMTP_URL", relayed.smtp_url)  # flows read the environment
    monkeypatch.setenv("COLUMNS", "80")  # a narrow terminal must not wrap the message
    settings_from_environment.cache_clear()
    flow = trigger_flow
    state = flow(trigger="winback-lapsed", now=NOW.isoformat(), return_state=True)
    assert state.is_failed() and "554 5.7.1 Relay access denied" in (state.message or "")
    assert rows(store) == (Counter(), set(), 0)

    result = CliRunner().invoke(app, ["run", "winback-lapsed", "--now", NOW.isoformat()])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("winback-lapsed failed:")]
    assert len(lines) == 1 and "SMTP relay 127.0.0.1" in lines[0] and "554 5.7.1 Relay access denied" in lines[0]
    assert PASSWORD not in result.output
    assert rows(store) == (Counter(), set(), 0)

    relay.handler.refuse_every_rcpt = None
    assert flow(trigger="winback-lapsed", now=NOW.isoformat()).outcomes == {"sent": 30}
    received = Counter(r.recipients[0] for r in relay.received)
    assert set(received) == set(emails) and set(received.values()) == {1}
