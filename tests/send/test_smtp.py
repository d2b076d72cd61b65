"""SMTP delivery against a real server on loopback: retries, bounces, outages."""

import asyncio
import pickle
from collections.abc import Callable

import pytest
from aiosmtpd.controller import Controller

from flows.feedback.bounces import Verdict
from flows.outcomes import Outcome
from flows.send.smtp import (
    Breaker,
    BreakerPolicy,
    Delivery,
    Envelope,
    Mailer,
    RelayRefused,
    RetryPolicy,
    SmtpConfig,
    SmtpUnavailable,
)
from flows.surfaces.outbox import free_port
from models import FeedbackKind
from tests.support.scripted_smtp import ScriptedSmtp
from tests.support.scripted_smtp import Session as ScriptedSession
from tests.support.smtp_server import Script, SmtpServer

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
    assert {d.result for d in results.values()} == {Outcome.SENT}
    assert sorted(r.recipients[0] for r in smtp.received) == sorted(f"r{i}@example.de" for i in range(20))


def test_the_provider_limits_on_connections_and_rate_are_honoured(smtp: SmtpServer) -> None:
    url = f"smtp://127.0.0.1:{smtp.port}?connections=3&rate=20"
    assert SmtpConfig.from_url(url).rate == 20.0
    send(url, [envelope(f"r{i}@example.de") for i in range(30)])
    assert len(smtp.received) == 30
    assert len({r.peer for r in smtp.received}) <= 3  # never more sessions than allowed
    gaps = [b.at - a.at for a, b in zip(smtp.received, smtp.received[1:], strict=False)]
    # 20 per second means one every 50 ms; allow scheduling jitter, but no bursts.
    assert smtp.received[-1].at - smtp.received[0].at >= 29 * 0.05 * 0.9
    assert sorted(gaps)[len(gaps) // 2] >= 0.04


def test_a_4xx_is_retried_and_then_sent_exactly_once(smtp: SmtpServer) -> None:
    smtp.handler.scripts["busy@example.de"] = Script(rcpt=["451 4.7.1 Greylisted, try again"], data=["452 4.3.1 Full"])
    results = send(smtp.url, [envelope("busy@example.de"), envelope("calm@example.de")])
    assert results["busy@example.de"].result == Outcome.SENT
    assert len(smtp.handler.to("busy@example.de")) == 1
    assert smtp.handler.rcpt_attempts["busy@example.de"] == 3


def test_a_5xx_at_rcpt_is_a_bounce_and_does_not_stop_the_batch(smtp: SmtpServer) -> None:
    smtp.handler.scripts["gone@example.de"] = Script(rcpt=["550 5.1.1 No such user"])
    results = send(smtp.url, [envelope("gone@example.de"), envelope("ok@example.de")])
    assert results["gone@example.de"].result == Outcome.BOUNCED
    assert "550" in results["gone@example.de"].reply
    assert results["ok@example.de"].result == Outcome.SENT
    assert smtp.handler.rcpt_attempts["gone@example.de"] == 1  # permanent: never retried


def test_a_5xx_at_data_is_a_rejection_not_a_bounce(smtp: SmtpServer) -> None:
    smtp.handler.scripts["spam@example.de"] = Script(data=["554 5.7.1 Message looks like spam"])
    results = send(smtp.url, [envelope("ok@example.de"), envelope("spam@example.de")])
    assert results["spam@example.de"].result == Outcome.REJECTED and results["ok@example.de"].result == Outcome.SENT


def test_a_batch_the_relay_accepted_none_of_trips_however_small(smtp: SmtpServer) -> None:
    """One complaint reply to a relay that denies relaying: not a failed send, a failed run."""
    smtp.handler.scripts["kunde@example.de"] = Script(rcpt=["554 5.7.1 Relay access denied"])
    with pytest.raises(RelayRefused, match="accepted none of the batch's 1 mails and refused 1 "
                                           r"\(the last: 554 5.7.1 Relay access denied\)") as trip:
        send(smtp.url, [envelope("kunde@example.de")])
    assert trip.value.done == []


def test_an_address_that_would_smuggle_a_command_is_refused_before_the_server_sees_it(smtp: SmtpServer) -> None:
    smuggler = envelope("a@example.de>\r\nRCPT TO:<victim@example.net", key="smuggler")
    results = send(smtp.url, [envelope("ok1@example.de"), smuggler, envelope("ok2@example.de")])
    assert results["smuggler"].result == Outcome.BOUNCED and results["smuggler"].reply.startswith("553 5.1.3")
    assert sorted(r.recipients[0] for r in smtp.received) == ["ok1@example.de", "ok2@example.de"]
    assert "victim@example.net" not in smtp.handler.rcpt_attempts


def test_temporary_failures_outlasting_the_retries_are_deferred(smtp: SmtpServer) -> None:
    smtp.handler.scripts["later@example.de"] = Script(rcpt=["450 4.2.1 Mailbox busy"] * 10)
    result = send(smtp.url, [envelope("later@example.de")])["later@example.de"]
    assert result.result == Outcome.RETRY
    assert smtp.handler.rcpt_attempts["later@example.de"] == FAST.attempts
    assert smtp.handler.to("later@example.de") == []


def test_a_connection_lost_during_data_is_in_doubt_and_not_retried(smtp: SmtpServer) -> None:
    smtp.handler.scripts["flaky@example.de"] = Script(drop_at_data=1)
    results = send(smtp.url, [envelope("flaky@example.de"), envelope("next@example.de")])
    assert results["flaky@example.de"].result == Outcome.IN_DOUBT
    assert smtp.handler.rcpt_attempts["flaky@example.de"] == 1
    assert results["next@example.de"].result == Outcome.SENT  # a fresh connection carries on


def test_an_unreachable_server_raises_after_retries() -> None:
    url = f"smtp://127.0.0.1:{free_port()}?timeout=1"
    with pytest.raises(SmtpUnavailable, match="unreachable after 4 attempts") as error:
        send(url, [envelope("a@example.de"), envelope("b@example.de")])
    assert error.value.done == []


def send_windows(url: str, envelopes: list[Envelope], breaker: BreakerPolicy,
                 window: int = 16) -> tuple[list[Delivery], RelayRefused | None]:
    """Send as a batch's dispatch does, a window at a time; returns what was decided and the trip."""
    async def go() -> tuple[list[Delivery], RelayRefused | None]:
        decided: list[Delivery] = []
        async with Mailer(SmtpConfig.from_url(url), FAST, breaker, recipients=len(envelopes)) as mailer:
            try:
                for i in range(0, len(envelopes), window):
                    decided += await mailer.send(envelopes[i: i + window])
            except RelayRefused as trip:
                return decided + trip.done, trip
            return decided + mailer.settle(), None

    return asyncio.run(go())


def test_a_streak_of_policy_refusals_stops_the_batch_at_the_trip(smtp: SmtpServer) -> None:
    healthy = [envelope(f"ok{i}@example.de") for i in range(60)]
    denied = [envelope(f"no{i}@example.de") for i in range(40)]
    for e in denied:
        smtp.handler.scripts[e.recipient] = Script(rcpt=["554 5.7.1 Relay access denied"])
    decided, trip = send_windows(smtp.url, healthy + denied, BreakerPolicy(consecutive=10, sample=50, share=0.2))
    assert trip is not None and "refused 10 mails in a row (the last: 554 5.7.1 Relay access denied)" in str(trip)
    assert {d.key for d in decided} == {e.key for e in healthy}  # the refusals stay undecided: released
    # Stopped at the tenth refusal: at most one more was in flight on the other connection.
    assert 10 <= sum(smtp.handler.rcpt_attempts[e.recipient] for e in denied) <= 11


def test_more_than_the_share_of_a_batchs_first_recipients_refused_trips_it(smtp: SmtpServer) -> None:
    mixed = [envelope(f"r{i}@example.de") for i in range(40)]
    for e in mixed[::3]:  # every third: never ten in a row, but a third of the sample
        smtp.handler.scripts[e.recipient] = Script(data=["554 5.7.1 Sending IP not allowed for this domain"])
    decided, trip = send_windows(smtp.url, mixed, BreakerPolicy(consecutive=10, sample=20, share=0.2))
    assert trip is not None and "of the batch's first 20 recipients, more than 20%" in str(trip)
    assert all(d.result == Outcome.SENT for d in decided) and len(smtp.received) < 20


def test_bad_addresses_neither_trip_the_breaker_nor_hide_a_policy_refusal(smtp: SmtpServer) -> None:
    gone = [envelope(f"gone{i}@example.de") for i in range(12)]  # in a row, but under half of the batch
    rest = [envelope(f"ok{i}@example.de") for i in range(28)] + [envelope("spam@example.de")]
    for e in gone:
        smtp.handler.scripts[e.recipient] = Script(rcpt=["550 5.1.1 <x>: Recipient address rejected: User unknown"])
    smtp.handler.scripts["spam@example.de"] = Script(data=["554 5.7.1 Message rejected as spam"])
    decided, trip = send_windows(smtp.url, gone + rest, BreakerPolicy(consecutive=3, sample=50, share=0.2))
    assert trip is None
    results = {d.key: d for d in decided}
    assert len(results) == 41  # every refusal is decided once the batch ends untripped
    assert {results[e.key].verdict.kind for e in gone} == {FeedbackKind.HARD_BOUNCE}  # type: ignore[union-attr]
    assert results["spam@example.de"].verdict == Verdict(FeedbackKind.MESSAGE_FAILURE, "5.7.1")


def test_a_relay_calling_most_addresses_unknown_trips_the_breaker_and_blames_none(smtp: SmtpServer) -> None:
    """A relay that takes the recipients' domain for its own answers 5.1.1 to everyone."""
    batch = [envelope(f"kunde{i}@example.de") for i in range(40)]
    for e in batch[:21]:
        smtp.handler.scripts[e.recipient] = Script(rcpt=["550 5.1.1 <x>: Recipient address rejected: User unknown"])
    decided, trip = send_windows(smtp.url, batch, BreakerPolicy(sample=40))
    assert trip is not None and "refused 21 of the batch's first 40 recipients, more than 50%" in str(trip)
    # The bounces were held and stay undecided (none suppresses); only what the relay took is decided.
    assert {d.result for d in decided} <= {Outcome.SENT} and len(smtp.received) == len(decided) <= 2


def test_a_refused_login_is_the_relay_failing_not_the_recipients() -> None:
    server = SmtpServer(credentials=("shop", "right-Pa55")).start()
    try:
        url = f"smtp://shop:wrong-Pa55@127.0.0.1:{server.port}?connections=2&timeout=5"

        async def probe() -> None:
            async with Mailer(SmtpConfig.from_url(url), FAST) as mailer:
                await mailer.check()

        with pytest.raises(RelayRefused,
                           match=r"refused our login: 535 5.7.8 Authentication credentials invalid") as error:
            asyncio.run(probe())
        assert "wrong-Pa55" not in str(error.value)
        # One session (the client tries PLAIN, then LOGIN), not retried: 4 attempts would make 8.
        assert 1 <= len(server.logins) <= 2 and not any(accepted for _, accepted in server.logins)
        server.logins.clear()
        decided, trip = send_windows(url, [envelope(f"r{i}@example.de") for i in range(10)], BreakerPolicy())
        assert trip is not None and "refused our login" in str(trip) and decided == []
        assert len(server.logins) <= 2 * 2 and server.handler.rcpt_attempts == {}  # one session per connection
    finally:
        server.stop()


def test_a_tripped_breaker_pickles_with_its_relays_words_and_decided_deliveries() -> None:
    """Raised in a sender process, it is re-raised in the flow's."""
    done = [Delivery("k1", Outcome.BOUNCED, "550 5.1.1 unknown", Verdict(FeedbackKind.HARD_BOUNCE, "5.1.1"), 550)]
    again = pickle.loads(pickle.dumps(RelayRefused("SMTP relay h:25 refused our login: 535 5.7.8", done)))
    assert type(again) is RelayRefused and isinstance(again, SmtpUnavailable)
    assert str(again) == "SMTP relay h:25 refused our login: 535 5.7.8" and again.done == done


# -- internationalised addresses -----------------------------------------------------------

def smtputf8_server(offered: bool) -> SmtpServer:
    """The loopback server, offering SMTPUTF8 (RFC 6531) in its EHLO reply or not."""
    server = SmtpServer()
    server.controller = Controller(server.handler, hostname="127.0.0.1", port=server.port, decode_data=False,
                                   enable_SMTPUTF8=offered)
    return server.start()


def test_an_idn_domain_goes_out_in_its_ascii_form_from_a_store_that_kept_the_unicode_one(smtp: SmtpServer) -> None:
    results = send(smtp.url, [envelope("kunde@bücher.de"), envelope("ok@example.de")])
    assert {d.result for d in results.values()} == {Outcome.SENT}, results
    assert sorted(r.recipients[0] for r in smtp.received) == ["kunde@xn--bcher-kva.de", "ok@example.de"]


def test_a_non_ascii_local_part_goes_out_with_smtputf8_when_the_server_offers_it() -> None:
    server = smtputf8_server(offered=True)
    try:
        results = send(server.url, [envelope("jürgen@xn--bcher-kva.de"), envelope("ok@example.de")])
    finally:
        server.stop()
    assert {d.result for d in results.values()} == {Outcome.SENT}, results
    assert sorted(r.recipients[0] for r in server.received) == ["jürgen@xn--bcher-kva.de", "ok@example.de"]


def test_without_smtputf8_a_non_ascii_local_part_fails_that_recipient_only_and_the_server_never_sees_it() -> None:
    server = smtputf8_server(offered=False)
    unicode = [envelope(f"jürgen{i}@example.de") for i in range(12)]  # more than the breaker's streak
    try:
        results = send(server.url, [envelope("first@example.de"), *unicode, envelope("last@example.de")])
    finally:
        server.stop()
    assert sorted(r.recipients[0] for r in server.received) == ["first@example.de", "last@example.de"]
    assert not any(not address.isascii() for address in server.handler.rcpt_attempts)
    for e in unicode:
        refused = results[e.key]
        assert refused.result == Outcome.REJECTED  # recorded failed: never tried again
        assert refused.verdict == Verdict(FeedbackKind.MESSAGE_FAILURE, "5.6.7")  # never the address's fault
        assert "SMTPUTF8" in refused.reply


def test_a_run_fails_a_non_ascii_local_part_once_and_sends_the_idn_addresses(settings, store) -> None:
    """The whole path (audience, render, compose, dispatch, ledger), twice, to a server without SMTPUTF8."""
    from sqlmodel import Session

    from models import Suppression
    from tests.support.builders import ago
    from tests.support.ledger import sends
    from tests.support.runs import run

    for email in ("kunde@xn--bcher-kva.de", "alt@bücher.de", "jürgen@xn--bcher-kva.de"):  # the second as kept before
        store.order(store.customer("Kim", email=email), ago(days=500))
    server = smtputf8_server(offered=False)
    plain = settings.model_copy(update={"smtp_url": server.url})
    try:
        first = run(plain, "winback-lapsed")
        again = run(plain, "winback-lapsed")
    finally:
        server.stop()
    assert first.outcomes == {"sent": 2, "failed:rejected": 1}, first.outcomes
    assert sorted(r.recipients[0] for r in server.received) == ["alt@xn--bcher-kva.de", "kunde@xn--bcher-kva.de"]
    assert {str(r.message["To"]) for r in server.received} == {"Kim Schäfer <kunde@xn--bcher-kva.de>",
                                                               "Kim Schäfer <alt@xn--bcher-kva.de>"}
    assert all(address.isascii() for address in server.handler.rcpt_attempts)  # never tried at the server
    [failed] = sends(store.engine, status="failed")
    assert failed.email == "jürgen@xn--bcher-kva.de" and "SMTPUTF8" in failed.error
    with Session(store.engine) as session:
        assert session.get(Suppression, failed.email) is None  # the relay's limit, not the address's fault
    assert again.outcomes == {"skipped:already_sent": 3}, again.outcomes  # failed once, recorded, not again
    assert len(server.received) == 2


def _over_a_link(server_port: int, envelopes: list[Envelope], connections: int = 1) -> tuple[dict[str, Delivery], int]:
    """Send across a 10 ms link (the latency proxy); the deliveries and the round trips counted on the wire."""
    from tests.support.latency_proxy import LatencyProxy

    with LatencyProxy(server_port, delay=0.005) as link:
        results = send(f"smtp://127.0.0.1:{link.port}?connections={connections}&timeout=5", envelopes)
        return results, link.round_trips


@pytest.mark.parametrize(("pipelining", "trips_for_twenty"), [(True, 1 + 20), (False, 4 * 20)])
def test_with_pipelining_each_mail_after_a_sessions_first_costs_one_round_trip_and_without_it_four(
        pipelining: bool, trips_for_twenty: int) -> None:
    """Pipelined, a mail's content goes in one write with the next mail's MAIL, RCPT and DATA:
    the first mail's group, then one round trip a mail (its content, the next one's group)."""
    server = SmtpServer(pipelining=pipelining).start()
    try:
        results, trips = _over_a_link(server.port, [envelope(f"r{i}@example.de") for i in range(20)])
    finally:
        server.stop()
    assert {d.result for d in results.values()} == {Outcome.SENT} and len(server.received) == 20
    assert [r.recipients[0] for r in server.received] == [f"r{i}@example.de" for i in range(20)]
    assert trips == 1 + trips_for_twenty + 1  # EHLO, the mails, QUIT


def test_a_temporary_refusal_of_a_content_sends_the_mail_behind_it_before_the_retry() -> None:
    """The mail whose commands followed a refused content is sent to its end first, so the
    retry finds the session free; each mail arrives once, and none is decided twice."""
    server = SmtpServer(pipelining=True).start()
    server.handler.scripts["later@example.de"] = Script(data=["451 4.3.0 try again later"])
    try:
        results, _ = _over_a_link(server.port, [envelope(f"{n}@example.de") for n in ("a", "later", "b", "c")])
    finally:
        server.stop()
    assert {key: d.result for key, d in results.items()} == {
        f"{n}@example.de": Outcome.SENT for n in ("a", "later", "b", "c")}
    assert [r.recipients[0].split("@")[0] for r in server.received] == ["a", "b", "later", "c"]


def test_a_session_lost_at_a_contents_end_leaves_that_mail_in_doubt_and_sends_the_next_afresh() -> None:
    """The next mail's commands were lost with the session, its content never sent: it goes
    on a new session, once; the lost one may have been accepted, so it is not retried."""
    server = SmtpServer(pipelining=True).start()
    server.handler.scripts["lost@example.de"] = Script(drop_at_data=1)
    try:
        results, _ = _over_a_link(server.port, [envelope(f"{n}@example.de") for n in ("a", "lost", "b", "c")])
    finally:
        server.stop()
    outcomes = {key.split("@")[0]: d.result for key, d in results.items()}
    assert outcomes == {"a": Outcome.SENT, "lost": Outcome.IN_DOUBT, "b": Outcome.SENT, "c": Outcome.SENT}
    received = {r.recipients[0].split("@")[0]: r.peer for r in server.received}
    assert sorted(received) == ["a", "b", "c"] and len(server.received) == 3
    assert received["a"] != received["b"] == received["c"]  # a new session from b on


def test_a_tripped_breaker_drops_the_mail_whose_commands_followed_the_last_content() -> None:
    """Its DATA was accepted, its content not yet sent: the session is closed instead, so the
    relay gets nothing more, and the mail is not decided (its claim goes back with the batch's)."""
    server = SmtpServer(pipelining=True).start()
    for n in range(3):
        server.handler.scripts[f"r{n}@example.de"] = Script(data=["554 5.7.1 rejected by policy"])
    url = f"smtp://127.0.0.1:{server.port}?connections=1&timeout=5"
    try:
        decided, trip = send_windows(url, [envelope(f"r{n}@example.de") for n in range(6)],
                                     BreakerPolicy(consecutive=3, sample=50, share=0.9, bounce_share=0.9), window=6)
    finally:
        server.stop()
    assert trip is not None and "3 mails in a row" in str(trip)
    assert decided == [] and server.received == []  # r3's commands went out behind r2's content; its content never
    assert server.handler.rcpt_attempts["r3@example.de"] == 1 and "r4@example.de" not in server.handler.rcpt_attempts


def test_a_refused_recipient_in_a_pipelined_group_fails_only_that_mail() -> None:
    server = SmtpServer(pipelining=True).start()
    server.handler.scripts["gone@example.de"] = Script(rcpt=["550 5.1.1 no such user"])
    server.handler.scripts["later@example.de"] = Script(rcpt=["451 4.3.0 try again later"])
    server.handler.scripts["big@example.de"] = Script(data=["552 5.3.4 message too big"])
    try:
        names = ["a", "gone", "b", "later", "c", "big", "d"]
        results, _ = _over_a_link(server.port, [envelope(f"{n}@example.de") for n in names])
    finally:
        server.stop()
    outcomes = {key.split("@")[0]: d.result for key, d in results.items()}
    assert outcomes == {"a": Outcome.SENT, "gone": Outcome.BOUNCED, "b": Outcome.SENT, "later": Outcome.SENT,
                        "c": Outcome.SENT, "big": Outcome.REJECTED, "d": Outcome.SENT}
    assert sorted(r.recipients[0] for r in server.received) == sorted(
        f"{n}@example.de" for n in ("a", "b", "later", "c", "d"))  # the refused never, the deferred once
    assert results["gone@example.de"].reply.startswith("550 5.1.1")


def test_smtp_sinks_refusals_at_rcpt_are_matched_to_their_mail_in_pipelined_groups() -> None:
    """Postfix's smtp-sink offers PIPELINING; with its fault flags every RCPT is refused, and
    each reply still lands on its own mail: the session never falls out of step."""
    from tests.support.smtp_server import PostfixSink

    envelopes = [envelope(f"r{i}@example.de") for i in range(12)]
    soft = PostfixSink("-r", "RCPT").start()  # 4xx at every RCPT: each mail retried, then left for later
    try:
        results = send(f"smtp://127.0.0.1:{soft.port}?connections=2&timeout=5", envelopes, RetryPolicy(2, 0.01, 0.02))
    finally:
        soft.stop()
    assert {d.result for d in results.values()} == {Outcome.RETRY} and len(results) == 12
    assert {d.reply[:1] for d in results.values()} == {"4"} and soft.recipients() == []

    hard = PostfixSink("-f", "RCPT").start()  # 5xx at every RCPT: a relay refusing all, the breaker's case
    try:
        with pytest.raises(RelayRefused, match=r"500 5\.3\.0") as refused:
            send(f"smtp://127.0.0.1:{hard.port}?connections=2&timeout=5", envelopes)
    finally:
        hard.stop()
    assert hard.recipients() == [] and refused.value.done == []  # nobody blamed for the relay


def _scripted(script: Callable[[ScriptedSession, str], tuple[bytes, float] | None]) -> ScriptedSmtp:
    return ScriptedSmtp(script).start()


def _three_through(script: Callable[[ScriptedSession, str], tuple[bytes, float] | None],
                   timeout: float = 5) -> tuple[dict[str, Delivery], ScriptedSmtp]:
    """r0, r1 and r2 sent over one session to a scripted server; the deliveries and the server."""
    server = _scripted(script)
    try:
        return send(f"smtp://127.0.0.1:{server.port}?connections=1&timeout={timeout:g}",
                    [envelope(f"r{i}@example.de") for i in range(3)]), server
    finally:
        server.stop()


def test_an_unreadable_reply_to_the_next_mails_commands_is_that_mails_not_the_accepted_ones() -> None:
    """The mail ahead had its 250: it is sent, whatever comes after it; the next one starts afresh."""
    mails = []

    def script(session: ScriptedSession, command: str) -> tuple[bytes, float] | None:
        if command.startswith("MAIL"):
            mails.append(command)
            if len(mails) == 2:  # r1's MAIL, written behind r0's content
                return b"2.5.0 Ok\r\n", 0.0  # no reply code: a broken server or middlebox
        return None

    results, server = _three_through(script)
    assert {key: d.result for key, d in results.items()} == {f"r{i}@example.de": Outcome.SENT for i in range(3)}
    assert sorted(r for _, [r] in server.delivered) == [f"r{i}@example.de" for i in range(3)]  # each once


def test_a_late_reply_on_the_mail_behind_a_refused_content_is_never_read_as_the_retried_mails() -> None:
    """r0's content is refused for now; r1's commands behind it: RCPT refused, DATA taken all
    the same, and the empty content that ends it answered after the client gave up. That
    session is ended, so r0's retry reads its own reply on a new one."""
    ends = []

    def script(session: ScriptedSession, command: str) -> tuple[bytes, float] | None:
        if command == ".":
            ends.append(session.recipients)
            if len(ends) == 1:
                return b"451 4.3.0 try again later\r\n", 0.0  # r0's content
            if not session.recipients:
                return b"554 5.5.1 no valid recipients\r\n", 1.5 if len(ends) == 2 else 0.0
        if command.startswith("RCPT") and "r1@" in command:
            return b"550 5.1.1 no such user\r\n", 0.0
        return None

    results, server = _three_through(script, timeout=1)
    assert {key.split("@")[0]: d.result for key, d in results.items()} == {
        "r0": Outcome.SENT, "r1": Outcome.BOUNCED, "r2": Outcome.SENT}
    assert results["r0@example.de"].reply.startswith("250") and results["r1@example.de"].reply.startswith("550")
    assert sorted(r for _, [r] in server.delivered) == ["r0@example.de", "r2@example.de"]


def test_a_breaker_tripped_meanwhile_stops_the_mail_behind_a_refused_content_before_its_content() -> None:
    """Two sessions: r0's content waits on a slow "try later" with r1's commands behind it,
    while the other session's refusals trip the breaker. r1's content is never sent."""
    def script(session: ScriptedSession, command: str) -> tuple[bytes, float] | None:
        if command.startswith("RCPT") and "deny" in command:
            return b"554 5.7.1 Relay access denied\r\n", 0.05
        if command == "." and session.recipients == ["r0@example.de"] and not tried:
            tried.append(True)
            return b"451 4.3.0 try again later\r\n", 0.5
        return None

    tried: list[bool] = []
    server = _scripted(script)
    envelopes = [envelope("r0@example.de"), envelope("deny0@example.de"), envelope("r1@example.de"),
                 *(envelope(f"deny{i}@example.de") for i in range(1, 8))]
    try:
        decided, trip = send_windows(f"smtp://127.0.0.1:{server.port}?connections=2&timeout=5", envelopes,
                                     BreakerPolicy(consecutive=3, sample=50, share=0.9, bounce_share=0.9), window=10)
    finally:
        server.stop()
    assert trip is not None and "3 mails in a row" in str(trip)
    assert "r1@example.de" not in {r for _, rs in server.delivered for r in rs}
    assert "r1@example.de" not in {d.key for d in decided}  # undecided: its claim goes back


def test_an_acceptance_vouches_only_for_refusals_observed_before_the_mail_started() -> None:
    """Over several sessions a mail started before a refusal came back may be answered after
    it: its acceptance neither ends the streak nor decides that refusal."""
    refused = Delivery("no0", Outcome.REJECTED, "554 5.7.1 Relay access denied",
                       Verdict(FeedbackKind.MESSAGE_FAILURE, "5.7.1"), 554)
    breaker = Breaker(BreakerPolicy(consecutive=3, sample=2, share=0.9, bounce_share=0.9))
    for i in range(2):
        breaker.observe(Delivery(f"ok{i}", Outcome.SENT, "250"), started=breaker.seen)
    before = breaker.seen
    assert breaker.observe(refused, started=before) == []
    late = Delivery("ok2", Outcome.SENT, "250")
    assert breaker.observe(late, started=before) == [late]  # started before no0 was answered
    assert breaker.streak == 1 and "no0" in breaker.held
    after = Delivery("ok3", Outcome.SENT, "250")
    assert breaker.observe(after, started=breaker.seen) == [after, refused]  # started after it: vouches
    assert breaker.streak == 0 and not breaker.held


def test_with_pipelining_over_two_sessions_a_streak_of_policy_refusals_still_blames_nobody() -> None:
    for _ in range(5):  # the order of replies over two sessions varies from run to run
        server = SmtpServer(pipelining=True).start()
        healthy = [envelope(f"ok{i}@example.de") for i in range(60)]
        denied = [envelope(f"no{i}@example.de") for i in range(40)]
        for e in denied:
            server.handler.scripts[e.recipient] = Script(rcpt=["554 5.7.1 Relay access denied"])
        try:
            decided, trip = send_windows(f"smtp://127.0.0.1:{server.port}?connections=2&timeout=5",
                                         healthy + denied, BreakerPolicy(consecutive=10, sample=50, share=0.2))
        finally:
            server.stop()
        assert trip is not None
        assert {d.key for d in decided} == {e.key for e in healthy}  # no refusal decided: all released
