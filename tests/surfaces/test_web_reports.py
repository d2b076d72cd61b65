"""The reports page of lifecycle web: behind the admin token, never cached, no customer on it, and in Chromium
its charts render and its cards show what the store holds."""

import base64
import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlmodel import Session

from flows.analysis.attribution import attribute
from flows.settings import Settings
from flows.spec.policy import Attribution as AttributionPolicy
from flows.surfaces.web import create_app, web_engine
from flows.surfaces.web_reports import CSS, REPORTS_CSP, add_reports, authorized, period
from flows.surfaces.web_security import headers_for
from models import Engagement, Order, Send
from tests.support import ROOT
from tests.support.builders import NOW, Store, ago
from tests.support.web_server import WebServer

TOKEN = "reports-token-0123456789abcdef"
CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = ROOT / "docs" / "screenshots" / "reports.png"
UPDATE_SCREENSHOTS = "LIFECYCLE_UPDATE_SCREENSHOTS"  # =1: the Chromium test rewrites the README's screenshot
SINCE, UNTIL = "2026-02-16", "2026-03-17"  # four weeks up to and including NOW's day
WINDOW = timedelta(days=5)


@dataclass
class Shop:
    """What the fixture put in the store, so tests state expectations from it, not from the page."""

    emails: list[str]
    names: list[str]
    cart: dict[str, int]  # figures of abandoned-cart
    cart_revenue: dict[str, int]  # cents per currency
    winback: dict[str, tuple[int, int]]  # arm -> (recipients, converted)


def _send(session: Session, store_customer, trigger: str, status: str, at: datetime, stage: str) -> Send:
    send = Send(send_key=f"{trigger}/{store_customer.external_id}/1", trigger=trigger,
                customer_id=store_customer.id, occurrence="1", status=status, run_id="run-1", stage=stage,
                template=f"{trigger.replace('-', '_')}/default.de.html.j2", email=store_customer.email,
                message_id=f"<{store_customer.external_id}@shop.example>", evaluated_at=at, claimed_at=at,
                finished_at=at)
    session.add(send)
    session.flush()
    return send


def _order(session: Session, customer, placed: datetime, cents: int, currency: str = "EUR") -> None:
    session.add(Order(external_id=f"o-{customer.external_id}-{placed:%j%H}-{currency}", customer_id=customer.id,
                      placed_at=placed, total_cents=cents, currency=currency, products=[]))


def shop(store: Store) -> Shop:
    """abandoned-cart: 6 delivered, 1 bounced; 3 mails clicked by a person (one of them twice), one only by a
    scanner; two clicked customers order in EUR, one who did not click orders in USD (credited to the delivery).
    winback-lapsed (holdout): 10 treated of whom 4 order within the window, 5 held out of whom 1 orders.
    One order with no mail at all. Earlier orders give the customers their stages: the win-back's are lapsed
    (last order 500 days ago), the carts' new, the stranger loyal; none of those is in the period."""
    emails, names = [], []

    def customer(name: str):
        made = store.customer(name)
        emails.append(made.email)
        names.append(made.external_id)
        return made

    sent_at = ago(days=10)
    cart = [customer(f"Cara{i}") for i in range(7)]
    treated = [customer(f"Tom{i}") for i in range(10)]
    held = [customer(f"Hella{i}") for i in range(5)]
    stranger = customer("Stan")
    with Session(store.engine) as session:
        cart_sends = [_send(session, c, "abandoned-cart", "bounced" if i == 6 else "sent", sent_at, "active")
                      for i, c in enumerate(cart)]
        for i in (0, 1, 2):
            session.add(Engagement(send_id=cart_sends[i].id, customer_id=cart[i].id, kind="click", link=0,
                                   at=sent_at + timedelta(hours=1)))
        session.add(Engagement(send_id=cart_sends[0].id, customer_id=cart[0].id, kind="click", link=1,
                               at=sent_at + timedelta(hours=2)))
        session.add(Engagement(send_id=cart_sends[3].id, customer_id=cart[3].id, kind="click", link=0,
                               at=sent_at + timedelta(seconds=2), machine="too_soon"))
        _order(session, cart[0], sent_at + timedelta(hours=3), 8_000)
        _order(session, cart[1], sent_at + timedelta(days=1), 5_050)
        _order(session, cart[4], sent_at + timedelta(days=2), 2_000, "USD")
        for c in treated:
            _send(session, c, "winback-lapsed", "sent", sent_at, "lapsed")
        for c in held:
            _send(session, c, "winback-lapsed", "held_out", sent_at, "lapsed")
        for c in treated[:4]:
            _order(session, c, sent_at + timedelta(days=3), 4_000)
        _order(session, held[0], sent_at + timedelta(days=3), 4_000)
        _order(session, stranger, ago(days=3), 1_234)
        for c in treated + held:
            _order(session, c, ago(days=500), 3_000)
        for c in cart:
            _order(session, c, ago(days=45), 6_000)
        for days in (100, 160, 220, 280, 340):
            _order(session, stranger, ago(days=days), 9_000)
        session.commit()
    attribute(store.engine, AttributionPolicy(window=WINDOW), NOW)
    return Shop(emails, names, cart={"delivered": 6, "bounced": 1, "unique clicks": 3, "conversions": 3},
                cart_revenue={"EUR": 8_000 + 5_050, "USD": 2_000}, winback={"treated": (10, 4), "held out": (5, 1)})


