"""The tracking API of ``lifecycle web`` (``/v1/``) over HTTP, against a real store: who may
send, what a request must be, what is answered, and that an answered event is committed."""

import base64
import gzip
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Engine, select
from sqlmodel import Session, col

from flows.ingest import ingest_lines
from flows.settings import Settings
from flows.surfaces.outbox import free_port
from flows.surfaces.web import create_app
from models import Event
from models.db import create_schema, make_engine
from tests.support.web_server import WebServer
from tests.test_ingest_groups import REFUSED, SHOP_DAY, at, snapshot

BACKEND_KEY = "bk_0123456789abcdef"
SHOP_KEY = "sk_fedcba9876543210"
KEYS = f"backend:{BACKEND_KEY},storefront:{SHOP_KEY}"
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def collecting(settings: Settings, keys: str | None = KEYS, **more: Any) -> Settings:
    return settings.model_copy(update={"write_keys": SecretStr(keys) if keys else None, **more})


@pytest.fixture(autouse=True)
def schema(engine: Engine) -> Engine:
    """The store's tables, made as ``lifecycle migrate`` would before the web serves."""
    return engine


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(collecting(settings))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


def auth(key: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def page(message_id: str, **more: Any) -> dict[str, Any]:
    return {"type": "page", "userId": "u1", "name": "Home", "messageId": message_id, "timestamp": at(0), **more}


def batch(*message_ids: str) -> dict[str, Any]:
    return {"batch": [page(message_id) for message_id in message_ids]}


def stored(settings: Settings) -> list[tuple[str, str | None]]:
    """The events' messageIds and sources, read on a connection of its own."""
    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as session:
            return list(session.execute(select(col(Event.message_id), col(Event.source))
                                        .order_by(col(Event.message_id))).tuples())
    finally:
        engine.dispose()


# -- who may send ------------------------------------------------------------------------


def test_without_a_valid_write_key_the_answer_is_401_and_nothing_is_stored(
        settings: Settings, client: TestClient) -> None:
    for why, headers, body in [
        ("no key", {}, batch("m1")),
        ("a wrong key", auth("bk_0123456789abcdeX"), batch("m1")),
        ("the key as password", {"authorization": "Basic " + base64.b64encode(f":{BACKEND_KEY}".encode()).decode()},
         batch("m1")),
        ("a bearer token", {"authorization": f"Bearer {BACKEND_KEY}"}, batch("m1")),
        ("a wrong key in the body", {}, {**batch("m1"), "writeKey": "sk_fedcba987654321X"}),
        ("a wrong header, the right body key", auth("bk_0123456789abcdeX"), {**batch("m1"), "writeKey": SHOP_KEY}),
    ]:
        answer = client.post("/v1/batch", json=body, headers=headers)
        assert answer.status_code == 401, why
        assert answer.json()["code"] == "unauthorized" and answer.headers["www-authenticate"].startswith("Basic")
        assert BACKEND_KEY not in answer.text
    assert client.post("/v1/track", json=page("m2", type="track", event="X")).status_code == 401
    assert stored(settings) == []


@sqlite_only
def test_without_write_keys_configured_nothing_is_accepted(settings: Settings) -> None:
    with TestClient(create_app(collecting(settings, keys=None))) as client:
        for headers in ({}, auth(BACKEND_KEY), auth("")):
            assert client.post("/v1/batch", json=batch("m1"), headers=headers).status_code == 401
    assert stored(settings) == []


def test_basic_auth_and_a_write_key_in_the_body_are_both_accepted_and_name_the_source(
        settings: Settings, client: TestClient) -> None:
    """Segment's server libraries send the key as the basic-auth user; analytics.js puts it in the body."""
    backend = client.post("/v1/batch", json=batch("m1", "m2"), headers=auth(BACKEND_KEY))
    storefront = client.post("/v1/page", json={**page("m3"), "writeKey": SHOP_KEY})
    assert backend.status_code == storefront.status_code == 200
    assert backend.json() == {"success": True, "accepted": 2, "duplicates": 0}
    assert storefront.json() == {"success": True, "accepted": 1, "duplicates": 0}
    assert stored(settings) == [("m1", "backend"), ("m2", "backend"), ("m3", "storefront")]
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        payload = session.execute(select(col(Event.payload)).where(col(Event.message_id) == "m3")).scalar_one()
    engine.dispose()
    assert "writeKey" not in payload and SHOP_KEY not in json.dumps(payload)


@sqlite_only
def test_every_call_has_its_endpoint(settings: Settings, client: TestClient) -> None:
    calls = {
        "identify": {"userId": "u1", "traits": {"email": "u1@example.de"}},
        "track": {"userId": "u1", "event": "Product Viewed", "properties": {"product_id": "p1"}},
        "page": {"userId": "u1", "name": "Home"},
        "screen": {"userId": "u1", "name": "Start"},
        "group": {"userId": "u1", "groupId": "g1", "traits": {"name": "Firma"}},
        "alias": {"userId": "u1", "previousId": "anon-9"},
    }
    for call, body in calls.items():
        answer = client.post(f"/v1/{call}", json={**body, "messageId": f"m-{call}", "timestamp": at(1)},
                             headers=auth(BACKEND_KEY))
        assert answer.json() == {"success": True, "accepted": 1, "duplicates": 0}, call
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        types = dict(session.execute(select(col(Event.message_id), col(Event.type))).all())
    engine.dispose()
    assert types == {f"m-{call}": call for call in calls}


# -- what a request must be ----------------------------------------------------------------


@sqlite_only
def test_a_gzip_body_is_accepted(settings: Settings, client: TestClient) -> None:
    body = gzip.compress(json.dumps(batch("m1", "m2")).encode())
    answer = client.post("/v1/batch", content=body, headers={**auth(BACKEND_KEY), "content-encoding": "gzip",
                                                             "content-type": "application/json"})
    assert answer.json() == {"success": True, "accepted": 2, "duplicates": 0}
    assert [message_id for message_id, _ in stored(settings)] == ["m1", "m2"]


def test_malformed_or_oversized_requests_are_400_and_store_nothing(settings: Settings, client: TestClient) -> None:
    large_batch = {"batch": [page(f"m{n:02}", properties={"note": ""}) for n in range(21)]}
    room = 501 * 1024 - len(json.dumps(large_batch))
    for n, event in enumerate(large_batch["batch"]):
        event["properties"]["note"] = "x" * (room // 21 + (room % 21 if n == 20 else 0))
    assert len(json.dumps(large_batch)) == 501 * 1024  # each event under 32 KB: the batch is too large
    large_call = page("m1", properties={"note": "x" * (33 * 1024)})
    unpacked_large = gzip.compress(json.dumps(large_batch).encode())
    for why, path, body, headers, code in [
        ("malformed JSON", "/v1/batch", b'{"batch": [{"type": "page",]}', {}, "invalid_json"),
        ("not an object", "/v1/batch", b"[]", {}, "invalid_json"),
        ("a batch over 500 KB", "/v1/batch", json.dumps(large_batch).encode(), {}, "too_large"),
        ("a call over 32 KB", "/v1/page", json.dumps(large_call).encode(), {}, "too_large"),
        ("gzip over 500 KB unpacked", "/v1/batch", unpacked_large, {"content-encoding": "gzip"}, "too_large"),
        ("gzip cut short", "/v1/batch", gzip.compress(json.dumps(batch("m1")).encode())[:-8],
         {"content-encoding": "gzip"}, "bad_encoding"),
        ("no list of events", "/v1/batch", b'{"events": []}', {}, "invalid_request"),
    ]:
        answer = client.post(path, content=body, headers={**auth(BACKEND_KEY), **headers})
        assert answer.status_code == 400, why
        assert answer.json()["code"] == code and answer.json()["success"] is False, (why, answer.json())
    assert stored(settings) == []


def test_a_bad_event_in_a_batch_is_listed_by_index_and_the_others_are_stored(
        settings: Settings, client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    events = [page("m0"), page("m1"), page("m2", userId=None),
              {"type": "track", "userId": "u1", "event": "Order Completed", "messageId": "m3", "timestamp": at(0),
               "properties": {"order_id": "o1", "total": -5}},
              page("m4")]
    with caplog.at_level(logging.WARNING, logger="flows.surfaces.web_collect"):
        answer = client.post("/v1/batch", json={"batch": events}, headers=auth(BACKEND_KEY))
    assert answer.status_code == 200
    body = answer.json()
    assert (body["success"], body["accepted"], body["duplicates"]) == (True, 3, 0)
    assert [error["index"] for error in body["errors"]] == [2, 3]
    assert body["errors"][0]["reason"].startswith("userId: required")
    assert body["errors"][1]["reason"].startswith("properties.total: Input should be greater than or equal to 0")
    assert [message_id for message_id, _ in stored(settings)] == ["m0", "m1", "m4"]
    logged = [record.getMessage() for record in caplog.records]
    assert any("event 2 of POST /v1/batch refused: userId: required" in line for line in logged), logged
    assert any("event 3 of POST /v1/batch refused: properties.total" in line for line in logged), logged


@sqlite_only
def test_a_request_whose_every_event_is_refused_is_400_invalid_events(settings: Settings, client: TestClient) -> None:
    answer = client.post("/v1/batch", json={"batch": [page("m0", userId=None), page("m1", timestamp="soon")]},
                         headers=auth(BACKEND_KEY))
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_events" and [e["index"] for e in answer.json()["errors"]] == [0, 1]
    single = client.post("/v1/page", json=page("m2", userId=None), headers=auth(BACKEND_KEY))
    assert single.status_code == 400 and single.json()["code"] == "invalid_events"
    assert "userId: required" in single.json()["message"]
    assert stored(settings) == []


def test_a_retried_batch_is_stored_once(settings: Settings, client: TestClient) -> None:
    """Clients retry when an answer is lost: the same messageIds are duplicates, not new events."""
    first = client.post("/v1/batch", json=batch("m1", "m2", "m3"), headers=auth(BACKEND_KEY))
    again = client.post("/v1/batch", json=batch("m1", "m2", "m3"), headers=auth(BACKEND_KEY))
    partly = client.post("/v1/batch", json=batch("m3", "m4"), headers=auth(BACKEND_KEY))
    assert first.json() == {"success": True, "accepted": 3, "duplicates": 0}
    assert again.status_code == 200 and again.json() == {"success": True, "accepted": 0, "duplicates": 3}
    assert partly.json() == {"success": True, "accepted": 1, "duplicates": 1}
    assert [message_id for message_id, _ in stored(settings)] == ["m1", "m2", "m3", "m4"]


@sqlite_only
def test_preflight_unknown_endpoints_and_other_methods(client: TestClient) -> None:
    preflight = client.options("/v1/batch", headers={"origin": "https://shop.example",
                                                     "access-control-request-method": "POST"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert {"authorization", "content-type", "content-encoding"} <= {
        header.strip().lower() for header in preflight.headers["access-control-allow-headers"].split(",")}
    answered = client.post("/v1/batch", json=batch("m1"), headers=auth(BACKEND_KEY))
    assert answered.headers["access-control-allow-origin"] == "*"  # the browser may read the answer
    unknown = client.post("/v1/x", json=batch("m1"), headers=auth(BACKEND_KEY))
    assert unknown.status_code == 404 and unknown.json()["code"] == "not_found"
    got = client.get("/v1/batch")
    assert got.status_code == 405 and got.headers["allow"] == "POST"


# -- durability and load ---------------------------------------------------------------------


def test_an_answered_event_is_already_committed(settings: Settings) -> None:
    """Right after each 200, another connection to the store sees the request's events."""
    server = WebServer(create_app(collecting(settings))).start()
    try:
        with httpx.Client(base_url=server.url, headers=auth(BACKEND_KEY)) as http:
            for request in range(10):
                ids = [f"m{request:02}-{n}" for n in range(5)]
                answer = http.post("/v1/batch", json=batch(*ids))
                assert answer.status_code == 200
                assert [message_id for message_id, _ in stored(settings)][-5:] == ids
                assert len(stored(settings)) == 5 * (request + 1)
    finally:
        server.stop()


class Locked:
    """The SQLite store's write lock, held by another connection (a long writer) until released."""

    def __init__(self, path: str) -> None:
        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.connection.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.connection.execute("ROLLBACK")
        self.connection.close()


def sqlite_path(settings: Settings) -> str:
    return settings.database_url.removeprefix("sqlite:///")


@sqlite_only
def test_a_store_that_cannot_write_is_503_with_retry_after_and_keeps_nothing(settings: Settings) -> None:
    slow = collecting(settings, web_statement_timeout_seconds=0.3)
    with TestClient(create_app(slow)) as client:
        lock = Locked(sqlite_path(settings))
        try:
            answer = client.post("/v1/batch", json=batch("m1", "m2", "m3"), headers=auth(BACKEND_KEY))
        finally:
            lock.release()
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
        assert answer.json()["code"] == "store_unavailable"
        assert stored(settings) == []  # not one of the three
        retried = client.post("/v1/batch", json=batch("m1", "m2", "m3"), headers=auth(BACKEND_KEY))
        assert retried.json() == {"success": True, "accepted": 3, "duplicates": 0}


@sqlite_only
def test_a_store_that_is_down_is_503_with_retry_after(settings: Settings) -> None:
    down = collecting(settings, database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/lifecycle")
    with TestClient(create_app(down)) as client:
        answer = client.post("/v1/batch", json=batch("m1"), headers=auth(BACKEND_KEY))
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"


@sqlite_only
def test_overload_is_503_with_retry_after_and_what_was_queued_still_commits(settings: Settings) -> None:
    """While the store is held up, events pile up waiting for their commit; past
    ``collect_max_pending`` new requests are turned away with Retry-After, none dropped."""
    app = create_app(collecting(settings, collect_max_pending=100, web_statement_timeout_seconds=30))
    server = WebServer(app).start()
    lock = Locked(sqlite_path(settings))
    held: dict[str, Any] = {}
    try:
        with httpx.Client(base_url=server.url, headers=auth(BACKEND_KEY), timeout=60) as http:
            def send_held() -> None:
                held["answer"] = http.post("/v1/batch", json=batch(*(f"a{n:03}" for n in range(150))))

            sender = threading.Thread(target=send_held)
            sender.start()
            deadline = time.monotonic() + 10
            while app.state.events.pending_weight < 150:
                assert time.monotonic() < deadline, "the held batch never queued"
                time.sleep(0.02)
            turned_away = http.post("/v1/batch", json=batch("b1", "b2"))
            assert turned_away.status_code == 503 and turned_away.headers["retry-after"] == "1"
            assert turned_away.json()["code"] == "overloaded"
            assert "answer" not in held  # the queued batch still waits for its commit
            lock.release()
            sender.join(30)
            assert held["answer"].json() == {"success": True, "accepted": 150, "duplicates": 0}
            later = http.post("/v1/batch", json=batch("b1", "b2"))
            assert later.json() == {"success": True, "accepted": 2, "duplicates": 0}
    finally:
        if lock.connection is not None:
            try:
                lock.release()
            except sqlite3.ProgrammingError:
                pass  # released above
        server.stop()
    assert len(stored(settings)) == 152


# -- one event model ---------------------------------------------------------------------------


@sqlite_only
def test_the_same_events_over_http_and_through_ingest_make_the_same_store(
        settings: Settings, client: TestClient, tmp_path: Path) -> None:
    """A shop's day posted to /v1/batch (store X) and loaded by ``lifecycle ingest``'s loader
    (store Y): the same customers, consent, aliases, carts, orders, complaints and events, and
    each bad event refused with the same reason."""
    answer = client.post("/v1/batch", json={"batch": SHOP_DAY}, headers=auth(BACKEND_KEY))
    assert answer.status_code == 200
    ingested = make_engine(f"sqlite:///{tmp_path / 'ingested.db'}")
    create_schema(ingested)
    report = ingest_lines(ingested, [json.dumps(event) for event in SHOP_DAY])
    over_http = {error["index"]: error["reason"] for error in answer.json()["errors"]}
    by_ingest = {line - 1: reason for line, reason in report.errors}
    assert over_http == by_ingest
    assert sorted(over_http) == sorted(REFUSED)
    assert all(over_http[index].startswith(start) for index, start in REFUSED.items()), over_http
    assert answer.json()["accepted"] == report.loaded == len(SHOP_DAY) - len(REFUSED)
    http_store = engine_of(settings)
    try:
        x = snapshot(http_store, events_only=("message_id", "type", "name", "user_id", "timestamp"))
    finally:
        http_store.dispose()
    y = snapshot(ingested, events_only=("message_id", "type", "name", "user_id", "timestamp"))
    ingested.dispose()
    for table in ("customers", "customer_aliases", "carts", "cart_items", "orders", "complaints",
                  "consent_changes", "customer_groups", "events"):
        assert x[table], f"{table}: the day should leave rows in it"
    assert x == y


def engine_of(settings: Settings) -> Engine:
    return make_engine(settings.database_url)
