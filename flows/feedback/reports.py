"""Bounces and complaints that arrive after the send, read and matched to their sends.

Most relays accept at RCPT and report failures later: as a delivery status notification
(RFC 3464, ``multipart/report; report-type=delivery-status``) mailed to the Return-Path,
or as an abuse report from a feedback loop (ARF, RFC 5965,
``report-type=feedback-report``). Parsing is pure (bytes → ``Found``); matching looks
each one up in the ledger; ``flows.feedback.bounces.record`` stores it once and suppresses.

A report is matched to its send by the VERP token in the address it was mailed to (or
in the returned message's Return-Path, or ARF's ``Original-Mail-From``): the token
carries the send's Message-ID digest and a signature, so a forged or altered token
matches nothing. Without a genuine token, the original ``Message-ID`` is looked up.

The readers below (files, a Maildir, an IMAP folder) hand each message's bytes over
and mark it processed only after it was recorded; recording is idempotent, so a crash
in between only means the message is read again.
"""

import hashlib
import imaplib
import json
import os
import re
import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import Message
from email.parser import HeaderParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy import Connection, Engine, select
from sqlmodel import col

from flows.content.links import send_digest, verp_digests
from flows.feedback.bounces import Recorded, Report, SoftBounceRule, Verdict, classify, record
from models import FeedbackKind, Send, suppression_key
from models.ledger import message_digest
from models.types import utcnow

DSN, ARF = "dsn", "arf"
# Where a bounce's own envelope recipient (our VERP address) shows up once delivered.
_ENVELOPE_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "X-Delivered-To", "To")
_COMPLAINT_TYPES = frozenset({"abuse", "fraud"})  # RFC 5965 §7.3; not-spam, virus, auth-failure are no complaint
_SMTP_CODE = re.compile(r"(?:^|[\s;])([245]\d\d)[\s-]")


class UnreadableReport(ValueError):
    """A report that cannot be read: the message says what is wrong, the caller names the file."""


@dataclass(frozen=True, slots=True)
class Found:
    """One recipient's outcome in one report, before it is matched to a send."""

    report_id: str
    email: str  # "" when a feedback loop redacted it (the VERP token still names the send)
    action: str  # failed, delayed, delivered, relayed, expanded, or complaint
    source: str  # dsn or arf
    occurred_at: datetime
    status: str = ""
    diagnostic: str = ""
    digests: tuple[str, ...] = ()  # sends named by genuine VERP tokens
    message_id: str | None = None
    verdict: Verdict | None = None  # None: not a bounce or complaint (delayed, delivered, not-spam)


