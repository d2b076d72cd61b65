"""Previews: a trigger's mail rendered to .html, .txt and .eml files, exactly as sent.

The ``.eml`` is the message as sent; the ``.html`` file starts with a banner giving the
subject and the language actually used, since a browser shows neither.
"""

import html
import re
from dataclasses import dataclass
from datetime import datetime
from email import message_from_bytes, policy
from pathlib import Path

from sqlalchemy import Engine, select
from sqlmodel import Session, col

from flows.audience.query import Candidate, send_key
from flows.audience.stage_sql import customer_stages
from flows.content.context import sample_contexts
from flows.content.diagram import mermaid
from flows.content.render import Rendered, RenderError, language_of
from flows.message.compose import build_message, message_id
from flows.message.prepare import render_candidates
from flows.run_context import RunContext, prepare
from flows.settings import Settings
from models import CART_OPEN, Cart, Complaint, Customer
from models.identity import customer_by_id
from models.types import utcnow


class PreviewError(Exception):
    pass


@dataclass(frozen=True)
class Preview:
    """One previewed mail: its files, its subject, the language asked for and the one used."""

    stage: str
    asked: str
    language: str
    subject: str
    paths: list[Path]
    mail: str = ""  # which of a journey's mails: "step reminder", "step nudge, variant b"

    @property
    def fell_back(self) -> bool:
        return self.asked != self.language


_BODY = re.compile(r"<body[^>]*>", re.IGNORECASE)


def _banner(subject: str, language: str, asked: str) -> str:
    used = language if language == asked else f"{language} (asked for {asked}: not supported by this trigger)"
    return (f'<div style="font:13px/1.5 monospace;background:#fffbe6;border-bottom:1px solid #ccc;padding:8px">'
            f"Subject: {html.escape(subject)}<br>Language: {html.escape(used)}</div>")


