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

Budgets: a template file is at most ``MAX_TEMPLATE_BYTES`` of UTF-8. Every render (each
subject, HTML and text part, test renders and real ones alike) has a budget checked
as it goes: at most ``MAX_STEPS`` loop iterations, calls and output pieces, at most
``MAX_OUTPUT`` characters produced, at most ``TIME_BUDGET`` seconds, and no
``*``/``**`` that would build a string, list or integer beyond those bounds. A template
over budget is stopped with its file and line; within the catalog's life (one run)
it is not tried again, so its recipients fail at once and other triggers never wait.
"""

import difflib
import os
import posixpath
import re
import threading
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date, datetime
from functools import lru_cache
from itertools import islice
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
    nodes,
    pass_context,
    select_autoescape,
)
from jinja2.exceptions import SecurityError
from jinja2.loaders import split_template_path
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from flows.context import VIEW_ATTRIBUTES, CustomerView
from flows.plaintext import html_to_text
from flows.spec.common import EmailSpec
from flows.spec.problems import Problem, snippet
from flows.spec.yaml_source import not_utf8_message

CONTEXT_NAMES = ("customer", "stage", "cart", "order", "complaint", "links", "trigger", "now", "lang")
LAYOUT_DIR = "_layout"
MAX_TEMPLATE_BYTES = 256 * 1024  # per template file
MAX_STEPS = 1_000_000  # loop iterations, calls and output pieces per render
MAX_OUTPUT = 1_000_000  # characters per render (Gmail clips a mail at about 100 kB)
MAX_INT_BITS = 4096  # integers that * and ** may build
TIME_BUDGET = 2.0  # seconds per render; a real mail renders in well under a millisecond


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


class BudgetExceeded(SecurityError):
    """A render went over its budget (steps, output, time or size of a value)."""


class _Budget:
    __slots__ = ("deadline", "limits", "output", "steps")

    def __init__(self, limits: "BudgetedEnvironment") -> None:
        self.deadline = time.monotonic() + limits.time_budget
        self.steps, self.output, self.limits = limits.max_steps, limits.max_output, limits

    def tick(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise BudgetExceeded(f"stopped: over the render budget of {self.limits.max_steps:,} steps "
                                 "(loop iterations, calls and output pieces)")
        if time.monotonic() > self.deadline:
            raise BudgetExceeded(f"stopped: over the render time budget of {self.limits.time_budget:g} s")

    def settle(self, pieces: int, size: int) -> None:
        """``pieces`` pieces of output, ``size`` characters in all, were produced."""
        self.output -= size
        if self.output < 0:
            raise BudgetExceeded(f"stopped: over the render budget of {self.limits.max_output:,} characters of output")
        self.steps -= pieces - 1
        self.tick()


_active = threading.local()  # the budget of the render running in this thread


def _current() -> _Budget | None:
    return getattr(_active, "budget", None)


def _budgeted(iterable: Any) -> Any:
    """Wrapped around every ``{% for %}``'s iterable: each iteration is a step."""
    budget = _current()
    if budget is None:
        yield from iterable
        return
    for item in iterable:
        budget.tick()
        yield item


_LOOP_FILTER = "_budgeted"


class BudgetedEnvironment(SandboxedEnvironment):
    """Jinja's sandbox with a budget on every render (see the module's docstring).

    The checks are cooperative and cheap: Jinja compiles a template to Python that
    yields its output piece by piece, so ``concat`` (which joins those pieces, for a
    whole render and for each block, macro and filter block) counts them and checks
    the clock; every loop's iterable is wrapped so each iteration counts (``_parse``);
    every call passes through the sandbox's ``call``; ``*`` and ``**`` are checked
    before they run (``call_binop``), as those can build a huge value in one step.
    """

    intercepted_binops = frozenset({"*", "**"})
    max_steps, max_output, time_budget = MAX_STEPS, MAX_OUTPUT, TIME_BUDGET

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.filters[_LOOP_FILTER] = _budgeted

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.iter.lineno)
        return tree

    def concat(self, pieces: Any) -> str:  # type: ignore[override]
        budget = _current()
        if budget is not None:
            return _joined(budget, pieces)
        budget = _active.budget = _Budget(self)  # a new render: its own budget
        try:
            return _joined(budget, pieces)
        finally:
            _active.budget = None

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _current()
        if budget is not None:
            budget.tick()
        return super().call(context, obj, *args, **kwargs)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            sequence, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                if len(sequence) * count > self.max_output:
                    raise BudgetExceeded(f"stopped: * would build a value of {len(sequence) * count:,} items; "
                                         f"at most {self.max_output:,}")
            elif isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise BudgetExceeded(f"stopped: * would build an integer over {MAX_INT_BITS} bits")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                right * left.bit_length() > MAX_INT_BITS:
            raise BudgetExceeded(f"stopped: ** would build an integer over {MAX_INT_BITS} bits")
        return super().call_binop(context, operator, left, right)


