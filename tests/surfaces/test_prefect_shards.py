"""Shards over a work pool: a slice's parameters give its run the parent's very slice, its
summary comes back through its artifact; and for real: a Prefect server, PostgreSQL, two process workers and a
200,000-customer campaign in 4 shards. Every due mail reaches the SMTP server once; both
workers run shards; a worker killed mid-shard (SIGKILL, with every process it started: a
machine lost) leaves its shards to be marked Crashed and run again, with nothing sent twice
and nobody lost; the parent sums the shards into its artifacts."""

import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import text
from sqlmodel import SQLModel

from bench.store import grow
from flows.audience.shards import Shard
from flows.outcomes import Outcome
from flows.run import execute, slices
from flows.run_context import prepare
from flows.settings import Settings
from flows.summary import RunSummary
from flows.surfaces.prefect_shards import ShardOrder, order_for, read_record, slice_context, slice_markdown
from models.db import create_schema, dispose_engines, make_engine
from tests.conftest import ensure_database, postgres_url
from tests.support.builders import NOW, Store
from tests.support.children import lifecycle_bin, lifecycle_variables
from tests.support.ledger import sends
from tests.support.prefect_server import PrefectServer, copy_site, stop
from tests.support.smtp_server import SmtpServer

CUSTOMERS = 200_000
SHARDS = 4
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
STALL = 20  # seconds without progress before a shard run is taken for lost

