"""What the commands print: problems with their file and line, a run's tables, and the reports'
tables (never cut when piped).

The file's own words are always text, never markup: a trigger named "[/x]" is shown, not obeyed.
"""

import io
import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from flows.clock import format_duration
from flows.spec.problems import Problem
from flows.summary import RunSummary

if TYPE_CHECKING:  # imported where used: every command loads this module, few need the analyses
    from flows.analysis.decisions import Decision
    from flows.analysis.experiment_looks import ExperimentResult
    from flows.analysis.holdouts import HoldoutLift
    from flows.analysis.report import Report, ReportRow
    from flows.analysis.stages import StageKpis
    from flows.analysis.timeline import Timeline
    from flows.simulate import Simulation

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


# -- tables that are never cut -------------------------------------------------------

def show(table: Table, on: Console | None = None) -> None:
    """Print a table whole. Piped or captured, it is drawn at its own natural width, whatever
    COLUMNS says (rich would otherwise squeeze it to 80 columns and wrap or cut its cells), with
    no trailing blanks; in a terminal it fits the window, folding a long cell onto more lines,
    never cutting it short."""
    target = on or console
    for column in table.columns:
        column.overflow = "fold"
    if target.is_terminal:
        target.print(table)
        return
    natural = Measurement.get(target, target.options.update_width(100_000), table).maximum
    title = cell_len(table.title) if isinstance(table.title, str) else 0
    drawn = io.StringIO()
    Console(file=drawn, width=max(natural, title, 20), no_color=True, highlight=False).print(table)
    target.file.write("".join(line.rstrip() + "\n" for line in drawn.getvalue().splitlines()))
    target.file.flush()


def say(text: str, on: Console | None = None) -> None:
    """One line of the report's prose, never wrapped (a pipe keeps it one line) and never markup."""
    (on or console).print(text, markup=False, highlight=False, soft_wrap=True)


