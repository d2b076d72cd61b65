"""Bounces and complaints that come back later: VERP Return-Paths, DSNs and ARF reports read
from files, a Maildir and a real IMAP server (Dovecot), matched to their sends and recorded once."""

import imaplib
import re
from email import message_from_bytes
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from flows.content.links import read_verp_token, send_digest, verp_address, verp_token
from flows.feedback.bounces import Report, record
from flows.feedback.reports import Tally, UnreadableReport, parse, process
from flows.settings import Settings
from flows.summary import RunSummary
from flows.surfaces.cli import app
from models import FeedbackKind
from tests import support
from tests.support import SECRET
from tests.support.builders import NOW, Store
from tests.support.imap_server import ImapServer, dovecot_binary
from tests.support.ledger import feedback_rows, seed_send, sends, status_of, suppressions
from tests.support.runs import run, run_flow
from tests.support.smtp_server import SmtpServer

FIXTURES = support.FIXTURES / "bounces"
RETURN_PATH = re.compile(r"bounces\+([0-9a-f]{48})@shop\.example")
runner = CliRunner()

# The sends the fixtures are about: (fixture, send key, address mailed).
SENDS = {
    "postfix-user-unknown.eml": ("winback-lapsed/c-9001/2026-03-16T12:00:00+00:00", "no.such.user@example.net"),
    "exim-user-unknown.eml": ("winback-lapsed/c-9002/2026-03-16T12:00:00+00:00", "gone@example.org"),
    "office365-recipient-not-found.eml": ("winback-lapsed/c-9003/2026-03-16T12:00:00+00:00",
                                          "missing@contoso.example"),
    "gmail-account-does-not-exist.eml": ("winback-lapsed/c-9004/2026-03-16T12:00:00+00:00",
                                         "lost.reader@gmail.example"),
    "postfix-mailbox-full.eml": ("winback-lapsed/c-9005/2026-03-16T12:00:00+00:00", "full@example.com"),
    "postfix-delayed.eml": ("winback-lapsed/c-9006/2026-03-16T12:00:00+00:00", "slow@example.de"),
    "yahoo-arf-abuse.eml": ("winback-lapsed/c-9007/2026-03-16T12:00:00+00:00", "annoyed.reader@yahoo.example"),
}


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def seed_fixture_sends(store: Store) -> None:
    for key, email in SENDS.values():
        seed_send(store, key, email)


# -- VERP ----------------------------------------------------------------------------------

def test_a_token_names_its_send_and_a_forged_altered_or_foreign_one_names_none() -> None:
    key = "winback-lapsed/c-1/2026-03-16"
    token = verp_token(SECRET, key)
    assert read_verp_token(SECRET, token) == send_digest(SECRET, key)
    assert read_verp_token(SECRET, token.upper()) == send_digest(SECRET, key)  # relays that fold case still match
    altered = token[:-1] + ("a" if token[-1] != "a" else "b")
    assert read_verp_token(SECRET, altered) is None
    other_send = verp_token(SECRET, "winback-lapsed/c-2/2026-03-16")
    assert read_verp_token(SECRET, token[:32] + other_send[32:]) is None  # a signature moved to another send
    assert read_verp_token("another-secret-0123456789", token) is None
    assert read_verp_token(SECRET, "x" * len(token)) is None
    address = verp_address("bounces@shop.example", SECRET, key)
    assert address == f"bounces+{token}@shop.example"
    assert len(address.split("@")[0]) <= 64


def test_a_bounce_address_whose_local_part_cannot_hold_the_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(bounce_address="returns@bounce.shop.example").bounce_address == "returns@bounce.shop.example"
    with pytest.raises(ValidationError, match="64 octets"):
        Settings(bounce_address="a-very-long-bounce-mailbox-name@shop.example")
    with pytest.raises(ValidationError, match="plain address"):
        Settings(bounce_address="Bounces <bounces@shop.example>")


