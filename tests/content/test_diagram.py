"""A journey drawn as a Mermaid flowchart: the text below is the specification, every label
stays inside its quotes whatever a marketer writes, and node ids come from positions.

The Mermaid CLI is not installed here, so no test renders the text; the grammar the lines
must follow (one node or one edge each, labels quoted, only entity codes inside) is
checked instead, line by line."""

import html
import json
import re
from pathlib import Path

import pytest
import yaml

from flows.content.diagram import describe, mermaid
from flows.spec.journey import Journey, When
from tests.spec.test_journey import ABANDONED_CART_SERIES, STAGES, WELCOME_SERIES, check

HOSTILE = '"A" <script>alert(1)</script> | [x] #1'

WELCOME_DIAGRAM = """\
flowchart TD
    entry(["signed up"])
    exits>"exits when: ordered · stage → loyal"]
    entry -.- exits
    s0["day-0<br/>at entry<br/>Willkommen"]
    entry --> s0
    s1["day-3<br/>after 3d<br/>Unsere Lieblinge<br/>A/B on clicks: a 50 %, b 50 %<br/>winner at P ≥ 0.95, ≥ 500 each"]
    s0 --> s1
    d1{"first match"}
    s1 --> d1
    s2["day-7-engaged<br/>after 4d<br/>Schön, dass du da bist"]
    d1 -->|"clicked day-3"| s2
    s3["day-7-reminder<br/>after 4d<br/>Hast du schon gesehen?"]
    d1 -->|"else; if not clicked day-0"| s3
"""

ABANDONED_CART_DIAGRAM = """\
flowchart TD
    entry(["abandoned cart, idle 1h"])
    exits>"exits when: ordered · unsubscribed"]
    entry -.- exits
    s0["reminder<br/>at entry<br/>Noch da?"]
    entry --> s0
    s1["nudge<br/>after 1d<br/>Dein Warenkorb wartet"]
    s0 --> s1
    s2["incentive<br/>after 2d, then 10:00<br/>10 % auf deinen Warenkorb"]
    s1 -->|"cart ≥ 80"| s2
"""

# A label: double quotes around text with no quote, bracket, pipe, angle bracket or raw `#`
# in it: only Mermaid entity codes (#quot;) and the <br/> put between lines.
LABEL = r'"(?:[^"<>#|\[\]`\n]|<br/>|#\w+;)*"'
ID = r"(?:entry|exits|[sd]\d+)"
NODE = re.compile(rf"    {ID}(?:\(\[{LABEL}\]\)|\[{LABEL}\]|\{{{LABEL}\}}|>{LABEL}\])")
EDGE = re.compile(rf"    {ID} (?:-->(?:\|{LABEL}\|)?|-\.-) {ID}")


def journey_of(tmp_path: Path, text: str) -> Journey:
    journey, problems = check(tmp_path, text)
    assert journey is not None and problems == [], problems
    return journey


def grammar_problems(diagram: str) -> list[str]:
    """The lines that are neither the header, one node nor one edge."""
    header, *lines = diagram.removesuffix("\n").split("\n")
    return ([] if header == "flowchart TD" else [header]) + [
        line for line in lines if not (NODE.fullmatch(line) or EDGE.fullmatch(line))]


def ids(diagram: str) -> list[str]:
    return re.findall(r"^    (\w+)[\[({>]", diagram, re.M)


def decoded_labels(diagram: str) -> list[str]:
    """Each label's lines as Mermaid shows them: #name; is &name; and #35; is &#35; in its HTML."""
    def entity(code: re.Match[str]) -> str:
        return f"&#{code[1]};" if code[1].isdigit() else f"&{code[1]};"

    return [html.unescape(re.sub(r"#(\w+);", entity, line))
            for label in re.findall(LABEL, diagram) for line in label.strip('"').split("<br/>")]


@pytest.mark.parametrize(("text", "entry", "expected"), [
    (WELCOME_SERIES, "signed up", WELCOME_DIAGRAM),
    (ABANDONED_CART_SERIES, "abandoned cart, idle 1h", ABANDONED_CART_DIAGRAM),
], ids=["welcome", "abandoned cart"])
def test_a_series_draws_as_its_flowchart(tmp_path: Path, text: str, entry: str, expected: str) -> None:
    diagram = mermaid(journey_of(tmp_path, text), entry)
    assert diagram == expected
    assert grammar_problems(diagram) == []


