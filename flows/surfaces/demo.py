"""Demo data: a few hundred realistic German and English customers as Segment events.

The events are generated relative to one moment (the anchor) and loaded through the
normal ingest path; the anchor is kept in the store, so a second ``lifecycle demo``
evaluates the very same moment and, the ledger being what it is, sends nothing new.
"""

import json
import random
import unicodedata
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from sqlalchemy import Engine
from sqlmodel import Session

from flows.ingest import IngestReport, ingest_lines
from flows.redaction import redact_url
from flows.settings import Settings
from flows.surfaces.outbox import Outbox
from models import StoreMeta
from models.db import create_schema, get_engine
from models.types import utcnow

ANCHOR_KEY = "demo_anchor"

GERMAN = (
    ["Jürgen", "Sören", "Jörg", "Lena", "Anna", "Lukas", "Mia", "Felix", "Jonas", "Emma", "Björn", "Käthe",
     "Günther", "Sophie", "Max", "Marie", "Paul", "Hannah", "Zoë", "Ömer"],
    ["Müller", "Schäfer", "Weiß", "Groß", "Becker", "Hoffmann", "Koch", "Bäcker", "Krüger", "Schröder",
     "Wagner", "Fischer", "Köhler", "Lehmann", "Braun", "Öztürk"],
)
ENGLISH = (
    ["Oliver", "Amelia", "Harry", "Isla", "Jack", "Ava", "George", "Emily", "Noah", "Grace", "Chloé", "Liam"],
    ["Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Evans", "Thomas", "Roberts", "O'Brien"],
)
PRODUCTS = [
    ("p-100", "Wanderschuh „Alpin“", 129.90),
    ("p-101", "Merino-Socken (2 Paar)", 24.90),
    ("p-102", "Regenjacke Nordwand", 189.00),
    ("p-103", "Thermoflasche 0,75 l", 29.95),
    ("p-104", "Trail running cap", 19.99),
    ("p-105", "Rucksack 28 l", 99.00),
    ("p-106", "Stirnlampe", 39.50),
]
COMPLAINTS = ["Lieferung beschädigt", "Falsche Größe geliefert", "Parcel never arrived", "Refund still missing"]

# Share of customers per profile; the stages in triggers/stages.yaml decide what they become.
PROFILES = [
    ("signed_up_today", 0.08),
    ("signed_up_3_days_ago", 0.06),
    ("prospect", 0.14),
    ("new", 0.12),
    ("active", 0.20),
    ("loyal", 0.10),
    ("at_risk", 0.12),
    ("lapsed", 0.18),
]