def test_every_mail_of_a_run_has_a_return_path_naming_its_own_send(settings: Settings, store: Store,
                                                                    smtp: SmtpServer) -> None:
    emails = store.lapsed(3)
    assert run(settings, "winback-lapsed").outcomes == {"sent": 3}
    by_email = {row.email: row for row in sends(store.engine)}
    assert sorted(by_email) == sorted(emails)
    tokens = set()
    for received in smtp.received:
        [recipient] = received.recipients
        match = RETURN_PATH.fullmatch(received.sender)
        assert match, received.sender
        tokens.add(match.group(1))
        digest = read_verp_token(SECRET, match.group(1))
        assert digest == send_digest(SECRET, by_email[recipient].send_key)
        assert received.message["Message-ID"] == by_email[recipient].message_id == f"<{digest}@shop.example>"
        assert received.message["Return-Path"] is None  # added on delivery, never by us: DKIM never covers it
    assert len(tokens) == 3

    other = settings.model_copy(update={"bounce_address": "returns@bounce.shop.example"})
    store.lapsed(1)
    run(other, "winback-lapsed")
    assert re.fullmatch(r"returns\+[0-9a-f]{48}@bounce\.shop\.example", smtp.received[-1].sender)


# -- parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "source", "email", "action", "kind", "status"), [
    ("postfix-user-unknown.eml", "dsn", "no.such.user@example.net", "failed", FeedbackKind.HARD_BOUNCE, "5.1.1"),
    # Exim writes Status: 5.0.0 and the real code in the diagnostic.
    ("exim-user-unknown.eml", "dsn", "gone@example.org", "failed", FeedbackKind.HARD_BOUNCE, "5.1.1"),
    ("office365-recipient-not-found.eml", "dsn", "missing@contoso.example", "failed", FeedbackKind.HARD_BOUNCE,
     "5.1.10"),
    ("gmail-account-does-not-exist.eml", "dsn", "lost.reader@gmail.example", "failed", FeedbackKind.HARD_BOUNCE,
     "5.1.1"),
    ("postfix-mailbox-full.eml", "dsn", "full@example.com", "failed", FeedbackKind.SOFT_BOUNCE, "5.2.2"),
    ("postfix-delayed.eml", "dsn", "slow@example.de", "delayed", None, "4.4.7"),
    ("yahoo-arf-abuse.eml", "arf", "annoyed.reader@yahoo.example", "complaint", FeedbackKind.COMPLAINT, ""),
])
def test_each_fixture_reads_as_what_it_reports(name: str, source: str, email: str, action: str,
                                               kind: FeedbackKind | None, status: str) -> None:
    kind_read, [found] = parse(fixture(name), SECRET)
    assert (kind_read, found.email, found.action) == (source, email, action)
    assert (found.verdict.kind if found.verdict else None) == kind
    assert (found.verdict.status if found.verdict and found.verdict.status else found.status) == status
    key = SENDS[name][0]
    assert found.message_id == f"<{send_digest(SECRET, key)}@shop.example>"
    # Every fixture but Gmail's (mailed to the From address, before VERP) carries a genuine token for its send.
    assert found.digests == (() if name.startswith("gmail") else (send_digest(SECRET, key),))
    assert found.report_id == parse(fixture(name), SECRET)[1][0].report_id  # stable for the same report


def test_a_mail_that_is_no_report_is_ignored_and_a_broken_report_is_unreadable() -> None:
    assert parse(b"From: a@example.com\nSubject: out of office\n\nI am away.\n", SECRET) == (None, [])
    with pytest.raises(UnreadableReport, match="not a mail message"):
        parse(b"   \n", SECRET)
    broken = fixture("postfix-user-unknown.eml").replace(b"Final-Recipient: rfc822; no.such.user@example.net\n", b"")
    broken = broken.replace(b"Original-Recipient: rfc822;no.such.user@example.net\n", b"")
    with pytest.raises(UnreadableReport, match="recipient block 1: no valid Final-Recipient"):
        parse(broken, SECRET)


# -- recording ----------------------------------------------------------------------------

