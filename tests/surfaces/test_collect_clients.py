"""The tracking API as the shops' own libraries use it: Segment's and RudderStack's Python clients
and Segment's Node.js client, unchanged but for the host and the write key, against a real
``lifecycle web`` process and a real store. Each event is stored once, under its key's source; a
wrong key is refused and stores nothing; a server killed mid-batch loses and doubles nothing."""

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import rudderstack.analytics.client as rudder
import rudderstack.analytics.request as rudder_request
import segment.analytics.client as segment
import segment.analytics.request as segment_request
from sqlalchemy import Engine, func, select, text
from sqlmodel import Session, SQLModel, col

from flows.settings import Settings
from models import Cart, CartItem, Customer, Event, Order
from models.commerce import CART_ORDERED
from models.db import create_schema, make_engine
from models.identity import CustomerAlias, GroupMembership
from tests.conftest import ROOT, ensure_database, postgres_url
from tests.support.collector import Collector
from tests.support.node import analytics_node, node_bin

Step = tuple[str, list[tuple[str, dict[str, Any]]]]  # a source, and the calls it makes in order


def shop_day(tag: str) -> list[Step]:
    """A guest becomes a customer and buys: the backend identifies and aliases, the storefront
    sends the browsing, the backend the order. Each step is flushed before the next, as
    their order matters (the guest's page lands on the account only once it is aliased)."""
    user, guest, cart = f"{tag}-user", f"{tag}-guest", f"{tag}-cart"
    product = {"product_id": "sku-1", "name": "Linen shirt", "price": 19.9, "cart_id": cart}
    return [
        ("backend", [
            ("identify", {"user_id": user, "traits": {"email": f"{tag}@shop.example", "firstName": "Ada"}}),
            ("alias", {"previous_id": guest, "user_id": user}),
            ("group", {"user_id": user, "group_id": f"{tag}-company", "traits": {"name": "Acme"}}),
        ]),
        ("storefront", [
            ("page", {"anonymous_id": guest, "name": "Home", "properties": {"url": "https://shop.example/"}}),
            ("track", {"user_id": user, "event": "Product Added", "properties": {**product, "quantity": 2}}),
            ("track", {"user_id": user, "event": "Product Added",
                       "properties": {"product_id": "sku-2", "name": "Socks", "price": 20, "cart_id": cart}}),
            ("screen", {"user_id": user, "name": "Basket"}),
        ]),
        ("backend", [
            ("track", {"user_id": user, "event": "Order Completed",
                       "properties": {"order_id": f"{tag}-order", "total": 59.8, "currency": "EUR", "cart_id": cart,
                                      "products": [{"product_id": "sku-1", "quantity": 2},
                                                   {"product_id": "sku-2", "quantity": 1}]}}),
        ]),
    ]


def numbered(steps: list[Step], tag: str) -> list[Step]:
    """Every call with its own messageId, as the client would give it, known to the test."""
    count = iter(range(1000))
    return [(source, [(method, {**args, "message_id": f"{tag}-{next(count)}-{method}"}) for method, args in calls])
            for source, calls in steps]


def expected_events(steps: list[Step]) -> dict[str, tuple[str, str | None, str]]:
    """messageId -> (type, name, source) of every call."""
    return {args["message_id"]: (method, args.get("event") or args.get("name"), source)
            for source, calls in steps for method, args in calls}


def stored_events(engine: Engine, tag: str) -> list[tuple[str, str, str | None, str | None]]:
    """The events whose messageId the test gave (``numbered``): tests share one server and store."""
    with Session(engine) as session:
        return [tuple(row) for row in session.execute(  # type: ignore[misc]
            select(Event.message_id, Event.type, Event.name, Event.source)
            .where(col(Event.message_id).startswith(f"{tag}-")))]


