"""Signed links in mails and run summaries: a forged, altered, foreign or spent token is refused.

Tokens are HMAC-signed (itsdangerous) with the signing secret (``flows.signing_secret``).
Each token is scoped twice: its purpose has its own salt, and the signed data names the
purpose again (``p``), the customer (``c``) and what it is about, so a token is refused on
any route but its own. Which tokens expire, and why:

- **unsubscribe** (``/u/``): never. Mail providers require the link in every mail to keep
  working (Gmail: honoured within 48 hours, however old the mail); about: the category.
- **preferences** (``/preferences/``): never, for the same reason; it is linked from every
  mail's footer and from the unsubscribe page.
- **confirm** (``/confirm/``): with the consent request it confirms (the request's time
  plus the trigger's ``max_age``), and only while that request is still the customer's
  pending one and the customer still has the address it was mailed to: single use, and
  never after an unsubscribe (``flows.consent``).
- **preview** (``/preview/``): after ``PREVIEW_DAYS``; linked from Prefect runs for ops.

The VERP token in each mail's Return-Path (``verp_address``) is signed with its own salt
too, but is shorter and case-proof, to fit an address's local part.
"""

import hashlib
import hmac
import re
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from itsdangerous import BadSignature, Signer, URLSafeSerializer

UNSUBSCRIBE = "lifecycle.unsubscribe"
PREFERENCES = "lifecycle.preferences"
CONFIRM = "lifecycle.confirm"
PREVIEW = "lifecycle.preview"
# What the signed data calls each purpose; a token whose ``p`` is not its route's is refused.
PURPOSES = {UNSUBSCRIBE: "unsubscribe", PREFERENCES: "preferences", CONFIRM: "confirm", PREVIEW: "preview"}
# Mailed before tokens named their purpose: still honoured, since the salt scopes them too
# and such links must keep working. A confirmation without a request never is.
_UNNAMED_OK = {UNSUBSCRIBE, PREFERENCES}
PREVIEW_DAYS = 30
ADDRESS = "lifecycle.address"


@lru_cache(maxsize=32)
def _serializer(secret: str, purpose: str) -> URLSafeSerializer:
    """One per secret and purpose: making one took a third of the cost of a signature,
    and every mail signs two or three links."""
    return URLSafeSerializer(secret, salt=purpose)


def sign(secret: str, purpose: str, data: dict[str, Any]) -> str:
    return _serializer(secret, purpose).dumps({"p": PURPOSES[purpose], **data})


def read(secret: str, purpose: str, token: str) -> dict[str, Any] | None:
    """The signed data, or ``None`` for a forged, altered or foreign token (one signed for
    another purpose). Whether it has expired is the caller's question (``expired``)."""
    try:
        data = _serializer(secret, purpose).loads(token)
    except BadSignature:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("c", ""), str):
        return None
    named = data.get("p")
    if named != PURPOSES[purpose] and not (named is None and purpose in _UNNAMED_OK):
        return None
    return data


def expired(data: dict[str, Any], now: datetime) -> bool:
    """A token that carries an expiry (``x``, seconds since the epoch) past ``now``; one
    whose expiry is not a number counts as expired."""
    if "x" not in data:
        return False
    deadline = data["x"]
    return not isinstance(deadline, int) or isinstance(deadline, bool) or now.timestamp() >= deadline


