"""Message quality: DKIM that verifies (dkimpy, and Perl's Mail::DKIM as an independent
verifier), for every shipped mail, non-ASCII headers and odd bodies; inlined CSS."""

import base64
import subprocess
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr

from flows.content.preview import sample_mail
from flows.content.render import TemplateCatalog
from flows.message.dkim import DkimKey, DkimSigner, relaxed_body
from flows.run_context import load, prepare
from flows.settings import Settings
from flows.spec.common import EmailSpec
from tests.support import ROOT
from tests.support.builders import NOW, Store, ago
from tests.support.runs import run
from tests.support.smtp_server import SmtpServer

VERIFIER = ROOT / "tests" / "support" / "verify_dkim.pl"


@pytest.fixture(scope="module")
def dkim_key() -> tuple[str, bytes]:
    """A fresh RSA key: (private key PEM, the DNS TXT record publishing its public half)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


@pytest.fixture(scope="module")
def ed25519_key() -> tuple[str, bytes]:
    """A fresh Ed25519 key (RFC 8463): (private key PEM, its DNS TXT record)."""
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pem, b"v=DKIM1; k=ed25519; p=" + base64.b64encode(public)


@pytest.fixture(scope="module")
def both(dkim_key: tuple[str, bytes], ed25519_key: tuple[str, bytes]) -> tuple[DkimSigner, dict[bytes, bytes]]:
    """A signer with both keys, and the DNS it needs (name → TXT record)."""
    signer = DkimSigner("shop.example", (DkimKey("mail2026", "rsa-sha256", dkim_key[0].encode()),
                                         DkimKey("ed2026", "ed25519-sha256", ed25519_key[0].encode())))
    return signer, {b"mail2026._domainkey.shop.example.": dkim_key[1],
                    b"ed2026._domainkey.shop.example.": ed25519_key[1]}


def dkimpy_verdicts(message: bytes, dns: dict[bytes, bytes]) -> list[bool]:
    """dkimpy's verdict on each signature, in order."""
    checked = dkim.DKIM(message)
    count = message.split(b"\r\n\r\n", 1)[0].lower().count(b"\r\ndkim-signature:") + message.lower().startswith(
        b"dkim-signature:")
    verdicts = []
    for index in range(count):
        try:
            verdicts.append(bool(checked.verify(idx=index, dnsfunc=lambda name, timeout=5: dns[name])))
        except dkim.ValidationError:
            verdicts.append(False)
    return verdicts


