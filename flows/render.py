"""Personalised content: pick the template for a customer's stage and language, render it.

Templates live in ``templates/<template>/``; for stage ``at_risk`` and language ``de``
the first of these that exists is used:

    at_risk.de.html.j2, default.de.html.j2, at_risk.html.j2, default.html.j2,
    then the same with the default language.

A ``.txt.j2`` found the same way becomes the text part, unless it is in another
language than the HTML; otherwise the text part is derived from the HTML.

One language per mail: subject, body, text part, dates and money all use the
customer's language if the email supports it (``TemplateCatalog.languages_for``: a
subject and a body for every stage in that language), otherwise the default
language, never a mix and never whichever subject comes first in the file. HTML is autoescaped, every template is sandboxed, and an
undefined name is an error, never an empty string. A ``<style>`` block is inlined into
``style`` attributes (css-inline), since many mail clients ignore stylesheets.

The context every template and subject gets:

``customer``   id, email, first_name, last_name, name (full, may be empty), locale, language
``stage``      the customer's lifecycle stage at the evaluation time (e.g. ``at_risk``)
``cart``       abandoned-cart triggers: items (name, quantity, price_cents, url,
               image_url), item_count, total_cents, currency; otherwise ``none``
``order``      the latest order (id, placed_at, total_cents, currency, products) or ``none``
``complaint``  complaint triggers: id, subject, received_at; otherwise ``none``
``links``      unsubscribe, shop
``trigger``    name, description
``now``        the evaluation time (aware datetime, UTC)
``lang``       the language used (``de``, ``en``…); ``customer.language`` says the same

Filters: ``money(cents, currency)`` and ``date(value, format='medium')`` format per
language (``59,90 €`` in German, ``€59.90`` in English).
"""

import difflib
import re
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import css_inline
from babel.dates import format_date
from babel.numbers import format_currency
from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    pass_context,
    select_autoescape,
)
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from flows.context import VIEW_ATTRIBUTES, CustomerView
from flows.plaintext import html_to_text
from flows.spec.common import EmailSpec
from flows.spec.problems import Problem, snippet

CONTEXT_NAMES = ("customer", "stage", "cart", "order", "complaint", "links", "trigger", "now", "lang")
LAYOUT_DIR = "_layout"


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    html: str
    text: str
    template: str
    language: str = ""  # the language actually used, which may be the default instead of the one asked for


