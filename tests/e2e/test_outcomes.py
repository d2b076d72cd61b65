"""What each mail earned, end to end on a clean project, as a marketer would see it:

1. ``lifecycle demo`` sends the shipped triggers' mail (the win-back campaign holds a fifth
   out): its marketing mail carries tracked links, its service mail does not.
2. ``lifecycle web`` serves them; Chromium follows one and lands on the shop with the UTM
   parameters, and the click shows in ``lifecycle customer`` and ``lifecycle report``.
3. An order the shop sends afterwards (``lifecycle ingest``) is attributed to that mail.
4. The report gives the win-back's holdout lift with its interval.
"""

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import select
from sqlmodel import Session, col

from flows.content.links import read_click_token
from flows.settings import Settings
from flows.surfaces.outbox import free_port
from models import Customer, Send
from models.db import make_engine
from models.types import utcnow
from tests.support import ROOT
from tests.support.children import lifecycle, lifecycle_bin

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

PERSON = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is needed (.ci/run installs it)")


class _Shop(BaseHTTPRequestHandler):
    """The shop's site: every page says "Shop"."""

    def do_GET(self) -> None:
        body = b"<html><body>Shop</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def project(tmp_path: Path) -> Iterator[tuple[Settings, Path]]:
    """The shipped triggers and templates as they are (holdouts included), a fresh SQLite store,
    and the shop's site on loopback (the mail's links lead there)."""
    shop = ThreadingHTTPServer(("127.0.0.1", 0), _Shop)
    threading.Thread(target=shop.serve_forever, daemon=True).start()
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'store.db'}", triggers_dir=ROOT / "triggers",
                        templates_dir=ROOT / "templates", base_url=f"http://127.0.0.1:{free_port()}",
                        shop_url=f"http://127.0.0.1:{shop.server_address[1]}",
                        secret="outcomes-e2e-secret-0123456789", workers=1)  # type: ignore[arg-type]
    yield settings, tmp_path
    shop.shutdown()


def html_of(message: EmailMessage) -> str:
    part = message.get_body(("html",))
    assert part is not None
    return str(part.get_content())


