"""Consent: every change recorded with time, source and request; nothing old undoes an unsubscribe."""

import json
from datetime import datetime, timedelta

from sqlalchemy import Engine, select
from sqlmodel import Session

from flows.consent import Confirmation, check, history, request_id
from flows.content.links import address_tag
from flows.ingest import ingest_lines
from models import Customer, Suppression
from tests.support.builders import NOW, Store, ago

_messages = iter(range(1, 10_000))
SECRET = "a-test-secret-0123456789"


def identify(engine: Engine, at: datetime, **traits: object) -> None:
    event = {"type": "identify", "userId": "kundin-1", "timestamp": at.isoformat(), "messageId": f"m{next(_messages)}",
             "traits": {"email": "kundin@example.de", **traits}}
    report = ingest_lines(engine, [json.dumps(event)])
    assert report.ok, report


def unsubscribed(engine: Engine, at: datetime) -> None:
    event = {"type": "track", "event": "Unsubscribed", "userId": "kundin-1", "timestamp": at.isoformat(),
             "messageId": f"m{next(_messages)}"}
    assert ingest_lines(engine, [json.dumps(event)]).ok


def kundin(engine: Engine) -> Customer:
    with Session(engine) as session:
        return session.execute(select(Customer).where(Customer.external_id == "kundin-1")).scalar_one()


def changes(engine: Engine) -> list[tuple[str, str, str | None]]:
    with Session(engine) as session:
        return [(c.change, c.source, c.request) for c in history(session, kundin(engine).id)]


def test_every_change_the_shop_reports_is_recorded_with_its_time_source_and_request(engine: Engine) -> None:
    identify(engine, ago(days=3), marketing_consent=True, consent_source="checkout")
    unsubscribed(engine, ago(days=2))
    identify(engine, ago(days=1), marketing_consent=True, consent_confirmed=True, consent_source="newsletter form")
    assert changes(engine) == [
        ("requested", "checkout", request_id(ago(days=3))),
        ("withdrawn", "Unsubscribed event", None),
        ("confirmed", "newsletter form", None),
    ]
    with Session(engine) as session:
        assert [c.at for c in history(session, kundin(engine).id)] == [ago(days=3), ago(days=2), ago(days=1)]


def test_an_opt_in_dated_before_the_unsubscribe_never_undoes_it(engine: Engine) -> None:
    """An export replayed, or a retry that arrives late: history, not a new consent."""
    identify(engine, ago(days=3), marketing_consent=True, consent_confirmed=True)
    unsubscribed(engine, ago(days=2))
    identify(engine, ago(days=3) + timedelta(hours=1), marketing_consent=True, consent_confirmed=True)
    identify(engine, ago(days=3) + timedelta(hours=2), marketing_consent=True)
    customer = kundin(engine)
    assert not customer.marketing_consent and customer.consent_requested_at is None
    assert [c[0] for c in changes(engine)] == ["confirmed", "withdrawn"]


def test_a_new_opt_in_after_the_unsubscribe_is_a_new_request(engine: Engine) -> None:
    identify(engine, ago(days=3), marketing_consent=True)
    unsubscribed(engine, ago(days=2))
    identify(engine, ago(days=1), marketing_consent=True)
    customer = kundin(engine)
    assert customer.consent_requested_at == ago(days=1) and not customer.marketing_consent
    assert changes(engine)[-1] == ("requested", "shop", request_id(ago(days=1)))


def test_a_refusal_repeated_on_every_identify_is_recorded_once(engine: Engine) -> None:
    for days in (3, 2, 1):
        identify(engine, ago(days=days), marketing_consent=False)
    assert changes(engine) == [("withdrawn", "shop", None)]
    assert kundin(engine).consent_withdrawn_at == ago(days=3)  # a merge lets this refusal win


def test_a_request_is_void_once_the_address_is_suppressed_after_it(engine: Engine, store: Store) -> None:
    identify(engine, ago(days=1), marketing_consent=True)
    token = {"p": "confirm", "c": "kundin-1", "r": request_id(ago(days=1)),
             "a": address_tag(SECRET, "kundin@example.de"), "x": int((NOW + timedelta(days=7)).timestamp())}
    with Session(engine) as session:
        customer = session.execute(select(Customer).where(Customer.external_id == "kundin-1")).scalar_one()
        assert check(session, customer, token, at=NOW, secret=SECRET) is Confirmation.CONFIRMED
        session.add(Suppression(email="kundin@example.de", reason="spam_complaint", created_at=ago(hours=2)))
        session.flush()
        assert check(session, customer, token, at=NOW, secret=SECRET) is Confirmation.SPENT
        earlier = {**token, "r": request_id(ago(days=2))}
        assert check(session, customer, earlier, at=NOW, secret=SECRET) is Confirmation.SPENT