@dataclass
class Tally:
    """What reading some input did, for the per-file summary."""

    reports: int = 0  # bounces and complaints read (delayed notices not included)
    new: int = 0
    duplicates: int = 0
    unmatched: int = 0  # no send found by token or Message-ID
    delayed: int = 0  # ``Action: delayed``: counted, never recorded (the relay is still trying)
    ignored: int = 0  # not a report at all, or ``delivered``/``relayed``, or a non-complaint feedback type
    suppressed: dict[str, str] = field(default_factory=dict)

    def add(self, other: "Tally") -> None:
        for name in ("reports", "new", "duplicates", "unmatched", "delayed", "ignored"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.suppressed.update(other.suppressed)


# -- parsing: bytes → Found ---------------------------------------------------------------

def _clean(value: object) -> str:
    return " ".join(str(value or "").split())


def _date(value: object) -> datetime | None:
    try:
        moment = parsedate_to_datetime(_clean(value))
    except (TypeError, ValueError, IndexError):
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _address(value: object) -> str:
    """``rfc822; <User@Example.com>`` → ``user@example.com`` (RFC 3464's address-type; prefix)."""
    text = _clean(value)
    kind, semi, rest = text.partition(";")
    if semi and kind.strip().lower() != "rfc822":
        return ""
    address = (rest if semi else text).strip().strip("<>").strip()
    return suppression_key(address) if "@" in address else ""


def _message_id(value: object) -> str | None:
    text = _clean(value)
    match = re.search(r"<[^<>\s]+>", text)
    if match:
        return match.group(0)
    return f"<{text}>" if text and "@" in text and " " not in text else None


def _field_blocks(part: Message) -> list[Message]:
    """The field groups of a ``message/delivery-status`` or ``message/feedback-report`` part.

    Python's parser splits delivery-status into blocks but reads other ``message/*`` types
    as one embedded message; a part sent as ``text/plain`` is parsed here the same way.
    """
    payload = part.get_payload()
    if isinstance(payload, list):
        return [block for block in payload if isinstance(block, Message)]
    text = payload if isinstance(payload, str) else ""
    if part.get("Content-Transfer-Encoding", "").lower() in ("base64", "quoted-printable"):
        raw = part.get_payload(decode=True)
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else text
    blocks = re.split(r"\r?\n[ \t]*\r?\n", text.strip())
    return [HeaderParser().parsestr(block) for block in blocks if block.strip()]


def _returned_headers(report: Message) -> Message | None:
    """The original message's headers, from a ``message/rfc822`` or ``text/rfc822-headers`` part."""
    for part in report.walk():
        content_type = part.get_content_type()
        if content_type == "message/rfc822":
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                return inner[0]
        if content_type in ("text/rfc822-headers", "message/rfc822-headers"):
            raw = part.get_payload(decode=True)
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(part.get_payload())
            return HeaderParser().parsestr(text.lstrip())
    return None


def _report_id(source: str, report: Message, data: bytes, recipient: str) -> str:
    """Stable for the same report: its own Message-ID (else a hash of its bytes) and the recipient."""
    own = _message_id(report.get("Message-ID")) or "sha256:" + hashlib.sha256(data).hexdigest()
    return f"{source}:" + hashlib.sha256(f"{own}\n{recipient}".encode()).hexdigest()[:48]


def _tokens(secret: str, *texts: object) -> tuple[str, ...]:
    return tuple(dict.fromkeys(d for text in texts if text for d in verp_digests(secret, str(text))))


def parse(data: bytes, secret: str) -> tuple[str | None, list[Found]]:
    """The report's type (``dsn``, ``arf`` or None for a message that is neither) and what it says.

    Raises ``UnreadableReport`` for a report that claims to be one but cannot be read,
    whatever is wrong with it: anyone can mail the bounce address, and one odd message
    must not stop a mailbox's processing at the same place every time.
    """
    try:
        return _parse(data, secret)
    except UnreadableReport:
        raise
    except Exception as exc:  # noqa: BLE001 - attacker-controlled MIME: any failure is this message's
        raise UnreadableReport(f"cannot be read as a report ({type(exc).__name__}: {exc})") from None


def _parse(data: bytes, secret: str) -> tuple[str | None, list[Found]]:
    if not data.strip():
        raise UnreadableReport("empty input, not a mail message")
    report = message_from_bytes(data, policy=policy.compat32)
    if not report.keys():
        raise UnreadableReport("no mail headers: not an RFC 5322 message")
    parts = {part.get_content_type(): part for part in reversed(list(report.walk()))}
    envelope = [report.get_all(name, []) for name in _ENVELOPE_HEADERS]
    original = _returned_headers(report)
    original_id = _message_id(original.get("Message-ID")) if original is not None else None
    returned_path = original.get_all("Return-Path", []) if original is not None else []
    date = _date(report.get("Date")) or utcnow()
    if "message/delivery-status" in parts:
        return DSN, _dsn(data, secret, report, parts["message/delivery-status"], envelope, original_id,
                         returned_path, date)
    if "message/feedback-report" in parts:
        return ARF, _arf(data, secret, report, parts["message/feedback-report"], envelope, original, original_id,
                         returned_path, date)
    return None, []


def _dsn(data: bytes, secret: str, report: Message, part: Message, envelope: list[Any], original_id: str | None,
         returned_path: list[Any], date: datetime) -> list[Found]:
    blocks = _field_blocks(part)
    if not blocks:
        raise UnreadableReport("message/delivery-status part has no fields")
    per_message, recipients = blocks[0], blocks[1:]
    if per_message.get("Final-Recipient") and not per_message.get("Reporting-MTA"):
        per_message, recipients = Message(), blocks  # an MTA that left out the per-message fields
    if not recipients:
        raise UnreadableReport("message/delivery-status part names no recipient (no Final-Recipient block)")
    message_id = (original_id or _message_id(per_message.get("X-Original-Message-ID"))
                  or _message_id(report.get("X-Original-Message-ID")))
    digests = _tokens(secret, *(value for values in envelope for value in values), *returned_path,
                      per_message.get("Original-Envelope-Id"))
    found = []
    for number, fields in enumerate(recipients, start=1):
        final = _address(fields.get("Final-Recipient"))
        email = _address(fields.get("Original-Recipient")) or final
        action = _clean(fields.get("Action")).lower()
        if not email or not action:
            missing = "Final-Recipient" if not final else "Action"
            raise UnreadableReport(f"message/delivery-status recipient block {number}: no valid {missing}")
        diagnostic = _clean(fields.get("Diagnostic-Code"))
        _, _, diagnostic_text = diagnostic.partition(";") if ";" in diagnostic[:12] else ("", "", diagnostic)
        status = _clean(fields.get("Status")).split(" ")[0]
        code = _SMTP_CODE.search(f" {diagnostic_text}")
        verdict = None
        if action == "failed":
            verdict = classify(int(code.group(1)) if code else None, diagnostic_text.strip(), status or None)
        found.append(Found(
            report_id=_report_id(DSN, report, data, final or email), email=email, action=action, source=DSN,
            occurred_at=_date(fields.get("Last-Attempt-Date")) or _date(per_message.get("Arrival-Date")) or date,
            status=status, diagnostic=diagnostic_text.strip(), digests=digests, message_id=message_id,
            verdict=verdict))
    return found


def _arf(data: bytes, secret: str, report: Message, part: Message, envelope: list[Any], original: Message | None,
         original_id: str | None, returned_path: list[Any], date: datetime) -> list[Found]:
    blocks = _field_blocks(part)
    fields = blocks[0] if blocks else None
    if fields is None or not fields.get("Feedback-Type"):
        raise UnreadableReport("message/feedback-report part has no Feedback-Type field")
    feedback_type = _clean(fields.get("Feedback-Type")).lower()
    recipients = [_address(value) for value in fields.get_all("Original-Rcpt-To", [])]
    if not any(recipients) and original is not None:
        recipients = [_address(value) for value in original.get_all("To", [])[:1]]
    digests = _tokens(secret, *fields.get_all("Original-Mail-From", []), *returned_path,
                      *(value for values in envelope for value in values))
    verdict = Verdict(FeedbackKind.COMPLAINT, "") if feedback_type in _COMPLAINT_TYPES else None
    occurred = _date(fields.get("Arrival-Date")) or _date(fields.get("Received-Date")) or date
    return [Found(report_id=_report_id(ARF, report, data, email), email=email, action="complaint", source=ARF,
                  occurred_at=occurred, diagnostic=f"feedback-type {feedback_type}"
                  + (f" from {_clean(fields.get('User-Agent'))}" if fields.get("User-Agent") else ""),
                  digests=digests, message_id=original_id, verdict=verdict)
            for email in (list(dict.fromkeys(r for r in recipients if r)) or [""])]


# -- matching and recording ----------------------------------------------------------------

def send_for_digest(connection: Connection, secret: str, digest: str) -> tuple[str, str] | None:
    """The send (key, address) whose Message-ID digest a VERP token carries.

    Looked up through the index on the digest of ``sends.message_id``, whatever domain
    the trigger sent from. The send key is hashed again, so only the send the token was
    made for can match.
    """
    rows = connection.execute(select(col(Send.send_key), col(Send.email))
                              .where(message_digest(Send.message_id) == digest)).all()
    for key, email in rows:
        if send_digest(secret, key) == digest:
            return key, email
    return None


def match(engine: Engine, found: Sequence[Found], secret: str) -> list[Report]:
    """Reports for the bounces and complaints among ``found``, each naming its send where known.

    A token-matched report takes the send's own address (the one we mailed, whatever the
    final recipient after forwarding was). An unmatched complaint without any address
    cannot be recorded and is left out (``process`` counts it as unmatched).
    """
    reports = []
    with engine.connect() as connection:
        for item in found:
            if item.verdict is None:
                continue
            send = next((s for d in item.digests if (s := send_for_digest(connection, secret, d))), None)
            email = send[1] if send else item.email
            if not email:
                continue
            reports.append(Report(report_id=item.report_id, email=email, kind=item.verdict.kind, source=item.source,
                                  occurred_at=item.occurred_at, status=item.verdict.status or item.status,
                                  diagnostic=item.diagnostic, send_key=send[0] if send else None,
                                  message_id=None if send else item.message_id))
    return reports


def tally(found: Sequence[Found], reports: Sequence[Report], recorded: Recorded) -> Tally:
    counted = [f for f in found if f.verdict is not None]
    return Tally(reports=len(counted), new=recorded.new, duplicates=recorded.duplicates,
                 unmatched=recorded.unmatched + len(counted) - len(reports),
                 delayed=sum(f.action == "delayed" for f in found),
                 ignored=sum(f.verdict is None and f.action != "delayed" for f in found),
                 suppressed=dict(recorded.suppressed or {}))


def process(engine: Engine, data: bytes, secret: str, rule: SoftBounceRule | None = None) -> Tally:
    """Read one message and record what it reports; raises ``UnreadableReport``."""
    kind, found = parse(data, secret)
    if kind is None:
        return Tally(ignored=1)
    reports = match(engine, found, secret)
    return tally(found, reports, record(engine, reports, rule or SoftBounceRule()))


def record_reports(engine: Engine, reports: Sequence[Report], rule: SoftBounceRule) -> Tally:
    """Webhook payloads arrive as reports already; the same tally as for mailed reports."""
    result = record(engine, reports, rule)
    return Tally(reports=len(reports), new=result.new, duplicates=result.duplicates, unmatched=result.unmatched,
                 suppressed=dict(result.suppressed or {}))


# -- provider webhooks: JSON → Report -----------------------------------------------------

def _iso(value: object) -> datetime:
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return utcnow()
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _verdict(code_text: str, status: str, default: FeedbackKind | None) -> Verdict:
    code = _SMTP_CODE.search(f" {code_text}")
    verdict = classify(int(code.group(1)) if code else None, code_text, status or None)
    if default is not None and verdict.kind not in (FeedbackKind.HARD_BOUNCE, FeedbackKind.SOFT_BOUNCE):
        return Verdict(default, verdict.status)
    return verdict


def _payload_id(payload: dict[str, Any]) -> str:
    """A provider's payload without its own id: the same payload, the same report."""
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:40]


