"""Signed links that go into every mail (unsubscribe): forged or altered tokens fail."""

from itsdangerous import BadSignature, URLSafeSerializer

UNSUBSCRIBE_SALT = "lifecycle.unsubscribe"
PREVIEW_SALT = "lifecycle.preview"


def unsubscribe_token(secret: str, customer: str, category: str) -> str:
    return URLSafeSerializer(secret, salt=UNSUBSCRIBE_SALT).dumps({"c": customer, "k": category})


def read_unsubscribe_token(secret: str, token: str) -> tuple[str, str] | None:
    """``(customer, category)`` for a genuine token, ``None`` for a forged one."""
    try:
        data = URLSafeSerializer(secret, salt=UNSUBSCRIBE_SALT).loads(token)
    except BadSignature:
        return None
    return data["c"], data["k"]


def unsubscribe_url(base_url: str, secret: str, customer: str, category: str) -> str:
    return f"{base_url.rstrip('/')}/u/{unsubscribe_token(secret, customer, category)}"


def preview_url(base_url: str, secret: str, trigger: str, stage: str, language: str) -> str:
    """A link to a trigger's mail rendered with sample data; signed, so only links we made work."""
    token = URLSafeSerializer(secret, salt=PREVIEW_SALT).dumps({"t": trigger, "s": stage, "l": language})
    return f"{base_url.rstrip('/')}/preview/{token}"


def read_preview_token(secret: str, token: str) -> tuple[str, str, str] | None:
    try:
        data = URLSafeSerializer(secret, salt=PREVIEW_SALT).loads(token)
    except BadSignature:
        return None
    return data["t"], data["s"], data["l"]