def _ascii(text: str) -> str:
    text = text.replace("ä", "ae").replace("ö", "oe").replace("ü", "ue").replace("ß", "ss")
    text = text.replace("Ä", "Ae").replace("Ö", "Oe").replace("Ü", "Ue")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def generate(anchor: datetime, customers: int = 300, seed: int = 7) -> list[dict[str, Any]]:
    """Segment events for ``customers`` people, sorted by time, all before ``anchor``."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    profiles = [name for name, share in PROFILES for _ in range(round(share * customers))]
    profiles += ["active"] * (customers - len(profiles))
    rng.shuffle(profiles)

    def at(days_ago: float) -> datetime:
        return anchor - timedelta(days=days_ago)

    for n, profile in enumerate(profiles[:customers], start=1):
        user = f"demo-{n:05d}"
        german = rng.random() < 0.55
        first, last = rng.choice(GERMAN[0] if german else ENGLISH[0]), rng.choice(GERMAN[1] if german else ENGLISH[1])
        locale = "de-DE" if german else rng.choice(["en-GB", "en-US", "fr-FR"] if n % 20 == 0 else ["en-GB", "en-US"])
        zone = "Europe/Berlin" if german else rng.choice(["Europe/London", "America/New_York"])
        domain = "example.de" if german else "example.com"
        if n == 2:  # someone trying header injection through their name
            first, last = "Eve\r\nBcc: victim@example.net", "Mallory"
        if n == 3:  # and someone trying HTML injection
            first = "<script>alert('x')</script>"
        email = f"{_ascii(first.split()[0]) or 'kunde'}.{_ascii(last)}{n}@{domain}"

        orders: list[float] = []
        if profile == "signed_up_today":
            signup = rng.uniform(0.05, 1.6)
        elif profile == "signed_up_3_days_ago":
            signup = 3 + rng.uniform(0.1, 1.6)
        elif profile == "prospect":
            signup = rng.uniform(10, 400)
        elif profile == "new":
            signup = rng.uniform(20, 90)
            orders = [rng.uniform(2, 55)]
        elif profile == "active":
            signup = rng.uniform(100, 700)
            orders = sorted([rng.uniform(70, 110)] + [rng.uniform(10, 110) for _ in range(rng.randint(1, 3))],
                            reverse=True)
        elif profile == "loyal":
            signup = rng.uniform(300, 900)
            orders = sorted((rng.uniform(5, 280) for _ in range(rng.randint(5, 9))), reverse=True)
        elif profile == "at_risk":
            signup = rng.uniform(400, 800)
            orders = sorted((rng.uniform(125, 360) for _ in range(rng.randint(1, 3))), reverse=True)
        else:  # lapsed
            signup = rng.uniform(800, 1400)
            orders = sorted((rng.uniform(380, 780) for _ in range(rng.randint(1, 3))), reverse=True)
        signup = max(signup, max(orders, default=0) + 1)
        consent = rng.random() < 0.85
        # Most opted in long ago and confirmed; some of today's sign-ups still have to confirm.
        confirmed = consent and (profile != "signed_up_today" or rng.random() < 0.5)

        # Most customers were around recently; some went quiet two to six months ago.
        newest_order = min(orders, default=signup)
        quiet = profile in ("active", "at_risk") and newest_order > 66 and rng.random() < 0.35
        if quiet:
            last_seen = rng.uniform(65, min(newest_order - 0.1, 170))
        else:
            last_seen = min(rng.uniform(0.02, 20), newest_order, signup)
        n_events = 0

        def event(kind: str, days_ago: float, user: str = user, **body: Any) -> None:
            nonlocal n_events
            n_events += 1
            events.append({"type": kind, "userId": user, "timestamp": _iso(at(days_ago)),
                           "messageId": f"{user}-{n_events}", **body})

        event("identify", signup, traits={
            "email": email, "first_name": first, "last_name": last, "locale": locale, "timezone": zone,
            "marketing_consent": consent, "consent_confirmed": confirmed, "created_at": _iso(at(signup)),
        })
        for i, days_ago in enumerate(orders):
            picked = rng.sample(PRODUCTS, rng.randint(1, 3))
            total = sum(price for _, _, price in picked)
            for pid, name, price in picked:
                event("track", days_ago + 0.01, event="Product Added",
                      properties={"product_id": pid, "name": name, "price": price, "quantity": 1})
            event("track", days_ago, event="Order Completed", properties={
                "order_id": f"{user}-o{i}", "total": round(total, 2), "currency": "EUR",
                "products": [{"product_id": pid, "name": name, "price": price} for pid, name, price in picked],
            })
        abandoned = not quiet and profile not in ("signed_up_3_days_ago",) and rng.random() < 0.22
        if abandoned:
            cart_at = rng.uniform(0.15, 2.5)  # between 3.6 hours and 2.5 days ago
            for pid, name, price in rng.sample(PRODUCTS, rng.randint(1, 3)):
                event("track", cart_at + 0.002, event="Product Added",
                      properties={"product_id": pid, "name": name, "price": price, "quantity": rng.randint(1, 2)})
            last_seen = min(last_seen, cart_at)
        if not quiet and rng.random() < 0.05:
            complaint_at = rng.uniform(0.1, 4)
            event("track", complaint_at, event="Complaint Received",
                  properties={"complaint_id": f"{user}-c1", "subject": rng.choice(COMPLAINTS)})
            if rng.random() < 0.3:
                event("track", complaint_at - 0.05, event="Complaint Answered",
                      properties={"complaint_id": f"{user}-c1"})
            last_seen = min(last_seen, complaint_at - 0.06)
        if rng.random() < 0.03:
            event("track", max(last_seen, 0.01) + 0.001, event="Unsubscribed", properties={})
        event("track", max(last_seen, 0.01), event="Page Viewed", properties={"path": "/"})

    events.sort(key=lambda e: (e["timestamp"], e["messageId"]))
    return events


def anchor_of(engine: Engine) -> datetime | None:
    with Session(engine) as session:
        meta = session.get(StoreMeta, ANCHOR_KEY)
        return datetime.fromisoformat(meta.value) if meta else None


def seed(engine: Engine, anchor: datetime, customers: int = 300) -> IngestReport:
    lines = (json.dumps(e, ensure_ascii=False) for e in generate(anchor, customers))
    report = ingest_lines(engine, lines)
    with Session(engine) as session:
        session.merge(StoreMeta(key=ANCHOR_KEY, value=anchor.isoformat()))
        session.commit()
    return report


def run_demo(settings: Settings, customers: int, outbox: Path, console: Console) -> None:
    """The main job on embedded defaults: seed once, capture mail on loopback, run every trigger."""
    from flows.run_context import load
    from flows.surfaces.prefect_flows import run_in_prefect
    from flows.surfaces.terminal import print_problems, summary_table

    engine = get_engine(settings.database_url)
    create_schema(engine)
    anchor = anchor_of(engine)
    if anchor is None:
        # The latest 15:00 UTC: daytime for every demo customer (Berlin, London, New York),
        # so quiet hours defer nothing just because the demo ran at night.
        now = utcnow()
        anchor = now.replace(hour=15, minute=0, second=0, microsecond=0)
        if anchor > now:
            anchor -= timedelta(days=1)
        report = seed(engine, anchor, customers)
        console.print(f"Seeded the demo store ({redact_url(settings.database_url)}) with {customers} customers, "
                      f"{report.loaded} events.")
    else:
        console.print(f"Using the demo store seeded at {anchor.isoformat()} ({redact_url(settings.database_url)}).")
    project = load(settings)
    if project.problems:
        print_problems(project.problems)
    with Outbox(outbox) as box:
        settings = settings.model_copy(update={"smtp_url": box.url})
        console.print(f"Capture SMTP server on {box.url}, writing to {outbox}/. Running "
                      f"{len(project.triggers)} triggers through Prefect as of {anchor.isoformat()}…")
        for spec in project.triggers.values():
            if spec.enabled:
                started = run_in_prefect(spec, anchor.isoformat(), settings=settings, project=project, engine=engine)
                console.print(summary_table(started.summary))
        received = box.handler.received
    console.print(f"[bold]{received} message(s) received by the capture server this run[/] "
                  f"({len(list(outbox.glob('*.eml')))} in {outbox}/ in all).")
    if received == 0:
        console.print("Nothing new to send: every due mail was already sent (see the already_sent column).")