_SES_HARD = frozenset({"NoEmail", "Suppressed", "OnAccountSuppressionList"})


def ses_reports(engine: Engine, notification: dict[str, Any], secret: str) -> list[Report]:
    """An SES bounce or complaint notification (as SNS delivers it) as reports.

    Matched by the VERP token in ``mail.source`` (the MAIL FROM SES was given) or a
    Return-Path header, else by the original Message-ID in ``mail.headers``.
    """
    kind = notification.get("notificationType") or notification.get("eventType")
    mail = notification.get("mail") or {}
    headers = {str(h.get("name", "")).lower(): str(h.get("value", "")) for h in mail.get("headers") or []
               if isinstance(h, dict)}
    common = mail.get("commonHeaders") or {}
    message_id = _message_id(headers.get("message-id")) or (
        _message_id(common.get("messageId")) if "@" in str(common.get("messageId", "")) else None)
    digests = _tokens(secret, mail.get("source"), headers.get("return-path"))
    found: list[Found] = []
    fallback_id = _payload_id(notification)
    if kind == "Bounce":
        bounce = notification.get("bounce") or {}
        permanent = bounce.get("bounceType") == "Permanent"
        sub = str(bounce.get("bounceSubType", ""))
        for rcpt in bounce.get("bouncedRecipients") or []:
            status, diagnostic = str(rcpt.get("status") or ""), _clean(rcpt.get("diagnosticCode"))
            diagnostic_text = diagnostic.partition(";")[2].strip() if diagnostic[:5].lower() == "smtp;" else diagnostic
            if permanent and sub in _SES_HARD:
                verdict = Verdict(FeedbackKind.HARD_BOUNCE, status)
            elif not permanent and sub == "MailboxFull":
                verdict = Verdict(FeedbackKind.SOFT_BOUNCE, status)
            else:
                verdict = _verdict(diagnostic_text, status, None if permanent else FeedbackKind.SOFT_BOUNCE)
            email = _address(rcpt.get("emailAddress"))
            found.append(Found(f"ses:{bounce.get('feedbackId') or fallback_id}:{email}", email, "failed", "ses",
                               _iso(bounce.get("timestamp")), status, diagnostic_text or f"{bounce.get('bounceType')}"
                               f"/{sub}", digests, message_id, verdict))
    elif kind == "Complaint":
        complaint = notification.get("complaint") or {}
        feedback = str(complaint.get("complaintFeedbackType") or "abuse").lower()
        complained = Verdict(FeedbackKind.COMPLAINT, "") if feedback in _COMPLAINT_TYPES else None
        for rcpt in complaint.get("complainedRecipients") or []:
            email = _address(rcpt.get("emailAddress"))
            found.append(Found(f"ses:{complaint.get('feedbackId') or fallback_id}:{email}", email, "complaint", "ses",
                               _iso(complaint.get("timestamp")), "", f"feedback-type {feedback}", digests,
                               message_id, complained))
    return match(engine, found, secret)


