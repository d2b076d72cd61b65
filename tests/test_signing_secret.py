"""The signing secret: LIFECYCLE_SECRET, or a random one the store keeps; never a secret anyone knows."""

import logging
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from itsdangerous import URLSafeSerializer
from sqlalchemy import Engine
from sqlmodel import Session

from flows.content.links import CONFIRM, PREFERENCES, UNSUBSCRIBE, unsubscribe_url
from flows.settings import Settings
from flows.signing_secret import STORE_KEY, resolved
from flows.surfaces.web import create_app
from models import StoreMeta, Suppression
from tests.support import ROOT
from tests.support.builders import Store
from tests.support.web_server import WebServer

# What every process used to sign with unless told otherwise; published with the code.
PUBLISHED = "lifecycle-development-secret-do-not-use-in-production"


@pytest.fixture
def unset(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> Settings:
    """The test's settings without LIFECYCLE_SECRET, as a developer's first run has them."""
    monkeypatch.delenv("LIFECYCLE_SECRET")
    return settings.model_copy(update={"secret": None})


def test_a_store_without_lifecycle_secret_makes_a_random_one_once_and_keeps_it(unset: Settings, engine: Engine,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flows.signing_secret"):
        first = resolved(unset, engine).signing_secret
    again = resolved(unset, engine).signing_secret
    assert first == again and len(first) >= 48 and first != PUBLISHED
    with Session(engine) as session:
        assert session.get(StoreMeta, STORE_KEY).value == first
    assert "LIFECYCLE_SECRET is not set" in caplog.text
    assert first not in caplog.text  # the warning never shows the secret


def test_every_process_on_the_store_signs_with_the_same_secret(unset: Settings, engine: Engine, db_url: str) -> None:
    mine = resolved(unset, engine).signing_secret
    script = ("import hashlib; from flows.settings import Settings; from flows.signing_secret import resolved; "
              "print(hashlib.sha256(resolved(Settings()).signing_secret.encode()).hexdigest())")
    # Its own environment, not child_env: a process that knows nothing but the store's URL.
    env = {"PATH": "/usr/bin:/bin", "LIFECYCLE_DATABASE_URL": db_url, "PYTHONPATH": str(ROOT)}
    theirs = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                            cwd=ROOT).stdout.strip()
    import hashlib

    assert theirs == hashlib.sha256(mine.encode()).hexdigest()


def test_two_stores_get_different_secrets(unset: Settings, engine: Engine, tmp_path: Path) -> None:
    from models.db import create_schema, make_engine

    other = make_engine(f"sqlite:///{tmp_path / 'other.db'}")
    create_schema(other)
    assert resolved(unset, engine).signing_secret != resolved(unset, other).signing_secret


def test_an_explicit_secret_is_used_as_it_is(settings: Settings, engine: Engine) -> None:
    assert resolved(settings, engine) is settings
    with Session(engine) as session:
        assert session.get(StoreMeta, STORE_KEY) is None  # nothing made, nothing stored


@pytest.mark.parametrize("explicit", [False, True], ids=["store-secret", "lifecycle-secret"])
def test_tokens_signed_with_the_published_string_are_refused(explicit: bool, unset: Settings, settings: Settings,
                                                             store: Store) -> None:
    customer = store.customer("Lena")
    server = WebServer(create_app(settings if explicit else unset)).start()
    try:
        forged_unsubscribe = unsubscribe_url(server.url, PUBLISHED, customer.external_id, "campaign")
        assert httpx.post(forged_unsubscribe, data={"List-Unsubscribe": "One-Click"}, timeout=30).status_code == 404
        for purpose, path, data in ((UNSUBSCRIBE, "u", {"c": customer.external_id, "k": "campaign"}),
                                    (PREFERENCES, "preferences", {"c": customer.external_id}),
                                    (CONFIRM, "confirm", {"c": customer.external_id})):
            old_style = URLSafeSerializer(PUBLISHED, salt=purpose).dumps(data)
            assert httpx.get(f"{server.url}/{path}/{old_style}", timeout=30).status_code == 404
    finally:
        server.stop()
    with Session(store.engine) as session:
        assert session.get(Suppression, customer.email.lower()) is None


def test_no_published_secret_is_left_in_the_code() -> None:
    sources = [p for folder in ("flows", "models", "bench") for p in (ROOT / folder).rglob("*.py")]
    assert sources and not [p for p in sources if PUBLISHED in p.read_text(encoding="utf-8")]
