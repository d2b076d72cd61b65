"""A batch of due recipients made into mail: rendered, composed, addressed, ready for SMTP.

Per recipient: the template for their stage and language with their data (``content``),
its links tracked and its open pixel added where the policy and the customer allow it
(``tracking``), the MIME message with its List-* headers and, when configured, its DKIM signature
(``message.compose``), the VERP return path, and the ledger claim the send will take.
One recipient's bad data fails only that recipient.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlmodel import Session

from flows.audience.query import Candidate
from flows.consent import requested_at
from flows.content.context import (
    CustomerView,
    Links,
    TriggerView,
    load_carts,
    load_complaints,
    load_latest_orders,
    load_untracked,
)
from flows.content.links import (
    click_url,
    confirm_url,
    open_url,
    preferences_url,
    send_digest,
    unsubscribe_url,
    verp_address,
)
from flows.content.render import Rendered, RenderError
from flows.kinds.consent_confirmation import Spec as ConsentConfirmationSpec
from flows.message.compose import build_message, message_id
from flows.outcomes import Outcome
from flows.run_context import RunContext
from flows.send.claims import Claim
from flows.send.smtp import Envelope
from flows.tracking.rewrite import add_pixel, track_links
from models.types import utcnow


@dataclass(frozen=True, slots=True)
class Prepared:
    candidate: Candidate
    claim: Claim
    envelope: Envelope
    subject: str


@dataclass(frozen=True, slots=True)
class Failure:
    candidate: Candidate
    outcome: Outcome  # failed:render_error or failed:invalid_message
    message: str


def render_candidates(context: RunContext, candidates: Sequence[Candidate], batch: int = 0
                      ) -> tuple[list[Prepared], list[Failure]]:
    """Render and compose each due candidate; one recipient's bad data fails only that one."""
    settings = context.settings
    refs = [c.ref_id for c in candidates if c.ref_id is not None]
    with Session(context.engine) as session:
        carts = load_carts(session, refs) if context.kind.reference == "cart" else {}
        complaints = load_complaints(session, refs) if context.kind.reference == "complaint" else {}
        orders = load_latest_orders(session, [c.customer_id for c in candidates], context.now)
        tracking = context.policy.tracking
        tracked = context.kind.category == "marketing" and (tracking.clicks or tracking.opens)
        untracked = load_untracked(session, [c.customer_id for c in candidates]) if tracked else set()
    sender, secret, date = context.sender, settings.signing_secret, utcnow()
    ours = [f"{settings.base_url.rstrip('/')}/{route}/" for route in ("u", "preferences", "confirm")]
    trigger_view = TriggerView(context.trigger.name, context.trigger.description)
    prepared: list[Prepared] = []
    failures: list[Failure] = []
    for c in candidates:
        assert c.email is not None
        customer = CustomerView(c.external_id, c.email, c.first_name, c.last_name, c.locale, c.language)
        links = Links(
            unsubscribe=unsubscribe_url(settings.base_url, secret, c.external_id, context.trigger.kind),
            preferences=preferences_url(settings.base_url, secret, c.external_id),
            shop=settings.shop_url,
            confirm=_confirm_url(context, secret, c) if context.kind.reference == "consent" else None,
        )
        variables: dict[str, Any] = {
            "customer": customer,
            "stage": c.stage,
            "lang": c.language,
            "cart": carts.get(c.ref_id) if c.ref_id is not None else None,
            "complaint": complaints.get(c.ref_id) if c.ref_id is not None else None,
            "order": orders.get(c.customer_id),
            "links": links,
            "trigger": trigger_view,
            "now": context.now,
        }
        try:
            rendered = context.catalog.render(context.email_for(c.variant), variables)
            destinations: list[str] = []
            if tracked and c.customer_id not in untracked:
                rendered, destinations = _tracked(context, rendered, send_digest(secret, c.send_key), ours)
            msg_id = message_id(c.send_key, sender, secret)
            data = build_message(rendered, sender=sender, to_address=c.email, to_name=customer.name, msg_id=msg_id,
                                 date=date, extra_headers=list_headers(context, links), signer=context.signer)
        except RenderError as exc:
            failures.append(Failure(c, Outcome.RENDER_ERROR, str(exc)))
            continue
        except (ValueError, TypeError, IndexError) as exc:
            failures.append(Failure(c, Outcome.INVALID_MESSAGE, f"{type(exc).__name__}: {exc}"))
            continue
        claim = claim_for(context, c, rendered.template, msg_id, destinations)
        return_path = verp_address(settings.bounce_address or f"bounces@{sender.domain}", secret, c.send_key)
        prepared.append(Prepared(c, claim, Envelope(c.send_key, return_path, c.email, data), rendered.subject))
    return prepared, failures


def _tracked(context: RunContext, rendered: Rendered, digest: str, ours: list[str]) -> tuple[Rendered, list[str]]:
    """Links through ``/c/``, and the pixel, as the policy says; the destinations by position."""
    settings, tracking = context.settings, context.policy.tracking
    destinations: list[str] = []
    if tracking.clicks:
        hosts = [h for h in (urlsplit(settings.shop_url).hostname, *tracking.domains) if h]
        rendered, destinations = track_links(
            rendered, ours, lambda n: click_url(settings.base_url, settings.signing_secret, digest, n), hosts)
    if tracking.opens:
        rendered = add_pixel(rendered, open_url(settings.base_url, settings.signing_secret, digest))
    return rendered, destinations


def _confirm_url(context: RunContext, secret: str, c: Candidate) -> str:
    """The link confirms this mail's request (its occurrence) until the request is too old to ask about."""
    try:
        asked = requested_at(c.occurrence)
    except ValueError:
        asked = context.now  # a preview: no request behind it
    trigger = context.trigger
    assert isinstance(trigger, ConsentConfirmationSpec)  # the one kind whose mail confirms a request
    return confirm_url(context.settings.base_url, secret, c.external_id, c.occurrence, asked + trigger.max_age,
                       c.email or "")


def claim_for(context: RunContext, c: Candidate, template: str = "", msg_id: str = "",
              links: Sequence[str] = ()) -> Claim:
    assert c.email is not None
    step = context.step
    experiment = step.step.experiment if step is not None else None
    return Claim(c.send_key, context.trigger.name, c.customer_id, c.occurrence, c.stage, template, c.email,
                 msg_id, context.kind.category, c.ref_id, tuple(links), step.name if step is not None else "",
                 c.variant, (experiment.salt or "") if experiment is not None and c.variant else "", c.entered_at)


def list_headers(context: RunContext, links: Links) -> dict[str, str]:
    """RFC 8058 one-click unsubscribe and RFC 2919 List-Id, on marketing mail only."""
    if context.kind.category != "marketing":
        return {}
    domain = context.sender.domain
    token = links.unsubscribe.rsplit("/", 1)[1]
    mailbox = context.settings.unsubscribe_mailbox or f"unsubscribe@{domain}"
    return {
        "List-Unsubscribe": f"<{links.unsubscribe}>, <mailto:{mailbox}?subject=unsubscribe%20{token}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "List-Id": f"<{context.trigger.name}.{domain}>",
    }
