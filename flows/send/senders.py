"""Sender processes: a large run renders and sends on every core.

Rendering, MIME and the SMTP client are CPU-bound Python, so one process sends on one
core. A run with more than one batch starts ``LIFECYCLE_WORKERS - 1`` sender
processes (the run's own process is the last of the workers; default: one per core),
hands each a batch at a time and merges what they report. Each sender runs
``send.batch.deliver`` exactly as the run's own process would: it claims every key in
the shared ledger before sending it, so splitting the work across processes changes
nothing about exactly-once.

A sender is a fresh interpreter (the flow's process has Prefect's threads running,
which ``fork`` must not copy) that imports no Prefect, receives the run's context once
(``flows.run_context``: it compiles the same templates, without validating them again),
and dies with its parent: a killed run leaves no orphan sending. Batches and
outcomes travel as pickles over a pair of pipes. ``multiprocessing``'s own pools would
do the same but start a resource-tracker process besides (13 MB, a twentieth of a run's
memory) to clean up the named semaphores their queues use; pipes need none.
"""

import ctypes
import gc
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from flows.audience.query import Candidate
from flows.memory import one_malloc_arena
from flows.message.prepare import render_candidates
from flows.run_context import RunContext
from flows.send.batch import BatchOutcome, Rendered, send_rendered

_PR_SET_PDEATHSIG = 1


class SenderDied(RuntimeError):
    """A sender process ended while it had a batch, or before it was ready."""


def die_with_parent(parent: int) -> None:
    """Linux kills this process when the thread that started it ends (SIGKILL included)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: rely on the closed pipe
        pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def portable(error: BaseException, role: str = "sender") -> BaseException:
    """The error as the flow's process can unpickle it, with the child's traceback as a note."""
    error.add_note("".join(traceback.format_exception(error)).rstrip() + f"\n(in {role} process {os.getpid()})")
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - an exception that does not survive a pickle
        return RuntimeError("".join(traceback.format_exception(error)).rstrip())


def serve(requests_fd: int, replies_fd: int) -> None:
    """A sender process's life: receive the run's context, then deliver each batch handed
    over until the run closes the pipe."""
    requests, replies = Connection(requests_fd, writable=False), Connection(replies_fd, readable=False)
    # A Ctrl-C reaches the terminal's whole process group. Only the run decides: it stops
    # handing over batches, and a sender finishes the one it has rather than leave its
    # recipients in doubt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    one_malloc_arena()
    parent = requests.recv()
    die_with_parent(parent)
    try:
        context: RunContext = requests.recv()  # its catalog and engine made here (RunContext.__reduce__)
        # What the first batch would build, built now so the freeze below keeps it out of the
        # collector's scans: the compiled templates, and the store's dialect and first connection.
        context.catalog.compile(context.email)
        with context.engine.connect():
            pass
    except BaseException as error:  # noqa: BLE001 - reported to the run, which fails with it
        replies.send(("failed", portable(error)))
        return
    gc.freeze()  # what the sender starts with stays out of the collector's scans (see flows.memory)
    replies.send(("ready", os.getpid()))
    rendered: queue.Queue[tuple[int, Future[Rendered]] | None] = queue.Queue()
    with ThreadPoolExecutor(1, thread_name_prefix="render") as renderer:
        threading.Thread(target=_receive_and_render, args=(requests, renderer, context, rendered),
                         name="receive", daemon=True).start()
        while (item := rendered.get()) is not None:
            batch, rendering = item
            try:
                replies.send(("done", send_rendered(context, *rendering.result(), batch)))
            except Exception as error:  # noqa: BLE001 - the run fails the batch with it
                replies.send(("failed", portable(error)))


def _receive_and_render(requests: Connection, renderer: ThreadPoolExecutor, context: RunContext,
                        rendered: "queue.Queue[tuple[int, Future[Rendered]] | None]") -> None:
    """Each batch as it arrives, rendering at once (in the render thread) while the one
    before it is on the wire: a relay far away waits on round trips, not on the CPU, and
    the connections would idle while the next batch renders."""
    while True:
        try:
            candidates, batch = requests.recv()
        except EOFError:  # the run is done with this sender
            rendered.put(None)
            return
        rendered.put((batch, renderer.submit(render_candidates, context, candidates, batch=batch)))


def spawn(module: str) -> tuple[subprocess.Popen[bytes], Connection, Connection]:
    """A fresh interpreter running ``module.serve(requests, replies)`` over a pair of pipes,
    told this process's pid first (it dies with this process: ``die_with_parent``)."""
    requests_in, requests_out = os.pipe()  # the run writes, the child reads
    replies_in, replies_out = os.pipe()  # the child writes, the run reads
    code = f"from {module} import serve; serve({requests_in}, {replies_out})"
    process = subprocess.Popen(
        [sys.executable, *subprocess._args_from_interpreter_flags(), "-c", code],  # type: ignore[attr-defined]  # private, undeclared
        pass_fds=(requests_in, replies_out),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},  # what the run imports, it imports
    )
    os.close(requests_in)
    os.close(replies_out)
    requests, replies = Connection(requests_out, readable=False), Connection(replies_in, writable=False)
    requests.send(os.getpid())
    return process, requests, replies


_Work = tuple["Future[BatchOutcome]", list[Candidate], int] | None  # None: no more batches for this sender
_AHEAD = 2  # batches in a sender's pipe at once: the one it sends, the one it renders meanwhile
_POLL = 0.02  # seconds between looks for a second batch to hand a busy sender


