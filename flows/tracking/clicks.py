"""What a request to a tracked link was, and how it is recorded: the rules of engagement.

**Machine rule** (``machine``): a request is a person's unless one of these says otherwise,
in this order (the first that applies is recorded):

1. ``head``: a HEAD request. Browsers never send one for a link; link checkers and
   scanners do.
2. ``scanner``: no user agent at all, or one naming a known security scanner or link
   prefetcher (``SCANNERS``: Barracuda, Proofpoint, Mimecast, Microsoft's Safe Links and
   BingPreview, Cisco IronPort, Symantec/Broadcom MessageLabs, Trend Micro, Sophos,
   Forcepoint, FireEye, Google-Safety, chat apps' link previews) or a generic robot word
   (``bot``, ``crawler``, ``spider``, ``preview``, ``scanner``, ``python-requests``, ``curl``,
   ``wget`` and other HTTP libraries). Gmail's image proxy (GoogleImageProxy) is *not* a
   scanner: it fetches the pixel when a Gmail user opens the mail.
3. ``too_soon``: a request sooner than ``policy.tracking.machine_click_within`` (5 s by
   default) after the mail left (``Send.finished_at``, else ``claimed_at``), or before it:
   scanners at the receiving end fetch every link within seconds of delivery.

Machine requests are recorded, flagged, and never counted as a person's click (reports and
attribution take ``machine = ''`` only).

**De-duplication rule** (``repeats``): a request on the same send and link (the pixel is
link -1) of the same class (a person, or the same machine reason) within
``policy.tracking.repeat_within`` (60 s by default) of the latest recorded engagement of that
class adds 1 to that engagement's ``repeats`` instead of a new row. The window runs from the
recorded engagement's own time, not from its last repeat, so a flood of requests on one
token makes one row per window, and a person who comes back a minute later is a new click.

**What is not recorded**: a click or open while the policy has it off; anything of a
customer who left tracking (``Customer.untracked_at``: the link still redirects, nothing
is stored). A forgotten customer's send has no destinations left (``links`` NULL), so its
links answer 404, like a forged token. Nothing of the request is stored but the send, the
link, the time and the machine reason: no IP address, no user agent.

**UTM** (``with_utm``): the destination gets ``utm_source=lifecycle``, ``utm_medium=email``,
``utm_campaign=<trigger>`` and ``utm_content=<template folder>/<stage>/<variant>``; every
parameter and the fragment the link already has are kept as written, and a ``utm_*`` the link
already carries is never overridden.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, quote

from sqlalchemy import Connection, Engine, bindparam, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlmodel import col

from flows.spec.policy import Tracking
from models import Customer, Send
from models.ledger import message_digest
from models.outcomes import Engagement, EngagementKind

PERSON = ""
HEAD = "head"
SCANNER = "scanner"
TOO_SOON = "too_soon"
OPEN_LINK = -1  # an open's ``link``

# Lower-case parts of the user agents of security scanners and link prefetchers. Several
# scanners also send ordinary browser user agents: the ``too_soon`` rule catches those.
SCANNERS = (
    "barracuda",
    "proofpoint",
    "mimecast",
    "safelinks", "microsoft defender", "ms-office-atp", "bingpreview",
    "ironport", "cisco",
    "symantec", "broadcom", "messagelabs",
    "trendmicro", "trend micro",
    "sophos",
    "forcepoint", "fireeye", "trellix", "zscaler", "paloalto", "fortiguard",
    "google-safety",
    "facebookexternalhit", "whatsapp", "telegrambot", "skypeuripreview", "discordbot", "slack",
)
# Generic robot words, and HTTP libraries no person clicks with. ``bot`` as a word ending
# (Googlebot, bingbot), not inside a phone's name (CUBOT).
_ROBOT = (r"(?<!cu)bot\b|crawl|spider|preview|scanner|check_http|monitor|python-requests|python-urllib|aiohttp|"
          r"httpx|curl/|wget/|go-http-client|okhttp|java/|libwww|headlesschrome|phantomjs")
_MACHINE_AGENT = re.compile("|".join([*map(re.escape, SCANNERS), _ROBOT]))


def scanner_agent(user_agent: str | None) -> bool:
    """A user agent that no person's browser or mail client sends (none at all, too)."""
    if not user_agent or not user_agent.strip():
        return True
    if len(user_agent) > 512:  # none of ours to remember
        return _MACHINE_AGENT.search(user_agent.lower()) is not None
    return _known_agent(user_agent)


@lru_cache(maxsize=4096)  # a campaign's clicks come from a few hundred distinct agents
def _known_agent(user_agent: str) -> bool:
    return _MACHINE_AGENT.search(user_agent.lower()) is not None


def request_machine(method: str, user_agent: str | None) -> str:
    """What the request alone tells (rules 1 and 2); ``too_soon`` needs the send (``machine``)."""
    if method.upper() == "HEAD":
        return HEAD
    return SCANNER if scanner_agent(user_agent) else PERSON


