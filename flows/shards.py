"""Shard processes: a large pass reads, classifies and sends its audience in slices at once.

One process reads an audience at about one core's pace: at a million customers, reading and
classifying the rows is most of a pass, and sender processes cannot help with it. A
trigger with ``shards: N`` (or ``lifecycle run --shards N``) splits each pass into N
slices of its customers (``flows.audience.shards``): the run's own process takes the first,
and N - 1 fresh interpreters take one each, all at once. Each slice is a whole pass over
its customers, exactly as an unsharded pass is over all of them: the same query with the
slice's predicate, the same ledger claims before every send, its own deferrals closed. So
exactly-once is unchanged, and the slices' summaries add up to the pass's.

A shard process is started like a sender (``flows.send.senders.spawn``): it receives its
context once, dies with the run, and is asked to stop between batches when the run is
(graceful shutdown). It sends through the real steps; a caller's own render and dispatch
steps (the Prefect tasks, a test's) apply to the run's own slice.
"""

import importlib
import logging
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from flows.run_context import RunContext
from flows.send.senders import die_with_parent, portable, spawn

if TYPE_CHECKING:
    import subprocess
    from multiprocessing.connection import Connection


log = logging.getLogger("lifecycle")


class ShardFailed(RuntimeError):
    """A shard process failed, or ended without its summary."""


def serve(requests_fd: int, replies_fd: int) -> None:
    """A shard process's life: receive what to run (``module:function``) and the slice's
    context, run it, reply its result."""
    from multiprocessing.connection import Connection

    from flows.memory import one_malloc_arena
    from flows.redaction import redact_every_record

    requests, replies = Connection(requests_fd, writable=False), Connection(replies_fd, readable=False)
    # Ctrl-C reaches the terminal's whole process group, and systemd's SIGTERM every process
    # of the service: only the run decides, and says so (or dies, and closes the pipe).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    one_malloc_arena()
    die_with_parent(requests.recv())
    stop = threading.Event()
    try:
        job: str = requests.recv()
        context: RunContext = requests.recv()
        audience: bool = requests.recv()
        label = context.shard.label if context.shard is not None else "?"
        redact_every_record()  # no password or token in any record, as in the run's own process
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s shard {label} %(levelname)s %(message)s"))
        lifecycle = logging.getLogger("lifecycle")
        lifecycle.addHandler(handler)
        lifecycle.setLevel(logging.INFO)

        def listen() -> None:
            try:
                requests.recv()  # the only message after the context: stop
            except EOFError:  # the run is gone (or gave up on this slice): stop all the same
                pass
            stop.set()

        threading.Thread(target=listen, name="shard-stop", daemon=True).start()
        module, _, name = job.partition(":")
        work = getattr(importlib.import_module(module), name)
        replies.send(("done", work(context, audience=audience, should_stop=stop.is_set)))
    except BaseException as error:  # noqa: BLE001 - reported to the run, which fails with it
        replies.send(("failed", portable(error, "shard")))


class ShardProcess:
    """One slice's pass in its own process: started first (an interpreter takes a while to
    start), then given its work; ``result()`` waits for it."""

    def __init__(self) -> None:
        self.label = "?"
        self.process: subprocess.Popen[bytes]
        self._requests: Connection
        self.process, self._requests, self._replies = spawn("flows.shards")

    def start(self, job: str, context: RunContext, audience: bool) -> None:
        self.label = context.shard.label if context.shard is not None else "?"
        try:
            for message in (job, context, audience):
                self._requests.send(message)
        except OSError:  # it died at start: result() says how
            pass

    def stop(self) -> None:
        """Ask the slice to stop between batches (it finishes the batch it has)."""
        try:
            self._requests.send("stop")
        except OSError:  # it has ended already
            pass

    def result(self) -> Any:
        """The slice's result; ``ShardFailed`` if it failed or died. A Ctrl-C while waiting asks
        it to stop and leaves it to be waited for again."""
        try:
            reply = self._replies.recv()
        except EOFError:
            reply = None
        except KeyboardInterrupt:
            self.stop()
            raise
        self._requests.close()
        code = self.process.wait()
        self._replies.close()
        if reply is None:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            raise ShardFailed(f"shard {self.label} (process {self.process.pid}) {how} before it finished")
        status, detail = reply
        if status == "failed":
            raise ShardFailed(f"shard {self.label} failed: {detail}") from detail
        return detail


T = TypeVar("T")


def run_slices(count: int, contexts: Callable[[], list[RunContext]], here: Callable[[RunContext], T],
               should_stop: Callable[[], bool], audience: bool = True,
               job: str = "flows.run:execute_slice") -> list[T]:
    """The slices of one pass at once: ``count - 1`` shard processes started, then the
    slices' ``contexts`` made (meanwhile they start), the first run by ``here`` in this
    process and each other one by ``job`` in its own; their results in order. A failed
    slice fails the run once every other slice is done (what they sent stays sent: each
    send was claimed in the ledger)."""
    others = [ShardProcess() for _ in range(count - 1)]
    finished = threading.Event()

    def relay_stop() -> None:  # a shutdown reaches every slice, not only the one run here
        while not finished.wait(0.2):
            if should_stop():
                for other in others:
                    other.stop()
                return

    outcomes: list[T | BaseException] = []
    relay = threading.Thread(target=relay_stop, name="shard-stop-relay", daemon=True)
    try:
        made = contexts()
        assert len(made) == count
        for other, context in zip(others, made[1:], strict=True):
            other.start(job, context, audience)
        relay.start()
        try:
            outcomes.append(here(made[0]))
        except BaseException as error:  # noqa: BLE001 - Ctrl-C too: the others stop between batches first
            for other in others:
                other.stop()
            outcomes.append(error)
        for other in others:
            outcomes.append(_wait(other, others))
    finally:
        finished.set()
        if relay.is_alive():
            relay.join()
        for other in others:  # only on a second Ctrl-C: a slice that outlives the run would go on sending
            if other.process.poll() is None:
                other.process.kill()
                other.process.wait()
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    for failure in failures[1:]:
        log.error("Also failed: %s", failure)
    if failures:
        raise failures[0]
    return cast(list[T], outcomes)


def _wait(other: ShardProcess, others: list[ShardProcess]) -> Any:
    """A slice's result or failure; a Ctrl-C meanwhile asks every slice to stop and waits on."""
    try:
        return other.result()
    except ShardFailed as error:
        return error
    except KeyboardInterrupt as error:
        for each in others:
            each.stop()
        try:
            other.result()
        except ShardFailed:
            pass
        return error
