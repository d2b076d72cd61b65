"""Unsubscribe (RFC 8058), preferences and double opt-in, through the running web app over HTTP."""

import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta

import httpx
import pytest
from sqlalchemy import select
from sqlmodel import Session

from flows.ingest import ingest_lines
from flows.message.prepare import render_candidates
from flows.run_context import load
from flows.settings import Settings
from flows.surfaces.web import create_app
from models import CategoryOptOut, Customer, Send, Suppression
from tests.support.builders import NOW, Store, ago
from tests.support.runs import run, run_flow
from tests.support.smtp_server import SmtpServer
from tests.support.web_server import Clock, WebServer


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def web(settings: Settings, clock: Clock) -> Iterator[WebServer]:
    server = WebServer(create_app(settings, clock=clock)).start()
    yield server
    server.stop()


def local(url: str, settings: Settings, web: WebServer) -> str:
    """Links in mails point at LIFECYCLE_BASE_URL; here that is the test's web server."""
    assert url.startswith(settings.base_url)
    return url.replace(settings.base_url, web.url)


def lapsed(store: Store, name: str = "Lena", **fields) -> Customer:
    customer = store.customer(name, **fields)
    store.order(customer, ago(days=500))
    return customer


def test_marketing_mail_carries_rfc_8058_headers_and_a_visible_link(settings: Settings, store: Store,
                                                                   smtp: SmtpServer) -> None:
    customer = lapsed(store)
    run(settings, "winback-lapsed")
    message = smtp.handler.to(customer.email)[0].message
    https, mailto = re.fullmatch(r"<([^>]+)>, <([^>]+)>", message["List-Unsubscribe"]).groups()
    assert re.fullmatch(re.escape(settings.base_url) + r"/u/[\w.-]+", https)
    assert mailto.startswith("mailto:unsubscribe@shop.example?subject=unsubscribe%20")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["List-Id"] == "<winback-lapsed.shop.example>"
    assert https in message.get_body(("html",)).get_content()  # the footer link is the same


def test_service_mail_has_no_list_headers(settings: Settings, store: Store, smtp: SmtpServer) -> None:
    customer = store.customer("Uwe")
    store.complaint(customer, ago(hours=1))
    run(settings, "complaint-ack")
    message = smtp.handler.to(customer.email)[0].message
    assert message["List-Unsubscribe"] is None and message["List-Id"] is None


@pytest.mark.parametrize("encoding", ["multipart", "urlencoded"])
def test_one_click_post_unsubscribes_at_once_and_the_next_run_skips(settings: Settings, store: Store,
                                                                   smtp: SmtpServer, web: WebServer,
                                                                   encoding: str) -> None:
    customer = lapsed(store)
    run(settings, "winback-lapsed")
    url = re.match(r"<([^>]+)>", smtp.handler.to(customer.email)[0].message["List-Unsubscribe"]).group(1)
    body = {"files": {"List-Unsubscribe": (None, "One-Click")}} if encoding == "multipart" else \
        {"data": {"List-Unsubscribe": "One-Click"}}
    response = httpx.post(local(url, settings, web), follow_redirects=False, timeout=30, **body)
    assert response.status_code == 200  # RFC 8058: no redirect
    assert "set-cookie" not in response.headers
    assert "Du bist abgemeldet" in response.text and "k***@example.de" in response.text
    with Session(store.engine) as session:
        assert session.get(Suppression, customer.email).reason == "unsubscribed"
        assert session.get(Customer, customer.id).marketing_consent is False
    later = run(settings, "winback-lapsed", NOW + timedelta(days=7))
    assert later.outcomes == {"skipped:suppressed": 1}


def test_get_only_asks_and_speaks_the_customers_language(settings: Settings, store: Store, smtp: SmtpServer,
                                                         web: WebServer) -> None:
    english = lapsed(store, "Amelia", locale="en-GB")
    run(settings, "winback-lapsed")
    url = re.match(r"<([^>]+)>", smtp.handler.to(english.email)[0].message["List-Unsubscribe"]).group(1)
    page = httpx.get(local(url, settings, web), timeout=30)
    assert page.status_code == 200 and "Stop marketing emails to k***@example.de?" in page.text
    assert 'name="List-Unsubscribe" value="One-Click"' in page.text
    with Session(store.engine) as session:
        assert session.get(Suppression, english.email) is None  # a GET (or a link scanner) changes nothing