def test_fixtures_are_recorded_against_their_sends_once(store: Store) -> None:
    seed_fixture_sends(store)
    engine = store.engine
    tallies = {name: process(engine, fixture(name), SECRET) for name in SENDS}
    assert tallies["postfix-delayed.eml"] == Tally(delayed=1)  # a warning only: nothing recorded
    assert all(t.new == 1 and t.unmatched == 0 for n, t in tallies.items() if n != "postfix-delayed.eml")
    assert {name: status_of(engine, key) for name, (key, _) in SENDS.items()} == {
        "postfix-user-unknown.eml": "bounced", "exim-user-unknown.eml": "bounced",
        "office365-recipient-not-found.eml": "bounced",
        "gmail-account-does-not-exist.eml": "bounced",  # matched by its Message-ID
        "postfix-mailbox-full.eml": "bounced", "postfix-delayed.eml": "sent", "yahoo-arf-abuse.eml": "complained"}
    assert suppressions(engine) == {
        "no.such.user@example.net": "hard_bounce", "gone@example.org": "hard_bounce",
        "missing@contoso.example": "hard_bounce", "lost.reader@gmail.example": "hard_bounce",
        "annoyed.reader@yahoo.example": "spam_complaint"}  # one mailbox-full is not enough
    rows = feedback_rows(engine)
    assert {(r.email, r.kind, r.source, r.send_key, r.trigger) for r in rows} == {
        (email, kind, "arf" if "arf" in name else "dsn", key, "winback-lapsed")
        for name, (key, email) in SENDS.items() if name != "postfix-delayed.eml"
        for kind in ["complaint" if "arf" in name else "soft_bounce" if "full" in name else "hard_bounce"]}

    again = {name: process(engine, fixture(name), SECRET) for name in SENDS}
    assert sum(t.duplicates for t in again.values()) == 6 and sum(t.new for t in again.values()) == 0
    assert len(feedback_rows(engine)) == 6


def test_a_third_soft_bounce_within_30_days_suppresses_the_address(store: Store) -> None:
    key, email = SENDS["postfix-mailbox-full.eml"]
    seed_send(store, key, email)
    original = fixture("postfix-mailbox-full.eml")
    for n in range(1, 4):  # three different notices (their own Message-Ids) about the same mailbox
        notice = original.replace(b"<4QZ7p21kXbz9sRt@mail.shop.example>", f"<notice-{n}@mail.shop.example>".encode())
        tally = process(store.engine, notice, SECRET)
        assert tally.new == 1
        assert (email in suppressions(store.engine)) == (n == 3)
    assert tally.suppressed == {email: "soft_bounce"}


def test_a_forged_token_matches_no_send(store: Store) -> None:
    key, email = SENDS["postfix-user-unknown.eml"]
    seed_send(store, key, email)
    token = verp_token(SECRET, key)
    forged_token = verp_token("someone-elses-secret-123", key)
    forged = fixture("postfix-user-unknown.eml").replace(token.encode(), forged_token.encode())
    forged = re.sub(rb"Message-ID: <[^>]+>\n", b"", forged)  # and no Message-ID to fall back on
    _, [found] = parse(forged, SECRET)
    assert found.digests == () and found.message_id is None
    tally = process(store.engine, forged, SECRET)
    assert (tally.new, tally.unmatched) == (1, 1)
    assert status_of(store.engine, key) == "sent"
    assert feedback_rows(store.engine)[0].send_key is None


def test_a_token_matches_by_send_so_a_forwarded_address_is_not_what_is_suppressed(store: Store) -> None:
    key, email = SENDS["office365-recipient-not-found.eml"]
    seed_send(store, key, email)
    forwarded = fixture("office365-recipient-not-found.eml").replace(
        b"Final-Recipient: rfc822;missing@contoso.example", b"Final-Recipient: rfc822;forwarded.to@elsewhere.example")
    tally = process(store.engine, forwarded, SECRET)
    assert tally.suppressed == {email: "hard_bounce"}
    assert status_of(store.engine, key) == "bounced"


