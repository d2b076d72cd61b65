"""YAML parsing that remembers the line of every key and item.

PyYAML's node tree carries positions; we build plain Python values from it and keep
a map from field path to line, so a validation error deep in a pydantic model can
still say ``abandoned_cart.yaml:12``. Duplicate keys are an error naming both lines.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from flows.spec.problems import Path_, Problem, snippet


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


def load_yaml(file: Path, display_name: Path | None = None) -> YamlDocument:
    shown = display_name or file
    text = file.read_text(encoding="utf-8")
    loader = yaml.SafeLoader(text)
    lines: dict[Path_, int] = {}
    try:
        node = loader.get_single_node()
        data = _build(loader, node, (), lines, shown, text) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise YamlSyntaxError(
            Problem(shown, line, "", f"invalid YAML: {exc.problem or exc}", snippet(text, line))
        ) from None
    finally:
        loader.dispose()
    return YamlDocument(shown, text, data, lines)


def _build(
    loader: yaml.SafeLoader, node: Node, path: Path_, lines: dict[Path_, int], file: Path, text: str
) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, MappingNode):
        out: dict[Any, Any] = {}
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            key_line = key_node.start_mark.line + 1
            if key in seen:
                raise YamlSyntaxError(
                    Problem(
                        file,
                        key_line,
                        str(key),
                        f"duplicate key (first defined on line {seen[key]})",
                        snippet(text, key_line),
                    )
                )
            seen[key] = key_line
            lines[path + (key,)] = key_line
            out[key] = _build(loader, value_node, path + (key,), lines, file, text)
        return out
    if isinstance(node, SequenceNode):
        return [_build(loader, item, path + (i,), lines, file, text) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)
