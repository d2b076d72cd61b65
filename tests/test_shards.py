"""A pass in slices at once: every due mail sent once, the slices' summaries adding up to the
whole pass's, a journey's steps sliced alike, a killed slice failing the run with nothing
twice on the rerun, a shutdown and a Ctrl-C reaching every slice; a run with its own steps,
and the deferred sweep, in one process."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from sqlmodel import Session, col, select

from flows.audience.shards import spread
from flows.outcomes import Outcome
from flows.run import execute, run
from flows.run_context import RunContext, prepare
from flows.send.batch import dispatch_prepared
from flows.settings import Settings
from flows.shards import ShardFailed
from flows.summary import RunSummary
from models import Customer
from tests.send.test_senders import children, wait_until
from tests.support.builders import NOW, Store, ago
from tests.support.children import child_env
from tests.support.ledger import addresses
from tests.support.smtp_server import SmtpServer


def sliced(settings: Settings, shards: int, trigger: str = "winback-lapsed", dry_run: bool = False,
           **update: object) -> RunContext:
    return prepare(trigger, NOW, settings=settings.model_copy(update={"batch_size": 4, "workers": shards, **update}),
                   dry_run=dry_run, shards=shards)


def test_a_sliced_run_sends_each_due_mail_once_and_counts_as_the_whole_pass(
        settings: Settings, store: Store, smtp: SmtpServer, capfd: pytest.CaptureFixture[str]) -> None:
    emails = store.lapsed(30)
    family = store.customer("Familie", email="Familie@Example.de")  # two records, one mailbox: one mail
    store.order(family, ago(days=500))
    twin = store.customer("Familie", email="familie@example.de")
    store.order(twin, ago(days=500))
    whole = execute(sliced(settings, 1, dry_run=True))  # what one process would decide
    assert whole.outcomes[Outcome.WOULD_SEND] == 31 and whole.outcomes[Outcome.DUPLICATE_ADDRESS] == 1

    summary = run(sliced(settings, 3))

    assert summary.counts == Counter({(stage, Outcome.SENT if outcome is Outcome.WOULD_SEND else outcome): n
                                      for (stage, outcome), n in whole.counts.items()})
    received = Counter(r.recipients[0].lower() for r in smtp.received)
    assert set(received) == {*emails, "familie@example.de"} and set(received.values()) == {1}
    logged = capfd.readouterr().err
    assert "shard 2/3" in logged and "shard 3/3" in logged  # the other slices ran in their own processes
    again = run(sliced(settings, 3))
    assert again.outcomes[Outcome.SENT] == 0 and again.outcomes[Outcome.ALREADY_SENT] == 31


def test_a_sliced_dry_run_predicts_the_whole_one(settings: Settings, store: Store) -> None:
    store.lapsed(17)
    whole = execute(sliced(settings, 1, dry_run=True))
    parts = execute(sliced(settings, 4, dry_run=True))
    assert parts.counts == whole.counts and parts.counts
    assert len(parts.planned) == len(whole.planned)


def test_a_journey_runs_every_step_in_slices(settings: Settings, store: Store, smtp: SmtpServer) -> None:
    carts = []
    for i in range(9):
        customer = store.customer(f"Cart{i}", email=f"cart{i}@example.de")
        store.cart(customer, ago(hours=3))
        carts.append(customer)
    store.order(carts[0], ago(hours=1))  # ordered: no further mail

    def step(at: timedelta, shards: int) -> RunSummary:
        context = prepare("abandoned-cart", NOW + at, settings=settings.model_copy(
            update={"batch_size": 2, "workers": shards}), shards=shards)
        return run(context)

    first = step(timedelta(0), 3)
    assert first.steps["reminder"] == {Outcome.SENT: 8}
    second = step(timedelta(hours=24), 3)
    assert second.steps["nudge"] == {Outcome.SENT: 8}
    received = Counter(r.recipients[0] for r in smtp.received)
    assert set(received.values()) == {2} and len(received) == 8  # two steps each, once


def test_a_killed_slice_fails_the_run_and_the_rerun_sends_nothing_twice(settings: Settings, store: Store) -> None:
    emails = set(store.lapsed(40))
    slow = SmtpServer(data_delay=0.05).start()
    failed: list[BaseException] = []
    try:
        context = sliced(settings, 2, smtp_url=slow.url, in_flight=1)
        before = children()

        def go() -> None:
            try:
                run(context)
            except BaseException as error:  # noqa: BLE001 - the test asserts on it
                failed.append(error)

        runner = threading.Thread(target=go)
        runner.start()
        wait_until(lambda: children() - before and len(slow.received) >= 2)
        [other] = children() - before
        os.kill(other, signal.SIGKILL)
        runner.join(120)
        assert not runner.is_alive()
        [error] = failed
        assert isinstance(error, ShardFailed) and "shard 2/2" in str(error) and "killed by signal 9" in str(error)

        time.sleep(0.2)
        rerun = settings.model_copy(update={"smtp_url": slow.url, "claim_lease_seconds": 0})
        run(sliced(rerun, 2))
    finally:
        slow.stop()
    received = Counter(r.recipients[0] for r in slow.received)
    in_doubt = addresses(store.engine, "sending")
    assert set(received.values()) == {1}  # nobody twice
    assert set(received) | in_doubt == emails  # nobody lost but the one in doubt, listed for ops
    assert len(in_doubt) <= 1  # in_flight=1: at most the one on the wire at the kill


def test_a_shutdown_reaches_every_slice_and_the_next_run_carries_on(settings: Settings, store: Store) -> None:
    emails = set(store.lapsed(80))
    with Session(store.engine) as session:
        slice_of = {email: spread(customer_id) % 2 for customer_id, email in session.exec(
            select(col(Customer.id), col(Customer.email))).all()}
    slow = SmtpServer(data_delay=0.1).start()  # 40 a slice: 4 s each, at least
    try:
        stop, summaries = threading.Event(), []
        runner = threading.Thread(target=lambda: summaries.append(execute(
            sliced(settings, 2, smtp_url=slow.url, in_flight=1), should_stop=stop.is_set)))
        runner.start()
        wait_until(lambda: {slice_of[r.recipients[0]] for r in slow.received} == {0, 1})  # both slices sending
        stop.set()
        runner.join(120)
        [summary] = summaries
        assert summary.interrupted
        sent = Counter(slice_of[r.recipients[0]] for r in slow.received)
        assert 0 < sent[0] < 40 and 0 < sent[1] < 40  # each slice stopped between its batches
        execute(sliced(settings, 2, smtp_url=slow.url))
    finally:
        slow.stop()
    received = Counter(r.recipients[0] for r in slow.received)
    assert set(received) == emails and set(received.values()) == {1}


def test_a_run_with_its_own_dispatch_step_stays_in_one_process(
        settings: Settings, store: Store, smtp: SmtpServer, capfd: pytest.CaptureFixture[str]) -> None:
    """The other slices would send through the real steps, around the caller's."""
    emails = store.lapsed(12)
    seen: list[str] = []

    def dispatch(context: RunContext, prepared: list, batch: int = 0) -> object:
        seen.extend(p.candidate.email for p in prepared)
        return dispatch_prepared(context, prepared, batch=batch)

    summary = execute(sliced(settings, 3, workers=1), dispatch=dispatch)  # no senders either
    assert summary.outcomes[Outcome.SENT] == 12 and sorted(seen) == sorted(emails)  # every mail through it
    assert "shard 2/3" not in capfd.readouterr().err


