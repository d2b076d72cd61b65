"""Unsubscribe (RFC 8058), preferences and double opt-in, through the running web app over HTTP."""

import json
import re
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import select
from sqlmodel import Session

from flows.ingest import ingest_lines
from flows.pipeline import compile_flow, execute, load, prepare_job, render_candidates
from flows.settings import Settings
from flows.web import create_app
from models import CategoryOptOut, Customer, Suppression
from tests.builders import NOW, Store, ago
from tests.smtp_server import SmtpServer
from tests.web_server import WebServer


@pytest.fixture
def web(settings: Settings) -> Iterator[WebServer]:
    server = WebServer(create_app(settings)).start()
    yield server
    server.stop()


def run(settings: Settings, trigger: str, now=NOW):
    return execute(prepare_job(trigger, now, settings=settings))


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
    later = run(settings, "winback-lapsed", NOW + __import__("datetime").timedelta(days=7))
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
    from flows.links import unsubscribe_url

    customer = lapsed(store)
    genuine = unsubscribe_url(web.url, settings.secret.get_secret_value(), customer.external_id, "campaign")
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
    saved = httpx.post(preferences, data={"category": ["abandoned_cart", "inactivity", "onboarding"]}, timeout=30)
    assert saved.status_code == 200 and "Gespeichert." in saved.text and 'value="campaign">' in saved.text
    with Session(store.engine) as session:
        assert [o.category for o in session.execute(select(CategoryOptOut)).scalars()] == ["campaign"]
    assert run(settings, "winback-lapsed", NOW + __import__("datetime").timedelta(days=7)).outcomes == \
        {"skipped:opted_out": 1}
    # Still subscribed to cart reminders: held back only by the 1-per-16h cap, then sent.
    assert run(settings, "abandoned-cart").outcomes == {"deferred:frequency_cap": 1}
    assert run(settings, "abandoned-cart", NOW + __import__("datetime").timedelta(hours=20)).outcomes == {"sent": 1}


def test_an_unsubscribe_during_a_run_is_honoured_before_the_next_batch_is_sent(settings: Settings, store: Store,
                                                                               smtp: SmtpServer) -> None:
    first, second = lapsed(store, "Erster"), lapsed(store, "Zweite")

    def render_then_second_unsubscribes(job, candidates, batch=0):  # noqa: ANN001, ANN202
        result = render_candidates(job, candidates, batch)
        store.suppress(second.email, "unsubscribed")  # clicked while the run was rendering
        return result

    summary = execute(prepare_job("winback-lapsed", NOW, settings=settings), render=render_then_second_unsubscribes)
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

    spec = load(settings).trigger("confirm-subscription")
    confirmation = compile_flow(spec)(trigger="confirm-subscription", now=NOW.isoformat())
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

    from flows.cli import app

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
