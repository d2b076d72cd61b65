"""Rendering: stage and language pick the template; data is escaped; mistakes are loud."""

from pathlib import Path

import pytest

from flows.content.context import sample_contexts
from flows.content.render import RenderError, TemplateCatalog, language_of
from flows.settings import Settings
from flows.spec.common import EmailSpec
from tests.support.builders import Store, ago
from tests.support.smtp_server import SmtpServer


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
    rendered = catalog.render(EmailSpec(template="offer", subject="Hi {{ customer.first_name }}"),
                              context(customer=sneaky))
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
    email = EmailSpec(template="t", subject={"de": "x", "en": "x"})  # a language-neutral template, both languages named
    rendered = TemplateCatalog(tmp_path).render(email, context(lang=lang))
    assert rendered.html == expected


@pytest.mark.parametrize(("locale", "expected"),
                         [("de-AT", "de"), ("en_GB", "en"), ("", "en"), (None, "en"), ("??", "en")])
def test_language_of_locale(locale: str | None, expected: str) -> None:
    assert language_of(locale, "en") == expected


# -- one language per mail ---------------------------------------------------------

@pytest.fixture
def bilingual(tmp_path: Path) -> TemplateCatalog:
    """German and English templates that show their language, money and a date."""
    folder = tmp_path / "offer"
    folder.mkdir()
    for lang, words in (("de", "Hallo"), ("en", "Hello")):
        (folder / f"default.{lang}.html.j2").write_text(
            f"<p>{words} {{{{ lang }}}} {{{{ 5990 | money('EUR') }}}} {{{{ now | date }}}}</p>")
    (folder / "default.en.txt.j2").write_text("Hello (text)")
    return TemplateCatalog(tmp_path, default_language="en")


GERMAN_FIRST = EmailSpec(template="offer", subject={"de": "Betreff", "en": "Subject"})


def test_a_language_without_templates_or_subject_gets_the_default_language_everywhere(
        bilingual: TemplateCatalog) -> None:
    rendered = bilingual.render(GERMAN_FIRST, context(lang="fr"))
    assert rendered.subject == "Subject"  # not the first subject in the file (German)
    assert rendered.html.startswith("<p>Hello en €59.90 ")  # body, `lang` and money agree
    assert "Mar 14, 2026" in rendered.html  # and the date
    assert rendered.text == "Hello (text)"
    assert rendered.language == "en"


def test_a_language_with_templates_but_no_subject_falls_back_as_a_whole(bilingual: TemplateCatalog) -> None:
    (bilingual.root / "offer" / "default.fr.html.j2").write_text("<p>Bonjour {{ 5990 | money('EUR') }}</p>")
    catalog = TemplateCatalog(bilingual.root, default_language="en")
    rendered = catalog.render(GERMAN_FIRST, context(lang="fr"))
    assert (rendered.subject, rendered.language) == ("Subject", "en")
    assert "Hello en €59.90" in rendered.html and "Bonjour" not in rendered.html


def test_a_language_with_a_subject_but_no_template_falls_back_as_a_whole(bilingual: TemplateCatalog) -> None:
    email = EmailSpec(template="offer", subject={"fr": "Objet", "de": "Betreff", "en": "Subject"})
    rendered = bilingual.render(email, context(lang="fr"))
    assert (rendered.subject, rendered.language) == ("Subject", "en")
    assert "59,90" not in rendered.html


def test_the_customer_s_language_is_used_when_it_has_templates_and_a_subject(bilingual: TemplateCatalog) -> None:
    rendered = bilingual.render(GERMAN_FIRST, context(lang="de"))
    assert (rendered.subject, rendered.language) == ("Betreff", "de")
    assert rendered.html.startswith("<p>Hallo de 59,90\xa0€ ")


def test_the_text_part_never_comes_from_another_language(bilingual: TemplateCatalog) -> None:
    rendered = bilingual.render(GERMAN_FIRST, context(lang="de"))
    assert "Hello" not in rendered.text and rendered.text.startswith("Hallo de 59,90")  # derived from the HTML


