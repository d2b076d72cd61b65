"""Attribution speed over the outcomes store: the full rebuild, and the daily incremental run.

    python bench/attribution.py [--sqlite PATH] [--postgres URL] [--customers N | --scale S] [--build] [--rounds R]

Builds the store with ``bench/outcomes_store.py`` (1 M customers, 10 M events, 1.5 M sends,
300 k orders and their clicks by default) unless it is there at that size already
(``--build`` builds it anew), then measures with the default policy (click or delivery,
five days):

1. the first run over a store without attributions (every order);
2. ``lifecycle attribute --rebuild``: every row deleted and computed again, one transaction;
3. the daily run: one more day of sends, clicks and orders after the store's ``NOW``
   (``outcomes_store.add_day``), then an incremental run as of the day's end;
4. an incremental run with nothing new (what finding the unseen orders costs);
5. a rebuild after the added day gives exactly the rows the first run and the daily run did;
6. the holdout lift of every trigger over the whole history (``lift_by_trigger``, what
   ``lifecycle report`` adds for its holdouts).

``--rounds`` repeats 2–4 and reports each; the targets are 60 s for the rebuild and 5 s for
the daily run on 2 cores.
"""

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, text

from bench import outcomes_store
from flows.analysis.attribution import AttributionTally, attribute
from flows.analysis.holdouts import lift_by_trigger
from flows.spec.policy import Attribution
from models.db import make_engine

T = TypeVar("T")
POLICY = Attribution()
DAY_END = outcomes_store.NOW + timedelta(days=1)


def timed(work: Callable[[], T]) -> tuple[T, float]:
    began = time.perf_counter()
    result = work()
    return result, time.perf_counter() - began


def describe(tally: AttributionTally) -> str:
    return (f"{tally.orders_seen:,} orders, {tally.attributed:,} attributed "
            f"({', '.join(f'{basis} {n:,}' for basis, n in tally.by_basis.items())}), "
            f"{tally.unattributed:,} unattributed")


def snapshot(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(text(
            "SELECT order_id, send_id, basis, touched_at FROM attributions ORDER BY order_id")).all())


def bench(url: str, size: outcomes_store.Size, *, build: bool, rounds: int) -> dict[str, float]:
    engine = make_engine(url)
    found = outcomes_store.built(engine)
    if build or found is None or found["size"] != asdict(size):
        print(f"building the store ({size.customers:,} customers)…")
        _, seconds = timed(lambda: outcomes_store.build(url, size, log=print))
        print(f"  built in {seconds:.0f} s")
        engine.dispose()
        engine = make_engine(url)
    outcomes_store.drop_added_day(engine)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM attributions"))
        counts = {table: connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                  for table in ("customers", "events", "sends", "engagements", "orders")}
    print("store: " + ", ".join(f"{n:,} {table}" for table, n in counts.items()))
    figures: dict[str, float] = {}
    tally, figures["first run"] = timed(lambda: attribute(engine, POLICY, outcomes_store.NOW))
    print(f"first run: {figures['first run']:.2f} s ({describe(tally)})")
    first = snapshot(engine)
    for round_ in range(1, rounds + 1):
        tally, seconds = timed(lambda: attribute(engine, POLICY, outcomes_store.NOW, rebuild=True))
        figures[f"rebuild {round_}"] = seconds
        print(f"rebuild: {seconds:.2f} s ({describe(tally)})")
        added, seconds_to_add = timed(lambda: outcomes_store.add_day(engine))
        tally, seconds = timed(lambda: attribute(engine, POLICY, DAY_END))
        figures[f"daily {round_}"] = seconds
        print(f"daily run: {seconds:.2f} s ({describe(tally)}; the day added {added} in {seconds_to_add:.1f} s)")
        tally, seconds = timed(lambda: attribute(engine, POLICY, DAY_END))
        figures[f"nothing new {round_}"] = seconds
        print(f"incremental run with nothing new: {seconds:.2f} s ({tally.orders_seen} orders)")
    daily = snapshot(engine)
    attribute(engine, POLICY, DAY_END, rebuild=True)
    same = snapshot(engine) == daily and daily[:len(first)] == first
    print(f"a rebuild after the day gives the same rows as the first and the daily run: {same}")
    if not same:
        raise SystemExit("rebuild and incremental runs disagree")
    since = outcomes_store.NOW - timedelta(days=outcomes_store.DAYS)
    lifts, figures["holdout lift"] = timed(lambda: lift_by_trigger(engine, since=since, until=DAY_END,
                                                                    window=POLICY.window))
    print(f"holdout lift over {outcomes_store.DAYS} days: {figures['holdout lift']:.2f} s")
    for lift in lifts:
        print(f"  {lift.trigger} {lift.currency}: {lift.treated.recipients:,} treated, {lift.held_out.recipients:,} "
              f"held out; {lift.verdict}")
    engine.dispose()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    outcomes_store.add_store_arguments(parser)
    parser.add_argument("--build", action="store_true", help="build the store even if it is there")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    size, urls = outcomes_store.store_of(parser, args)
    results = {}
    for url in urls:
        name = url.split(":")[0].split("+")[0]
        print(f"== {name}")
        results[name] = bench(url, size, build=args.build, rounds=args.rounds)
    print("\nseconds (targets: rebuild < 60, daily < 5)")
    for name, figures in results.items():
        print(f"  {name}: " + ", ".join(f"{step} {seconds:.2f}" for step, seconds in figures.items()))


if __name__ == "__main__":
    main()