def test_forged_altered_or_bodiless_requests_are_refused(settings: Settings, store: Store, smtp: SmtpServer,
                                                         web: WebServer) -> None:
    from flows.content.links import unsubscribe_url

    customer = lapsed(store)
    genuine = unsubscribe_url(web.url, settings.signing_secret, customer.external_id, "campaign")
    forged = unsubscribe_url(web.url, "someone-elses-secret-123456", customer.external_id, "campaign")
    altered = genuine[:-4] + ("AAAA" if not genuine.endswith("AAAA") else "BBBB")
    for url in (forged, altered):
        assert httpx.post(url, data={"List-Unsubscribe": "One-Click"}, timeout=30).status_code == 404
    assert httpx.post(genuine, data={"something": "else"}, timeout=30).status_code == 400
    with Session(store.engine) as session:
        assert session.execute(select(Suppression)).first() is None


def test_leaving_one_category_keeps_the_others(settings: Settings, store: Store, smtp: SmtpServer,
                                               web: WebServer) -> None:
    customer = lapsed(store)
    store.cart(customer, ago(hours=3))
    run(settings, "winback-lapsed")
    html = smtp.handler.to(customer.email)[0].message.get_body(("html",)).get_content()
    unsubscribe = re.search(r'href="([^"]+/u/[^"]+)"', html).group(1)
    page = httpx.get(local(unsubscribe, settings, web), timeout=30)
    preferences = web.url + re.search(r'href="(/preferences/[^"]+)"', page.text).group(1)
    form = httpx.get(preferences, timeout=30)
    assert 'value="campaign" checked' in form.text and "Angebote und Aktionen" in form.text
    saved = httpx.post(preferences, data={"category": ["abandoned_cart", "inactivity", "onboarding", "post_purchase"]},
                       timeout=30)
    assert saved.status_code == 200 and "Gespeichert." in saved.text and 'value="campaign">' in saved.text
    with Session(store.engine) as session:
        assert [o.category for o in session.execute(select(CategoryOptOut)).scalars()] == ["campaign"]
    assert run(settings, "winback-lapsed", NOW + timedelta(days=7)).outcomes == \
        {"skipped:opted_out": 1}
    # Still subscribed to cart reminders: held back only by the 1-per-16h cap, then sent.
    assert run(settings, "abandoned-cart").outcomes == {"deferred:frequency_cap": 1}
    assert run(settings, "abandoned-cart", NOW + timedelta(hours=20)).outcomes == {"sent": 1}


def test_an_unsubscribe_during_a_run_is_honoured_before_the_next_batch_is_sent(settings: Settings, store: Store,
                                                                               smtp: SmtpServer) -> None:
    first, second = lapsed(store, "Erster"), lapsed(store, "Zweite")

    def render_then_second_unsubscribes(job, candidates, batch=0):
        result = render_candidates(job, candidates, batch)
        store.suppress(second.email, "unsubscribed")  # clicked while the run was rendering
        return result

    summary = run(settings, "winback-lapsed", render=render_then_second_unsubscribes)
    assert summary.outcomes == {"sent": 1, "skipped:unsubscribed_during_run": 1}
    assert [r.recipients for r in smtp.received] == [[first.email]]


def test_unsubscribed_customers_still_get_service_mail_but_bounced_ones_do_not(settings: Settings, store: Store,
                                                                               smtp: SmtpServer) -> None:
    unsubscribed, bounced = store.customer("Ulla"), store.customer("Bodo")
    store.suppress(unsubscribed.email, "unsubscribed")
    store.suppress(bounced.email, "hard_bounce")
    for customer in (unsubscribed, bounced):
        store.complaint(customer, ago(hours=1))
    assert run(settings, "complaint-ack").outcomes == {"sent": 1, "skipped:suppressed": 1}
    assert [r.recipients for r in smtp.received] == [[unsubscribed.email]]


