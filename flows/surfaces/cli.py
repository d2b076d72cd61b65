"""The ``lifecycle`` command: validate, ingest, run, preview, demo, serve, web, deployments,
suppress, bounces, db and ledger; report, customer, attribute, stages and forget; simulate."""

import os
import sys
from collections.abc import Callable
from datetime import date, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from flows.clock import parse_now
from flows.memory import long_lived_heap
from flows.redaction import redact_urls
from flows.settings import Settings
from flows.spec.problems import SpecError
from flows.surfaces.environment import settings_from_environment
from flows.surfaces.terminal import console, errors, planned_table, print_problems, show, summary_table

if TYPE_CHECKING:
    from uuid import UUID

    from sqlalchemy import Engine

    from flows.analysis.attribution import AttributionTally
    from flows.analysis.decisions import Decision
    from flows.spec.policy import Policy
    from flows.spec.problems import Problem
    from flows.spec.project import Project
    from flows.spec.stages import StageRules
    from flows.spec.trigger import TriggerBase

app = typer.Typer(help="Lifecycle email triggers compiled into Prefect flows.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _every_command() -> None:
    """No password or token in any log line of any command (``flows.redaction``), and no
    telemetry: there is no internet here or in many shops' networks, so Prefect must not
    try to phone home."""
    from flows.redaction import redact_every_record

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    redact_every_record()


ledger_app = typer.Typer(help="Inspect and repair the send ledger.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
db_app = typer.Typer(help="The customer store's schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")
suppress_app = typer.Typer(help="Addresses no trigger may write to (bounces, complaints, unsubscribes, manual).",
                           no_args_is_help=True)
app.add_typer(suppress_app, name="suppress")


def _settings(triggers: Path | None = None, templates: Path | None = None) -> Settings:
    try:
        settings = settings_from_environment()
    except ValueError as exc:
        errors.print(f"[red]Configuration error:[/] {escape(redact_urls(str(exc)))}", highlight=False)
        raise typer.Exit(2) from None
    updates = {k: v for k, v in {"triggers_dir": triggers, "templates_dir": templates}.items() if v}
    return settings.model_copy(update=updates) if updates else settings


def _engine(settings: Settings) -> "Engine":
    """The store's engine. Development migrates on the fly; production expects `lifecycle db upgrade`."""
    from models.db import create_schema, get_engine
    from models.migrate import current, head

    engine = get_engine(settings.database_url)
    if settings.environment == "development":
        create_schema(engine)
    elif current(engine) != head(engine):
        errors.print(f"[red]The store is at migration {current(engine)}, the code expects {head(engine)}: "
                     "run `lifecycle db upgrade` first.[/]")
        raise typer.Exit(2)
    return engine


def _now(value: str | None) -> datetime:
    try:
        return parse_now(value)
    except ValueError:
        errors.print(f"[red]--now must be an ISO-8601 moment such as 2026-03-14T09:30:00Z, got {value!r}[/]")
        raise typer.Exit(2) from None


TriggersOpt = Annotated[Path | None, typer.Option("--triggers", help="Triggers folder (LIFECYCLE_TRIGGERS_DIR).")]
TemplatesOpt = Annotated[Path | None, typer.Option("--templates", help="Templates folder (LIFECYCLE_TEMPLATES_DIR).")]


@app.command()
def validate(triggers: TriggersOpt = None, templates: TemplatesOpt = None) -> None:
    """Check every trigger file, the stage rules and every template; report all problems."""
    from flows.run_context import load

    settings = _settings(triggers, templates)
    project = load(settings)
    project.warnings.extend(_stranded(settings, project))
    print_problems(project.warnings)  # shown, never failing: such a mail goes out in the default language
    if project.problems:
        print_problems(project.problems)
        files = {p.file for p in project.problems}
        errors.print(f"[red]{len(project.problems)} problem(s) in {len(files)} file(s).[/] "
                     f"{len(project.triggers)} trigger(s) are valid.")
        raise typer.Exit(1)
    names = ", ".join(sorted(project.triggers))
    warned = f" {len(project.warnings)} warning(s)." if project.warnings else ""
    console.print(f"[green]All good:[/] {len(project.triggers)} triggers ({names}), "
                  f"{len(project.stages.stages) if project.stages else 0} stages, templates render.{warned}")


def _stranded(settings: Settings, project: "Project") -> "list[Problem]":
    """Warnings for journeys whose file changed under customers inside them, when the store is
    there to ask (validate also runs where there is none, such as a pull request's check)."""
    from dataclasses import replace

    from sqlalchemy import inspect, make_url
    from sqlalchemy.exc import SQLAlchemyError

    from flows.audience.journey import stranded
    from flows.spec.yaml_source import load_yaml
    from models.db import get_engine

    journeys = [t for t in project.triggers.values() if t.journey is not None]
    url = make_url(settings.database_url)
    if not journeys or (url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file()):
        return []
    warnings = []
    try:
        engine = get_engine(settings.database_url)
        if "step" not in {c["name"] for c in inspect(engine).get_columns("sends")}:
            return []  # a store from before journeys: nobody is inside one
        for trigger in journeys:
            counts = stranded(engine, trigger)
            if counts:
                doc = load_yaml(project.files[trigger.name])
                said = "; ".join(f"{n} at {steps}" for steps, n in sorted(counts.items()))
                warnings.append(replace(doc.problem(("steps",), "steps", (
                    f"{sum(counts.values())} customer(s) are inside this journey at steps it no longer has "
                    f"({said}), and no step of it follows from where they are: they go no further"
                )), severity="warning"))
    except SQLAlchemyError:
        return []  # no store to ask: the files alone are checked
    return warnings


@app.command()
def ingest(
    file: Annotated[str, typer.Argument(help="A .jsonl file of Segment events, or - for stdin.")],
    source: Annotated[str, typer.Option(help="Recorded with each event as where it came from (the tracking API "
                                        "records its write key's source).")] = "ingest",
) -> None:
    """Load Segment events (identify, track, page, screen, group, alias) into the store; re-loading is harmless."""
    from flows.collect import SOURCE
    from flows.ingest import ingest_lines

    if not SOURCE.fullmatch(source):
        errors.print("[red]--source: letters, digits, '.', '_' or '-', at most 64 characters[/]")
        raise typer.Exit(2)
    settings = _settings()
    engine = _engine(settings)
    if file == "-":
        with long_lived_heap():
            report = ingest_lines(engine, sys.stdin.buffer, source)
    else:
        path = Path(file)
        if not path.is_file():
            errors.print(f"[red]{file}: no such file[/]")
            raise typer.Exit(2)
        # bytes: a line that is not UTF-8 is one bad line, not a crash
        with path.open("rb") as handle, long_lived_heap():
            report = ingest_lines(engine, handle, source)
    for line, reason in report.errors:
        errors.print(f"[red]{escape(file)}:{line}[/]: {escape(reason)}", highlight=False)
    console.print(f"Loaded {report.loaded} event(s), {report.duplicates} already known, "
                  f"{len(report.errors)} bad line(s) skipped." + (f" Merged {report.merged} customer record(s) "
                                                                   "into another." if report.merged else ""))
    for shared in report.shared:  # one recipient at run time, but two records until an alias merges them
        errors.print(f"[yellow]warning:[/] {shared}", highlight=False)
    from flows.surfaces.prefect_events import emit_complaints

    announced = emit_complaints(report.complaints)
    if announced:
        console.print(f"Announced {announced} new complaint(s) to Prefect.")
    if report.errors:
        raise typer.Exit(1)


@app.command()
def run(
    triggers: Annotated[list[str] | None, typer.Argument(help="Trigger names (see `lifecycle validate`).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Run every enabled trigger.")] = False,
    now: Annotated[str | None, typer.Option(help="Evaluate as of this ISO-8601 moment (default: now).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run",
                                          help="Show who would get what; send and record nothing.")] = False,
    shards: Annotated[int | None, typer.Option(
        min=1, max=64, help="Read and send each audience in this many slices at once, one process each "
                            "(default: the trigger's `shards:`, else 1).")] = None,
    on_pool: Annotated[bool, typer.Option(
        "--on-pool", help="Run each as a flow run of its deployment, for the work pool's workers (its shards "
                          "too, spread over them), and wait for it; needs PREFECT_API_URL.")] = False,
) -> None:
    """Run triggers through Prefect (or, with --dry-run, just show the plan)."""
    from flows.run import execute
    from flows.run_context import load, prepare

    if bool(triggers) == all_:
        errors.print("[red]Name one or more triggers, or pass --all.[/]")
        raise typer.Exit(2)
    if on_pool and dry_run:
        errors.print("[red]--on-pool starts runs on the pool's workers; a dry run is shown here: pass one.[/]")
        raise typer.Exit(2)
    settings = _settings()
    moment = _now(now)
    engine = _engine(settings)
    project = load(settings) if all_ else load(settings, only=triggers)  # once: every run below gets it
    if project.problems:
        errors.print("[yellow]Some files have problems; their triggers are skipped:[/]")
        print_problems(project.problems)
    names = [n for n, t in project.triggers.items() if t.enabled] if all_ else list(triggers or [])
    failed = bool(project.problems) and all_
    for name in names:
        try:
            link = None
            if on_pool:
                _run_on_pool(project.trigger(name), moment.isoformat(), shards)
                continue
            if dry_run:
                summary = execute(prepare(name, moment, settings=settings, dry_run=True, project=project,
                                          engine=engine, shards=shards))
            else:
                from flows.surfaces.prefect_flows import run_in_prefect, ui_link

                spec = project.trigger(name)
                started = run_in_prefect(spec, moment.isoformat(), settings=settings, project=project, engine=engine,
                                         shards=shards)
                summary, link = started.summary, ui_link(started.id)
        except SpecError as exc:
            print_problems(exc.problems)
            failed = True
            continue
        except Exception as exc:  # noqa: BLE001 - one broken trigger never stops the others
            # One line, however narrow the terminal, and the relay's words as they came (no markup).
            errors.print(f"[red]{name} failed:[/] {escape(redact_urls(str(exc)))}", soft_wrap=True)
            failed = True
            continue
        console.print(summary_table(summary))
        if link:
            console.print(f"Prefect run: {link}", highlight=False, soft_wrap=True)
        if summary.complaint_warning:
            errors.print(f"[yellow]{name}: {summary.complaint_warning}[/]", highlight=False)
        if dry_run and summary.planned:
            console.print(planned_table(summary))
    if failed:
        raise typer.Exit(1)


def _run_on_pool(trigger: "TriggerBase", now: str, shards: int | None) -> None:
    """One trigger's run on the pool, told as it starts and as it ends; a run that did not
    complete raises, naming its state."""
    from flows.surfaces.prefect_flows import run_on_pool, ui_link

    def started(run_id: "UUID") -> None:
        link = ui_link(run_id)
        console.print(f"Started flow run {run_id} of deployment {trigger.name}" + (f": {link}" if link else ""),
                      highlight=False, soft_wrap=True)

    run_id, state = run_on_pool(trigger, now, shards=shards, started=started)
    if not state.is_completed():
        raise RuntimeError(f"flow run {run_id} ended {state.name}: {state.message or 'no message'}")
    console.print(f"{trigger.name}: {state.message or 'completed'}", highlight=False, soft_wrap=True)


@app.command()
def preview(
    trigger: Annotated[str, typer.Argument(help="Trigger name.")],
    customer: Annotated[str | None, typer.Option(help="A customer's external id: render with their real data.")] = None,
    stage: Annotated[list[str] | None,
                     typer.Option(help="Stage(s) to preview with sample data (default: all).")] = None,
    language: Annotated[list[str] | None,
                        typer.Option(help="Language(s) (default: every one the trigger is written in).")] = None,
    out: Annotated[Path, typer.Option(help="Where to write .html, .txt and .eml files.")] = Path("preview"),
    now: Annotated[str | None, typer.Option(help="Evaluation time for the customer's stage.")] = None,
) -> None:
    """Render a trigger's mail to files, with sample data or a real customer's."""
    from flows.content.preview import PreviewError, preview_customer, preview_samples

    settings = _settings()
    try:
        if customer:
            written = preview_customer(settings, trigger, customer, _now(now), out, _engine(settings))
        else:
            written = preview_samples(settings, trigger, stage, language, out)
    except SpecError as exc:
        print_problems(exc.problems)
        raise typer.Exit(1) from None
    except PreviewError as exc:
        errors.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    for mail in written:
        if not mail.stage:  # a journey's diagram
            console.print(f"{mail.mail}:", highlight=False)
        else:
            used = f"language {mail.language}" if not mail.fell_back else (
                f"[yellow]language {mail.language}, not {mail.asked}: the trigger has no subject or template for "
                f"{mail.asked}[/]")
            console.print(f"{mail.mail + ': ' if mail.mail else ''}{mail.stage} ({used}): subject: ", end="",
                          highlight=False)
            console.print(mail.subject, markup=False, highlight=False)
        for path in mail.paths:
            console.print(f"  wrote {path}", highlight=False)


@app.command()
def demo(
    customers: Annotated[int, typer.Option(help="How many demo customers to create on first run.")] = 300,
    outbox: Annotated[Path, typer.Option(help="Where the capture SMTP server writes messages.")] = Path("outbox"),
) -> None:
    """Seed a demo store, start a capture SMTP server, run every trigger through Prefect."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.surfaces.demo import run_demo

    run_demo(_settings(), customers, outbox, console)


@ledger_app.command("in-doubt")
def in_doubt(minutes: Annotated[int, typer.Option(help="Claims older than this many minutes.")] = 10) -> None:
    """List sends whose run died between claiming and recording (the server may have them)."""
    from datetime import timedelta

    from flows.send.claims import in_doubt as find

    rows = find(_engine(_settings()), timedelta(minutes=minutes))
    table = Table(title=f"{len(rows)} send(s) in doubt", title_justify="left")
    for column in ("send key", "customer", "claimed at", "message id"):
        table.add_column(column)
    for row in rows:
        table.add_row(escape(row.send_key), str(row.customer_id), row.claimed_at.isoformat(), escape(row.message_id))
    show(table)


@ledger_app.command("release")
def release(keys: Annotated[list[str], typer.Argument(help="Send keys to free, after checking the SMTP log.")]) -> None:
    """Free in-doubt claims so the next run sends them (only if the server never got them)."""
    from flows.send.claims import release as free

    count = free(_engine(_settings()), keys)
    console.print(f"Released {count} claim(s).")


@app.command()
def serve(workers: Annotated[int, typer.Option(help="Triggers that may run at the same time.")] = 4) -> None:
    """Run every enabled trigger on its schedule in this process (no Prefect server needed)."""
    import logging

    from flows.surfaces.serve import serve as run_scheduler

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from prefect.settings import get_current_settings

    settings = _settings()
    engine = _engine(settings)
    # With a Prefect server configured, each run is a flow run there, like a deployed one.
    report = bool(get_current_settings().api.url)
    raise typer.Exit(run_scheduler(settings, workers, engine=engine, report_to_prefect=report))


@app.command()
def web(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8025,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Server processes; one per core serves the most "
                                         "clicks (each commits its own clicks before their redirects).")] = 1,
) -> None:
    """Serve the links in every mail (tracked links, unsubscribe, preferences, confirmation), the tracking
    API (/v1/batch, /v1/track, … for Segment's and RudderStack's libraries), the webhooks, the previews and
    the reports page."""
    # Prefect configures logging when first imported: before uvicorn does, not at the first
    # preview (which silenced the access log).
    import prefect.main  # noqa: F401 - imported for its side effect (see above)
    import uvicorn
    from sqlalchemy.exc import OperationalError

    from flows.collect import WriteKeyError
    from flows.surfaces.web import create_app
    from flows.surfaces.web_security import log_config

    settings = _settings()
    try:
        _engine(settings)  # the store's schema: migrated in development, checked in production
    except OperationalError as exc:
        # Served anyway: /healthz never needs the store, and pages answer 503 until it is back.
        errors.print(f"[yellow]The store cannot be reached ({type(exc.orig).__name__}); serving anyway, "
                     "pages that need it answer 503 until it is back.[/]")
    try:
        application = create_app(settings)  # a broken policy.yaml stops here, located, in any case
    except SpecError as exc:
        print_problems(exc.problems)
        raise typer.Exit(2) from None
    except WriteKeyError as exc:
        errors.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(2) from None
    served: Any = application
    if workers > 1:  # each worker process makes its own app from the same environment
        served = "flows.surfaces.web:app_from_environment"
    uvicorn.run(served, factory=workers > 1, workers=workers if workers > 1 else None, host=host, port=port,
                log_level="info", log_config=log_config(), server_header=False)


@app.command()
def deployments(
    write: Annotated[bool, typer.Option("--write", help="Regenerate the deployments section of prefect.yaml.")] = False,
    check: Annotated[bool, typer.Option(
        "--check", help="Exit 1, with a diff, if prefect.yaml disagrees with triggers/.")] = False,
    file: Annotated[Path, typer.Option(help="The Prefect project file.")] = Path("prefect.yaml"),
) -> None:
    """Keep prefect.yaml's deployments in step with the trigger files (one deployment per trigger)."""
    from flows.run_context import load
    from flows.surfaces.deployments import deployments as generated
    from flows.surfaces.deployments import diff, render

    if write == check:
        errors.print("[red]Pass exactly one of --write or --check.[/]")
        raise typer.Exit(2)
    project = load(_settings())
    if project.problems:
        print_problems(project.problems)
        errors.print("[red]Fix the trigger files first: deployments are generated from valid triggers only.[/]")
        raise typer.Exit(1)
    triggers = list(project.triggers.values())
    if write:
        current = file.read_text(encoding="utf-8") if file.exists() else ""
        file.write_text(render(current, triggers), encoding="utf-8")
        console.print(f"Wrote {len(generated(triggers))} deployments to {file}.")
        return
    difference = diff(file, triggers)
    if difference:
        errors.print(difference, markup=False, highlight=False, soft_wrap=True)
        errors.print(f"[red]{file} does not match triggers/: run `lifecycle deployments --write`.[/]")
        raise typer.Exit(1)
    console.print(f"{file} matches triggers/ ({len(generated(triggers))} deployments).")


@suppress_app.command("add")
def suppress_add(
    emails: Annotated[list[str], typer.Argument(help="Addresses to suppress.")],
    reason: Annotated[str, typer.Option(help="unsubscribed, hard_bounce, spam_complaint or manual.")] = "manual",
    note: Annotated[str, typer.Option(help="Why, for the record.")] = "",
) -> None:
    """Suppress addresses: every trigger skips them from the next batch on."""
    from flows.consent import suppress
    from models import SuppressionReason, suppression_key

    try:
        why = SuppressionReason(reason)
    except ValueError:
        errors.print(f"[red]--reason must be one of {', '.join(r.value for r in SuppressionReason)}[/]")
        raise typer.Exit(2) from None
    suppress(_engine(_settings()), emails, why, note or "lifecycle suppress add")
    console.print(f"Suppressed {len({suppression_key(e) for e in emails})} address(es) ({why.value}).")


@suppress_app.command("from-mail")
def suppress_from_mail(
    files: Annotated[list[Path], typer.Argument(help=".eml files received at the unsubscribe mailbox.")],
) -> None:
    """Apply unsubscribe requests mailed to the List-Unsubscribe mailto: address (subject: unsubscribe TOKEN)."""
    import re
    from email import message_from_bytes, policy

    from flows.consent import unsubscribe_by_token
    from flows.signing_secret import resolved
    from models.types import utcnow

    settings = _settings()
    engine = _engine(settings)
    done = refused = 0
    for file in files:
        subject = str(message_from_bytes(file.read_bytes(), policy=policy.default).get("Subject", ""))
        match = re.search(r"unsubscribe\s+(\S+)", subject, re.IGNORECASE)
        customer = match and unsubscribe_by_token(engine, resolved(settings, engine).signing_secret, match.group(1),
                                                  "unsubscribe mail", utcnow())
        if customer:
            done += 1
        else:
            refused += 1
            errors.print(f"[yellow]{file}: no valid unsubscribe token in the subject[/]")
    console.print(f"Unsubscribed {done} customer(s); {refused} mail(s) without a valid token.")
    if refused:
        raise typer.Exit(1)


@suppress_app.command("remove")
def suppress_remove(emails: Annotated[list[str], typer.Argument(help="Addresses to allow again.")]) -> None:
    """Lift suppressions (marketing still needs confirmed consent)."""
    from flows.consent import lift

    console.print(f"Removed {lift(_engine(_settings()), emails)} suppression(s).")


@suppress_app.command("list")
def suppress_list(
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
) -> None:
    """List suppressed addresses, newest first."""
    from flows.consent import suppressions

    rows = suppressions(_engine(_settings()), reason, limit)
    table = Table(title=f"{len(rows)} suppressed address(es)", title_justify="left")
    for column in ("email", "reason", "since", "detail"):
        table.add_column(column)
    for row in rows:
        table.add_row(escape(row.email), row.reason, row.created_at.strftime("%Y-%m-%d %H:%M"), escape(row.detail))
    show(table)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration to LIFECYCLE_DATABASE_URL."""
    from models.db import create_schema, get_engine
    from models.migrate import current

    engine = get_engine(_settings().database_url)
    before = current(engine)
    create_schema(engine)
    console.print(f"Store migrated from {before or 'empty'} to {current(engine)}.")


@db_app.command("current")
def db_current() -> None:
    """Show the store's migration and the newest one."""
    from models.db import get_engine
    from models.migrate import current, head

    engine = get_engine(_settings().database_url)
    console.print(f"store: {current(engine) or 'empty'}; newest: {head(engine)}")


@app.command()
def bounces(
    files: Annotated[list[Path] | None, typer.Argument(help="Bounce or complaint mails (.eml), one per file.")] = None,
    maildir: Annotated[Path | None,
                       typer.Option(help="A Maildir: reads new/, then moves each message to cur/.")] = None,
    imap: Annotated[str | None, typer.Option(
        help="imap://user:pass@host:port/INBOX or imaps://…: reads unseen messages, then flags them seen.",
        envvar="LIFECYCLE_BOUNCE_IMAP_URL", show_default=False)] = None,
    rates: Annotated[bool, typer.Option("--rates", help="Show each trigger's spam-complaint rate instead.")] = False,
    days: Annotated[float, typer.Option(help="With --rates: over the last this many days.")] = 30,
) -> None:
    """Record bounces (RFC 3464 delivery status notifications) and spam complaints (ARF feedback
    reports) mailed back to the Return-Path; each report once. --rates shows complaint rates."""
    from flows.feedback.reports import (
        ImapError,
        Tally,
        UnreadableReport,
        imap_messages,
        maildir_messages,
        process,
    )
    from flows.signing_secret import resolved

    settings = _settings()
    engine = _engine(settings)
    if rates:
        from datetime import timedelta

        from flows.feedback.bounces import COMPLAINT_RATE_WARNING, complaint_rates
        from models.types import utcnow

        found = complaint_rates(engine, utcnow() - timedelta(days=days))
        rate_table = Table(title=f"Spam complaints per trigger, last {days:g} days (warn above "
                                 f"{COMPLAINT_RATE_WARNING:.1%}; Gmail's limit is 0.3%)", title_justify="left")
        for column in ("trigger", "sent", "complaints", "rate", ""):
            rate_table.add_column(column, justify="left" if column in ("trigger", "") else "right")
        for trigger, (complained, sent) in sorted(found.items()):
            rate = complained / sent if sent else 0.0
            rate_table.add_row(trigger, str(sent), str(complained), f"{rate:.2%}",
                               "[red]above 0.1%[/]" if rate > COMPLAINT_RATE_WARNING else "")
        show(rate_table)
        return
    if not files and maildir is None and imap is None:
        errors.print("[red]Name bounce files, or pass --maildir DIR or --imap URL (or --rates).[/]")
        raise typer.Exit(2)
    secret, rule = resolved(settings, engine).signing_secret, settings.soft_bounce_rule
    table = Table(title="Bounces and complaints", title_justify="left")
    for column in ("input", "reports", "new", "duplicates", "unmatched", "suppressed", "delayed", "not a report"):
        table.add_column(column, justify="left" if column == "input" else "right")
    total, unreadable = Tally(), []

    def read(name: str, data: bytes, done: Callable[[], None] | None = None) -> None:
        try:
            tally = process(engine, data, secret, rule)
        except UnreadableReport as exc:
            unreadable.append(name)
            errors.print(f"[red]{name}[/]: {exc}", highlight=False)
            return
        if done is not None:
            done()
        total.add(tally)
        table.add_row(name, *(str(n) for n in (tally.reports, tally.new, tally.duplicates, tally.unmatched,
                                                len(tally.suppressed), tally.delayed, tally.ignored)))

    for file in files or []:
        try:
            data = file.read_bytes()
        except OSError as exc:
            unreadable.append(str(file))
            errors.print(f"[red]{file}[/]: cannot read: {exc.strerror or exc}", highlight=False)
            continue
        read(str(file), data)
    try:
        if maildir is not None:
            for name, data, done in maildir_messages(maildir):
                read(name, data, done)
        if imap is not None:
            with imap_messages(imap) as messages:
                for name, data, done in messages:
                    read(name, data, done)
    except (UnreadableReport, ImapError, OSError) as exc:
        errors.print(f"[red]{exc}[/]", highlight=False)
        unreadable.append(str(maildir if isinstance(exc, (UnreadableReport, OSError)) else "IMAP"))
    table.add_row("total", *(str(n) for n in (total.reports, total.new, total.duplicates, total.unmatched,
                                               len(total.suppressed), total.delayed, total.ignored)), style="bold")
    console.print(table)
    for email, reason in sorted(total.suppressed.items()):
        console.print(f"suppressed {email} ({reason})", highlight=False)
    if unreadable:
        errors.print(f"[red]{len(unreadable)} input(s) could not be read:[/] {', '.join(unreadable)}", highlight=False)
        raise typer.Exit(1)


# -- outcomes: what the mail did ------------------------------------------------------

DEFAULT_PERIOD_DAYS = 30


def _moment(value: str | None, option: str) -> datetime | None:
    """``--since``/``--until``: a date (YYYY-MM-DD, its first moment in UTC) or an ISO-8601
    moment (naive means UTC), like ``--now``."""
    if value is None:
        return None
    try:
        return parse_now(value)
    except ValueError:
        errors.print(f"[red]{option} must be a date such as 2026-03-14 or an ISO-8601 moment such as "
                     f"2026-03-14T09:30:00Z, got {escape(repr(value))}[/]")
        raise typer.Exit(2) from None


def _period(since: str | None, until: str | None, moment: datetime) -> tuple[datetime, datetime]:
    """[since, until): until defaults to ``--now``, since to DEFAULT_PERIOD_DAYS before until."""
    from datetime import timedelta

    end = _moment(until, "--until") or moment
    start = _moment(since, "--since") or end - timedelta(days=DEFAULT_PERIOD_DAYS)
    if start >= end:
        errors.print(f"[red]--since ({start.isoformat()}) must be before --until ({end.isoformat()})[/]")
        raise typer.Exit(2)
    return start, end


def _policy_and_stages(settings: Settings) -> tuple["Policy", "StageRules | None"]:
    """The policy (attribution window and basis) and stage rules, without reading the triggers."""
    from flows.run_context import load

    project = load(settings, only=[])
    broken = [p for p in project.problems if Path(p.file).name in ("policy.yaml", "stages.yaml")]
    if broken:
        print_problems(broken)
        errors.print("[red]Fix policy.yaml and stages.yaml first: the reports read them.[/]")
        raise typer.Exit(1)
    return project.policy, project.stages


def _tally_line(tally: "AttributionTally", moment: datetime, rebuild: bool = False) -> str:
    bases = ", ".join(f"{basis} {n}" for basis, n in sorted(tally.by_basis.items()) if n)
    text = (f"{'Rebuilt' if rebuild else 'Refreshed'} attribution as of {moment.isoformat()}: "
            f"{tally.orders_seen} order(s) looked at, {tally.attributed} attributed to a mail"
            + (f" ({bases})" if bases else "") + f", {tally.unattributed} unattributed.")
    if tally.deleted_engagements:
        text += f" Deleted {tally.deleted_engagements} click(s) and open(s) past the retention period."
    return text


class Format(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


class ShortFormat(StrEnum):
    table = "table"
    json = "json"


FormatOpt = Annotated[Format, typer.Option("--format", help="table (for people), json or csv (for tools).")]
NowOpt = Annotated[str | None, typer.Option(help="As of this ISO-8601 moment (default: now).")]
SinceOpt = Annotated[str | None, typer.Option(help="From this date or moment (inclusive, UTC).")]
UntilOpt = Annotated[str | None, typer.Option(help="Up to this date or moment (exclusive; default: --now).")]


def _write_json(value: object) -> None:
    """JSON straight to stdout: no wrapping, no markup, whatever the terminal."""
    import json

    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _effect(value: str) -> float:
    """``2%`` or ``2``: percentage points of conversion rate, as a fraction (0.02)."""
    text = value.strip().removesuffix("%").strip()
    try:
        points = float(text)
    except ValueError:
        points = float("nan")
    if not 0 < points < 100:
        errors.print(f"[red]--effect must be a lift in percentage points, more than 0 and less than 100, such as "
                     f"2%, got {value!r}[/]", highlight=False)
        raise typer.Exit(2)
    return points / 100


@app.command()
def report(
    since: SinceOpt = None,
    until: UntilOpt = None,
    trigger: Annotated[list[str] | None, typer.Option("--trigger", help="Only this trigger (repeatable).")] = None,
    format_: FormatOpt = Format.table,
    now: NowOpt = None,
    no_attribute: Annotated[bool, typer.Option("--no-attribute",
                                               help="Do not attribute new orders first.")] = False,
    effect: Annotated[str, typer.Option(
        help="The conversion lift, in percentage points, whose sample size a holdout that is not yet conclusive "
             "is told (1% by default).")] = "1%",
) -> None:
    """What each trigger's marketing mail did: delivered, bounced, clicked, orders, revenue, and
    the holdout lift; per trigger, stage, template and variant. New orders are attributed first."""
    from concurrent.futures import ThreadPoolExecutor

    from flows.analysis.report import build_report, holdouts_meanwhile

    settings = _settings()
    moment = _now(now)
    start, end = _period(since, until, moment)
    lift = _effect(effect)
    engine = _engine(settings)
    policy, _ = _policy_and_stages(settings)
    out = console if format_ is Format.table else errors  # json and csv keep stdout to themselves
    with ThreadPoolExecutor(max_workers=1) as pool:
        # The holdout comparison reads no attribution: it runs while new orders are attributed.
        holdouts = holdouts_meanwhile(pool, engine, since=start, until=end, triggers=trigger or None, policy=policy,
                                      now=moment, effect=lift)
        if no_attribute:
            out.print("Attribution not refreshed (--no-attribute): orders since the last `lifecycle attribute` "
                      "are counted as pending.", highlight=False, soft_wrap=True)
        else:
            from flows.analysis.attribution import attribute

            out.print(_tally_line(attribute(engine, policy.attribution, moment), moment), highlight=False,
                      soft_wrap=True)
        found = build_report(engine, since=start, until=end, triggers=trigger or None, policy=policy, now=moment,
                             effect=lift, holdouts=holdouts)
    from flows.analysis.experiment_looks import results

    experiments = results(engine, since=start, until=end, now=moment, window=policy.attribution.window,
                          triggers=trigger or None)
    if format_ is Format.json:
        _write_json({**found.to_json(), "experiments": [e.to_json() for e in experiments]})
    elif format_ is Format.csv:
        import csv

        rows = found.to_rows()
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        from flows.surfaces.terminal import experiment_tables, print_report

        print_report(found)
        for table in experiment_tables(experiments):
            show(table)


@app.command()
def customer(
    customer_id: Annotated[str, typer.Argument(metavar="CUSTOMER", help="The shop's id for them, or their address.")],
    format_: Annotated[ShortFormat, typer.Option("--format", help="table or json.")] = ShortFormat.table,
    now: NowOpt = None,
) -> None:
    """A customer's timeline: each mail sent, held out, deferred, expired or failed (with the
    reason), each click, each order and the mail it is attributed to, and the consent changes
    and suppressions that explain a skipped mail."""
    from flows.analysis.timeline import AmbiguousCustomer, timeline
    from flows.surfaces.terminal import timeline_table

    settings = _settings()
    moment = _now(now)
    engine = _engine(settings)
    try:
        found = timeline(engine, customer_id, now=moment)
    except AmbiguousCustomer as exc:
        errors.print(f"[red]{escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(2) from None
    if found is None:
        from flows.privacy import forgotten_at
        from flows.signing_secret import resolved

        erased = forgotten_at(engine, customer_id, secret=resolved(settings, engine).signing_secret)
        errors.print(f"[red]{escape(customer_id)} was forgotten on {erased:%Y-%m-%d %H:%M} UTC: nothing is kept "
                     "to show.[/]" if erased else f"[red]No customer is known as {escape(repr(customer_id))}.[/]",
                     highlight=False)
        raise typer.Exit(1)
    now_decided = _decisions_now(settings, engine, found.external_id, moment)
    if format_ is ShortFormat.json:
        _write_json({**found.to_json(), "now": [d.to_json() for d in now_decided]})
        return
    show(timeline_table(found))
    if now_decided:
        from flows.surfaces.terminal import decisions_table

        show(decisions_table(now_decided, moment))


def _decisions_now(settings: Settings, engine: "Engine", external_id: str,
                   moment: datetime) -> "list[Decision]":
    """What each enabled trigger would decide for the customer now (``flows.analysis.decisions``);
    nothing when the project does not load (the timeline still shows)."""
    from sqlmodel import Session

    from flows.analysis.decisions import decisions_now
    from flows.run_context import load, prepare
    from models.identity import customer_by_id

    project = load(settings)
    with Session(engine) as session:
        customer = customer_by_id(session, external_id)
    if customer is None or customer.id is None or project.stages is None:
        return []
    contexts = [prepare(name, moment, settings=settings, project=project, engine=engine, dry_run=True)
                for name, trigger in sorted(project.triggers.items()) if trigger.enabled]
    return decisions_now(contexts, customer.id)


@app.command()
def attribute(
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Recompute every order's attribution from scratch.")]
    = False,
    now: NowOpt = None,
) -> None:
    """Attribute orders to the last marketing mail their customer clicked or received within
    the window (policy.yaml); only new orders unless --rebuild. Deletes clicks and opens
    older than the policy keeps them."""
    from flows.analysis.attribution import attribute as run_attribution

    settings = _settings()
    moment = _now(now)
    engine = _engine(settings)
    policy, _ = _policy_and_stages(settings)
    tally = run_attribution(engine, policy.attribution, moment, rebuild=rebuild, keep_for=policy.tracking.keep_for)
    console.print(_tally_line(tally, moment, rebuild), highlight=False, soft_wrap=True)


@app.command()
def stages(
    since: SinceOpt = None,
    until: UntilOpt = None,
    format_: Annotated[ShortFormat, typer.Option("--format", help="table or json.")] = ShortFormat.table,
    now: NowOpt = None,
) -> None:
    """Customers per stage at each week's end, the moves between stages from --since to --until,
    and each stage's conversion, repeat purchase, order value, frequency and click rate."""
    from datetime import timedelta

    from flows.analysis.stages import distribution, stage_kpis, transitions, week_ends
    from flows.surfaces.terminal import distribution_table, kpi_table, transition_table

    settings = _settings()
    moment = _now(now)
    start, end = _period(since, until, moment)
    engine = _engine(settings)
    _, rules = _policy_and_stages(settings)
    if rules is None:
        errors.print("[red]stages.yaml did not load: run `lifecycle validate`.[/]")
        raise typer.Exit(1)
    last = end - timedelta(microseconds=1)  # until is exclusive: its moment's own day ends after it
    weeks = week_ends(start.date(), last.date())
    shares = distribution(engine, rules, [*weeks, end] if not weeks or end > _end_of(weeks[-1]) else weeks)
    matrix = transitions(engine, rules, start, end)
    kpis = stage_kpis(engine, rules, start, end)
    if format_ is ShortFormat.json:
        _write_json({"since": start.isoformat(), "until": end.isoformat(),
                     "distribution": [{"as_of": _end_of(day).isoformat(), "counts": counts} for day, counts in shares],
                     "transitions": matrix, "kpis": [k.as_dict() for k in kpis]})
        return
    show(distribution_table(shares))
    show(transition_table(matrix, f"{start:%Y-%m-%d %H:%M}", f"{end:%Y-%m-%d %H:%M} UTC"))
    show(kpi_table(kpis, f"{start:%Y-%m-%d %H:%M}", f"{end:%Y-%m-%d %H:%M} UTC"))


def _end_of(day: object) -> datetime:
    from flows.analysis.stages import end_of

    assert isinstance(day, (date, datetime))
    return end_of(day)


@app.command()
def forget(
    customer_id: Annotated[str, typer.Argument(metavar="CUSTOMER", help="The shop's id for them (or an alias).")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    format_: Annotated[ShortFormat, typer.Option("--format", help="table (a sentence) or json.")]
    = ShortFormat.table,
) -> None:
    """Erase a customer (GDPR): delete their clicks, carts and opt-outs, anonymise their profile,
    mail, orders and events, keep the ledger's counts. Forgetting twice changes nothing."""
    from flows.privacy import forget as erase
    from flows.signing_secret import resolved
    from models.types import utcnow

    settings = _settings()
    engine = _engine(settings)
    if not yes and not typer.confirm(f"Erase {customer_id!r} for good? Their personal data cannot be restored",
                                     err=True):
        errors.print("Nothing erased.")
        raise typer.Exit(1)
    done = erase(engine, customer_id, secret=resolved(settings, engine).signing_secret, at=utcnow())
    if format_ is ShortFormat.json:
        _write_json(done.to_json())
    else:
        console.print(done.summary(customer_id), markup=False, highlight=False, soft_wrap=True)
    if not done.found:
        raise typer.Exit(1)


@app.command()
def simulate(
    trigger: Annotated[str, typer.Argument(help="Trigger name.")],
    from_: Annotated[str, typer.Option("--from", help="First tick: a date or an ISO-8601 moment (UTC).")],
    to: Annotated[str, typer.Option("--to", help="Last tick (inclusive): a date or an ISO-8601 moment.")],
    every: Annotated[str, typer.Option(help="Time between ticks: a duration such as 15m, 1h or 1d.")] = "1h",
    format_: Annotated[ShortFormat, typer.Option("--format", help="table or json.")] = ShortFormat.table,
) -> None:
    """Replay the store over a timeline: the trigger runs at every tick against a scratch copy
    of the store, and shows who enters, reaches each step, exits by which goal, takes which
    branch and would get which variant. Sends and records nothing."""
    from flows.clock import parse_duration
    from flows.simulate import SimulationError, ticks
    from flows.simulate import simulate as replay
    from flows.surfaces.terminal import say, simulation_headline, simulation_tables

    start, end = _moment(from_, "--from"), _moment(to, "--to")
    assert start is not None and end is not None
    try:
        step = parse_duration(every)
    except ValueError as exc:
        errors.print(f"[red]--every: {escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(2) from None
    settings = _settings()
    try:
        ticks(start, end, step)  # a bad timeline is refused before the store is opened
        found = replay(trigger, start, end, step, settings=settings, source=_engine(settings))
    except SpecError as exc:
        print_problems(exc.problems)
        raise typer.Exit(1) from None
    except SimulationError as exc:
        errors.print(f"[red]{escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(2) from None
    if format_ is ShortFormat.json:
        _write_json(found.to_json())
        return
    say(simulation_headline(found))
    for table in simulation_tables(found):
        show(table)


if __name__ == "__main__":
    app()
