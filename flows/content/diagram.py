"""A journey drawn as a Mermaid flowchart, for the preview gallery and run artifacts.

The drawing is text a browser renders, and its labels are the marketer's own words
(subjects, event names, customer fields), so every label is quoted and escaped with
Mermaid's entity codes: nothing in it can close the label, start a line, a directive
(``%%{…}%%``) or an HTML tag; the only markup is the ``<br/>`` put between lines here.

Node ids come from positions, never from content: ``entry``, ``exits``, each step
``s0``, ``s1``, … in reading order (``walk``) and its branches' decision ``d0``, ``d1``, …
with the same number. The same journey draws the same text, and a changed subject
changes a label, not the graph.
"""

import re
import unicodedata
from dataclasses import dataclass, field
from datetime import timedelta

from flows.clock import format_duration
from flows.spec.journey import Branch, EventCondition, ExitGoal, Experiment, Journey, Step, When

SUBJECT_CHARS = 40  # a subject longer than this is cut, with "…": the node stays legible
_LINE = "<br/>"

# Mermaid turns ``#name;`` into ``&name;`` after parsing, so a raw ``#`` is escaped too.
# ``%%`` starts a comment or a directive (``%%{init: …}%%``) and a backtick a Markdown
# string; a lone ``%`` is plain text ("10 % off") and stays as it is.
_ENTITIES = {"#": "#35;", '"': "#quot;", "&": "#amp;", "<": "#lt;", ">": "#gt;", "|": "#124;",
             "[": "#91;", "]": "#93;", "`": "#96;", "%": "#37;"}
_SPECIAL = re.compile(r'[#"&<>|\[\]`]|%(?=%)|(?<=%)%')


def _escape(text: str) -> str:
    """One line of label text, safe inside Mermaid's double quotes: whitespace (newlines
    too) folded to single spaces, control characters dropped, specials as entity codes."""
    folded = " ".join(text.split())
    printable = "".join(char for char in folded if unicodedata.category(char) != "Cc")
    return _SPECIAL.sub(lambda match: _ENTITIES[match.group()], printable)


def _label(*lines: str) -> str:
    """Lines escaped one by one and joined with the one separator emitted here."""
    return '"' + _LINE.join(_escape(line) for line in lines) + '"'


