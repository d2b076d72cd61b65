"""Loading the shop's events (Segment spec, one JSON object per line) into the store.

Each line is validated before it touches the database; a bad line is reported with
its number and skipped, the good ones load. Every event is stored once, keyed by
Segment's ``messageId`` (or, without one, by a hash of the line), so loading the
same file twice changes nothing.

All six Segment calls are understood: ``identify`` (traits), ``track`` (carts,
orders, complaints, unsubscribes; any other name is only logged), ``page`` and
``screen`` (activity, like a track), ``group`` (a membership with the group's traits)
and ``alias`` (two ids are one person).

Identities. An event may carry only an ``anonymousId``: it then belongs to a customer
keyed by that id (a guest). The guest becomes an account when an ``alias``
(previousId → userId) or an ``identify`` carrying both userId and anonymousId arrives:
the guest's record is merged into the account's (``_Store.merge``) and its id becomes
an alias, so later events and old unsubscribe links for it land on the account. An
``identify`` only claims an anonymousId nobody has claimed yet (a shared browser does
not merge two accounts); an explicit ``alias`` always merges.
"""

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, cast

import orjson
from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from sqlalchemy import Column, Engine, Table, any_, bindparam, case, delete, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, SQLModel, col

from flows import consent
from flows.spec.problems import format_path
from models import (
    CART_OPEN,
    CART_ORDERED,
    Cart,
    CartItem,
    Complaint,
    ConsentChangeKind,
    Customer,
    CustomerAlias,
    Event,
    GroupMembership,
    Order,
    Suppression,
    SuppressionReason,
    suppression_key,
)
from models.db import writer
from models.identity import customer_by_id
from models.types import stored_address, utcnow

log = logging.getLogger(__name__)

COMMIT_EVERY = 500
# SQLite has one writer at a time, and its busy handler polls every 100 ms at most: without
# a pause between an ingest's commits, a run waiting to write its ledger could miss every
# gap between two ingests' transactions and give up after the busy timeout. A pause as
# long as the poll interval lets every waiting writer in (about 0.1 s per 500 lines).
SQLITE_PAUSE = 0.1

# What a line may hold (README, "Ingesting events"). Segment's payloads nest a few levels
# (context.traits.address, properties.products[]); a thousand levels cost the parser its stack.
MAX_DEPTH = 32
MAX_QUANTITY = 10_000  # of one product, in one cart line and in the cart
MAX_PRICE = 1_000_000  # a product's price; its cents fit the store's 32-bit integers with room
MAX_TOTAL = 10_000_000  # an order's total or revenue
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
AHEAD = timedelta(days=1)  # a clock this far ahead of ours is wrong, not early


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class _BadJson(ValueError):
    """A number JSON does not have (NaN, Infinity) or no double holds (1e400)."""


class _Number(float):
    """A JSON number with a fraction or an exponent: a float that keeps its text, so that
    amounts are read exactly (``0.285`` is 0.285, not 0.28499999999999998)."""

    __slots__ = ("text",)
    text: str


def _json_number(text: str) -> float:
    number = _Number(text)
    if math.isinf(number):
        raise _BadJson(f"{text} is beyond the range of a JSON number")
    number.text = text
    return number


def _json_constant(name: str) -> float:
    raise _BadJson(f"{name} is not a JSON number")


# Made once: json.loads with hooks builds a decoder per call (a tenth of a line's parsing).
DECODER = json.JSONDecoder(parse_float=_json_number, parse_constant=_json_constant)


def _exact(value: Any) -> Any:
    """An amount as a Decimal from the line's own digits."""
    return Decimal(value.text) if isinstance(value, _Number) else value


def _whole(value: Any) -> Any:
    """A count written 2.0 or 1e30 is the whole number it spells (so that its range is what is reported)."""
    if isinstance(value, _Number):
        exact = Decimal(value.text)
        return int(exact) if exact == exact.to_integral_value() else value
    return value


def _amount(maximum: int, default: Decimal | None) -> Any:
    return Field(default, ge=0, le=maximum, decimal_places=2, allow_inf_nan=False)


Amount = Annotated[Decimal, BeforeValidator(_exact)]


def _cents(amount: Decimal) -> int:
    return int(amount * 100)  # exact: at most two decimal places, bounded


def _number_as_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


_NUMERIC = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


def _lenient_moment(value: Any) -> Any:
    """Empty means absent; a number (or digits in a string) is refused, never read as seconds
    since 1970: is 1772445600000 seconds or milliseconds?"""
    if type(value) is str:
        if value == "":
            return None
        if ":" in value or not _NUMERIC.fullmatch(value):  # a time of day: not a number
            return value
    elif not isinstance(value, int | float | Decimal) or isinstance(value, bool):
        return value
    raise ValueError("a number is not a moment here (seconds or milliseconds?): send ISO 8601 with a time zone, "
                     "such as 2026-03-02T10:00:00Z")


def _bounded_moment(value: datetime | None) -> datetime | None:
    """With a time zone, from 1970 until a day ahead of our clock; as UTC."""
    if value is None:
        return None
    if value.utcoffset() is None:
        raise ValueError(f"no time zone in {value.isoformat()} (add Z or an offset such as +01:00)")
    now = datetime.now(UTC)
    # The year first: converting 0001-01-01T00:00:00+14:00 to UTC would leave the calendar.
    early, late = value.year < EARLIEST.year - 1, value.year > now.year + 1
    if not early and not late:
        value = value.astimezone(UTC)
        early, late = value < EARLIEST, value > now + AHEAD
    if early:
        raise ValueError(f"before 1970 ({value.isoformat()})")
    if late:
        raise ValueError(f"more than a day in the future ({value.isoformat()})")
    return value


Moment = Annotated[datetime | None, BeforeValidator(_lenient_moment), AfterValidator(_bounded_moment)]


def _zoned(value: datetime | None) -> datetime | None:
    if value is not None and value.utcoffset() is None:
        raise ValueError(f"no time zone in {value.isoformat()} (add Z or an offset such as +01:00)")
    return value


# A client's own clock (originalTimestamp): it may run ahead of ours, which is what the
# collector's correction is for; bounded only when it is the event's moment (_check_envelope).
ClientMoment = Annotated[datetime | None, BeforeValidator(_lenient_moment), AfterValidator(_zoned)]


# Shops send ids as numbers or strings; we store them as text.
Id = Annotated[str, BeforeValidator(_number_as_text), Field(min_length=1, max_length=255)]