@pytest.mark.usefixtures("prefect")
def test_double_opt_in_pending_consent_gets_a_confirmation_and_no_marketing(settings: Settings, store: Store,
                                                                           smtp: SmtpServer, web: WebServer) -> None:
    events = [
        {"type": "identify", "userId": "neu-1", "timestamp": (NOW.replace(hour=8)).isoformat(), "messageId": "m1",
         "traits": {"email": "neu@example.de", "first_name": "Nora", "locale": "de-DE", "marketing_consent": True}},
        {"type": "track", "userId": "neu-1", "event": "Order Completed", "timestamp": ago(days=400).isoformat(),
         "messageId": "m2", "properties": {"order_id": "o-1", "total": 20}},
    ]
    assert ingest_lines(store.engine, [json.dumps(e) for e in events]).ok
    assert run(settings, "winback-lapsed").outcomes == {"skipped:consent_pending": 1}

    confirmation = run_flow(settings, "confirm-subscription", NOW)
    assert confirmation.outcomes == {"sent": 1}
    message = smtp.handler.to("neu@example.de")[0].message
    assert message["Subject"] == "Bitte bestätige deine Anmeldung" and message["List-Unsubscribe"] is None
    link = re.search(r'href="([^"]+/confirm/[^"]+)"', message.get_body(("html",)).get_content()).group(1)
    assert "Anmeldung bestätigen" in httpx.get(local(link, settings, web), timeout=30).text
    confirmed = httpx.post(local(link, settings, web), data={"confirm": "1"}, timeout=30)
    assert confirmed.status_code == 200 and "Deine Anmeldung ist bestätigt" in confirmed.text
    with Session(store.engine) as session:
        customer = session.execute(select(Customer).where(Customer.external_id == "neu-1")).scalar_one()
    assert customer.marketing_consent and customer.consent_source == "double opt-in link"
    assert customer.consent_at is not None
    assert run(settings, "winback-lapsed").outcomes == {"sent": 1}


def test_the_mailto_unsubscribe_is_applied_from_the_received_mail(settings: Settings, store: Store, smtp: SmtpServer,
                                                                  tmp_path) -> None:
    from urllib.parse import unquote

    from typer.testing import CliRunner

    from flows.surfaces.cli import app

    customer = lapsed(store)
    run(settings, "winback-lapsed")
    mailto = re.search(r"<(mailto:[^>]+)>", smtp.handler.to(customer.email)[0].message["List-Unsubscribe"]).group(1)
    address, _, query = mailto.removeprefix("mailto:").partition("?subject=")
    request = tmp_path / "request.eml"  # what a mail client sends to that address
    request.write_text(f"From: {customer.email}\r\nTo: {address}\r\nSubject: {unquote(query)}\r\n\r\n")
    forged = tmp_path / "forged.eml"
    forged.write_text(f"From: x@example.de\r\nTo: {address}\r\nSubject: unsubscribe abc.def\r\n\r\n")
    result = CliRunner().invoke(app, ["suppress", "from-mail", str(request), str(forged)])
    assert result.exit_code == 1
    assert "Unsubscribed 1 customer(s); 1 mail(s) without a valid token." in result.output
    with Session(store.engine) as session:
        assert session.get(Suppression, customer.email).detail == "unsubscribe mail (campaign)"


def test_a_link_mailed_to_a_guest_still_unsubscribes_once_the_guest_is_merged_into_an_account(
        settings: Settings, store: Store, smtp: SmtpServer, web: WebServer) -> None:
    guest = lapsed(store, "Pat")
    run(settings, "winback-lapsed")
    link = re.search(r"<(http[^>]+/u/[^>]+)>", smtp.handler.to(guest.email)[0].message["List-Unsubscribe"]).group(1)
    event = {"type": "alias", "previousId": guest.external_id, "userId": "acct-9", "messageId": "m-alias",
             "timestamp": "2026-03-17T10:00:00Z"}
    assert ingest_lines(store.engine, [json.dumps(event)]).ok
    response = httpx.post(local(link, settings, web), data={"List-Unsubscribe": "One-Click"}, timeout=30)
    assert response.status_code == 200
    with Session(store.engine) as session:
        account = session.execute(select(Customer).where(Customer.external_id == "acct-9")).scalar_one()
        assert account.marketing_consent is False
        assert session.get(Suppression, guest.email.lower()) is not None


# -- double opt-in: a confirmation link confirms one pending request, once -------------------------------------


def opt_in(store: Store, user: str, at: datetime, message: str) -> None:
    """The shop reports an opt-in to marketing: a request that the confirmation mail asks about."""
    event = {"type": "identify", "userId": user, "timestamp": at.isoformat(), "messageId": message,
             "traits": {"email": f"{user}@example.de", "first_name": "Nora", "locale": "de-DE",
                        "marketing_consent": True}}
    assert ingest_lines(store.engine, [json.dumps(event)]).ok


