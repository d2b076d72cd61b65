"""``lifecycle web``: the customer-facing links in every mail, and template previews for ops.

- ``/u/{token}``: GET shows a confirmation page; POST with ``List-Unsubscribe=One-Click``
  (RFC 8058, as mail providers send it, or our page's button) unsubscribes at once and
  answers 200 — no redirect, no cookies.
- ``/preferences/{token}``: leave single categories (e.g. win-back campaigns), or all.
- ``/confirm/{token}``: double opt-in; POST confirms the one pending request the link was
  mailed for (``flows.consent``): once, until it expires, never after an unsubscribe.
- ``/preview/{token}``: a trigger's mail with sample data (linked from Prefect runs).
- ``/c/{token}``, ``/o/{token}``: a tracked link's redirect and the open pixel, each recorded
  (``web_tracking``; the rules in ``flows.tracking.clicks``). The preferences page lets a
  customer leave tracking (``Customer.untracked_at``): their later mail has plain links and
  no pixel, and their clicks on older mail still redirect but record nothing.
- ``/webhooks/ses``, ``/webhooks/postmark``: bounces and complaints from providers
  (signed by SNS, or behind basic auth), recorded like mailed reports (``flows.feedback.reports``).
- ``/reports``: the business figures, behind ``LIFECYCLE_ADMIN_TOKEN`` (``web_reports``).

GET never changes anything (mail scanners follow links) but a click's or an open's record,
which is judged for machines; every token is signed and scoped (``flows.content.links``). No
handler blocks the event loop: database work runs in the thread pool, under a statement
timeout (``LIFECYCLE_WEB_STATEMENT_TIMEOUT_SECONDS``); a request that meets it gets 503 with
``Retry-After`` and has changed nothing, and ``/healthz`` never waits for the database.
Pages speak the customer's language (German or English).
"""

import base64
import binascii
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from jinja2 import Environment
from sqlalchemy import Engine, delete, event, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlmodel import Session, col

from flows.collect import WriteKeys
from flows.consent import Confirmation, check, confirm, record, unsubscribe_by_token, withdraw
from flows.content.links import (
    CONFIRM,
    PREFERENCES,
    PREVIEW,
    UNSUBSCRIBE,
    expired,
    preferences_url,
    read,
)
from flows.content.render import language_of
from flows.feedback.bounces import Report
from flows.kinds import KINDS
from flows.memory import long_lived_heap
from flows.redaction import redact
from flows.settings import Settings
from flows.signing_secret import resolved
from flows.spec.problems import SpecError
from flows.surfaces.web_collect import add_collect
from flows.surfaces.web_reports import add_reports
from flows.surfaces.web_security import install_security
from flows.surfaces.web_tracking import add_tracking, load_policy
from models import (
    CategoryOptOut,
    ConsentChangeKind,
    Customer,
    Suppression,
    suppression_key,
)
from models.db import make_engine, writer
from models.identity import customer_by_id
from models.types import display_address, utcnow

log = logging.getLogger(__name__)
MARKETING = [name for name, kind in KINDS.items() if kind.category == "marketing"]

