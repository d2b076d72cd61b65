"""The tracking API's rules (``flows.collect``), without a server: write keys, basic auth,
bodies (gzip, limits), and how a request becomes events, clock skew corrected as Segment does."""

import base64
import gzip
import json
import time
import tracemalloc
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flows.collect import (
    MAX_BATCH_BYTES,
    MAX_EVENT_BYTES,
    BadRequest,
    Received,
    WriteKeyError,
    WriteKeys,
    basic_user,
    decoded,
    decompressed,
    read_body,
    read_request,
)
from flows.ingest import parse_line

BACKEND_KEY = "bk_0123456789abcdef"
SHOP_KEY = "sk_fedcba9876543210"
# Our clock when a request arrives: a moment in the past, so no bound "a day ahead" is near.
RECEIVED = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def track(message_id: str, **fields: Any) -> dict[str, Any]:
    return {"type": "track", "userId": "u1", "event": "Product Viewed", "messageId": message_id,
            "timestamp": iso(RECEIVED - timedelta(minutes=1)), **fields}


# -- write keys ---------------------------------------------------------------------------


def test_write_keys_name_one_source_per_key() -> None:
    keys = WriteKeys.parse(f" backend:{BACKEND_KEY} , storefront:{SHOP_KEY},")
    assert keys.sources == {BACKEND_KEY: "backend", SHOP_KEY: "storefront"}
    assert keys.source_of(BACKEND_KEY) == "backend" and keys.source_of(SHOP_KEY) == "storefront"


def test_an_unknown_a_partial_or_an_empty_key_has_no_source() -> None:
    keys = WriteKeys.parse(f"backend:{BACKEND_KEY}")
    for key in ("", None, BACKEND_KEY[:-1], BACKEND_KEY + "x", BACKEND_KEY.upper(), SHOP_KEY):
        assert keys.source_of(key) is None, key
    assert WriteKeys.parse("").source_of(BACKEND_KEY) is None  # unset: nothing is accepted


@pytest.mark.parametrize("value", [
    BACKEND_KEY,  # no source
    f":{BACKEND_KEY}",  # an empty source
    f"back end:{BACKEND_KEY}",  # a source with a space
    f"-backend:{BACKEND_KEY}",  # starting with punctuation
    f"{'s' * 65}:{BACKEND_KEY}",  # a source too long for the events' column
    "backend:short-key",  # a key too short to be a secret
    "backend:",  # no key
    "backend:bk_0123456789abcdéf",  # not ASCII
    "backend:bk_0123456789 abcdef",  # a space inside
    "backend:bk_0123456789\tabcdef",  # not printable
    f"backend:{BACKEND_KEY},storefront:{BACKEND_KEY}",  # one key for two sources
    f"backend:{BACKEND_KEY},backend:{SHOP_KEY}",  # a source twice
])
def test_malformed_write_keys_are_refused_by_a_message_that_never_quotes_a_key(value: str) -> None:
    with pytest.raises(WriteKeyError) as raised:
        WriteKeys.parse(value)
    message = str(raised.value)
    assert "LIFECYCLE_WRITE_KEYS" in message
    for secret in (BACKEND_KEY, SHOP_KEY, "short-key", "0123456789"):
        assert secret not in message, message


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_the_write_key_is_the_basic_auth_user_name() -> None:
    assert basic_user(basic(BACKEND_KEY)) == BACKEND_KEY  # as Segment's libraries send it
    assert basic_user(basic(BACKEND_KEY, "ignored")) == BACKEND_KEY
    assert basic_user(basic(BACKEND_KEY).replace("Basic", "basic")) == BACKEND_KEY
    for header in (None, "", "Basic", "Bearer " + BACKEND_KEY, basic("", "password"), "Basic not*base64",
                   "Basic " + base64.b64encode(b"\xff\xfe:").decode()):
        assert basic_user(header) is None, header


# -- bodies -------------------------------------------------------------------------------


