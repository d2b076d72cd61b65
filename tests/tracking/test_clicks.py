"""What a request to a tracked link was (a person, a machine, a repeat), where it goes, and what is recorded."""

import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from itertools import count

import pytest
from sqlalchemy import Engine, insert, select, text, update
from sqlmodel import Session, col

from flows.content.links import send_digest
from flows.spec.policy import Tracking
from flows.tracking.clicks import (
    HEAD,
    PERSON,
    SCANNER,
    TOO_SOON,
    Hit,
    machine,
    record_hits,
    request_machine,
    scanner_agent,
    utm_content,
    with_utm,
)
from models import Customer, Engagement, Send
from tests.support import SECRET
from tests.support.builders import NOW, Store

CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"
SECOND = timedelta(seconds=1)
POLICY = Tracking()  # 5 s machine window, 60 s repeat window, clicks on, opens off
_ids = count(1)


# -- the machine rule ------------------------------------------------------------------------------

@pytest.mark.parametrize("agent", [
    CHROME,
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17928; Pro)",
    "Mozilla/5.0 (Linux; Android 10; CUBOT X30) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Mobile Safari",
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",  # a Gmail user's open
])
def test_browsers_and_mail_clients_are_people(agent: str) -> None:
    assert not scanner_agent(agent)
    assert request_machine("GET", agent) == PERSON


@pytest.mark.parametrize("agent", [
    None, "", "   ",
    "Mozilla/5.0 (compatible; Barracuda Sentinel)",
    "Proofpoint URL Defense",
    "Mimecast Link Scanner",
    "Mozilla/5.0 (Windows NT 10.0) AppleWebKit/534+ (KHTML, like Gecko) BingPreview/1.0b",
    "Cisco IronPort WSA",
    "Symantec Email Security.cloud",
    "Mozilla/5.0 TrendMicro InterScan",
    "Sophos Email Link Check",
    "Google-Safety",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "facebookexternalhit/1.1",
    "python-requests/2.32.3", "curl/8.5.0", "Wget/1.21.4", "Go-http-client/1.1",
    "Mozilla/5.0 (compatible; SomeCrawler)", "LinkPreview/1.0", "my-link-scanner",
])
def test_scanners_prefetchers_robots_and_no_user_agent_are_flagged_scanner(agent: str | None) -> None:
    assert scanner_agent(agent)
    assert request_machine("GET", agent) == SCANNER


def test_a_head_request_is_flagged_head_whoever_sends_it() -> None:
    assert request_machine("HEAD", CHROME) == HEAD
    assert request_machine("HEAD", "Proofpoint URL Defense") == HEAD  # head before scanner


def test_a_click_sooner_than_the_machine_window_after_the_mail_left_is_too_soon() -> None:
    within = timedelta(seconds=5)
    assert machine(PERSON, NOW + 4.9 * SECOND, NOW, within) == TOO_SOON
    assert machine(PERSON, NOW - SECOND, NOW, within) == TOO_SOON  # before the ledger says it left
    assert machine(PERSON, NOW + 5 * SECOND, NOW, within) == PERSON
    assert machine(PERSON, NOW + timedelta(days=3), NOW, within) == PERSON


def test_head_and_scanner_come_before_too_soon() -> None:
    within = timedelta(seconds=5)
    assert machine(HEAD, NOW + SECOND, NOW, within) == HEAD
    assert machine(SCANNER, NOW + SECOND, NOW, within) == SCANNER
    assert machine(SCANNER, NOW + timedelta(hours=1), NOW, within) == SCANNER


def test_no_machine_window_means_no_click_is_too_soon() -> None:
    assert machine(PERSON, NOW, NOW, timedelta(0)) == PERSON


# -- UTM ----------------------------------------------------------------------------------------

UTM = "utm_source=lifecycle&utm_medium=email&utm_campaign=winback-lapsed&utm_content=winback_lapsed/lapsed/default"


def utm(url: str) -> str:
    return with_utm(url, "winback-lapsed", "winback_lapsed/lapsed/default")


