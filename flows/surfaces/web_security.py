"""What every response of ``lifecycle web`` carries, and what its logs never carry: a token.

Headers (``install_security``), set on every response, error pages and webhook JSON
included, by a wrapper outside Starlette's error middleware (so a 500 carries them too):

- ``Content-Security-Policy``: our pages (unsubscribe, preferences, confirmation, errors)
  load nothing (``default-src 'none'``), run no script, post forms only to us, cannot be
  framed, and may use only the inline ``style=`` attributes our template has, by hash.
  The reports page (``/reports``) has its own policy, its one stylesheet allowed by hash
  (``flows.surfaces.web_reports.REPORTS_CSP``). A preview (``/preview/``) is a rendered
  marketing mail: inline styles and https images, still no script, no forms, no plugins,
  sandboxed, and framed only by our own pages.
- ``X-Frame-Options`` (``DENY``; ``SAMEORIGIN`` for previews) for browsers without
  ``frame-ancestors``; ``X-Content-Type-Options: nosniff``; ``Referrer-Policy: no-referrer``
  (the URL is the token; a tracked link's destination never learns it); ``Cache-Control:
  no-store`` on every token page; ``Cross-Origin-Opener-Policy`` and ``-Resource-Policy:
  same-origin`` (``cross-origin`` for the open pixel, which webmail shows in its own pages); a
  ``Permissions-Policy`` that turns off every powerful feature; and
  ``Strict-Transport-Security`` when ``LIFECYCLE_BASE_URL`` is https.

Logs (``Redacting``): every path that carries a token (``TOKEN_ROUTES``) is written as
``/u/…``, every query string as ``?…``, and a signed token anywhere else in a message as
``…``; uvicorn's access log, its error log and our own records alike.
"""

import base64
import copy
import hashlib
import logging
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flows.redaction import TOKEN_ROUTES, Redacting
from flows.surfaces.web_reports import PATH as REPORTS_PATH
from flows.surfaces.web_reports import REPORTS_CSP

PREVIEW_ROUTE = "preview"
PIXEL_ROUTE = "o"
REPORTS_ROUTE = REPORTS_PATH.strip("/")

# The ``style=`` attributes of flows.surfaces.web's page template, allowed by hash ('unsafe-hashes'
# allows exactly these attribute values, nothing else inline). tests/surfaces/test_web_security.py
# renders every page and fails, naming the hash, for a style attribute that is not here.
PAGE_STYLES = (
    "font-family:Helvetica,Arial,sans-serif;max-width:560px;margin:40px auto;padding:0 16px;color:#18181b",
    "font-size:22px",
)


