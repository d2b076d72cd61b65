"""The per-run summary: counts per stage and outcome, for the terminal and the Prefect UI."""

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from flows.outcomes import FAMILIES, Outcome


@dataclass(frozen=True, slots=True)
class PlannedMail:
    """One line of a dry run: who would get what (no address: ids only)."""

    customer: str
    stage: str
    language: str
    template: str
    subject: str


@dataclass
class RunSummary:
    trigger: str
    evaluated_at: datetime
    dry_run: bool = False
    counts: Counter[tuple[str, Outcome]] = field(default_factory=Counter)
    planned: list[PlannedMail] = field(default_factory=list)
    # (template file, stage, language, journey step, variant): each mail sent, for its preview link
    templates: set[tuple[str, str, str, str, str]] = field(default_factory=set)
    interrupted: bool = False  # stopped between batches by a shutdown
    complaints: tuple[int, int] | None = None  # (spam complaints, mails sent) by this trigger in the last 30 days
    steps: dict[str, Counter[Outcome]] = field(default_factory=dict)  # a journey's outcomes, step by step
    decisions: dict[str, str] = field(default_factory=dict)  # a step's experiment: its winner rule's last word
    diagram: str | None = None  # a journey drawn as a Mermaid flowchart (``flows.content.diagram``)

    def add(self, stage: str, outcome: Outcome, count: int = 1) -> None:
        self.counts[(stage, outcome)] += count

    def merge(self, other: Counter[tuple[str, Outcome]]) -> None:
        self.counts.update(other)

    def absorb(self, step: str, part: "RunSummary") -> None:
        """A journey step's pass, counted in the run's totals and on its own."""
        self.combine(part)
        self.steps[step] = part.outcomes

    def combine(self, part: "RunSummary", planned_limit: int | None = None) -> None:
        """Another part of the same run counted in (a step's pass, a shard's slice), with at
        most ``planned_limit`` planned mails listed in all."""
        self.merge(part.counts)
        room = len(part.planned) if planned_limit is None else max(0, planned_limit - len(self.planned))
        self.planned.extend(part.planned[:room])
        self.templates.update(part.templates)
        self.interrupted = self.interrupted or part.interrupted
        self.decisions.update(part.decisions)

    def to_record(self) -> dict[str, Any]:
        """What a part of a run (a shard's slice of one pass) hands the run that adds it up, as
        JSON: its counts, templates and whether it was interrupted. Not its planned mails:
        customer ids and personal subjects, for a terminal, not for the artifacts it travels in."""
        return {"trigger": self.trigger, "evaluated_at": self.evaluated_at.isoformat(), "dry_run": self.dry_run,
                "counts": [[stage, outcome.value, n] for (stage, outcome), n in sorted(self.counts.items())],
                "templates": sorted(list(t) for t in self.templates), "interrupted": self.interrupted}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "RunSummary":
        """The part ``to_record`` wrote (the whole-run fields, steps to diagram, are the run's own)."""
        summary = cls(record["trigger"], datetime.fromisoformat(record["evaluated_at"]), record["dry_run"],
                      interrupted=record["interrupted"])
        for stage, outcome, n in record["counts"]:
            summary.add(stage, Outcome(outcome), n)
        summary.templates = {(a, b, c, d, e) for a, b, c, d, e in record["templates"]}
        return summary

    def step_table(self) -> list[dict[str, object]]:
        """A journey's run: one row per step, one column per outcome."""
        columns = sorted({outcome for counts in self.steps.values() for outcome in counts})
        return [{"step": step, **{c: counts.get(c, 0) for c in columns}} for step, counts in self.steps.items()]

    @property
    def outcomes(self) -> Counter[Outcome]:
        totals: Counter[Outcome] = Counter()
        for (_, outcome), count in self.counts.items():
            totals[outcome] += count
        return totals

    @property
    def stages(self) -> list[str]:
        return sorted({stage for stage, _ in self.counts})

    @property
    def sent(self) -> int:
        return self.outcomes[Outcome.SENT]

    def table(self) -> list[dict[str, object]]:
        """One row per stage, one column per outcome, plus a total row."""
        columns = sorted(self.outcomes)
        rows: list[dict[str, object]] = []
        for stage in self.stages:
            row: dict[str, object] = {"stage": stage}
            row.update({c: self.counts.get((stage, c), 0) for c in columns})
            rows.append(row)
        total: dict[str, object] = {"stage": "total"}
        total.update({c: self.outcomes[c] for c in columns})
        rows.append(total)
        return rows

    @property
    def complaint_warning(self) -> str | None:
        """Said when the trigger's spam-complaint rate crosses 0.1 %: well before Gmail's 0.3 % line."""
        from flows.feedback.bounces import COMPLAINT_RATE_WARNING

        complained, sent = self.complaints or (0, 0)
        if not sent or complained / sent <= COMPLAINT_RATE_WARNING:
            return None
        return (f"spam complaints {complained / sent:.2%} over 30 days ({complained} of {sent} mails): "
                f"above {COMPLAINT_RATE_WARNING:.1%}; Gmail's limit is 0.3%")

    def headline(self) -> str:
        totals = self.outcomes
        main = totals[Outcome.WOULD_SEND] if self.dry_run else totals[Outcome.SENT]
        verb = "would send" if self.dry_run else "sent"
        others = ", ".join(f"{name} {n}" for name, n in sorted(totals.items())
                           if name not in (Outcome.SENT, Outcome.WOULD_SEND))
        stopped = " (interrupted by shutdown)" if self.interrupted else ""
        warning = f"; WARNING: {self.complaint_warning}" if self.complaint_warning else ""
        return f"{self.trigger} @ {self.evaluated_at:%Y-%m-%d %H:%M:%S} UTC{stopped}: {verb} {main}" + (
            f"; {others}" if others else ""
        ) + warning

    def state_message(self) -> str:
        """The run's counts by family (``sent 9; deferred 5; skipped 53``): its Prefect state's
        message, so the UI's runs list says more than "Completed"."""
        families: Counter[str] = Counter()
        for outcome, count in self.outcomes.items():
            families[outcome.family] += count
        main = "would_send" if self.dry_run else "sent"
        parts = [f"{main.replace('_', ' ')} {families.pop(main, 0)}"]
        parts += [f"{family.replace('_', ' ')} {families[family]}" for family in FAMILIES if families.get(family)]
        stopped = " (interrupted by shutdown)" if self.interrupted else ""
        return "; ".join(parts) + stopped

    def to_markdown(self, preview: Callable[[str, str, str, str], str] | None = None) -> str:
        """The summary for the Prefect UI; ``preview(stage, language, step, variant)`` gives each
        template's preview link."""
        rows = self.table()
        if len(rows) == 1:
            body = "_Nobody was due._"
        else:
            columns = list(rows[0])
            body = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body += "\n".join("| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows)
        def label(name: str, stage: str, lang: str, step: str, variant: str) -> str:
            where = "".join((f"step {step}, " if step else "", f"variant {variant}, " if variant else ""))
            return f"`{name}` ({where}{stage}, {lang})"

        templates = "\n".join(
            f"- [{label(*mail)}]({preview(*mail[1:])})" if preview else f"- {label(*mail)}"
            for mail in sorted(self.templates)
        ) or "- none"
        warning = f"\n\n> **Warning:** {self.complaint_warning}" if self.complaint_warning else ""
        journey = ""
        if self.steps:
            steps = self.step_table()
            columns = list(steps[0]) if steps else ["step"]
            journey = "\n\n## Steps\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            journey += "\n".join("| " + " | ".join(str(r[c]) for c in columns) + " |" for r in steps)
        if self.decisions:
            journey += "\n\n## Experiments\n" + "\n".join(f"- **{step}**: {line}"
                                                         for step, line in sorted(self.decisions.items()))
        if self.diagram:
            journey += f"\n\n## The journey\n```mermaid\n{self.diagram}```"
        return (f"# {self.trigger}\n\n{self.headline()}{warning}\n\n{body}{journey}\n\n"
                f"## Templates used\n{templates}\n")