def test_a_gzip_body_is_unpacked_and_a_plain_one_passed_as_it_is() -> None:
    text = json.dumps({"batch": [track("m1")]}).encode()
    assert decompressed(gzip.compress(text), "gzip", MAX_BATCH_BYTES) == text
    assert decompressed(gzip.compress(text), " GZIP ", MAX_BATCH_BYTES) == text
    assert decompressed(text, None, MAX_BATCH_BYTES) == text
    assert decompressed(text, "identity", len(text)) == text  # the limit itself is allowed


def test_a_plain_body_over_the_limit_is_too_large() -> None:
    with pytest.raises(BadRequest) as raised:
        decompressed(b"x" * (MAX_BATCH_BYTES + 1), None, MAX_BATCH_BYTES)
    assert raised.value.code == "too_large" and "500 KB" in str(raised.value)


def zeros_gzip(size: int) -> bytes:
    """``size`` zero bytes, gzipped (about a thousandth of it), made without holding them."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    return b"".join([*(packer.compress(chunk) for _ in range(size >> 20)), packer.flush()])


def test_a_gzip_bomb_is_refused_without_unpacking_it() -> None:
    """64 MB of zeros in 64 KB of gzip: refused as too large, having unpacked no more than the
    limit (memory stays near 500 KB, not 64 MB)."""
    bomb = zeros_gzip(64 << 20)
    assert len(bomb) < MAX_BATCH_BYTES
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(BadRequest) as raised:
            decompressed(bomb, "gzip", MAX_BATCH_BYTES)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert raised.value.code == "too_large" and "unpacked" in str(raised.value)
    assert peak < 4 * MAX_BATCH_BYTES, peak
    assert time.perf_counter() - started < 2


# Named by ``why``, never by the bytes: a gzip header holds the moment it was made, and the
# events theirs, so bytes made at collection differ between two workers a second apart.
BAD_GZIP = [
    (b'{"batch": []}', "not gzip at all"),
    (b"\x1f\x8b\x08\x00" + b"\x00" * 6 + b"garbage!", "a gzip header, then garbage"),
    (gzip.compress(json.dumps({"batch": [track("m1")]}).encode(), mtime=0)[:-6], "its checksum cut off"),
    (gzip.compress(json.dumps({"batch": [track(f"m{n}") for n in range(50)]}).encode(), mtime=0)[:200],
     "cut in half"),
    (b"", "empty"),
]


@pytest.mark.parametrize(("body", "why"), BAD_GZIP, ids=[why for _, why in BAD_GZIP])
def test_a_corrupt_or_truncated_gzip_body_is_a_bad_encoding(body: bytes, why: str) -> None:
    with pytest.raises(BadRequest) as raised:
        decompressed(body, "gzip", MAX_BATCH_BYTES)
    assert raised.value.code == "bad_encoding", why


def test_an_encoding_other_than_gzip_is_refused_and_not_echoed_at_length() -> None:
    for encoding in ("br", "deflate", "zstd, gzip", "x" * 500):
        with pytest.raises(BadRequest) as raised:
            decompressed(b"{}", encoding, MAX_BATCH_BYTES)
        assert raised.value.code == "bad_encoding"
        assert len(str(raised.value)) < 120


def test_malformed_json_is_invalid_json_with_its_position() -> None:
    with pytest.raises(BadRequest) as raised:
        decoded(b'{"batch": [\n  {"type": "track",}\n]}')  # the "}" where a name should be
    assert raised.value.code == "invalid_json"
    assert "line 2 column 20" in str(raised.value)


@pytest.mark.parametrize(("body", "said"), [
    (b"[]", "must be a JSON object"),
    (b'"batch"', "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b'{"a": NaN}', "NaN is not a JSON number"),
    (b'{"a": 1e400}', "beyond the range"),
    (b'{"a": "\xff"}', "not UTF-8 (byte 8)"),
    (b"[" * 100_000, "nested deeper than"),
    (b"", "not valid JSON"),
])
def test_a_body_that_is_no_json_object_is_invalid_json(body: bytes, said: str) -> None:
    with pytest.raises(BadRequest) as raised:
        decoded(body)
    assert raised.value.code == "invalid_json" and said in str(raised.value), str(raised.value)


def test_amounts_are_read_exactly_as_ingest_reads_them() -> None:
    order = {"type": "track", "userId": "u1", "event": "Order Completed", "messageId": "m1",
             "timestamp": iso(RECEIVED), "properties": {"order_id": "o1", "total": 0.285 * 100}}
    body = json.dumps({"batch": [order]}).replace("28.499999999999996", "28.49").encode()
    [event] = read_body("batch", body, "backend", RECEIVED).events
    assert str(event.details.total) == "28.49"  # type: ignore[union-attr]


# -- requests into events -------------------------------------------------------------------


def test_a_bad_event_in_a_batch_is_refused_by_its_index_and_the_others_are_read() -> None:
    batch = [track("m0"), track("m1"), track("m2", userId=None), track("m3"), "not an event"]
    received = read_request("batch", {"batch": batch}, "backend", RECEIVED)
    assert [event.message_id for event in received.events] == ["m0", "m1", "m3"]
    assert received.positions == [0, 1, 3]
    assert [index for index, _ in received.errors] == [2, 4]
    assert received.errors[0][1].startswith("userId: required, or anonymousId")
    assert received.errors[1][1] == "expected a JSON object"
    assert received.count == 5
    assert all(event.source == "backend" and event.received_at == RECEIVED for event in received.events)


def test_a_batch_without_a_list_of_events_is_refused_whole() -> None:
    for raw in ({}, {"batch": {"type": "track"}}, {"batch": "[]"}):
        with pytest.raises(BadRequest) as raised:
            read_request("batch", raw, "backend", RECEIVED)
        assert raised.value.code == "invalid_request"


def test_the_batchs_own_context_is_each_events_unless_it_has_its_own() -> None:
    context = {"library": {"name": "analytics-python", "version": "2.4.0"}, "locale": "de-DE"}
    mine = {"locale": "fr-FR"}
    raw = {"batch": [track("m1"), track("m2", context=mine)], "context": context, "integrations": {"All": True}}
    first, second = read_request("batch", raw, "backend", RECEIVED).events
    assert first.raw["context"] == context and first.event.context == context
    assert first.raw["integrations"] == {"All": True}
    assert second.raw["context"] == mine


def test_a_write_key_in_the_body_is_returned_and_never_stored() -> None:
    raw = {"batch": [track("m1", writeKey=SHOP_KEY)], "writeKey": BACKEND_KEY}
    received = read_request("batch", raw, None, RECEIVED)
    assert received.write_key == BACKEND_KEY
    assert "writeKey" not in received.events[0].raw
    single = read_request("track", track("m2", writeKey=SHOP_KEY), None, RECEIVED)
    assert single.write_key == SHOP_KEY and "writeKey" not in single.events[0].raw


def test_a_single_call_is_the_type_its_endpoint_says() -> None:
    body = {"userId": "u1", "messageId": "m1", "timestamp": iso(RECEIVED), "traits": {"email": "a@example.de"}}
    [event] = read_request("identify", {**body, "type": "track"}, "backend", RECEIVED).events
    assert event.event.type == "identify" and event.raw["type"] == "identify"
    assert event.traits is not None and event.traits.email == "a@example.de"
    alias = read_request("alias", {"userId": "u1", "previousId": "anon-1", "timestamp": iso(RECEIVED)},
                         "backend", RECEIVED)
    assert alias.events[0].event.type == "alias" and alias.events[0].event.previous_id == "anon-1"


def test_an_event_over_32_kb_in_a_batch_is_refused_by_its_index() -> None:
    big = track("m1", properties={"note": "x" * MAX_EVENT_BYTES})
    just = track("m2")
    just["properties"] = {"note": "x" * (MAX_EVENT_BYTES - len(json.dumps(just, separators=(",", ":"))) - 40)}
    received = read_request("batch", {"batch": [track("m0"), big, just]}, "backend", RECEIVED)
    assert [event.message_id for event in received.events] == ["m0", "m2"]
    [(index, reason)] = received.errors
    assert index == 1 and "at most 32 KB (32,768 bytes)" in reason, reason


@pytest.mark.parametrize("number", [12345, 123456789012345678901234], ids=["64-bit", "beyond 64 bits"])
def test_an_event_is_measured_in_utf_8_whatever_numbers_it_holds(number: int) -> None:
    """18,000 bytes of umlauts are 18 KB however the event's numbers are written out (an integer
    beyond 64 bits is serialised another way): under the limit, never counted as \\u escapes."""
    event = track("m1", properties={"order_number": number, "note": "ü" * 9000})
    received = read_request("batch", {"batch": [event]}, "backend", RECEIVED)
    assert received.errors == [] and len(received.events) == 1


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = {"x": value}
    return value


@pytest.mark.parametrize("fast", [False, True], ids=["walked", "from the body"])
def test_an_event_nested_too_deep_or_holding_a_nul_is_refused_by_its_index(fast: bool) -> None:
    """The same refusals whether each event is walked or the body shows it needs no walk."""
    batch = [track("m0", properties=nested(31)), track("m1", properties=nested(32)),  # 32 levels, 33
             track("m2", properties={"name": "a\x00b"}), track("m3")]
    received = read_events(batch, fast)
    assert [event.message_id for event in received.events] == ["m0", "m3"]
    assert received.errors == [
        (1, "nested deeper than 32 levels"),
        (2, "properties.name: a NUL character (\\u0000), which the store cannot hold"),
    ]


def read_events(batch: list[Any], fast: bool) -> Received:
    if fast:
        return read_body("batch", json.dumps({"batch": batch}).encode(), "backend", RECEIVED)
    return read_request("batch", {"batch": batch}, "backend", RECEIVED)


@pytest.mark.parametrize("fast", [False, True], ids=["walked", "from the body"])
def test_a_lone_surrogate_is_refused_by_its_index_with_ingests_located_reason(fast: bool) -> None:
    event = track("m1", properties={"name": "a\ud800b"})
    with pytest.raises(ValueError) as by_ingest:
        parse_line(json.dumps(event))
    received = read_events([track("m0"), event], fast)
    assert received.errors == [(1, str(by_ingest.value))]
    assert str(by_ingest.value) == "not valid Unicode (a lone surrogate \\ud800 in properties.name)"


# -- clock skew -----------------------------------------------------------------------------


@pytest.mark.parametrize("skew", [timedelta(days=2), timedelta(hours=-3), timedelta(0)],
                         ids=["2 days ahead", "3 hours behind", "right"])
@pytest.mark.parametrize("field", ["timestamp", "originalTimestamp"])
def test_a_clients_clock_skew_is_corrected_by_its_sent_at(skew: timedelta, field: str) -> None:
    """The client's clock is off by ``skew``; it stamps the event and the batch by that clock.
    Stored: the true moment (our receipt minus how long the event waited in the client);
    the client's own stamp kept as originalTimestamp."""
    happened = RECEIVED - timedelta(seconds=42, milliseconds=250)  # the truth
    client_time, client_sent = iso(happened + skew), iso(RECEIVED + skew)  # what its clock said
    raw = {"batch": [track("m1", **{"timestamp": None, field: client_time})], "sentAt": client_sent}
    [event] = read_request("batch", raw, "backend", RECEIVED).events
    assert event.event.timestamp == happened and event.event.moment == happened
    assert event.raw["originalTimestamp"] == client_time
    assert event.raw["receivedAt"] == iso(RECEIVED) and event.raw["sentAt"] == client_sent


