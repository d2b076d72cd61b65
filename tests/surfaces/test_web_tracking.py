"""Tracked links and the open pixel of ``lifecycle web``, over a real store: where a click goes, what it records."""

import asyncio
import io
import re
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from email.message import EmailMessage

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine, func, select, text
from sqlmodel import Session, col

from flows.content.links import click_token, click_url, open_token
from flows.settings import Settings
from flows.spec.policy import Tracking
from flows.spec.problems import SpecError
from flows.surfaces.web import create_app, web_engine
from flows.surfaces.web_tracking import PIXEL, ClickWriter
from flows.tracking.clicks import Hit
from models import Customer, Engagement, Send
from models.types import utcnow
from tests.support.builders import NOW, Store, ago
from tests.support.runs import run
from tests.support.smtp_server import SmtpServer
from tests.support.web_server import Clock, WebServer
from tests.tracking.test_clicks import CHROME, tracked_send

LATER = NOW + timedelta(minutes=10)  # a person's click: well after the mail left at NOW
SHOP = "https://shop.example/p/1"
UTM = "utm_source=lifecycle&utm_medium=email&utm_campaign=winback-lapsed&utm_content=winback_lapsed/lapsed/default"


@pytest.fixture
def clock() -> Clock:
    return Clock(LATER)


@pytest.fixture
def app(settings: Settings, clock: Clock) -> FastAPI:
    return create_app(settings, clock=clock)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, headers={"user-agent": CHROME}, follow_redirects=False) as client:
        yield client


def engagements(engine: Engine) -> list[Engagement]:
    with Session(engine) as session:
        return list(session.execute(select(Engagement).order_by(col(Engagement.id))).scalars())


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def set_policy(settings: Settings, **tracking: str) -> None:
    """``triggers/policy.yaml``'s tracking block with ``tracking`` changed."""
    policy = settings.triggers_dir / "policy.yaml"
    source = policy.read_text()
    for name, value in tracking.items():
        source, changed = re.subn(rf"(?m)^  {name}: .*$", f"  {name}: {value}", source)
        assert changed == 1, name
    policy.write_text(source)


def test_a_click_redirects_to_the_ledgers_destination_with_utm_and_is_recorded(
        settings: Settings, store: Store, client: TestClient) -> None:
    send, digest = tracked_send(store, [SHOP, "https://shop.example/p/2?size=42#reviews"])
    first = client.get(f"/c/{click_token(settings.signing_secret, digest, 0)}")
    second = client.get(f"/c/{click_token(settings.signing_secret, digest, 1)}")
    assert (first.status_code, first.headers["location"]) == (302, f"{SHOP}?{UTM}")
    assert second.headers["location"] == f"https://shop.example/p/2?size=42&{UTM}#reviews"
    # The destination never learns the token (no Referer), and no cache keeps the redirect.
    assert first.headers["referrer-policy"] == "no-referrer" and first.headers["cache-control"] == "no-store"
    assert [(e.send_id, e.customer_id, e.kind, e.link, e.at, e.machine, e.repeats)
            for e in engagements(store.engine)] == [(send.id, send.customer_id, "click", 0, LATER, "", 0),
                                                    (send.id, send.customer_id, "click", 1, LATER, "", 0)]


def forged_tokens(secret: str, digest: str, other_digest: str) -> dict[str, str]:
    """Every way a token can be wrong for send ``digest`` (two links) while looking like one."""
    genuine = click_token(secret, digest, 1)
    flipped = genuine[:-1] + ("0" if genuine[-1] != "0" else "1")
    return {
        "forged": "0" * len(genuine),
        "truncated": genuine[:-1],
        "extended": genuine + "0",
        "altered signature": flipped,
        "another link, same signature": genuine[:32] + "00" + genuine[34:],
        "another mail, same signature": other_digest + genuine[32:],
        "link 3 of a mail with 2 links": click_token(secret, digest, 3),
        "another secret": click_token("another-secret-0123456789", digest, 1),
        "an open token": open_token(secret, digest),
        "upper case": genuine.upper(),
        "a path after it": genuine + "/https://evil.example",
        "encoded slash": genuine + "%2F..%2Fevil",
        "empty": "",
    }