@pytest.mark.parametrize(("link", "followed"), [
    ("https://shop.example/", f"https://shop.example/?{UTM}"),
    ("https://shop.example", f"https://shop.example?{UTM}"),
    ("http://shop.example/p/1", f"http://shop.example/p/1?{UTM}"),
    # The link's own parameters, as written: order, encoding, blanks and repeats.
    ("https://shop.example/s?q=rote%20Schuhe&b=2&a=&a=3", f"https://shop.example/s?q=rote%20Schuhe&b=2&a=&a=3&{UTM}"),
    ("https://shop.example/s?q=a+b", f"https://shop.example/s?q=a+b&{UTM}"),
    ("https://shop.example/p?", f"https://shop.example/p?{UTM}"),
    ("https://shop.example/p?x=1&", f"https://shop.example/p?x=1&{UTM}"),
    # The fragment stays at the end.
    ("https://shop.example/p#reviews", f"https://shop.example/p?{UTM}#reviews"),
    ("https://shop.example/p?x=1#a?b=c", f"https://shop.example/p?x=1&{UTM}#a?b=c"),
    # A utm_* the link carries is the link's, whatever its case; the others are added.
    ("https://shop.example/?utm_campaign=spring",
     "https://shop.example/?utm_campaign=spring&utm_source=lifecycle&utm_medium=email"
     "&utm_content=winback_lapsed/lapsed/default"),
    ("https://shop.example/?UTM_SOURCE=partner&utm_medium=&utm_campaign=x&utm_content=y",
     "https://shop.example/?UTM_SOURCE=partner&utm_medium=&utm_campaign=x&utm_content=y"),
    ("HTTPS://SHOP.EXAMPLE/P", f"HTTPS://SHOP.EXAMPLE/P?{UTM}"),
    ("mailto:hi@shop.example", "mailto:hi@shop.example"),
])
def test_utm_parameters_are_appended_and_the_links_own_are_kept(link: str, followed: str) -> None:
    assert utm(link) == followed


def test_utm_values_are_encoded() -> None:
    followed = with_utm("https://shop.example/", "spring sale&more", "a b/c/default")
    assert followed == ("https://shop.example/?utm_source=lifecycle&utm_medium=email"
                        "&utm_campaign=spring%20sale%26more&utm_content=a%20b/c/default")


def test_utm_content_names_the_template_folder_the_stage_and_the_variant() -> None:
    assert utm_content("abandoned_cart/default.de.html.j2", "active") == "abandoned_cart/active/default"
    assert utm_content("abandoned_cart/default.de.html.j2", "active", "b") == "abandoned_cart/active/b"
    assert utm_content("onboarding", "") == "onboarding/default/default"


# -- recording a batch, on a real store --------------------------------------------------------------

def tracked_send(store: Store, links: Sequence[str] = ("https://shop.example/p/1", "https://shop.example/p/2"),
                 *, left: datetime = NOW, customer: Customer | None = None, trigger: str = "winback-lapsed",
                 template: str = "winback_lapsed/default.de.html.j2", variant: str = "") -> tuple[Send, str]:
    """A marketing mail that left at ``left`` with ``links`` tracked; the send and its digest."""
    customer = customer or store.customer("Kim")
    key = f"{trigger}/{customer.id}/o{next(_ids)}"
    digest = send_digest(SECRET, key)
    send = Send(send_key=key, trigger=trigger, customer_id=customer.id, occurrence=key.rsplit("/", 1)[1],
                status="sent", run_id="run-1", stage="lapsed", template=template, email=customer.email or "",
                message_id=f"<{digest}@shop.example>", evaluated_at=left, claimed_at=left - SECOND, finished_at=left,
                links="\n".join(links) or None, step="first" if variant else "", variant=variant)
    with Session(store.engine, expire_on_commit=False) as session:
        session.add(send)
        session.commit()
    return send, digest


def engagements(engine: Engine) -> list[Engagement]:
    with Session(engine) as session:
        return list(session.execute(select(Engagement).order_by(col(Engagement.id))).scalars())


def click(digest: str, link: int, at: datetime, requested: str = PERSON) -> Hit:
    return Hit("click", digest, link, at, requested)