def test_a_real_run_then_its_bounce_closes_the_loop(settings: Settings, store: Store, smtp: SmtpServer,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [email] = store.lapsed(1)
    run(settings, "winback-lapsed")
    [received] = smtp.received
    sent = message_from_bytes(received.data)
    # The relay's bounce, written to the envelope sender it was given, about the message it was given.
    template = fixture("postfix-user-unknown.eml").decode()
    old_token = verp_token(SECRET, SENDS["postfix-user-unknown.eml"][0])
    bounce = (template.replace(f"bounces+{old_token}@shop.example", received.sender)
              .replace(f"<{send_digest(SECRET, SENDS['postfix-user-unknown.eml'][0])}@shop.example>",
                       sent["Message-ID"])
              .replace("no.such.user@example.net", email))
    path = tmp_path / "bounce.eml"
    path.write_text(bounce)
    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(app, ["bounces", str(path)])
    assert result.exit_code == 0, result.output
    assert f"suppressed {email} (hard_bounce)" in result.output
    [row] = sends(store.engine)
    assert row.status == "bounced" and "5.1.1" in row.error
    assert suppressions(store.engine) == {email: "hard_bounce"}
    assert run(settings, "winback-lapsed").outcomes.get("sent", 0) == 0


# -- the command ---------------------------------------------------------------------------

def test_the_command_summarises_each_file_and_exits_1_naming_an_unreadable_one(
        settings: Settings, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed_fixture_sends(store)
    monkeypatch.setenv("COLUMNS", "250")
    files = [str(FIXTURES / name) for name in SENDS]
    result = runner.invoke(app, ["bounces", *files])
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in result.output.splitlines() if line.count("│") > 8}
    # reports, new, duplicates, unmatched, suppressed, delayed, not a report
    assert lines[str(FIXTURES / "postfix-delayed.eml")] == ["0", "0", "0", "0", "0", "1", "0"]
    assert lines[str(FIXTURES / "yahoo-arf-abuse.eml")] == ["1", "1", "0", "0", "1", "0", "0"]
    assert lines["total"] == ["6", "6", "0", "0", "5", "1", "0"]

    garbage = tmp_path / "garbage.eml"
    garbage.write_bytes(b"\n\n")
    missing = tmp_path / "missing.eml"
    again = runner.invoke(app, ["bounces", files[0], str(garbage), str(missing)])
    assert again.exit_code == 1
    assert f"{garbage}: empty input" in again.output.replace("\n", "")
    assert f"{missing}: cannot read" in again.output.replace("\n", "")
    again_lines = [line for line in again.output.splitlines() if line.count("│") > 8 and "total" in line]
    assert [c.strip() for c in again_lines[0].split("│")[2:-1]] == ["1", "0", "1", "0", "0", "0", "0"]


def test_a_maildir_is_read_from_new_and_each_message_moved_to_cur(settings: Settings, store: Store,
                                                                   tmp_path: Path) -> None:
    seed_fixture_sends(store)
    maildir = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    for n, name in enumerate(SENDS):
        (maildir / "new" / f"177366{n:04d}.M1P1.mail.shop.example").write_bytes(fixture(name))
    (maildir / "new" / "1773669999.M1P2.mail.shop.example").write_bytes(b"From: a@b.example\n\nout of office\n")
    result = runner.invoke(app, ["bounces", "--maildir", str(maildir)])
    assert result.exit_code == 0, result.output
    assert list((maildir / "new").iterdir()) == []
    moved = sorted(p.name for p in (maildir / "cur").iterdir())
    assert len(moved) == 8 and all(name.endswith(":2,S") for name in moved)
    assert (maildir / "cur" / "1773660000.M1P1.mail.shop.example:2,S").read_bytes() == fixture(
        "postfix-user-unknown.eml")  # moved as it came
    assert len(feedback_rows(store.engine)) == 6
    assert runner.invoke(app, ["bounces", "--maildir", str(maildir)]).exit_code == 0  # nothing new to read
    assert len(feedback_rows(store.engine)) == 6
    assert runner.invoke(app, ["bounces", "--maildir", str(tmp_path / "nowhere")]).exit_code == 1


def test_a_malformed_report_in_a_maildir_stops_nothing_after_it(settings: Settings, store: Store,
                                                                 tmp_path: Path) -> None:
    """A ``Status:`` without dots once raised out of the reader: the same message then
    stopped every later run at the same place."""
    seed_fixture_sends(store)
    maildir = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    odd = fixture("postfix-user-unknown.eml").replace(b"Status: 5.1.1", b"Status: 5")
    (maildir / "new" / "1.M1P1.mail.shop.example").write_bytes(odd)
    (maildir / "new" / "2.M1P1.mail.shop.example").write_bytes(fixture("postfix-mailbox-full.eml"))
    result = runner.invoke(app, ["bounces", "--maildir", str(maildir)])
    assert result.exit_code == 0, result.output
    assert list((maildir / "new").iterdir()) == []
    assert {f.kind for f in feedback_rows(store.engine)} == {"hard_bounce", "soft_bounce"}  # 5.1.1 read from the text


@pytest.fixture
def imap_server() -> ImapServer:
    if dovecot_binary() is None:
        pytest.fail("dovecot is not installed: apt-get install dovecot-imapd (.ci/run does)")
    server = ImapServer().start()
    yield server
    server.stop()


def test_an_imap_folder_is_read_and_each_processed_message_flagged_seen(
        settings: Settings, store: Store, imap_server: ImapServer, monkeypatch: pytest.MonkeyPatch) -> None:
    seed_fixture_sends(store)
    client = imaplib.IMAP4("127.0.0.1", imap_server.port)
    client.login(imap_server.user, imap_server.password)
    for name in SENDS:
        assert client.append("INBOX", None, None, fixture(name).replace(b"\n", b"\r\n"))[0] == "OK"
    monkeypatch.setenv("COLUMNS", "250")
    result = runner.invoke(app, ["bounces", "--imap", imap_server.url])
    assert result.exit_code == 0, result.output
    assert imap_server.password not in result.output and "UID 7" in result.output
    assert {r.email for r in feedback_rows(store.engine)} == {e for n, (_, e) in SENDS.items() if "delayed" not in n}
    client.select("INBOX")
    assert client.uid("SEARCH", None, "UNSEEN")[1] == [b""]
    assert len(client.uid("SEARCH", None, "SEEN")[1][0].split()) == 7
    client.logout()

    monkeypatch.setenv("LIFECYCLE_BOUNCE_IMAP_URL", imap_server.url)  # the URL may come from the environment
    again = runner.invoke(app, ["bounces"])
    assert again.exit_code == 0 and "UID" not in again.output

    wrong = imap_server.url.replace("s3cret", "wrong")
    refused = runner.invoke(app, ["bounces", "--imap", wrong])
    assert refused.exit_code == 1 and "login refused" in refused.output
    assert "wrong" not in refused.output and "s3cret" not in refused.output


# -- complaint rates -------------------------------------------------------------------------

def test_the_summary_warns_above_a_tenth_of_a_percent_of_complaints() -> None:
    summary = RunSummary("winback-lapsed", NOW, complaints=(1, 1000))
    assert summary.complaint_warning is None and "WARNING" not in summary.headline()
    summary.complaints = (2, 1000)
    assert summary.complaint_warning is not None and "0.20% over 30 days (2 of 1000 mails)" in summary.complaint_warning
    assert "WARNING: spam complaints" in summary.headline()
    assert "> **Warning:** spam complaints" in summary.to_markdown()


def test_complaint_rates_are_shown_per_trigger(settings: Settings, store: Store,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for n in range(4):
        seed_send(store, f"winback-lapsed/c-{n}/2026-03", f"reader{n}@example.com")
    seed_send(store, "abandoned-cart/c-9/1", "cart@example.com")
    record(store.engine, [Report("arf:test-1", "reader1@example.com", FeedbackKind.COMPLAINT, "arf", NOW,
                                 send_key="winback-lapsed/c-1/2026-03")])
    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(app, ["bounces", "--rates", "--days", "3650"])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in result.output.splitlines() if line.count("│") >= 5}
    assert rows["winback-lapsed"] == ["4", "1", "25.00%", "above 0.1%"]
    assert rows["abandoned-cart"] == ["1", "0", "0.00%", ""]


@pytest.mark.usefixtures("prefect")
def test_a_flow_run_reports_its_triggers_complaint_rate(settings: Settings, store: Store, smtp: SmtpServer) -> None:

    store.lapsed(3)
    run(settings, "winback-lapsed")
    rows = sends(store.engine)
    key, email = rows[0].send_key, rows[0].email
    assert len(rows) == 3
    record(store.engine, [Report("arf:flow-1", email, FeedbackKind.COMPLAINT, "arf", NOW, send_key=key)])
    summary = run_flow(settings, "winback-lapsed")
    assert summary.complaints == (1, 3)
    assert "WARNING: spam complaints 33.33%" in summary.headline()
