"""Sender processes: a large run renders and sends on every core.

Rendering, MIME and the SMTP client are CPU-bound Python, so one process sends on one
core. A run with more than one batch starts ``LIFECYCLE_WORKERS - 1`` sender
processes (the run's own process is the last of the workers; default: one per core),
hands each a batch at a time and merges what they report. Each sender runs
``delivery.deliver`` exactly as the flow's own process would: it claims every key in
the shared ledger before sending it, so splitting the work across processes changes
nothing about exactly-once.

Senders are started with ``spawn`` (the flow's process has Prefect's threads running,
which ``fork`` must not copy), import no Prefect (less memory), load the same trigger
files and templates, and die with their parent: a killed run leaves no orphan sending.
"""

import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from datetime import datetime
from types import ModuleType, TracebackType

from flows.audience import Candidate
from flows.delivery import BatchOutcome, Job, deliver, prepare_job
from flows.settings import Settings

_PR_SET_PDEATHSIG = 1
_job: Job | None = None  # the sender process's own copy of the run's job


def _die_with_parent(parent: int) -> None:
    """Linux kills this process when the thread that started it ends (SIGKILL included)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: rely on the closed task queue
        pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _start(trigger: str, now: datetime, settings: Settings, run_id: str, parent: int) -> None:
    _die_with_parent(parent)
    global _job
    # Each sender loads and compiles the templates itself: compiled Jinja does not pickle.
    _job = prepare_job(trigger, now, settings=settings, run_id=run_id)
    gc.freeze()  # what the sender starts with stays out of the collector's scans (see flows.collector)


def _ready() -> int:
    return os.getpid()


_starting = threading.Lock()


@contextmanager
def _main_hidden() -> Iterator[None]:
    """Start senders without the parent's ``__main__``.

    ``spawn`` re-runs the parent's main module in every child. That module is a
    worker's entry point or a script that imports the flow, so each sender would
    import Prefect for nothing (about 40 MB each). Senders need only this module.
    """
    with _starting:
        main = sys.modules["__main__"]
        sys.modules["__main__"] = ModuleType("__main__")
        try:
            yield
        finally:
            sys.modules["__main__"] = main


def _deliver(candidates: Sequence[Candidate], batch: int) -> BatchOutcome:
    assert _job is not None, "sender process started without a job"
    return deliver(_job, candidates, batch)


class SenderPool:
    """``with SenderPool(job, 2) as senders: senders.submit(candidates, batch).result()``."""

    def __init__(self, job: Job, workers: int) -> None:
        self.workers = workers
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(job.trigger.name, job.now, job.settings, job.run_id, os.getpid()),
        )

    def __enter__(self) -> "SenderPool":
        # Start every sender now, from this thread: the run's thread lives as long as the
        # run, and a sender dies with the thread that started it.
        with _main_hidden():  # each submit below starts one sender
            started = [self._executor.submit(_ready) for _ in range(self.workers)]
        done, _ = wait(started)
        for future in done:
            future.result()  # a sender that could not load the project fails the run here
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        # On failure, batches not yet started are dropped (their keys were never claimed).
        self._executor.shutdown(wait=True, cancel_futures=error is not None)

    def submit(self, candidates: Sequence[Candidate], batch: int) -> "Future[BatchOutcome]":
        return self._executor.submit(_deliver, list(candidates), batch)

