"""Sender processes: each gets the run's context once; batches handed over come back as
outcomes; a sender that cannot start or dies fails the run instead of leaving it waiting."""

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from flows.audience.query import Candidate, stream_candidates
from flows.run_context import RunContext, prepare
from flows.send.senders import SenderDied, SenderPool
from flows.send.smtp import SmtpUnavailable
from flows.settings import Settings
from flows.surfaces.outbox import free_port
from models.db import get_engine
from tests.support.builders import NOW, Store
from tests.support.smtp_server import SmtpServer

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the store is not what is tested here


def children() -> set[int]:
    """This process's child processes, from every thread."""
    found: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            found.update(int(pid) for pid in (task / "children").read_text().split())
        except FileNotFoundError:  # a thread that ended since the listing: it has no children now
            continue
    return found


def wait_until(condition: Callable[[], object], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def due(job: RunContext) -> list[list[Candidate]]:
    engine = get_engine(job.settings.database_url)
    return list(stream_candidates(engine, job.trigger, job.kind, job.stages, job.now, job.settings.batch_size,
                                  job.settings.default_language, job.policy))


def winback(settings: Settings, **update: object) -> RunContext:
    return prepare("winback-lapsed", NOW, settings=settings.model_copy(update={"batch_size": 5, **update}))


def test_batches_come_back_as_outcomes_and_each_mail_arrives_once(settings: Settings, store: Store,
                                                                  smtp: SmtpServer) -> None:
    emails = store.lapsed(12)
    job = winback(settings)
    before = children()
    with SenderPool(job, 2) as senders:
        assert len(children() - before) == 2  # the senders and nothing else (no resource tracker)
        futures = [senders.submit(batch, number) for number, batch in enumerate(due(job), start=1)]
        outcomes = [future.result(timeout=60) for future in futures]
    assert len(outcomes) == 3
    assert sum((outcome.counts for outcome in outcomes), Counter()) == {("lapsed", "sent"): 12}
    received = Counter(r.recipients[0] for r in smtp.received)
    assert set(received) == set(emails) and set(received.values()) == {1}
    assert children() == before  # every sender has exited


def test_senders_get_the_runs_context_once_and_never_read_the_project_again(settings: Settings, store: Store,
                                                                           project_dir: Path, smtp: SmtpServer) -> None:
    store.lapsed(5)
    context = winback(settings)
    trigger_file = next((project_dir / "triggers").glob("winback.yaml"))
    trigger_file.write_text(trigger_file.read_text().replace("kind:", "kind: [", 1))  # broken after the run began
    with SenderPool(context, 1) as senders:
        [batch] = due(context)
        assert senders.submit(batch, 1).result(timeout=60).counts == {("lapsed", "sent"): 5}


def test_a_sender_that_cannot_make_its_context_fails_the_pool_at_start(settings: Settings, store: Store,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    context = winback(settings)
    # What the sender unpickles raises there, in the child: as a context that cannot be rebuilt would.
    monkeypatch.setattr(RunContext, "__reduce__", lambda self: (int, ("not a context",)))
    before = children()
    with pytest.raises(ValueError, match="not a context") as failure, SenderPool(context, 1):
        pytest.fail("the pool started with a sender that has no context")
    assert any("in sender process" in note for note in failure.value.__notes__)
    assert children() == before


def test_an_error_in_a_batch_fails_that_batch_and_the_sender_goes_on(settings: Settings, store: Store,
                                                                     smtp: SmtpServer) -> None:
    store.lapsed(10)
    unreachable = f"smtp://127.0.0.1:{free_port()}?timeout=1"
    first, second = due(winback(settings))
    with (SenderPool(winback(settings, smtp_url=unreachable, smtp_attempts=2), 1) as senders,
          pytest.raises(SmtpUnavailable, match="unreachable after 2 attempts")):
        senders.submit(first, 1).result(timeout=60)
    with SenderPool(winback(settings), 1) as senders:
        assert senders.submit(second, 2).result(timeout=60).counts == {("lapsed", "sent"): 5}
    assert len(smtp.received) == 5


def test_a_killed_sender_fails_its_batch_every_waiting_one_and_later_ones(settings: Settings,
                                                                         store: Store) -> None:
    store.lapsed(15)
    slow = SmtpServer(data_delay=0.5).start()
    try:
        job = winback(settings, smtp_url=slow.url, in_flight=1)
        batches = due(job)
        before = children()
        with pytest.raises(SenderDied, match="killed by signal 9"), SenderPool(job, 1) as senders:
            [sender] = children() - before
            futures = [senders.submit(batch, number) for number, batch in enumerate(batches, start=1)]
            wait_until(lambda: slow.received)  # the first batch is being sent
            os.kill(sender, signal.SIGKILL)
            for future in futures:
                with pytest.raises(SenderDied, match=f"sender process {sender} was killed by signal 9"):
                    future.result(timeout=60)
            senders.submit(batches[0], 4).result(timeout=1)
    finally:
        slow.stop()
    assert children() == before


def test_a_ctrl_c_lets_a_sender_finish_its_batch(settings: Settings, store: Store) -> None:
    """SIGINT reaches the terminal's whole process group; the run, not the sender, decides."""
    emails = store.lapsed(5)
    slow = SmtpServer(data_delay=0.2).start()
    try:
        job = winback(settings, smtp_url=slow.url, in_flight=1)
        [batch] = due(job)
        before = children()
        with SenderPool(job, 1) as senders:
            [sender] = children() - before
            future = senders.submit(batch, 1)
            wait_until(lambda: slow.received)
            os.kill(sender, signal.SIGINT)
            assert future.result(timeout=60).counts == {("lapsed", "sent"): 5}
    finally:
        slow.stop()
    assert sorted(r.recipients[0] for r in slow.received) == sorted(emails)
