"""The tracking API's rules: Segment's HTTP API (``/v1/batch``, ``/v1/track``, …) read into
the events ``lifecycle ingest`` loads, by the same model (``flows.ingest.parse_event``).

What a request must be, as Segment's own collector has it: a write key as the user name
of HTTP basic auth (or ``writeKey`` in the body, as analytics.js sends it), a JSON body,
gzip allowed, at most 500 KB a batch and 32 KB an event. What the collector adds to each
event, as Segment's does: ``receivedAt`` (our clock), and a ``timestamp`` corrected for the
client's clock: ``receivedAt - (sentAt - originalTimestamp)``, where ``originalTimestamp``
is what the client called the event's time. Pure: the surface (``web_collect``) reads the
request and answers; nothing here touches the store.
"""

import base64
import binascii
import hashlib
import hmac
import json
import re
import zlib
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from flows.ingest import (
    DECODER,
    MAX_DEPTH,
    _BadJson,
    _Parsed,
    check_strings,
    compact_json,
    deeper_than,
    parse_event,
)

MAX_BATCH_BYTES = 500 * 1024  # Segment's limits: a request to /v1/batch …
MAX_EVENT_BYTES = 32 * 1024  # … and one event, alone or in a batch
CALLS = ("identify", "track", "page", "screen", "group", "alias")
SOURCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MIN_KEY_LENGTH = 16


class BadRequest(ValueError):
    """The request as a whole is refused (400): nothing of it is stored."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class WriteKeyError(ValueError):
    """``LIFECYCLE_WRITE_KEYS`` cannot be read; the message never quotes a key."""


@dataclass(frozen=True)
class WriteKeys:
    """Which source each write key belongs to. ``LIFECYCLE_WRITE_KEYS`` lists them as
    ``source:key`` pairs separated by commas (``backend:4f1c…,storefront:9ab2…``)."""

    sources: dict[str, str]  # key → source

    @classmethod
    def parse(cls, value: str) -> "WriteKeys":
        sources: dict[str, str] = {}
        for position, item in enumerate((part.strip() for part in value.split(",")), start=1):
            if not item:
                continue
            source, colon, key = item.partition(":")
            source, key = source.strip(), key.strip()
            if not colon or not SOURCE.fullmatch(source):
                raise WriteKeyError(f"LIFECYCLE_WRITE_KEYS: entry {position} must be SOURCE:KEY, the source "
                                    "of letters, digits, '.', '_' or '-' (such as backend:KEY)")
            if len(key) < MIN_KEY_LENGTH or not key.isascii() or not key.isprintable() or " " in key:
                raise WriteKeyError(f"LIFECYCLE_WRITE_KEYS: the key of source {source!r} must be at least "
                                    f"{MIN_KEY_LENGTH} printable ASCII characters without spaces")
            if key in sources:
                raise WriteKeyError(f"LIFECYCLE_WRITE_KEYS: sources {sources[key]!r} and {source!r} share a key; "
                                    "give each source its own, so each event says where it came from")
            if source in sources.values():
                raise WriteKeyError(f"LIFECYCLE_WRITE_KEYS: source {source!r} is listed twice")
            sources[key] = source
        return cls(sources)

    def source_of(self, key: str | None) -> str | None:
        """The source whose key this is, compared in constant time against every key."""
        found = None
        given = (key or "").encode()
        for known, source in self.sources.items():
            if hmac.compare_digest(given, known.encode()):
                found = source
        return found if key else None


def basic_user(header: str | None) -> str | None:
    """The user name of an ``Authorization: Basic`` header (the write key), if there is one."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    return decoded.partition(":")[0] or None