def test_an_events_own_sent_at_corrects_it() -> None:
    happened = RECEIVED - timedelta(seconds=5)
    skew = timedelta(hours=7)
    raw = {"batch": [track("m1", timestamp=iso(happened + skew), sentAt=iso(RECEIVED + skew))],
           "sentAt": iso(RECEIVED)}
    assert read_request("batch", raw, "backend", RECEIVED).events[0].event.timestamp == happened


@given(skew=st.integers(-30 * 86_400_000, 30 * 86_400_000), delay=st.integers(0, 7 * 86_400_000))
def test_corrected_time_is_receipt_minus_the_delay_exactly(skew: int, delay: int) -> None:
    """Whatever the client's clock (a month either way) and however long it held the event."""
    client_now = RECEIVED + timedelta(milliseconds=skew)
    raw = {"batch": [track("m1", timestamp=iso(client_now - timedelta(milliseconds=delay)))],
           "sentAt": iso(client_now)}
    [event] = read_request("batch", raw, "backend", RECEIVED).events
    assert event.event.timestamp == RECEIVED - timedelta(milliseconds=delay)


def test_without_sent_at_the_clients_timestamp_stands() -> None:
    stamped = iso(RECEIVED - timedelta(hours=5))
    [event] = read_request("batch", {"batch": [track("m1", timestamp=stamped)]}, "backend", RECEIVED).events
    assert event.raw["timestamp"] == stamped and "originalTimestamp" not in event.raw
    assert event.event.timestamp == RECEIVED - timedelta(hours=5)
    assert event.raw["receivedAt"] == iso(RECEIVED) and event.received_at == RECEIVED