def test_a_plain_subject_serves_every_language_with_templates(bilingual: TemplateCatalog) -> None:
    email = EmailSpec(template="offer", subject="{{ lang }}")
    assert bilingual.languages_for(email) == {"de", "en"}
    assert bilingual.render(email, context(lang="de")).subject == "de"
    assert bilingual.render(email, context(lang="fr")).subject == "en"


def test_the_customer_view_speaks_the_language_actually_used(bilingual: TemplateCatalog) -> None:
    (bilingual.root / "offer" / "default.en.html.j2").write_text("<p>{{ customer.language }} {{ customer.locale }}</p>")
    catalog = TemplateCatalog(bilingual.root, default_language="en")
    french = context()["customer"].__class__("c", "e@x.fr", "Léa", None, "fr-FR", "fr")
    rendered = catalog.render(GERMAN_FIRST, context(lang="fr", customer=french))
    assert rendered.html == "<p>en fr-FR</p>"  # the locale stays the customer's own


@pytest.mark.parametrize(("files", "subject", "expected"), [
    (["default.de.html.j2", "default.en.html.j2"], {"de": "x", "en": "y"}, {"de", "en"}),
    (["default.de.html.j2", "default.en.html.j2"], {"en": "y"}, {"en"}),                  # de: no subject
    (["default.de.html.j2", "default.en.html.j2"], {"fr": "x", "en": "y"}, {"en"}),       # fr: no template
    (["loyal.fr.html.j2", "default.en.html.j2"], {"fr": "x", "en": "y"}, {"en"}),         # fr only for one stage
    (["loyal.fr.html.j2", "default.html.j2"], {"fr": "x", "en": "y"}, {"en", "fr"}),      # neutral covers the rest
    (["default.html.j2"], "plain", {"en"}),                                               # nothing names a language
    (["default.html.j2"], {"de": "x", "en": "y"}, {"de", "en"}),
    (["default.de.txt.j2", "default.en.html.j2"], {"de": "x", "en": "y"}, {"en"}),        # a text part is no body
])
def test_languages_for_an_email(tmp_path: Path, files: list[str], subject: object, expected: set[str]) -> None:
    (tmp_path / "t").mkdir()
    for name in files:
        (tmp_path / "t" / name).write_text("<p>x</p>")
    email = EmailSpec(template="t", subject=subject)
    assert TemplateCatalog(tmp_path, default_language="en").languages_for(email) == frozenset(expected)


@pytest.mark.parametrize(("locale", "expected"), [("de-AT", "de"), ("fr-FR", "en"), (None, "en"), ("EN_gb", "en")])
def test_language_of_a_locale_among_the_supported_languages(locale: str | None, expected: str) -> None:
    assert language_of(locale, "en", frozenset({"de", "en"})) == expected


def test_language_of_without_supported_languages_keeps_the_locale_s_language() -> None:
    assert language_of("fr-FR", "en") == "fr"


def test_a_french_customer_in_a_real_run_gets_subject_body_and_money_all_in_the_default_language(
        settings: Settings, store: Store, smtp: SmtpServer) -> None:
    from tests.support.runs import run

    templates = Path(settings.templates_dir) / "winback"
    for name in ("default.de.html.j2", "default.en.html.j2"):  # the shipped win-back shows no amount: add one
        path = templates / name
        path.write_text(path.read_text().replace("{% endblock %}", "<p>{{ 1500 | money('EUR') }}</p>\n{% endblock %}"))
    lea = store.customer("Léa", locale="fr-FR")
    store.order(lea, ago(days=500))
    summary = run(settings, "winback-lapsed")
    assert summary.outcomes == {"sent": 1}
    [mail] = [r.message for r in smtp.handler.to(lea.email)]
    assert mail["Subject"] == "Léa, 15% off just for you"
    html = mail.get_body(("html",)).get_content()
    assert "it has been more than a year" in html
    assert "€15.00" in html and "15,00" not in html
    assert f"{ago(days=500):%b} {ago(days=500).day}, {ago(days=500).year}" in html  # an English date