def _joined(budget: _Budget, pieces: Any) -> str:
    """Join a render's pieces, counted 64 at a time (taken and measured at C speed: a
    render has a few hundred pieces, and this is on every mail's path)."""
    out: list[str] = []
    iterator = iter(pieces)
    try:
        while True:
            batch = list(islice(iterator, 64))
            if not batch:
                break
            budget.settle(len(batch), sum(map(len, batch)))
            out += batch
    except BudgetExceeded as exc:
        if hasattr(pieces, "throw"):  # raise it inside the template's code: its traceback names the line
            pieces.throw(exc)
        raise
    return "".join(out)


class _SourceLoader(FileSystemLoader):
    """Template files as UTF-8 of at most ``MAX_TEMPLATE_BYTES``; otherwise a located syntax error."""

    def get_source(self, environment: Any, template: str) -> tuple[str, str, Any]:
        pieces = split_template_path(template)
        for folder in self.searchpath:
            filename = posixpath.join(folder, *pieces)
            if os.path.isfile(filename):
                break
        else:
            raise TemplateNotFound(template)
        with open(filename, "rb") as handle:
            data = handle.read(MAX_TEMPLATE_BYTES + 1)
        if len(data) > MAX_TEMPLATE_BYTES:
            raise TemplateSyntaxError(f"template file is larger than {MAX_TEMPLATE_BYTES // 1024} KiB; at most "
                                      f"{MAX_TEMPLATE_BYTES // 1024} KiB is read", 1, template, filename)
        try:
            source = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
            raise TemplateSyntaxError(not_utf8_message(data, exc.start, column), line, template, filename) from None
        return source, filename, lambda: False  # never reloaded: a catalog lives for one run


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
        self._stopped: dict[str, RenderError] = {}  # file or subject → why it went over budget

    def _environment(self, autoescape: Any) -> BudgetedEnvironment:
        env = BudgetedEnvironment(
            loader=_SourceLoader(str(self.root)),
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
        self._not_stopped(name)
        try:
            return self.env.get_template(name).render(context)
        except Exception as exc:  # noqa: BLE001 -- data-dependent errors too (a division, a None): one recipient fails
            raise self._failed(name, exc, _located(exc, name)) from None

    def _render_string(self, source: str, context: dict[str, Any]) -> str:
        self._not_stopped(source)
        try:
            template = self._subjects.get(source)
            if template is None:  # compiling costs more than rendering: once per subject
                template = self._subjects[source] = self.subject_env.from_string(source)
            return template.render(context)
        except Exception as exc:  # noqa: BLE001 -- as for files: one recipient fails, not the run
            raise self._failed(source, exc, RenderError(f"subject: {_describe(exc)}")) from None

    def _not_stopped(self, key: str) -> None:
        """A template that went over its budget is not tried again while this catalog lives (a run):
        its recipients fail at once with the same located error, instead of each spending the budget."""
        stopped = self._stopped.get(key)
        if stopped is not None:
            raise RenderError(stopped.detail, stopped.file, stopped.line)

    def _failed(self, key: str, exc: Exception, error: RenderError) -> RenderError:
        if isinstance(exc, (BudgetExceeded, RecursionError, MemoryError)):
            self._stopped[key] = error
        return error

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
            except Exception as exc:  # noqa: BLE001 -- e.g. nesting too deep to compile: named, not a crash
                problems.append(self._problem(RenderError(f"cannot be compiled: {_describe(exc)}", name)))
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
        text = ""
        if file.is_file():  # for the snippet only: whatever the file holds, never an error of its own
            with file.open("rb") as handle:
                text = handle.read(MAX_TEMPLATE_BYTES).decode("utf-8", errors="replace")
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
