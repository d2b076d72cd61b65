"""Two checkouts' throughput, alternated over one store: does a change make sending slower?

    python bench/ab.py --against OTHER_CHECKOUT [--customers N] [--database postgresql|sqlite] [--rounds R]

``bench/run.py`` grows a new store for every run, and on this kind of machine its
figures drift by a third from run to run, more than the differences worth knowing
about. This grows one store once (``bench/store.py``, this checkout's), then runs the
win-back flow of this checkout and of ``OTHER_CHECKOUT`` (e.g. ``git worktree add
/tmp/base <commit>``) over it in turns, A B B A per round, against one Postfix
``smtp-sink`` and one Prefect server, deleting each run's sends before the next. Each
run is a fresh process in its own checkout, started from the flow entrypoint in that
checkout's ``prefect.yaml``, so either side may be any release. Prints msgs/s per run and
the mean ratio, and each run's peak memory.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import run as bench  # after the checkout is on sys.path
from bench.store import grow

SCRIPT = """
import json, sys, time
from {module} import {function} as flow

start = time.perf_counter()
summary = flow(trigger="winback-lapsed", now=sys.argv[1])
print(json.dumps({{"sent": summary.outcomes["sent"], "seconds": time.perf_counter() - start}}))
"""


def entrypoint(checkout: Path) -> tuple[str, str]:
    """The trigger flow's module and function, as that checkout's prefect.yaml deploys it."""
    deployments = yaml.safe_load((checkout / "prefect.yaml").read_text(encoding="utf-8"))["deployments"]
    path, function = next(d["entrypoint"] for d in deployments if d["parameters"].get("trigger")).split(":")
    return path.removesuffix(".py").replace("/", "."), function


def one_run(checkout: Path, url: str, port: int, api_url: str, workers: int) -> tuple[float, float, float]:
    """msgs/s, and the peak memory of the run's processes and of the largest of them (MB RSS)."""
    module, function = entrypoint(checkout)
    env = {**os.environ, "PREFECT_API_URL": api_url, "LIFECYCLE_DATABASE_URL": url,
           "LIFECYCLE_SMTP_URL": f"smtp://127.0.0.1:{port}?connections={bench.CONNECTIONS}",
           "LIFECYCLE_TRIGGERS_DIR": str(checkout / "triggers"), "LIFECYCLE_TEMPLATES_DIR": str(checkout / "templates"),
           "LIFECYCLE_BATCH_SIZE": str(bench.BATCH_SIZE), "LIFECYCLE_IN_FLIGHT": "200",
           "LIFECYCLE_WORKERS": str(workers), "PYTHONPATH": str(checkout), "PREFECT_LOGGING_LEVEL": "ERROR"}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(SCRIPT.format(module=module, function=function))
    try:
        # The checkout is the working directory too: its sender processes import from there.
        process = subprocess.Popen([sys.executable, script.name, bench.NOW.isoformat()], env=env, cwd=checkout,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with bench.TreeMemory(process.pid) as memory:
            out, err = process.communicate()
    finally:
        os.unlink(script.name)
    if process.returncode != 0:
        raise RuntimeError(f"the run of {checkout} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return float(result["sent"]) / float(result["seconds"]), memory.peak_rss / 1024, memory.peak_process_rss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, required=True, help="the other checkout (B); this one is A")
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--rounds", type=int, default=2, help="A B B A, this many times")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    from sqlalchemy import text

    from models.db import create_schema, make_engine

    sides = {"A": ROOT, "B": args.against.resolve()}
    with tempfile.TemporaryDirectory() as folder:
        url = bench.POSTGRES_URL if args.database == "postgresql" else f"sqlite:///{Path(folder) / 'store.db'}"
        if args.database == "postgresql":
            bench.reset_postgres()
        engine = make_engine(url)
        create_schema(engine)
        print(f"Growing the {args.database} store to {args.customers:,} customers …", flush=True)
        grow(engine, 1, args.customers, bench.NOW)
        with engine.begin() as connection:
            grown = connection.execute(text("SELECT coalesce(max(id), 0) FROM sends")).scalar_one()
        rates: dict[str, list[float]] = {"A": [], "B": []}
        memories: dict[str, list[float]] = {"A": [], "B": []}
        with bench.smtp_sink() as port, bench.prefect_server(Path(folder)) as api_url:
            for side in ["A", "B", "B", "A"] * args.rounds:
                started = time.perf_counter()
                rate, rss, largest = one_run(sides[side], url, port, api_url, args.workers)
                rates[side].append(rate)
                memories[side].append(rss)
                print(f"  {side} ({sides[side]}): {rate:,.0f} msgs/s, peak {rss:.0f} MB RSS (largest process "
                      f"{largest:.0f}) ({time.perf_counter() - started:.1f} s)", flush=True)
                with engine.begin() as connection:  # the next run finds the store as grown
                    connection.execute(text("DELETE FROM sends WHERE id > :grown"), {"grown": grown})
    mean = {side: statistics.mean(values) for side, values in rates.items()}
    spread = {side: (min(values), max(values)) for side, values in rates.items()}
    for side in "AB":
        print(f"{side}: mean {mean[side]:,.0f} msgs/s, runs {spread[side][0]:,.0f} to {spread[side][1]:,.0f}; "
              f"peak memory {max(memories[side]):.0f} MB RSS")
    print(f"A / B: {mean['A'] / mean['B']:.3f}")


if __name__ == "__main__":
    main()