def style_hash(value: str) -> str:
    """The CSP source that allows the inline style ``value``."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(value.encode()).digest()).decode() + "'"


def _policy(*directives: str) -> str:
    return "; ".join(directives)


PAGE_CSP = _policy(
    "default-src 'none'",
    "style-src 'unsafe-hashes' " + " ".join(style_hash(style) for style in PAGE_STYLES),
    "form-action 'self'",  # the forms post to their own URL
    "frame-ancestors 'none'",
    "base-uri 'none'",
)
PREVIEW_CSP = _policy(
    "default-src 'none'",
    "script-src 'none'",
    "style-src 'unsafe-inline'",  # mail HTML is styled inline, by design: mail clients strip the rest
    "img-src 'self' https: data:",
    "form-action 'none'",
    "frame-ancestors 'self'",  # the preview gallery embeds previews in <iframe sandbox>
    "base-uri 'none'",
    # An opaque origin without scripts, forms or plugins; links opened in a new tab work.
    "sandbox allow-popups allow-popups-to-escape-sandbox",
)
PERMISSIONS_POLICY = ", ".join(f"{feature}=()" for feature in (
    "accelerometer", "autoplay", "browsing-topics", "camera", "display-capture", "encrypted-media", "fullscreen",
    "geolocation", "gyroscope", "hid", "magnetometer", "microphone", "midi", "payment", "picture-in-picture",
    "publickey-credentials-get", "screen-wake-lock", "serial", "usb", "xr-spatial-tracking"))
HSTS = "max-age=63072000; includeSubDomains"


def first_segment(path: str) -> str:
    return path.lstrip("/").partition("/")[0]


def carries_token(path: str) -> bool:
    return first_segment(path) in TOKEN_ROUTES and path.lstrip("/").partition("/")[2] != ""


def headers_for(path: str, https: bool) -> dict[str, str]:
    """The security headers of a response to ``path`` (lower-case names)."""
    segment = first_segment(path)
    preview = segment == PREVIEW_ROUTE
    headers = {
        "content-security-policy": PREVIEW_CSP if preview else REPORTS_CSP if segment == REPORTS_ROUTE else PAGE_CSP,
        "x-frame-options": "SAMEORIGIN" if preview else "DENY",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "cross-origin-opener-policy": "same-origin",
        "cross-origin-resource-policy": "cross-origin" if segment == PIXEL_ROUTE else "same-origin",
        "permissions-policy": PERMISSIONS_POLICY,
    }
    if https:
        headers["strict-transport-security"] = HSTS
    return headers


_DEFAULTS = {b"cache-control": b"no-store", b"x-robots-tag": b"noindex, nofollow"}


def _replaced(path: str, https: bool) -> dict[bytes, bytes]:
    """The headers a response to ``path`` gets in place of its own, encoded (the same for
    every path of a kind: worked out once per kind, since every click asks)."""
    segment = first_segment(path)
    kind = segment if segment in (PREVIEW_ROUTE, PIXEL_ROUTE, REPORTS_ROUTE) else ""
    return _replaced_for(kind, carries_token(path), https)


@lru_cache(maxsize=16)
def _replaced_for(kind: str, token: bool, https: bool) -> dict[bytes, bytes]:
    ours = {name.encode(): value.encode() for name, value in headers_for(f"/{kind}/", https).items()}
    return {**ours, b"cache-control": b"no-store"} if token else ours


class SecurityHeaders:
    """ASGI wrapper: sets ``headers_for`` on every HTTP response (replacing what a route set),
    ``Cache-Control: no-store`` on token pages (by default elsewhere) and ``X-Robots-Tag``."""

    def __init__(self, app: ASGIApp, https: bool) -> None:
        self.app, self.https = app, https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = _replaced(scope.get("path", ""), self.https)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(name, value) for name, value in message.get("headers", [])
                        if name.lower() not in replaced]
                present = {name.lower() for name, _ in kept}
                extra = [(name, value) for name, value in _DEFAULTS.items() if name not in present and
                         name not in replaced]
                message = {**message, "headers": kept + list(replaced.items()) + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_security(app: FastAPI, base_url: str) -> None:
    """Security headers on every response of ``app``, and token redaction on the loggers
    that see its requests, whoever serves it (``lifecycle web`` also redacts every record)."""
    https = urlsplit(base_url).scheme == "https"
    build = app.build_middleware_stack

    def build_with_headers() -> ASGIApp:
        # Outside ServerErrorMiddleware (the outermost of Starlette's own): a middleware
        # added with app.add_middleware would not see the 500 that one sends.
        return SecurityHeaders(build(), https)

    app.build_middleware_stack = build_with_headers  # type: ignore[method-assign]  # wraps Starlette's own stack
    for name in ("uvicorn.access", "uvicorn.error", "flows.surfaces.web"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, Redacting) for f in logger.filters):
            logger.addFilter(Redacting())


# -- log redaction: flows.redaction, installed on the loggers that see requests ---------

def log_config(level: str = "INFO") -> dict[str, Any]:
    """uvicorn's logging configuration, with ``Redacting`` on every handler and our own
    loggers (the root logger) written through uvicorn's default handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact": {"()": Redacting}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact"]
    config["root"] = {"handlers": ["default"], "level": level}
    return config
