"""The text part of a mail, derived from its HTML when a template has no ``.txt.j2``.

Mail HTML is mostly layout tables around paragraphs and links, and the text part is
derived once per recipient, so speed matters (a general layout engine such as
inscriptis took half the cost of a message). lxml's C parser calls back here per
element; the rules:

- ``head``, ``style`` and ``script`` are dropped; whitespace folds as in a browser;
- paragraphs, headings, divs, lists, tables and rows start new lines, and a blank
  line separates paragraphs; layout tables add nothing of their own;
- a table row's cells stand on one line, two spaces apart; list items start with ``- ``;
- a link keeps its target: ``[Abmelden](https://…)``; an image shows its ``alt`` text.
"""

import re
import threading

from lxml import etree

_SKIP = frozenset({"head", "style", "script", "title"})
_PARAGRAPH = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "table", "blockquote", "pre", "hr"})
_LINE = frozenset({"div", "tr", "li", "br", "section", "article", "header", "footer", "center", "address"})
_CELL = frozenset({"td", "th"})
_SPACES = re.compile(r"\s+")
_BLANK_LINES = re.compile(r"\n{3,}")


class _Text:
    """lxml parser target: collects lines as the parser walks the document."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.lines: list[str] = []
        self.line: list[str] = []
        self.skipping = 0
        self.links: list[tuple[str, int]] = []  # open <a>: href, where its text starts in the line
        self.cells = 0  # cells written on the current line

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        if tag in _SKIP:
            self.skipping += 1
        elif tag in _PARAGRAPH:
            self._break(blank=True)
        elif tag in _LINE:
            self._break()
            if tag == "li":
                self.line.append("- ")
        elif tag in _CELL:
            if self.cells and "".join(self.line).strip():
                self.line[-1] = self.line[-1].rstrip()
                self.line.append("  ")
            self.cells += 1
        elif tag == "a":
            self.links.append((attrib.get("href", ""), len(self.line)))
        elif tag == "img" and attrib.get("alt"):
            self.data(attrib["alt"])

    def end(self, tag: str) -> None:
        if tag in _SKIP:
            self.skipping -= 1
        elif tag in _PARAGRAPH:
            self._break(blank=True)
        elif tag in _LINE:
            self._break()
        elif tag == "a" and self.links:
            href, begin = self.links.pop()
            begin = min(begin, len(self.line))  # a line break inside the link: label what is left
            label = "".join(self.line[begin:]).strip()
            if href and not href.startswith(("#", "javascript:")) and href != label:
                del self.line[begin:]
                self.line.append(f"[{label}]({href})" if label else href)

    def data(self, text: str) -> None:
        if self.skipping:
            return
        text = _SPACES.sub(" ", text)
        if text == " " and (not self.line or self.line[-1].endswith(" ")):
            return  # whitespace between tags, or a second space
        if not self.line or self.line[-1].endswith((" ", "\n")):
            text = text.lstrip()
        self.line.append(text)

    def comment(self, text: str) -> None:
        pass

    def _break(self, blank: bool = False) -> None:
        line = "".join(self.line).strip()
        self.line, self.cells = [], 0
        if line:
            self.lines.append(line)
        if blank and self.lines and self.lines[-1]:
            self.lines.append("")

    def close(self) -> str:
        self._break()
        text = "\n".join(self.lines)
        return _BLANK_LINES.sub("\n\n", text).strip() + "\n"


_parsers = threading.local()


def html_to_text(html: str) -> str:
    """Readable plain text for the text/plain part: paragraphs, lines, links kept."""
    if not html.strip():
        return "\n"
    # One parser per thread, reused: making one inspects the target (a fifth of the cost).
    if not hasattr(_parsers, "parser"):
        _parsers.target = _Text()
        _parsers.parser = etree.HTMLParser(target=_parsers.target, remove_comments=True)
    _parsers.target.reset()
    text: str = etree.fromstring(html, _parsers.parser)  # the target's close()
    return text
