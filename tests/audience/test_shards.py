"""A run's audience in slices: every customer in exactly one, the records that share a mailbox
in the same one, and the SQL slice the same as the Python one."""

from collections import Counter
from typing import Any

import pytest
from sqlalchemy import BigInteger, literal
from sqlmodel import Session, col, select

from flows.audience.query import shared_records, stream_candidates
from flows.audience.shards import Shard, split
from flows.kinds import KINDS
from flows.outcomes import Outcome
from flows.send import claims
from models import Customer
from tests.audience.test_query import RULES, spec
from tests.support.builders import NOW, Store, ago


def quiet_store(store: Store) -> list[Customer]:
    """Twenty quiet customers (the win-back's audience), among them two records of one mailbox
    (spelt differently), one without an address and one without consent."""
    people = [store.customer(f"K{i}", last_seen=ago(days=60)) for i in range(16)]
    people.append(store.customer("Familie", email="Familie@Example.de", last_seen=ago(days=60)))
    people.append(store.customer("Familie", email="familie@example.de", last_seen=ago(days=61)))
    people.append(store.customer("Ohne", email=None, last_seen=ago(days=60)))
    people.append(store.customer("Nein", consent=False, last_seen=ago(days=60)))
    return people


def decided(store: Store, trigger: Any, shard: Shard | None) -> dict[int, Outcome | None]:
    batches = stream_candidates(store.engine, trigger, KINDS[trigger.kind], RULES, NOW, 3, "en", shard=shard)
    return {c.customer_id: c.skip for batch in batches for c in batch}


def split_store(store: Store, count: int) -> list[Shard]:
    with store.engine.connect() as connection:
        return split(count, *shared_records(connection))


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_the_slices_hold_each_customer_once_and_decide_as_the_whole_audience(store: Store, count: int) -> None:
    people = quiet_store(store)
    trigger = spec("inactivity", inactive_for="30d")
    whole = decided(store, trigger, None)
    assert len(whole) == len(people)
    shards = split_store(store, count)
    parts = [decided(store, trigger, shard) for shard in shards]

    seen = Counter(customer for part in parts for customer in part)
    assert set(seen) == set(whole) and set(seen.values()) == {1}
    assert {k: v for part in parts for k, v in part.items()} == whole  # the same skips, the duplicate one too
    assert Counter(whole.values())[Outcome.DUPLICATE_ADDRESS] == 1


def test_records_sharing_a_mailbox_are_all_in_the_first_slice(store: Store) -> None:
    people = quiet_store(store)
    family = [p.id for p in people if p.email and p.email.lower() == "familie@example.de"]
    shards = split_store(store, 4)
    assert shards[0].shared == {"familie@example.de"} and shards[0].members == set(family)
    trigger = spec("inactivity", inactive_for="30d")
    first = decided(store, trigger, shards[0])
    assert set(family) <= set(first)
    assert sorted(first[i] for i in family if first[i] is not None) == [Outcome.DUPLICATE_ADDRESS]
    for shard in shards[1:]:
        assert not set(family) & set(decided(store, trigger, shard))


@pytest.mark.parametrize("count", [2, 3])
def test_the_sql_slice_is_the_python_slice(store: Store, count: int) -> None:
    people = quiet_store(store)
    shards = split_store(store, count)
    with Session(store.engine) as session:
        for shard in shards:
            in_sql = set(session.exec(select(col(Customer.id)).where(shard.where(col(Customer.id)))).all())
            assert in_sql == {p.id for p in people if shard.holds(p.id)}
            assert in_sql  # every slice of twenty has someone: the test would pass with all in one otherwise


def test_a_slice_is_one_of_its_count() -> None:
    with pytest.raises(ValueError, match="0 <= index < count"):
        Shard(2, 2)
    with pytest.raises(ValueError):
        Shard(0, 0)
    assert Shard(1, 4).label == "2/4"


def test_each_slice_closes_only_its_own_customers_deferrals(store: Store) -> None:
    people = quiet_store(store)[14:]  # two of the many, the two records of one mailbox, two more
    rows = [(claims.Claim(f"t-inactivity/{p.id}/due", "t-inactivity", p.id, f"due-{p.id}", "lapsed", "winback",
                          p.email or "x@example.de", f"<{p.id}@shop>"), ago(hours=1), None) for p in people]
    claims.defer(store.engine, rows, "run-0", ago(days=1))
    every = claims.awaiting_keys(store.engine, "t-inactivity", NOW)
    assert len(every) == 6
    shards = split_store(store, 3)
    parts = [claims.awaiting_keys(store.engine, "t-inactivity", NOW, shard=shard) for shard in shards]
    assert sorted(key for part in parts for key in part) == sorted(every)
    for shard, part in zip(shards, parts, strict=True):
        assert part == {key for key in every if shard.holds(int(key.split("/")[1]))}


@pytest.mark.parametrize("count", [2, 3, 4, 8])
def test_slices_are_even_whatever_pattern_the_ids_follow(count: int) -> None:
    """A store whose every fourth customer is alike (say, has no order yet) still gives every
    slice its share of them: the slice is a hash of the id, not the id itself."""
    for step in (1, 2, 4, 8):
        ids = range(step, 40_000 * step + 1, step)
        sizes = Counter(next(s.index for s in split(count) if s.holds(i)) for i in ids)
        assert len(sizes) == count and max(sizes.values()) < 1.05 * len(ids) / count, (step, sizes)


@pytest.mark.parametrize("count", [2, 3, 7])
def test_the_sql_slice_is_the_python_slice_for_any_id(engine: Any, count: int) -> None:
    """Negative ids, the largest int4 and 64-bit ids included: every id in exactly one slice,
    the same in the database as in Python (SQL's ``%`` keeps a negative sign)."""
    ids = [-(2**63) + 1, -(2**31), -5, -1, 0, 1, 2, 65535, 2**31 - 1, 2**31, 3_474_701_534, 2**40 + 3, 2**63 - 1]
    shards = split(count)
    with engine.connect() as connection:
        for i in ids:
            in_sql = [s.index for s in shards if connection.execute(select(s.where(literal(i, BigInteger)))).scalar()]
            assert in_sql == [s.index for s in shards if s.holds(i)] and len(in_sql) == 1, i