def out(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_a_demo_mail_is_clicked_in_chromium_reported_attributed_and_the_holdout_measured(
        project: tuple[Settings, Path]) -> None:
    settings, folder = project
    outbox = folder / "outbox"
    # The demo's own temporary Prefect server, given time to start on a busy machine.
    out(lifecycle("demo", "--outbox", str(outbox), settings=settings, cwd=folder, timeout=400,
                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180"))
    mails = [message_from_bytes(p.read_bytes(), policy=policy.default) for p in sorted(outbox.glob("*.eml"))]
    assert mails
    base = settings.base_url
    marketing = [m for m in mails if m["List-Unsubscribe"]]
    service = [m for m in mails if not m["List-Unsubscribe"]]
    assert marketing and service
    assert all(f"{base}/c/" in html_of(m) for m in marketing)  # the demo's marketing mail carries tracked links
    assert all(f"{base}/c/" not in html_of(m) for m in service)  # service mail is never tracked

    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        held = session.execute(select(Send).where(col(Send.trigger) == "winback-lapsed")).scalars().all()
    statuses = {row.status for row in held}
    assert statuses >= {"sent", "held_out"}, statuses  # a fifth of the lapsed are held out

    # The first tracked link of a win-back mail, and whose mail it is.
    mail = next(m for m in marketing if "winback" in (m["List-Id"] or ""))
    link = next(u for u in re.findall(r'href="([^"]+)"', html_of(mail)) if u.startswith(f"{base}/c/"))
    found = read_click_token(settings.signing_secret, link.rsplit("/", 1)[1])
    assert found is not None
    with Session(engine) as session:
        send = session.execute(select(Send).where(col(Send.message_id) == mail["Message-ID"])).scalar_one()
        customer = session.get(Customer, send.customer_id)
        assert customer is not None and send.links
    destination = send.links.split("\n")[found[1]]

    # A person clicks, a few seconds after the mail arrived: not the scanner's first seconds.
    assert send.finished_at is not None
    time.sleep(max(0.0, (send.finished_at + timedelta(seconds=6) - utcnow()).total_seconds()))
    port = int(urlsplit(base).port or 80)
    web = subprocess.Popen([lifecycle_bin(), "web", "--host", "127.0.0.1", "--port", str(port)], cwd=folder,
                           env=child_env(settings), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        landed = follow_in_chromium(link)
    finally:
        web.terminate()
        web.wait(timeout=30)
    query = parse_qs(urlsplit(landed).query)
    assert landed.startswith(destination.split("?")[0])
    assert query["utm_source"] == ["lifecycle"] and query["utm_medium"] == ["email"]
    assert query["utm_campaign"] == ["winback-lapsed"]
    assert query["utm_content"] == [f"winback/{send.stage}/default"]

    timeline = json.loads(out(lifecycle("customer", customer.external_id, "--format", "json", settings=settings,
                                        cwd=folder)))
    clicks = [e for e in timeline["entries"] if e["kind"] == "click"]
    assert len(clicks) == 1 and clicks[0]["send_id"] == send.id, timeline["entries"]

    report = json.loads(out(lifecycle("report", "--format", "json", "--trigger", "winback-lapsed",
                                      settings=settings, cwd=folder)))
    [row] = [r for r in report["rows"] if r["dimension"] == "trigger"]
    assert row["unique_clicks"] == 1 and row["conversions"] == 0

    # The shop reports an order a minute later: attributed to the clicked mail.
    order = {"type": "track", "event": "Order Completed", "userId": customer.external_id,
             "messageId": "e2e-order-1", "timestamp": (utcnow() + timedelta(seconds=1)).isoformat(),
             "properties": {"order_id": "e2e-1", "total": 42.5, "currency": "EUR", "products": []}}
    events = folder / "order.jsonl"
    events.write_text(json.dumps(order) + "\n")
    out(lifecycle("ingest", str(events), settings=settings, cwd=folder))
    now = (utcnow() + timedelta(minutes=1)).isoformat()
    report = json.loads(out(lifecycle("report", "--format", "json", "--now", now, settings=settings, cwd=folder)))
    [row] = [r for r in report["rows"] if r["trigger"] == "winback-lapsed" and r["dimension"] == "trigger"]
    assert row["conversions"] == 1 and row["revenue"] == {"EUR": 4250}
    timeline = json.loads(out(lifecycle("customer", customer.external_id, "--format", "json", "--now", now,
                                        settings=settings, cwd=folder)))
    [bought] = [e for e in timeline["entries"] if e["kind"] == "order" and "e2e-1" in json.dumps(e)]
    assert bought["send_id"] == send.id and "click" in json.dumps(bought)

    # The win-back's holdout: the lift with its interval, and whether it says anything yet.
    [lift] = [h for h in report["holdouts"] if h["trigger"] == "winback-lapsed"]
    assert lift["treated"]["recipients"] > 0 and lift["held_out"]["recipients"] > 0
    low, high = lift["lift_ci"]
    assert low <= lift["lift"] <= high
    assert lift["verdict"]


def child_env(settings: Settings) -> dict[str, str]:
    from tests.support.children import child_env as env_for

    return env_for(settings, PREFECT_SERVER_ANALYTICS_ENABLED="false", PATH=os.environ["PATH"])


def follow_in_chromium(link: str) -> str:
    """Open ``link`` in Chromium as a person would; where it lands."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            # A person's Chrome: headless Chrome's own user agent is a scanner's (flows.tracking.clicks).
            page = browser.new_page(user_agent=PERSON)
            response = page.goto(link)
            assert response is not None and response.ok
            assert response.request.redirected_from is not None  # it went through our 302
            assert response.request.redirected_from.url == link
            assert page.content().count("Shop") == 1
            return page.url
        finally:
            browser.close()