WORDS: dict[str, dict[str, Any]] = {
    "de": {
        "unsubscribe_title": "Abmelden",
        "unsubscribe_question": "Möchtest du keine Werbe-E-Mails mehr an {email} erhalten?",
        "unsubscribe_button": "Ja, abmelden",
        "unsubscribed": "Du bist abgemeldet. Du erhältst keine Werbe-E-Mails mehr an {email}.",
        "preferences_link": "Lieber nur einzelne Themen abbestellen?",
        "preferences_title": "Deine E-Mail-Einstellungen",
        "preferences_intro": "Wähle, welche E-Mails du an {email} bekommen möchtest:", "save": "Speichern",
        "saved": "Gespeichert.", "all": "Von allen Werbe-E-Mails abmelden",
        "tracking": "Ihr dürft sehen, welche Links ich in euren E-Mails anklicke",
        "link_title": "Link",
        "confirm_title": "Anmeldung bestätigen",
        "confirm_question": "Bitte bestätige, dass wir dir unsere Angebote an {email} schicken dürfen.",
        "confirm_button": "Anmeldung bestätigen", "confirmed": "Danke! Deine Anmeldung ist bestätigt.",
        "invalid": "Dieser Link ist ungültig.",
        "spent": "Dieser Link ist abgelaufen oder wurde schon benutzt. Melde dich bitte erneut an, wenn du unsere "
                 "Angebote bekommen möchtest.",
        "busy": "Gerade geht es nicht. Bitte versuche es in einer Minute noch einmal.",
        "categories": {"abandoned_cart": "Erinnerungen an deinen Warenkorb",
                       "inactivity": "Nachrichten, wenn du länger nicht bei uns warst",
                       "onboarding": "Willkommens- und Einstiegstipps", "campaign": "Angebote und Aktionen",
                       "post_purchase": "Fragen nach deiner Meinung zu einer Bestellung"},
    },
    "en": {
        "unsubscribe_title": "Unsubscribe", "unsubscribe_question": "Stop marketing emails to {email}?",
        "unsubscribe_button": "Yes, unsubscribe",
        "unsubscribed": "You are unsubscribed. No more marketing emails will go to {email}.",
        "preferences_link": "Rather leave only some topics?", "preferences_title": "Your email preferences",
        "preferences_intro": "Choose which emails {email} should get:", "save": "Save", "saved": "Saved.",
        "all": "Unsubscribe from all marketing emails",
        "tracking": "Let us see which links you click in our emails", "link_title": "Link",
        "confirm_title": "Confirm your subscription",
        "confirm_question": "Please confirm that we may send our offers to {email}.",
        "confirm_button": "Confirm subscription", "confirmed": "Thank you! Your subscription is confirmed.",
        "invalid": "This link is not valid.",
        "spent": "This link has expired or has already been used. Please sign up again if you want our offers.",
        "busy": "We cannot do this right now. Please try again in a minute.",
        "categories": {"abandoned_cart": "Reminders about your cart", "inactivity": "Messages when you have been away",
                       "onboarding": "Welcome and getting-started tips", "campaign": "Offers and campaigns",
                       "post_purchase": "Asking what you think of an order"},
    },
}

_PAGE = Environment(autoescape=True).from_string("""<!DOCTYPE html>
<html lang="{{ lang }}"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex"><title>{{ title }}</title></head>
<body style="font-family:Helvetica,Arial,sans-serif;max-width:560px;margin:40px auto;padding:0 16px;color:#18181b">
<h1 style="font-size:22px">{{ title }}</h1>
{% for line in lines %}<p>{{ line }}</p>{% endfor %}
{% if form == "unsubscribe" %}
<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">{{ w.unsubscribe_button }}</button></form>
<p><a href="{{ preferences }}">{{ w.preferences_link }}</a></p>
{% elif form == "preferences" %}
<form method="post">
{% for name, label, on in categories %}<p><label><input type="checkbox" name="category" value="{{ name }}"\
{{ " checked" if on }}> {{ label }}</label></p>{% endfor %}
<input type="hidden" name="tracking_shown" value="1">
<p><label><input type="checkbox" name="tracking" value="1"{{ " checked" if tracked }}> {{ w.tracking }}</label></p>
<p><button type="submit">{{ w.save }}</button></p></form>
<form method="post"><input type="hidden" name="all" value="1"><button type="submit">{{ w.all }}</button></form>
{% elif form == "confirm" %}
<form method="post"><input type="hidden" name="confirm" value="1">\
<button type="submit">{{ w.confirm_button }}</button></form>
{% endif %}
</body></html>""")


def page(lang: str, title_key: str, lines: list[str], status: int = 200, **extra: Any) -> HTMLResponse:
    words = WORDS.get(lang, WORDS["en"])
    html = _PAGE.render(lang=lang, title=words[title_key], lines=lines, w=words, **extra)
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store", "X-Robots-Tag": "noindex"})


