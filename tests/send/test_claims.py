"""The ledger decides every race: a send key is claimed by exactly one run."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta, timezone

import pytest
from sqlalchemy import Engine, event, select, text
from sqlmodel import Session

from flows import consent
from flows.send import claims as ledger
from models import Send, SendStatus, Suppression, SuppressionReason
from models.types import utcnow
from tests.support.builders import NOW, Store
from tests.support.ledger import status_of


def claims(customer_id: int, count: int) -> list[ledger.Claim]:
    return [ledger.Claim(f"t/{customer_id}/occ-{i}", "t", customer_id, f"occ-{i}", "new", "tpl", "a@example.de",
                         f"<{i}@x>") for i in range(count)]


def test_two_runs_claiming_the_same_keys_at_once_split_them_without_overlap(store: Store) -> None:
    customer = store.customer()
    wanted = claims(customer.id, 200)
    won: dict[str, set[str]] = {}
    barrier = threading.Barrier(2)

    def run(name: str) -> None:
        barrier.wait()
        won[name] = set()
        for i in range(0, len(wanted), 20):
            won[name] |= ledger.claim(store.engine, wanted[i:i + 20], name, NOW)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won["a"].isdisjoint(won["b"])
    assert won["a"] | won["b"] == {c.send_key for c in wanted}


def test_a_window_handed_over_goes_straight_to_sending_and_only_its_winner_sends(store: Store) -> None:
    customer = store.customer()
    wanted = claims(customer.id, 3)
    assert ledger.claim(store.engine, wanted[:1], "other-run", NOW) == {wanted[0].send_key}
    assert ledger.hand_over(store.engine, wanted, "run", NOW) == {c.send_key for c in wanted[1:]}
    assert ledger.hand_over(store.engine, wanted, "third-run", NOW, lease=timedelta(0)) == {wanted[0].send_key}
    with Session(store.engine) as session:
        rows = dict(session.execute(select(Send.send_key, Send.status)).all())
    assert set(rows.values()) == {SendStatus.SENDING}  # a crash now leaves them in doubt, never resent
    assert ledger.hand_over(store.engine, wanted, "fourth-run", NOW, lease=timedelta(0)) == set()


def test_a_claim_stores_every_field_as_given_and_its_moment_in_utc(store: Store) -> None:
    customer = store.customer()
    claim = ledger.Claim("t/1/cart", "t", customer.id, "cart", "active", "cart.html", "a@example.de", "<1@x>",
                         category="transactional", ref_id=42)
    evaluated_at = NOW.astimezone(timezone(timedelta(hours=-5)))  # the same moment, another zone
    assert ledger.claim(store.engine, [claim], "run-1", evaluated_at) == {"t/1/cart"}
    with Session(store.engine) as session:
        send = session.exec(select(Send)).scalars().one()
    assert (send.send_key, send.trigger, send.customer_id, send.occurrence, send.stage, send.template, send.email,
            send.message_id, send.category, send.ref_id, send.status, send.run_id) == (
        "t/1/cart", "t", customer.id, "cart", "active", "cart.html", "a@example.de", "<1@x>", "transactional", 42,
        SendStatus.CLAIMED, "run-1")
    assert send.evaluated_at == NOW
    assert (send.smtp_reply, send.error, send.finished_at) == ("", "", None)


def test_recording_marks_sent_and_failed_and_releases_deferred(store: Store) -> None:
    customer = store.customer()
    a, b, c = claims(customer.id, 3)
    assert ledger.claim(store.engine, [a, b, c], "run", NOW) == {a.send_key, b.send_key, c.send_key}
    ledger.record(store.engine, [
        ledger.Decision(a.send_key, SendStatus.SENT, reply="250 ok"),
        ledger.Decision(b.send_key, SendStatus.FAILED, error="550 no such user"),
        ledger.Decision(c.send_key, None),  # the server said "later": release
    ])
    with Session(store.engine) as session:
        rows = {r.send_key: r for r in session.execute(select(Send)).scalars()}
    assert rows[a.send_key].status == "sent" and rows[a.send_key].smtp_reply == "250 ok"
    assert rows[b.send_key].status == "failed" and rows[b.send_key].error == "550 no such user"
    assert c.send_key not in rows
    assert ledger.claim(store.engine, [c], "next-run", NOW) == {c.send_key}  # the next run may try again


def test_in_doubt_lists_claims_left_behind_and_release_frees_them(store: Store) -> None:
    customer = store.customer()
    [stuck] = claims(customer.id, 1)
    assert ledger.hand_over(store.engine, [stuck], "crashed-run", NOW) == {stuck.send_key}  # then it died
    assert ledger.claim(store.engine, [stuck], "second-run", NOW, lease=timedelta(0)) == set()
    assert ledger.in_doubt(store.engine, timedelta(minutes=10)) == []  # a live run may still hold it
    assert [r.send_key for r in ledger.in_doubt(store.engine, timedelta(seconds=-1))] == [stuck.send_key]
    assert ledger.claim(store.engine, [stuck], "second-run", NOW) == set()  # never resent automatically
    assert ledger.release(store.engine, [stuck.send_key]) == 1
    assert ledger.claim(store.engine, [stuck], "second-run", NOW) == {stuck.send_key}


def test_suppress_is_idempotent_and_lower_cases(store: Store) -> None:
    consent.suppress(store.engine, ["Bounce@Example.DE"], SuppressionReason.HARD_BOUNCE, "550")
    consent.suppress(store.engine, ["bounce@example.de"], SuppressionReason.HARD_BOUNCE, "550 again")
    with Session(store.engine) as session:
        rows = session.execute(select(Suppression)).scalars().all()
    assert [(r.email, r.reason, r.detail) for r in rows] == [("bounce@example.de", "hard_bounce", "550")]
    assert rows[0].created_at <= utcnow()


def test_an_address_typed_with_its_unicode_domain_suppresses_the_mailbox_stored_in_ascii(store: Store) -> None:
    """Whoever names the address (an operator, a bounce report), the suppression is the one the run looks up."""
    consent.suppress(store.engine, ["Kunde@Bücher.DE", " kunde@xn--bcher-kva.de"], SuppressionReason.MANUAL)
    with Session(store.engine) as session:
        assert [s.email for s in session.execute(select(Suppression)).scalars()] == ["kunde@xn--bcher-kva.de"]


def test_a_dead_runs_unsent_claims_are_taken_over_once_its_lease_has_passed(store: Store) -> None:
    customer = store.customer()
    [waiting] = claims(customer.id, 1)
    assert ledger.claim(store.engine, [waiting], "run-that-died", NOW) == {waiting.send_key}
    assert ledger.claim(store.engine, [waiting], "next-run", NOW) == set()  # it may still be alive
    assert ledger.claim(store.engine, [waiting], "next-run", NOW, lease=timedelta(0)) == {waiting.send_key}
    assert ledger.claim(store.engine, [waiting], "third-run", NOW) == set()


def test_a_run_that_stalled_past_its_lease_cannot_send_what_another_run_took_over(store: Store) -> None:
    """A claim held past its lease goes to the next run's window, straight to ``sending``;
    the stalled run, waking up, wins nothing (a key being sent is never taken over)."""
    customer = store.customer()
    [key] = claims(customer.id, 1)
    assert ledger.claim(store.engine, [key], "stalled-run", NOW) == {key.send_key}
    assert ledger.hand_over(store.engine, [key], "next-run", NOW) == set()  # its lease has not passed
    assert ledger.hand_over(store.engine, [key], "next-run", NOW, lease=timedelta(0)) == {key.send_key}
    assert ledger.hand_over(store.engine, [key], "stalled-run", NOW, lease=timedelta(0)) == set()  # too late
    assert status_of(store.engine, key.send_key) == SendStatus.SENDING


def test_two_customer_records_of_one_mailbox_cannot_both_claim_an_occurrence(store: Store) -> None:
    """Runs that both decided to mail a shared mailbox, each through its own record, race at
    the claim: the ledger lets one of them win, and a deferral of the loser writes nothing."""
    guest, account = store.customer(email="pat@example.com"), store.customer(email="Pat@Example.com")

    def claim(customer_id: int, email: str, occurrence: str = "slot:1") -> ledger.Claim:
        return ledger.Claim(f"w/{customer_id}/{occurrence}", "w", customer_id, occurrence, "lapsed", "tpl", email,
                            f"<{customer_id}@x>")

    barrier, won = threading.Barrier(2), {}

    def run(c: ledger.Claim) -> None:
        barrier.wait()
        won[c.send_key] = ledger.claim(store.engine, [c], c.send_key, NOW)

    first, second = claim(guest.id, "pat@example.com"), claim(account.id, "Pat@Example.com")
    threads = [threading.Thread(target=run, args=(c,)) for c in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(keys) for keys in won.values()) == [0, 1]
    loser = second if won[first.send_key] else first
    ledger.defer(store.engine, [(loser, NOW + timedelta(hours=1), None)], "r", NOW)
    assert ledger.claim(store.engine, [claim(account.id, "Pat@Example.com", "slot:2")], "r", NOW)  # the next slot
    with Session(store.engine) as session:
        assert sorted(session.execute(select(Send.occurrence, Send.status)).all()) == [
            ("slot:1", SendStatus.CLAIMED), ("slot:2", SendStatus.CLAIMED)]


def test_a_released_claim_of_a_deferral_goes_back_to_being_that_deferral(store: Store) -> None:
    """Relay trouble after the sweep took a deferral over must not lose its moment or its expiry."""
    customer = store.customer()
    [deferral] = claims(customer.id, 1)
    expires = NOW + timedelta(hours=6)
    ledger.defer(store.engine, [(deferral, NOW - timedelta(minutes=5), expires)], "run-1", NOW - timedelta(hours=1))
    assert ledger.claim(store.engine, [deferral], "sweep", NOW) == {deferral.send_key}
    fresh = ledger.Claim(f"t/{customer.id}/other", "t", customer.id, "other", "new", "tpl", "b@example.de", "<f@x>")
    assert ledger.claim(store.engine, [fresh], "sweep", NOW) == {fresh.send_key}
    assert ledger.release(store.engine, [deferral.send_key, fresh.send_key]) == 2
    with Session(store.engine) as session:
        [row] = session.execute(select(Send)).scalars().all()
    assert (row.send_key, row.status, row.expires_at) == (deferral.send_key, SendStatus.DEFERRED, expires)


def sends_window(customer_id: int, count: int) -> list[ledger.Claim]:
    """A window of sends as a win-back campaign writes them: keys, Message-IDs and links of their real length."""
    return [ledger.Claim(f"winback-lapsed/{customer_id}/slot:2026-03-16T12:00:00+00:00#{i}", "winback-lapsed",
                         customer_id, f"slot:2026-03-16T12:00:00+00:00#{i}", "lapsed", "winback_lapsed.html",
                         f"kunde{i}@example.de", f"<{i:032x}@shop.example>",
                         links=("https://shop.example/winback?utm_source=lifecycle", "https://shop.example/account"))
            for i in range(count)]


def decided(window: list[ledger.Claim]) -> list[ledger.Decision]:
    return [ledger.Decision(c.send_key, SendStatus.SENT, reply=f"250 2.0.0 Ok: queued as 4Fq{i:09d}")
            for i, c in enumerate(window)]


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """Every statement the engine sends, an executemany's once per row (the server runs each)."""
    sent: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, parameters: object, _context: object,
              executemany: bool) -> None:
        sent.extend([statement] * (len(parameters) if executemany and isinstance(parameters, list) else 1))

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", count)