class _Lenient(BaseModel):
    """Segment payloads carry many fields we do not use; those are ignored, ours are checked."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Traits(_Lenient):
    email: str | None = None
    first_name: str | None = Field(None, validation_alias=AliasChoices("first_name", "firstName"), max_length=200)
    last_name: str | None = Field(None, validation_alias=AliasChoices("last_name", "lastName"), max_length=200)
    locale: str | None = Field(None, max_length=35)
    timezone: str | None = Field(None, max_length=64)
    marketing_consent: bool | None = None
    consent_confirmed: bool = False  # the shop ran its own double opt-in already
    consent_source: str | None = Field(None, max_length=64)
    created_at: Moment = Field(None, validation_alias=AliasChoices("created_at", "createdAt"))

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            # A local part in Unicode is an address too (RFC 6531): it goes out where the relay
            # offers SMTPUTF8, and fails its mail once, recorded, where it does not.
            valid = validate_email(value, check_deliverability=False, allow_smtputf8=True)
        except EmailNotValidError as exc:
            raise ValueError(f"not a deliverable address ({exc})") from None
        # The domain as the envelope needs it (IDNA), whichever form the shop sent; one form
        # for the suppressions and the shared mailboxes too (``display_address`` shows Unicode).
        return stored_address(f"{valid.local_part}@{valid.ascii_domain}")


class Product(_Lenient):
    product_id: Id = Field(validation_alias=AliasChoices("product_id", "productId", "sku", "id"))
    name: str = Field("", max_length=500)
    price: Amount = _amount(MAX_PRICE, Decimal(0))
    quantity: Annotated[int, BeforeValidator(_whole)] = Field(1, ge=1, le=MAX_QUANTITY)
    url: str | None = Field(None, max_length=2000)  # as the store's columns (PostgreSQL refused longer ones)
    image_url: str | None = Field(None, max_length=2000)
    cart_id: Id | None = None


class OrderCompleted(_Lenient):
    order_id: Id
    total: Amount | None = _amount(MAX_TOTAL, None)
    revenue: Amount | None = _amount(MAX_TOTAL, None)
    currency: str = Field("EUR", pattern="^[A-Za-z]{3}$")  # ISO 4217
    products: list[dict[str, Any]] = Field(default_factory=list)
    cart_id: Id | None = None


class ComplaintReceived(_Lenient):
    complaint_id: Id
    subject: str = Field("", max_length=500)


class ComplaintAnswered(_Lenient):
    complaint_id: Id


class SegmentEvent(_Lenient):
    """The envelope every Segment call shares (messageId, timestamps, ids, context…)."""

    type: Literal["identify", "track", "page", "screen", "group", "alias"]
    user_id: Id | None = Field(None, validation_alias=AliasChoices("userId", "user_id"))
    anonymous_id: Id | None = Field(None, validation_alias=AliasChoices("anonymousId", "anonymous_id"))
    previous_id: Id | None = Field(None, validation_alias=AliasChoices("previousId", "previous_id"))
    group_id: Id | None = Field(None, validation_alias=AliasChoices("groupId", "group_id"))
    timestamp: Moment = None
    original_timestamp: ClientMoment = Field(
        None, validation_alias=AliasChoices("originalTimestamp", "original_timestamp"))
    received_at: Moment = Field(None, validation_alias=AliasChoices("receivedAt", "received_at"))
    message_id: str | None = Field(None, validation_alias=AliasChoices("messageId", "message_id"), max_length=255)
    traits: dict[str, Any] = Field(default_factory=dict)  # a person's for identify, the group's for group
    event: str | None = Field(None, max_length=255)
    name: str | None = Field(None, max_length=255, description="The page's or screen's name.")
    properties: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        """The id the event is about: the userId, or for a guest the anonymousId."""
        key = self.user_id or self.anonymous_id
        assert key is not None  # parse_line refuses events with neither
        return key

    @property
    def moment(self) -> datetime:
        """When it happened: Segment's ``timestamp``, or the client's or server's clock without one."""
        moment = self.timestamp or self.original_timestamp or self.received_at
        assert moment is not None  # parse_line refuses events with none
        return _aware(moment)


PROPERTIES: dict[str, type[_Lenient]] = {
    "Product Added": Product,
    "Product Removed": Product,
    "Order Completed": OrderCompleted,
    "Complaint Received": ComplaintReceived,
    "Complaint Answered": ComplaintAnswered,
}


@dataclass(frozen=True)
class SharedAddress:
    """Several customer records with one mailbox: one recipient at run time, but they should be merged."""

    address: str
    customers: list[str]

    def __str__(self) -> str:
        return (f"{self.address} is shared by customers {', '.join(self.customers)}: "
                "send an alias event to merge them")


@dataclass
class IngestReport:
    loaded: int = 0
    duplicates: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    complaints: list[str] = field(default_factory=list)
    shared: list[SharedAddress] = field(default_factory=list)  # among the addresses this load wrote
    merged: int = 0  # customer records merged into another (alias, or identify claiming a guest)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(frozen=True)
class _Parsed:
    event: SegmentEvent
    details: _Lenient | None
    message_id: str
    raw: dict[str, Any]
    traits: Traits | None = None  # identify only
    source: str | None = None  # the write key's source, or "ingest"
    received_at: datetime | None = None  # when the collector received it (else: when stored)