def test_a_forged_truncated_altered_or_foreign_token_is_404_and_records_nothing(
        settings: Settings, store: Store, client: TestClient) -> None:
    _, digest = tracked_send(store)  # two links
    _, other = tracked_send(store)
    for why, token in forged_tokens(settings.signing_secret, digest, other).items():
        for method in ("GET", "HEAD"):
            answer = client.request(method, f"/c/{token}")
            assert answer.status_code == 404, why
            assert "location" not in answer.headers, why
        if why != "an open token":  # that one is the pixel's own
            assert client.get(f"/o/{token}").status_code == 404, why
    assert "Dieser Link ist ungültig." in client.get("/c/0", headers={"accept-language": "de-DE"}).text
    assert engagements(store.engine) == []


def test_no_part_of_the_request_chooses_the_destination(settings: Settings, store: Store,
                                                         client: TestClient) -> None:
    _, digest = tracked_send(store)
    token = click_token(settings.signing_secret, digest, 0)
    expected = f"{SHOP}?{UTM}"
    for query in ("?url=https://evil.example", "?next=//evil.example&redirect=https://evil.example",
                  "?utm_campaign=evil&utm_source=evil", "?"):
        assert client.get(f"/c/{token}{query}").headers["location"] == expected, query
    assert client.get(f"/c/{token}", headers={"host": "evil.example"}).headers["location"] == expected
    assert client.get(f"/c/{token}/https://evil.example").status_code == 404
    assert client.get(f"/c/{token}%2F%2Fevil.example").status_code == 404
    assert [e.repeats for e in engagements(store.engine)] == [4]  # one click, asked five times within a minute


def test_head_requests_scanners_and_clicks_right_after_the_send_are_flagged_not_a_persons(
        settings: Settings, store: Store, client: TestClient, clock: Clock) -> None:
    _, digest = tracked_send(store, left=NOW)
    token = click_token(settings.signing_secret, digest, 0)
    clock.now = NOW + timedelta(seconds=2)
    assert client.get(f"/c/{token}").status_code == 302  # a browser's agent, but 2 s after the send
    clock.now = LATER
    assert client.head(f"/c/{token}").status_code == 302
    assert client.get(f"/c/{token}", headers={"user-agent": "Mozilla/5.0 (compatible; BingPreview/1.0b)"}
                      ).headers["location"] == f"{SHOP}?{UTM}"
    assert client.get(f"/c/{token}", headers={"user-agent": ""}).status_code == 302
    assert [(e.machine, e.repeats) for e in engagements(store.engine)] == [("too_soon", 0), ("head", 0),
                                                                          ("scanner", 1)]


def test_a_flood_on_one_token_is_one_click_with_its_repeats_and_after_the_window_a_new_one(
        settings: Settings, store: Store, client: TestClient, clock: Clock) -> None:
    _, digest = tracked_send(store)
    token = click_token(settings.signing_secret, digest, 0)
    for i in range(50):
        clock.now = LATER + timedelta(seconds=i)
        assert client.get(f"/c/{token}").status_code == 302
    clock.now = LATER + timedelta(seconds=61)
    assert client.get(f"/c/{token}").status_code == 302
    assert [(e.at, e.repeats) for e in engagements(store.engine)] == [(LATER, 49), (clock.now, 0)]


def links_of(message: EmailMessage) -> list[str]:
    return re.findall(r'href="([^"]*)"', message.get_body(("html",)).get_content())


def test_a_real_mails_links_are_tracked_but_unsubscribe_and_preferences_never(
        settings: Settings, store: Store, smtp: SmtpServer, client: TestClient, clock: Clock) -> None:
    customer = store.customer("Lena")
    store.order(customer, ago(days=500))
    run(settings, "winback-lapsed")
    message = smtp.handler.to(customer.email)[0].message
    base = settings.base_url
    links = links_of(message)
    ours = [link for link in links if link.startswith((f"{base}/u/", f"{base}/preferences/"))]
    tracked = [link for link in links if link.startswith(f"{base}/c/")]
    assert ours and tracked and len(ours) + len(tracked) == len(links)
    assert "<" + ours[0] + ">" in message["List-Unsubscribe"]
    assert f"{base}/o/" not in message.get_body(("html",)).get_content()  # no pixel: opens are off by default
    clock.now = utcnow() + timedelta(minutes=1)  # the run's mail left just now
    answer = client.get(path_of(tracked[0]))
    assert answer.status_code == 302 and answer.headers["location"] == f"{settings.shop_url}?" + UTM.replace(
        "winback_lapsed/lapsed", "winback/lapsed")
    with Session(store.engine) as session:
        send = session.execute(select(Send)).scalar_one()
    assert [(e.send_id, e.link, e.machine) for e in engagements(store.engine)] == [(send.id, 0, "")]


