"""Refusals at SMTP time: the address is believed only when the code says so, and a relay
that refuses everyone stops the run instead of silencing the customer base."""

from collections import Counter

import pytest
from sqlalchemy import select
from sqlmodel import Session

from flows.dispatch import SmtpUnavailable
from flows.pipeline import execute, prepare_job
from flows.settings import Settings
from models import Feedback, Send, Suppression
from tests.builders import NOW, Store
from tests.smtp_server import SmtpServer

PASSWORD = "s3cret-Pa55"
RELAY_DENIED = "554 5.7.1 <{}>: Relay access denied"


def rows(store: Store) -> tuple[Counter[str], set[str], int]:
    """Send states, suppressed addresses, feedback reports."""
    with Session(store.engine) as session:
        statuses = Counter(session.execute(select(Send.status)).scalars())
        suppressed = set(session.execute(select(Suppression.email)).scalars())
        feedback = len(session.execute(select(Feedback.id)).scalars().all())
    return statuses, suppressed, feedback


@pytest.fixture
def relay() -> SmtpServer:
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
    run = logged_in(settings, relay)
    with pytest.raises(SmtpUnavailable) as error:
        execute(prepare_job("winback-lapsed", NOW, settings=run))
    message = str(error.value)
    assert "554 5.7.1 Relay access denied" in message and f"127.0.0.1:{relay.port}" in message
    assert PASSWORD not in message and "\n" not in message
    statuses, suppressed, feedback = rows(store)
    assert statuses == Counter() and suppressed == set() and feedback == 0  # every claim released, nobody blamed
    # The batch stopped at the trip: not 40 refusals, only the streak that tripped (and what was in flight).
    assert sum(relay.handler.rcpt_attempts.values()) <= 10 + 1
    assert relay.received == []

    relay.handler.refuse_every_rcpt = None  # the operator fixes the relay's configuration
    summary = execute(prepare_job("winback-lapsed", NOW, settings=run))
    assert summary.outcomes == {"sent": 40}
    received = Counter(r.recipients[0] for r in relay.received)
    assert set(received) == set(emails) and set(received.values()) == {1}