# -- budgets: a hanging or exploding template is stopped, located; nothing else waits ----

def hanging(tmp_path: Path, body: str, **limits: float) -> TemplateCatalog:
    folder = tmp_path / "offer"
    folder.mkdir()
    (folder / "default.html.j2").write_text("<p>Hi</p>\n" + body + "\n")
    catalog = TemplateCatalog(tmp_path, default_language="en")
    for name, value in limits.items():
        setattr(catalog.env, name, value)
    return catalog


def test_nested_range_loops_are_stopped_by_the_step_budget_with_their_line(tmp_path: Path) -> None:
    catalog = hanging(tmp_path, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    with pytest.raises(RenderError) as caught:
        catalog.render(EmailSpec(template="offer", subject="Hi"), context(lang="en"))
    assert (caught.value.file, caught.value.line) == ("offer/default.html.j2", 2)
    assert "1,000,000 steps" in str(caught.value)


def test_a_render_is_stopped_by_the_time_budget_with_its_line(tmp_path: Path) -> None:
    # Few steps, each slow (a sort of 100,000 numbers): the step budget alone would allow hours.
    catalog = hanging(tmp_path, "{% for i in range(100000) %}{% for j in range(100000) %}"
                                "{% set s = range(100000)|reverse|sort %}{% endfor %}{% endfor %}",
                      time_budget=0.5, max_steps=10**12)
    with pytest.raises(RenderError) as caught:
        catalog.render(EmailSpec(template="offer", subject="Hi"), context(lang="en"))
    assert (caught.value.file, caught.value.line) == ("offer/default.html.j2", 2)
    assert "time budget of 0.5 s" in str(caught.value)


def test_output_over_the_budget_is_stopped_with_its_line(tmp_path: Path) -> None:
    catalog = hanging(tmp_path, "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}")
    with pytest.raises(RenderError) as caught:
        catalog.render(EmailSpec(template="offer", subject="Hi"), context(lang="en"))
    assert (caught.value.file, caught.value.line) == ("offer/default.html.j2", 2)
    assert "1,000,000 characters of output" in str(caught.value)


@pytest.mark.parametrize("expression",
                         ["'x' * 10 ** 10", "[0] * 10 ** 9", "2 ** (10 ** 10)", "(10 ** 1000) * (10 ** 1000)"])
def test_star_and_power_cannot_build_huge_values(tmp_path: Path, expression: str) -> None:
    catalog = hanging(tmp_path, "{{ (" + expression + ")|length }}")
    with pytest.raises(RenderError, match=r"offer/default.html.j2:2: stopped: \*\*? would build"):
        catalog.render(EmailSpec(template="offer", subject="Hi"), context(lang="en"))


def test_subjects_have_the_same_budget(tmp_path: Path) -> None:
    catalog = hanging(tmp_path, "")
    subject = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}Hi"
    with pytest.raises(RenderError, match="subject: stopped: over the render budget"):
        catalog.render(EmailSpec(template="offer", subject=subject), context(lang="en"))


def test_a_template_over_budget_is_not_tried_again_in_the_same_catalog(tmp_path: Path) -> None:
    # Data-dependent: only a customer named Hang makes it loop for ever.
    catalog = hanging(tmp_path, "{% for i in range(100000 if customer.first_name == 'Hang' else 1) %}"
                                "{% for j in range(100000) %}{% endfor %}{% endfor %}")
    email = EmailSpec(template="offer", subject="Hi")
    assert catalog.render(email, context(lang="en")).html.startswith("<p>Hi</p>")
    hang = context()["customer"].__class__("c", "e@x.de", "Hang", None, "en", "en")
    with pytest.raises(RenderError, match="steps") as first:
        catalog.render(email, context(lang="en", customer=hang))
    with pytest.raises(RenderError) as again:  # even for data that would render: stopped for this run
        catalog.render(email, context(lang="en"))
    assert str(again.value) == str(first.value)
    fresh = TemplateCatalog(tmp_path, default_language="en")  # the next run tries again
    assert fresh.render(email, context(lang="en")).html.startswith("<p>Hi</p>")


