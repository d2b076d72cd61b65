"""SMTP delivery against a real server on loopback: retries, bounces, outages."""

import asyncio

import pytest

from flows.dispatch import (
    Delivery,
    Envelope,
    Mailer,
    Result,
    RetryPolicy,
    SmtpConfig,
    SmtpUnavailable,
)
from flows.outbox import free_port
from tests.smtp_server import Script, SmtpServer

FAST = RetryPolicy(attempts=4, backoff=0.01, backoff_max=0.05)


def envelope(to: str, key: str | None = None) -> Envelope:
    data = f"From: a@shop.example\r\nTo: {to}\r\nSubject: hi\r\n\r\nhello\r\n".encode()
    return Envelope(key or to, "a@shop.example", to, data)


def send(url: str, envelopes: list[Envelope], policy: RetryPolicy = FAST) -> dict[str, Delivery]:
    async def go() -> list[Delivery]:
        async with Mailer(SmtpConfig.from_url(url), policy) as mailer:
            return await mailer.send(envelopes) + mailer.settle()

    return {d.key: d for d in asyncio.run(go())}


def test_smtp_url_parsing() -> None:
    config = SmtpConfig.from_url("smtp://us%40er:p%3Ass@mail.example:2525?tls=starttls&connections=8&timeout=5")
    assert (config.hostname, config.port, config.username, config.password) == ("mail.example", 2525, "us@er", "p:ss")
    assert (config.tls, config.connections, config.timeout) == ("starttls", 8, 5.0)
    assert SmtpConfig.from_url("smtps://mail.example").port == 465
    with pytest.raises(ValueError, match="smtp://user:pass@host"):
        SmtpConfig.from_url("http://mail.example")


def test_every_message_is_delivered_once_over_reused_connections(smtp: SmtpServer) -> None:
    results = send(smtp.url, [envelope(f"r{i}@example.de") for i in range(20)])
    assert {d.result for d in results.values()} == {Result.SENT}
    assert sorted(r.recipients[0] for r in smtp.received) == sorted(f"r{i}@example.de" for i in range(20))


def test_the_provider_limits_on_connections_and_rate_are_honoured(smtp: SmtpServer) -> None:
    url = f"smtp://127.0.0.1:{smtp.port}?connections=3&rate=20"
    assert SmtpConfig.from_url(url).rate == 20.0
    send(url, [envelope(f"r{i}@example.de") for i in range(30)])
    assert len(smtp.received) == 30
    assert len({r.peer for r in smtp.received}) <= 3  # never more sessions than allowed
    gaps = [b.at - a.at for a, b in zip(smtp.received, smtp.received[1:])]
    # 20 per second means one every 50 ms; allow scheduling jitter, but no bursts.
    assert smtp.received[-1].at - smtp.received[0].at >= 29 * 0.05 * 0.9
    assert sorted(gaps)[len(gaps) // 2] >= 0.04


def test_a_4xx_is_retried_and_then_sent_exactly_once(smtp: SmtpServer) -> None:
    smtp.handler.scripts["busy@example.de"] = Script(rcpt=["451 4.7.1 Greylisted, try again"], data=["452 4.3.1 Full"])
    results = send(smtp.url, [envelope("busy@example.de"), envelope("calm@example.de")])
    assert results["busy@example.de"].result == Result.SENT
    assert len(smtp.handler.to("busy@example.de")) == 1
    assert smtp.handler.rcpt_attempts["busy@example.de"] == 3


def test_a_5xx_at_rcpt_is_a_bounce_and_does_not_stop_the_batch(smtp: SmtpServer) -> None:
    smtp.handler.scripts["gone@example.de"] = Script(rcpt=["550 5.1.1 No such user"])
    results = send(smtp.url, [envelope("gone@example.de"), envelope("ok@example.de")])
    assert results["gone@example.de"].result == Result.BOUNCED
    assert "550" in results["gone@example.de"].reply
    assert results["ok@example.de"].result == Result.SENT
    assert smtp.handler.rcpt_attempts["gone@example.de"] == 1  # permanent: never retried


def test_a_5xx_at_data_is_a_rejection_not_a_bounce(smtp: SmtpServer) -> None:
    smtp.handler.scripts["spam@example.de"] = Script(data=["554 5.7.1 Message looks like spam"])
    assert send(smtp.url, [envelope("spam@example.de")])["spam@example.de"].result == Result.REJECTED


def test_temporary_failures_outlasting_the_retries_are_deferred(smtp: SmtpServer) -> None:
    smtp.handler.scripts["later@example.de"] = Script(rcpt=["450 4.2.1 Mailbox busy"] * 10)
    result = send(smtp.url, [envelope("later@example.de")])["later@example.de"]
    assert result.result == Result.DEFERRED
    assert smtp.handler.rcpt_attempts["later@example.de"] == FAST.attempts
    assert smtp.handler.to("later@example.de") == []


def test_a_connection_lost_during_data_is_in_doubt_and_not_retried(smtp: SmtpServer) -> None:
    smtp.handler.scripts["flaky@example.de"] = Script(drop_at_data=1)
    results = send(smtp.url, [envelope("flaky@example.de"), envelope("next@example.de")])
    assert results["flaky@example.de"].result == Result.IN_DOUBT
    assert smtp.handler.rcpt_attempts["flaky@example.de"] == 1
    assert results["next@example.de"].result == Result.SENT  # a fresh connection carries on


def test_an_unreachable_server_raises_after_retries() -> None:
    url = f"smtp://127.0.0.1:{free_port()}?timeout=1"
    with pytest.raises(SmtpUnavailable, match="unreachable after 4 attempts") as error:
        send(url, [envelope("a@example.de"), envelope("b@example.de")])
    assert error.value.done == []