class _Sender:
    """One sender process and the thread in the run's process that feeds it a batch at a time."""

    def __init__(self, context: bytes) -> None:
        self.process, self._requests, self._replies = spawn("flows.send.senders")
        self._requests.send_bytes(context)
        self.thread: threading.Thread | None = None

    def ready(self) -> None:
        """Wait until the sender has its context; raise what stopped it if it could not."""
        status, detail = self._receive("before it was ready")
        if status == "failed":
            raise detail

    def feed(self, work: "queue.Queue[_Work]", on_death: Callable[[SenderDied], None]) -> None:
        """Hand this sender the queue's batches (its thread's body), two at a time in its
        pipe: it renders the second while it sends the first (``serve``)."""
        handed: deque[tuple[Future[BatchOutcome], int]] = deque()  # in the pipe, oldest first
        ending = False
        while handed or not ending:
            while not ending and len(handed) < _AHEAD:
                try:
                    item = work.get() if not handed else work.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    ending = True
                    break
                future, candidates, batch = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    self._requests.send((candidates, batch))  # pickled whole before the first byte is written
                except OSError:
                    self._fail(future, handed, self._died(f"while it was sending batch {batch}"), on_death)
                    return
                except Exception as error:  # noqa: BLE001 - a batch that does not pickle
                    future.set_exception(error)
                    continue
                handed.append((future, batch))
            if not handed:
                continue
            if len(handed) < _AHEAD and not ending and not self._replies.poll(_POLL):
                continue  # the sender is on its batch: look for another to hand it meanwhile
            future, batch = handed.popleft()
            try:
                status, detail = self._receive(f"while it was sending batch {batch}")
            except SenderDied as death:
                self._fail(future, handed, death, on_death)
                return
            if status == "done":
                future.set_result(detail)
            else:
                future.set_exception(detail)
        self.close()

    def _fail(self, future: "Future[BatchOutcome]", handed: deque[tuple["Future[BatchOutcome]", int]],
              death: SenderDied, on_death: Callable[[SenderDied], None]) -> None:
        """The sender died: its batches fail, and so does every batch still waiting."""
        for each in (future, *(f for f, _ in handed)):
            each.set_exception(death)
        on_death(death)
        self.close()

    def close(self) -> None:
        self._requests.close()  # the sender reads the end of its pipe and exits
        self.process.wait()
        self._replies.close()

    def _receive(self, when: str) -> tuple[str, Any]:
        try:
            reply: tuple[str, Any] = self._replies.recv()
            return reply
        except EOFError:
            raise self._died(when) from None

    def _died(self, when: str) -> SenderDied:
        code = self.process.wait()
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return SenderDied(f"sender process {self.process.pid} {how} {when}")


class SenderPool:
    """``with SenderPool(context, 2) as senders: senders.submit(candidates, batch).result()``.

    Batches wait in one queue and go to whichever sender is free. If a sender dies, its
    batch and every batch still waiting fail with ``SenderDied``, and so does any later
    ``submit``: the run fails instead of waiting for a sender that is gone.
    """

    def __init__(self, context: RunContext, workers: int) -> None:
        self.workers = workers
        self._context = pickle.dumps(context)  # once, for every sender
        self._work: queue.Queue[_Work] = queue.Queue()
        self._senders: list[_Sender] = []
        self._lock = threading.Lock()
        self._broken: SenderDied | None = None

    def __enter__(self) -> "SenderPool":
        # Start every sender now, from this thread: the run's thread lives as long as the
        # run, and a sender dies with the thread that started it.
        try:
            for _ in range(self.workers):
                self._senders.append(_Sender(self._context))
            for sender in self._senders:
                sender.ready()  # a sender that could not make its context fails the run here
        except BaseException:
            for sender in self._senders:
                sender.process.kill()
                sender.close()
            raise
        for sender in self._senders:
            sender.thread = threading.Thread(target=sender.feed, args=(self._work, self._fail_waiting),
                                             name=f"sender-{sender.process.pid}", daemon=True)
            sender.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        # On failure, batches not yet started are dropped (their keys were never claimed).
        if error is not None:
            self._cancel_waiting()
        for _ in self._senders:
            self._work.put(None)
        for sender in self._senders:
            assert sender.thread is not None
            sender.thread.join()

    def submit(self, candidates: Sequence[Candidate], batch: int) -> "Future[BatchOutcome]":
        future: Future[BatchOutcome] = Future()
        with self._lock:
            if self._broken is not None:
                future.set_exception(self._broken)
            else:
                self._work.put((future, list(candidates), batch))
        return future

    def _fail_waiting(self, death: SenderDied) -> None:
        with self._lock:
            self._broken = death
            for future in self._drain():
                if future.set_running_or_notify_cancel():
                    future.set_exception(death)

    def _cancel_waiting(self) -> None:
        with self._lock:
            for future in self._drain():
                future.cancel()

    def _drain(self) -> list["Future[BatchOutcome]"]:
        """Take every waiting batch off the queue; the senders' ends of work stay on it."""
        drained: list[Future[BatchOutcome]] = []
        ends = 0
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item is None:
                ends += 1
            else:
                drained.append(item[0])
        for _ in range(ends):
            self._work.put(None)
        return drained
