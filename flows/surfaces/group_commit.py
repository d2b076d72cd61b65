"""Group commit for ``lifecycle web``: many requests' writes in one transaction, each request
answered only once its write is committed.

One transaction per request would cost a commit (an fsync on PostgreSQL) per request.
Instead a handler queues its item and waits; a writer thread writes everything queued in
one call, then answers every waiter. While one batch is being written the next one
queues, so batches grow with the load and an idle server writes each item at once; on
PostgreSQL several batches are written at once, each in its own transaction, so that one
batch's commit wait overlaps the next one's work. A failed batch is rolled back whole and
each of its requests learns it (``StoreUnavailable``); at shutdown the writer drains its
queue before the process ends.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.types import ASGIApp

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Answer = TypeVar("Answer")

# Batches written at once: SQLite has one writer at a time anyway; PostgreSQL commits
# several transactions with one flush of its log.
WRITERS = {"postgresql": 4}


class StoreUnavailable(Exception):
    """The batch a request was in could not be written (rolled back whole)."""


class GroupCommit(Generic[Item, Answer]):
    """``submit`` queues one item and returns its answer once the batch it went into is
    committed by ``write(engine, items) -> answers`` (one answer per item, in order). A
    batch holds at most ``max_batch`` items, or ``max_weight`` by ``weight`` (events, say)."""

    def __init__(self, engine: Engine, write: Callable[[Engine, list[Item]], list[Answer]], what: str,
                 max_batch: int, writers: int | None = None, weight: Callable[[Item], int] = lambda _: 1,
                 max_weight: int | None = None) -> None:
        self.engine, self.write, self.what, self.max_batch = engine, write, what, max_batch
        self.weight, self.max_weight = weight, max_weight or max_batch
        self.writers = writers or WRITERS.get(engine.dialect.name, 1)
        self._pending: list[tuple[Item, asyncio.Future[Answer]]] = []
        self.pending_weight = 0  # of what is queued or being written: the surface's measure of overload
        self._drains: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = ThreadPoolExecutor(self.writers, thread_name_prefix=f"lifecycle-{what}")
        self.batches = 0  # written so far, and how long the writers took (logged at shutdown)
        self.written = 0
        self.busy_seconds = 0.0

    async def submit(self, item: Item) -> Answer:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a test client may run each request on an event loop of its own
            self._loop, self._drains = loop, []
        future: asyncio.Future[Answer] = loop.create_future()
        self._pending.append((item, future))
        self.pending_weight += self.weight(item)
        self._drains = [drain for drain in self._drains if not drain.done()]
        if len(self._drains) < self.writers:
            self._drains.append(loop.create_task(self._drain()))
        return await future

    def _take(self) -> list[tuple[Item, asyncio.Future[Answer]]]:
        count, weight = 0, 0
        for item, _ in self._pending:
            if count and (count >= self.max_batch or weight + self.weight(item) > self.max_weight):
                break
            count, weight = count + 1, weight + self.weight(item)
        batch, self._pending = self._pending[:count], self._pending[count:]
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch = self._take()
            started = time.perf_counter()
            try:
                answers = await loop.run_in_executor(self._threads, self.write, self.engine,
                                                     [item for item, _ in batch])
            except (DBAPIError, PoolTimeout) as exc:
                log.warning("%d %s not written, answered 503: the store did not answer in time (%s)",
                            len(batch), self.what, type(getattr(exc, "orig", exc)).__name__)
                self._fail(batch, StoreUnavailable(type(exc).__name__))
                continue
            except BaseException as exc:  # a defect, or cancelled: every waiter learns it, none hangs
                self._fail(batch, exc if isinstance(exc, Exception) else StoreUnavailable("cancelled"))
                if not isinstance(exc, Exception):
                    raise
                continue
            finally:
                self.pending_weight -= sum(self.weight(item) for item, _ in batch)
            self.batches += 1
            self.written += len(batch)
            self.busy_seconds += time.perf_counter() - started
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)

    @staticmethod
    def _fail(batch: list[tuple[Item, "asyncio.Future[Answer]"]], exc: BaseException) -> None:
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
            log.info("%d %s written in %d batches (%.1f a batch, %.1f ms each)", self.written, self.what,
                     self.batches, self.written / self.batches, 1000 * self.busy_seconds / self.batches)


def serve_first(app: FastAPI, layer: Callable[[ASGIApp], ASGIApp], writer: GroupCommit[Any, Any]) -> None:
    """Put ``layer`` (routes of its own) around ``app``'s middleware stack, before Starlette's
    middleware and routing, and drain ``writer`` when the app shuts down. Call it before
    ``install_security``, which must wrap what this adds."""
    build = app.build_middleware_stack

    def build_with_layer() -> ASGIApp:
        return layer(build())

    app.build_middleware_stack = build_with_layer  # type: ignore[method-assign]  # wraps Starlette's own stack
    previous = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> Any:
        async with previous(application) as state:
            try:
                yield state
            finally:
                await writer.close()

    app.router.lifespan_context = lifespan
