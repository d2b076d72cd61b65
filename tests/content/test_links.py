"""Signed tokens are scoped: each names its purpose, customer and subject, and works on its own route only."""

from datetime import timedelta

import httpx
import pytest
from itsdangerous import URLSafeSerializer
from sqlmodel import Session

from flows.content.links import (
    CONFIRM,
    PREFERENCES,
    PREVIEW,
    PREVIEW_DAYS,
    PURPOSES,
    UNSUBSCRIBE,
    address_tag,
    confirm_url,
    expired,
    preferences_url,
    preview_url,
    read,
    read_verp_token,
    unsubscribe_url,
    verp_token,
)
from flows.settings import Settings
from flows.surfaces.web import create_app
from models import Suppression
from tests.support.builders import NOW, Store
from tests.support.web_server import WebServer

SECRET = "a-test-secret-0123456789"


def token(url: str) -> str:
    return url.rsplit("/", 1)[1]


def every_kind(customer: str = "c-1") -> dict[str, str]:
    return {
        UNSUBSCRIBE: token(unsubscribe_url("", SECRET, customer, "campaign")),
        PREFERENCES: token(preferences_url("", SECRET, customer)),
        CONFIRM: token(confirm_url("", SECRET, customer, "request:20260316T080000Z", NOW + timedelta(days=7),
                                   "kundin@example.de")),
        PREVIEW: token(preview_url("", SECRET, "winback-lapsed", "lapsed", "de", NOW)),
    }


def test_each_token_names_its_purpose_and_what_it_is_about() -> None:
    tokens = every_kind()
    assert read(SECRET, UNSUBSCRIBE, tokens[UNSUBSCRIBE]) == {"p": "unsubscribe", "c": "c-1", "k": "campaign"}
    assert read(SECRET, PREFERENCES, tokens[PREFERENCES]) == {"p": "preferences", "c": "c-1"}
    confirm = read(SECRET, CONFIRM, tokens[CONFIRM])
    assert confirm["p"] == "confirm" and confirm["r"] == "request:20260316T080000Z"
    assert confirm["a"] == address_tag(SECRET, "Kundin@Example.DE") != address_tag(SECRET, "kunde@example.de")
    assert "kundin" not in str(confirm)  # the address is named by a keyed tag, not shown
    assert confirm["x"] == int((NOW + timedelta(days=7)).timestamp())
    preview = read(SECRET, PREVIEW, tokens[PREVIEW])
    assert (preview["p"], preview["t"], preview["s"], preview["l"]) == ("preview", "winback-lapsed", "lapsed", "de")


@pytest.mark.parametrize("made_for", list(PURPOSES))
def test_a_token_is_refused_for_any_other_purpose(made_for: str) -> None:
    made = every_kind()[made_for]
    for purpose in PURPOSES:
        assert (read(SECRET, purpose, made) is not None) == (purpose == made_for)
    assert read_verp_token(SECRET, made) is None


def test_the_purpose_inside_is_checked_even_under_the_right_salt() -> None:
    """A token whose signed data names another purpose (a signing mistake) is refused too."""
    mislabelled = URLSafeSerializer(SECRET, salt=UNSUBSCRIBE).dumps({"p": "confirm", "c": "c-1", "k": "campaign"})
    assert read(SECRET, UNSUBSCRIBE, mislabelled) is None


def test_links_mailed_before_tokens_named_their_purpose_still_unsubscribe_but_never_confirm() -> None:
    old_unsubscribe = URLSafeSerializer(SECRET, salt=UNSUBSCRIBE).dumps({"c": "c-1", "k": "campaign"})
    old_confirm = URLSafeSerializer(SECRET, salt=CONFIRM).dumps({"c": "c-1"})
    assert read(SECRET, UNSUBSCRIBE, old_unsubscribe) == {"c": "c-1", "k": "campaign"}
    assert read(SECRET, CONFIRM, old_confirm) is None


def test_unsubscribe_and_preference_links_never_expire_but_confirm_and_preview_links_do() -> None:
    tokens = every_kind()
    much_later = NOW + timedelta(days=3650)
    assert not expired(read(SECRET, UNSUBSCRIBE, tokens[UNSUBSCRIBE]), much_later)
    assert not expired(read(SECRET, PREFERENCES, tokens[PREFERENCES]), much_later)
    confirm, preview = read(SECRET, CONFIRM, tokens[CONFIRM]), read(SECRET, PREVIEW, tokens[PREVIEW])
    assert not expired(confirm, NOW + timedelta(days=7) - timedelta(seconds=1))
    assert expired(confirm, NOW + timedelta(days=7))
    assert not expired(preview, NOW + timedelta(days=PREVIEW_DAYS - 1))
    assert expired(preview, NOW + timedelta(days=PREVIEW_DAYS))
    assert expired({"x": "tomorrow"}, NOW) and expired({"x": True}, NOW)


def test_verp_tokens_are_their_own_scope() -> None:
    made = verp_token(SECRET, "winback-lapsed/1/slot")
    assert read_verp_token(SECRET, made) is not None
    assert all(read(SECRET, purpose, made) is None for purpose in PURPOSES)


ROUTES = {UNSUBSCRIBE: "u", PREFERENCES: "preferences", CONFIRM: "confirm", PREVIEW: "preview"}


def test_over_http_each_token_works_on_its_own_route_only(settings: Settings, store: Store) -> None:
    customer = store.customer("Lena")
    secret = settings.signing_secret
    tokens = {
        UNSUBSCRIBE: token(unsubscribe_url("", secret, customer.external_id, "campaign")),
        PREFERENCES: token(preferences_url("", secret, customer.external_id)),
        CONFIRM: token(confirm_url("", secret, customer.external_id, "request:20260316T080000Z",
                                   NOW + timedelta(days=7), customer.email)),
        PREVIEW: token(preview_url("", secret, "winback-lapsed", "lapsed", "de", NOW)),
    }
    server = WebServer(create_app(settings, clock=lambda: NOW)).start()
    try:
        for made_for, made in tokens.items():
            for purpose, route in ROUTES.items():
                status = httpx.get(f"{server.url}/{route}/{made}", timeout=30).status_code
                if purpose == made_for:
                    assert status != 404, (made_for, route)
                else:
                    assert status == 404, (made_for, route)
                    posted = httpx.post(f"{server.url}/{route}/{made}", timeout=30,
                                        data={"List-Unsubscribe": "One-Click", "confirm": "1", "all": "1"})
                    assert posted.status_code in (404, 405), (made_for, route)
    finally:
        server.stop()
    with Session(store.engine) as session:
        assert session.get(Suppression, customer.email.lower()) is None  # no foreign token changed anything