def descendants(pid: int) -> list[int]:
    """Every process started by ``pid``, and by those, from /proc."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(p) for p in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
            found += kids
            todo += kids
    return found


def kill_machine(worker: int) -> None:
    """SIGKILL a worker and every process it started, at once: what a lost machine does."""
    for pid in [worker, *descendants(worker)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def flow_runs(api: str) -> list[dict]:
    return httpx.post(f"{api}/flow_runs/filter", json={"limit": 200}).json()


def test_a_slice_ordered_by_parameters_is_the_slice_its_parent_made(settings: Settings, store: Store) -> None:
    """What the parent puts in a shard run's parameters (ids only) gives the run the very slice
    the parent split off, the mailboxes its records share looked up again."""
    store.lapsed(6)
    family = [store.customer("Familie", email=address) for address in ("Familie@Example.de", "familie@example.de")]
    context = prepare("winback-lapsed", NOW, settings=settings, shards=3)
    for made in slices(context):
        order = ShardOrder.model_validate(json.loads(json.dumps(order_for(made).model_dump())))
        again = slice_context(context, order)
        assert again.shard == made.shard and again.shard is not None
        assert again.shard.members == {c.id for c in family} and again.shard.shared == {"familie@example.de"}
        assert (again.step, again.winner, again.shards) == (made.step, made.winner, 3)


def test_a_journey_slice_is_of_its_step_and_a_step_gone_is_refused(settings: Settings) -> None:
    context = prepare("abandoned-cart", NOW, settings=settings, shards=2)
    order = ShardOrder(index=1, count=2, step="nudge", winner=None)
    part = slice_context(context, order)
    assert part.step is not None and part.step.name == "nudge" and part.shard == Shard(1, 2)
    with pytest.raises(ValueError, match="no step 'gone'"):
        slice_context(context, order.model_copy(update={"step": "gone"}))


def test_a_slices_artifact_carries_its_summary_to_the_parent() -> None:
    part = RunSummary("winback-lapsed", NOW)
    part.add("lapsed", Outcome.SENT, 3)
    part.add("lapsed", Outcome.HELD_OUT, 1)
    markdown = slice_markdown(part, ShardOrder(index=0, count=4))
    assert markdown.startswith("# winback-lapsed @ 2026-03-16 12:00:00 UTC: sent 3") and "Shard 1/4" in markdown
    assert read_record(markdown) == part


@pytest.fixture
def campaign_store() -> Iterator[str]:
    url = postgres_url("_pool")
    ensure_database(url)
    dispose_engines()
    engine = make_engine(url)
    import models  # noqa: F401

    SQLModel.metadata.drop_all(engine)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
    create_schema(engine)
    grow(engine, 1, CUSTOMERS, NOW, tables=("customers", "orders"))
    with engine.begin() as connection:  # one in six reachable: thousands of mails, not tens of thousands
        connection.execute(text("UPDATE customers SET email = NULL WHERE id % 6 <> 0"))
        connection.execute(text("ANALYZE"))
    engine.dispose()
    yield url
    dispose_engines()


@pytest.mark.xdist_group("pool-shards")
def test_a_campaign_in_four_shards_over_two_workers_survives_a_lost_worker(
        tmp_path_factory: pytest.TempPathFactory, campaign_store: str) -> None:
    root = copy_site(tmp_path_factory.mktemp("pool-site"))
    began = time.monotonic()

    def phase(what: str) -> None:  # where the time goes, with -s
        print(f"{time.monotonic() - began:6.1f} s  {what}")

    smtp = SmtpServer(keep_data=False).start()
    server = PrefectServer(tmp_path_factory.mktemp("pool-prefect"))
    workers: dict[str, object] = {}
    command = None
    settings = Settings(database_url=campaign_store, smtp_url=smtp.url, secret=SecretStr("pool-test-secret"),
                        triggers_dir=root / "triggers", templates_dir=root / "templates", workers=1, batch_size=200,
                        shard_stall_seconds=STALL, claim_lease_seconds=5)
    try:
        deploying = threading.Thread(target=lambda: server.start().deploy(root, only="winback-lapsed"))
        deploying.start()  # meanwhile, the truth: what one process would send
        due = execute(prepare("winback-lapsed", NOW, settings=settings, dry_run=True)).outcomes[Outcome.WOULD_SEND]
        deploying.join()
        assert due > 2_000  # a real campaign: hundreds of mails per shard, several batches each
        phase(f"deployed; the dry run says {due} due")
        env = {**lifecycle_variables(settings), "PREFECT_LOGGING_LEVEL": "INFO"}
        for name in ("a", "b"):  # at most 3 runs each: the parent and 4 shards cannot all go to one
            workers[name] = server.worker(root, root / f"worker-{name}.log", "lifecycle", "--limit", "3",
                                          "--name", f"worker-{name}", **env)
        # As ops would: `lifecycle run --on-pool` starts the deployment's run and waits for it.
        told = root / "run.log"
        command = server.spawn([lifecycle_bin(), "run", "winback-lapsed", "--on-pool", "--shards", str(SHARDS),
                                "--now", NOW.isoformat()], cwd=root, log=told, **env)
        deadline = time.monotonic() + 120
        while not (said := re.search(r"Started flow run ([0-9a-f-]{36}) of deployment winback-lapsed",
                                     told.read_text())):
            assert time.monotonic() < deadline and command.poll() is None, told.read_text()
            time.sleep(0.2)
        parent = said.group(1)

        def log(name: str) -> str:
            return (root / f"worker-{name}.log").read_text()

        def state_of(run: str) -> str:
            return str(httpx.get(f"{server.api_url}/flow_runs/{run}").json()["state_type"])

        def took(name: str) -> set[str]:
            """The flow runs this worker ran (a worker labels the runs it takes)."""
            return {r["id"] for r in flow_runs(server.api_url)
                    if (r.get("labels") or {}).get("prefect.worker.name") == f"worker-{name}"}

        store = make_engine(campaign_store)

        def mid_shard() -> set[str]:
            """The shard runs of the worker that does not run the parent, once each has sent part of its slice."""
            if len(smtp.received) < due // 4:
                return set()
            victim = next(name for name in workers if parent not in took(name))
            running = {r["id"] for r in flow_runs(server.api_url) if ", shard " in r["name"]
                       and r["state_type"] == "RUNNING"} & took(victim)
            sent = Counter(r.run_id for r in sends(store, trigger="winback-lapsed", status="sent"))
            return running if running and all(sent[i] for i in running) else set()

        deadline = time.monotonic() + 240
        while not (victims := mid_shard()):
            assert time.monotonic() < deadline and state_of(parent) not in FINAL, log("a")[-3000:] + log("b")[-3000:]
            time.sleep(0.5)
        victim = next(name for name in workers if parent not in took(name))
        kill_machine(workers[victim].pid)  # type: ignore[attr-defined]
        phase(f"worker-{victim} killed with {len(victims)} shard(s) running, {len(smtp.received)} mails in")

        deadline = time.monotonic() + 300
        while (state := state_of(parent)) not in FINAL:
            assert time.monotonic() < deadline, log("a")[-5000:] + log("b")[-3000:]
            time.sleep(0.5)
        survivor = next(name for name in workers if name != victim)
        assert command.wait(60) == 0, told.read_text()
        phase(f"parent {state.lower()}")
        assert state == "COMPLETED", log(survivor)[-6000:]
        message = httpx.get(f"{server.api_url}/flow_runs/{parent}").json()["state"]["message"]
        runs = {r["id"]: r for r in flow_runs(server.api_url)}
        table = next(a for a in httpx.post(f"{server.api_url}/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [parent]}, "type": {"any_": ["table"]}}}).json()
            if a["key"] == "winback-lapsed-shards")
        taken = {name: took(name) for name in workers}
    finally:
        for process in [*workers.values(), *([command] if command else [])]:
            stop(process)  # type: ignore[arg-type]
        server.stop()
        smtp.stop()

    # Counted at the SMTP server, against the ledger and the dry run's truth.
    engine = make_engine(campaign_store)
    received = Counter(r.recipients[0] for r in smtp.received)
    rows = [r for r in sends(engine, trigger="winback-lapsed") if r.status in ("sent", "sending")]
    sent = {r.email for r in rows if r.status == "sent"}
    in_doubt = {r.email for r in rows if r.status == "sending"}
    assert set(received.values()) == {1}  # nobody twice
    assert sent <= set(received) <= sent | in_doubt  # every mail marked sent arrived; nothing else but in doubt
    assert len(sent) + len(in_doubt) == due  # nobody lost: each due mail sent, or in doubt (listed for ops)
    assert len(in_doubt) <= settings.in_flight * len(victims)  # at most what was on the wire when it went

    # Both workers ran shards; the lost one's were marked Crashed and run again by the other.
    shard_runs = {i: r for i, r in runs.items() if ", shard " in r["name"]}
    assert all(taken[name] & set(shard_runs) for name in workers)
    assert all(r["parent_task_run_id"] for r in shard_runs.values())  # subflows: cancelling the parent reaches them
    listed = {row["shard"]: row for row in json.loads(table["data"])}
    assert sorted(listed) == [f"{n}/{SHARDS}" for n in range(1, SHARDS + 1)]
    counted = {label: row["counted run"] for label, row in listed.items()}
    assert all(runs[i]["state_type"] == "COMPLETED" for i in counted.values())
    for lost in victims:
        assert runs[lost]["state_type"] == "CRASHED" and "no progress" in runs[lost]["state"]["message"]
        label = runs[lost]["name"].rsplit("shard ", 1)[1]
        assert listed[label]["runs"] >= 2 and counted[label] in taken[survivor]

    # The parent's counts are the sum of the runs that counted, as the ledger has them.
    by_run = Counter(r.run_id for r in rows if r.status == "sent")
    assert f"sent {sum(by_run[i] for i in counted.values())};" in message
    assert f"winback-lapsed: {message}" in told.read_text()  # what the command said as the run ended
    assert sum(by_run[i] for i in victims) > 0  # the lost runs had sent part of their slices
    for label, row in listed.items():  # and the parent's table says what the runs that did not count sent
        others = [i for i, r in shard_runs.items() if r["name"].endswith(f"shard {label}") and i != counted[label]]
        assert row["sent by its other runs"] == sum(by_run[i] for i in others)
