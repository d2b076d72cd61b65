"""Errors that point a marketer at the file, line and field to fix."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Path_ = tuple[str | int, ...]


def format_path(path: Path_) -> str:
    """``('audience', 'stages', 1)`` → ``audience.stages[1]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int | None
    field: str
    message: str
    snippet: str = ""
    severity: Literal["error", "warning"] = "error"  # a warning is shown but rejects nothing

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}" if self.line else str(self.file)

    def __str__(self) -> str:
        where = f"{self.location}: {self.field}: " if self.field else f"{self.location}: "
        return where + self.message


class SpecError(Exception):
    """One or more problems in trigger files, stage rules or templates."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))

    def __reduce__(self) -> tuple[type["SpecError"], tuple[list[Problem]], dict[str, Any]]:
        """Pickled whole, problems and notes, as a sender process reports it to the run."""
        return SpecError, (self.problems,), self.__dict__


def snippet(text: str, line: int | None, context: int = 1) -> str:
    """The numbered lines around ``line``, the offending one marked with ``>``."""
    if not line:
        return ""
    lines = text.splitlines()
    start, end = max(1, line - context), min(len(lines), line + context)
    width = len(str(end))
    return "\n".join(
        f"{'>' if n == line else ' '} {n:>{width}} | {lines[n - 1]}" for n in range(start, end + 1)
    )