# Postmark's bounce types (https://postmarkapp.com/developer/api/bounce-api#bounce-types).
_POSTMARK: dict[str, FeedbackKind] = {
    "HardBounce": FeedbackKind.HARD_BOUNCE, "BadEmailAddress": FeedbackKind.HARD_BOUNCE,
    "SoftBounce": FeedbackKind.SOFT_BOUNCE, "DnsError": FeedbackKind.SOFT_BOUNCE,
    "SpamComplaint": FeedbackKind.COMPLAINT,
    "Blocked": FeedbackKind.MESSAGE_FAILURE, "ContentRelated": FeedbackKind.MESSAGE_FAILURE,
    "SMTPApiError": FeedbackKind.MESSAGE_FAILURE, "BadRequest": FeedbackKind.MESSAGE_FAILURE,
}


def postmark_reports(engine: Engine, payload: dict[str, Any], secret: str) -> list[Report]:
    """A Postmark bounce or spam-complaint webhook as reports (``Transient``, auto-replies and the like: none).

    Postmark rewrites the Return-Path, so the send is found by the original Message-ID
    (or a VERP token) in the bounce ``Content`` when Postmark includes it.
    """
    record_type, kind = str(payload.get("RecordType", "")), _POSTMARK.get(str(payload.get("Type", "")))
    if record_type not in ("Bounce", "SpamComplaint") or kind is None:
        return []
    content = str(payload.get("Content") or "")
    headers = HeaderParser().parsestr(content) if content else Message()
    given = payload.get("Metadata")
    metadata: dict[str, Any] = given if isinstance(given, dict) else {}
    details = _clean(payload.get("Details") or payload.get("Description"))
    verdict: Verdict
    if kind == FeedbackKind.COMPLAINT:
        verdict = Verdict(kind, "")
    else:
        verdict = _verdict(details, "", kind)
        if kind == FeedbackKind.HARD_BOUNCE and verdict.kind != kind:
            verdict = Verdict(kind, verdict.status)
    email = _address(payload.get("Email"))
    found = Found(f"postmark:{payload.get('ID') or _payload_id(payload)}:{record_type}", email, "complaint" if kind ==
                  FeedbackKind.COMPLAINT else "failed", "postmark", _iso(payload.get("BouncedAt")), verdict.status,
                  details or str(payload.get("Type")), _tokens(secret, content, *metadata.values()),
                  _message_id(headers.get("Message-ID")) or _message_id(metadata.get("message_id")), verdict)
    return match(engine, [found], secret)


