"""``/v1/`` of ``lifecycle web``: Segment's HTTP tracking API, so that a shop's own analytics
libraries (Segment's, RudderStack's) send here with only the host and write key changed.

``POST /v1/batch``, ``/v1/identify``, ``/v1/track``, ``/v1/page``, ``/v1/screen``,
``/v1/group`` and ``/v1/alias``, read by ``flows.collect`` into the events ``lifecycle
ingest`` loads, and loaded by the same ``flows.ingest.apply_events``. Answers:

- 200 ``{"success": true}`` once every accepted event is committed (group commit: the
  events of the requests queued together go in one transaction). A batch with refused
  events is still 200 for the others, and lists each refusal by ``index`` and ``reason``
  (also logged); when every event is refused, 400 with the same list.
- 400 for a body that is not JSON, not gzip as it says, or over Segment's limits (500 KB a
  request, 32 KB an event, in a batch too): nothing of it is stored.
- 401 without a valid write key (``LIFECYCLE_WRITE_KEYS``); nothing is read further.
- 503 with ``Retry-After`` when the store cannot write, or when more than
  ``LIFECYCLE_COLLECT_MAX_PENDING`` events wait for their commit in this process: the
  clients' retries back off, and nothing accepted is ever dropped.

Like ``/c/``, these routes are answered by an ASGI layer before FastAPI's middleware,
routing and validation: a shop's backend sends thousands of events a second
(``bench/collect.py``), and they need none of it.
"""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import FastAPI
from sqlalchemy import Engine
from starlette.types import ASGIApp, Receive, Scope, Send

from flows.collect import (
    CALLS,
    MAX_BATCH_BYTES,
    MAX_EVENT_BYTES,
    BadRequest,
    Received,
    WriteKeys,
    basic_user,
    decompressed,
    read_body,
)
from flows.ingest import DUPLICATE, apply_events
from flows.surfaces.group_commit import GroupCommit, StoreUnavailable, serve_first

log = logging.getLogger(__name__)

# A group's customers stay locked until its commit (another writer's group skips them and
# loads their events after it, ``flows.ingest.apply_events``): smaller groups hold them
# shorter, and two writers a process (on PostgreSQL) overlap one's commit with the other's work.
MAX_EVENTS_A_TRANSACTION = 2000
WRITERS = 2
RETRY_AFTER_OVERLOAD = "1"
RETRY_AFTER_STORE = "5"
_JSON = (b"content-type", b"application/json")
_CORS = [(b"access-control-allow-origin", b"*")]
PREFLIGHT = [*_CORS, (b"access-control-allow-methods", b"POST"),
             (b"access-control-allow-headers", b"Authorization, Content-Type, Content-Encoding"),
             (b"access-control-max-age", b"86400")]


@dataclass
class Outcome:
    """What became of one request's accepted events, once committed."""

    loaded: int
    duplicates: int
    refused: list[tuple[int, str]]  # (index in the request, reason)


def write_requests(engine: Engine, requests: list[Received]) -> list[Outcome]:
    """Load the events of several requests in one transaction; each request's share of it."""
    from flows.surfaces.prefect_events import emit_complaints

    applied = apply_events(engine, [event for request in requests for event in request.events])
    outcomes, start = [], 0
    for request in requests:
        mine = applied.outcomes[start:start + len(request.events)]
        start += len(request.events)
        refused = [(index, outcome) for index, outcome in zip(request.positions, mine, strict=True)
                   if outcome is not None and outcome != DUPLICATE]
        outcomes.append(Outcome(mine.count(None), mine.count(DUPLICATE), refused))
    if applied.complaints:
        try:
            emit_complaints(applied.complaints, drain=False)  # committed: the reply can start at once
        except Exception:  # committed events stay answered 200; the cron schedule still replies
            log.exception("%d complaint(s) not announced to Prefect", len(applied.complaints))
    return outcomes


class EventWriter(GroupCommit[Received, Outcome]):
    def __init__(self, engine: Engine, writers: int | None = None) -> None:
        super().__init__(engine, write_requests, "tracking API requests", max_batch=500,
                         writers=writers or (WRITERS if engine.dialect.name == "postgresql" else 1),
                         weight=lambda request: len(request.events), max_weight=MAX_EVENTS_A_TRANSACTION)


