"""What the commands print: problems with their file and line, and a run's tables.

The file's own words are always text, never markup: a trigger named "[/x]" is shown, not obeyed.
"""

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.spec.problems import Problem
from flows.summary import RunSummary

console = Console()
errors = Console(stderr=True)


def print_problems(problems: list[Problem]) -> None:
    for problem in problems:
        label = "[bold yellow]warning:[/] " if problem.severity == "warning" else ""
        # The file's own words are text, never markup: a trigger named "[/x]" is shown, not obeyed.
        errors.print(f"[bold red]{escape(str(problem.location))}[/]: "
                     + (f"[yellow]{escape(str(problem.field))}[/]: " if problem.field else "")
                     + label + escape(problem.message), markup=True, highlight=False, soft_wrap=True)
        if problem.snippet:
            errors.print(problem.snippet, markup=False, highlight=False)
        errors.print()


def summary_table(summary: RunSummary) -> Table:
    rows = summary.table()
    table = Table(title=summary.headline(), title_justify="left", min_width=80)
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in rows:
        style = "bold" if row["stage"] == "total" else None
        table.add_row(*(str(v) for v in row.values()), style=style)
    return table


def planned_table(summary: RunSummary) -> Table:
    table = Table(title=f"Who would get what (first {len(summary.planned)})", title_justify="left")
    for column in ("customer", "stage", "language", "template", "subject"):
        table.add_column(column)
    for mail in summary.planned:
        table.add_row(mail.customer, mail.stage, mail.language, mail.template, mail.subject)
    return table
