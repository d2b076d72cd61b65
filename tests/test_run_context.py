"""One run context: made once per run from the project and the settings it is handed, and
sent to sender processes as values."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from flows.run_context import RunContext, prepare
from flows.settings import Settings
from flows.spec.problems import SpecError
from tests.support import ROOT
from tests.support.builders import NOW, Store

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the store is not what is tested here


def test_a_run_validates_its_own_trigger_and_the_shared_files_and_no_other(settings: Settings, store: Store,
                                                                          project_dir: Path) -> None:
    triggers, templates = project_dir / "triggers", project_dir / "templates"
    cart = triggers / "abandoned_cart.yaml"
    cart.write_text(cart.read_text().replace("kind:", "kind: [", 1))  # another trigger's file, broken
    (templates / "abandoned_cart" / "default.en.html.j2").write_text("{{ cart.nope( }}")  # and its template
    context = prepare("winback-lapsed", NOW, settings=settings)
    assert context.trigger.name == "winback-lapsed"
    with pytest.raises(SpecError, match=r"abandoned_cart\.yaml:"):
        prepare("abandoned-cart", NOW, settings=settings)

    stages = triggers / "stages.yaml"
    stages.write_text(stages.read_text() + "\nbogus: 1\n")  # a shared file: every run checks it
    with pytest.raises(SpecError, match=r"stages\.yaml"):
        prepare("winback-lapsed", NOW, settings=settings)


def test_a_misspelt_trigger_is_still_suggested_when_only_one_trigger_is_read(settings: Settings,
                                                                          store: Store) -> None:
    with pytest.raises(SpecError, match=r"did you mean 'winback-lapsed'\?.*valid: abandoned-cart, "):
        prepare("winback-lapsd", NOW, settings=settings)


def test_the_settings_handed_in_are_the_ones_used_whatever_the_environment_says(
        settings: Settings, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIFECYCLE_BATCH_SIZE", "7")
    monkeypatch.setenv("LIFECYCLE_SENDER", "Elsewhere <no@elsewhere.example>")
    context = prepare("winback-lapsed", NOW, settings=settings.model_copy(update={"batch_size": 3}))
    assert context.settings.batch_size == 3 and context.sender.domain == "shop.example"
    assert context.settings.secret is not None  # resolved once, in the context


def test_a_sender_receives_the_context_as_values_and_makes_its_own_catalog_and_store(settings: Settings,
                                                                                   store: Store) -> None:
    context = prepare("winback-lapsed", NOW, settings=settings, run_id="run-1")
    blob = pickle.dumps(context)
    assert b"jinja2" not in blob and b"sqlalchemy" not in blob  # no compiled template, no engine
    code = (
        "import pickle, sys; c = pickle.load(sys.stdin.buffer); "
        "print(type(c).__name__, c.trigger.name, c.run_id, c.now.isoformat(), c.kind.name, "
        "c.catalog.root == c.settings.templates_dir, c.engine.url.database.endswith('store.db'), "
        "c.settings.signing_secret == 'test-secret-0123456789')"
    )
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, check=True, cwd=ROOT).stdout
    assert out.decode().split() == ["RunContext", "winback-lapsed", "run-1", NOW.isoformat(), "campaign", "True",
                                    "True", "True"]
    assert isinstance(pickle.loads(blob), RunContext)