def postgres_only(store: Store) -> None:
    if store.engine.dialect.name != "postgresql":
        pytest.skip("a property of PostgreSQL's statements and heap pages")


@pytest.mark.parametrize("size", [2, 200])
def test_a_window_costs_postgresql_two_statements_whatever_its_size(store: Store, size: int) -> None:
    postgres_only(store)
    window = sends_window(store.customer().id, size)
    with statements(store.engine) as sent:
        won = ledger.hand_over(store.engine, window, "run", NOW)
        ledger.record(store.engine, decided(window))
    assert len(won) == size
    assert [s.split()[0] for s in sent if not s.startswith(("BEGIN", "COMMIT"))] == ["INSERT", "UPDATE"]


def test_a_sends_state_changes_update_its_row_in_place_on_postgresql_while_a_run_reads(store: Store) -> None:
    """HOT updates: no indexed column changes, and the page has room for the row's next version
    even while a run's audience stream keeps the old one alive (its read transaction)."""
    postgres_only(store)
    customer = store.customer()
    windows = [sends_window(customer.id, 1000)[i:i + 200] for i in range(0, 1000, 200)]
    fresh_statistics(store.engine)  # the store is handed from test to test: only this test's updates count
    with store.engine.connect() as reader:
        reader.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        reader.execute(text("SELECT count(*) FROM sends")).scalar_one()  # its snapshot, held to the end
        for window in windows:
            ledger.hand_over(store.engine, window, "run", NOW)
            ledger.record(store.engine, decided(window))
        held_out = sends_window(customer.id, 1100)[1000:]
        ledger.hold_out(store.engine, held_out, "run", NOW)
    store.engine.dispose()  # each backend reports its counts as it ends
    assert updates_of_sends(store.engine, 1100) == (1100, 1100)


def fresh_statistics(engine: Engine) -> None:
    """``sends``' counters at zero, after the backends of earlier tests (which report as they
    end, a moment after their client has gone) have had their say."""
    for _ in range(2):
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_stat_reset_single_table_counters('sends'::regclass)"))
        time.sleep(0.5)


def updates_of_sends(engine: Engine, expected: int) -> tuple[int, int]:
    """``(updates, HOT updates)`` of ``sends`` as PostgreSQL's statistics have them, once they
    count ``expected`` updates (backends report theirs shortly after they end)."""
    deadline = time.monotonic() + 10
    while True:
        with engine.connect() as connection:
            done, hot = connection.execute(text(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'sends'")).one()
        if done >= expected or time.monotonic() > deadline:
            return done, hot
        time.sleep(0.1)