def decompressed(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as JSON text: gunzipped when the client says gzip, never beyond ``limit``
    bytes (a small gzip can unpack to gigabytes)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        if len(body) > limit:
            raise BadRequest("too_large", f"the body is larger than {limit // 1024} KB")
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise BadRequest("bad_encoding", f"Content-Encoding {encoding[:40]!r} is not supported (gzip or none)")
    unpacker = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        text = unpacker.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest("bad_encoding", f"the body is not valid gzip ({exc})") from None
    if len(text) > limit:
        raise BadRequest("too_large", f"the body is larger than {limit // 1024} KB unpacked")
    if not unpacker.eof:
        raise BadRequest("bad_encoding", "the gzip body is cut short")
    if unpacker.unused_data:
        raise BadRequest("bad_encoding", "the gzip body has bytes after its end")
    return text


def decoded(text: bytes) -> dict[str, Any]:
    """The body's JSON object, numbers kept exact as for ``lifecycle ingest``."""
    try:
        raw = DECODER.decode(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadRequest("invalid_json", f"the body is not UTF-8 (byte {exc.start + 1})") from None
    except json.JSONDecodeError as exc:
        raise BadRequest("invalid_json", f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
            from None
    except (_BadJson, ValueError) as exc:
        raise BadRequest("invalid_json", f"not valid JSON ({exc})") from None
    except RecursionError:
        raise BadRequest("invalid_json", f"nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(raw, dict):
        raise BadRequest("invalid_json", "the body must be a JSON object")
    return raw


@dataclass
class Received:
    """One request's events, parsed: each either ready to load or refused with its reason."""

    events: list[_Parsed]
    positions: list[int]  # the index in the request of each of ``events``
    errors: list[tuple[int, str]]  # (index, reason), in index order
    write_key: str | None  # from the body (analytics.js), when the header has none

    @property
    def count(self) -> int:
        return len(self.events) + len(self.errors)

    def attribute_to(self, source: str) -> None:
        """The source, once the body's own write key (analytics.js) has named it."""
        self.events = [replace(event, source=source) for event in self.events]


def read_body(call: str, text: bytes, source: str | None, received_at: datetime) -> Received:
    """The events of a request's (unpacked) body to ``/v1/<call>``."""
    raw = decoded(text)
    # Only an escape spells a NUL or a lone surrogate in UTF-8 JSON, and an event can only be
    # too deep if the body is: both checks per event only then (a tenth of an event's parsing).
    deep = deeper_than(raw, MAX_DEPTH + (2 if call == "batch" else 0))  # a batch's events are at level 3
    return read_request(call, raw, source, received_at, checked=b"\\u" not in text and not deep)


def read_request(call: str, raw: dict[str, Any], source: str | None, received_at: datetime,
                 checked: bool = False) -> Received:
    """The events of a request to ``/v1/<call>`` (``batch`` or one of ``CALLS``); ``checked``:
    the body is known to hold no unstorable character and no event nested too deep."""
    write_key = raw.get("writeKey") if isinstance(raw.get("writeKey"), str) else None
    if call == "batch":
        items = raw.get("batch")
        if not isinstance(items, list):
            raise BadRequest("invalid_request", "batch: required, a list of events")
        shared = {name: raw[name] for name in ("context", "integrations") if isinstance(raw.get(name), dict)}
        sent_at = raw.get("sentAt")
    else:
        items, shared, sent_at = [raw], {}, None
    received = Received([], [], [], write_key)
    for index, item in enumerate(items):
        try:
            received.events.append(_event(call, item, shared, sent_at, source, received_at, checked))
            received.positions.append(index)
        except ValueError as exc:
            received.errors.append((index, str(exc)))
        except OverflowError:  # the skew correction left the calendar: a time no client meant
            received.errors.append((index, "sentAt, timestamp: too far apart to correct the client's clock by"))
    return received


def _event(call: str, item: Any, shared: dict[str, Any], sent_at: Any, source: str | None,
           received_at: datetime, checked: bool) -> _Parsed:
    if not isinstance(item, dict):
        raise ValueError("expected a JSON object")
    item = {**shared, **item}
    item.pop("writeKey", None)  # a secret: never stored
    if call != "batch":
        item["type"] = call  # the endpoint says what the call is, as Segment's does
    if not checked:  # before its size is measured: a lone surrogate has no UTF-8 to measure
        if deeper_than(item, MAX_DEPTH):
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        check_strings(item)
    size = len(compact_json(item).encode())
    if not item.get("messageId"):  # from the event as the client made it, so that its retry is the same event
        made = {name: value for name, value in item.items() if name not in ("sentAt", "receivedAt")}
        item["messageId"] = "sha256:" + hashlib.sha256(json.dumps(
            made, separators=(",", ":"), sort_keys=True, default=str).encode()).hexdigest()
    if size > MAX_EVENT_BYTES:
        raise ValueError(f"the event is {size:,} bytes; at most {MAX_EVENT_BYTES // 1024} KB "
                         f"({MAX_EVENT_BYTES:,} bytes)")
    corrected(item, item.get("sentAt", sent_at), received_at)
    return parse_event(item, source, received_at)


def corrected(item: dict[str, Any], sent_at: Any, received_at: datetime) -> None:
    """Segment's clock-skew correction, in place: ``receivedAt`` is ours; with the client's
    ``sentAt``, ``timestamp`` becomes ``receivedAt - (sentAt - originalTimestamp)`` and the
    client's own time is kept as ``originalTimestamp``. Without ``sentAt`` the client's
    ``timestamp`` stands; without any time, the event happened when it arrived."""
    item["receivedAt"] = _iso(received_at)
    original = item.get("originalTimestamp") or item.get("timestamp")
    if sent_at is None or original is None:
        if not item.get("timestamp"):  # absent, null or empty: the client's own time, else the arrival
            item["timestamp"] = original or _iso(received_at)
        return
    sent, happened = _instant("sentAt", sent_at), _instant("timestamp", original)
    item["originalTimestamp"], item["sentAt"] = original, sent_at
    item["timestamp"] = _iso(received_at - (sent - happened))


def _instant(name: str, value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"{name}: an ISO 8601 time with a time zone, such as 2026-03-02T10:00:00Z")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name}: {value[:40]!r} is not an ISO 8601 time") from None
    if moment.utcoffset() is None:
        raise ValueError(f"{name}: no time zone in {value[:40]!r} (add Z or an offset such as +01:00)")
    return moment


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
