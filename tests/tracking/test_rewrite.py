"""Tracked links: a marketing mail's links go through /c/TOKEN; our own pages' links never do."""

import re
from email.message import EmailMessage
from pathlib import Path

from sqlmodel import Session

from flows.content.links import click_token, open_token, read_click_token, read_open_token, send_digest
from flows.content.render import Rendered
from flows.settings import Settings
from flows.tracking.rewrite import add_pixel, track_links
from models import Customer
from tests.support.builders import Store, ago
from tests.support.ledger import sends
from tests.support.runs import run
from tests.support.smtp_server import SmtpServer

BASE = "https://mail.shop.example"
OURS = [f"{BASE}/u/", f"{BASE}/preferences/", f"{BASE}/confirm/"]


def tracked(n: int) -> str:
    return f"{BASE}/c/T{n}"


def mail(html: str, text: str = "") -> Rendered:
    return Rendered(subject="s", html=html, text=text, template="t/default.de.html.j2")


def test_each_distinct_destination_gets_one_position_in_order_of_first_appearance() -> None:
    html = ('<a href="https://shop.example/p/1?a=1&amp;b=2">Schuh</a><a href="https://shop.example/p/2">Socken</a>'
            '<a href="https://shop.example/p/1?a=1&amp;b=2">Schuh again</a>')
    rewritten, destinations = track_links(mail(html), OURS, tracked)
    assert destinations == ["https://shop.example/p/1?a=1&b=2", "https://shop.example/p/2"]  # unescaped, as followed
    assert re.findall(r'href="([^"]*)"', rewritten.html) == [tracked(0), tracked(1), tracked(0)]


def test_our_own_pages_mailto_tel_and_anchors_are_never_rewritten() -> None:
    html = (f'<a href="{BASE}/u/tok">Abmelden</a><a href="{BASE}/preferences/tok">Einstellungen</a>'
            f'<a href="{BASE}/confirm/tok">Bestätigen</a><a href="mailto:hi@shop.example">Mail</a>'
            '<a href="tel:+4930123">Call</a><a href="#top">Top</a><a href="javascript:alert(1)">x</a>'
            "<a href='https://shop.example/q'>single quotes</a>")
    rewritten, destinations = track_links(mail(html), OURS, tracked)
    assert destinations == ["https://shop.example/q"]
    assert rewritten.html == html.replace("'https://shop.example/q'", f'"{tracked(0)}"')


def test_the_text_part_shows_the_tracked_links_where_it_showed_the_destinations() -> None:
    html = '<a href="https://shop.example/p/1">a</a><a href="https://shop.example/p/10">b</a>'
    text = ("Schuh: https://shop.example/p/1. Socken: [b](https://shop.example/p/10) "
            "Other: https://shop.example/p/10.html")
    rewritten, _ = track_links(mail(html, text), OURS, tracked)
    assert rewritten.text == (f"Schuh: {tracked(0)}. Socken: [b]({tracked(1)}) "
                              "Other: https://shop.example/p/10.html")  # a longer URL is another page


def test_only_links_to_the_shops_hosts_are_tracked_so_we_never_redirect_to_a_stranger() -> None:
    html = ('<a href="https://shop.example/p/1">a</a><a href="https://www.shop.example/b">b</a>'
            '<a href="https://evil.example/phish">c</a><a href="https://shop.example.evil.example/x">d</a>')
    rewritten, destinations = track_links(mail(html), OURS, tracked, hosts=["shop.example"])
    assert destinations == ["https://shop.example/p/1", "https://www.shop.example/b"]
    assert 'href="https://evil.example/phish"' in rewritten.html
    assert 'href="https://shop.example.evil.example/x"' in rewritten.html


def test_a_destination_with_a_control_character_is_left_untracked() -> None:
    """No Location header can carry it: tracked, the person would get an error, not the page."""
    html = '<a href="https://shop.example/p/1\x01x">a</a><a href="https://shop.example/p/2\x7fy">b</a>'
    _, destinations = track_links(mail(html), OURS, tracked)
    assert destinations == []


def test_a_mail_without_links_is_unchanged() -> None:
    original = mail("<p>Hallo</p>", "Hallo")
    assert track_links(original, OURS, tracked) == (original, [])


def test_the_pixel_goes_before_the_end_of_the_body() -> None:
    with_pixel = add_pixel(mail("<html><body><p>x</p></body></html>"), f"{BASE}/o/TOKEN")
    assert with_pixel.html.endswith(f'<img src="{BASE}/o/TOKEN" width="1" height="1" alt="" '
                                    'style="display:block;border:0"></body></html>')


