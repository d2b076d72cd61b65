"""Signed links in mails and run summaries: a forged or altered token is refused.

Tokens are HMAC-signed (itsdangerous) with ``LIFECYCLE_SECRET``; each purpose has its
own salt, so an unsubscribe token cannot be replayed as a confirmation.
"""

from functools import lru_cache
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer

UNSUBSCRIBE = "lifecycle.unsubscribe"
PREFERENCES = "lifecycle.preferences"
CONFIRM = "lifecycle.confirm"
PREVIEW = "lifecycle.preview"


@lru_cache(maxsize=32)
def _serializer(secret: str, purpose: str) -> URLSafeSerializer:
    """One per secret and purpose: making one took a third of the cost of a signature,
    and every mail signs two or three links."""
    return URLSafeSerializer(secret, salt=purpose)


def sign(secret: str, purpose: str, data: dict[str, Any]) -> str:
    return _serializer(secret, purpose).dumps(data)


def read(secret: str, purpose: str, token: str) -> dict[str, Any] | None:
    """The signed data, or ``None`` for a forged, altered or foreign token."""
    try:
        data = _serializer(secret, purpose).loads(token)
    except BadSignature:
        return None
    return data if isinstance(data, dict) else None


def _url(base_url: str, path: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/{path}/{token}"


def unsubscribe_url(base_url: str, secret: str, customer: str, category: str) -> str:
    return _url(base_url, "u", sign(secret, UNSUBSCRIBE, {"c": customer, "k": category}))


def preferences_url(base_url: str, secret: str, customer: str) -> str:
    return _url(base_url, "preferences", sign(secret, PREFERENCES, {"c": customer}))


def confirm_url(base_url: str, secret: str, customer: str) -> str:
    return _url(base_url, "confirm", sign(secret, CONFIRM, {"c": customer}))


def preview_url(base_url: str, secret: str, trigger: str, stage: str, language: str) -> str:
    """A link to a trigger's mail rendered with sample data; signed, so only links we made work."""
    return _url(base_url, "preview", sign(secret, PREVIEW, {"t": trigger, "s": stage, "l": language}))