def test_each_click_goes_to_its_links_destination_with_utm_and_is_recorded(store: Store) -> None:
    first, a = tracked_send(store)
    second, b = tracked_send(store, ["https://shop.example/q?x=1"])
    at = NOW + timedelta(minutes=10)
    answers = record_hits(store.engine, [click(a, 1, at), click(b, 0, at), click(a, 0, at)], POLICY)
    content = "utm_content=winback_lapsed/lapsed/default"
    assert answers == [
        f"https://shop.example/p/2?utm_source=lifecycle&utm_medium=email&utm_campaign=winback-lapsed&{content}",
        f"https://shop.example/q?x=1&utm_source=lifecycle&utm_medium=email&utm_campaign=winback-lapsed&{content}",
        f"https://shop.example/p/1?utm_source=lifecycle&utm_medium=email&utm_campaign=winback-lapsed&{content}",
    ]
    rows = engagements(store.engine)
    assert [(r.send_id, r.customer_id, r.kind, r.link, r.at, r.machine, r.repeats) for r in rows] == [
        (first.id, first.customer_id, "click", 1, at, "", 0), (second.id, second.customer_id, "click", 0, at, "", 0),
        (first.id, first.customer_id, "click", 0, at, "", 0)]


def test_a_journey_steps_variant_is_in_utm_content(store: Store) -> None:
    _, digest = tracked_send(store, variant="b")
    (answer,) = record_hits(store.engine, [click(digest, 0, NOW + timedelta(minutes=10))], POLICY)
    assert answer is not None and answer.endswith("&utm_content=winback_lapsed/lapsed/b")


def test_a_token_for_no_send_or_a_position_past_the_mails_links_goes_nowhere_and_records_nothing(
        store: Store) -> None:
    _, digest = tracked_send(store)  # two links: 0 and 1
    _, plain = tracked_send(store, [])  # a mail sent without tracked links
    at = NOW + timedelta(minutes=10)
    unknown = send_digest(SECRET, "winback-lapsed/0/never-sent")
    assert record_hits(store.engine, [click(digest, 2, at), click(unknown, 0, at), click(plain, 0, at)],
                       POLICY) == [None, None, None]
    assert engagements(store.engine) == []


def test_machine_clicks_are_recorded_flagged_each_by_its_reason(store: Store) -> None:
    _, digest = tracked_send(store, left=NOW)
    hits = [click(digest, 0, NOW + 2 * SECOND), click(digest, 0, NOW + 2 * SECOND, HEAD),
            click(digest, 0, NOW + 3 * SECOND, SCANNER), click(digest, 0, NOW + 6 * SECOND)]
    assert all(record_hits(store.engine, hits, POLICY))
    assert [(r.machine, r.repeats) for r in engagements(store.engine)] == [
        (TOO_SOON, 0), (HEAD, 0), (SCANNER, 0), (PERSON, 0)]


def test_a_flood_on_one_link_within_the_repeat_window_is_one_row_with_its_repeats(store: Store) -> None:
    _, digest = tracked_send(store)
    start = NOW + timedelta(minutes=10)
    flood = [click(digest, 0, start + timedelta(seconds=i)) for i in range(50)]
    record_hits(store.engine, flood[:20], POLICY)  # in batches, as the web's group commit writes them
    record_hits(store.engine, flood[20:21], POLICY)
    record_hits(store.engine, flood[21:], POLICY)
    rows = engagements(store.engine)
    assert [(r.link, r.at, r.repeats) for r in rows] == [(0, start, 49)]


def test_the_repeat_window_runs_from_the_recorded_click_and_a_later_click_is_a_new_row(store: Store) -> None:
    _, digest = tracked_send(store)
    start = NOW + timedelta(minutes=10)
    times = [start, start + 30 * SECOND, start + 59 * SECOND, start + 60 * SECOND, start + 61 * SECOND,
             start + 125 * SECOND]
    record_hits(store.engine, [click(digest, 0, at) for at in times[:2]], POLICY)
    record_hits(store.engine, [click(digest, 0, at) for at in times[2:]], POLICY)  # two windows in one batch
    assert [(r.at, r.repeats) for r in engagements(store.engine)] == [
        (start, 2), (start + 60 * SECOND, 1), (start + 125 * SECOND, 0)]