def test_tokens_name_the_send_and_the_link_and_refuse_every_alteration() -> None:
    digest = send_digest("secret", "winback-lapsed/1/slot")
    token = click_token("secret", digest, 3)
    assert read_click_token("secret", token) == (digest, 3)
    assert read_click_token("other-secret", token) is None  # signed with another secret
    assert read_click_token("secret", token[:-1]) is None  # truncated
    assert read_click_token("secret", token.upper()) is None
    moved = token[:32] + "04" + token[34:]  # the same mail, another link
    assert read_click_token("secret", moved) is None
    other = click_token("secret", send_digest("secret", "winback-lapsed/2/slot"), 3)
    assert read_click_token("secret", other[:32] + token[32:]) is None  # another mail's digest
    assert read_open_token("secret", token) is None  # a click token is no open token
    assert read_open_token("secret", open_token("secret", digest)) == digest
    assert read_click_token("secret", open_token("secret", digest)) is None


# -- in a real run ----------------------------------------------------------------------


def lapsed_with_orders(store: Store, count: int) -> list[Customer]:
    customers = []
    for i in range(count):
        customer = store.customer(f"K{i}")
        store.order(customer, ago(days=500))
        customers.append(customer)
    return customers


def html_of(message: EmailMessage) -> str:
    part = message.get_body(("html",))
    assert part is not None
    return str(part.get_content())


def test_a_marketing_mail_from_a_run_carries_tracked_links_and_records_their_destinations(
        settings: Settings, store: Store, smtp: SmtpServer) -> None:
    lapsed_with_orders(store, 1)
    assert run(settings, "winback-lapsed").outcomes == {"sent": 1}
    [received] = smtp.received
    message = received.message
    html = html_of(message)
    links = re.findall(r'href="([^"]*)"', html)
    base = settings.base_url.rstrip("/")
    tracked_links = [link for link in links if link.startswith(f"{base}/c/")]
    assert tracked_links, links
    assert any(link.startswith(f"{base}/u/") for link in links)  # the unsubscribe link is as it was
    assert all(link.startswith((f"{base}/c/", f"{base}/u/", f"{base}/preferences/", "mailto:")) for link in links)
    assert f"<{base}/u/" in message["List-Unsubscribe"]
    [row] = sends(store.engine)
    destinations = (row.links or "").split("\n")
    assert all(d.startswith(settings.shop_url) for d in destinations)
    digest = row.message_id[1:33]
    for link in tracked_links:
        found = read_click_token(settings.signing_secret, link.rsplit("/", 1)[1])
        assert found is not None and found[0] == digest and found[1] < len(destinations)
    text = message.get_body(("plain",))
    assert text is not None and f"{base}/c/" in str(text.get_content())
    assert f"{base}/o/" not in html  # opens are off by default


def test_service_mail_and_untracked_customers_get_untracked_links(settings: Settings, store: Store,
                                                                  smtp: SmtpServer) -> None:
    first, second = lapsed_with_orders(store, 2)
    with Session(store.engine) as session:
        row = session.get(Customer, second.id)
        assert row is not None
        row.untracked_at = ago(days=1)
        session.add(row)
        session.commit()
    store.complaint(first, ago(hours=1))
    assert run(settings, "winback-lapsed").outcomes == {"sent": 2}
    assert run(settings, "complaint-ack").outcomes == {"sent": 1}
    base = settings.base_url.rstrip("/")
    [untracked] = smtp.handler.to(second.email or "")
    assert f"{base}/c/" not in html_of(untracked.message) and settings.shop_url in html_of(untracked.message)
    to_first = smtp.handler.to(first.email or "")
    [ack] = [r for r in to_first if r.message["List-Unsubscribe"] is None]  # service mail has no List-*
    [offer] = [r for r in to_first if r.message["List-Unsubscribe"] is not None]
    assert f"{base}/c/" not in html_of(ack.message) and f"{base}/c/" in html_of(offer.message)
    rows = {(r.trigger, r.customer_id): r for r in sends(store.engine)}
    assert rows[("winback-lapsed", second.id)].links is None
    assert rows[("complaint-ack", first.id)].links is None
    assert rows[("winback-lapsed", first.id)].links


def test_opens_on_in_the_policy_add_the_pixel(settings: Settings, store: Store, smtp: SmtpServer,
                                              project_dir: Path) -> None:
    policy = project_dir / "triggers" / "policy.yaml"
    policy.write_text(policy.read_text().replace("opens: false", "opens: true"))
    lapsed_with_orders(store, 1)
    run(settings, "winback-lapsed")
    [row] = sends(store.engine)
    pixel = f"{settings.base_url.rstrip('/')}/o/{open_token(settings.signing_secret, row.message_id[1:33])}"
    assert f'<img src="{pixel}"' in html_of(smtp.received[0].message)


def test_clicks_off_in_the_policy_leaves_links_alone(settings: Settings, store: Store, smtp: SmtpServer,
                                                     project_dir: Path) -> None:
    policy = project_dir / "triggers" / "policy.yaml"
    policy.write_text(policy.read_text().replace("clicks: true", "clicks: false"))
    lapsed_with_orders(store, 1)
    run(settings, "winback-lapsed")
    assert f"{settings.base_url.rstrip('/')}/c/" not in html_of(smtp.received[0].message)
    assert sends(store.engine)[0].links is None