def _table(title: str, columns: Sequence[str], left: int = 1, words: Sequence[str] = ()) -> Table:
    """A table whose first ``left`` columns, and those named in ``words``, are text (left-aligned);
    the rest are figures."""
    table = Table(title=escape(title), title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(escape(column), justify="left" if i < left or column in words else "right")
    return table


# -- lifecycle report ----------------------------------------------------------------

_FIGURES = ("delivered", "bounced", "clicked", "click rate", "orders", "conversion", "revenue", "revenue/recipient")


def _figures(row: "ReportRow", opens: bool) -> list[str]:
    from flows.analysis.report import money, percent

    figures = [str(row.delivered), str(row.bounced), str(row.unique_clicks), percent(row.click_rate),
               str(row.conversions), percent(row.conversion_rate), money(row.revenue),
               money(row.revenue_per_recipient)]
    return [*figures, str(row.opens)] if opens else figures


def report_tables(report: "Report") -> list[Table]:
    """Per trigger, then per stage, template folder and variant, then the holdouts."""
    opens = any(row.opens for row in report.rows)
    extra = ["opens*"] if opens else []
    period = f"{report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC"
    basis = " or ".join(report.basis)
    tables = []
    per_trigger = _table(f"Marketing mail sent from {period} (orders: last {basis} within "
                         f"{format_duration(report.window)})", ["trigger", *_FIGURES, *extra])
    for row in report.rows_of("trigger"):
        per_trigger.add_row(escape(row.trigger), *_figures(row, opens))
    tables.append(per_trigger)
    for dimension, label in (("stage", "stage"), ("template", "template"), ("variant", "variant")):
        table = _table(f"Per {label}", ["trigger", label, *_FIGURES, *extra], left=2)
        for row in report.rows_of(dimension):
            table.add_row(escape(row.trigger), escape(row.value or "-"), *_figures(row, opens))
        tables.append(table)
    if report.holdouts:
        tables.append(holdout_table(report.holdouts))
    return tables


def holdout_table(lifts: Sequence["HoldoutLift"]) -> Table:
    """Treated against held out, by intention to treat: any order in the window after the
    (would-be) send, clicked or not."""
    from flows.analysis.report import percent

    table = _table("Holdout lift (orders within the window after the mail, or the would-be mail; 95 % interval)",
                   ["trigger", "currency", "treated", "converted", "held out", "converted", "lift", "95 % interval",
                    "revenue/recipient", "incremental revenue", "verdict"], left=2, words=["verdict"])
    for lift in lifts:
        lo, hi = lift.lift_ci
        treated, held = lift.treated, lift.held_out
        table.add_row(escape(lift.trigger), escape(lift.currency or "-"), str(treated.recipients),
                      percent(treated.rate), str(held.recipients), percent(held.rate), points(lift.lift),
                      f"{points(lo)} to {points(hi)}",
                      f"{cents(treated.revenue_per_recipient_cents)} vs {cents(held.revenue_per_recipient_cents)}",
                      cents(lift.incremental_revenue_cents), escape(lift.verdict))
    return table


def points(value: float | None) -> str:
    """A difference of rates in percentage points, signed."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value * 100:+.1f} pp"


def cents(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value / 100:,.2f}"


def print_report(report: "Report") -> None:
    from flows.analysis.report import OPENS_NOTE, money

    for table in report_tables(report):
        show(table)
    found = report.unattributed
    say(f"Unattributed: {found.orders} order(s) placed in the period ({money(found.revenue)}) had no marketing "
        "mail within the window." + (f" {found.pending} order(s) are not attributed yet (run `lifecycle "
                                     "attribute`)." if found.pending else ""))
    if any(row.opens for row in report.rows):
        say(f"* {OPENS_NOTE}.")
    for line in report.lines():
        say(line)


def experiment_tables(found: "Sequence[ExperimentResult]") -> list[Table]:
    """Each journey step's experiment: every arm's recipients, human clicks and conversions with
    their rates, 95 % intervals and P(best); the held out as their own arm; the rule's last word."""
    tables = []
    for result in found:
        salt = f", salt {result.salt}" if result.salt else ""
        table = _table(f"Experiment: {result.trigger}, step {result.step}{salt}",
                       ["arm", "recipients", "clicks", "click rate (95 % interval)", "P(best) clicks", "conversions",
                        "conversion rate (95 % interval)", "P(best) conversions"])
        for arm in result.arms:
            table.add_row(escape(arm.variant or "held out"), f"{arm.recipients:,}", f"{arm.clicks:,}",
                          _rate(arm.click_rate, arm.click_interval), _best(arm.click_p_best), f"{arm.conversions:,}",
                          _rate(arm.conversion_rate, arm.conversion_interval), _best(arm.conversion_p_best))
        winner = f"{result.winner} won: " if result.winner else ""
        table.caption = escape(winner + (result.decision or "the winner rule has taken no look yet"))
        table.caption_justify = "left"
        tables.append(table)
    return tables


def _rate(rate: float, interval: tuple[float, float]) -> str:
    return f"{rate:.1%} ({interval[0]:.1%}–{interval[1]:.1%})"


def _best(p: float | None) -> str:
    return "-" if p is None else f"{p:.3f}"


# -- lifecycle customer --------------------------------------------------------------

def timeline_table(found: "Timeline") -> Table:
    who = ", ".join(p for p in (found.name, found.email) if p)
    title = f"Customer {found.external_id}" + (f" ({who})" if who else "") + f", as of {found.now:%Y-%m-%d %H:%M} UTC"
    table = _table(title, ["when (UTC)", "what", "trigger", ""], left=4)
    for entry in found.entries:
        table.add_row(f"{entry.at:%Y-%m-%d %H:%M:%S}", entry.kind, escape(entry.trigger or "-"), escape(entry.what))
    return table


def decisions_table(found: "Sequence[Decision]", now: Any) -> Table:
    """What each trigger due for the customer would decide now, and why not, if not."""
    table = _table(f"If the triggers ran now ({now:%Y-%m-%d %H:%M} UTC)", ["trigger", "step", "decision"], left=3)
    for d in found:
        until = f" until {d.not_before:%Y-%m-%d %H:%M} UTC" if d.not_before else ""
        table.add_row(escape(d.trigger), escape(d.step or "-"), escape(f"{d.outcome}{until}"))
    return table


# -- lifecycle stages ----------------------------------------------------------------

def distribution_table(rows: Sequence[tuple[Any, dict[str, int]]]) -> Table:
    names = list(rows[0][1]) if rows else []
    table = _table("Customers per stage at each week's end (share)", ["week ending", *names, "total"])
    for day, counts in rows:
        total = sum(counts.values())
        table.add_row(str(day), *(f"{n} ({n / total:.0%})" if total else "0" for n in counts.values()), str(total))
    return table


def transition_table(matrix: dict[str, dict[str, int]], start: Any, end: Any) -> Table:
    names = list(next(iter(matrix.values()))) if matrix else []
    table = _table(f"Moves between stages from {start} to {end} (rows: from, columns: to)", ["from", *names])
    for source, row in matrix.items():
        table.add_row(escape(source), *(str(n) for n in row.values()))
    return table


def kpi_table(kpis: Sequence["StageKpis"], since: Any, until: Any) -> Table:
    from flows.analysis.report import money, percent

    table = _table(f"Per stage, customers in it on {since}, until {until}",
                   ["stage", "customers", "conversion", "repeat purchase", "average order", "frequency",
                    "click rate"])
    for k in kpis:
        frequency = "-" if k.purchase_frequency is None else f"{k.purchase_frequency:.2f}"
        table.add_row(escape(k.stage), str(k.customers), percent(k.conversion_rate), percent(k.repeat_purchase_rate),
                      money(k.average_order_value), frequency, percent(k.click_rate))
    return table


# -- lifecycle simulate --------------------------------------------------------------

TIMELINE_LINES = 24  # more ticks with something happening than this: one line per day


def simulation_headline(found: "Simulation") -> str:
    return (f"Simulated {found.trigger} from {found.start:%Y-%m-%d %H:%M} to {found.end:%Y-%m-%d %H:%M} UTC "
            f"every {format_duration(found.every)}, {len(found.ticks)} tick(s): {found.entered} entered; "
            "nothing was sent or recorded.")


def simulation_tables(found: "Simulation") -> list[Table]:
    """Per step, where its customers ended; then the timeline: per tick (or per day, when
    many ticks had something happen), who entered and each step's mails."""
    from flows.simulate import ONE_MAIL

    def label(step: str) -> str:
        return step or "mail"

    def counts(counter: Counter[str]) -> str:
        return ", ".join(f"{name} {n}" for name, n in sorted(counter.items())) or "-"

    lines = []
    for tally in found.steps:
        exited = sum(tally.exited.values())
        lines.append({"step": label(tally.step), "branch": tally.branch, "reached": str(tally.reached),
                     "sent": str(tally.sent), "held out": str(tally.held_out), "passed": str(tally.passed),
                     "exited": f"{exited} ({counts(tally.exited)})" if exited else "0",
                     "deferred": str(tally.deferred), "other": counts(tally.other) if tally.other else "",
                     "variants (sent)": counts(tally.variants) if tally.variants else ""})
    optional = ("branch", "other", "variants (sent)")  # shown when a step has one
    columns = [c for c in lines[0] if c not in optional or any(line[c] for line in lines)]
    steps = _table("Per step", columns, left=2 if "branch" in columns else 1, words=["exited", *optional])
    for line in lines:
        steps.add_row(*(escape(line[c] or "-") for c in columns))
    names = [t.step for t in found.steps] or [ONE_MAIL]
    active = [tick for tick in found.ticks if tick.active]
    daily = len(active) > TIMELINE_LINES
    rows: dict[str, list[int]] = {}
    for tick in active:
        when = f"{tick.at:%Y-%m-%d}" if daily else f"{tick.at:%Y-%m-%d %H:%M}"
        row = rows.setdefault(when, [0] * (len(names) + 2))
        row[0] += tick.entered
        for i, name in enumerate(names, start=1):
            row[i] += tick.mails(name)
        row[-1] += tick.exited
    timeline = _table(f"Timeline ({'per day' if daily else 'ticks'} with something happening)",
                      ["day" if daily else "tick (UTC)", "entered", *(f"{label(n)} sent" for n in names), "exited"])
    for when, row in rows.items():
        timeline.add_row(when, *map(str, row))
    return [steps, timeline]
