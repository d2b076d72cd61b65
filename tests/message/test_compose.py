"""MIME: multipart/alternative, encoded headers, no header injection."""

from datetime import UTC, datetime
from email import message_from_bytes, message_from_string, policy

from flows.content.render import Rendered
from flows.message.compose import Sender, build_message, message_id

SENDER = Sender.parse("Kundenservice Müller <service@shop.example>")
SECRET = "test-secret-0123456789"


def build(**overrides) -> bytes:
    args = {"sender": SENDER, "to_address": "juergen@example.de", "to_name": "Jürgen Groß",
            "msg_id": message_id("t/1/x", SENDER, SECRET), "date": datetime(2026, 3, 16, 12, tzinfo=UTC)}
    args.update(overrides)
    rendered = Rendered(subject="Grüße aus Köln – 15 % für dich", html="<p>Grüße</p>", text="Grüße\n", template="t")
    return build_message(rendered, **args)


def test_message_is_multipart_alternative_with_text_then_html() -> None:
    msg = message_from_bytes(build(), policy=policy.default)
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert msg.get_body(("html",)).get_content().strip() == "<p>Grüße</p>"
    assert msg["Date"] == "Mon, 16 Mar 2026 12:00:00 +0000"


def test_non_ascii_headers_are_encoded_and_decode_back() -> None:
    raw = build()
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()  # RFC 2047: nothing 8-bit on the wire in headers
    msg = message_from_bytes(raw, policy=policy.default)
    assert msg["Subject"] == "Grüße aus Köln – 15 % für dich"
    assert msg["To"].addresses[0].display_name == "Jürgen Groß"
    assert msg["From"].addresses[0].display_name == "Kundenservice Müller"


def test_crlf_in_customer_data_cannot_add_headers() -> None:
    raw = build(to_name="Eve\r\nBcc: victim@example.net")
    msg = message_from_bytes(raw, policy=policy.default)
    assert msg["Bcc"] is None
    assert [a.addr_spec for a in msg["To"].addresses] == ["juergen@example.de"]
    assert b"\r\nBcc:" not in raw


def test_message_id_is_stable_per_send_key_and_uses_the_sender_domain() -> None:
    assert message_id("a/1/x", SENDER, SECRET) == message_id("a/1/x", SENDER, SECRET)
    assert message_id("a/1/x", SENDER, SECRET) != message_id("a/1/y", SENDER, SECRET)
    assert message_id("a/1/x", SENDER, SECRET).endswith("@shop.example>")
    # Keyed: without the secret, nobody can work out a mail's Message-ID from its send key.
    assert message_id("a/1/x", SENDER, SECRET) != message_id("a/1/x", SENDER, "another-secret-0123456789")


def test_bodies_survive_a_round_trip_exactly_whatever_they_contain() -> None:
    tricky_html = "<p>" + "Grüße = 100 % 🎉 " * 30 + "</p>\n<p>trailing space \t\n.\n.leading dot</p>\n"
    tricky_text = "Zeile mit =3D und Tab\there \nlange " + "x" * 200 + "\n"
    rendered = Rendered(subject="Ein sehr langer Betreff mit Umlauten äöü " * 4, html=tricky_html, text=tricky_text,
                        template="t")
    raw = build_message(rendered, sender=SENDER, to_address="a@example.de", to_name="O'Brien, Jr.",
                        msg_id=message_id("k", SENDER, SECRET), date=datetime(2026, 3, 16, tzinfo=UTC))
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78  # folded and soft-broken for old MTAs
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    msg = message_from_bytes(raw, policy=policy.default)
    assert msg["Subject"] == rendered.subject.strip()
    assert msg["To"].addresses[0].display_name == "O'Brien, Jr."
    assert msg.get_body(("html",)).get_content().replace("\r\n", "\n") == tricky_html
    assert msg.get_body(("plain",)).get_content().replace("\r\n", "\n") == tricky_text
    assert not msg.defects and all(not part.defects for part in msg.walk())


def test_an_idn_address_is_written_in_its_ascii_form_whatever_form_it_came_in() -> None:
    for address in ("kunde@xn--bcher-kva.de", "kunde@bücher.de"):
        raw = build(to_address=address)
        head = raw.split(b"\r\n\r\n", 1)[0]
        assert head.isascii()  # an ASCII message: any relay takes it
        msg = message_from_bytes(raw, policy=policy.default)
        assert msg["To"].addresses[0].addr_spec == "kunde@xn--bcher-kva.de"


def test_a_non_ascii_local_part_is_an_internationalised_message_showing_the_unicode_domain() -> None:
    raw = build(to_address="jürgen@xn--bcher-kva.de")
    msg = message_from_string(raw.decode("utf-8"), policy=policy.default)  # as a reader of RFC 6532 mail does
    # RFC 6532: UTF-8 in the header itself; it goes out only over SMTPUTF8, so the reader's
    # mail program shows the address as the customer wrote it.
    assert msg["To"].addresses[0].addr_spec == "jürgen@bücher.de"
    assert msg["To"].addresses[0].display_name == "Jürgen Groß"
    assert "jürgen@bücher.de".encode() in raw