def machine(requested: str, at: datetime, sent_at: datetime, within: timedelta) -> str:
    """The machine reason of a request that ``request_machine`` judged ``requested``, made at
    ``at`` on a mail that left at ``sent_at``: head > scanner > too_soon > a person."""
    if requested:
        return requested
    return TOO_SOON if at - sent_at < within else PERSON


# -- UTM ----------------------------------------------------------------------------------

UTM_SOURCE, UTM_MEDIUM = "lifecycle", "email"


def utm_content(template: str, stage: str, variant: str = "") -> str:
    """``<template folder>/<stage>/<variant>``: ``abandoned_cart/active/default``."""
    return f"{template.split('/')[0] or 'default'}/{stage or 'default'}/{variant or 'default'}"


@lru_cache(maxsize=1024)
def _utm_pairs(campaign: str, content: str) -> tuple[tuple[str, str], ...]:
    """Each UTM parameter and its encoded ``name=value``, once per trigger and content."""
    values = (("utm_source", UTM_SOURCE), ("utm_medium", UTM_MEDIUM), ("utm_campaign", campaign),
              ("utm_content", content))
    return tuple((name, f"{name}={quote(value, safe='/')}") for name, value in values)


def with_utm(destination: str, campaign: str, content: str) -> str:
    """``destination`` with the UTM parameters it lacks appended; its own parameters (their
    spelling and order), its fragment, and any ``utm_*`` it carries stay as they are. Only
    http(s) destinations get them."""
    if not destination[:8].lower().startswith(("https://", "http://")):
        return destination
    rest, hash_, fragment = destination.partition("#")
    base, _, query = rest.partition("?")
    pairs = _utm_pairs(campaign, content)
    if "utm_" in query.lower():  # only then is it worth parsing
        present = {name.lower() for name, _ in parse_qsl(query, keep_blank_values=True)}
        pairs = tuple(pair for pair in pairs if pair[0] not in present)
        if not pairs:
            return destination
    added = "&".join(encoded for _, encoded in pairs)
    if not query:
        query = added
    elif query.endswith("&"):
        query += added
    else:
        query += "&" + added
    return f"{base}?{query}{hash_}{fragment}"


# -- recording a batch ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hit:
    """One request to a tracked link (``kind`` click, ``link`` its position) or to the pixel
    (``kind`` open, ``link`` -1), judged by ``request_machine``, at ``at``."""

    kind: str
    digest: str
    link: int
    at: datetime
    requested: str = PERSON


@dataclass(slots=True)
class _Latest:
    """The latest recorded engagement of one class on one send and link: its time, and the
    repeats this batch adds to it (``id`` None: a row this batch inserts)."""

    id: int | None
    at: datetime
    added: int = 0


@dataclass(frozen=True, slots=True)
class _SendRow:
    id: int
    customer_id: int
    links: list[str] | None
    campaign: str
    content: str
    sent_at: datetime
    tracked: bool  # not untracked, not forgotten
    forgotten: bool


# Transaction-scoped advisory locks on PostgreSQL, one per send (``(namespace, send id)``):
# two processes recording clicks on the same send take turns, so both see each other's rows
# and a repeat is never recorded twice. SQLite has one writer at a time anyway.
_LOCK_NAMESPACE = 1_617_000


_ENGAGEMENTS = Engagement.__table__  # type: ignore[attr-defined]  # SQLModel's table, for Core statements
# Built once: making a statement costs more than running it here (coercions, annotations).
_SENDS = (
    select(col(Send.id), col(Send.customer_id), col(Send.links), col(Send.trigger), col(Send.template),
           col(Send.stage), col(Send.finished_at), col(Send.claimed_at), col(Customer.untracked_at),
           col(Customer.forgotten_at), message_digest(col(Send.message_id)).label("digest"))
    .join(Customer, col(Customer.id) == col(Send.customer_id))
    .where(message_digest(col(Send.message_id)).in_(bindparam("digests", expanding=True)))
)
_LATEST = (select(_ENGAGEMENTS.c.id, _ENGAGEMENTS.c.send_id, _ENGAGEMENTS.c.kind, _ENGAGEMENTS.c.link,
                  _ENGAGEMENTS.c.machine, _ENGAGEMENTS.c.at)
           .where(_ENGAGEMENTS.c.send_id.in_(bindparam("sends", expanding=True)),
                  _ENGAGEMENTS.c.at >= bindparam("since", type_=_ENGAGEMENTS.c.at.type)))
_INSERT = insert(_ENGAGEMENTS)
_REPEAT = (update(_ENGAGEMENTS).where(_ENGAGEMENTS.c.id == bindparam("b_id"))
           .values(repeats=_ENGAGEMENTS.c.repeats + bindparam("b_added")))
# PostgreSQL: a batch as one array per column, unnested by the server, in one statement each
# (executemany sent a statement a row: two thirds of a batch's time went to the INSERT).
_COLUMNS = ("send_id", "customer_id", "kind", "link", "at", "machine", "repeats")
_UNNESTED = func.unnest(*(bindparam(name, type_=ARRAY(_ENGAGEMENTS.c[name].type)) for name in _COLUMNS)
                        ).table_valued(*_COLUMNS).render_derived()