def test_repeats_are_counted_per_link_and_per_class(store: Store) -> None:
    _, digest = tracked_send(store)
    at = NOW + timedelta(minutes=10)
    hits = [click(digest, 0, at), click(digest, 1, at + SECOND), click(digest, 0, at + 2 * SECOND, SCANNER),
            click(digest, 0, at + 3 * SECOND), click(digest, 0, at + 4 * SECOND, SCANNER),
            click(digest, 0, at + 5 * SECOND, HEAD)]
    record_hits(store.engine, hits, POLICY)
    assert [(r.link, r.machine, r.repeats) for r in engagements(store.engine)] == [
        (0, PERSON, 1), (1, PERSON, 0), (0, SCANNER, 1), (0, HEAD, 0)]


def test_a_customer_who_left_tracking_is_redirected_and_nothing_is_recorded(store: Store) -> None:
    customer = store.customer("Ute")
    _, digest = tracked_send(store, customer=customer)
    with Session(store.engine) as session:
        session.execute(update(Customer).where(col(Customer.id) == customer.id).values(untracked_at=NOW))
        session.commit()
    answers = record_hits(store.engine, [click(digest, 0, NOW + timedelta(days=1))], POLICY)
    assert answers[0] is not None and answers[0].startswith("https://shop.example/p/1?utm_source=lifecycle")
    assert engagements(store.engine) == []


def test_a_forgotten_customers_links_go_nowhere(store: Store) -> None:
    customer = store.customer("Vera")
    _, digest = tracked_send(store, customer=customer)
    with Session(store.engine) as session:
        session.execute(update(Customer).where(col(Customer.id) == customer.id).values(forgotten_at=NOW))
        session.commit()
    later = NOW + timedelta(days=1)
    assert record_hits(store.engine, [click(digest, 0, later), Hit("open", digest, -1, later)],
                       Tracking(opens=True)) == [None, None]
    assert engagements(store.engine) == []


def test_with_clicks_off_links_still_redirect_but_nothing_is_recorded(store: Store) -> None:
    _, digest = tracked_send(store)
    answers = record_hits(store.engine, [click(digest, 1, NOW + timedelta(hours=1))], Tracking(clicks=False))
    assert answers[0] is not None and answers[0].startswith("https://shop.example/p/2?")
    assert engagements(store.engine) == []


def test_opens_are_recorded_as_link_minus_one_only_while_opens_are_on(store: Store) -> None:
    _, digest = tracked_send(store, [])  # a pixel needs no tracked links
    later = NOW + timedelta(hours=1)
    opened = [Hit("open", digest, -1, later), Hit("open", digest, -1, later + SECOND, SCANNER),
              Hit("open", digest, -1, later + 2 * SECOND)]
    assert record_hits(store.engine, opened, Tracking()) == ["", "", ""]  # the pixel answers; off by default
    assert engagements(store.engine) == []
    assert record_hits(store.engine, opened, Tracking(opens=True)) == ["", "", ""]
    assert [(r.kind, r.link, r.machine, r.repeats) for r in engagements(store.engine)] == [
        ("open", -1, PERSON, 1), ("open", -1, SCANNER, 0)]



def test_two_writers_on_one_send_take_turns_and_the_second_sees_the_firsts_click(store: Store) -> None:
    """PostgreSQL: a batch waits for the send's lock, then reads the engagements the lock's
    holder committed, so a click another process recorded a second earlier is a repeat."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time")
    send, digest = tracked_send(store)
    at = NOW + timedelta(minutes=10)
    answers: list[list[str | None]] = []
    with store.engine.connect() as other:
        held = other.begin()
        other.execute(text("SELECT pg_advisory_xact_lock(1617000, :id)"), {"id": send.id})
        other.execute(insert(Engagement), {"send_id": send.id, "customer_id": send.customer_id, "kind": "click",
                                           "link": 0, "at": at, "machine": PERSON, "repeats": 0})
        writer = threading.Thread(target=lambda: answers.append(
            record_hits(store.engine, [click(digest, 0, at + SECOND)], POLICY)))
        writer.start()
        waiting = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        with store.engine.connect() as watch:
            for _ in range(600):
                if watch.execute(waiting).scalar_one():
                    break
                watch.rollback()
                time.sleep(0.05)
            else:
                pytest.fail("record_hits never waited for the send's lock")
        held.commit()
    writer.join(30)
    assert len(answers) == 1 and answers[0][0] is not None
    assert [(r.link, r.at, r.repeats) for r in engagements(store.engine)] == [(0, at, 1)]