def test_an_event_without_any_time_happened_when_it_arrived() -> None:
    timeless = track("m1")
    del timeless["timestamp"]
    for raw in (timeless, {**timeless, "timestamp": None}, {**timeless, "timestamp": ""}):
        [event] = read_request("track", raw, "backend", RECEIVED).events
        assert event.event.moment == RECEIVED


def test_without_sent_at_a_clock_a_day_ahead_is_refused_as_ingest_would() -> None:
    ahead = iso(datetime.now(UTC) + timedelta(days=2))
    received = read_request("batch", {"batch": [track("m1", timestamp=ahead)]}, "backend", RECEIVED)
    assert received.errors[0][0] == 0 and "more than a day in the future" in received.errors[0][1]


@pytest.mark.parametrize(("sent_at", "said"), [
    ("yesterday", "sentAt: 'yesterday' is not an ISO 8601 time"),
    ("2026-03-02T10:00:00", "sentAt: no time zone"),
    (1772445600, "sentAt: an ISO 8601 time with a time zone"),
])
def test_an_unreadable_sent_at_refuses_its_events_by_index(sent_at: Any, said: str) -> None:
    received = read_request("batch", {"batch": [track("m1"), track("m2")], "sentAt": sent_at}, "backend",
                            RECEIVED)
    assert received.events == [] and [index for index, _ in received.errors] == [0, 1]
    assert all(reason.startswith(said) for _, reason in received.errors), received.errors


def test_a_skew_correction_beyond_the_calendar_refuses_that_event_only() -> None:
    """A sentAt and a timestamp millennia apart: the corrected time would leave the calendar.
    That event is refused by its index; the request's others stand (a retry could never help it)."""
    far = track("m1", timestamp="0001-01-01T00:00:00Z")
    received = read_request("batch", {"batch": [track("m0", sentAt=iso(RECEIVED)), far],
                                      "sentAt": "9999-12-31T23:59:59Z"},
                            "backend", RECEIVED)
    assert [event.message_id for event in received.events] == ["m0"]
    assert [index for index, _ in received.errors] == [1]
    assert "too far apart" in received.errors[0][1]


def test_bytes_after_the_end_of_a_gzip_body_are_refused() -> None:
    with pytest.raises(BadRequest) as refused:
        decompressed(gzip.compress(b'{"batch": []}') + b"trailing", "gzip", 1000)
    assert refused.value.code == "bad_encoding"