def assert_shop_day(engine: Engine, steps: list[Step], tag: str) -> None:
    """Each call stored exactly once, under its key's source, and the customer, cart and order it makes."""
    rows = stored_events(engine, tag)
    assert len(rows) == len({row[0] for row in rows}), "a messageId stored twice"
    assert {row[0]: row[1:] for row in rows} == expected_events(steps)
    with Session(engine) as session:
        # The guest is the customer, not a second one.
        [customer] = session.execute(select(Customer).where(col(Customer.external_id).startswith(f"{tag}-"))
                                     ).scalars().all()
        assert (customer.external_id, customer.email, customer.first_name) == (
            f"{tag}-user", f"{tag}@shop.example", "Ada")
        alias = session.get(CustomerAlias, f"{tag}-guest")
        assert alias is not None and alias.customer_id == customer.id
        [group] = session.execute(select(GroupMembership).where(col(GroupMembership.customer_id) == customer.id)
                                  ).scalars().all()
        assert (group.group_id, group.traits) == (f"{tag}-company", {"name": "Acme"})
        [cart] = session.execute(select(Cart).where(col(Cart.customer_id) == customer.id)).scalars().all()
        assert (cart.external_id, cart.status) == (f"{tag}-cart", CART_ORDERED)
        items = session.execute(select(CartItem).where(col(CartItem.cart_id) == cart.id)).scalars().all()
        assert sorted((i.product_id, i.quantity, i.price_cents) for i in items) == [("sku-1", 2, 1990),
                                                                                     ("sku-2", 1, 2000)]
        [order] = session.execute(select(Order).where(col(Order.customer_id) == customer.id)).scalars().all()
        assert (order.external_id, order.total_cents, order.currency) == (f"{tag}-order", 5980, "EUR")


def totals(engine: Engine) -> tuple[int, int]:
    """How many events and customers the store holds."""
    with Session(engine) as session:
        return (session.execute(select(func.count()).select_from(Event)).scalar_one(),
                session.execute(select(func.count()).select_from(Customer)).scalar_one())


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Collector, Engine]]:
    """One ``lifecycle web`` on a PostgreSQL store for the clients' tests (a server takes seconds
    to start); each test keeps to its own ids."""
    url = postgres_url("_clients")
    ensure_database(url)
    engine = make_engine(url)
    import models  # noqa: F401 - every table, to drop

    SQLModel.metadata.drop_all(engine)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
    create_schema(engine)
    settings = Settings(database_url=url, triggers_dir=ROOT / "triggers", templates_dir=ROOT / "templates",
                        smtp_url="smtp://127.0.0.1:1", secret="test-secret-0123456789")
    with Collector(settings, tmp_path_factory.mktemp("collector")) as server:
        yield server, engine
    engine.dispose()


class Responses:
    """Every answer a Python client's HTTP session got (a ``requests`` response hook): how often
    it sent a batch again, and what the server said of it."""

    def __init__(self, session: requests.Session) -> None:
        self.session = session
        self.seen: list[tuple[int, int, dict[str, Any]]] = []  # status, the client's X-Retry-Count, body
        self.lock = threading.Lock()

    def __call__(self, response: requests.Response, *_: Any, **__: Any) -> None:
        retry = int(response.request.headers.get("X-Retry-Count", 0))
        try:
            body = response.json()
        except ValueError:
            body = {}
        with self.lock:
            self.seen.append((response.status_code, retry, body))

    def __enter__(self) -> "Responses":
        self.session.hooks["response"].append(self)
        return self

    def __exit__(self, *_: object) -> None:
        self.session.hooks["response"].remove(self)


def run_python(clients: dict[str, Any], steps: list[Step]) -> None:
    """The steps through the sources' clients, each step flushed before the next; then the clients shut down."""
    try:
        for source, calls in steps:
            for method, args in calls:
                queued, _ = getattr(clients[source], method)(**args)
                assert queued
            clients[source].flush()
    finally:
        for client in clients.values():
            client.shutdown()


def python_client_day(client: Callable[..., Any], session: requests.Session, shared: tuple[Collector, Engine],
                      tag: str) -> None:
    """The shop's day through a Python client class, plain JSON from the backend, gzip from the storefront."""
    server, engine = shared
    failures: list[Exception] = []
    steps = numbered(shop_day(tag), tag)
    with Responses(session) as responses:
        run_python({source: client(key, host=server.url, gzip=source == "storefront", upload_interval=0.05,
                                   on_error=lambda e, batch: failures.append(e))
                    for source, key in server.keys.items()}, steps)
    assert failures == []
    assert {status for status, _, _ in responses.seen} == {200}
    assert sum(body["accepted"] for _, _, body in responses.seen) == 8  # and none a duplicate
    assert_shop_day(engine, steps, tag)


