"""The post-purchase kind: due ``after`` an order event, up to ``catch_up`` late, one occurrence
per event, for the customer the event is about. Real runs over SQLite and PostgreSQL."""

import json
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, select
from sqlmodel import Session, col

from flows.ingest import ingest_lines
from flows.settings import Settings
from flows.spec.project import load_project
from models import Customer, Event, Send
from tests.support.builders import NOW, Store, ago
from tests.support.runs import run
from tests.support.smtp_server import SmtpServer

TRIGGER = """\
name: review-request
description: Ask for a review a week after the order.
kind: post_purchase
event: Order Completed
after: 7d
schedule: {cron: "0 11 * * *", timezone: Europe/Berlin}
email: {template: we_miss_you, subject: "Wie gefällt dir deine Bestellung?"}
"""


def track(engine: Engine, user: str, event: str, at: datetime, message: str) -> None:
    line = {"type": "track", "userId": user, "event": event, "timestamp": at.isoformat(), "messageId": message,
            "properties": {"order_id": message, "revenue": 20, "currency": "EUR"}}
    assert ingest_lines(engine, [json.dumps(line)]).errors == []


def sent(engine: Engine) -> list[tuple[int, str]]:
    with Session(engine) as session:
        return list(session.execute(select(Send.customer_id, Send.occurrence)
                                    .where(col(Send.trigger) == "review-request").order_by(col(Send.id))).tuples())


def event_id(engine: Engine, message: str) -> int:
    with Session(engine) as session:
        found = session.execute(select(Event.id).where(col(Event.message_id) == message)).scalar_one()
        assert found is not None
        return found


def test_each_order_event_is_due_once_after_its_wait_within_the_catch_up(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    (Path(settings.triggers_dir) / "review.yaml").write_text(TRIGGER)
    anna, ben, cem, dora = (store.customer(name) for name in ("Anna", "Ben", "Cem", "Dora"))
    track(engine, anna.external_id, "Order Completed", ago(days=7, hours=1), "a-1")
    track(engine, anna.external_id, "Order Completed", ago(days=8), "a-2")  # a second order: its own occurrence
    track(engine, ben.external_id, "Order Completed", ago(days=6), "b-1")  # not a week yet
    track(engine, cem.external_id, "Order Completed", ago(days=9, hours=1), "c-1")  # past the 2 days' catch-up
    track(engine, dora.external_id, "Order Delivered", ago(days=7, hours=1), "d-1")  # another event
    track(engine, "guest-without-record", "Order Completed", ago(days=7, hours=1), "g-1")

    run(settings, "review-request")
    assert sorted(sent(engine)) == sorted([(anna.id, f"event:{event_id(engine, 'a-1')}"),
                                           (anna.id, f"event:{event_id(engine, 'a-2')}")])
    run(settings, "review-request", NOW + timedelta(hours=1))
    assert len(sent(engine)) == 2  # the same events again: nobody twice
    run(settings, "review-request", NOW + timedelta(days=1))
    assert sent(engine)[-1] == (ben.id, f"event:{event_id(engine, 'b-1')}")
    with Session(engine) as session:
        guest = session.execute(select(Customer).where(col(Customer.external_id) == "guest-without-record"))
        assert guest.scalar_one().email is None  # ingest made a record, but there is nowhere to write


def test_the_kind_names_its_parameters_when_one_is_wrong(tmp_path: Path, project_dir: Path) -> None:
    (project_dir / "triggers" / "review.yaml").write_text(TRIGGER.replace("after: 7d", "afetr: 7d"))
    project = load_project(project_dir / "triggers", project_dir / "templates")
    messages = [str(p) for p in project.problems if p.file.name == "review.yaml"]
    assert any("review.yaml:5:" in m and "did you mean 'after'" in m for m in messages), messages
    assert "review-request" not in project.triggers