def _url(base_url: str, path: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/{path}/{token}"


def unsubscribe_url(base_url: str, secret: str, customer: str, category: str) -> str:
    return _url(base_url, "u", sign(secret, UNSUBSCRIBE, {"c": customer, "k": category}))


def preferences_url(base_url: str, secret: str, customer: str) -> str:
    return _url(base_url, "preferences", sign(secret, PREFERENCES, {"c": customer}))


def address_tag(secret: str, address: str) -> str:
    """Names the address a confirmation was mailed to, without showing it (keyed: not a
    hash anyone can test guesses against): consent is confirmed for that mailbox only."""
    return hmac.new(_derived_key(secret, ADDRESS), address.strip().lower().encode(), hashlib.sha256).hexdigest()[:16]


def confirm_url(base_url: str, secret: str, customer: str, request: str, expires: datetime, address: str) -> str:
    """Confirms the one consent request ``request`` (``flows.consent.request_id``), made for
    ``address``, until ``expires``."""
    claims = {"c": customer, "r": request, "a": address_tag(secret, address), "x": int(expires.timestamp())}
    return _url(base_url, "confirm", sign(secret, CONFIRM, claims))


def preview_url(base_url: str, secret: str, trigger: str, stage: str, language: str, now: datetime,
                step: str = "", variant: str = "") -> str:
    """A link to a trigger's mail (a journey's: one step's, one variant's) rendered with sample
    data; signed, so only links we made work."""
    expires = int((now + timedelta(days=PREVIEW_DAYS)).timestamp())
    data: dict[str, object] = {"t": trigger, "s": stage, "l": language, "x": expires}
    if step:  # ("p" is every token's purpose)
        data["j"] = step
    if variant:
        data["a"] = variant
    return _url(base_url, "preview", sign(secret, PREVIEW, data))


# -- VERP: the envelope sender names the send ------------------------------------------

VERP = "lifecycle.verp"
VERP_TOKEN = re.compile(r"\+([0-9a-f]{48})@", re.IGNORECASE)
# The send's digest (the 128 bits its Message-ID is made of, as in the Message-ID: 32 hex
# characters), then 16 of the signature (64 bits of HMAC-SHA256): 48 in all, so
# ``bounces+TOKEN`` stays inside the 64 octets RFC 5321 allows a local part. Hex, because
# some relays fold the case of the address a bounce is sent to, and because it costs
# nothing to write (Python's base32 took 15 µs a mail, more than the two HMACs).
_DIGEST_CHARS, _TAG_BYTES = 32, 8
TOKEN_LENGTH = _DIGEST_CHARS + 2 * _TAG_BYTES
MESSAGE_ID = "lifecycle.message-id"


def send_digest(secret: str, send_key: str) -> str:
    """The hex digest a send's Message-ID is made of (``flows.message.compose.message_id``): keyed,
    so nobody can work out another recipient's Message-ID from the (guessable) send key
    and forge a bounce or complaint for it."""
    return hmac.new(_derived_key(secret, MESSAGE_ID), send_key.encode(), hashlib.sha256).hexdigest()[:_DIGEST_CHARS]


@lru_cache(maxsize=32)
def _derived_key(secret: str, purpose: str) -> bytes:
    return Signer(secret, salt=purpose, digest_method=hashlib.sha256).derive_key()


def _tag(secret: str, digest: str) -> str:
    return hmac.new(_derived_key(secret, VERP), digest.encode(), hashlib.sha256).hexdigest()[: 2 * _TAG_BYTES]


def verp_token(secret: str, send_key: str) -> str:
    digest = send_digest(secret, send_key)
    return digest + _tag(secret, digest)


def read_verp_token(secret: str, token: str) -> str | None:
    """The send's digest (hex, as in its Message-ID) a genuine token names; None for a forged one."""
    token = token.lower()
    if len(token) != TOKEN_LENGTH:
        return None
    digest = token[:_DIGEST_CHARS]
    if not hmac.compare_digest(_tag(secret, digest), token[_DIGEST_CHARS:]):
        return None
    return digest


def verp_address(bounce_address: str, secret: str, send_key: str) -> str:
    """``bounces@shop.example`` → ``bounces+TOKEN@shop.example``: the Return-Path of one send."""
    local, _, domain = bounce_address.rpartition("@")
    return f"{local}+{verp_token(secret, send_key)}@{domain}"


def verp_digests(secret: str, text: str) -> list[str]:
    """Every genuine VERP token in ``text`` (addresses, headers), as send digests, in order."""
    found = (read_verp_token(secret, match.group(1)) for match in VERP_TOKEN.finditer(text))
    return list(dict.fromkeys(d for d in found if d))


# -- click and open tracking: the token names the send and the link ---------------------

CLICK = "lifecycle.click"
OPEN = "lifecycle.open"
MAX_TRACKED_LINKS = 256  # a mail's links beyond this go untracked, straight to their destination
_LINK_CHARS = 2  # the link's position, in hex
CLICK_TOKEN_LENGTH = _DIGEST_CHARS + _LINK_CHARS + 2 * _TAG_BYTES
OPEN_TOKEN_LENGTH = _DIGEST_CHARS + 2 * _TAG_BYTES
_HEX = frozenset("0123456789abcdef")


def _tracking_tag(secret: str, purpose: str, body: str) -> str:
    return hmac.new(_derived_key(secret, purpose), body.encode(), hashlib.sha256).hexdigest()[: 2 * _TAG_BYTES]


def click_token(secret: str, digest: str, link: int) -> str:
    """``DIGEST`` (the send's, as in its Message-ID) + the link's position + a tag over both:
    the destination is looked up in the ledger by the send and position, never carried in
    the URL, so no request can choose it. HMAC-SHA256 by hand, as for VERP, because a mail
    signs several (itsdangerous's serializer cost 15 µs a link; this costs 2 µs)."""
    if not 0 <= link < MAX_TRACKED_LINKS:
        raise ValueError(f"link position {link} out of range")
    body = f"{digest}{link:02x}"
    return body + _tracking_tag(secret, CLICK, body)


def read_click_token(secret: str, token: str) -> tuple[str, int] | None:
    """(the send's digest, the link's position) for a genuine token; None for anything else."""
    if len(token) != CLICK_TOKEN_LENGTH or not _HEX.issuperset(token):
        return None
    body, tag = token[: _DIGEST_CHARS + _LINK_CHARS], token[_DIGEST_CHARS + _LINK_CHARS:]
    if not hmac.compare_digest(_tracking_tag(secret, CLICK, body), tag):
        return None
    return body[:_DIGEST_CHARS], int(body[_DIGEST_CHARS:], 16)


def open_token(secret: str, digest: str) -> str:
    return digest + _tracking_tag(secret, OPEN, digest)


def read_open_token(secret: str, token: str) -> str | None:
    if len(token) != OPEN_TOKEN_LENGTH or not _HEX.issuperset(token):
        return None
    digest, tag = token[:_DIGEST_CHARS], token[_DIGEST_CHARS:]
    return digest if hmac.compare_digest(_tracking_tag(secret, OPEN, digest), tag) else None


def click_url(base_url: str, secret: str, digest: str, link: int) -> str:
    return _url(base_url, "c", click_token(secret, digest, link))


def open_url(base_url: str, secret: str, digest: str) -> str:
    return _url(base_url, "o", open_token(secret, digest))