def mail_dkim_verdicts(files: list[Path], dns: dict[bytes, bytes]) -> dict[str, list[tuple[str, str]]]:
    """Perl's Mail::DKIM on each file: [(algorithm, result), …]."""
    records = [f"{name.decode().rstrip('.')}={record.decode()}" for name, record in dns.items()]
    out = subprocess.run(["perl", str(VERIFIER), *records, "--", *map(str, files)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    verdicts: dict[str, list[tuple[str, str]]] = {}
    for line in out.splitlines():
        file, algorithm, result, *_ = line.split(" ")
        verdicts.setdefault(file, []).append((algorithm, result))
    return verdicts


LIST_HEADERS = (b"List-Unsubscribe: <https://shop.example/u/abc>, <mailto:unsubscribe@shop.example?subject=u>\r\n"
                b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")


def every_shipped_mail(settings: Settings) -> list[tuple[str, bytes]]:
    """Each shipped trigger's every mail (step, variant) for each stage and language, as composed."""
    project = load(settings)
    mails = []
    for name in project.triggers:
        context = prepare(name, NOW, settings=settings, project=project)
        for part in context.passes():
            for variant in part.variants():
                email = part.email_for(variant)
                for stage in context.stages.names:
                    for lang in sorted(part.catalog.languages_for(email) | {part.catalog.default_language}):
                        eml, _ = sample_mail(part, stage, lang, variant)
                        step = part.step.name if part.step else ""
                        mails.append((f"{name}.{step}.{variant}.{stage}.{lang}", LIST_HEADERS + eml))
    return mails


def test_every_shipped_mail_verifies_with_both_verifiers(settings: Settings, tmp_path: Path,
                                                         both: tuple[DkimSigner, dict[bytes, bytes]]) -> None:
    signer, dns = both
    mails = every_shipped_mail(settings)
    assert len(mails) > 100  # every trigger, step, variant, stage and language
    files = []
    for label, eml in mails:
        signed = signer.sign(eml)
        assert dkimpy_verdicts(signed, dns) == [True, True], label
        files.append(tmp_path / f"{label}.eml")
        files[-1].write_bytes(signed)
    independent = mail_dkim_verdicts(files, dns)
    # Debian's Mail::DKIM knows RSA only; it reports the Ed25519 signature as unsupported ("invalid").
    assert {file: verdicts[0] for file, verdicts in independent.items()} == {
        str(f): ("rsa-sha256", "pass") for f in files}
    tampered = tmp_path / "tampered.eml"
    tampered.write_bytes(signer.sign(mails[0][1]).replace(b"Subject: ", b"Subject: Re: ", 1))
    assert mail_dkim_verdicts([tampered], dns)[str(tampered)][0] == ("rsa-sha256", "fail")
    assert dkimpy_verdicts(tampered.read_bytes(), dns) == [False, False]


def test_raw_utf8_and_folded_headers_verify(tmp_path: Path, both: tuple[DkimSigner, dict[bytes, bytes]]) -> None:
    signer, dns = both
    message = ("From: Läden Groß <hallo@shop.example>\r\nTo: Jürgen <jürgen@beispiel.de>\r\n"
               "Subject:   Grüße aus dem Laden,\r\n\t  noch   einmal\t \r\n"
               "Date: Mon, 16 Mar 2026 12:00:00 +0000\r\nMessage-ID: <a@shop.example>\r\n"
               "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
               "Grüße  \t\r\n\r\n").encode()
    signed = signer.sign(LIST_HEADERS + message)
    assert dkimpy_verdicts(signed, dns) == [True, True]
    file = tmp_path / "utf8.eml"
    file.write_bytes(signed)
    assert mail_dkim_verdicts([file], dns)[str(file)][0] == ("rsa-sha256", "pass")
    header = signed.split(b"\r\n\r\n")[0]
    assert b"h=from:to:subject:date:message-id:mime-version:content-type:list-unsubscribe:list-unsubscribe-post;" in (
        header)


@hypothesis_settings(max_examples=60, deadline=None, derandomize=True)
@given(subject=st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=80),
       body=st.lists(st.text(st.sampled_from(" \tabcäö€xyz"), max_size=30), max_size=8),
       final_newline=st.booleans())
def test_any_subject_and_body_verify(subject: str, body: list[str], final_newline: bool) -> None:
    signer, dns = BOTH_FOR_HYPOTHESIS
    text = "\r\n".join(body) + ("\r\n" if final_newline else "")
    message = (f"From: shop <hallo@shop.example>\r\nSubject: {subject}\r\nDate: Mon, 16 Mar 2026 12:00:00 +0000"
               f"\r\n\r\n{text}").encode()
    assert dkimpy_verdicts(signer.sign(message), dns) == [True, True]


def _hypothesis_signer() -> tuple[DkimSigner, dict[bytes, bytes]]:
    key, ed = rsa.generate_private_key(public_exponent=65537, key_size=2048), ed25519.Ed25519PrivateKey.generate()
    pkcs8 = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    signer = DkimSigner("shop.example", (DkimKey("s", "rsa-sha256", key.private_bytes(*pkcs8)),
                                         DkimKey("e", "ed25519-sha256", ed.private_bytes(*pkcs8))))
    rsa_public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    ed_public = ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return signer, {b"s._domainkey.shop.example.": b"v=DKIM1; k=rsa; p=" + base64.b64encode(rsa_public),
                    b"e._domainkey.shop.example.": b"v=DKIM1; k=ed25519; p=" + base64.b64encode(ed_public)}


BOTH_FOR_HYPOTHESIS = _hypothesis_signer()


@pytest.mark.parametrize(("body", "canonical"), [
    (b"", b""),
    (b"\r\n\r\n", b""),
    (b"a  b\t\r\n", b"a b\r\n"),
    (b"a\r\n\r\n\r\n", b"a\r\n"),
    (b"a", b"a\r\n"),
    (b" \t \r\nb", b"\r\nb\r\n"),
])
def test_the_relaxed_body_is_rfc_6376s(body: bytes, canonical: bytes) -> None:
    assert relaxed_body(body) == canonical
    assert relaxed_body(body) == dkim.canonicalization.Relaxed.canonicalize_body(body)  # the verifier's own


def test_each_key_is_parsed_once_per_process(monkeypatch: pytest.MonkeyPatch,
                                             dkim_key: tuple[str, bytes]) -> None:
    parsed = []
    real = serialization.load_pem_private_key

    def counting(data: bytes, password: bytes | None) -> object:
        parsed.append(data)
        return real(data, password)

    monkeypatch.setattr(serialization, "load_pem_private_key", counting)
    signer = DkimSigner("shop.example", (DkimKey("mail2026", "rsa-sha256", dkim_key[0].encode()),))
    for n in range(20):
        signer.sign(f"From: a@shop.example\r\nSubject: {n}\r\n\r\nHi\r\n".encode())
    assert len(parsed) == 1


def test_an_ed25519_signature_needs_rsa_beside_it_and_the_right_key(
        settings: Settings, dkim_key: tuple[str, bytes], ed25519_key: tuple[str, bytes]) -> None:
    with pytest.raises(ValueError, match="receivers still need an RSA signature"):
        DkimSigner.from_settings(None, None, None, None, "shop.example", "ed2026", ed25519_key[0])
    swapped = DkimSigner.from_settings("mail2026", None, ed25519_key[0], None, "shop.example")
    assert swapped is not None
    with pytest.raises(ValueError, match="selector 'mail2026' is not a rsa-sha256 key"):
        swapped.sign(b"From: a@shop.example\r\n\r\nHi\r\n")
    job = prepare("winback-lapsed", NOW, settings=settings.model_copy(update={
        "dkim_selector": "mail2026", "dkim_private_key": SecretStr(dkim_key[0]),
        "dkim_ed25519_selector": "ed2026", "dkim_ed25519_private_key": SecretStr(ed25519_key[0])}))
    assert job.signer is not None and [k.algorithm for k in job.signer.keys] == ["rsa-sha256", "ed25519-sha256"]
    assert dkim_key[0] not in repr(job.signer) and ed25519_key[0] not in repr(job.signer)


def test_received_marketing_mail_has_a_dkim_signature_that_verifies(
        settings: Settings, store: Store, smtp: SmtpServer, dkim_key: tuple[str, bytes]) -> None:
    pem, record = dkim_key
    customer = store.customer("Jürgen", last_name="Groß")
    store.order(customer, ago(days=500))
    signed = settings.model_copy(update={"dkim_selector": "mail2026", "dkim_private_key": SecretStr(pem)})
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
