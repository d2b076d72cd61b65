"""``/c/{token}`` and ``/o/{token}`` of ``lifecycle web``: a click redirects, the pixel answers, both recorded.

- ``GET`` or ``HEAD /c/TOKEN``: 302 to the link's destination as the ledger holds it for the
  send and position the token names, with UTM parameters (``flows.tracking.clicks``). No part
  of the request chooses it: the query string is ignored, and a path that is not exactly a
  genuine token (forged, truncated, altered, another mail's, another secret's; a position
  past the mail's links) answers 404 and records nothing.
- ``GET`` or ``HEAD /o/TOKEN``: a 1×1 transparent GIF, recorded as an open (when
  ``tracking.opens`` is on); the same machine rules apply.

**Group commit.** Each click is committed before its 302 is sent, so a redirect the client
saw is a click the store has. One transaction per click would cost a commit (an fsync on
PostgreSQL) per request; instead the handler checks the token on the event loop (an HMAC,
2 µs), queues the click and waits, and a writer thread writes everything queued in one
transaction (``record_hits``), then answers every waiter. While one batch is being written
the next one queues, so batches grow with the load and an idle server writes each click at
once; on PostgreSQL up to four batches are written at once, each in its own transaction.
A failed batch is rolled back whole and each of its requests answered 503 with
``Retry-After`` (the browser's user clicks again; nothing was half-recorded). At shutdown,
the server finishes its requests and the writer drains its queue before the process ends.

**A path of its own.** These two routes are answered by an ASGI layer just inside the
security headers, before Starlette's middleware (FastAPI's exception telemetry, the error
middleware), routing and validation: the redirect is the one request of ``lifecycle web``
that comes in thousands a second after a campaign goes out (bench/clicks.py), and it needs
none of them. Security headers and log redaction (``web_security``) apply to it as to
every route; a defect answers 500 here, since Starlette's error middleware is not around it.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flows.content.links import read_click_token, read_open_token
from flows.settings import Settings
from flows.spec.policy import Policy, Tracking
from flows.spec.problems import SpecError
from flows.spec.project import POLICY_FILE, problems_from
from flows.spec.yaml_source import YamlSyntaxError, load_yaml
from flows.tracking.clicks import Hit, record_hits, request_machine
from models.outcomes import EngagementKind

log = logging.getLogger(__name__)

# The smallest transparent GIF (43 bytes): one pixel, colour 0 transparent.
PIXEL = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
         b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
MAX_BATCH = 1000  # clicks written in one transaction, at most
# Batches written at once: SQLite has one writer at a time anyway; PostgreSQL commits
# several transactions with one flush of its log.
WRITERS = {"postgresql": 4}
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


class StoreUnavailable(Exception):
    """The batch a request was in could not be written (rolled back whole)."""


class ClickWriter:
    """Group commit: ``submit`` queues one hit and returns once the batch it went into is
    committed, with where the request goes (``record_hits``). Each writer takes the queue's
    whole content when it starts a batch; on PostgreSQL several batches are written at
    once (``WRITERS``), so that one batch's commit wait overlaps the next one's work."""

    def __init__(self, engine: Engine, policy: Tracking, max_batch: int = MAX_BATCH,
                 writers: int | None = None) -> None:
        self.engine, self.policy, self.max_batch = engine, policy, max_batch
        self.writers = writers or WRITERS.get(engine.dialect.name, 1)
        self._pending: list[tuple[Hit, asyncio.Future[str | None]]] = []
        self._drains: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = ThreadPoolExecutor(self.writers, thread_name_prefix="lifecycle-clicks")
        self.batches = 0  # written so far, and how long the writers took (logged at shutdown)
        self.written = 0
        self.busy_seconds = 0.0

    async def submit(self, hit: Hit) -> str | None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a test client may run each request on an event loop of its own
            self._loop, self._drains = loop, []
        future: asyncio.Future[str | None] = loop.create_future()
        self._pending.append((hit, future))
        self._drains = [drain for drain in self._drains if not drain.done()]
        if len(self._drains) < self.writers:
            self._drains.append(loop.create_task(self._drain()))
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            started = time.perf_counter()
            try:
                answers = await loop.run_in_executor(self._threads, record_hits, self.engine,
                                                     [hit for hit, _ in batch], self.policy)
            except (DBAPIError, PoolTimeout) as exc:
                log.warning("%d clicks not recorded, answered 503: the store did not answer in time (%s)",
                            len(batch), type(getattr(exc, "orig", exc)).__name__)
                self._fail(batch, StoreUnavailable(type(exc).__name__))
                continue
            except BaseException as exc:  # a defect, or cancelled: every waiter learns it, none hangs
                self._fail(batch, exc if isinstance(exc, Exception) else StoreUnavailable("cancelled"))
                if not isinstance(exc, Exception):
                    raise
                continue
            self.batches += 1
            self.written += len(batch)
            self.busy_seconds += time.perf_counter() - started
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)

    @staticmethod
    def _fail(batch: list[tuple[Hit, asyncio.Future[str | None]]], exc: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)

    async def close(self) -> None:
        """Write what is queued (at shutdown: the server has finished its requests)."""
        loop = asyncio.get_running_loop()
        live = [drain for drain in self._drains if not drain.done() and drain.get_loop() is loop]
        if self._pending and not live:
            live.append(loop.create_task(self._drain()))
        await asyncio.gather(*live)
        if self.batches:
            log.info("%d clicks and opens written in %d batches (%.1f a batch, %.1f ms each)", self.written,
                     self.batches, self.written / self.batches, 1000 * self.busy_seconds / self.batches)


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
    build = app.build_middleware_stack

    def build_with_tracking() -> ASGIApp:
        return TrackingRoutes(build(), settings.signing_secret, writer, clock, error_page)

    app.build_middleware_stack = build_with_tracking  # type: ignore[method-assign]  # wraps Starlette's own stack
    previous = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> Any:
        async with previous(application) as state:
            try:
                yield state
            finally:
                await writer.close()

    app.router.lifespan_context = lifespan
    return writer