@pytest.mark.xdist_group("collect_clients")  # one worker, one shared server (with --dist loadgroup)
def test_segment_python_client_stores_each_call_once_under_its_keys_source(
        shared: tuple[Collector, Engine]) -> None:
    """segment-analytics-python, with only the host and the write key set."""
    python_client_day(segment.Client, segment_request._session, shared, "seg")


@pytest.mark.xdist_group("collect_clients")  # one worker, one shared server (with --dist loadgroup)
def test_rudderstack_python_client_stores_each_call_once_under_its_keys_source(
        shared: tuple[Collector, Engine]) -> None:
    """rudder-sdk-python: its data plane URL is the client's ``host``."""
    python_client_day(rudder.Client, rudder_request._session, shared, "rudder")


NODE_SCRIPT = r"""
const { Analytics } = require('@segment/analytics-node');
const plan = JSON.parse(require('fs').readFileSync(process.argv[2], 'utf8'));
const statuses = [], failed = [], clients = {};
for (const [source, writeKey] of Object.entries(plan.keys)) {
  // flushAt 2: several batches a step; a short interval so that a step's odd event is not kept waiting.
  const analytics = new Analytics({ writeKey, host: plan.host, flushAt: 2, flushInterval: 50, maxRetries: 2 });
  analytics.on('http_response', (response) => statuses.push(response.status));
  clients[source] = analytics;
}
const send = (analytics, method, params) => new Promise((resolve) => analytics[method](params, (err) => {
  if (err) failed.push({ messageId: params.messageId, reason: String((err && err.message) || err) });
  resolve();
}));
(async () => {
  for (const [source, calls] of plan.steps) {
    await Promise.all(calls.map(([method, params]) => send(clients[source], method, params)));
  }
  await Promise.all(Object.values(clients).map((analytics) => analytics.closeAndFlush({ timeout: 20000 })));
  process.stdout.write(JSON.stringify({ statuses, failed }));
})().catch((err) => { console.error(err); process.exit(1); });
"""

CAMEL = {"user_id": "userId", "anonymous_id": "anonymousId", "previous_id": "previousId", "group_id": "groupId",
         "message_id": "messageId"}


def run_node(steps: list[Step], keys: dict[str, str], host: str, folder: Path) -> dict[str, Any]:
    """The steps through @segment/analytics-node in a Node.js process: the statuses it got, the calls it failed."""
    modules = analytics_node()
    script, plan = folder / "shop.js", folder / "plan.json"
    script.write_text(NODE_SCRIPT)
    plan.write_text(json.dumps({"host": host, "keys": keys, "steps": [
        (source, [(method, {CAMEL.get(name, name): value for name, value in args.items()}) for method, args in calls])
        for source, calls in steps]}))
    ran = subprocess.run([node_bin(), str(script), str(plan)], env={**os.environ, "NODE_PATH": str(modules)},
                         capture_output=True, text=True, timeout=60, check=False)
    assert ran.returncode == 0, ran.stderr
    result: dict[str, Any] = json.loads(ran.stdout)
    return result


@pytest.mark.xdist_group("collect_clients")  # one worker, one shared server (with --dist loadgroup)
def test_segment_node_client_stores_each_call_once_under_its_keys_source(
        shared: tuple[Collector, Engine], tmp_path: Path) -> None:
    """@segment/analytics-node from the npm registry, in batches of two."""
    server, engine = shared
    steps = numbered(shop_day("node"), "node")
    result = run_node(steps, server.keys, server.url, tmp_path)
    assert result["failed"] == []
    assert set(result["statuses"]) == {200} and len(result["statuses"]) >= 4  # several batches
    assert_shop_day(engine, steps, "node")