def _shorten(text: str, limit: int = SUBJECT_CHARS) -> str:
    """At most ``limit`` characters, "…" included, cut after a word when one ends in the second half."""
    folded = " ".join(text.split())
    if len(folded) <= limit:
        return folded
    cut = folded[:limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space >= limit // 2 else cut).rstrip() + "…"


def _amount(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:.2f}"


def describe(when: When) -> str:
    """A condition as a reader says it (``cart ≥ 80 and not clicked day-0``): every
    stated field, in the model's order, since all of them must hold."""
    parts: list[str] = []
    if when.stage is not None:
        parts.append("stage " + " or ".join(when.stage))
    if when.min_cart_value is not None:
        parts.append(f"cart ≥ {_amount(when.min_cart_value)}")
    if when.max_cart_value is not None:
        parts.append(f"cart ≤ {_amount(when.max_cart_value)}")
    if when.min_cart_items is not None:
        parts.append(f"cart has ≥ {when.min_cart_items} item{'s' if when.min_cart_items > 1 else ''}")
    if when.ordered_since_entry is not None:
        parts.append(("" if when.ordered_since_entry else "not ") + "ordered since entry")
    if when.clicked is not None:
        parts.append(f"clicked {when.clicked}")
    if when.not_clicked is not None:
        parts.append(f"not clicked {when.not_clicked}")
    if when.event_since_entry is not None:
        parts.append(f"{_event(when.event_since_entry)} since entry")
    if when.no_event_since_entry is not None:
        parts.append(f"no {_event(when.no_event_since_entry)} since entry")
    for name, value in (when.customer or {}).items():
        parts.append(f"{name} = {value}")
    return " and ".join(parts)


def _event(event: EventCondition) -> str:
    """``'NPS Answered' with score ≤ 6``: the name, and the property's bounds if any."""
    bounds = [f"≥ {event.at_least:g}" if event.at_least is not None else "",
              f"≤ {event.at_most:g}" if event.at_most is not None else ""]
    said = " and ".join(b for b in bounds if b)
    return f"'{event.name}'" + (f" with {event.property} {said}" if event.property else "")


def _goal(goal: ExitGoal) -> str:
    """One exit goal in a word or two (``ordered``, ``stage → loyal``)."""
    if goal.ordered:
        return "ordered"
    if goal.unsubscribed:
        return "unsubscribed"
    if goal.stage_changed_to is not None:
        return f"stage → {goal.stage_changed_to}"
    return f"event '{goal.event}'"


def _wait(step: Step, first: bool) -> str:
    """``after 2h``; a zero wait is the entry itself for the journey's first step, and
    right after the previous send for any other."""
    if step.wait == timedelta(0):
        text = "at entry" if first else "right after"
    else:
        text = f"after {format_duration(step.wait)}"
    return text if step.at is None else f"{text}, then {step.at:%H:%M}"


def _subject(step: Step) -> str:
    """The subject every language falls back to (``*``), else the first language's."""
    subjects = step.email.subject
    return _shorten(subjects["*"] if "*" in subjects else next(iter(subjects.values())))


def _percent(share: float) -> str:
    return f"{share:.0f}" if abs(share - round(share)) < 0.05 else f"{share:.1f}"


def _experiment(experiment: Experiment) -> list[str]:
    """``A/B on clicks: a 50 %, b 50 %`` and, when a winner takes over, the rule."""
    total = sum(variant.weight for variant in experiment.variants)
    arms = "/".join(chr(ord("A") + number) for number in range(len(experiment.variants)))
    shares = ", ".join(f"{variant.name} {_percent(100 * variant.weight / total)} %"
                       for variant in experiment.variants)
    lines = [f"{arms} on {experiment.metric}: {shares}"]
    if (rule := experiment.pick_winner) is not None:
        lines.append(f"winner at P ≥ {rule.probability:g}, ≥ {rule.min_per_variant:,} each")
    return lines


@dataclass
class _Drawing:
    lines: list[str] = field(default_factory=list)
    count: int = 0  # steps drawn so far: the next step's number

    def steps(self, steps: list[Step], source: str, into: str | None, top: bool) -> None:
        """Each step after the one before it; ``into`` labels the edge into the first (a branch's condition)."""
        for index, step in enumerate(steps):
            number, self.count = self.count, self.count + 1
            node = f"s{number}"
            detail = _experiment(step.experiment) if step.experiment else []
            label = _label(step.name, _wait(step, top and index == 0), _subject(step), *detail)
            self.lines.append(f"    {node}[{label}]")
            # A branch's condition is checked after the send before; the step's own when it is due.
            conditions = [into if index == 0 else None, None if step.when is None else describe(step.when)]
            edge = "; if ".join(text for text in conditions if text)
            self.lines.append(f"    {source} -->|{_label(edge)}| {node}" if edge else f"    {source} --> {node}")
            if step.branches:
                self.branches(step.branches, number)
            source = node  # a step after a branching one follows it, not its branches (as in walk)

    def branches(self, branches: list[Branch], number: int) -> None:
        """A decision after step ``number``: first match wins, ``else`` last."""
        decision = f"d{number}"
        self.lines.append(f"    {decision}{{{_label('first match')}}}")
        self.lines.append(f"    s{number} --> {decision}")
        for branch in branches:
            self.steps(branch.steps, decision, "else" if branch.when is None else describe(branch.when), top=False)


def mermaid(journey: Journey, entry: str) -> str:
    """The journey as a ``flowchart TD``: the entry (``entry``: what starts it, e.g.
    "abandoned cart, idle 1h"), each step with its wait, subject and experiment, each
    ``when`` on the edge into its step, branches as decisions, exit goals as one note."""
    drawing = _Drawing([f"    entry([{_label(entry)}])"])
    if journey.exit_when:
        goals = " · ".join(_goal(goal) for goal in journey.exit_when)
        drawing.lines += [f"    exits>{_label('exits when: ' + goals)}]", "    entry -.- exits"]
    drawing.steps(journey.steps, "entry", None, top=True)
    return "\n".join(["flowchart TD", *drawing.lines]) + "\n"
