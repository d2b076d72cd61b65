"""Amazon SNS message signatures, checked the way AWS documents them.

SES reports bounces and complaints through an SNS topic that posts to
``/webhooks/ses``. Anyone can post there, so a message counts only if its signature
verifies: RSA over the canonical string of its fields (name, newline, value, newline,
in AWS's fixed order), SHA1 for ``SignatureVersion`` 1 and SHA256 for 2, with the
certificate at ``SigningCertURL``. That URL (and a ``SubscribeURL`` we visit) must be
https on ``sns.<region>.amazonaws.com``: otherwise a forger would simply name their own
certificate. Tests add loopback prefixes through ``LIFECYCLE_SNS_TRUSTED_URL_PREFIXES``,
which production refuses.
"""

import base64
import binascii
import re
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

AWS_HOST = re.compile(r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?")
# The fields each message type signs, in the order AWS puts them in the canonical string.
SIGNED_FIELDS: dict[str, tuple[str, ...]] = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
    "UnsubscribeConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
}
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}
_CACHE_SIZE = 16


class SnsError(Exception):
    """The message is not a genuine SNS message (the reason is safe to log)."""


def canonical(message: dict[str, Any]) -> bytes:
    """The string AWS signs: each signed field as ``Name\\nvalue\\n``; ``Subject`` only when present."""
    fields = SIGNED_FIELDS.get(str(message.get("Type")))
    if fields is None:
        raise SnsError(f"unknown SNS message Type {message.get('Type')!r}")
    lines: list[str] = []
    for name in fields:
        value = message.get(name)
        if name == "Subject" and value is None:
            continue
        if not isinstance(value, str):
            raise SnsError(f"SNS message field {name} is missing")
        lines += [name, value]
    return ("\n".join(lines) + "\n").encode()


def trusted_url(url: object, extra_prefixes: Sequence[str] = ()) -> bool:
    """An SNS URL we may fetch: https on an SNS host (no user, no other port), or a test prefix."""
    if not isinstance(url, str):
        return False
    if any(prefix and url.startswith(prefix) for prefix in extra_prefixes):
        return True
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return False
    return (parts.scheme == "https" and parts.hostname is not None and AWS_HOST.fullmatch(parts.hostname) is not None
            and port in (None, 443) and parts.username is None and "\\" not in url)


class Certificates:
    """SNS signing certificates by URL, fetched once (AWS rotates them rarely, and every message names one)."""

    def __init__(self, timeout: float = 10) -> None:
        self.timeout = timeout
        self.keys: dict[str, rsa.RSAPublicKey] = {}
        self.lock = threading.Lock()

    def key(self, url: str) -> rsa.RSAPublicKey:
        with self.lock:
            if url in self.keys:
                return self.keys[url]
        try:
            response = httpx.get(url, timeout=self.timeout, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise SnsError(f"cannot fetch the signing certificate: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise SnsError(f"signing certificate answered HTTP {response.status_code}")
        try:
            certificate = x509.load_pem_x509_certificate(response.content)
        except ValueError:
            raise SnsError("the signing certificate is not a PEM certificate") from None
        now = datetime.now(UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise SnsError("the signing certificate is expired or not yet valid")
        public = certificate.public_key()
        if not isinstance(public, rsa.RSAPublicKey):
            raise SnsError("the signing certificate's key is not RSA")
        with self.lock:
            if len(self.keys) >= _CACHE_SIZE:
                self.keys.pop(next(iter(self.keys)))
            self.keys[url] = public
        return public


def verify(message: dict[str, Any], certificates: Certificates, extra_prefixes: Sequence[str] = ()) -> None:
    """Raise ``SnsError`` unless AWS signed this message."""
    algorithm = _HASHES.get(str(message.get("SignatureVersion")))
    if algorithm is None:
        raise SnsError(f"unsupported SignatureVersion {message.get('SignatureVersion')!r}")
    url = message.get("SigningCertURL")
    if not trusted_url(url, extra_prefixes) or not urlsplit(str(url)).path.endswith(".pem"):
        raise SnsError("SigningCertURL is not an https .pem on sns.<region>.amazonaws.com")
    data = canonical(message)
    try:
        signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
    except (binascii.Error, ValueError):
        raise SnsError("Signature is not base64") from None
    try:
        certificates.key(str(url)).verify(signature, data, padding.PKCS1v15(), algorithm())
    except InvalidSignature:
        raise SnsError("the signature does not verify") from None