def _address(customer: Customer) -> str:
    """The address of a customer ``customer_for`` found (it has one)."""
    assert customer.email
    return customer.email


def masked(email: str) -> str:
    """``j***@example.de``: enough to recognise, not enough to harvest."""
    local, _, domain = display_address(email).rpartition("@")
    return f"{local[:1]}***@{domain}"


def web_engine(settings: Settings) -> Engine:
    """The web's own engine: every statement under a timeout, so one locked row holds up one
    request for at most that long, never the pool (PostgreSQL ``statement_timeout`` covers
    lock waits; SQLite's busy timeout is shortened to the same)."""
    engine = make_engine(settings.database_url, pool_timeout=settings.web_statement_timeout_seconds)
    milliseconds = int(settings.web_statement_timeout_seconds * 1000)

    @event.listens_for(engine, "connect")
    def _timeout(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if engine.dialect.name == "postgresql":
            cursor.execute(f"SET statement_timeout = {milliseconds}")
            dbapi_connection.commit()
        else:
            cursor.execute(f"PRAGMA busy_timeout = {milliseconds}")
        cursor.close()

    return engine


@asynccontextmanager
async def _serving(_app: FastAPI) -> AsyncIterator[None]:
    with long_lived_heap():  # what exists once the app serves stays out of collections while it does
        yield


def create_app(settings: Settings, clock: Callable[[], datetime] = utcnow) -> FastAPI:
    """``clock`` tells the time to tokens that expire, to clicks and to tracked events (tests
    pass a controlled one). A broken ``triggers/policy.yaml`` stops here, with its located
    problems (``SpecError``); unreadable ``LIFECYCLE_WRITE_KEYS`` too (``WriteKeyError``)."""
    policy = load_policy(settings.triggers_dir)
    app = FastAPI(title="Lifecycle", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_serving)
    engine = web_engine(settings)
    settings = resolved(settings, engine)
    secret = settings.signing_secret
    # The click routes first, so that the security headers wrap them too (see add_tracking).
    app.state.clicks = add_tracking(app, settings, engine, policy.tracking, clock, _link_error)
    keys = WriteKeys.parse(settings.write_keys.get_secret_value() if settings.write_keys else "")
    app.state.events = add_collect(app, keys, engine, clock, settings.collect_max_pending)
    install_security(app, settings.base_url)

    def customer_for(purpose: str, token: str, session: Session,
                     lock: bool = False) -> tuple[Customer, dict[str, Any]]:
        """``lock``: for a change, the customer's row is locked first (PostgreSQL), so a
        confirmation and an unsubscribe at once take turns and the later sees the earlier."""
        data = read(secret, purpose, token)
        customer = None
        if data is not None:
            customer = customer_by_id(session, data["c"], lock=lock)
        if data is None or customer is None or not customer.email:
            raise HTTPException(status_code=404)
        return customer, data

    def lang_of(customer: Customer) -> str:
        return language_of(customer.locale, settings.default_language) if customer.locale else "en"

    def title_for(path: str) -> str:
        return "unsubscribe_title" if path.startswith("/u/") else \
            "preferences_title" if path.startswith("/preferences/") else \
            "link_title" if path.startswith(("/c/", "/o/")) else "confirm_title"

    def lang_asked(request: Request) -> str:
        return _lang_of_header(request.headers.get("accept-language", ""))

    @app.exception_handler(HTTPException)
    async def not_valid(request: Request, exc: HTTPException) -> HTMLResponse:
        lang = lang_asked(request)
        return page(lang, title_for(request.url.path),
                    [WORDS[lang]["spent" if exc.status_code == 410 else "invalid"]], status=exc.status_code)

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def busy(request: Request, exc: OperationalError | PoolTimeout) -> HTMLResponse:
        """A statement that met the timeout (a locked row, a busy store): rolled back, so
        nothing changed; the client (a mail provider's one-click POST, too) tries again."""
        log.warning("%s %s: the store did not answer in time (%s)", request.method, redact(request.url.path),
                    type(getattr(exc, "orig", exc)).__name__)
        response = page(lang_asked(request), title_for(request.url.path), [WORDS[lang_asked(request)]["busy"]],
                        status=503)
        response.headers["Retry-After"] = "30"
        return response

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        """Liveness: answered on the event loop, never behind the database or the thread pool."""
        return "ok"

    @app.get("/u/{token}")
    def unsubscribe_page(token: str) -> HTMLResponse:
        with Session(engine) as session:
            customer, _ = customer_for(UNSUBSCRIBE, token, session)
            lang = lang_of(customer)
            return page(lang, "unsubscribe_title",
                        [WORDS[lang]["unsubscribe_question"].format(email=masked(_address(customer)))],
                        form="unsubscribe", preferences=preferences_url("", secret, customer.external_id))

    @app.post("/u/{token}")
    async def unsubscribe(token: str, request: Request) -> HTMLResponse:
        form = await request.form()
        if form.get("List-Unsubscribe") != "One-Click":
            raise HTTPException(status_code=400)
        customer = await run_in_threadpool(unsubscribe_by_token, engine, secret, token, "one-click unsubscribe",
                                           clock())
        if customer is None or not customer.email:
            raise HTTPException(status_code=404)
        lang = lang_of(customer)
        return page(lang, "unsubscribe_title", [WORDS[lang]["unsubscribed"].format(email=masked(customer.email))])

    @app.get("/preferences/{token}")
    def preferences_page(token: str) -> HTMLResponse:
        with Session(engine) as session:
            customer, _ = customer_for(PREFERENCES, token, session)
            return _preferences(session, customer, [])

    def _preferences(session: Session, customer: Customer, lines: list[str]) -> HTMLResponse:
        lang = lang_of(customer)
        left = set(session.execute(select(col(CategoryOptOut.category))
                                   .where(col(CategoryOptOut.customer_id) == customer.id)).scalars())
        everything = (session.get(Suppression, suppression_key(_address(customer))) is not None
                      or not customer.marketing_consent)
        labels = WORDS[lang]["categories"]
        categories = [(name, labels.get(name, name), not everything and name not in left) for name in MARKETING]
        return page(lang, "preferences_title",
                    [*lines, WORDS[lang]["preferences_intro"].format(email=masked(_address(customer)))],
                    form="preferences", categories=categories, tracked=customer.untracked_at is None)

    @app.post("/preferences/{token}")
    async def save_preferences(token: str, request: Request) -> HTMLResponse:
        form = await request.form()
        everything = form.get("all") == "1"
        keep = {str(value) for value in form.getlist("category")} & set(MARKETING)
        # Only a form that showed the tracking box says anything about it (not the "all" button's).
        tracked = form.get("tracking") == "1" if form.get("tracking_shown") == "1" else None
        return await run_in_threadpool(_save_preferences, token, everything, keep, tracked)

    def _save_preferences(token: str, everything: bool, keep: set[str], tracked: bool | None) -> HTMLResponse:
        with Session(writer(engine)) as session:
            customer, _ = customer_for(PREFERENCES, token, session, lock=True)
            assert customer.id is not None  # a stored customer
            now = clock()
            if tracked is not None and tracked == (customer.untracked_at is not None):
                # Left (or rejoined) tracking: not a consent change (marketing consent is
                # untouched); the customer's row says since when.
                customer.untracked_at = None if tracked else now
                session.add(customer)
            if everything:
                withdraw(session, customer, "preference page", at=now, detail="all")
            else:
                before = set(session.execute(select(col(CategoryOptOut.category))
                                             .where(col(CategoryOptOut.customer_id) == customer.id)).scalars())
                left = set(MARKETING) - keep
                session.execute(delete(CategoryOptOut).where(col(CategoryOptOut.customer_id) == customer.id))
                for category in sorted(left):
                    session.add(CategoryOptOut(customer_id=customer.id, category=category))
                if left != before:
                    record(session, customer, ConsentChangeKind.CATEGORIES, "preference page", at=now,
                           detail=f"left: {', '.join(sorted(left)) or 'none'}")
            session.commit()
            return _preferences(session, customer, [WORDS[lang_of(customer)]["saved"]])

    @app.get("/confirm/{token}")
    def confirm_page(token: str) -> HTMLResponse:
        """Asks; changes nothing. A link that can no longer confirm says so (410)."""
        with Session(engine) as session:
            customer, data = customer_for(CONFIRM, token, session)
            lang = lang_of(customer)
            if customer.marketing_consent:
                return page(lang, "confirm_title", [WORDS[lang]["confirmed"]])
            if check(session, customer, data, at=clock(), secret=secret) is Confirmation.SPENT:
                return page(lang, "confirm_title", [WORDS[lang]["spent"]], status=410)
            return page(lang, "confirm_title",
                        [WORDS[lang]["confirm_question"].format(email=masked(_address(customer)))], form="confirm")

    @app.post("/confirm/{token}")
    def confirm_post(token: str) -> HTMLResponse:
        with Session(writer(engine)) as session:
            customer, data = customer_for(CONFIRM, token, session, lock=True)
            outcome = confirm(session, customer, data, at=clock(), secret=secret)
            if outcome is Confirmation.SPENT:
                return page(lang_of(customer), "confirm_title", [WORDS[lang_of(customer)]["spent"]], status=410)
            session.commit()
            return page(lang_of(customer), "confirm_title", [WORDS[lang_of(customer)]["confirmed"]])

    @app.get("/preview/{token}", response_class=HTMLResponse)
    def preview(token: str) -> HTMLResponse:
        """A trigger's mail for a sample customer; the link is signed, so only our links work."""
        from flows.clock import parse_now
        from flows.content.preview import PreviewError, html_part, sample_message
        from flows.run_context import prepare

        found = read(secret, PREVIEW, token)
        if found is None or "x" not in found:
            raise HTTPException(status_code=404, detail="unknown preview")
        if expired(found, clock()):
            raise HTTPException(status_code=410, detail="preview link expired")
        try:
            context = prepare(found["t"], parse_now(None), settings=settings, engine=engine)
            step, variant = found.get("j", ""), found.get("a", "")
            part = next((p for p in context.passes() if (p.step.name if p.step else "") == step), None)
            if part is None or variant not in part.variants():
                raise PreviewError(f"the trigger has no step {step!r} with variant {variant!r} any more")
            html = html_part(sample_message(part, found["s"], found["l"], variant))
        except (SpecError, PreviewError) as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        return HTMLResponse(html, headers={"Cache-Control": "no-store", "X-Robots-Tag": "noindex"})

    add_webhooks(app, settings, engine)
    add_reports(app, settings, engine, clock)
    return app


def _lang_of_header(accept_language: str) -> str:
    return "de" if accept_language.lower().startswith("de") else "en"


def _link_error(accept_language: str, status: int) -> Response:
    """The page a tracked link shows when it is not valid (404), the store is busy (503) or
    we failed (500)."""
    lang = _lang_of_header(accept_language)
    return page(lang, "link_title", [WORDS[lang]["busy" if status >= 500 else "invalid"]], status=status)


# -- bounce and complaint webhooks -----------------------------------------------------

WEBHOOK_MAX_BYTES = 1_000_000  # SNS messages are at most 256 KB; Postmark's with content stay well below


def _basic_auth_matches(header: str | None, user: str, password: str) -> bool:
    """HTTP basic credentials equal to ours, compared in constant time (both always compared)."""
    scheme, _, encoded = (header or "").partition(" ")
    try:
        given = base64.b64decode(encoded.strip(), validate=True) if scheme.lower() == "basic" else b""
    except (binascii.Error, ValueError):
        given = b""
    given_user, _, given_password = given.partition(b":")
    same_user = hmac.compare_digest(given_user, user.encode())
    same_password = hmac.compare_digest(given_password, password.encode())
    return bool(user and password) and same_user & same_password


def add_webhooks(app: FastAPI, settings: Settings, engine: Engine) -> None:
    """``POST /webhooks/ses`` (SES through SNS, signature checked) and ``POST /webhooks/postmark``
    (basic auth from the webhook URL). A request that fails verification gets 403 and changes
    nothing; every report goes through ``flows.feedback.bounces.record`` like mailed ones."""
    from flows.feedback.reports import (
        load_json,
        postmark_reports,
        record_reports,
        ses_reports,
    )
    from flows.feedback.sns import Certificates, SnsError, trusted_url, verify

    secret = settings.signing_secret
    certificates = Certificates()
    prefixes = settings.sns_trusted_prefixes

    async def body_of(request: Request) -> dict[str, Any]:
        body = await request.body()
        if len(body) > WEBHOOK_MAX_BYTES:
            raise HTTPException(status_code=413)
        try:
            return load_json(body)
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    def refused(reason: str) -> JSONResponse:
        log.warning("webhook refused: %s", reason)
        return JSONResponse({"error": "forbidden"}, status_code=403)

    def recorded(reports: list[Report]) -> JSONResponse:
        tally = record_reports(engine, reports, settings.soft_bounce_rule)
        return JSONResponse({"reports": tally.reports, "new": tally.new, "duplicates": tally.duplicates,
                             "unmatched": tally.unmatched, "suppressed": len(tally.suppressed)})

    @app.post("/webhooks/ses")
    async def ses_webhook(request: Request) -> JSONResponse:
        message = await body_of(request)
        if message.get("TopicArn") not in settings.ses_topics:
            return refused(f"SNS topic {str(message.get('TopicArn'))[:200]!r} is not in LIFECYCLE_SES_TOPIC_ARNS")
        try:
            await run_in_threadpool(verify, message, certificates, prefixes)
        except SnsError as exc:
            return refused(f"SNS message {str(message.get('MessageId'))[:80]!r}: {exc}")
        kind = message.get("Type")
        if kind == "SubscriptionConfirmation":
            url = message.get("SubscribeURL")
            if not trusted_url(url, prefixes):
                return refused("SubscribeURL is not on sns.<region>.amazonaws.com")
            try:
                async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
                    answer = await client.get(str(url))
            except httpx.HTTPError as exc:
                raise HTTPException(status_code=502, detail=f"SubscribeURL: {type(exc).__name__}") from None
            if answer.status_code != 200:
                raise HTTPException(status_code=502, detail=f"SubscribeURL answered HTTP {answer.status_code}")
            log.info("confirmed the SNS subscription to %s", message.get("TopicArn"))
            return JSONResponse({"subscribed": message.get("TopicArn")})
        if kind != "Notification":
            return JSONResponse({"ignored": kind})
        try:
            notification = load_json(str(message.get("Message", "")).encode())
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=f"Message: {exc}") from None
        reports = await run_in_threadpool(ses_reports, engine, notification, secret)
        return await run_in_threadpool(recorded, reports)

    @app.post("/webhooks/postmark")
    async def postmark_webhook(request: Request) -> JSONResponse:
        password = settings.postmark_webhook_password.get_secret_value() if settings.postmark_webhook_password else ""
        if not _basic_auth_matches(request.headers.get("authorization"), settings.postmark_webhook_user or "",
                                   password):
            return refused("Postmark webhook without the configured basic-auth credentials")
        payload = await body_of(request)
        reports = await run_in_threadpool(postmark_reports, engine, payload, secret)
        return await run_in_threadpool(recorded, reports)


def app_from_environment() -> FastAPI:
    """The app as each worker process of ``lifecycle web --workers N`` makes it (uvicorn
    imports it by name): settings from the environment, every log record redacted."""
    from flows.redaction import redact_every_record
    from flows.surfaces.environment import settings_from_environment

    redact_every_record()
    return create_app(settings_from_environment())