def confirmation_link(settings: Settings, smtp: SmtpServer, web: WebServer, user: str, now: datetime) -> str:
    assert run(settings, "confirm-subscription", now).outcomes == {"sent": 1}
    message = smtp.handler.to(f"{user}@example.de")[-1].message
    return local(re.search(r'href="([^"]+/confirm/[^"]+)"', message.get_body(("html",)).get_content()).group(1),
                 settings, web)


def customer_named(store: Store, user: str) -> Customer:
    with Session(store.engine) as session:
        return session.execute(select(Customer).where(Customer.external_id == user)).scalar_one()


def one_click(settings: Settings, web: WebServer, customer: Customer) -> httpx.Response:
    from flows.content.links import unsubscribe_url

    url = unsubscribe_url(web.url, settings.signing_secret, customer.external_id, "campaign")
    return httpx.post(url, data={"List-Unsubscribe": "One-Click"}, timeout=30)


def test_an_old_confirmation_link_cannot_undo_an_unsubscribe(settings: Settings, store: Store, smtp: SmtpServer,
                                                             web: WebServer, clock: Clock) -> None:
    opt_in(store, "neu-1", ago(hours=4), "m1")
    link = confirmation_link(settings, smtp, web, "neu-1", NOW)
    assert httpx.post(link, data={"confirm": "1"}, timeout=30).status_code == 200
    assert customer_named(store, "neu-1").marketing_consent
    clock.now = NOW + timedelta(hours=1)
    assert one_click(settings, web, customer_named(store, "neu-1")).status_code == 200
    clock.now = NOW + timedelta(hours=2)
    replayed = httpx.post(link, data={"confirm": "1"}, timeout=30)
    assert replayed.status_code == 410 and "abgelaufen oder wurde schon benutzt" in replayed.text
    assert httpx.get(link, timeout=30).status_code == 410  # the page does not offer the button either
    customer = customer_named(store, "neu-1")
    assert not customer.marketing_consent and customer.consent_requested_at is None
    with Session(store.engine) as session:
        assert session.get(Suppression, "neu-1@example.de").reason == "unsubscribed"


def test_a_confirmation_link_expires_with_its_request(settings: Settings, store: Store, smtp: SmtpServer,
                                                      web: WebServer, clock: Clock) -> None:
    opt_in(store, "neu-2", ago(hours=4), "m1")
    link = confirmation_link(settings, smtp, web, "neu-2", NOW)
    max_age = load(settings).trigger("confirm-subscription").max_age
    clock.now = ago(hours=4) + max_age + timedelta(seconds=1)
    assert httpx.post(link, data={"confirm": "1"}, timeout=30).status_code == 410
    clock.now = ago(hours=4) + max_age - timedelta(seconds=5)
    assert httpx.post(link, data={"confirm": "1"}, timeout=30).status_code == 200
    assert customer_named(store, "neu-2").marketing_consent


def test_a_link_is_single_use_but_a_second_click_of_it_is_answered(settings: Settings, store: Store,
                                                                    smtp: SmtpServer, web: WebServer) -> None:
    from flows.consent import history

    opt_in(store, "neu-3", ago(hours=4), "m1")
    link = confirmation_link(settings, smtp, web, "neu-3", NOW)
    first, second = (httpx.post(link, data={"confirm": "1"}, timeout=30) for _ in range(2))
    assert first.status_code == second.status_code == 200 and "bestätigt" in second.text
    with Session(store.engine) as session:
        changes = [c.change for c in history(session, customer_named(store, "neu-3").id)]
    assert changes.count("confirmed") == 1


