"""YAML parsing that remembers the line of every key and item.

PyYAML's node tree carries positions; we build plain Python values from it and keep
a map from field path to line, so a validation error deep in a pydantic model can
still say ``abandoned_cart.yaml:12``. Duplicate keys are an error naming both lines.

Trigger files are hostile input as far as this module knows: a file is read as UTF-8
and at most ``MAX_YAML_BYTES`` long, nests at most ``MAX_DEPTH`` deep, keys are plain
values, only the standard YAML tags are allowed (no ``!!python/…``, ``!!set`` or custom
tags, on values, lists or mappings), and aliases may not expand the file beyond
``MAX_VALUES`` values (a "billion laughs" of under 1 KB would otherwise build billions).
Each is a located problem.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from flows.spec.problems import Path_, Problem, format_path, snippet

MAX_YAML_BYTES = 64 * 1024  # a trigger file is about 1 KB
MAX_VALUES = 10_000  # keys, items and values after expanding aliases
MAX_DEPTH = 32  # nesting of mappings and lists


@dataclass
class YamlDocument:
    file: Path
    text: str
    data: Any
    lines: dict[Path_, int] = field(default_factory=dict)

    def line_of(self, path: Path_) -> int | None:
        """The line of ``path``, or of its closest ancestor that exists in the file."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None

    def problem(self, path: Path_, field_name: str, message: str) -> Problem:
        line = self.line_of(path)
        return Problem(self.file, line, field_name, message, snippet(self.text, line))


class YamlSyntaxError(Exception):
    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        super().__init__(str(problem))


def read_source(file: Path, display_name: Path | None = None, limit: int = MAX_YAML_BYTES) -> str:
    """The file's text: UTF-8, at most ``limit`` bytes; otherwise a located problem."""
    shown = display_name or file
    with file.open("rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise YamlSyntaxError(Problem(shown, None, "", f"file is larger than {limit // 1024} KiB; at most "
                                                       f"{limit // 1024} KiB is read"))
    return decode_utf8(data, shown)


def decode_utf8(data: bytes, shown: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = _position(data, exc.start)
        text = data.decode("utf-8", errors="replace")
        raise YamlSyntaxError(Problem(shown, line, "", not_utf8_message(data, exc.start, column),
                                      snippet(text, line))) from None


def not_utf8_message(data: bytes, start: int, column: int) -> str:
    return (f"not UTF-8: byte 0x{data[start]:02x} at column {column} (a Latin-1 or Windows-1252 file?); "
            "save the file as UTF-8")


def _position(data: bytes, offset: int) -> tuple[int, int]:
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


class _Loader(yaml.SafeLoader):
    """SafeLoader that bounds nesting and remembers where each alias is used."""

    def __init__(self, stream: str, file: Path, text: str) -> None:
        super().__init__(stream)
        self.file, self.text = file, text
        self.depth = 0
        self.first_alias: int | None = None  # the line of the first alias used

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(AliasEvent) and self.first_alias is None:
            # peek_event is unannotated in types-PyYAML, here and below
            self.first_alias = self.peek_event().start_mark.line + 1  # type: ignore[no-untyped-call]
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1  # type: ignore[no-untyped-call]
                raise YamlSyntaxError(Problem(self.file, line, "", f"nested more than {MAX_DEPTH} levels deep",
                                              snippet(self.text, line)))
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml(file: Path, display_name: Path | None = None) -> YamlDocument:
    shown = display_name or file
    text = read_source(file, shown)
    loader = _Loader(text, shown, text)
    lines: dict[Path_, int] = {}
    try:
        node = loader.get_single_node()
        data = _Builder(loader, lines, shown, text).build(node, ()) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise YamlSyntaxError(
            Problem(shown, line, "", f"invalid YAML: {exc.problem or exc}", snippet(text, line))
        ) from None
    except yaml.reader.ReaderError as exc:  # a control character: not marked, but it has a position
        line = text.count("\n", 0, exc.position) + 1
        character = f" (character #x{exc.character:04x})" if isinstance(exc.character, int) else ""
        raise YamlSyntaxError(Problem(shown, line, "", f"invalid YAML: {exc.reason}{character}",
                                      snippet(text, line))) from None
    finally:
        loader.dispose()
    return YamlDocument(shown, text, data, lines)


_YAML_TAG = "tag:yaml.org,2002:"
# What plain YAML means without tags; any other tag (!!python/…, !!set, !!binary, !custom)
# would ask for a different type, and is refused rather than silently read as a list or mapping.
_STANDARD_TAGS: dict[type, frozenset[str]] = {
    MappingNode: frozenset({_YAML_TAG + "map"}),
    SequenceNode: frozenset({_YAML_TAG + "seq"}),
    ScalarNode: frozenset(_YAML_TAG + name for name in ("str", "int", "float", "bool", "null", "timestamp", "merge")),
}


@dataclass
class _Builder:
    loader: _Loader
    lines: dict[Path_, int]
    file: Path
    text: str
    values: int = 0

    def problem(self, line: int, field_name: str, message: str) -> YamlSyntaxError:
        return YamlSyntaxError(Problem(self.file, line, field_name, message, snippet(self.text, line)))

    def build(self, node: Node, path: Path_) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            line = self.loader.first_alias or node.start_mark.line + 1
            raise self.problem(line, "", f"more than {MAX_VALUES:,} values once its aliases (*name) are expanded; "
                                         f"at most {MAX_VALUES:,} are read")
        self.lines.setdefault(path, node.start_mark.line + 1)
        if node.tag not in _STANDARD_TAGS[type(node)]:
            tag = node.tag.replace(_YAML_TAG, "!!")
            raise self.problem(node.start_mark.line + 1, format_path(path),
                               f"the YAML tag {tag!r} is not allowed; write plain values, lists and mappings")
        if isinstance(node, MappingNode):
            out: dict[Any, Any] = {}
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key_line = key_node.start_mark.line + 1
                if not isinstance(key_node, ScalarNode):
                    kind = "list" if isinstance(key_node, SequenceNode) else "mapping"
                    raise self.problem(key_line, "", f"a {kind} cannot be a key; a key is a plain name such as "
                                                     "inactive_for")
                key = self.scalar(key_node)
                if key in seen:
                    raise self.problem(key_line, str(key), f"duplicate key (first defined on line {seen[key]})")
                seen[key] = key_line
                self.lines[(*path, key)] = key_line
                out[key] = self.build(value_node, (*path, key))
            return out
        if isinstance(node, SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.scalar(node)

    def scalar(self, node: Node) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date such as 2026-13-45
            raise self.problem(node.start_mark.line + 1, "", f"invalid value: {exc}") from None