def parse_line(text: str, source: str | None = None) -> "_Parsed":
    """Decode and validate one line; raises ValueError with a readable reason."""
    # Without its line break: json counts a break as a line, so an object cut short at the
    # end of its line was reported at "column 1" (of the empty line after it).
    text = text.rstrip("\r\n")
    try:
        raw = DECODER.decode(text)
    except json.JSONDecodeError as exc:
        # One line, so the position is the column: 1-based, in characters (as editors count).
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.pos + 1})") from None
    except _BadJson as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise ValueError("not valid JSON (a number of more than 4300 digits)" if "digits" in str(exc)
                         else f"not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError("expected a JSON object")  # not a TypeError: a bad line, reported as such
    if text.count("{") + text.count("[") > MAX_DEPTH and deeper_than(raw, MAX_DEPTH):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if "\\u" in text:  # only an escape spells a NUL or a lone surrogate in a line that is UTF-8
        check_strings(raw)
    return parse_event(raw, source)


def parse_event(raw: dict[str, Any], source: str | None = None, received_at: datetime | None = None) -> "_Parsed":
    """Validate one decoded event (a line's, or one of an HTTP batch's, already checked for
    depth and unstorable characters); raises ValueError with a readable reason."""
    try:
        event = SegmentEvent.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(_reasons(exc)) from None
    _check_envelope(event)
    model = PROPERTIES.get(event.event or "") if event.type == "track" else None
    try:
        details = model.model_validate(event.properties) if model else None
    except ValidationError as exc:
        raise ValueError(_reasons(exc, ("properties",))) from None
    traits = _identified(event) if event.type == "identify" else None
    message_id = event.message_id or "sha256:" + hashlib.sha256(
        json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return _Parsed(event, details, message_id, raw, traits, source, received_at)


def _identified(event: SegmentEvent) -> Traits:
    """An identify's traits: its own, and those only in ``context.traits``, where RudderStack's
    libraries send them (its collector reads both, the event's own winning)."""
    inherited = event.context.get("traits")
    given = {**inherited, **event.traits} if isinstance(inherited, dict) else event.traits
    try:
        return Traits.model_validate(given)
    except ValidationError as exc:
        raise ValueError("; ".join(
            f"{format_path(('traits' if e['loc'][0] in event.traits else 'context.traits', *e['loc']))}: "
            f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())) from None


def deeper_than(value: Any, limit: int) -> bool:
    """Whether objects and arrays nest more than ``limit`` levels (the line itself is level 1)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def check_strings(raw: dict[str, Any]) -> None:
    """No NUL (PostgreSQL's text cannot hold it) and no lone surrogate (not Unicode: no
    database can store it) in any key or value, wherever it is."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(raw, ())]
    while stack:
        item, path = stack.pop()
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, value in pairs:
            for text in (key, value) if isinstance(key, str) else (value,):
                if isinstance(text, str) and (found := _UNSTORABLE.search(text)):
                    where = format_path((*path, key))
                    if found.group() == "\x00":
                        raise ValueError(f"{where}: a NUL character (\\u0000), which the store cannot hold")
                    raise ValueError(f"not valid Unicode (a lone surrogate \\u{ord(found.group()):04x} in {where})")
            if isinstance(value, dict | list):
                stack.append((value, (*path, key)))


def _check_envelope(event: SegmentEvent) -> None:
    """What the spec requires of each call beyond its field types; every problem at once."""
    problems = []
    if event.timestamp is None and event.original_timestamp is None and event.received_at is None:
        problems.append("timestamp: required (or originalTimestamp, receivedAt)")
    elif event.timestamp is None and event.original_timestamp is not None:
        try:
            _bounded_moment(event.original_timestamp)
        except ValueError as exc:
            problems.append(f"originalTimestamp: {exc}")
    if event.type == "alias":
        if event.previous_id is None:
            problems.append("previousId: alias calls need the previous id")
        if event.user_id is None:
            problems.append("userId: alias calls need the new userId")
    elif event.user_id is None and event.anonymous_id is None:
        problems.append("userId: required, or anonymousId for a visitor not yet identified")
    if event.type == "group" and event.group_id is None:
        problems.append("groupId: group calls need the group's id")
    if event.type == "track" and not event.event:
        problems.append("event: track events need an event name")
    if problems:
        raise ValueError("; ".join(problems))


def _reasons(exc: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    return "; ".join(
        f"{format_path(prefix + tuple(e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
    )


def _decoded(data: str | bytes) -> str:
    if isinstance(data, str):
        if not data.isascii():
            try:
                data.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"not valid Unicode (a lone surrogate \\u{ord(data[exc.start]):04x} at column "
                                 f"{exc.start + 1})") from None
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        column = len(data[:exc.start].decode("utf-8", errors="replace")) + 1
        raise ValueError(f"not UTF-8 (byte 0x{data[exc.start]:02x} at column {column})") from None


@dataclass
class Applied:
    """What loading one group of events did, event by event (in the group's order)."""

    outcomes: list[str | None] = field(default_factory=list)  # None loaded, DUPLICATE, or the reason refused
    complaints: list[str] = field(default_factory=list)
    merged: int = 0
    addresses: set[str] = field(default_factory=set)
    exact: bool = False  # some event was refused: the group was loaded again, one savepoint per event
    deferred: list[int] = field(default_factory=list)  # events left for a second round (outcome None meanwhile)


DUPLICATE = "duplicate"


def apply_events(engine: Engine, events: Sequence[_Parsed]) -> Applied:
    """Load ``events`` in their order, committed before this returns: the one way events reach
    the store, from a file (``ingest_lines``) or over HTTP (``flows.collect``). One
    transaction, or two when another writer holds some of the group's customers: their
    events, and those that share anything with them (``_deferred``), load in a second one
    after the first has committed, waiting for that writer.

    First optimistically, with what the group needs looked up in a few statements and its
    rows written together at the commit (``bench/collect.py``). An event a rule refuses
    rolls that pass back, and the group is loaded again without it; when the store's own
    constraint refuses something at the commit (whose event is not known), or more than a
    few events are refused, the group is loaded one savepoint per event instead, so that
    the others are stored and each refusal is reported with its reason: either way the
    same rules, the same result."""
    applied = _load(engine, events, wait=False)
    if applied.deferred:  # their customers were another writer's: now, waiting for them
        later = _load(engine, [events[index] for index in applied.deferred], wait=True)
        assert not later.deferred  # a pass that waits leaves nothing for later
        for index, outcome in zip(applied.deferred, later.outcomes, strict=True):
            applied.outcomes[index] = outcome
        applied.complaints += later.complaints
        applied.merged += later.merged
        applied.addresses |= later.addresses
        applied.exact = applied.exact or later.exact
        applied.deferred = []
    return applied


def _load(engine: Engine, events: Sequence[_Parsed], wait: bool) -> Applied:
    """``apply_events``'s passes over one group. ``wait``: for customers another writer holds
    (else their events are left for a second round, ``Applied.deferred``)."""
    for attempt in range(1, RETRIES + 1):
        try:
            refused: dict[int, str] = {}
            while len(refused) <= MAX_REFUSED_OPTIMISTICALLY:
                try:
                    return _apply(engine, events, exact=False, refused=refused, wait=wait)
                except _Refused as exc:  # a rule refused this event: the pass again, without it
                    refused[exc.index] = exc.reason
                except (ValueError, OverflowError, StatementError) as exc:
                    if isinstance(exc, DBAPIError) and not isinstance(exc, IntegrityError | DataError):
                        raise  # the database failed, not an event (a lost connection, a lock): see below
                    break  # the store's constraint, at a flush: whose event is not known
            return _apply(engine, events, exact=True)
        except DBAPIError as exc:
            # Two writers waiting on each other's rows (PostgreSQL picks one to fail): rolled
            # back whole, so the group is simply loaded again. Anything else is the caller's.
            if getattr(exc.orig, "sqlstate", None) not in RETRYABLE or attempt == RETRIES:
                raise
            log.info("events: %s, the group of %d loaded again", type(exc.orig).__name__, len(events))
    raise AssertionError("unreachable")


RETRIES = 3
RETRYABLE = ("40P01", "40001")  # deadlock detected, serialization failure
# Events a rule refuses, each met by one more optimistic pass without it; beyond, one
# savepoint per event is cheaper.
MAX_REFUSED_OPTIMISTICALLY = 10


class _Refused(Exception):
    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index, self.reason = index, reason


def _apply(engine: Engine, events: Sequence[_Parsed], exact: bool, refused: dict[int, str] | None = None,
           wait: bool = True) -> Applied:
    """One pass over the group. ``refused``: events a rule refused in an earlier pass, left out.
    ``wait``: False leaves the events of customers another writer holds (``_Store.prefetch``)."""
    applied = Applied(exact=exact)
    refused = refused or {}
    with Session(writer(engine), expire_on_commit=False) as session:
        store = _Store(session, exact=exact)
        deferred = set() if exact else store.prefetch(events, wait=wait)
        for index, parsed in enumerate(events):
            if index in deferred:
                applied.outcomes.append(None)
                applied.deferred.append(index)
                continue
            if store.seen(parsed.message_id):
                applied.outcomes.append(DUPLICATE)
                continue
            if exact:
                reason = store.apply_alone(parsed)
                applied.outcomes.append(reason)
                if reason is not None:
                    continue
            elif index in refused:
                applied.outcomes.append(refused[index])
                continue
            else:
                try:
                    store.apply(parsed)
                except OverflowError as exc:
                    raise _Refused(index, f"the store refused it ({exc})") from None
                except ValueError as exc:
                    if isinstance(exc, StatementError):
                        raise
                    raise _Refused(index, str(exc)) from None
                applied.outcomes.append(None)
            if parsed.event.event == "Complaint Received":  # whose details are a ComplaintReceived
                applied.complaints.append(parsed.details.complaint_id)  # type: ignore[union-attr]
        store.write_pending()
        session.commit()
        applied.merged, applied.addresses = store.merged, store.addresses
    return applied


def ingest_lines(engine: Engine, lines: Iterable[str | bytes], source: str = "ingest") -> IngestReport:
    """Load one event per line (text, or bytes as read from a file: each line decoded on its own),
    ``COMMIT_EVERY`` lines to a transaction (``apply_events``)."""
    report = IngestReport()
    # On SQLite each transaction takes the write lock as it begins, so that a run or another
    # ingest writing meanwhile makes it wait, not fail; between two, a pause lets them in.
    sqlite = engine.dialect.name == "sqlite"
    addresses: set[str] = set()
    group: list[_Parsed] = []
    numbers: list[int] = []

    def load() -> None:
        applied = apply_events(engine, group)
        for number, outcome in zip(numbers, applied.outcomes, strict=True):
            if outcome is None:
                report.loaded += 1
            elif outcome == DUPLICATE:
                report.duplicates += 1
            else:
                report.errors.append((number, outcome))
        report.complaints.extend(applied.complaints)
        report.merged += applied.merged
        addresses.update(applied.addresses)
        group.clear()
        numbers.clear()

    for number, data in enumerate(lines, start=1):
        try:
            text = _decoded(data)
        except ValueError as exc:
            report.errors.append((number, str(exc)))
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")  # a byte order mark, as some editors save UTF-8
        if not text.strip():
            continue
        try:
            parsed = parse_line(text, source)
        except ValueError as exc:
            report.errors.append((number, str(exc)))
            continue
        group.append(parsed)
        numbers.append(number)
        if len(group) >= COMMIT_EVERY:
            load()
            if sqlite:
                time.sleep(SQLITE_PAUSE)  # let a waiting writer (a run's ledger) take its turn
    if group:
        load()
    report.errors.sort()
    with Session(engine) as session:
        report.shared = shared_addresses(session, addresses)
    return report


def shared_addresses(session: Session, addresses: Iterable[str]) -> list[SharedAddress]:
    """Which of ``addresses`` (lower-cased) belong to more than one customer record."""
    found: dict[str, list[str]] = {}
    wanted = sorted(set(addresses))
    for start in range(0, len(wanted), 500):  # ix_customers_address serves each chunk
        address = func.lower(Customer.email)
        rows = session.execute(
            select(address, col(Customer.external_id)).where(address.in_(wanted[start:start + 500]))
        )
        for email, external_id in rows:
            found.setdefault(email, []).append(external_id)
    return [SharedAddress(email, sorted(ids)) for email, ids in sorted(found.items()) if len(ids) > 1]


def _customer_references() -> list[tuple[Table, Column[Any]]]:
    """Every column that points at a customer: a merge moves them all, tables added later included."""
    found = []
    for table in SQLModel.metadata.sorted_tables:
        for column in table.columns:
            if any(fk.column.table.name == "customers" and fk.column.name == "id" for fk in column.foreign_keys):
                found.append((table, column))
    return found


TRAITS = ("email", "first_name", "last_name", "timezone")


class _Carts:
    """The carts a group's events touch, and their items, as the session holds them: loaded
    for all of the group's customers in two statements, or one customer's (or cart's) on
    a miss, and kept in step by the handlers, so a cart event costs no statement of its own."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.open: dict[int, list[Cart]] = {}  # customer id → their open carts (loaded customers only)
        self.by_name: dict[str, Cart | None] = {}  # external id → cart (None: there is none)
        self.items: dict[int, dict[str, CartItem]] = {}  # id(cart) → product id → item (loaded or new carts)

    def clear(self) -> None:
        self.open, self.by_name, self.items = {}, {}, {}

    def load(self, customers: set[int], names: set[str]) -> None:
        customers, names = customers - set(self.open), names - set(self.by_name)
        found: list[Cart] = []
        for chunk in _chunks(sorted(customers)):
            found.extend(self.session.execute(select(Cart).where(
                _among(self.session, col(Cart.customer_id), chunk), col(Cart.status) == CART_OPEN)).scalars())
        for name_chunk in _chunks(sorted(names)):
            found.extend(self.session.execute(
                select(Cart).where(_among(self.session, col(Cart.external_id), name_chunk))).scalars())
        for customer in customers:
            self.open[customer] = []
        for name in names:
            self.by_name[name] = None
        carts = {cart.id: cart for cart in found}
        for cart in carts.values():
            self.by_name[cart.external_id] = cart
            if cart.status == CART_OPEN and cart.customer_id in customers:
                self.open[cart.customer_id].append(cart)
        fresh = [cart_id for cart_id, cart in carts.items() if cart_id is not None and id(cart) not in self.items]
        for cart_id in fresh:
            self.items[id(carts[cart_id])] = {}
        for id_chunk in _chunks(sorted(fresh)):
            for item in self.session.execute(
                    select(CartItem).where(_among(self.session, col(CartItem.cart_id), id_chunk))).scalars():
                self.items[id(carts[item.cart_id])][item.product_id] = item

    def named(self, name: str) -> Cart | None:
        if name not in self.by_name:
            self.load(set(), {name})
        return self.by_name[name]

    def open_of(self, customer: Customer) -> list[Cart]:
        assert customer.id is not None
        if customer.id not in self.open:
            self.load({customer.id}, set())
        return list(self.open[customer.id])

    def latest_open(self, customer: Customer) -> Cart | None:
        """The newest open cart: the last one made, or the one with the highest id."""
        carts = self.open_of(customer)
        return max(carts, key=lambda cart: (cart.id is None, cart.id or carts.index(cart)), default=None)

    def items_of(self, cart: Cart) -> dict[str, CartItem]:
        if id(cart) not in self.items:  # a cart of another customer's, loaded by name only
            self.items[id(cart)] = {item.product_id: item for item in self.session.execute(
                select(CartItem).where(col(CartItem.cart_id) == cart.id)).scalars()}
        return self.items[id(cart)]

    def added(self, cart: Cart) -> None:
        self.by_name[cart.external_id] = cart
        self.items[id(cart)] = {}
        if cart.customer_id in self.open:
            self.open[cart.customer_id].append(cart)

    def reopened(self, cart: Cart) -> None:
        """A product added to a cart makes it open again (a cart named by the event, once ordered)."""
        if cart.status != CART_OPEN:
            cart.status = CART_OPEN
            if cart.customer_id in self.open and cart not in self.open[cart.customer_id]:
                self.open[cart.customer_id].append(cart)

    def ordered(self, cart: Cart) -> None:
        if cart in self.open.get(cart.customer_id, []):
            self.open[cart.customer_id].remove(cart)


class _Known:
    """Which external ids of a table (orders) exist: the group's looked up at once."""

    def __init__(self, session: Session, table: type[Order]) -> None:
        self.session, self.table = session, table
        self.checked: set[str] = set()
        self.known: set[str] = set()

    def clear(self) -> None:
        self.checked, self.known = set(), set()

    def load(self, names: set[str]) -> None:
        names -= self.checked
        for chunk in _chunks(sorted(names)):
            self.known.update(self.session.execute(select(col(self.table.external_id))
                                                   .where(_among(self.session, col(self.table.external_id), chunk))
                                                   ).scalars())
        self.checked |= names

    def exists(self, name: str) -> bool:
        if name not in self.checked:
            self.load({name})
        return name in self.known

    def added(self, name: str) -> None:
        self.checked.add(name)
        self.known.add(name)


EVENT_COLUMNS = ("message_id", "type", "name", "user_id", "timestamp", "payload", "received_at", "source")


def _number_fragment(value: Any) -> Any:
    if isinstance(value, _Number):
        return orjson.Fragment(value.text)  # the client's own digits, as read
    raise TypeError(f"{type(value).__name__} is not JSON")


def compact_json(raw: dict[str, Any]) -> str:
    """A decoded event as compact JSON text, its numbers as the client wrote them: by orjson,
    a seventh of json.dumps's time for these payloads (bench/collect.py); json for what orjson
    refuses (an integer beyond 64 bits)."""
    try:
        return orjson.dumps(raw, default=_number_fragment).decode()
    except orjson.JSONEncodeError:
        return json.dumps(raw, separators=(",", ":"), ensure_ascii=False)  # as orjson: sizes in UTF-8


def _copy_events(connection: Any, rows: list[dict[str, Any]]) -> None:
    """Event rows by COPY (PostgreSQL): a fifth of the cost of an INSERT's parameters for the
    store's widest rows (bench/collect.py). Times as the store keeps them, naive UTC."""
    def naive(moment: datetime) -> datetime:
        return moment.astimezone(UTC).replace(tzinfo=None)

    statement = f"COPY events ({', '.join(EVENT_COLUMNS)}) FROM STDIN"
    cursor = connection.connection.driver_connection.cursor()
    try:
        with cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row((row["message_id"], row["type"], row["name"], row["user_id"],
                                naive(row["timestamp"]), compact_json(row["payload"]),
                                naive(row["received_at"]), row["source"]))
    except connection.dialect.dbapi.Error as exc:  # as SQLAlchemy's own errors: a unique key met, a lock, …
        raise DBAPIError.instance(statement, None, exc, connection.dialect.dbapi.Error) from exc


def _among(session: Session, column: Any, values: list[Any]) -> Any:
    """``column IN values``; on PostgreSQL ``column = ANY(array)``: one parameter, so that the
    statement's text is the same for every group (psycopg prepares it once), where a thousand
    placeholders were parsed again for each (a tenth of the tracking API's time, bench/collect.py)."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, values, type_=ARRAY(column.type)))
    return column.in_(values)


def _chunks(values: list[Any], size: int = 1000) -> Iterable[list[Any]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _deferred(events: Sequence[_Parsed], held: set[str], named: dict[str, int],
              addresses: dict[int, str]) -> set[int]:
    """The events (by index) to load after the group's commit, when ``held`` ids name customers
    another writer holds (``named``: id → customer; ``addresses``: customer → stored address).

    Each event naming a held customer is left for later, and so is every later event that
    shares anything with one left for later: a person, the messageId (a repeat), a cart,
    order or complaint id, or, for the events that change a customer's record (identify,
    alias, group, carts, orders, complaints, unsubscribes), a mailbox: an address a person
    has, or is given by an identify in the group (a suppression or a merge weighs it). A
    person is every id and customer that an alias, or an identify with both ids, anywhere in
    the group may make one, from the group's first event on: a merge later in the group
    reorders what came before it too (which cart is the latest open one). So whatever two
    events of a group may have in common loads in their order, and everyone else's events
    load at once."""
    deferred: set[int] = set()
    if not held:
        return deferred
    people = _People(named)
    for parsed in events:
        event = parsed.event
        names = _names(parsed)
        if event.type == "alias" or (event.type == "identify" and event.user_id and event.anonymous_id):
            for name in names[1:]:
                people.join(names[0], name)
    mailboxes: dict[str, set[str]] = {}  # a person's addresses, stored and given in the group so far
    for customer, address in addresses.items():
        mailboxes.setdefault(people.of_customer(customer), set()).add(suppression_key(address))
    waiting = {people.of(name) for name in held}
    for index, parsed in enumerate(events):
        event, details = parsed.event, parsed.details
        persons = {people.of(name) for name in _names(parsed)}
        keys = persons | {f"message:{parsed.message_id}"}
        if isinstance(details, Product | OrderCompleted) and details.cart_id:
            keys.add(f"cart:{details.cart_id}")
        if isinstance(details, OrderCompleted):
            keys.add(f"order:{details.order_id}")
        if isinstance(details, ComplaintReceived | ComplaintAnswered):
            keys.add(f"complaint:{details.complaint_id}")
        if event.type in ("identify", "group", "alias") or (event.type == "track" and
                                                             (event.event or "") in _TRACK_HANDLERS):
            for person in persons:
                boxes = mailboxes.setdefault(person, set())
                if parsed.traits is not None and parsed.traits.email:
                    boxes.add(suppression_key(parsed.traits.email))
                keys |= {f"mailbox:{box}" for box in boxes}
        if keys & waiting:
            deferred.add(index)
            waiting |= keys
    return deferred


def _names(parsed: _Parsed) -> list[str]:
    event = parsed.event
    return [i for i in (event.user_id, event.anonymous_id, event.previous_id) if i is not None]


class _People:
    """Ids and customers that are, or may become within a group, one person (union-find)."""

    def __init__(self, named: dict[str, int]) -> None:
        self.parent: dict[str, str] = {}
        for name, customer in named.items():
            self._union(f"id:{name}", f"customer:{customer}")

    def of(self, name: str) -> str:
        return self._root(f"id:{name}")

    def of_customer(self, customer: int) -> str:
        return self._root(f"customer:{customer}")

    def join(self, a: str, b: str) -> None:
        self._union(f"id:{a}", f"id:{b}")

    def _union(self, a: str, b: str) -> None:
        self.parent[self._root(a)] = self._root(b)

    def _root(self, key: str) -> str:
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key


class _Store:
    """Applies validated events; caches customers for the length of one file."""

    def __init__(self, session: Session, exact: bool = True) -> None:
        self.session, self.exact = session, exact
        self.customers: dict[str, Customer] = {}
        self.message_ids: set[str] = set()  # stored by this group, or (prefetched) before it
        self.absent: set[str] = set()  # ids prefetched and found to name nobody yet
        self.addresses: set[str] = set()  # lower-cased, of customers this load identified or merged
        self.merged = 0
        # Written together (``write_pending``): the event rows, and each customer's latest
        # activity, so that a page view costs no statement of its own.
        self.pending_events: list[dict[str, Any]] = []
        self.pending_seen: dict[int, tuple[Customer, datetime]] = {}  # id(customer) →
        self.carts = _Carts(session)
        self.message_id = ""  # of the event being applied
        self.orders = _Known(session, Order)

    def write_pending(self) -> None:
        """The event rows and activity noted so far, in two statements: before anything reads
        them (a merge weighs identify events and activity) and before the commit."""
        self.session.flush()  # new customers get their ids
        if self.pending_events:
            connection = self.session.connection()
            if connection.dialect.name == "postgresql":
                _copy_events(connection, self.pending_events)
            else:
                connection.execute(insert(Event.__table__), self.pending_events)  # type: ignore[attr-defined]
            self.pending_events = []
        if self.pending_seen:
            latest = bindparam("latest", type_=Event.__table__.c.timestamp.type)  # type: ignore[attr-defined]
            table = Customer.__table__  # type: ignore[attr-defined]
            self.session.execute(
                update(table).where(table.c.id == bindparam("customer"))
                .values(last_seen_at=case((or_(table.c.last_seen_at.is_(None), table.c.last_seen_at < latest),
                                           latest), else_=table.c.last_seen_at))
                .execution_options(synchronize_session=False),
                sorted(({"customer": customer.id, "latest": moment} for customer, moment in self.pending_seen.values()),
                       key=lambda row: row["customer"]))  # in one order for every writer: no deadlock between two
            for customer, moment in self.pending_seen.values():
                if customer.last_seen_at is None or _aware(customer.last_seen_at) < moment:
                    set_committed_value(customer, "last_seen_at", moment)
            self.pending_seen = {}

    def prefetch(self, events: Sequence[_Parsed], wait: bool = True) -> set[int]:
        """The group's known messageIds and the customers its ids name, in a few statements.
        Without ``wait`` (PostgreSQL), customers another writer has locked are skipped, not
        waited for: the events that name them, and those that share anything with them
        (``_deferred``), are returned (by index) to be loaded after this group's commit, so
        that they still load in their order and a writer never sits idle behind another's group."""
        wanted = sorted({parsed.message_id for parsed in events})
        ids = sorted({i for parsed in events for i in (parsed.event.user_id, parsed.event.anonymous_id,
                                                        parsed.event.previous_id) if i is not None})
        for chunk in _chunks(wanted):
            self.message_ids.update(self.session.execute(
                select(col(Event.message_id)).where(_among(self.session, col(Event.message_id), chunk))).scalars())
        # Locked at once, in the order of their ids (PostgreSQL): two writers naming the same
        # customers take turns instead of deadlocking on them halfway through their groups.
        skip = not wait and self.session.get_bind().dialect.name == "postgresql"
        named, by_id = self._lock(ids, skip)
        held = {name for name, customer_id in named.items() if customer_id not in by_id}  # by another writer
        for name, customer_id in named.items():
            if customer_id in by_id:
                self.customers[name] = by_id[customer_id]
        self.absent = set(ids) - set(self.customers) - held
        addresses = {customer.id: customer.email for customer in by_id.values()
                     if customer.id is not None and customer.email}
        if held:  # theirs, read without waiting: whose mailbox a held customer's events may touch
            held_ids = sorted({named[name] for name in held})
            for id_chunk in _chunks(held_ids):
                addresses.update(self.session.execute(
                    select(col(Customer.id), col(Customer.email))
                    .where(_among(self.session, col(Customer.id), id_chunk), col(Customer.email).is_not(None))).all())
        deferred = _deferred(events, held, named, addresses)
        events = [parsed for index, parsed in enumerate(events) if index not in deferred]
        shopping = [parsed for parsed in events if parsed.event.type == "track" and isinstance(
            parsed.details, Product | OrderCompleted)]
        self.carts.load({c.id for parsed in shopping if (c := self.customers.get(parsed.event.key)) and c.id},
                        {cart for parsed in shopping if (cart := parsed.details.cart_id)})  # type: ignore[union-attr]
        self.orders.load({parsed.details.order_id for parsed in shopping if isinstance(parsed.details,
                                                                                         OrderCompleted)})
        return deferred

    def _lock(self, ids: list[str], skip: bool) -> tuple[dict[str, int], dict[int, Customer]]:
        """Which customer each of ``ids`` names (external id or alias), and those customers,
        locked. ``skip``: those another writer holds are left out. Else a customer merged
        away while this waited for it (its row gone, its id now an alias) is looked up again."""
        named: dict[str, int] = {}  # external id or alias → customer id
        by_id: dict[int, Customer] = {}
        wanted = ids
        for _ in range(3):
            found = self._named(wanted)
            named.update(found)
            for id_chunk in _chunks(sorted(set(found.values()) - set(by_id))):
                by_id.update((c.id, c) for c in self.session.execute(
                    select(Customer).where(_among(self.session, col(Customer.id), id_chunk))
                    .order_by(col(Customer.id)).with_for_update(skip_locked=skip)).scalars() if c.id is not None)
            wanted = [name for name, customer_id in found.items() if customer_id not in by_id]
            if skip or not wanted:
                break
            for name in wanted:
                del named[name]
        return named, by_id

    def _named(self, ids: list[str]) -> dict[str, int]:
        named: dict[str, int] = {}
        for chunk in _chunks(ids):
            named.update(self.session.execute(select(col(Customer.external_id), col(Customer.id))
                                              .where(_among(self.session, col(Customer.external_id), chunk))).all())
            named.update(self.session.execute(select(col(CustomerAlias.external_id), col(CustomerAlias.customer_id))
                                              .where(_among(self.session, col(CustomerAlias.external_id), chunk))
                                              ).all())
        return named

    def seen(self, message_id: str) -> bool:
        if message_id in self.message_ids:
            return True
        if not self.exact:
            return False  # prefetched
        found = self.session.execute(select(col(Event.id)).where(col(Event.message_id) == message_id)).first()
        return found is not None

    def forget(self, merged: int) -> None:
        """After a failed line: drop the cache (it may hold rolled-back customers) and its merges."""
        self.customers.clear()
        self.merged = merged
        self.pending_events, self.pending_seen = [], {}
        self.carts.clear()
        self.orders.clear()

    def apply_alone(self, parsed: _Parsed) -> str | None:
        """``apply`` in a savepoint of its own: all of the event or nothing. None when stored,
        else why it was refused. A row another writer inserted meanwhile (the same customer,
        the same messageId from a client's retry) is met by trying once more: then it is seen."""
        for attempt in range(2):
            merged = self.merged
            try:
                with self.session.begin_nested():  # all of one event or nothing, a merge included
                    self.apply(parsed)
                return None
            except (ValueError, OverflowError, StatementError) as exc:
                if isinstance(exc, DBAPIError) and not isinstance(exc, IntegrityError | DataError):
                    raise  # the database failed, not the event (a lost connection, a lock): stop
                self.forget(merged)  # what the failed event cached was rolled back
                if attempt == 0 and isinstance(exc, IntegrityError):
                    if self.seen(parsed.message_id):
                        return DUPLICATE
                    continue
                return (f"the store refused it ({exc.orig})" if isinstance(exc, StatementError) else
                        f"the store refused it ({exc})" if isinstance(exc, OverflowError) else str(exc))
        raise AssertionError("unreachable")

    def apply(self, parsed: _Parsed) -> None:
        event, ts = parsed.event, parsed.event.moment
        self.message_id = parsed.message_id  # names a new cart (open_cart)
        if event.type == "alias":
            assert event.user_id is not None and event.previous_id is not None
            customer = self.customer(event.user_id, ts)
            if customer.id is None:
                self.session.flush()
            self.alias(event.previous_id, customer, ts)
        else:
            customer = self.customer(event.key, ts)
            handler = _TRACK_HANDLERS.get(event.event or "") if event.type == "track" else None
            if customer.id is None and (handler is not None or event.type in ("identify", "group")):
                self.session.flush()  # a new customer's id, which the rows below point at
            if event.type == "identify":
                if event.user_id is not None and event.anonymous_id is not None:
                    self.claim_anonymous(event.anonymous_id, customer, ts)
                assert parsed.traits is not None
                self.identify(customer, parsed.traits, event, ts)
            elif event.type == "group":
                self.group(customer, event, ts)
            else:  # track, page, screen: the customer was active
                noted = self.pending_seen.get(id(customer))
                if noted is None or noted[1] < ts:
                    self.pending_seen[id(customer)] = (customer, ts)
                if handler:
                    handler(self, customer, parsed.details, ts)
        self.pending_events.append({
            "message_id": parsed.message_id, "type": event.type, "name": event.event or event.name,
            "user_id": event.key, "timestamp": ts, "payload": parsed.raw, "source": parsed.source,
            "received_at": parsed.received_at or utcnow()})
        if self.exact:
            self.write_pending()  # a refusal is met inside the event's savepoint
        self.message_ids.add(parsed.message_id)

    def customer(self, external_id: str, ts: datetime) -> Customer:
        customer = self.customers.get(external_id)
        if customer is None:
            customer = None if external_id in self.absent else customer_by_id(self.session, external_id)
            self.absent.discard(external_id)
            if customer is None:
                customer = Customer(external_id=external_id, created_at=ts)
                self.session.add(customer)
                if self.exact:
                    self.session.flush()  # else with the next rows that need it (``apply``)
            self.customers[external_id] = customer
        return customer

    def identify(self, customer: Customer, traits: Traits, event: SegmentEvent, ts: datetime) -> None:
        address = customer.email
        for name in ("email", "first_name", "last_name", "timezone", "locale"):
            value = getattr(traits, name)
            if value is not None:
                setattr(customer, name, value)
        if customer.consent_requested_at is not None and address and customer.email and \
                suppression_key(address) != suppression_key(customer.email):
            # A request is confirmed by its own address only (the link names it): ask the new one.
            customer.consent_requested_at = ts
            consent.record(self.session, customer, ConsentChangeKind.REQUESTED, "shop", at=ts,
                           request=consent.request_id(ts), detail="the address changed: asked again at the new one")
        if traits.locale is None and isinstance(event.context.get("locale"), str):
            customer.locale = event.context["locale"][:35]
        if traits.timezone is None and isinstance(event.context.get("timezone"), str):
            customer.timezone = event.context["timezone"][:64]
        if traits.created_at is not None:
            customer.created_at = _aware(traits.created_at)
        withdrawn = customer.consent_withdrawn_at
        # An opt-in dated before the customer's last withdrawal (an export replayed, a retry
        # arriving late) is history: it never undoes the unsubscribe.
        after_withdrawal = withdrawn is None or ts > _aware(withdrawn)
        because = f"identify {event.message_id or ''}".strip()  # the event a recorded change came from
        if traits.marketing_consent is True and not customer.marketing_consent and after_withdrawal:
            if traits.consent_confirmed:
                customer.marketing_consent, customer.consent_at = True, ts
                customer.consent_source = traits.consent_source or "shop (confirmed)"
                customer.consent_requested_at = customer.consent_withdrawn_at = None
                consent.record(self.session, customer, ConsentChangeKind.CONFIRMED, customer.consent_source, at=ts,
                               detail=because)
            elif customer.consent_requested_at is None:
                customer.consent_requested_at = ts  # double opt-in: the confirmation mail asks
                customer.consent_source = traits.consent_source
                consent.record(self.session, customer, ConsentChangeKind.REQUESTED, traits.consent_source or "shop",
                               at=ts, request=consent.request_id(ts), detail=because)
        elif traits.marketing_consent is False and (customer.marketing_consent or customer.consent_requested_at
                                                     or customer.consent_withdrawn_at is None):
            # A refusal counts even without an earlier consent (a merge lets it win); one
            # repeated on every identify is recorded once.
            consent.withdraw(self.session, customer, "shop", at=ts, detail="identify: marketing_consent false",
                             suppress=False)
        if customer.email:
            self.addresses.add(customer.email.lower())

    def group(self, customer: Customer, event: SegmentEvent, ts: datetime) -> None:
        assert event.group_id is not None
        membership = self.session.get(GroupMembership, (customer.id, event.group_id))
        if membership is None:
            assert customer.id is not None
            self.session.add(GroupMembership(customer_id=customer.id, group_id=event.group_id, traits=event.traits,
                                             updated_at=ts))
        elif ts >= membership.updated_at:  # events may arrive out of order: the newest traits win
            membership.traits, membership.updated_at = {**membership.traits, **event.traits}, ts

    # -- identities -------------------------------------------------------------------
    def alias(self, previous_id: str, customer: Customer, ts: datetime) -> None:
        """``previous_id`` is ``customer`` too: merge its record, or remember the link."""
        if previous_id == customer.external_id:
            return
        previous = customer_by_id(self.session, previous_id)
        if previous is None:
            assert customer.id is not None
            self.session.add(CustomerAlias(external_id=previous_id, customer_id=customer.id, created_at=ts))
            self.customers[previous_id] = customer
        elif previous.id != customer.id:
            self.merge(previous, customer, ts)

    def claim_anonymous(self, anonymous_id: str, customer: Customer, ts: datetime) -> None:
        """An identify with both ids: the guest behind ``anonymous_id`` is this customer,
        unless another account claimed that id first (a shared browser)."""
        guest = self.session.execute(
            select(Customer).where(col(Customer.external_id) == anonymous_id)
        ).scalar_one_or_none()
        if guest is not None:
            if guest.id != customer.id:
                self.merge(guest, customer, ts)
        elif self.session.get(CustomerAlias, anonymous_id) is None:
            self.alias(anonymous_id, customer, ts)

    def merge(self, previous: Customer, customer: Customer, ts: datetime) -> None:
        """Fold ``previous`` into ``customer``: everything that points at it, its traits and
        its consent; its id becomes an alias. Inside the event's savepoint: all or nothing."""
        session = self.session
        self.write_pending()  # what the merge weighs and moves
        newer, older = self._newer_first(previous, customer)
        previous_id, gone, kept = previous.external_id, previous.id, customer.id
        for table, column in _customer_references():
            keys = [c for c in table.primary_key.columns if c is not column]
            if column.primary_key and keys:  # e.g. one opt-out per category: the survivor's row stays
                other = table.alias()
                twin = select(other.c[column.name]).where(
                    other.c[column.name] == kept, *(other.c[k.name] == table.c[k.name] for k in keys)).exists()
                session.execute(delete(table).where(column == gone, twin))
            session.execute(update(table).where(column == gone).values({column.name: kept}))
        values = {name: getattr(newer, name) if getattr(newer, name) is not None else getattr(older, name)
                  for name in TRAITS}
        # The column's default "en" means "never said": a language the other record knows beats it.
        values["locale"] = newer.locale if newer.locale != "en" or older.locale == "en" else older.locale
        values["created_at"] = min(previous.created_at, customer.created_at)
        values["last_seen_at"] = max(filter(None, [previous.last_seen_at, customer.last_seen_at]), default=None)
        values.update(self._merged_consent(previous, customer))
        session.expire_all()  # the bulk updates moved rows under the objects the session holds
        self.carts.clear()  # … carts among them
        session.delete(session.get(Customer, gone))
        session.flush()
        for name, value in values.items():
            setattr(customer, name, value)
        assert kept is not None
        session.add(CustomerAlias(external_id=previous_id, customer_id=kept, created_at=ts))
        session.flush()
        for key, cached in list(self.customers.items()):
            if cached is previous or key == previous_id:
                self.customers[key] = customer
        if customer.email:
            self.addresses.add(customer.email.lower())
        self.merged += 1

    def _newer_first(self, a: Customer, b: Customer) -> tuple[Customer, Customer]:
        """The record identified last (by its events' timestamps, aliases included) first; ``b`` on a tie."""
        latest = {}
        for customer in (a, b):
            ids = [customer.external_id, *self.session.execute(
                select(col(CustomerAlias.external_id)).where(col(CustomerAlias.customer_id) == customer.id)).scalars()]
            latest[customer.id] = self.session.execute(
                select(func.max(Event.timestamp)).where(col(Event.type) == "identify", col(Event.user_id).in_(ids))
            ).scalar_one_or_none()
        at_a, at_b = latest[a.id], latest[b.id]
        return (a, b) if at_a is not None and (at_b is None or _aware(at_a) > _aware(at_b)) else (b, a)

    def _merged_consent(self, a: Customer, b: Customer) -> dict[str, Any]:
        """A withdrawal on either record wins over any consent (suppressions are per address
        and hold anyway); else a confirmed consent holds; else the earliest pending request."""
        withdrawn = [moment for c in (a, b) if (moment := self._withdrawn_at(c)) is not None]
        if withdrawn:
            return {"marketing_consent": False, "consent_at": None, "consent_requested_at": None,
                    "consent_withdrawn_at": max(withdrawn)}
        confirmed = sorted((c for c in (a, b) if c.marketing_consent and c.consent_at),
                           key=lambda c: cast(datetime, c.consent_at))
        if confirmed:
            first = confirmed[0]
            return {"marketing_consent": True, "consent_at": first.consent_at, "consent_source": first.consent_source,
                    "consent_requested_at": None, "consent_withdrawn_at": None}
        requested = sorted((c for c in (a, b) if c.consent_requested_at),
                           key=lambda c: cast(datetime, c.consent_requested_at))
        if requested:
            return {"marketing_consent": False, "consent_at": None, "consent_withdrawn_at": None,
                    "consent_requested_at": requested[0].consent_requested_at,
                    "consent_source": requested[0].consent_source}
        return {"marketing_consent": False, "consent_at": None, "consent_requested_at": None}

    def _withdrawn_at(self, customer: Customer) -> datetime | None:
        """When this record's consent was withdrawn, if no confirmed consent came after it.
        An unsubscribe in ``lifecycle web`` leaves only its suppression: that counts too."""
        moment = customer.consent_withdrawn_at
        if customer.email:
            suppression = self.session.get(Suppression, suppression_key(customer.email))
            if suppression is not None and suppression.reason == SuppressionReason.UNSUBSCRIBED:
                moment = max(filter(None, [moment, _aware(suppression.created_at)]))
        if moment is None:
            return None
        if customer.marketing_consent and customer.consent_at and _aware(customer.consent_at) > _aware(moment):
            return None
        return _aware(moment)

    # -- track events ---------------------------------------------------------------
    def open_cart(self, customer: Customer, cart_id: str | None, ts: datetime) -> Cart:
        cart = self.carts.named(cart_id) if cart_id else self.carts.latest_open(customer)
        if cart is None:
            assert customer.id is not None
            # A cart the shop did not name is named by its moment and its event: unique by
            # construction (another at the same moment, once ordered, keeps its name).
            name = cart_id or (f"{customer.external_id[:200]}/{ts:%Y%m%dT%H%M%S%f}/"
                               f"{hashlib.sha256(self.message_id.encode()).hexdigest()[:10]}")
            cart = Cart(external_id=name, customer_id=customer.id, created_at=ts, updated_at=ts)
            self.session.add(cart)  # written with the next flush; its items point at it meanwhile
            self.carts.added(cart)
        elif cart.customer_id != customer.id:
            raise ValueError(f"cart {cart_id!r} belongs to another customer")
        return cart

    def product_added(self, customer: Customer, product: Product, ts: datetime) -> None:
        cart = self.open_cart(customer, product.cart_id, ts)
        items = self.carts.items_of(cart)
        item = items.get(product.product_id)
        if item is None:
            # ``cart``, not ``cart_id``: a new cart gets its id when both are written
            item = CartItem(cart=cart, product_id=product.product_id, quantity=0)  # type: ignore[call-arg]
        if item.quantity + product.quantity > MAX_QUANTITY:
            raise ValueError(f"properties.quantity: the cart would hold {item.quantity + product.quantity} of "
                             f"product {product.product_id!r}, more than {MAX_QUANTITY}")
        item.quantity += product.quantity
        item.name = product.name or item.name
        item.price_cents = _cents(product.price)
        item.url, item.image_url = product.url or item.url, product.image_url or item.image_url
        self.session.add(item)
        items[product.product_id] = item
        cart.updated_at = max(cart.updated_at, ts)
        self.carts.reopened(cart)

    def product_removed(self, customer: Customer, product: Product, ts: datetime) -> None:
        cart = self.open_cart(customer, product.cart_id, ts)
        items = self.carts.items_of(cart)
        item = items.get(product.product_id)
        if item is not None:
            item.quantity -= product.quantity
            if item.quantity <= 0:
                if item in self.session.new:  # added in this group, never written
                    self.session.expunge(item)
                else:
                    self.session.delete(item)
                    self.session.flush()  # before a new item for the product is inserted (a unique key)
                del items[product.product_id]
            else:
                self.session.add(item)
        cart.updated_at = max(cart.updated_at, ts)

    def order_completed(self, customer: Customer, order: OrderCompleted, ts: datetime) -> None:
        if self.orders.exists(order.order_id):
            raise ValueError(f"order {order.order_id!r} was already loaded from another event")
        assert customer.id is not None
        amount = order.total if order.total is not None else order.revenue
        self.session.add(Order(external_id=order.order_id, customer_id=customer.id, placed_at=ts,
                               total_cents=_cents(amount or Decimal(0)), currency=order.currency.upper(),
                               products=order.products))
        self.orders.added(order.order_id)
        for cart in self.carts.open_of(customer):
            if not order.cart_id or cart.external_id == order.cart_id:
                cart.status, cart.updated_at = CART_ORDERED, max(cart.updated_at, ts)
                self.carts.ordered(cart)

    def complaint_received(self, customer: Customer, complaint: ComplaintReceived, ts: datetime) -> None:
        exists = self.session.execute(
            select(col(Complaint.id)).where(col(Complaint.external_id) == complaint.complaint_id)
        ).first()
        if exists:
            raise ValueError(f"complaint {complaint.complaint_id!r} was already loaded from another event")
        assert customer.id is not None
        self.session.add(Complaint(external_id=complaint.complaint_id, customer_id=customer.id,
                                   subject=complaint.subject, received_at=ts))

    def complaint_answered(self, customer: Customer, answer: ComplaintAnswered, ts: datetime) -> None:
        complaint = self.session.execute(
            select(Complaint).where(col(Complaint.external_id) == answer.complaint_id)
        ).scalar_one_or_none()
        if complaint is None:
            raise ValueError(f"complaint {answer.complaint_id!r} is not known")
        complaint.answered_at = ts

    def unsubscribed(self, customer: Customer, _details: None, ts: datetime) -> None:
        consent.withdraw(self.session, customer, "Unsubscribed event", at=ts)


_TRACK_HANDLERS: dict[str, Callable[[_Store, Customer, Any, datetime], None]] = {
    "Product Added": _Store.product_added,
    "Product Removed": _Store.product_removed,
    "Order Completed": _Store.order_completed,
    "Complaint Received": _Store.complaint_received,
    "Complaint Answered": _Store.complaint_answered,
    "Unsubscribed": _Store.unsubscribed,
}