_PG_INSERT = insert(_ENGAGEMENTS).from_select(list(_COLUMNS), select(*_UNNESTED.c))
_PG_REPEAT = text("UPDATE engagements SET repeats = engagements.repeats + added.n "
                  "FROM unnest(CAST(:ids AS integer[]), CAST(:added AS integer[])) AS added(id, n) "
                  "WHERE engagements.id = added.id")
_LOCKS = text("SELECT pg_advisory_xact_lock(:namespace, id) FROM (SELECT unnest(CAST(:ids AS integer[])) AS id "
              "ORDER BY id) AS ids").bindparams(namespace=_LOCK_NAMESPACE)


def _sends(connection: Connection, digests: Sequence[str]) -> dict[str, _SendRow]:
    """The sends ``digests`` name, in one query (the Message-ID digest index)."""
    found: dict[str, _SendRow] = {}
    for row in connection.execute(_SENDS, {"digests": sorted(set(digests))}):
        forgotten = row.forgotten_at is not None
        links = None if forgotten or row.links is None else row.links.split("\n")
        found.setdefault(row.digest, _SendRow(
            row.id, row.customer_id, links, row.trigger, utm_content(row.template, row.stage),
            row.finished_at or row.claimed_at, tracked=row.untracked_at is None and not forgotten,
            forgotten=forgotten))
    return found


def _lock(connection: Connection, send_ids: Sequence[int]) -> None:
    if connection.dialect.name == "postgresql" and send_ids:
        connection.execute(_LOCKS, {"ids": sorted(set(send_ids))})


def _latest(connection: Connection, send_ids: Sequence[int], since: datetime) -> dict[tuple[Any, ...], _Latest]:
    """The latest engagement of each (send, kind, link, machine) since ``since``."""
    latest: dict[tuple[Any, ...], _Latest] = {}
    for row in connection.execute(_LATEST, {"sends": sorted(set(send_ids)), "since": since}):
        key = (row.send_id, row.kind, row.link, row.machine)
        known = latest.get(key)
        if known is None or (row.at, row.id) > (known.at, known.id or 0):
            latest[key] = _Latest(row.id, row.at)
    return latest


def record_hits(engine: Engine, hits: Sequence[Hit], policy: Tracking) -> list[str | None]:
    """Record ``hits`` in one transaction, by the rules above; for each, in order, where it
    goes: the destination with UTM for a click, ``""`` for an open, ``None`` for a token that
    names no send, no such link, or a forgotten customer's (404). A failure rolls back the
    whole batch: nothing is half-recorded."""
    if not hits:
        return []
    answers: list[str | None] = []
    with engine.begin() as connection:  # SQLite: BEGIN IMMEDIATE, the write lock before the read
        sends = _sends(connection, [hit.digest for hit in hits])
        kept: list[tuple[Hit, _SendRow]] = []
        for hit in hits:
            send = sends.get(hit.digest)
            if send is None or send.forgotten:
                answers.append(None)
            elif hit.kind != EngagementKind.CLICK:
                answers.append("")
                if policy.opens and send.tracked:
                    kept.append((hit, send))
            elif send.links is None or not 0 <= hit.link < len(send.links):
                answers.append(None)
            else:
                answers.append(with_utm(send.links[hit.link], send.campaign, send.content))
                if policy.clicks and send.tracked:
                    kept.append((hit, send))
        if not kept:
            return answers
        send_ids = [send.id for _, send in kept]
        _lock(connection, send_ids)
        latest = _latest(connection, send_ids, min(hit.at for hit, _ in kept) - policy.repeat_within)
        stored = list(latest.values())
        new: list[tuple[_Latest, dict[str, Any]]] = []
        for hit, send in sorted(kept, key=lambda pair: pair[0].at):
            reason = machine(hit.requested, hit.at, send.sent_at, policy.machine_click_within)
            key = (send.id, hit.kind, hit.link, reason)
            known = latest.get(key)
            if known is not None and abs(hit.at - known.at) < policy.repeat_within:
                known.added += 1
                continue
            latest[key] = fresh = _Latest(None, hit.at)
            new.append((fresh, {"send_id": send.id, "customer_id": send.customer_id, "kind": hit.kind,
                                "link": hit.link, "at": hit.at, "machine": reason}))
        postgresql = connection.dialect.name == "postgresql"
        rows = [{**row, "repeats": fresh.added} for fresh, row in new]
        if rows and postgresql:
            connection.execute(_PG_INSERT, {name: [row[name] for row in rows] for name in _COLUMNS})
        elif rows:
            connection.execute(_INSERT, rows)
        repeated = [known for known in stored if known.added]
        if repeated and postgresql:
            connection.execute(_PG_REPEAT, {"ids": [known.id for known in repeated],
                                            "added": [known.added for known in repeated]})
        elif repeated:
            connection.execute(_REPEAT, [{"b_id": known.id, "b_added": known.added} for known in repeated])
    return answers