# -- readers -----------------------------------------------------------------------------

Done = Callable[[], None]


def maildir_messages(folder: Path) -> Iterator[tuple[str, bytes, Done]]:
    """Each message in the Maildir's ``new/``; ``done()`` moves it to ``cur/`` flagged seen (``:2,S``).

    Moved by renaming, as Maildir readers do, so the message's bytes stay as they came.
    """
    for sub in ("new", "cur", "tmp"):
        if not (folder / sub).is_dir():
            raise UnreadableReport(f"not a Maildir: {folder / sub} is missing")
    for path in sorted((folder / "new").iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue

        def done(path: Path = path) -> None:
            name = path.name if ":2," in path.name else f"{path.name}:2,"
            base, _, flags = name.partition(":2,")
            os.replace(path, folder / "cur" / f"{base}:2,{''.join(sorted(set(flags + 'S')))}")

        yield str(path), path.read_bytes(), done


@dataclass(frozen=True)
class ImapUrl:
    secure: bool
    user: str
    password: str
    host: str
    port: int
    mailbox: str

    @classmethod
    def parse(cls, url: str) -> "ImapUrl":
        parts = urlsplit(url)
        if parts.scheme not in ("imap", "imaps") or not parts.hostname:
            raise ValueError("the IMAP URL must look like imap://user:pass@host:port/INBOX (or imaps://)")
        if not parts.username or parts.password is None:
            raise ValueError("the IMAP URL needs a user and a password: imap://user:pass@host/INBOX")
        secure = parts.scheme == "imaps"
        return cls(secure, unquote(parts.username), unquote(parts.password), parts.hostname,
                   parts.port or (993 if secure else 143), unquote(parts.path.lstrip("/")) or "INBOX")

    def __str__(self) -> str:
        """The URL without its password, for messages and logs."""
        return f"{'imaps' if self.secure else 'imap'}://{self.user}:***@{self.host}:{self.port}/{self.mailbox}"


class ImapError(Exception):
    """The IMAP server could not be reached or refused us; the message never holds the password."""


@contextmanager
def imap_messages(url: str, timeout: float = 30) -> Iterator[Iterator[tuple[str, bytes, Done]]]:
    """Each unseen message in the folder; ``done()`` flags it ``\\Seen`` (read with BODY.PEEK, so
    a message that fails to record stays unseen and is read again next time)."""
    try:
        target = ImapUrl.parse(url)
    except ValueError as exc:
        raise ImapError(str(exc)) from None
    try:
        if target.secure:
            client: imaplib.IMAP4 = imaplib.IMAP4_SSL(target.host, target.port,
                                                      ssl_context=ssl.create_default_context(), timeout=timeout)
        else:
            client = imaplib.IMAP4(target.host, target.port, timeout=timeout)
    except (OSError, imaplib.IMAP4.error) as exc:
        raise ImapError(f"{target}: cannot connect: {exc}") from None
    try:
        try:
            client.login(target.user, target.password)
        except imaplib.IMAP4.error:
            raise ImapError(f"{target}: login refused") from None
        status, _ = client.select('"' + target.mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"')
        if status != "OK":
            raise ImapError(f"{target}: no such mailbox {target.mailbox!r}")
        status, found = client.uid("SEARCH", "UNSEEN")
        if status != "OK":
            raise ImapError(f"{target}: SEARCH failed")
        uids = [uid.decode() for uid in (found[0] or b"").split()] if found else []

        def messages() -> Iterator[tuple[str, bytes, Done]]:
            for uid in uids:
                status, fetched = client.uid("FETCH", uid, "(BODY.PEEK[])")
                raw = next((item[1] for item in fetched or [] if isinstance(item, tuple)), None)
                if status != "OK" or not isinstance(raw, bytes):
                    raise ImapError(f"{target}: cannot fetch message UID {uid}")

                def done(uid: str = uid) -> None:
                    client.uid("STORE", uid, "+FLAGS.SILENT", "(\\Seen)")

                yield f"{target} UID {uid}", raw, done

        yield messages()
    except (OSError, imaplib.IMAP4.error) as exc:
        raise ImapError(f"{target}: {type(exc).__name__}: {exc}") from None
    finally:
        try:
            client.logout()
        except (OSError, imaplib.IMAP4.error):
            pass


def load_json(body: bytes) -> dict[str, Any]:
    """A webhook body as a JSON object, or ValueError saying what is wrong."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    except RecursionError:  # nested deeper than Python's parser goes: nobody's genuine report
        raise ValueError("not JSON we accept: nested too deep") from None
    if isinstance(data, dict):
        return data
    raise ValueError("not a JSON object")
