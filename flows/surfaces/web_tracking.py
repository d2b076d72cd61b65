"""``/c/{token}`` and ``/o/{token}`` of ``lifecycle web``: a click redirects, the pixel answers, both recorded.

- ``GET`` or ``HEAD /c/TOKEN``: 302 to the link's destination as the ledger holds it for the
  send and position the token names, with UTM parameters (``flows.tracking.clicks``). No part
  of the request chooses it: the query string is ignored, and a path that is not exactly a
  genuine token (forged, truncated, altered, another mail's, another secret's; a position
  past the mail's links) answers 404 and records nothing.
- ``GET`` or ``HEAD /o/TOKEN``: a 1×1 transparent GIF, recorded as an open (when
  ``tracking.opens`` is on); the same machine rules apply.

**Group commit.** Each click is committed before its 302 is sent, so a redirect the client
saw is a click the store has: the handler checks the token on the event loop (an HMAC,
2 µs), and ``flows.surfaces.group_commit`` writes it with the clicks queued beside it in
one transaction (``record_hits``). A failed batch is rolled back whole and each of its
requests answered 503 with ``Retry-After`` (the browser's user clicks again; nothing was
half-recorded).

**A path of its own.** These two routes are answered by an ASGI layer just inside the
security headers, before Starlette's middleware (FastAPI's exception telemetry, the error
middleware), routing and validation: the redirect is the one request of ``lifecycle web``
that comes in thousands a second after a campaign goes out (bench/clicks.py), and it needs
none of them. Security headers and log redaction (``web_security``) apply to it as to
every route; a defect answers 500 here, since Starlette's error middleware is not around it.
"""

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from fastapi import FastAPI
from pydantic import ValidationError
from sqlalchemy import Engine
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flows.content.links import read_click_token, read_open_token
from flows.settings import Settings
from flows.spec.policy import Policy, Tracking
from flows.spec.problems import SpecError
from flows.spec.project import POLICY_FILE, problems_from
from flows.spec.yaml_source import YamlSyntaxError, load_yaml
from flows.surfaces.group_commit import GroupCommit, StoreUnavailable, serve_first
from flows.tracking.clicks import Hit, record_hits, request_machine
from models.outcomes import EngagementKind

log = logging.getLogger(__name__)

# The smallest transparent GIF (43 bytes): one pixel, colour 0 transparent.
PIXEL = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
         b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
MAX_BATCH = 1000  # clicks written in one transaction, at most
# Batches written at once on PostgreSQL: two overlap one's commit with the other's work; more
# made smaller batches, each costing the server and PostgreSQL its round trips and commit
# (bench/clicks.py: four writers wrote 15 clicks a batch, two 21, for less CPU a click).
WRITERS = 2
RETRY_AFTER = "30"
_TEXT = (b"content-type", b"text/plain; charset=utf-8")


def load_policy(triggers_dir: Path) -> Policy:
    """``triggers/policy.yaml`` alone, checked as ``lifecycle validate`` checks it: a broken
    policy stops ``lifecycle web`` with its located problems (``SpecError``). Without the
    file, the defaults."""
    path = triggers_dir / POLICY_FILE
    if not path.is_file():
        return Policy()
    try:
        doc = load_yaml(path)
    except YamlSyntaxError as exc:
        raise SpecError([exc.problem]) from None
    try:
        return Policy.model_validate(doc.data or {})
    except ValidationError as exc:
        raise SpecError(problems_from(doc, exc, Policy)) from None


class ClickWriter(GroupCommit[Hit, str | None]):
    """Group commit of clicks and opens (``record_hits``): each answered with where the request goes."""

    def __init__(self, engine: Engine, policy: Tracking, max_batch: int = MAX_BATCH,
                 writers: int | None = None) -> None:
        self.policy = policy
        super().__init__(engine, self._record, "clicks and opens", max_batch,
                         writers or (WRITERS if engine.dialect.name == "postgresql" else 1))

    def _record(self, engine: Engine, hits: list[Hit]) -> list[str | None]:
        return record_hits(engine, hits, self.policy)


ErrorPage = Callable[[str, int], Response]  # (Accept-Language, status) → our error page


class TrackingRoutes:
    """ASGI middleware: answers ``/c/`` and ``/o/`` itself, passes everything else on."""

    def __init__(self, app: ASGIApp, secret: str, writer: ClickWriter, clock: Callable[[], datetime],
                 error_page: ErrorPage) -> None:
        self.app, self.secret, self.writer, self.clock, self.error_page = app, secret, writer, clock, error_page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith(("/c/", "/o/")):
            kind = EngagementKind.CLICK if path[1] == "c" else EngagementKind.OPEN
            started = False

            async def send_noting_start(message: Message) -> None:
                nonlocal started
                started = True
                await send(message)

            try:
                await self._answer(scope, receive, send_noting_start, kind, path[3:])
            except Exception:
                log.exception("%s %s failed", scope["method"], path)
                if started:
                    raise
                await self._error(scope, receive, send, 500)
        else:
            await self.app(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, send: Send, kind: str, token: str) -> None:
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _plain(send, 405, [(b"allow", b"GET, HEAD"), _TEXT])
            return
        hit = self._hit(kind, token, method, _header(scope, b"user-agent"))
        if hit is None:
            await self._error(scope, receive, send, 404)
            return
        try:
            destination = await self.writer.submit(hit)
        except StoreUnavailable:
            await self._error(scope, receive, send, 503)
            return
        if destination is None:
            await self._error(scope, receive, send, 404)
        elif kind == EngagementKind.CLICK:
            await _plain(send, 302, [(b"location", destination.encode()), _TEXT])
        else:
            await _plain(send, 200, [(b"content-type", b"image/gif")], PIXEL)

    def _hit(self, kind: str, token: str, method: str, user_agent: str | None) -> Hit | None:
        if kind == EngagementKind.CLICK:
            click = read_click_token(self.secret, token)
            if click is None:
                return None
            digest, link = click
        else:
            opened = read_open_token(self.secret, token)
            if opened is None:
                return None
            digest, link = opened, -1
        return Hit(kind, digest, link, self.clock(), request_machine(method, user_agent))

    async def _error(self, scope: Scope, receive: Receive, send: Send, status: int) -> None:
        response = self.error_page(_header(scope, b"accept-language") or "", status)
        if status == 503:
            response.headers["Retry-After"] = RETRY_AFTER
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _plain(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def add_tracking(app: FastAPI, settings: Settings, engine: Engine, tracking_policy: Tracking,
                 clock: Callable[[], datetime], error_page: ErrorPage) -> ClickWriter:
    """Serve ``/c/`` and ``/o/`` on ``app``; the writer drains its queue when the app shuts down.
    Call it before ``install_security``, which must wrap what this adds."""
    writer = ClickWriter(engine, tracking_policy)
    serve_first(app, lambda inner: TrackingRoutes(inner, settings.signing_secret, writer, clock, error_page), writer)
    return writer