@pytest.mark.xdist_group("collect_clients")  # one worker, one shared server (with --dist loadgroup)
def test_a_client_with_a_wrong_write_key_is_refused_and_told_so_and_nothing_is_stored(
        shared: tuple[Collector, Engine], tmp_path: Path) -> None:
    """401 to every client with a key the server was not given; each reports every call as failed."""
    server, engine = shared
    before = totals(engine)
    steps = numbered(shop_day("wrong"), "wrong")
    wrong = {source: f"{key}x" for source, key in server.keys.items()}  # one character off the real key
    for client, session in ((segment.Client, segment_request._session), (rudder.Client, rudder_request._session)):
        failures: list[tuple[Exception, list[Any]]] = []

        def failed(error: Exception, batch: list[Any], into: list[tuple[Exception, list[Any]]] = failures) -> None:
            into.append((error, batch))

        with Responses(session) as responses:
            run_python({source: client(key, host=server.url, max_retries=1, upload_interval=0.05, on_error=failed)
                        for source, key in wrong.items()}, steps)
        assert {status for status, _, _ in responses.seen} == {401}, client
        assert {getattr(error, "status", None) for error, _ in failures} == {401}, client
        assert sorted(m["messageId"] for _, batch in failures for m in batch) == sorted(expected_events(steps))
    result = run_node(steps, wrong, server.url, tmp_path)
    assert set(result["statuses"]) == {401}
    assert sorted(f["messageId"] for f in result["failed"]) == sorted(expected_events(steps))
    assert stored_events(engine, "wrong") == [] and totals(engine) == before


def kill_events(engine: Engine) -> tuple[int, int]:
    """How many of the fault test's events are stored, and how many distinct messageIds among them."""
    with Session(engine) as session:
        return tuple(session.execute(  # type: ignore[return-value]
            select(func.count(), func.count(col(Event.message_id).distinct()))
            .where(col(Event.message_id).startswith("kill-"))).one())


@pytest.mark.xdist_group("collect_clients")  # one worker, one shared server (with --dist loadgroup)
def test_a_server_killed_mid_upload_and_restarted_loses_and_doubles_nothing(shared: tuple[Collector, Engine]) -> None:
    """SIGKILL while segment-analytics-python uploads 3,000 events in batches of 100, as soon as the
    first batch is committed (its answer may not have left yet); the server starts again on the same
    port, down for the seconds a start takes, and the client's retries finish the upload."""
    server, engine = shared
    failures: list[Exception] = []
    total = 3000
    client = segment.Client(server.keys["backend"], host=server.url, upload_size=100, max_retries=10,
                            max_queue_size=total, on_error=lambda e, batch: failures.append(e))
    with Responses(segment_request._session) as responses:
        for number in range(total):
            queued, _ = client.track(user_id=f"kill-{number % 60}", event="Product Viewed",
                                     properties={"product_id": f"sku-{number}"}, message_id=f"kill-{number}")
            assert queued
        deadline = time.monotonic() + 30
        while kill_events(engine)[0] == 0:
            assert time.monotonic() < deadline, server.log
            time.sleep(0.005)
        server.kill()
        at_kill = kill_events(engine)[0]
        down = time.monotonic()
        server.restart()
        down = time.monotonic() - down
        client.flush()  # returns once every event is uploaded or given up on
        client.shutdown()
    retried = [(status, retry, body) for status, retry, body in responses.seen if retry]
    print(f"\nkilled with {at_kill} of {total} events committed, down {down:.1f} s; {len(responses.seen)} answers, "
          f"{len(retried)} to a batch sent again (status, X-Retry-Count, accepted, duplicates): "
          f"{[(s, r, b.get('accepted'), b.get('duplicates')) for s, r, b in retried]}")
    assert 0 < at_kill < total, "the kill must land mid-upload"
    assert failures == []
    assert kill_events(engine) == (total, total)
    with Session(engine) as session:
        stored = set(session.execute(select(Event.message_id).where(col(Event.message_id).startswith("kill-")))
                     .scalars())
    assert stored == {f"kill-{number}" for number in range(total)}
    assert retried, "the batch in flight at the kill was sent again"
    answered = [body for status, _, body in responses.seen if status == 200]
    assert sum(body["accepted"] + body["duplicates"] for body in answered) == total  # each batch answered once
    assert sum(body["duplicates"] for body in answered) <= at_kill  # only what was committed comes back known