def test_the_open_pixel_is_off_by_default_and_when_on_records_opens(
        settings: Settings, store: Store, smtp: SmtpServer, clock: Clock) -> None:
    customer = store.customer("Lena")
    store.order(customer, ago(days=500))
    set_policy(settings, opens="true")
    run(settings, "winback-lapsed")
    html = smtp.handler.to(customer.email)[0].message.get_body(("html",)).get_content()
    pixel = re.search(rf'<img src="({re.escape(settings.base_url)}/o/[0-9a-f]+)"', html)
    assert pixel is not None
    clock.now = utcnow() + timedelta(minutes=1)
    with TestClient(create_app(settings, clock=clock), headers={"user-agent": CHROME}) as client:
        answers = [client.get(path_of(pixel.group(1))) for _ in range(2)]
    for answer in answers:
        assert (answer.status_code, answer.headers["content-type"], answer.content) == (200, "image/gif", PIXEL)
        assert answer.headers["cross-origin-resource-policy"] == "cross-origin"  # webmail shows it in its pages
        assert answer.headers["cache-control"] == "no-store"  # each open asks again
    image = Image.open(io.BytesIO(answers[0].content))
    assert image.size == (1, 1) and image.info.get("transparency") == 0
    assert [(e.kind, e.link, e.repeats) for e in engagements(store.engine)] == [("open", -1, 1)]


def test_opens_are_not_recorded_while_the_policy_has_them_off(settings: Settings, store: Store,
                                                               client: TestClient) -> None:
    _, digest = tracked_send(store)
    answer = client.get(f"/o/{open_token(settings.signing_secret, digest)}")
    assert (answer.status_code, answer.content) == (200, PIXEL)
    assert engagements(store.engine) == []


def preferences_path(settings: Settings, customer: Customer) -> str:
    from flows.content.links import preferences_url

    return preferences_url("", settings.signing_secret, customer.external_id)


def untracked_at(engine: Engine, customer: Customer) -> datetime | None:
    with Session(engine) as session:
        return session.execute(select(Customer.untracked_at).where(col(Customer.id) == customer.id)).scalar_one()


def test_leaving_tracking_on_the_preference_page_sends_plain_links_and_records_no_clicks(
        settings: Settings, store: Store, smtp: SmtpServer, client: TestClient, clock: Clock) -> None:
    customer = store.customer("Lena", locale="en-GB")
    store.order(customer, ago(days=500))
    _, old = tracked_send(store, customer=customer, trigger="spring-sale", left=ago(days=30))  # a mail from before
    page = client.get(preferences_path(settings, customer))
    assert re.search(r'<input type="checkbox" name="tracking" value="1" checked> Let us see which links you click',
                     page.text)
    categories = re.findall(r'name="category" value="(\w+)" checked', page.text)
    left = client.post(preferences_path(settings, customer), data={"category": categories, "tracking_shown": "1"})
    assert left.status_code == 200 and 'name="tracking" value="1">' in left.text
    assert untracked_at(store.engine, customer) == LATER
    # The "unsubscribe from everything" button says nothing about tracking.
    client.post(preferences_path(settings, customer), data={"category": categories})
    assert untracked_at(store.engine, customer) == LATER

    run(settings, "winback-lapsed")
    message = smtp.handler.to(customer.email)[0].message
    assert f"{settings.base_url}/c/" not in message.get_body(("html",)).get_content()
    assert settings.shop_url in links_of(message)
    old_click = client.get(f"/c/{click_token(settings.signing_secret, old, 0)}")
    assert old_click.status_code == 302 and old_click.headers["location"].startswith(SHOP)  # still goes there
    assert engagements(store.engine) == []

    back = client.post(preferences_path(settings, customer),
                       data={"category": categories, "tracking_shown": "1", "tracking": "1"})
    assert 'name="tracking" value="1" checked>' in back.text
    assert untracked_at(store.engine, customer) is None
    assert client.get(f"/c/{click_token(settings.signing_secret, old, 0)}").status_code == 302
    assert len(engagements(store.engine)) == 1


def test_the_preference_page_asks_in_german(settings: Settings, store: Store, client: TestClient) -> None:
    customer = store.customer("Lena", locale="de-DE")
    page = client.get(preferences_path(settings, customer))
    assert "Ihr dürft sehen, welche Links ich in euren E-Mails anklicke" in page.text


