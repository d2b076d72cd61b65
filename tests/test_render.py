"""Rendering: stage and language pick the template; data is escaped; mistakes are loud."""

from pathlib import Path

import pytest

from flows.context import sample_contexts
from flows.render import RenderError, TemplateCatalog, language_of
from flows.spec.common import EmailSpec


@pytest.fixture
def catalog(tmp_path: Path) -> TemplateCatalog:
    folder = tmp_path / "offer"
    folder.mkdir()
    (folder / "default.html.j2").write_text("<p>default {{ lang }}</p>")
    (folder / "default.de.html.j2").write_text("<p>Hallo {{ customer.first_name }}</p>")
    (folder / "loyal.de.html.j2").write_text("<p>Treue {{ customer.first_name }}</p>")
    (folder / "loyal.html.j2").write_text("<p>loyal any</p>")
    (folder / "default.de.txt.j2").write_text("Hallo {{ customer.first_name }} (Text)")
    return TemplateCatalog(tmp_path, default_language="en")


def context(**overrides):
    base = sample_contexts(None, "https://u.example", "https://shop.example")[0]
    return {**base, "stage": "active", "lang": "de", **overrides}


@pytest.mark.parametrize(("stage", "lang", "expected"), [
    ("loyal", "de", "offer/loyal.de.html.j2"),   # stage and language
    ("active", "de", "offer/default.de.html.j2"),  # the language beats the stage
    ("loyal", "fr", "offer/loyal.html.j2"),      # no French: stage without language
    ("active", "fr", "offer/default.html.j2"),
])
def test_template_resolution_order(catalog: TemplateCatalog, stage: str, lang: str, expected: str) -> None:
    assert catalog.resolve("offer", stage, lang) == expected


def test_text_part_uses_the_txt_template_or_is_derived_from_html(catalog: TemplateCatalog) -> None:
    email = EmailSpec(template="offer", subject="Hi")
    german = catalog.render(email, context())
    assert german.text == "Hallo Jürgen (Text)"
    english = catalog.render(email, context(lang="en"))
    assert english.text == "default en\n"


def test_html_is_autoescaped_but_subjects_are_plain_text(catalog: TemplateCatalog) -> None:
    evil = context()["customer"].__class__("c", "e@x.de", "<script>alert(1)</script>", None, "de", "de")
    email = EmailSpec(template="offer", subject="Hallo {{ customer.first_name }}")
    rendered = catalog.render(email, context(customer=evil))
    assert "<script>" not in rendered.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered.html
    assert rendered.subject == "Hallo <script>alert(1)</script>"  # a header is not HTML: no entities


def test_subjects_lose_line_breaks(catalog: TemplateCatalog) -> None:
    sneaky = context()["customer"].__class__("c", "e@x.de", "Eve\r\nBcc: all@x.de", None, "de", "de")
    rendered = catalog.render(EmailSpec(template="offer", subject="Hi {{ customer.first_name }}"), context(customer=sneaky))
    assert "\n" not in rendered.subject and "\r" not in rendered.subject
    assert rendered.subject == "Hi Eve Bcc: all@x.de"


def test_undefined_names_fail_with_the_template_line(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "default.html.j2").write_text("<p>ok</p>\n<p>{{ custmer.name }}</p>\n")
    catalog = TemplateCatalog(tmp_path)
    with pytest.raises(RenderError) as error:
        catalog.render(EmailSpec(template="t", subject="x"), context())
    assert error.value.file == "t/default.html.j2" and error.value.line == 2
    assert "'custmer' is undefined; the context has: customer, stage" in str(error.value)


def test_the_sandbox_blocks_unsafe_attribute_access(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "default.html.j2").write_text("{{ customer.__class__.__init__.__globals__ }}")
    with pytest.raises(RenderError):
        TemplateCatalog(tmp_path).render(EmailSpec(template="t", subject="x"), context())


@pytest.mark.parametrize(("lang", "expected"), [("de", "59,90\xa0€"), ("en", "€59.90")])
def test_money_is_formatted_per_language(tmp_path: Path, lang: str, expected: str) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "default.html.j2").write_text("{{ 5990 | money('EUR') }}")
    rendered = TemplateCatalog(tmp_path).render(EmailSpec(template="t", subject="x"), context(lang=lang))
    assert rendered.html == expected


@pytest.mark.parametrize(("locale", "expected"), [("de-AT", "de"), ("en_GB", "en"), ("", "en"), (None, "en"), ("??", "en")])
def test_language_of_locale(locale: str | None, expected: str) -> None:
    assert language_of(locale, "en") == expected