def test_a_latin1_template_names_its_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "offer"
    folder.mkdir()
    (folder / "default.html.j2").write_bytes("<p>Hallo</p>\n<p>Gr\xfc\xdfe</p>\n".encode("latin-1"))
    catalog = TemplateCatalog(tmp_path, default_language="en")
    with pytest.raises(RenderError, match=r"offer/default.html.j2:2: not UTF-8: byte 0xfc at column 6"):
        catalog.render(EmailSpec(template="offer", subject="Hi"), context(lang="en"))
    [problem] = catalog.check_syntax()
    assert problem.line == 2 and "not UTF-8" in problem.message


def test_an_oversized_template_is_refused_by_name(tmp_path: Path) -> None:
    catalog = hanging(tmp_path, "<!-- padding -->\n" * 20_000)
    [problem] = catalog.check_syntax()
    assert problem.file.name == "default.html.j2" and "larger than 256 KiB" in problem.message


def test_a_real_run_stops_a_template_that_hangs_on_one_customer_s_data_and_other_triggers_send(
        settings: Settings, store: Store, smtp: SmtpServer) -> None:
    from tests.support.runs import run

    # The win-back loops for ever for one customer only; test renders (sample data) pass.
    for name in ("default.de.html.j2", "default.en.html.j2"):
        path = Path(settings.templates_dir) / "winback" / name
        path.write_text(path.read_text().replace(
            "{% endblock %}", "{% for i in range(100000 if customer.first_name == 'Hang' else 1) %}"
                              "{% for j in range(100000) %}{% endfor %}{% endfor %}\n{% endblock %}"))
    anna, hang, berta = store.customer("Anna"), store.customer("Hang"), store.customer("Berta")
    for customer in (anna, hang, berta):
        store.order(customer, ago(days=500))
    settings = settings.model_copy(update={"workers": 1})
    summary = run(settings, "winback-lapsed")
    # Anna before: sent. Hang: stopped. Berta after: not tried again in this run (she goes out once it is fixed).
    assert summary.outcomes == {"sent": 1, "failed:render_error": 2}
    assert [r.recipients for r in smtp.received] == [[anna.email]]
    complaint = store.customer("Carla")
    store.complaint(complaint, ago(hours=2))
    other = run(settings, "complaint-ack")
    assert other.outcomes == {"sent": 1}


# Single calls, methods and filters that would build a huge value in one step: refused before they run.
HUGE_IN_ONE_STEP = [
    "lipsum(10**7)|length",
    "('%999999999s' % '')|length",
    "('%.999999999f' % 1.0)|length",
    "('%*s' % (10**9, ''))|length",
    "[0]|slice(10**8)|select|list|length",
    "'x'.center(10**9)|length",
    "'x'.ljust(10**9)|length",
    "'x'.rjust(10**9)|length",
    "'x'.zfill(10**9)|length",
    "'\\t'.expandtabs(10**9)|length",
    "'{:>999999999}'.format('')|length",
    "'{:>{}}'.format('', 10**9)|length",
    "'{a}{a}'.format_map({'a': 'x' * 999999})|length",
    "('x' * 999999).replace('x', 'yyyy')|length",
    "('x' * 999999)|replace('x', 'yyyy')|length",
    "('x' * 999999).translate({120: 'yyyy'})|length",
    "('x' * 999999).join(['a', 'b', 'c'])|length",
    "('x' * 999999)|indent(10**9)|length",
    "'x'|indent(10**9)|length",
    "'x'|center(10**9)|length",
    "'x'|truncate(10**9)|length",
    "'x y'|wordwrap(10**9)|length",
    "('x ' * 400000)|wordwrap(1, wrapstring='yyyyyy')|length",
    "[0]|batch(10**9, 0)|list|length",
    "'%999999999s'|format('')|length",
    "(['x' * 999999] * 1000)|join|length",
    "(['x' * 999999] * 1000)|string|length",
    "(['x' * 999999] * 1000)|tojson|length",
    "['x' * 999999] * 1000",
    "('x' * 999999) ~ ('x' * 999999)",
    "('x' * 999999) + ('x' * 999999)",
    "([['x'] * 999] * 1000)|sum(start=[])|length",
]