def test_after_an_unsubscribe_only_a_new_opt_in_request_can_be_confirmed(settings: Settings, store: Store,
                                                                        smtp: SmtpServer, web: WebServer,
                                                                        clock: Clock) -> None:
    from flows.consent import history

    opt_in(store, "neu-4", ago(hours=4), "m1")
    old_link = confirmation_link(settings, smtp, web, "neu-4", NOW)
    assert httpx.post(old_link, data={"confirm": "1"}, timeout=30).status_code == 200
    clock.now = NOW + timedelta(hours=1)
    assert one_click(settings, web, customer_named(store, "neu-4")).status_code == 200
    opt_in(store, "neu-4", NOW + timedelta(hours=3), "m2")  # signs up again
    clock.now = NOW + timedelta(hours=4)
    new_link = confirmation_link(settings, smtp, web, "neu-4", NOW + timedelta(hours=4))
    assert new_link != old_link
    assert httpx.post(old_link, data={"confirm": "1"}, timeout=30).status_code == 410
    assert httpx.post(new_link, data={"confirm": "1"}, timeout=30).status_code == 200
    customer = customer_named(store, "neu-4")
    assert customer.marketing_consent
    with Session(store.engine) as session:
        assert session.get(Suppression, "neu-4@example.de") is None  # the new, confirmed opt-in lifts it
        record = [(c.change, c.source, c.request) for c in history(session, customer.id)]
        requests = [s.occurrence for s in session.execute(select(Send).where(Send.customer_id == customer.id)
                                                          .order_by(Send.id)).scalars()]
    # Provable: each confirmation names the request, and the request is the confirmation mail's occurrence.
    assert [r for r in record if r[0] != "requested"] == [
        ("confirmed", "double opt-in link", requests[0]),
        ("withdrawn", "one-click unsubscribe", None),
        ("confirmed", "double opt-in link", requests[1]),
    ]
    assert old_link.rsplit("/", 1)[1] != new_link.rsplit("/", 1)[1]


def test_a_confirmation_link_of_the_old_unscoped_form_is_refused(settings: Settings, store: Store,
                                                                 web: WebServer) -> None:
    from flows.content.links import CONFIRM, _serializer

    opt_in(store, "neu-5", ago(hours=4), "m1")
    legacy = _serializer(settings.signing_secret, CONFIRM).dumps({"c": "neu-5"})  # what links used to carry
    assert httpx.post(f"{web.url}/confirm/{legacy}", data={"confirm": "1"}, timeout=30).status_code in (404, 410)
    assert not customer_named(store, "neu-5").marketing_consent


# -- one slow database call never freezes the others -----------------------------------------------------------


class HeldLock:
    """Another session holds a write lock on the customer's row (PostgreSQL) or on the store (SQLite)."""

    def __init__(self, engine, customer: Customer) -> None:
        from sqlalchemy import text

        self.connection = engine.connect()
        self.transaction = self.connection.begin()
        if engine.dialect.name == "postgresql":
            self.connection.execute(text("SELECT id FROM customers WHERE id = :id FOR UPDATE"), {"id": customer.id})
        else:
            self.connection.execute(text("UPDATE customers SET first_name = first_name WHERE id = :id"),
                                    {"id": customer.id})

    def waiting(self) -> bool:
        """Someone waits on it (PostgreSQL tells; SQLite cannot, so a moment is allowed)."""
        from sqlalchemy import text

        if self.connection.dialect.name != "postgresql":
            import time

            time.sleep(1.0)
            return True
        with self.connection.engine.connect() as probe:
            return bool(probe.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                           "AND datname = current_database()")).scalar())

    def release(self) -> None:
        self.transaction.rollback()
        self.connection.close()


def served(settings: Settings, timeout: float) -> WebServer:
    return WebServer(create_app(settings.model_copy(update={"web_statement_timeout_seconds": timeout}),
                                clock=lambda: NOW)).start()


def test_while_one_request_waits_on_a_lock_fifty_others_complete(settings: Settings, store: Store) -> None:
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from flows.content.links import preferences_url, unsubscribe_url

    locked, others = lapsed(store, "Gesperrt"), [lapsed(store, f"Kunde{i}") for i in range(5)]
    server = served(settings, timeout=120)
    lock = HeldLock(store.engine, locked)
    answer: list[httpx.Response] = []
    try:
        url = unsubscribe_url(server.url, settings.signing_secret, locked.external_id, "campaign")
        waiting = threading.Thread(target=lambda: answer.append(
            httpx.post(url, data={"List-Unsubscribe": "One-Click"}, timeout=180)))
        waiting.start()
        deadline = time.monotonic() + 30
        while not lock.waiting():
            assert time.monotonic() < deadline, "the unsubscribe never reached the lock"
            time.sleep(0.05)
        pages = [f"{server.url}/healthz"] * 25 + [
            preferences_url(server.url, settings.signing_secret, others[i % 5].external_id) for i in range(25)]
        with ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(lambda page: httpx.get(page, timeout=60).status_code, pages))
        assert statuses == [200] * 50
        assert waiting.is_alive() and not answer  # still waiting on the lock, alone
    finally:
        lock.release()
    waiting.join(60)
    server.stop()
    assert answer and answer[0].status_code == 200
    with Session(store.engine) as session:
        assert session.get(Suppression, locked.email.lower()) is not None


