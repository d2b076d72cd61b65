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
as it goes: at most ``MAX_STEPS`` loop iterations, calls, filter calls, items yielded
by filters and output pieces, at most ``MAX_OUTPUT`` characters produced, at most
``MAX_BUILT`` characters or items built by the operations that make strings and lists
(``~``, ``+``, ``*``, ``%``, ``format``, string methods, filters, slices), and at most
``TIME_BUDGET`` seconds, checked at every step. An operation that can build a large value
in one step (``*``, ``**``, ``%``, ``str.format``, ``center``/``ljust``/``rjust``/``zfill``/
``expandtabs``/``replace``/``translate``/``join``, the filters ``indent``, ``center``,
``truncate``, ``wordwrap``, ``slice``, ``batch``, ``format``, ``join``, ``replace``, ``sum``,
``string``, ``tojson``, ``pprint``, ``urlize``…, and printing a list or mapping) is
checked before it runs and refused if its result would exceed ``MAX_OUTPUT``. ``lipsum``
is not offered. A template over budget is stopped with its file and line; within the
catalog's life (one run) it is not tried again, so its recipients fail at once and other
triggers never wait.

The checks are cooperative, in the same thread: the clock is read between steps, so a
single step (one built-in operation on values within the bounds above, such as sorting
100,000 items) can overrun the deadline by its own duration, a fraction of a second, and
memory is bounded through the sizes above rather than measured.
"""  # noqa: E501 -- one long line in the module docstring, kept as written

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
from functools import lru_cache, wraps
from itertools import islice
from pathlib import Path
from string import Formatter
from typing import Any, cast

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
from jinja2.runtime import Context, markup_join, str_join
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import pass_eval_context
from jinja2.visitor import NodeTransformer
from markupsafe import Markup, soft_str

from flows.content.context import VIEW_ATTRIBUTES, CustomerView
from flows.content.plaintext import html_to_text
from flows.spec.common import EmailSpec
from flows.spec.problems import Problem, snippet
from flows.spec.yaml_source import not_utf8_message

CONTEXT_NAMES = ("customer", "stage", "cart", "order", "complaint", "links", "trigger", "now", "lang")
LAYOUT_DIR = "_layout"
MAX_TEMPLATE_BYTES = 256 * 1024  # per template file
MAX_STEPS = 1_000_000  # loop iterations, calls and output pieces per render
MAX_OUTPUT = 1_000_000  # characters per render (Gmail clips a mail at about 100 kB)
MAX_BUILT = 10 * MAX_OUTPUT  # characters or items built by string and list operations per render
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
    __slots__ = ("built", "deadline", "limits", "output", "steps")

    def __init__(self, limits: "BudgetedEnvironment") -> None:
        self.deadline = time.monotonic() + limits.time_budget
        self.steps, self.output, self.limits = limits.max_steps, limits.max_output, limits
        self.built = limits.max_output * (MAX_BUILT // MAX_OUTPUT)

    def charge(self, size: int) -> None:
        """A value of ``size`` characters or items was built."""
        self.built -= size
        if self.built < 0:
            budget = self.limits.max_output * (MAX_BUILT // MAX_OUTPUT)
            raise BudgetExceeded(f"stopped: over the render budget of {budget:,} characters or items built")

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
_CONCAT_FILTER = "_concat"


def _ensure(size: int, what: str, limit: int | None = None) -> None:
    """Refuse an operation whose result would have ``size`` characters or items, before it runs."""
    budget = _current()
    if limit is None:
        limit = budget.limits.max_output if budget is not None else MAX_OUTPUT
    if size > limit:
        raise BudgetExceeded(f"stopped: {what} would build a value over the render budget of {limit:,} "
                             f"characters of output (at least {size:,} characters or items)")
    if budget is not None:
        budget.charge(size)


_CONTAINERS = (list, tuple, dict, set, frozenset)


def _weight(value: Any, limit: int, per_level: int = 0) -> int:
    """About the length of ``str(value)``, for containers too (their items may all be one
    long string), counted only up to just over ``limit``; ``per_level`` adds indentation."""
    kind = type(value)
    if kind is str or kind is Markup:
        return len(value)
    if kind not in _CONTAINERS:
        return _scalar_weight(value)
    total, stack = 0, [(value, 1)]
    while stack and total <= limit:
        item, depth = stack.pop()
        kind = type(item)
        if kind in _CONTAINERS:
            total += 2
            if kind is dict:
                stack.extend((part, depth + 1) for pair in item.items() for part in pair)
            else:
                stack.extend((part, depth + 1) for part in item)
        else:
            total += (len(item) + 2 if isinstance(item, str) else _scalar_weight(item)) + depth * per_level
    return total


def _scalar_weight(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() // 3 + 2
    return 24  # dates, numbers, None, views: short


def _limit() -> int:
    budget = _current()
    return budget.limits.max_output if budget is not None else MAX_OUTPUT


def _check_percent(template: str, values: Any, what: str = "%") -> None:
    """``template % values`` would stay within the output budget (widths and precisions included)."""
    limit = _limit()
    size, position = len(template), 0
    items = values if isinstance(values, tuple) else (values,)
    mapping = values if isinstance(values, dict) else None
    for match in _PERCENT.finditer(template):
        if match["kind"] == "%":
            continue
        numbers = []
        for star_or_digits in (match["width"], match["precision"]):
            if star_or_digits == "*":
                number = items[position] if position < len(items) else 0
                position += 1
                numbers.append(abs(number) if isinstance(number, int) else 0)
            elif star_or_digits:
                numbers.append(int(star_or_digits))
        if mapping is not None and match["key"] is not None:
            value = mapping.get(match["key"][1:-1], "")
        elif position < len(items):
            value, position = items[position], position + 1
        else:
            value = ""
        size += max(numbers, default=0) + _weight(value, limit)
        if size > limit:
            break
    _ensure(size, what)


_PERCENT = re.compile(r"%(?P<key>\([^)]*\))?[#0 +\-]*(?P<width>\*|\d+)?(?:\.(?P<precision>\*|\d*))?[hlL]?"
                      r"(?P<kind>[a-zA-Z%])")
_DIGITS = re.compile(r"\d+")


def _check_format(template: str, args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> None:
    """``template.format(*args, **kwargs)`` would stay within the output budget: each field
    counts as the longest argument (fields may repeat one), plus its width and precision."""
    limit = _limit()
    values = list(args) + list(kwargs.values())
    longest = max((_weight(value, limit) for value in values), default=0)
    widest = max((abs(value) for value in values if isinstance(value, int)), default=0)
    size = 0
    for literal, field, spec, _conversion in Formatter().parse(template):
        size += len(literal)
        if field is not None:
            size += longest + max((int(number) for number in _DIGITS.findall(spec or "")), default=0)
            if spec and "{" in spec:
                size += widest
        if size > limit:
            break
    _ensure(size, what)


def _check_replace(text: str, old: Any, new: Any, count: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        found = text.count(old) if old else len(text) + 1
        if isinstance(count, int) and count >= 0:
            found = min(found, count)
        _ensure(len(text) + found * (len(new) - len(old)), "replace")


def _check_join(separator: Any, items: list[Any], what: str) -> None:
    limit = _limit()
    size = len(separator) * max(len(items) - 1, 0) if isinstance(separator, str) else 0
    for item in items:
        if size > limit:
            break
        size += _weight(item, limit)
    _ensure(size, what)


def _check_method(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """A string method that can grow its string, checked before the call; the arguments to call it with."""
    text, name = method.__self__, method.__name__
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _ensure(max(len(text), args[0]), name)
    elif name == "expandtabs":
        size = (args or (kwargs.get("tabsize", 8),))[0]
        if isinstance(size, int):
            _ensure(len(text) + text.count("\t" if isinstance(text, str) else b"\t") * max(size, 0), name)
    elif name == "replace" and len(args) >= 2:
        _check_replace(text, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    elif name == "join" and args:
        items = list(islice(args[0], _limit() + 1))
        _check_join(text, items, name)
        args = (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        _ensure(len(text) * max(longest, 1), name)
    return args


_GROWING_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join", "translate"})


class BudgetedEnvironment(SandboxedEnvironment):
    """Jinja's sandbox with a budget on every render (see the module's docstring).

    The checks are cooperative and cheap: Jinja compiles a template to Python that
    yields its output piece by piece, so ``concat`` (which joins those pieces, for a
    whole render and for each block, macro and filter block) counts them and checks
    the clock; every loop's iterable is wrapped so each iteration counts (``_parse``);
    every call passes through the sandbox's ``call``; ``*`` and ``**`` are checked
    before they run (``call_binop``), as those can build a huge value in one step.
    """

    intercepted_binops = frozenset({"*", "**", "%", "+"})
    max_steps, max_output, time_budget = MAX_STEPS, MAX_OUTPUT, TIME_BUDGET

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.globals.pop("lipsum", None)  # unbounded text in one call, and nothing a mail needs
        self.finalize = _printable
        self.filters = _BudgetedFilters(self.filters)
        dict.__setitem__(self.filters, _LOOP_FILTER, _budgeted)
        dict.__setitem__(self.filters, _CONCAT_FILTER, _concat)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        template: nodes.Template = _Rewriter().visit(super()._parse(source, name, filename))
        return template

    def _generate(self, *args: Any, **kwargs: Any) -> str:
        """Compiling folds constant expressions, filters included: under a budget of its own."""
        if _current() is not None:
            return super()._generate(*args, **kwargs)
        _active.budget = _Budget(self)
        try:
            return super()._generate(*args, **kwargs)
        finally:
            _active.budget = None

    def getitem(self, obj: Any, argument: Any) -> Any:
        value = super().getitem(obj, argument)
        if isinstance(argument, slice) and isinstance(value, (str, list, tuple)):
            budget = _current()
            if budget is not None:
                budget.charge(len(value))
        return value

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        template, name = value.__self__, value.__name__

        @wraps(wrapped)
        def checked(*args: Any, **kwargs: Any) -> Any:
            if name == "format_map" and len(args) == 1 and isinstance(args[0], dict):
                _check_format(template, (), args[0], name)
            else:
                _check_format(template, args, kwargs, name)
            return wrapped(*args, **kwargs)

        return checked

    def concat(self, pieces: Any) -> str:
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
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, (str, bytes)) and getattr(obj, "__name__", "") in _GROWING_METHODS:
            args = _check_method(obj, args, kwargs)
        elif isinstance(owner, list) and getattr(obj, "__name__", "") == "extend" and args:
            items = list(islice(args[0], self.max_output + 1))
            _ensure(len(owner) + len(items), "extend")
            args = (items,)
        result = super().call(context, obj, *args, **kwargs)
        if budget is not None and isinstance(result, (str, bytes, list, tuple, dict)):
            budget.charge(len(result))
        return result

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "%":
            if isinstance(left, str):
                _check_percent(left, right)
            return super().call_binop(context, operator, left, right)
        if operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                _ensure(len(left) + len(right), "+")
            return super().call_binop(context, operator, left, right)
        if operator == "*":
            sequence, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                if len(sequence) * count > self.max_output:
                    raise BudgetExceeded(f"stopped: * would build a value of {len(sequence) * count:,} items; "
                                         f"at most {self.max_output:,}")
                budget = _current()
                if budget is not None:
                    budget.charge(len(sequence) * max(count, 0))
            elif isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise BudgetExceeded(f"stopped: * would build an integer over {MAX_INT_BITS} bits")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                right * left.bit_length() > MAX_INT_BITS:
            raise BudgetExceeded(f"stopped: ** would build an integer over {MAX_INT_BITS} bits")
        return super().call_binop(context, operator, left, right)


class _Rewriter(NodeTransformer):
    """Every ``{% for %}``'s iterable is counted item by item; every ``~`` is checked before it joins."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = cast(nodes.For, self.generic_visit(node))
        node.iter = nodes.Filter(node.iter, _LOOP_FILTER, [], [], None, None, lineno=node.iter.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = cast(nodes.Concat, self.generic_visit(node))
        items = nodes.List(node.nodes, lineno=node.lineno)
        return nodes.Filter(items, _CONCAT_FILTER, [], [], None, None, lineno=node.lineno)


@pass_eval_context
def _concat(eval_ctx: Any, items: list[Any]) -> str:
    """``a ~ b``: as Jinja joins it, once the total length is known to be within the budget."""
    _check_join("", items, "~")
    return markup_join(items) if eval_ctx.autoescape else str_join(items)


def _printable(value: Any) -> Any:
    """Every ``{{ value }}``: a list or mapping is printed only if its text stays within the budget."""
    if type(value) in _CONTAINERS:
        _ensure(_weight(value, _limit()), "printing a list or mapping")
    return value


def _check_filter(
    name: str, offset: int, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments a filter will be called with, checked before it runs; sized arguments
    are refused when they would exceed the budget, and iterables it must size are listed.
    The first ``offset`` arguments are Jinja's (context, evaluation context or environment)."""
    checker = _FILTER_CHECKS.get(name)
    if checker is None:
        return args, kwargs
    head, rest = args[:offset], args[offset:]
    environment = getattr(head[0], "environment", head[0]) if head else None
    checked = checker(name, environment, *rest, **kwargs)
    return (head + checked[0], checked[1]) if checked else (args, kwargs)


def _size_arguments(*positions: int, names: tuple[str, ...] = ()) -> Any:
    def check(name: str, environment: Any, *args: Any, **kwargs: Any) -> None:
        for index in positions:
            value = args[index] if index < len(args) else None
            if isinstance(value, int):
                _ensure(abs(value), name)
        for key in names:
            value = kwargs.get(key)
            if isinstance(value, int):
                _ensure(abs(value), name)
    return check


def _check_indent(name: str, environment: Any, text: Any = "", width: Any = 4, *rest: Any, **kwargs: Any) -> None:
    width = kwargs.get("width", width)
    text = soft_str(text)
    step = width if isinstance(width, int) else len(soft_str(width))
    _ensure(len(text) + (text.count("\n") + 1) * abs(step), name)


def _check_wordwrap(name: str, text: Any = "", width: Any = 79, break_long_words: Any = True,
                    wrapstring: Any = None, *rest: Any, **kwargs: Any) -> None:
    width, wrapstring = kwargs.get("width", width), kwargs.get("wrapstring", wrapstring)
    text = soft_str(text)
    if isinstance(width, int):
        _ensure(abs(width), name)
    if isinstance(wrapstring, str) and isinstance(width, int) and width > 0:
        _ensure(len(text) + (len(text) // width + text.count("\n") + 1) * len(wrapstring), name)


def _check_truncate(name: str, text: Any = "", length: Any = 255, killwords: Any = False, end: Any = "...",
                    *rest: Any, **kwargs: Any) -> None:
    length, end = kwargs.get("length", length), kwargs.get("end", end)
    if isinstance(length, int):
        _ensure(abs(length), name)
    _ensure(len(soft_str(text)) + len(soft_str(end)), name)


def _check_format_filter(name: str, environment: Any, value: Any = "", *args: Any, **kwargs: Any) -> None:
    _check_percent(soft_str(value), kwargs or args, name)


def _check_replace_filter(name: str, environment: Any, text: Any = "", old: Any = "", new: Any = "",
                          count: Any = None, **kwargs: Any) -> None:
    count = kwargs.get("count", count)
    _check_replace(soft_str(text), soft_str(old), soft_str(new), -1 if count is None else count)


def _listed(environment: Any, value: Any, attribute: Any) -> list[Any]:
    items = list(islice(value, _limit() + 1))
    if attribute is not None:
        from jinja2.filters import make_attrgetter

        items = list(map(make_attrgetter(environment, attribute), items))
    return items


def _check_join_filter(
    name: str, environment: Any, value: Any = (), d: Any = "", attribute: Any = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    items = _listed(environment, value, attribute)
    _check_join(soft_str(d), items, name)
    return (items, d), {}


def _check_sum(name: str, environment: Any, iterable: Any = (), attribute: Any = None,
               start: Any = 0) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    if isinstance(start, (int, float)) and attribute is None:
        return None  # numbers: each addition is one small step
    items = _listed(environment, iterable, attribute)
    sizes = [len(item) for item in items if isinstance(item, (str, list, tuple))]
    total = sum(sizes)
    _ensure(total, name)
    _ensure(total * len(sizes) // 200, name)  # each addition copies what came before it
    return (items, None, start), {}


def _check_printed(per_level: int = 0, indent_position: int | None = None) -> Any:
    def check(name: str, environment: Any, *args: Any, **kwargs: Any) -> None:
        level = per_level
        if indent_position is not None:
            indent = kwargs.get("indent", args[indent_position] if len(args) > indent_position else None)
            level = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
        value = args[0] if args else ""
        _ensure(_weight(value, _limit(), max(level, 0)), name)
    return check


def _check_urlize(name: str, environment: Any, value: Any = "", *args: Any, **kwargs: Any) -> None:
    text = soft_str(value)
    extra = sum(len(v) for v in (*args, *kwargs.values()) if isinstance(v, str))
    _ensure(3 * len(text) + (len(text) // 4 + 1) * (extra + 64), name)


_FILTER_CHECKS: dict[str, Any] = {
    "center": _size_arguments(1, names=("width",)),
    "batch": _size_arguments(1, names=("linecount",)),
    "slice": _size_arguments(1, names=("slices",)),
    "indent": _check_indent,
    "wordwrap": lambda name, environment, *args, **kwargs: _check_wordwrap(name, *args, **kwargs),
    "truncate": lambda name, environment, *args, **kwargs: _check_truncate(name, *args, **kwargs),
    "format": _check_format_filter,
    "replace": _check_replace_filter,
    "join": _check_join_filter,
    "sum": _check_sum,
    "string": _check_printed(),
    "e": _check_printed(),
    "escape": _check_printed(),
    "forceescape": _check_printed(),
    "pprint": _check_printed(per_level=1),
    "list": lambda name, environment, value=(), *args, **kwargs: (
        _ensure(len(value), name) if isinstance(value, str) else None
    ),
    "tojson": _check_printed(indent_position=1),
    "xmlattr": _check_printed(),
    "urlencode": _check_printed(),
    "urlize": _check_urlize,
}


def _budgeted_filter(name: str, function: Any) -> Any:
    """A filter that is a step, checked before it runs (``_check_filter``), whose iterator
    (``map``, ``select``, ``batch``…) counts a step per item and whose result is charged."""
    if getattr(function, "_lifecycle_budgeted", False):
        return function
    offset = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0

    @wraps(function)
    def budgeted(*args: Any, **kwargs: Any) -> Any:
        budget = _current()
        if budget is not None:
            budget.tick()
        args, kwargs = _check_filter(name, offset, args, kwargs)
        result = function(*args, **kwargs)
        if budget is not None:
            if isinstance(result, (str, list, tuple, dict)):
                budget.charge(len(result))
            elif hasattr(result, "__next__"):
                return _budgeted(result)
        return result

    budgeted._lifecycle_budgeted = True  # type: ignore[attr-defined]  # a mark on the function object
    return budgeted


class _BudgetedFilters(dict[str, Any]):
    """The environment's filters: each one added is wrapped by ``_budgeted_filter``."""

    def __init__(self, filters: dict[str, Any]) -> None:
        super().__init__((name, _budgeted_filter(name, f)) for name, f in filters.items())

    def __setitem__(self, name: str, function: Any) -> None:
        super().__setitem__(name, _budgeted_filter(name, function))

    def update(self, *args: Any, **kwargs: Any) -> None:
        for name, function in dict(*args, **kwargs).items():
            self[name] = function


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

    def compile(self, email: EmailSpec) -> None:
        """Compile every template file and this mail's subjects now, not at the first mail: a
        sender process then freezes them with the rest of its heap (``gc.freeze``), so the
        collector's scans during the run skip them, as they do in a run's own process, where
        the test renders compiled them. Nothing compiles that validation did not."""
        self.check_syntax()
        for source in email.subject.values():
            if source not in self._subjects:
                self._subjects[source] = self.subject_env.from_string(source)

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