class RenderError(Exception):
    """A template failed for one recipient; carries the template file and line."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None) -> None:
        self.file, self.line, self.detail = file, line, message
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        super().__init__(where + message)


@pass_context
def _money(context: Context, cents: int | None, currency: str = "EUR") -> str:
    return format_currency((cents or 0) / 100, currency, locale=context.get("lang", "en"))


@pass_context
def _date(context: Context, value: datetime, format: str = "medium") -> str:
    day = value.date() if isinstance(value, datetime) else value
    return _formatted_date(day, format, context.get("lang", "en"))


@lru_cache(maxsize=4096)
def _formatted_date(day: date, format: str, lang: str) -> str:
    """Cached: a batch formats the same few days (``now``, recent orders) thousands of times."""
    return format_date(day, format=format, locale=lang)


def language_of(locale: str | None, default: str, supported: frozenset[str] | None = None) -> str:
    """``de-AT`` → ``de``; empty or odd values fall back to the default language, and so
    does a language outside ``supported`` (an email's ``languages_for``) when given."""
    lang = (locale or "").replace("_", "-").split("-")[0].lower()
    if not (lang.isalpha() and 2 <= len(lang) <= 3):
        return default
    return default if supported is not None and lang not in supported else lang


def one_line(value: str) -> str:
    """Header-safe text: CR, LF and other control characters become single spaces."""
    if not value.isprintable():
        value = "".join(ch if ch.isprintable() else " " for ch in value)
    return " ".join(value.split())


class TemplateCatalog:
    """The templates folder: resolution, rendering, and checking before any send."""

    def __init__(self, templates_dir: Path, default_language: str = "en") -> None:
        self.root = templates_dir
        self.default_language = default_language
        self.env = self._environment(autoescape=select_autoescape(enabled_extensions=("html", "html.j2")))
        self.subject_env = self._environment(autoescape=False)
        self._subjects: dict[str, Template] = {}
        self._files: dict[str, set[str]] = {}
        self._supported: dict[tuple[str, frozenset[str]], frozenset[str]] = {}

    def _environment(self, autoescape: Any) -> SandboxedEnvironment:
        env = SandboxedEnvironment(
            loader=FileSystemLoader(str(self.root)),
            autoescape=autoescape,
            undefined=StrictUndefined,
            auto_reload=False,  # a run's templates do not change under it (serve reloads a new catalog)
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.filters["money"] = _money
        env.filters["date"] = _date
        return env

    # -- resolution -------------------------------------------------------------
    def exists(self, template: str) -> bool:
        return (self.root / template).is_dir()

    def files(self, template: str) -> set[str]:
        """The folder's files, listed once: a catalog lives for one run (serve loads a new one)."""
        if template not in self._files:
            folder = self.root / template
            self._files[template] = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
        return self._files[template]

    def languages(self, template: str) -> set[str]:
        """Languages a template folder has files for (``welcome.de.html.j2`` → ``de``)."""
        found = set()
        for name in self.files(template):
            parts = name.split(".")
            if len(parts) == 4:
                found.add(parts[1])
        return found

    def languages_for(self, email: EmailSpec) -> frozenset[str]:
        """The languages ``email`` can be written in from subject to footer.

        A language qualifies when it has a subject (its own, or one plain subject for
        all) and a body for every stage without borrowing another language's file:
        ``default.<lang>.html.j2``, or a language-neutral ``default.html.j2`` (``resolve``
        tries both before the default language's files). A stage file alone, such as
        ``loyal.fr.html.j2``, covers one stage, so the others would get English bodies.
        Only languages named somewhere (a file, a subject key, the default) are listed.
        """
        key = (email.template, frozenset(email.subject))
        found = self._supported.get(key)
        if found is None:
            files = self.files(email.template)
            neutral = "default.html.j2" in files
            named = self.languages(email.template) | set(email.subject) | {self.default_language}
            found = self._supported[key] = frozenset(
                lang for lang in named - {"*"}
                if (neutral or f"default.{lang}.html.j2" in files) and email.has_subject(lang)
            )
        return found

    def resolve(self, template: str, stage: str, lang: str, extension: str = "html",
                fallback: bool = True) -> str | None:
        """The file for ``stage`` in ``lang``; ``fallback=False`` never borrows the default language's."""
        files = self.files(template)
        order = [f"{stage}.{lang}", f"default.{lang}", stage, "default"]
        if fallback or lang == self.default_language:
            order += [f"{stage}.{self.default_language}", f"default.{self.default_language}"]
        for base in order:
            name = f"{base}.{extension}.j2"
            if name in files:
                return f"{template}/{name}"
        return None

    # -- rendering --------------------------------------------------------------
    def render(self, email: EmailSpec, context: dict[str, Any]) -> Rendered:
        """Subject, HTML and text in one language: ``context["lang"]`` if ``email`` supports
        it, else the default language (``lang`` and ``customer.language`` say which)."""
        stage, lang = context["stage"], context["lang"]
        if lang not in self.languages_for(email):
            lang = self.default_language
            context = {**context, "lang": lang}
            customer = context.get("customer")
            if isinstance(customer, CustomerView) and customer.language != lang:
                context["customer"] = replace(customer, language=lang)
        html_name = self.resolve(email.template, stage, lang, "html")
        if html_name is None:
            raise RenderError(f"no HTML template for stage {stage!r} ({lang}); add default.html.j2", email.template)
        text_name = self.resolve(email.template, stage, lang, "txt", fallback=False)
        subject_source = email.subject_for(lang)
        if subject_source is None:
            raise RenderError(f"subject: none for language {lang!r} (the default language needs one)")
        subject = one_line(self._render_string(subject_source, context))
        html = self._render_file(html_name, context)
        if "<style" in html:  # mail clients drop <style>: move the rules into style attributes
            html = css_inline.inline(html)
        text = self._render_file(text_name, context) if text_name else html_to_text(html)
        return Rendered(subject=subject, html=html, text=text, template=html_name, language=lang)

    def _render_file(self, name: str, context: dict[str, Any]) -> str:
        try:
            return self.env.get_template(name).render(context)
        except Exception as exc:  # noqa: BLE001 -- data-dependent errors too (a division, a None): one recipient fails
            raise _located(exc, name) from None

    def _render_string(self, source: str, context: dict[str, Any]) -> str:
        try:
            template = self._subjects.get(source)
            if template is None:  # compiling costs more than rendering: once per subject
                template = self._subjects[source] = self.subject_env.from_string(source)
            return template.render(context)
        except Exception as exc:  # noqa: BLE001 -- as for files: one recipient fails, not the run
            raise RenderError(f"subject: {_describe(exc)}") from None

    # -- checking -----------------------------------------------------------------
    def check_syntax(self) -> list[Problem]:
        """Compile every template file, used by a trigger or not."""
        problems = []
        for path in sorted(self.root.rglob("*.j2")):
            name = path.relative_to(self.root).as_posix()
            try:
                self.env.get_template(name)
            except TemplateSyntaxError as exc:
                problems.append(self._problem(RenderError(exc.message or str(exc), name, exc.lineno)))
        return problems

    def check(
        self, email: EmailSpec, stages: Iterable[str], languages: Iterable[str], samples: Iterable[dict[str, Any]]
    ) -> list[Problem]:
        """Test-render every stage × language × sample; report each distinct failure once."""
        if not self.exists(email.template):
            return []  # reported by the trigger file check, with its line
        problems: dict[str, Problem] = {}
        for lang in sorted(set(languages)):
            for stage in stages:
                for sample in samples:
                    try:
                        self.render(email, {**sample, "stage": stage, "lang": lang, **_stage_facts(sample, stage)})
                    except RenderError as exc:
                        problem = self._problem(exc, f"stage {stage}, language {lang}")
                        problems.setdefault(str(exc), problem)
        return list(problems.values())

    def _problem(self, exc: RenderError, case: str = "") -> Problem:
        file = self.root / exc.file if exc.file else self.root
        text = file.read_text(encoding="utf-8") if file.is_file() else ""
        message = exc.detail
        if case:
            message += f" (test render: {case})"
        return Problem(file, exc.line, "", message, snippet(text, exc.line))


def _stage_facts(sample: dict[str, Any], stage: str) -> dict[str, Any]:
    # A prospect has never ordered: test-render it without an order, as in real life.
    return {"order": None} if stage == "prospect" else {}


_NO_ATTRIBUTE = re.compile(r"'(?:[\w.]+\.)?(\w+) object' has no attribute '(\w+)'")


def _describe(exc: Exception) -> str:
    message = (exc.message if isinstance(exc, TemplateError) else None) or f"{type(exc).__name__}: {exc}"
    if "is undefined" in message:
        message += f"; the context has: {', '.join(CONTEXT_NAMES)}"
    match = _NO_ATTRIBUTE.search(message)
    if match and match.group(1) in VIEW_ATTRIBUTES:
        view, name = match.groups()
        valid = VIEW_ATTRIBUTES[view]
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        message = f"{view.removesuffix('View').lower()} has no attribute {name!r}{hint} (it has: {', '.join(valid)})"
    return message


def _located(exc: Exception, name: str) -> RenderError:
    if isinstance(exc, TemplateSyntaxError):
        return RenderError(exc.message or str(exc), exc.name or name, exc.lineno)
    if isinstance(exc, TemplateNotFound):
        return RenderError(f"template {exc.name!r} not found", name)
    # Jinja rewrites tracebacks so template frames carry the template file and line.
    file, line = name, None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.endswith(".j2"):
            file, line = frame.filename, frame.lineno
    root_marker = file.replace("\\", "/")
    for prefix in (name.split("/")[0] + "/", LAYOUT_DIR + "/"):
        index = root_marker.rfind("/" + prefix)
        if index >= 0:
            root_marker = root_marker[index + 1 :]
            break
    return RenderError(_describe(exc), root_marker, line)