def test_a_hostile_subject_entry_and_condition_stay_inside_their_labels(tmp_path: Path) -> None:
    hostile = json.dumps(HOSTILE + "\n%%{init: {}}%%")  # JSON is YAML: a quoted scalar
    text = WELCOME_SERIES.replace("subject: Willkommen}",
                                  f"subject: {hostile}}}\n    when: {{customer: {{locale: {hostile}}}}}")
    plain = mermaid(journey_of(tmp_path, WELCOME_SERIES), "signed up")
    diagram = mermaid(journey_of(tmp_path, text), HOSTILE + "\nflowchart LR")
    assert "<script" not in diagram.lower() and "%%" not in diagram
    assert grammar_problems(diagram) == []
    assert diagram.count("\n") == plain.count("\n") and ids(diagram) == ids(plain)
    shown = decoded_labels(diagram)  # what a reader sees: the words, intact, newlines folded
    assert f"{HOSTILE} flowchart LR" in shown
    assert f"{HOSTILE}…" in shown  # the subject, cut after a word to at most 40 characters
    assert f"locale = {HOSTILE} %%{{init: {{}}}}%%" in shown


@pytest.mark.parametrize(("condition", "text"), [
    ({"stage": ["new"]}, "stage new"),
    ({"stage": ["new", "active"]}, "stage new or active"),
    ({"min_cart_value": 80}, "cart ≥ 80"),
    ({"max_cart_value": 19.5}, "cart ≤ 19.50"),
    ({"min_cart_items": 3}, "cart has ≥ 3 items"),
    ({"ordered_since_entry": True}, "ordered since entry"),
    ({"ordered_since_entry": False}, "not ordered since entry"),
    ({"clicked": "day-3"}, "clicked day-3"),
    ({"not_clicked": "day-0"}, "not clicked day-0"),
    ({"event_since_entry": "Review Written"}, "'Review Written' since entry"),
    ({"no_event_since_entry": "Review Written"}, "no 'Review Written' since entry"),
    ({"customer": {"locale": "de-DE"}}, "locale = de-DE"),
    ({"customer": {"locale": "de-DE", "timezone": "Europe/Berlin"}}, "locale = de-DE and timezone = Europe/Berlin"),
    ({"min_cart_value": 20, "max_cart_value": 200, "not_clicked": "nudge"},
     "cart ≥ 20 and cart ≤ 200 and not clicked nudge"),
])
def test_every_condition_reads_as_a_sentence(condition: dict[str, object], text: str) -> None:
    assert describe(When.model_validate(condition, context={"stages": STAGES})) == text


def test_the_descriptions_cover_every_condition_field() -> None:
    described = set()
    for mark in test_every_condition_reads_as_a_sentence.pytestmark:  # type: ignore[attr-defined]
        if mark.name == "parametrize":
            described |= {name for condition, _ in mark.args[1] for name in condition}
    assert described == set(When.model_fields)


def test_ids_are_positions_so_the_same_journey_draws_the_same_text(tmp_path: Path) -> None:
    welcome = journey_of(tmp_path, WELCOME_SERIES)
    again = Journey.model_validate(yaml.safe_load(WELCOME_SERIES), context={"stages": STAGES})
    assert mermaid(welcome, "signed up") == mermaid(again, "signed up") == mermaid(welcome, "signed up")
    assert ids(mermaid(welcome, "signed up")) == ["entry", "exits", "s0", "s1", "d1", "s2", "s3"]
    renamed = WELCOME_SERIES.replace("day-7-engaged", "engaged").replace("Willkommen", "Hallo")
    assert ids(mermaid(journey_of(tmp_path, renamed), "x")) == ids(mermaid(welcome, "signed up"))


def test_subjects_waits_weights_and_goals_as_a_reader_says_them(tmp_path: Path) -> None:
    text = """\
steps:
  - name: first
    wait: 0s
    email:
      template: welcome
      subject: {de: "Ein sehr langer Betreff, der nicht in den Kasten passt", en: Hello}
    experiment:
      metric: conversions
      variants:
        - {name: a, weight: 2, subject: A}
        - {name: b, subject: B}
        - {name: c, weight: 0, subject: C}
    branches:
      - when: {stage: [new, active]}
        steps:
          - {name: soon, wait: 0s, at: "09:30", email: {template: welcome, subject: {en: Hi, "*": Hallo}}}
      - else: true
        steps:
          - {name: later, wait: 1w, email: {template: welcome, subject: Servus}}
exit_when:
  - ordered: true
  - unsubscribed: true
  - stage_changed_to: loyal
  - event: Review Written
"""
    assert mermaid(journey_of(tmp_path, text), "onboarding") == """\
flowchart TD
    entry(["onboarding"])
    exits>"exits when: ordered · unsubscribed · stage → loyal · event 'Review Written'"]
    entry -.- exits
    s0["first<br/>at entry<br/>Ein sehr langer Betreff, der nicht in…<br/>A/B/C on conversions: a 66.7 %, b 33.3 %, c 0 %"]
    entry --> s0
    d0{"first match"}
    s0 --> d0
    s1["soon<br/>right after, then 09:30<br/>Hallo"]
    d0 -->|"stage new or active"| s1
    s2["later<br/>after 7d<br/>Servus"]
    d0 -->|"else"| s2
"""  # noqa: E501 (the expected text: one line per node)
