"""Message quality: DKIM that verifies, inlined CSS."""

import base64
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from flows.content.render import TemplateCatalog
from flows.run_context import prepare
from flows.settings import Settings
from flows.spec.common import EmailSpec
from tests.support.builders import NOW, Store, ago
from tests.support.runs import run
from tests.support.smtp_server import SmtpServer


@pytest.fixture(scope="module")
def dkim_key() -> tuple[str, bytes]:
    """A fresh RSA key: (private key PEM, the DNS TXT record publishing its public half)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def test_received_marketing_mail_has_a_dkim_signature_that_verifies(
        settings: Settings, store: Store, smtp: SmtpServer, dkim_key: tuple[str, bytes]) -> None:
    pem, record = dkim_key
    customer = store.customer("Jürgen", last_name="Groß")
    store.order(customer, ago(days=500))
    signed = settings.model_copy(update={"dkim_selector": "mail2026", "dkim_private_key": __import__(
        "pydantic").SecretStr(pem)})
    assert run(signed, "winback-lapsed").outcomes == {"sent": 1}
    raw = smtp.received[0].data

    looked_up: list[bytes] = []

    def dns(name: bytes, timeout: int = 5) -> bytes:
        looked_up.append(name)
        return record

    assert dkim.verify(raw, dnsfunc=dns)
    assert looked_up == [b"mail2026._domainkey.shop.example."]
    signature = smtp.received[0].message["DKIM-Signature"]
    tags = dict(part.strip().split("=", 1) for part in signature.replace("\r\n", "").split(";") if "=" in part)
    covered = set(tags["h"].replace(" ", "").lower().split(":"))
    assert {"from", "subject", "date", "message-id", "list-unsubscribe", "list-unsubscribe-post"} <= covered
    assert tags["d"] == "shop.example" and tags["s"] == "mail2026"
    tampered = raw.replace(b"Subject: ", b"Subject: Re: ", 1)
    assert not dkim.verify(tampered, dnsfunc=dns)


def test_without_a_selector_nothing_is_signed(settings: Settings, store: Store, smtp: SmtpServer) -> None:
    store.order(store.customer("Lea"), ago(days=500))
    run(settings, "winback-lapsed")
    assert smtp.received[0].message["DKIM-Signature"] is None


def test_a_selector_without_a_key_is_a_clear_error(settings: Settings) -> None:
    job = prepare("winback-lapsed", NOW, settings=settings.model_copy(update={"dkim_selector": "s1"}))
    with pytest.raises(ValueError, match="LIFECYCLE_DKIM_PRIVATE_KEY"):
        job.signer  # noqa: B018


def test_a_stylesheet_is_inlined_for_mail_clients(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "default.html.j2").write_text(
        "<html><head><style>.cta { color: #2563eb; font-weight: bold }</style></head>"
        "<body><a class='cta' href='https://x.example'>Go</a></body></html>")
    from flows.content.context import sample_contexts

    context = {**sample_contexts(None, "https://u.example", "https://shop.example")[0], "stage": "new", "lang": "en"}
    html = TemplateCatalog(tmp_path).render(EmailSpec(template="t", subject="x"), context).html
    assert "<style" not in html
    assert 'style="color: #2563eb;font-weight: bold;"' in html