@pytest.mark.parametrize("expression", HUGE_IN_ONE_STEP)
def test_single_calls_and_filters_cannot_build_values_over_the_budget(tmp_path: Path, expression: str) -> None:
    import time

    catalog = hanging(tmp_path, "{{ " + expression + " }}")
    started = time.monotonic()
    with pytest.raises(RenderError) as caught:
        catalog.render(EmailSpec(template="offer", subject="Hi"), context(lang="en"))
    assert time.monotonic() - started < 1.0
    assert (caught.value.file, caught.value.line) == ("offer/default.html.j2", 2), str(caught.value)
    assert "over the render budget" in str(caught.value) or "lipsum" in str(caught.value), str(caught.value)


def test_lipsum_is_not_offered(tmp_path: Path) -> None:
    catalog = hanging(tmp_path, "{{ lipsum(1) }}")
    with pytest.raises(RenderError, match="'lipsum' is undefined"):
        catalog.render(EmailSpec(template="offer", subject="Hi"), context(lang="en"))


@pytest.mark.parametrize("body", [
    # Each step is small and quick, but the values built and kept add up: the budget of what is built stops it.
    ("{% set ns = namespace(kept=[]) %}{% for i in range(100000) %}"
    "{% set ns.kept = ns.kept + [('x' * 999999) ~ i] %}{% endfor %}"),
    # Filters are steps too: a filter in a loop counts, and so does every item a filter's iterator yields.
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ j|string|length|abs|string|trim }}"
    "{% endfor %}{% endfor %}"),
    ("{{ range(100000)|batch(1)|map('first')|map('string')|map('length')|select|list|length }}"
    "{{ range(100000)|batch(1)|map('first')|map('string')|map('length')|select|list|length }}"),
])
def test_many_small_steps_stop_within_the_budget(tmp_path: Path, body: str) -> None:
    import time

    catalog = hanging(tmp_path, body, max_steps=200_000)
    started = time.monotonic()
    with pytest.raises(RenderError, match="over the render budget") as caught:
        catalog.render(EmailSpec(template="offer", subject="Hi"), context(lang="en"))
    assert time.monotonic() - started < 2.5
    assert caught.value.line == 2, str(caught.value)


@pytest.mark.parametrize(("expression", "expected"), [
    ("'%5s|%-3d|%.2f' % ('ab', 7, 1.5)", "   ab|7  |1.50"),
    ("'%(a)s-%(a)s' % {'a': 'x'}", "x-x"),
    ("'{:>4}{}'.format('a', 'b')", "   ab"),
    ("'x'.center(5, '-') ~ 'y'.zfill(3) ~ 'a\\tb'.expandtabs(2)", "--x--00ya b"),
    ("'aXa'.replace('a', 'bc') ~ ', '.join(['p', 'q'])", "bcXbcp, q"),
    ("'a\\nb'|indent(2, true) ~ '|' ~ 'abc'|center(5) ~ '|' ~ 'hello world'|truncate(8, leeway=0)",
     "  a\n  b| abc |hello..."),
    ("[1, 2, 3, 4, 5]|slice(2)|list ~ [1, 2, 3]|batch(2, 0)|list", "[[1, 2, 3], [4, 5]][[1, 2], [3, 0]]"),
    ("'%s-%s'|format(1, 2) ~ ['a', 'b']|join('+') ~ [[1], [2]]|sum(start=[])", "1-2a+b[1, 2]"),
    ("'a b c'|wordwrap(1) ~ {'k': [1, 'v']}|tojson ~ 'a' + 'b'", 'a\nb\nc{"k": [1, "v"]}ab'),
])
def test_the_checked_operations_still_work_within_the_budget(tmp_path: Path, expression: str, expected: str) -> None:
    catalog = TemplateCatalog(tmp_path, default_language="en")
    template = catalog.subject_env.from_string("{{ " + expression + " }}")
    assert template.render() == expected