class CollectRoutes:
    """ASGI middleware: answers ``/v1/<call>`` itself, passes everything else on."""

    def __init__(self, app: ASGIApp, keys: WriteKeys, writer: EventWriter, clock: Callable[[], datetime],
                 max_pending: int) -> None:
        self.app, self.keys, self.writer, self.clock, self.max_pending = app, keys, writer, clock, max_pending

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        call = path[4:].rstrip("/")
        if call != "batch" and call not in CALLS:
            await _answer(send, 404, {"success": False, "code": "not_found", "message": f"no endpoint {path[:80]}"})
            return
        if scope["method"] == "OPTIONS":
            await _reply(send, 204, b"", PREFLIGHT)
            return
        if scope["method"] != "POST":
            await _answer(send, 405, {"success": False, "code": "method_not_allowed", "message": "POST only"},
                          [(b"allow", b"POST")])
            return
        try:
            await self._collect(scope, receive, send, call)
        except Exception:
            log.exception("POST %s failed", path)
            await _answer(send, 500, {"success": False, "code": "internal", "message": "internal error"})

    async def _collect(self, scope: Scope, receive: Receive, send: Send, call: str) -> None:
        header_key = basic_user(_header(scope, b"authorization"))
        source = self.keys.source_of(header_key) if header_key else None
        if header_key and source is None:
            await _unauthorized(send)
            return
        if self.writer.pending_weight > self.max_pending:
            log.warning("tracking API overloaded (%d events waiting for their commit): answered 503",
                        self.writer.pending_weight)
            await _answer(send, 503, {"success": False, "code": "overloaded", "message": "try again shortly"},
                          [(b"retry-after", RETRY_AFTER_OVERLOAD.encode())])
            return
        limit = MAX_BATCH_BYTES if call == "batch" else MAX_EVENT_BYTES
        received_at = self.clock()
        try:
            body = await _body(receive, limit)
            request = read_body(call, decompressed(body, _header(scope, b"content-encoding"), limit), source,
                                received_at)
            if source is None:  # analytics.js sends the key in the body
                source = self.keys.source_of(request.write_key)
                if source is None:
                    await _unauthorized(send)
                    return
                request.attribute_to(source)
        except BadRequest as exc:
            if source is None:  # nobody known: nothing more is said about the body
                await _unauthorized(send)
                return
            log.warning("source %s: POST /v1/%s refused: %s", source, call, exc)
            await _answer(send, 400, {"success": False, "code": exc.code, "message": str(exc)})
            return
        outcome = Outcome(0, 0, [])
        if request.events:
            try:
                outcome = await self.writer.submit(request)
            except StoreUnavailable:
                await _answer(send, 503, {"success": False, "code": "store_unavailable",
                                          "message": "the store could not write; nothing was kept, try again"},
                              [(b"retry-after", RETRY_AFTER_STORE.encode())])
                return
        errors = sorted(request.errors + outcome.refused)
        for index, reason in errors:
            log.warning("source %s: event %d of POST /v1/%s refused: %s", source, index, call, reason)
        stored = outcome.loaded + outcome.duplicates
        answer: dict[str, Any] = {"success": True, "accepted": outcome.loaded,
                                  "duplicates": outcome.duplicates}
        if errors:
            answer["errors"] = [{"index": index, "reason": reason} for index, reason in errors]
        if not stored and errors:
            answer |= {"success": False, "code": "invalid_events", "message": f"every event was refused: {errors[0][1]}"
                       if call != "batch" else f"all {len(errors)} events were refused; see errors"}
            await _answer(send, 400, answer)
            return
        await _answer(send, 200, answer)


async def _unauthorized(send: Send) -> None:
    await _answer(send, 401, {"success": False, "code": "unauthorized",
                              "message": "a write key of LIFECYCLE_WRITE_KEYS is the basic-auth user name"},
                  [(b"www-authenticate", b'Basic realm="lifecycle"')])


async def _body(receive: Receive, limit: int) -> bytes:
    """The request body, refused as soon as it passes ``limit`` (compressed, it may only be smaller)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("disconnected", "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest("too_large", f"the body is larger than {limit // 1024} KB")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _answer(send: Send, status: int, body: dict[str, Any],
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _reply(send, status, json.dumps(body).encode(), [_JSON, *_CORS, *(headers or [])])


async def _reply(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def add_collect(app: FastAPI, keys: WriteKeys, engine: Engine, clock: Callable[[], datetime],
                max_pending: int) -> EventWriter:
    """Serve ``/v1/`` on ``app``; the writer drains its queue when the app shuts down.
    Call it before ``install_security``, which must wrap what this adds."""
    writer = EventWriter(engine)
    if keys.sources:
        log.info("The tracking API (/v1/) accepts events from %d source(s): %s", len(keys.sources),
                 ", ".join(sorted(keys.sources.values())))
    else:
        log.info("The tracking API (/v1/) accepts nothing: set LIFECYCLE_WRITE_KEYS (source:key pairs) to turn it on")
    serve_first(app, lambda inner: CollectRoutes(inner, keys, writer, clock, max_pending), writer)
    return writer