def test_the_deferred_sweep_is_not_sliced(settings: Settings, store: Store, capfd: pytest.CaptureFixture[str]) -> None:
    store.lapsed(6)
    execute(sliced(settings, 3), audience=False)
    assert "shard 2/3" not in capfd.readouterr().err
    with pytest.raises(ValueError, match="shards must be from 1 to 64"):
        prepare("winback-lapsed", NOW, settings=settings, shards=0)


CTRL_C = """
import sys
from datetime import datetime
from flows.run import execute
from flows.run_context import prepare
from flows.surfaces.environment import settings_from_environment
execute(prepare("winback-lapsed", datetime.fromisoformat(sys.argv[1]), settings=settings_from_environment(), shards=2))
"""


def test_a_ctrl_c_lets_every_slice_finish_its_batch_and_the_rerun_sends_the_rest(
        settings: Settings, store: Store) -> None:
    emails = set(store.lapsed(60))
    with Session(store.engine) as session:
        slice_of = {email: spread(customer_id) % 2 for customer_id, email in session.exec(
            select(col(Customer.id), col(Customer.email))).all()}
    slow = SmtpServer(data_delay=0.05).start()
    try:
        run_settings = settings.model_copy(update={"smtp_url": slow.url, "batch_size": 4, "workers": 2, "in_flight": 1})
        child = subprocess.Popen([sys.executable, "-c", CTRL_C, NOW.isoformat()], env=child_env(run_settings),
                                 stderr=subprocess.PIPE, text=True)
        wait_until(lambda: {slice_of[r.recipients[0]] for r in slow.received} == {0, 1})  # both slices sending
        os.kill(child.pid, signal.SIGINT)  # as a terminal's Ctrl-C reaches the run
        _, err = child.communicate(timeout=120)
        assert child.returncode != 0 and "KeyboardInterrupt" in err
        sent = Counter(slice_of[r.recipients[0]] for r in slow.received)
        assert 0 < sent[1] < 30  # the other slice stopped between its batches, not at the end
        assert not set(addresses(store.engine, "sending")) & {e for e, s in slice_of.items() if s == 1}
        run(sliced(settings.model_copy(update={"smtp_url": slow.url, "claim_lease_seconds": 0}), 2))
    finally:
        slow.stop()
    received = Counter(r.recipients[0] for r in slow.received)
    in_doubt = addresses(store.engine, "sending")
    assert set(received.values()) == {1}
    assert set(received) | in_doubt == emails and len(in_doubt) <= 1  # at most the run's own one on the wire
