"""Provider webhooks in ``lifecycle web``: SES through SNS (signatures checked with real RSA keys and a
certificate served over HTTP) and Postmark (basic auth). A request that fails verification gets 403
and changes nothing."""

import base64
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from pydantic import SecretStr, ValidationError

from flows.content.links import send_digest, verp_address
from flows.feedback.sns import trusted_url
from flows.settings import Settings
from flows.surfaces.web import create_app
from models import SendStatus
from tests.support import SECRET
from tests.support.builders import Store
from tests.support.ledger import feedback_rows, seed_send, status_of, suppressions
from tests.support.web_server import WebServer

TOPIC = "arn:aws:sns:eu-central-1:123456789012:ses-feedback"
KEY = "winback-lapsed/c-7001/2026-03-16T12:00:00+00:00"
EMAIL = "nobody@example.net"


def signing_key() -> tuple[rsa.RSAPrivateKey, bytes]:
    """An RSA key and a self-signed certificate for it, as SNS publishes its signing certificates."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.eu-central-1.amazonaws.com")])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
                   .not_valid_after(now + timedelta(days=30)).sign(key, hashes.SHA256()))
    return key, certificate.public_bytes(serialization.Encoding.PEM)


class CertificateHost:
    """A loopback HTTP server standing in for sns.<region>.amazonaws.com: the certificate and SubscribeURL."""

    def __init__(self, pem: bytes) -> None:
        self.pem, self.requests = pem, []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.requests.append(self.path)
                body = host.pem if self.path.endswith(".pem") else b"<ConfirmSubscriptionResponse/>"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def rsa_key() -> tuple[rsa.RSAPrivateKey, bytes]:
    return signing_key()


@pytest.fixture
def cert_host(rsa_key: tuple[rsa.RSAPrivateKey, bytes]) -> Iterator[CertificateHost]:
    host = CertificateHost(rsa_key[1])
    yield host
    host.stop()


def web_settings(settings: Settings, cert_host: CertificateHost, **extra: object) -> Settings:
    values: dict[str, object] = {"ses_topic_arns": f"{TOPIC}, arn:aws:sns:us-east-1:123456789012:other",
                                 "sns_trusted_url_prefixes": cert_host.url, "postmark_webhook_user": "postmark",
                                 "postmark_webhook_password": SecretStr("pm-hook-0123456789")}
    values.update(extra)
    return settings.model_copy(update=values)


@pytest.fixture
def web(settings: Settings, cert_host: CertificateHost) -> Iterator[WebServer]:
    server = WebServer(create_app(web_settings(settings, cert_host))).start()
    yield server
    server.stop()


def sns_canonical(message: dict[str, str]) -> bytes:
    """The string AWS signs, written out from its documentation (not from the code under test)."""
    if message["Type"] == "Notification":
        names = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    else:
        names = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    return "".join(f"{name}\n{message[name]}\n" for name in names if name in message).encode()


def signed(message: dict[str, str], key: rsa.RSAPrivateKey, cert_url: str, version: str = "1") -> dict[str, str]:
    message = {**message, "SignatureVersion": version, "SigningCertURL": cert_url}
    digest = hashes.SHA1() if version == "1" else hashes.SHA256()
    message["Signature"] = base64.b64encode(key.sign(sns_canonical(message), padding.PKCS1v15(), digest)).decode()
    return message


def notification(payload: dict, message_id: str = "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324") -> dict[str, str]:
    return {"Type": "Notification", "MessageId": message_id, "TopicArn": TOPIC,
            "Message": json.dumps(payload), "Timestamp": "2026-03-16T12:05:00.123Z"}


def ses_bounce(source: str, headers: list[dict[str, str]] | None = None) -> dict:
    return {
        "notificationType": "Bounce",
        "bounce": {"bounceType": "Permanent", "bounceSubType": "General", "feedbackId":
                   "0102019a1b2c3d4e-5f6a7b8c-9d0e-1f2a-3b4c-5d6e7f8a9b0c-000000", "timestamp":
                   "2026-03-16T12:04:58.000Z", "reportingMTA": "dns; e226-5.smtp-out.eu-central-1.amazonses.com",
                   "bouncedRecipients": [{"emailAddress": EMAIL, "action": "failed", "status": "5.1.1",
                                          "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]},
        "mail": {"timestamp": "2026-03-16T12:04:57.000Z", "source": source, "messageId":
                 "0102019a1b2c3d4e-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee-000000", "destination": [EMAIL],
                 "headersTruncated": False, "headers": headers or [],
                 "commonHeaders": {"from": ["Lifecycle Shop <hello@shop.example>"], "to": [EMAIL],
                                   "messageId": "0102019a1b2c3d4e-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee-000000"}},
    }


def post(web: WebServer, path: str, body: object, auth: tuple[str, str] | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    """As SNS and Postmark post: a JSON body (SNS labels it text/plain)."""
    return httpx.post(f"{web.url}{path}", content=json.dumps(body).encode(), auth=auth,
                      headers={"Content-Type": "text/plain; charset=UTF-8", **(headers or {})})


# -- SES through SNS ------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["1", "2"])
def test_a_signed_ses_bounce_is_recorded_against_the_send_its_return_path_names(
        version: str, store: Store, web: WebServer, cert_host: CertificateHost,
        rsa_key: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    seed_send(store, KEY, EMAIL)
    cert_url = cert_host.url + "SimpleNotificationService-6aad65c2f9911b05cd53efda11f913f9.pem"
    message = signed(notification(ses_bounce(verp_address("bounces@shop.example", SECRET, KEY))), rsa_key[0],
                     cert_url, version)
    answer = post(web, "/webhooks/ses", message)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"reports": 1, "new": 1, "duplicates": 0, "unmatched": 0, "suppressed": 1}
    assert status_of(store.engine, KEY) == "bounced"
    assert suppressions(store.engine) == {EMAIL: "hard_bounce"}
    [row] = feedback_rows(store.engine)
    assert (row.source, row.kind, row.status, row.send_key) == ("ses", "hard_bounce", "5.1.1", KEY)

    again = post(web, "/webhooks/ses", message)  # SNS retries: the same notification changes nothing
    assert again.json()["duplicates"] == 1 and len(feedback_rows(store.engine)) == 1
    assert cert_host.requests.count("/SimpleNotificationService-6aad65c2f9911b05cd53efda11f913f9.pem") == 1


def test_a_ses_complaint_is_matched_by_the_original_message_id(store: Store, web: WebServer,
                                                               cert_host: CertificateHost,
                                                               rsa_key: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    seed_send(store, KEY, EMAIL)
    complaint = {
        "notificationType": "Complaint",
        "complaint": {"feedbackId": "0102019a-complaint-1", "complaintFeedbackType": "abuse",
                      "timestamp": "2026-03-17T08:00:00.000Z", "userAgent": "Yahoo!-Mail-Feedback/2.0",
                      "complainedRecipients": [{"emailAddress": EMAIL}]},
        "mail": {"source": "hello@shop.example", "messageId": "0102019a-ses-own-id",
                 "headers": [{"name": "Message-ID", "value": f"<{send_digest(SECRET, KEY)}@shop.example>"}]},
    }
    answer = post(web, "/webhooks/ses", signed(notification(complaint), rsa_key[0], cert_host.url + "cert.pem", "2"))
    assert answer.status_code == 200, answer.text
    assert status_of(store.engine, KEY) == "complained"
    assert suppressions(store.engine) == {EMAIL: "spam_complaint"}


def test_a_forged_or_altered_sns_message_gets_403_and_changes_nothing(
        store: Store, web: WebServer, cert_host: CertificateHost, rsa_key: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    seed_send(store, KEY, EMAIL)
    cert_url = cert_host.url + "cert.pem"
    genuine = signed(notification(ses_bounce(verp_address("bounces@shop.example", SECRET, KEY))), rsa_key[0],
                     cert_url)
    altered = {**genuine, "Message": genuine["Message"].replace("5.1.1", "5.1.2")}
    someone_else, _ = signing_key()
    forged = signed(notification(ses_bounce("bounces@shop.example")), someone_else, cert_url)
    unknown_version = {**genuine, "SignatureVersion": "3"}
    wrong_topic = signed({**notification(ses_bounce("x@shop.example")), "TopicArn": TOPIC + "-attacker"},
                         rsa_key[0], cert_url)
    foreign_cert = {**genuine, "SigningCertURL": "https://sns.eu-central-1.amazonaws.com.evil.example/cert.pem"}
    for message in (altered, forged, unknown_version, wrong_topic, foreign_cert):
        assert post(web, "/webhooks/ses", message).status_code == 403
    assert post(web, "/webhooks/ses", "not an object").status_code == 400
    assert feedback_rows(store.engine) == [] and suppressions(store.engine) == {}
    assert status_of(store.engine, KEY) == SendStatus.SENT


def test_without_the_test_setting_a_loopback_certificate_url_is_never_fetched(
        settings: Settings, store: Store, cert_host: CertificateHost,
        rsa_key: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    server = WebServer(create_app(web_settings(settings, cert_host, sns_trusted_url_prefixes=""))).start()
    try:
        message = signed(notification(ses_bounce("bounces@shop.example")), rsa_key[0], cert_host.url + "cert.pem")
        assert post(server, "/webhooks/ses", message).status_code == 403
    finally:
        server.stop()
    assert cert_host.requests == [] and feedback_rows(store.engine) == []


def test_only_https_sns_hosts_are_trusted_by_default() -> None:
    assert trusted_url("https://sns.eu-central-1.amazonaws.com/SimpleNotificationService-abc.pem")
    assert trusted_url("https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem")
    for url in ("http://sns.eu-central-1.amazonaws.com/x.pem", "https://sns.eu-central-1.amazonaws.com.evil.example/x.pem",
                "https://evil.example/sns.eu-central-1.amazonaws.com/x.pem", "https://sqs.eu-central-1.amazonaws.com/x.pem",
                "https://user@sns.eu-central-1.amazonaws.com/x.pem", "https://sns.eu-central-1.amazonaws.com:8443/x.pem",
                "https://evilsns.eu-central-1.amazonaws.com/x.pem", None):
        assert not trusted_url(url), url
    assert trusted_url("http://127.0.0.1:9/cert.pem", ["http://127.0.0.1:9/"])


def test_test_url_prefixes_are_refused_in_production() -> None:
    with pytest.raises(ValidationError, match="for tests"):
        Settings(environment="production", secret=SecretStr("a-production-secret-0123"),
                 sns_trusted_url_prefixes="http://127.0.0.1:8000/")


def test_a_subscription_is_confirmed_by_visiting_its_subscribe_url_on_an_sns_host_only(
        web: WebServer, cert_host: CertificateHost, rsa_key: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    confirmation = {"Type": "SubscriptionConfirmation", "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
                    "Token": "2336412f37fb687f5d51e6e2425f004aed", "TopicArn": TOPIC,
                    "Message": f"You have chosen to subscribe to the topic {TOPIC}.",
                    "SubscribeURL": (cert_host.url
                                     + "?Action=ConfirmSubscription&Token=2336412f37fb687f5d51e6e2425f004aed"),
                    "Timestamp": "2026-03-16T12:00:00.000Z"}
    elsewhere = signed({**confirmation, "SubscribeURL": "https://evil.example/?Action=ConfirmSubscription"},
                       rsa_key[0], cert_host.url + "cert.pem")
    assert post(web, "/webhooks/ses", elsewhere).status_code == 403
    assert not any("ConfirmSubscription" in r for r in cert_host.requests)

    answer = post(web, "/webhooks/ses", signed(confirmation, rsa_key[0], cert_host.url + "cert.pem", "2"))
    assert answer.status_code == 200, answer.text
    assert "/?Action=ConfirmSubscription&Token=2336412f37fb687f5d51e6e2425f004aed" in cert_host.requests


# -- Postmark -----------------------------------------------------------------------------

def postmark_bounce(record_id: int, kind: str = "HardBounce", record_type: str = "Bounce") -> dict:
    return {"RecordType": record_type, "ID": record_id, "Type": kind, "TypeCode": 1, "Name": "Hard bounce",
            "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483", "MessageStream": "outbound",
            "Description": "The server was unable to deliver your message (ex: unknown user, mailbox not found).",
            "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist.", "Email": EMAIL,
            "From": "hello@shop.example", "BouncedAt": "2026-03-16T12:06:00.9070259Z", "Inactive": True,
            "Subject": "We miss you",
            "Content": f"Return-Path: <pm_bounces@pm-bounces.shop.example>\r\nMessage-ID: <{send_digest(SECRET, KEY)}"
                       "@shop.example>\r\nFrom: hello@shop.example\r\n\r\n"}


def test_a_postmark_bounce_with_the_webhook_credentials_is_recorded(store: Store, web: WebServer) -> None:
    seed_send(store, KEY, EMAIL)
    answer = post(web, "/webhooks/postmark", postmark_bounce(4323372036854775807),
                  auth=("postmark", "pm-hook-0123456789"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["new"] == 1
    assert status_of(store.engine, KEY) == "bounced"
    assert suppressions(store.engine) == {EMAIL: "hard_bounce"}
    assert post(web, "/webhooks/postmark", postmark_bounce(4323372036854775807),
                auth=("postmark", "pm-hook-0123456789")).json()["duplicates"] == 1
    complaint = postmark_bounce(4323372036854775808, "SpamComplaint", "SpamComplaint")
    assert post(web, "/webhooks/postmark", complaint, auth=("postmark", "pm-hook-0123456789")).status_code == 200
    assert status_of(store.engine, KEY) == "complained"
    assert suppressions(store.engine) == {EMAIL: "hard_bounce"}  # already suppressed; the first reason stays


def test_a_postmark_request_without_the_right_credentials_gets_403_and_changes_nothing(
        settings: Settings, store: Store, web: WebServer, cert_host: CertificateHost) -> None:
    seed_send(store, KEY, EMAIL)
    for auth in (None, ("postmark", "wrong"), ("someone", "pm-hook-0123456789"), ("postmark", "")):
        assert post(web, "/webhooks/postmark", postmark_bounce(1), auth=auth).status_code == 403
    assert post(web, "/webhooks/postmark", postmark_bounce(1),
                headers={"Authorization": "Basic !!!not-base64"}).status_code == 403
    unconfigured = WebServer(create_app(web_settings(settings, cert_host, postmark_webhook_user=None,
                                                     postmark_webhook_password=None))).start()
    try:
        assert post(unconfigured, "/webhooks/postmark", postmark_bounce(1), auth=("", "")).status_code == 403
    finally:
        unconfigured.stop()
    assert feedback_rows(store.engine) == [] and status_of(store.engine, KEY) == SendStatus.SENT


def test_a_transient_ses_bounce_counts_as_soft_and_does_not_suppress_at_once(
        store: Store, web: WebServer, cert_host: CertificateHost, rsa_key: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    seed_send(store, KEY, EMAIL)
    payload = ses_bounce(verp_address("bounces@shop.example", SECRET, KEY))
    payload["bounce"].update(bounceType="Transient", bounceSubType="MailboxFull", feedbackId=None)
    payload["bounce"]["bouncedRecipients"][0].update(status="4.2.2", diagnosticCode="smtp; 452 4.2.2 Mailbox full")
    answer = post(web, "/webhooks/ses", signed(notification(payload), rsa_key[0], cert_host.url + "cert.pem"))
    assert answer.status_code == 200, answer.text
    [row] = feedback_rows(store.engine)
    assert (row.kind, row.status, row.send_key) == ("soft_bounce", "4.2.2", KEY)
    assert row.report_id.startswith("ses:sha256:")  # no feedbackId: the notification's own hash
    assert suppressions(store.engine) == {}


def test_a_body_nested_too_deep_for_the_parser_gets_400_not_a_crash(store: Store, web: WebServer) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for path, auth in (("/webhooks/ses", None), ("/webhooks/postmark", ("postmark", "pm-hook-0123456789"))):
        answer = httpx.post(f"{web.url}{path}", content=deep, auth=auth, headers={"Content-Type": "text/plain"})
        assert answer.status_code == 400, (path, answer.status_code)