def test_a_request_that_meets_the_statement_timeout_gets_503_and_changes_nothing(settings: Settings,
                                                                                 store: Store) -> None:
    from flows.content.links import unsubscribe_url

    customer = lapsed(store)
    server = served(settings, timeout=1)
    url = unsubscribe_url(server.url, settings.signing_secret, customer.external_id, "campaign")
    lock = HeldLock(store.engine, customer)
    try:
        refused = httpx.post(url, data={"List-Unsubscribe": "One-Click"}, timeout=60)
    finally:
        lock.release()
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "30"
    with Session(store.engine) as session:
        assert session.get(Suppression, customer.email.lower()) is None
        assert session.get(Customer, customer.id).marketing_consent
    assert httpx.post(url, data={"List-Unsubscribe": "One-Click"}, timeout=60).status_code == 200  # the retry works
    server.stop()


def test_a_link_mailed_to_an_earlier_address_never_confirms_the_new_one(settings: Settings, store: Store,
                                                                       smtp: SmtpServer, web: WebServer) -> None:
    opt_in(store, "neu-6", ago(hours=4), "m1")
    link = confirmation_link(settings, smtp, web, "neu-6", NOW)
    moved = {"type": "identify", "userId": "neu-6", "timestamp": ago(hours=3).isoformat(), "messageId": "m2",
             "traits": {"email": "someone-else@example.de"}}
    assert ingest_lines(store.engine, [json.dumps(moved)]).ok
    assert httpx.post(link, data={"confirm": "1"}, timeout=30).status_code == 410
    assert not customer_named(store, "neu-6").marketing_consent
    # The new address is asked instead, and its own link confirms it.
    assert run(settings, "confirm-subscription", NOW).outcomes == {"sent": 1}
    message = smtp.handler.to("someone-else@example.de")[-1].message
    fresh = local(re.search(r'href="([^"]+/confirm/[^"]+)"', message.get_body(("html",)).get_content()).group(1),
                  settings, web)
    assert httpx.post(fresh, data={"confirm": "1"}, timeout=30).status_code == 200
    assert customer_named(store, "neu-6").marketing_consent


def test_a_guests_confirmation_link_does_not_confirm_the_account_it_was_merged_into(
        settings: Settings, store: Store, smtp: SmtpServer, web: WebServer) -> None:
    opt_in(store, "gast-1", ago(hours=4), "m1")
    link = confirmation_link(settings, smtp, web, "gast-1", NOW)
    account = {"type": "identify", "userId": "konto-1", "timestamp": ago(hours=3).isoformat(), "messageId": "m2",
               "traits": {"email": "konto@example.de"}}
    alias = {"type": "alias", "previousId": "gast-1", "userId": "konto-1", "messageId": "m3",
             "timestamp": ago(hours=2).isoformat()}
    assert ingest_lines(store.engine, [json.dumps(account), json.dumps(alias)]).ok
    assert httpx.post(link, data={"confirm": "1"}, timeout=30).status_code == 410
    assert not customer_named(store, "konto-1").marketing_consent


def test_a_confirmation_and_an_unsubscribe_at_once_end_unsubscribed(settings: Settings, store: Store,
                                                                    smtp: SmtpServer, web: WebServer,
                                                                    clock: Clock) -> None:
    """Whichever goes first, the other sees it: never consent without the unsubscribe's suppression."""
    import threading

    opt_in(store, "neu-7", ago(hours=4), "m1")
    link = confirmation_link(settings, smtp, web, "neu-7", NOW)
    customer = customer_named(store, "neu-7")
    lock = HeldLock(store.engine, customer)  # both requests reach the row and wait on it
    answers: dict[str, int] = {}
    try:
        confirming = threading.Thread(target=lambda: answers.setdefault(
            "confirm", httpx.post(link, data={"confirm": "1"}, timeout=60).status_code))
        unsubscribing = threading.Thread(target=lambda: answers.setdefault(
            "unsubscribe", one_click(settings, web, customer).status_code))
        confirming.start()
        unsubscribing.start()
        lock.waiting()
    finally:
        lock.release()
    confirming.join(60)
    unsubscribing.join(60)
    assert answers["unsubscribe"] == 200 and answers["confirm"] in (200, 410)
    customer = customer_named(store, "neu-7")
    with Session(store.engine) as session:
        assert session.get(Suppression, "neu-7@example.de") is not None
    assert not customer.marketing_consent