@pytest.fixture
def admin(settings: Settings) -> Settings:
    return settings.model_copy(update={"admin_token": SecretStr(TOKEN)})


def served(settings: Settings) -> WebServer:
    """lifecycle web's app with the reports page, on a real port."""
    app = create_app(settings, clock=lambda: NOW)
    add_reports(app, settings, web_engine(settings), clock=lambda: NOW)  # a no-op once create_app mounts it
    return WebServer(app).start()


@pytest.fixture
def bare(admin: Settings, store: Store) -> Iterator[WebServer]:
    """The page over an empty store."""
    server = served(admin)
    yield server
    server.stop()


@pytest.fixture
def web(admin: Settings, store: Store) -> Iterator[tuple[WebServer, Shop]]:
    facts = shop(store)
    server = served(admin)
    yield server, facts
    server.stop()


def basic(password: str, user: str = "anyone") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def get(server: WebServer, headers: dict[str, str] | None = None, **params: str) -> httpx.Response:
    return httpx.get(f"{server.url}/reports", params=params, headers=headers or {}, timeout=30)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_without_a_token_there_is_no_page_and_the_log_says_how_to_turn_it_on(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    assert settings.admin_token is None
    with caplog.at_level(logging.INFO, logger="flows.surfaces.web_reports"):
        server = served(settings.model_copy(update={"environment": "development"}))
    try:
        assert get(server, basic("")).status_code == 404
        assert get(server, {"Authorization": "Bearer anything"}).status_code == 404
    finally:
        server.stop()
    assert "set LIFECYCLE_ADMIN_TOKEN" in caplog.text


REFUSED = {
    "none": {}, "wrong": basic("wrong-token"), "truncated": basic(TOKEN[:-1]),
    "longer-bearer": {"Authorization": f"Bearer {TOKEN}x"},
    "token-as-user": {"Authorization": "Basic " + base64.b64encode(f"{TOKEN}:".encode()).decode()},
    "malformed": {"Authorization": "Basic not-base64!"}, "no-scheme": {"Authorization": TOKEN},
    "empty-bearer": {"Authorization": "Bearer"},
}
ACCEPTED = {"basic": basic(TOKEN), "basic-without-user": basic(TOKEN, user=""),
            "bearer": {"Authorization": f"Bearer {TOKEN}"}, "bearer-lower-case": {"Authorization": f"bearer  {TOKEN}"}}


@pytest.mark.parametrize(("name", "accepted"), [*((n, False) for n in REFUSED), *((n, True) for n in ACCEPTED)])
def test_only_the_token_as_basic_auth_password_or_bearer_token_is_accepted(name: str, accepted: bool) -> None:
    assert authorized({**REFUSED, **ACCEPTED}[name].get("Authorization"), TOKEN) is accepted
    assert not authorized(ACCEPTED["bearer"]["Authorization"], "")  # no token, no way in


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_without_the_token_the_answer_is_401_with_a_challenge_and_no_figures(bare: WebServer) -> None:
    for headers in REFUSED.values():
        response = get(bare, headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"].startswith('Basic realm="Lifecycle reports"')
        assert "<svg" not in response.text and "Triggers" not in response.text
        assert response.headers["cache-control"] == "no-store"
    for headers in ACCEPTED.values():
        response = get(bare, headers, since="2025-01-01", until="2025-01-08")
        assert response.status_code == 200, response.text[:300]
        assert response.headers["cache-control"] == "no-store" and "<svg" in response.text


def card(html: str, trigger: str) -> str:
    found = re.search(rf'<article class="card" data-trigger="{re.escape(trigger)}">(.*?)</article>', html, re.S)
    assert found, f"no card for {trigger}"
    return found.group(1)


def figure(card_html: str, label: str) -> str:
    found = re.search(rf'<dd data-figure="{re.escape(label)}">([^<]*)</dd>', card_html)
    assert found, f"no {label!r} on the card"
    return found.group(1)


def test_the_cards_show_the_stores_figures_and_no_customer(web: tuple[WebServer, Shop]) -> None:
    server, facts = web
    html = get(server, basic(TOKEN), since=SINCE, until=UNTIL).text
    cart = card(html, "abandoned-cart")
    for label, value in facts.cart.items():
        assert figure(cart, label) == f"{value:,}"
    assert figure(cart, "click rate") == f"{facts.cart['unique clicks'] / facts.cart['delivered']:.1%}"
    assert figure(cart, "revenue") == " · ".join(
        f"{currency} {cents / 100:,.2f}" for currency, cents in sorted(facts.cart_revenue.items()))
    winback = card(html, "winback-lapsed")
    (treated, treated_converted), (held, held_converted) = facts.winback["treated"], facts.winback["held out"]
    assert f"treated: {treated_converted / treated:.1%} of {treated} converted" in winback
    assert f"held out: {held_converted / held:.1%} of {held} converted" in winback
    lift = (treated_converted / treated - held_converted / held) * 100
    assert f"lift: {lift:+.1f} pts (95 % interval" in winback
    assert 'class="verdict' in winback
    assert "Orders in the period with no mail to credit: 2" in html  # the stranger's and the held-out one's
    assert "<script" not in html and " style=" not in html  # the charts with data, too
    for private in facts.emails + facts.names:
        assert private not in html
    assert "@" not in re.sub(r"<style>.*?</style>", "", html, flags=re.S)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_period_narrows_what_is_shown_and_a_bad_one_is_refused(web: tuple[WebServer, Shop]) -> None:
    server, _ = web
    before = get(server, basic(TOKEN), since="2025-01-01", until="2025-02-01").text
    assert "No marketing mail in this period." in before and 'data-trigger="abandoned-cart"' not in before
    for since, until in (("yesterday", UNTIL), (UNTIL, SINCE), (SINCE, SINCE)):
        response = get(server, basic(TOKEN), since=since, until=until)
        assert response.status_code == 400 and "since" in response.text
        assert "<svg" not in response.text


def test_the_default_period_is_the_last_eight_weeks_up_to_the_end_of_today() -> None:
    since, until = period(None, None, NOW)
    assert until == datetime(2026, 3, 17, tzinfo=NOW.tzinfo) and since == until - timedelta(weeks=8)
    assert period("2026-03-01T06:00:00", None, NOW)[0] == datetime(2026, 3, 1, 6, tzinfo=NOW.tzinfo)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_page_has_no_script_no_inline_style_attribute_and_only_the_hashed_stylesheet(bare: WebServer) -> None:
    html = get(bare, basic(TOKEN), since=SINCE, until=UNTIL).text
    tags = elements(html)
    assert not {"script", "img", "iframe", "object", "embed", "link", "image"} & {tag for tag, _ in tags}
    assert not [name for _, names in tags for name in names if name == "style" or name.startswith("on")]
    assert re.findall(r"<style>(.*?)</style>", html, re.S) == [CSS]
    assert "style-src 'sha256-" in REPORTS_CSP and "'unsafe-inline'" not in REPORTS_CSP
    assert "script-src" not in REPORTS_CSP and "default-src 'none'" in REPORTS_CSP


def elements(html: str) -> list[tuple[str, list[str]]]:
    """Every start tag of ``html`` with its attribute names."""
    found: list[tuple[str, list[str]]] = []

    class Collector(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            found.append((tag, [name for name, _ in attrs]))

    Collector().feed(html)
    return found


def csp_wired() -> bool:
    return headers_for("/reports", False)["content-security-policy"] == REPORTS_CSP


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.skipif(not csp_wired(), reason="flows.surfaces.web_security.headers_for does not give /reports "
                                            "REPORTS_CSP yet (it replaces every route's policy)")
def test_the_page_is_served_with_its_own_policy(bare: WebServer) -> None:
    for headers in (basic(TOKEN), {}):
        assert get(bare, headers, since="2025-01-01", until="2025-01-08").headers["content-security-policy"] \
            == REPORTS_CSP


# -- in Chromium ---------------------------------------------------------------------------------------

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def screenshot_path(tmp_path: Path) -> Path:
    """Where the Chromium test saves its screenshot: the README's (docs/) only when
    LIFECYCLE_UPDATE_SCREENSHOTS=1, so that a test run leaves the tree as it was."""
    return SCREENSHOT if os.environ.get(UPDATE_SCREENSHOTS) == "1" else tmp_path / "reports.png"


def test_the_screenshot_goes_to_docs_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(UPDATE_SCREENSHOTS, raising=False)
    assert screenshot_path(tmp_path) == tmp_path / "reports.png"
    monkeypatch.setenv(UPDATE_SCREENSHOTS, "0")
    assert screenshot_path(tmp_path) == tmp_path / "reports.png"
    monkeypatch.setenv(UPDATE_SCREENSHOTS, "1")
    assert screenshot_path(tmp_path) == SCREENSHOT


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason=f"Debian's chromium is not installed at {CHROMIUM} "
                                                           "(.ci/run installs it: apt-get install chromium)")
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_in_chromium_the_charts_render_and_the_cards_show_the_figures(web: tuple[WebServer, Shop],
                                                                      tmp_path: Path) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    server, facts = web
    url = f"{server.url}/reports?since={SINCE}&until={UNTIL}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            statuses: list[int] = []
            stranger = browser.new_page()
            stranger.on("response", lambda answer: statuses.append(answer.status))
            with contextlib.suppress(PlaywrightError):  # Chromium ends a refused navigation as an auth error
                stranger.goto(url)
            assert statuses == [401]
            context = browser.new_context(http_credentials={"username": "marketing", "password": TOKEN},
                                          viewport={"width": 1280, "height": 900})
            page = context.new_page()
            violations: list[str] = []
            page.on("console", lambda message: violations.append(message.text)
                    if "Content Security Policy" in message.text else None)
            response = page.goto(url)
            assert response is not None and response.status == 200
            charts = page.locator("svg.chart")
            assert charts.count() >= 4  # stage shares, heat map, revenue in EUR and in USD
            for index in range(charts.count()):
                chart = charts.nth(index)
                box = chart.bounding_box()
                assert box and box["width"] > 200 and box["height"] > 60, chart.get_attribute("aria-label")
                shapes = chart.locator("path, rect")
                assert shapes.count() > 5
                drawn = [shapes.nth(i).bounding_box() for i in range(min(shapes.count(), 12))]
                assert any(b and b["width"] > 1 and b["height"] > 1 for b in drawn)
            labels = [charts.nth(i).get_attribute("aria-label") or "" for i in range(charts.count())]
            assert any("EUR" in label for label in labels) and any("USD" in label for label in labels)
            heat = page.locator('svg.chart[aria-label^="Movement between stages"]')
            assert heat.locator("text", has_text="lapsed").count() >= 1
            cart = page.locator('article[data-trigger="abandoned-cart"]')
            assert cart.locator('dd[data-figure="delivered"]').inner_text() == str(facts.cart["delivered"])
            assert cart.locator('dd[data-figure="unique clicks"]').inner_text() == str(facts.cart["unique clicks"])
            holdout = page.locator('article[data-trigger="winback-lapsed"] .holdout')
            assert "of 10 converted" in holdout.inner_text() and "of 5 converted" in holdout.inner_text()
            if csp_wired():  # the stylesheet applies, nothing on the page was refused; the README shows this page
                assert page.locator(".cards").evaluate("e => getComputedStyle(e).display") == "grid"
                assert violations == []
                shot = screenshot_path(tmp_path)
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
        finally:
            browser.close()
