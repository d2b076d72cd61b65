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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, quote

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Connection, Engine, bindparam, insert, select, update
from sqlalchemy.exc import DBAPIError
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
           col(Send.stage), col(Send.variant), col(Send.finished_at), col(Send.claimed_at), col(Customer.untracked_at),
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

# PostgreSQL: a batch in two round trips of psycopg's pipeline mode, each statement's text
# the same for every batch (arrays, not a list of parameters), so psycopg prepares it once
# per connection. 1: BEGIN; the sends the batch names, each locked (in id order, so two
# writers never wait on each other in a circle); their engagements of the window, read by
# a statement of its own after the locks are held (a statement sees what was committed
# before it began: the lock's holder's rows too). 2: the new rows and the repeats in one
# statement, and COMMIT. Eight round trips, one statement a row or a list, took two thirds
# of the writer's time.
_DIGEST = "substr(sends.message_id, 2, 32)"  # message_digest, spelt as the index has it
_PG_SENDS = (
    "SELECT sends.*, pg_advisory_xact_lock(%(namespace)s, sends.id) FROM ("
    "SELECT sends.id, sends.customer_id, sends.links, sends.trigger, sends.template, sends.stage, sends.variant, "
    f"sends.finished_at, sends.claimed_at, customers.untracked_at, customers.forgotten_at, {_DIGEST} AS digest "
    f"FROM sends JOIN customers ON customers.id = sends.customer_id WHERE {_DIGEST} = ANY(%(digests)s) "
    "ORDER BY sends.id) AS sends")
_PG_LATEST = (
    "SELECT engagements.id, engagements.send_id, engagements.kind, engagements.link, engagements.machine, "
    "engagements.at FROM engagements JOIN sends ON sends.id = engagements.send_id "
    f"WHERE {_DIGEST} = ANY(%(digests)s) AND engagements.at >= %(since)s")
_PG_WRITE = (
    "WITH repeated AS (UPDATE engagements SET repeats = engagements.repeats + added.n "
    "FROM unnest(%(ids)s::integer[], %(added)s::integer[]) AS added(id, n) WHERE engagements.id = added.id) "
    "INSERT INTO engagements (send_id, customer_id, kind, link, at, machine, repeats) "
    "SELECT * FROM unnest(%(send_id)s::integer[], %(customer_id)s::integer[], %(kind)s::varchar[], "
    "%(link)s::integer[], %(at)s::timestamp[], %(machine)s::varchar[], %(repeats)s::integer[])")
_COLUMNS = ("send_id", "customer_id", "kind", "link", "at", "machine", "repeats")


def _send_row(row: Any) -> _SendRow:
    forgotten = row.forgotten_at is not None
    links = None if forgotten or row.links is None else row.links.split("\n")
    return _SendRow(row.id, row.customer_id, links, row.trigger, utm_content(row.template, row.stage, row.variant),
                    row.finished_at or row.claimed_at, tracked=row.untracked_at is None and not forgotten,
                    forgotten=forgotten)


def _sends(connection: Connection, digests: Sequence[str]) -> dict[str, _SendRow]:
    """The sends ``digests`` name, in one query (the Message-ID digest index)."""
    found: dict[str, _SendRow] = {}
    for row in connection.execute(_SENDS, {"digests": sorted(set(digests))}):
        if row.digest not in found:
            found[row.digest] = _send_row(row)
    return found


def _latest(connection: Connection, send_ids: Sequence[int], since: datetime) -> dict[tuple[Any, ...], _Latest]:
    """The latest engagement of each (send, kind, link, machine) since ``since``."""
    return _latest_of(connection.execute(_LATEST, {"sends": sorted(set(send_ids)), "since": since}))


def _latest_of(rows: Iterable[Any]) -> dict[tuple[Any, ...], _Latest]:
    latest: dict[tuple[Any, ...], _Latest] = {}
    for row in rows:
        key = (row.send_id, row.kind, row.link, row.machine)
        known = latest.get(key)
        if known is None or (row.at, row.id) > (known.at, known.id or 0):
            latest[key] = _Latest(row.id, row.at)
    return latest


def _answers(hits: Sequence[Hit], sends: dict[str, _SendRow],
             policy: Tracking) -> tuple[list[str | None], list[tuple[Hit, _SendRow]]]:
    """Where each hit goes, and the hits to record, each with its send."""
    answers: list[str | None] = []
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
    return answers, kept


