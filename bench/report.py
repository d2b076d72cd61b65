"""Report speed: ``build_report`` and ``lifecycle report`` end to end over the outcomes store.

    python bench/report.py [--sqlite PATH] [--postgres URL] [--customers N | --scale S] [--build]
    python bench/report.py --sqlite PATH --against OTHER_CHECKOUT [--rounds 6]

The store is ``bench/outcomes_store.py``'s (1 M customers, 10 M events, 1.5 M sends over
180 days, 300 k orders, their clicks and opens), built unless it is there at that size
already (``--build`` builds it anew), and attributed once with the default policy if it
has no attributions yet. Then, each the best of three:

1. ``build_report`` over the last 30 days, and over all 180 (every send in the store), and
   of it the holdout comparison alone (``lift_by_trigger``, which ``build_report`` runs
   alongside its own queries);
2. ``revenue_over_time`` over the 180 days in weeks;
3. the incremental attribution ``lifecycle report`` runs first, with nothing new;
4. ``lifecycle report`` as its own process, end to end: the project's policy loaded, the
   incremental attribution (nothing new to attribute), the report built and its tables
   printed.

The target is 5 s at 1 M customers on 2 cores.

``--against`` compares two checkouts instead (a change against its base, e.g. made with
``git worktree add``): ``lifecycle report`` end to end of this checkout and of the other,
each its own code over the same store, alternated A B B A for ``--rounds`` pairs; it
prints every run, and each side's best and median.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, text

from bench import outcomes_store
from flows.analysis.attribution import attribute
from flows.analysis.holdouts import lift_by_trigger
from flows.analysis.report import build_report, revenue_over_time
from flows.spec.policy import Policy
from models.db import make_engine

NOW = outcomes_store.NOW
POLICY = Policy()


def best_of(runs: int, work: Callable[[], Any]) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return min(times)


def ready(url: str, size: outcomes_store.Size, build: bool) -> Engine:
    """The store at ``url``, built at ``size`` and attributed."""
    engine = make_engine(url)
    found = outcomes_store.built(engine)
    if build or found is None or found["size"] != {"customers": size.customers, "seed": size.seed}:
        began = time.perf_counter()
        outcomes_store.build(url, size, log=print)
        print(f"  built in {time.perf_counter() - began:.0f} s", flush=True)
    with engine.connect() as connection:
        attributed = connection.execute(text("SELECT count(*) FROM attributions")).scalar_one()
    if not attributed:
        began = time.perf_counter()
        tally = attribute(engine, POLICY.attribution, NOW)
        print(f"  attributed {tally.orders_seen:,} orders in {time.perf_counter() - began:.0f} s", flush=True)
    return engine


def command(url: str, root: Path = ROOT) -> float:
    """``lifecycle report`` of the checkout at ``root`` as a process, its table written to a pipe."""
    env = {**os.environ, "LIFECYCLE_DATABASE_URL": url, "LIFECYCLE_TRIGGERS_DIR": str(root / "triggers"),
           "LIFECYCLE_TEMPLATES_DIR": str(root / "templates"), "LIFECYCLE_SECRET": "bench-secret-0123456789",
           "PYTHONPATH": str(root)}
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.surfaces.cli", "report", "--now", NOW.isoformat()], cwd=root,
                   env=env, check=True, stdout=subprocess.PIPE)
    return time.perf_counter() - began


def against(url: str, other: Path, rounds: int) -> None:
    """This checkout's ``lifecycle report`` and ``other``'s, alternated A B B A."""
    sides = {"this": ROOT, "other": other.resolve()}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for n in range(rounds):
        for name in ("this", "other") if n % 2 == 0 else ("other", "this"):
            times[name].append(command(url, sides[name]))
            print(f"  {name:<5} {times[name][-1]:6.2f} s", flush=True)
    for name, seconds in times.items():
        print(f"  {name} ({sides[name]}): best {min(seconds):.2f} s, median {statistics.median(seconds):.2f} s",
              flush=True)


def measure(engine: Engine, url: str) -> dict[str, float]:
    days = timedelta(days=outcomes_store.DAYS)
    return {
        "build_report, last 30 days": best_of(3, lambda: build_report(
            engine, since=NOW - timedelta(days=30), until=NOW, policy=POLICY)),
        "  of it lift_by_trigger alone": best_of(3, lambda: lift_by_trigger(
            engine, since=NOW - timedelta(days=30), until=NOW, window=POLICY.attribution.window)),
        f"build_report, all {days.days} days": best_of(3, lambda: build_report(
            engine, since=NOW - days, until=NOW, policy=POLICY)),
        f"  of it lift_by_trigger alone, {days.days} days": best_of(3, lambda: lift_by_trigger(
            engine, since=NOW - days, until=NOW, window=POLICY.attribution.window)),
        f"revenue_over_time, {days.days} days in weeks": best_of(3, lambda: revenue_over_time(
            engine, since=NOW - days, until=NOW)),
        "attribute, incremental, nothing new": best_of(3, lambda: attribute(engine, POLICY.attribution, NOW)),
        "lifecycle report, a process end to end": min(command(url) for _ in range(3)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    outcomes_store.add_store_arguments(parser)
    parser.add_argument("--build", action="store_true", help="build the store anew")
    parser.add_argument("--against", type=Path, help="another checkout: its lifecycle report against this one's")
    parser.add_argument("--rounds", type=int, default=6, help="with --against: pairs of runs (default 6)")
    args = parser.parse_args()
    size, urls = outcomes_store.store_of(parser, args)
    for url in urls:
        print(f"{url.split(':')[0]}: {size.customers:,} customers", flush=True)
        engine = ready(url, size, args.build)
        if args.against:
            against(url, args.against, args.rounds)
            engine.dispose()
            continue
        for label, seconds in measure(engine, url).items():
            print(f"  {label:<42} {seconds:6.2f} s", flush=True)
        engine.dispose()


if __name__ == "__main__":
    main()