def _write(out: Path, name: str, eml: bytes, subject: str, language: str, asked: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    text = message_from_bytes(eml, policy=policy.default).get_body(("plain",))
    paths = [out / f"{name}.eml", out / f"{name}.html", out / f"{name}.txt"]
    paths[0].write_bytes(eml)
    body, banner = html_part(eml), _banner(subject, language, asked)
    match = _BODY.search(body)
    at = match.end() if match else 0
    paths[1].write_text(body[:at] + banner + body[at:], encoding="utf-8")
    paths[2].write_text(text.get_content() if text else "", encoding="utf-8")
    return paths


def preview_samples(settings: Settings, trigger: str, stages: list[str] | None, languages: list[str] | None,
                    out: Path) -> list[Preview]:
    """Every mail the trigger can send (each step's, each variant's) for each stage and
    language, with sample data; a journey's diagram beside them (``journey.mmd``)."""
    context = prepare(trigger, utcnow(), settings=settings)
    stages = stages or context.trigger.audience.stages or context.stages.names
    unknown = [s for s in stages if s not in context.stages.names]
    if unknown:
        raise PreviewError(f"unknown stage(s) {', '.join(unknown)}; valid stages: {', '.join(context.stages.names)}")
    written: list[Preview] = []
    for part in context.passes():
        catalog = part.catalog
        for variant in part.variants():
            email = part.email_for(variant)
            folder, mail = _where(out / trigger, part, variant)
            for stage in stages:
                for lang in languages or sorted(catalog.languages_for(email) | {catalog.default_language}):
                    eml, rendered = sample_mail(part, stage, lang, variant)
                    paths = _write(folder, f"{stage}.{lang}", eml, rendered.subject, rendered.language, lang)
                    written.append(Preview(stage, lang, rendered.language, rendered.subject, paths, mail))
    journey = context.trigger.journey
    if journey is not None:
        diagram = out / trigger / "journey.mmd"
        diagram.write_text(mermaid(journey, context.kind.name), encoding="utf-8")
        written.append(Preview("", "", "", "", [diagram], "the journey's diagram (Mermaid)"))
    return written


def _where(out: Path, part: RunContext, variant: str) -> tuple[Path, str]:
    """A journey's mails each in a folder of their own: ``STEP/`` or ``STEP/VARIANT/``."""
    if part.step is None:
        return out, ""
    folder, mail = out / part.step.name, f"step {part.step.name}"
    if variant:
        folder, mail = folder / variant, f"{mail}, variant {variant}"
    return folder, mail


def sample_message(context: RunContext, stage: str, language: str, variant: str = "") -> bytes:
    """The trigger's mail for a sample customer in ``stage`` speaking ``language``, as sent."""
    return sample_mail(context, stage, language, variant)[0]


def sample_mail(context: RunContext, stage: str, language: str, variant: str = "") -> tuple[bytes, Rendered]:
    """The sample mail as sent, and what was rendered (its subject, the language used)."""
    settings = context.settings
    sample = sample_contexts(context.kind.reference, settings.base_url, settings.shop_url)[0]
    try:
        rendered = context.catalog.render(context.email_for(variant), {**sample, "stage": stage, "lang": language})
    except RenderError as exc:
        raise PreviewError(str(exc)) from None
    key = send_key(context.trigger.name, 0, f"preview:{stage}:{language}")
    eml = build_message(rendered, sender=context.sender, to_address="preview@example.com",
                        to_name=sample["customer"].name,
                        msg_id=message_id(key, context.sender, settings.signing_secret), date=utcnow())
    return eml, rendered


def html_part(eml: bytes) -> str:
    body = message_from_bytes(eml, policy=policy.default).get_body(("html",))
    return body.get_content() if body else ""


def preview_customer(settings: Settings, trigger: str, external_id: str, now: datetime, out: Path,
                     engine: Engine) -> list[Preview]:
    context = prepare(trigger, now, settings=settings, engine=engine)
    with Session(engine) as session:
        customer = customer_by_id(session, external_id)  # a merged guest's id names the account
        if customer is None:
            raise PreviewError(f"no customer with id {external_id!r}")
        if not customer.email:
            raise PreviewError(f"customer {external_id!r} has no email address")
        assert customer.id is not None  # a stored customer
        stage = session.execute(
            customer_stages(context.stages, now).where(col(Customer.id) == customer.id)
        ).one().stage
        ref_id = None
        if context.kind.reference == "cart":
            ref_id = session.execute(select(col(Cart.id))
                                     .where(col(Cart.customer_id) == customer.id, col(Cart.status) == CART_OPEN)
                                     .order_by(col(Cart.updated_at).desc())).scalars().first()
        elif context.kind.reference == "complaint":
            ref_id = session.execute(select(col(Complaint.id)).where(col(Complaint.customer_id) == customer.id)
                                     .order_by(col(Complaint.received_at).desc())).scalars().first()
        if context.kind.reference and ref_id is None:
            raise PreviewError(f"customer {external_id!r} has no {context.kind.reference} to preview this trigger with")
    asked = language_of(customer.locale, settings.default_language)
    written: list[Preview] = []
    for part in context.passes():
        for variant in part.variants():
            language = language_of(customer.locale, settings.default_language,
                                   part.catalog.languages_for(part.email_for(variant)))
            candidate = Candidate(customer.id, customer.external_id, customer.email, customer.first_name,
                                  customer.last_name, customer.locale, language, stage, ref_id, "preview",
                                  send_key(trigger, customer.id, "preview"), variant=variant)
            prepared, failures = render_candidates(part, [candidate])
            if failures:
                raise PreviewError(failures[0].message)
            subject = prepared[0].subject
            folder, mail = _where(out / trigger, part, variant)
            paths = _write(folder, f"{external_id}.{stage}.{language}", prepared[0].envelope.data, subject,
                           language, asked)
            written.append(Preview(stage, asked, language, subject, paths, mail))
    return written