def test_a_busy_store_answers_503_with_retry_after_and_records_nothing(
        settings: Settings, store: Store, clock: Clock) -> None:
    send, digest = tracked_send(store)
    quick = settings.model_copy(update={"web_statement_timeout_seconds": 0.3})
    blocker = web_engine(settings)
    path = f"/c/{click_token(settings.signing_secret, digest, 0)}"
    with TestClient(create_app(quick, clock=clock), headers={"user-agent": CHROME}, follow_redirects=False) as client:
        with blocker.begin() as held:  # SQLite: its one writer's lock
            if blocker.dialect.name == "postgresql":  # the click writer's lock on this send
                held.execute(text("SELECT pg_advisory_xact_lock(1617000, :id)"), {"id": send.id})
            busy = client.get(path)
        assert (busy.status_code, busy.headers["retry-after"]) == (503, "30")
        assert "location" not in busy.headers and engagements(store.engine) == []
        again = client.get(path)
    blocker.dispose()
    assert again.status_code == 302 and [e.repeats for e in engagements(store.engine)] == [0]


def test_a_broken_policy_stops_the_web_app_with_its_located_problem(settings: Settings) -> None:
    set_policy(settings, clicks="yes please")
    with pytest.raises(SpecError) as raised:
        create_app(settings)
    assert re.search(r"policy\.yaml:\d+", str(raised.value)) and "tracking.clicks" in str(raised.value)


def test_shutting_down_writes_every_queued_click_first(store: Store) -> None:
    _, digest = tracked_send(store)
    writer = ClickWriter(store.engine, Tracking(), max_batch=8)

    async def clicks_then_shutdown() -> list[str | None]:
        waiting = [asyncio.create_task(writer.submit(Hit("click", digest, i % 2, LATER + timedelta(seconds=i))))
                   for i in range(30)]
        await asyncio.sleep(0)  # queued, the first batch begun
        await writer.close()
        assert all(task.done() for task in waiting)
        return [task.result() for task in waiting]

    answers = asyncio.run(clicks_then_shutdown())
    assert len(answers) == 30 and all(a is not None and a.startswith("https://shop.example/p/") for a in answers)
    assert sum(1 + e.repeats for e in engagements(store.engine)) == 30 and writer.batches == 4


def test_concurrent_clicks_through_uvicorn_are_each_committed_before_their_redirect(
        settings: Settings, store: Store, clock: Clock) -> None:
    """Group commit for real: many clicks at once, in few transactions, none lost, none answered early."""
    sends = [tracked_send(store) for _ in range(10)]
    app = create_app(settings, clock=clock)
    server = WebServer(app).start()
    seen: list[int] = []
    lock = threading.Lock()

    async def click_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, headers={"user-agent": CHROME}) as client:
            async def one(i: int) -> httpx.Response:
                _, digest = sends[i % len(sends)]
                answer = await client.get(click_url("", settings.signing_secret, digest, i // len(sends) % 2))
                with Session(store.engine) as session:  # committed before the 302 arrived
                    recorded = session.execute(select(func.count()).select_from(Engagement)).scalar_one()
                with lock:
                    seen.append(recorded)
                return answer
            return await asyncio.gather(*(one(i) for i in range(200)))

    try:
        answers = asyncio.run(click_all())
    finally:
        server.stop()
    assert [a.status_code for a in answers] == [302] * 200
    rows = engagements(store.engine)
    assert len(rows) == 20 and sum(1 + e.repeats for e in rows) == 200  # 10 sends × 2 links, the rest repeats
    assert min(seen) >= 1
    writer = app.state.clicks
    assert writer.written == 200 and writer.batches < 200


def test_the_pixel_route_answers_only_get_and_head(settings: Settings, store: Store, client: TestClient) -> None:
    _, digest = tracked_send(store)
    path = f"/o/{open_token(settings.signing_secret, digest)}"
    assert client.post(path).status_code == 405 and client.head(path).status_code == 200
    assert client.delete(f"/c/{click_token(settings.signing_secret, digest, 0)}").status_code == 405
    assert engagements(store.engine) == []



def test_a_defect_answers_500_with_the_security_headers(settings: Settings, store: Store, app: FastAPI,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _, digest = tracked_send(store)

    async def broken(hit: Hit) -> str | None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.state.clicks, "submit", broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get(f"/c/{click_token(settings.signing_secret, digest, 0)}", follow_redirects=False)
    assert answer.status_code == 500 and "location" not in answer.headers
    assert answer.headers["content-security-policy"].startswith("default-src 'none'")
    assert answer.headers["cache-control"] == "no-store"