def _fold(kept: Sequence[tuple[Hit, _SendRow]], latest: dict[tuple[Any, ...], _Latest],
          policy: Tracking) -> list[dict[str, Any]]:
    """The de-duplication rule: the rows to insert; each repeat is counted on its ``latest``."""
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
    return [{**row, "repeats": fresh.added} for fresh, row in new]


def record_hits(engine: Engine, hits: Sequence[Hit], policy: Tracking) -> list[str | None]:
    """Record ``hits`` in one transaction, by the rules above; for each, in order, where it
    goes: the destination with UTM for a click, ``""`` for an open, ``None`` for a token that
    names no send, no such link, or a forgotten customer's (404). A failure rolls back the
    whole batch: nothing is half-recorded."""
    if not hits:
        return []
    if engine.dialect.name == "postgresql":
        return _record_postgresql(engine, hits, policy)
    with engine.begin() as connection:  # SQLite: BEGIN IMMEDIATE, the write lock before the read
        answers, kept = _answers(hits, _sends(connection, [hit.digest for hit in hits]), policy)
        if not kept:
            return answers
        since = min(hit.at for hit, _ in kept) - policy.repeat_within
        latest = _latest(connection, [send.id for _, send in kept], since)
        stored = list(latest.values())
        rows = _fold(kept, latest, policy)
        if rows:
            connection.execute(_INSERT, rows)
        repeated = [known for known in stored if known.added]
        if repeated:
            connection.execute(_REPEAT, [{"b_id": known.id, "b_added": known.added} for known in repeated])
    return answers


def _naive(at: datetime) -> datetime:
    """UTC without its zone, as ``UtcDateTime`` stores it."""
    return at.astimezone(UTC).replace(tzinfo=None) if at.tzinfo is not None else at


def _record_postgresql(engine: Engine, hits: Sequence[Hit], policy: Tracking) -> list[str | None]:
    """``record_hits`` on PostgreSQL, on the pooled connection's psycopg connection itself
    (pipeline mode; see ``_PG_SENDS``). Its errors are raised as SQLAlchemy's, as a
    statement run through SQLAlchemy would raise them; a broken connection leaves the pool."""
    digests = sorted({hit.digest for hit in hits})
    since = _naive(min(hit.at for hit in hits) - policy.repeat_within)
    pooled = engine.raw_connection()
    connection: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
    statement = _PG_SENDS
    try:
        with connection.pipeline(), connection.cursor(row_factory=namedtuple_row) as cursor, \
                connection.cursor(row_factory=namedtuple_row) as engaged:
            cursor.execute(_PG_SENDS, {"namespace": _LOCK_NAMESPACE, "digests": digests})
            engaged.execute(_PG_LATEST, {"digests": digests, "since": since})
            sends: dict[str, _SendRow] = {}
            found: list[Any] = cursor.fetchall()
            for row in found:
                if row.digest not in sends:
                    sends[row.digest] = _send_row(row._replace(
                        finished_at=row.finished_at and row.finished_at.replace(tzinfo=UTC),
                        claimed_at=row.claimed_at and row.claimed_at.replace(tzinfo=UTC)))
            statement = _PG_LATEST
            engagements: list[Any] = engaged.fetchall()
            latest = _latest_of(row._replace(at=row.at.replace(tzinfo=UTC)) for row in engagements)
            answers, kept = _answers(hits, sends, policy)
            stored = list(latest.values())
            rows = _fold(kept, latest, policy)
            repeated = [known for known in stored if known.added]
            if rows or repeated:
                statement = _PG_WRITE
                parameters: dict[str, Any] = {name: [row[name] for row in rows] for name in _COLUMNS}
                parameters["at"] = [_naive(at) for at in parameters["at"]]
                parameters["ids"] = [known.id for known in repeated]
                parameters["added"] = [known.added for known in repeated]
                cursor.execute(_PG_WRITE, parameters)
            statement = "COMMIT"
            connection.commit()
        return answers
    except psycopg.Error as exc:
        if connection.broken or connection.closed:
            pooled.invalidate(exc)
        raise DBAPIError.instance(statement, None, exc, psycopg.Error) from exc
    finally:
        pooled.close()  # back to the pool, rolled back if it is still in a transaction
