"""Properties of random timelines: whatever customers do and whenever triggers run, the
promises of the README hold at the SMTP server.

Each example plays a random timeline (``tests/support/timelines.py``) against a fresh store
(SQLite and PostgreSQL) and the real SMTP server on loopback, then judges what the
server received against what held at each moment — from the timeline, the trigger files
and the policy written for the example, never from the engine's reasoning.

Example counts come from the hypothesis profile (``tests/conftest.py``): ``ci`` is
derandomized, so a CI failure is the same failure on every machine and every rerun
(flaky CI teaches people to rerun); ``HYPOTHESIS_PROFILE=nightly`` draws new random
timelines each night, many more of them, and keeps what it finds in hypothesis's
example database. A timeline that ever failed becomes a plain regression test below.
"""

import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from itertools import pairwise
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from hypothesis import event, given, target

from flows.settings import Settings
from tests.support import ROOT, copy_project
from tests.support.smtp_server import SmtpServer
from tests.support.timelines import (
    MAILBOXES,
    SHIPPED_POLICY,
    Cap,
    Crash,
    Fact,
    Mail,
    Person,
    PolicyVariant,
    Projects,
    Record,
    Run,
    SignUp,
    Stores,
    Sweep,
    Timeline,
    play,
    timelines,
)

MARKETING_KINDS = {"abandoned_cart", "inactivity", "onboarding", "campaign", "post_purchase"}
# The README's table: re-entry when a trigger file does not say.
DEFAULT_REENTRY = {"abandoned_cart": "1d", "inactivity": "30d", "onboarding": "once", "complaint": "every_occurrence",
                   "campaign": "every_occurrence", "consent_confirmation": "every_occurrence",
                   "post_purchase": "every_occurrence"}
BLOCKS_SERVICE_MAIL = {"hard_bounce", "spam_complaint", "manual"}


def duration(text: str) -> timedelta:
    units = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    return timedelta(**{units[u]: int(n) for n, u in re.findall(r"(\d+)([wdhms])", text)})


@dataclass(frozen=True)
class TriggerFile:
    """What a shipped trigger file promises, read with plain YAML."""

    name: str
    kind: str
    reentry: str  # once | every_occurrence | a cool-down
    send_window: timedelta | None
    cron: str
    zone: str

    @property
    def marketing(self) -> bool:
        return self.kind in MARKETING_KINDS

    @property
    def cooldown(self) -> timedelta | None:
        return None if self.reentry in ("once", "every_occurrence") else duration(self.reentry)


def trigger_files() -> dict[str, TriggerFile]:
    out = {}
    for path in sorted((ROOT / "triggers").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "kind" not in data:
            continue
        window = data.get("send_window", "12h" if data["kind"] == "campaign" else None)
        reentry = str(data.get("reentry", DEFAULT_REENTRY[data["kind"]]))
        out[data["name"]] = TriggerFile(data["name"], data["kind"], reentry,
                                        duration(window) if window else None, data["schedule"]["cron"],
                                        data["schedule"].get("timezone", "UTC"))
    return out


FILES = trigger_files()


# -- the invariants ---------------------------------------------------------------

def occurrence_of(mail: Mail, file: TriggerFile) -> str:
    """Which occurrence an every-occurrence mail is for, told by the timeline where it can."""
    if file.kind == "complaint":
        found = re.search(r"#(\d+)", mail.subject)
        return f"complaint {found.group(1) if found else '?'}"
    if file.kind == "consent_confirmation":
        return f"request {mail.requested}"
    return mail.occurrence  # a campaign's slot, as the ledger names it


def entry(mail: Mail) -> bool:
    """The mail of a journey's first step, or a trigger's one mail: an entry, which re-entry
    rules count. A later step's occurrence extends the entry's with ``/step``."""
    return "/" not in mail.occurrence


def reentry_violations(mails: list[Mail], key: str) -> Iterator[str]:
    """Never two entries of one trigger within its re-entry period, per ``key`` (customer or mailbox)."""
    groups: dict[tuple[str, str], list[Mail]] = defaultdict(list)
    for mail in filter(entry, mails):
        groups[(getattr(mail, key), mail.trigger)].append(mail)
    for (who, trigger), group in groups.items():
        file = FILES.get(trigger)
        if file is None or len(group) < 2:
            continue
        if key == "mailbox" and (not file.marketing or len({m.customer for m in group}) < 2):
            continue  # one customer's mailbox: already judged per customer
        group.sort(key=lambda m: m.moment)
        customers = ", ".join(sorted({m.customer for m in group}))
        if file.reentry == "once":
            yield (f"{key} {who} ({customers}) got {trigger} {len(group)} times (re-entry: once): "
                   + ", ".join(f"{m.moment:%Y-%m-%d %H:%M} ({m.customer}, {m.occurrence})" for m in group))
        elif file.cooldown is not None:
            for a, b in pairwise(group):
                if b.moment - a.moment < file.cooldown:
                    yield (f"{key} {who} got {trigger} at {a.moment:%Y-%m-%d %H:%M} ({a.customer}, {a.occurrence}) "
                           f"and again at {b.moment:%Y-%m-%d %H:%M} ({b.customer}, {b.occurrence}): "
                           f"within its re-entry of {file.reentry}")
        else:
            seen = Counter(occurrence_of(m, file) for m in group)
            for occurrence, n in seen.items():
                if n > 1:
                    yield f"{key} {who} got {trigger} {n} times for {occurrence} (re-entry: every occurrence)"


def exactly_once_violations(record: Record) -> Iterator[str]:
    """Every accepted message has its ledger row, and no Message-ID (hence no send key) arrives twice."""
    for message_id, n in Counter(m.message_id for m in record.mails).items():
        if n > 1:
            yield f"Message-ID {message_id} received {n} times"
    for mail in record.mails:
        if not mail.trigger:
            yield f"{mail.recipient} got a mail at {mail.moment} with no ledger row ({mail.message_id})"
            continue
        file = FILES[mail.trigger]
        expected = f"<{mail.trigger}." if file.marketing else None
        if (mail.list_id or None) if expected is None else not (mail.list_id or "").startswith(expected):
            yield f"{mail.trigger} mail to {mail.recipient} has List-Id {mail.list_id!r}"


def send_window_violations(record: Record) -> Iterator[str]:
    """Never a campaign slot entered after its send window (a journey's later steps follow their entry)."""
    for mail in filter(entry, record.mails):
        file = FILES.get(mail.trigger)
        if file is None or file.kind != "campaign":
            continue
        slot = datetime.strptime(mail.occurrence, "slot:%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        assert file.send_window is not None
        minute, hour, _, _, weekday = file.cron.split()
        local = slot.astimezone(ZoneInfo(file.zone))
        on_schedule = (local.minute, local.hour, local.isoweekday() % 7) == (int(minute), int(hour), int(weekday))
        if not on_schedule or not timedelta(0) <= mail.moment - slot <= file.send_window:
            yield (f"{mail.customer} got {mail.trigger} at {mail.moment:%Y-%m-%d %H:%M} for the slot of "
                   f"{slot:%Y-%m-%d %H:%M} UTC (send window {file.send_window})")


def consent_violations(record: Record) -> Iterator[str]:
    """Marketing only with confirmed consent, no suppression and the category not left — at
    that moment; service mail never to an address blocked for good; confirmations only to
    customers with a request pending."""
    for mail in record.mails:
        file = FILES.get(mail.trigger)
        if file is None:
            continue
        when = f"{mail.trigger} to {mail.customer} <{mail.recipient}> at {mail.moment:%Y-%m-%d %H:%M}"
        if file.marketing:
            if not mail.consent:
                yield f"{when} without confirmed consent"
            if mail.suppression:
                yield f"{when} while the address was suppressed ({mail.suppression})"
            if file.kind in mail.opt_outs:
                yield f"{when} after leaving the category {file.kind}"
        elif mail.suppression in BLOCKS_SERVICE_MAIL:
            yield f"{when} while the address was suppressed ({mail.suppression})"
        if file.kind == "consent_confirmation" and not mail.requested:
            yield f"{when} with no consent request pending"


def zone_of(name: str | None, policy: PolicyVariant) -> ZoneInfo:
    try:
        return ZoneInfo(name or policy.default_timezone)
    except (ValueError, KeyError):  # ZoneInfoNotFoundError is a KeyError
        return ZoneInfo(policy.default_timezone)


def quiet(local: time, window: tuple[str, str]) -> bool:
    start, end = (time.fromisoformat(t) for t in window)
    if start == end:
        return False
    return (local >= start or local < end) if start > end else start <= local < end


def policy_violations(record: Record) -> Iterator[str]:
    """No marketing mail in the recipient's quiet hours; never more than the caps allow per mailbox."""
    policy = record.timeline.policy
    marketing = [m for m in record.mails if m.trigger in FILES and FILES[m.trigger].marketing]
    if policy.quiet:
        for mail in marketing:
            local = mail.moment.astimezone(zone_of(mail.zone, policy))
            if quiet(local.time(), policy.quiet):
                yield (f"{mail.trigger} to {mail.customer} at {local:%Y-%m-%d %H:%M %Z} ({mail.zone}): "
                       f"inside quiet hours {policy.quiet[0]}–{policy.quiet[1]}")
    by_mailbox: dict[str, list[Mail]] = defaultdict(list)
    for mail in marketing:
        by_mailbox[mail.mailbox].append(mail)
    for mailbox, mails in by_mailbox.items():
        mails.sort(key=lambda m: m.moment)
        for cap in policy.caps:
            # Each mail paired with the one cap.max later: the shorter tail ends the pairs.
            for first, last in zip(mails, mails[cap.max:], strict=False):
                if last.moment - first.moment < cap.per:
                    between = [m for m in mails if first.moment <= m.moment <= last.moment]
                    yield (f"{mailbox} got {len(between)} marketing mails within {last.moment - first.moment} "
                           f"(cap {cap.max} per {cap.per}): "
                           + ", ".join(f"{m.trigger} {m.moment:%m-%d %H:%M} ({m.customer})" for m in between))
                    break


def prediction_violations(record: Record) -> Iterator[str]:
    """A dry run sends and records nothing, and predicts exactly what the real run at the same moment sends."""
    for p in record.predictions:
        at = f"{p.trigger} at {p.moment:%Y-%m-%d %H:%M}"
        if p.dry_received or p.dry_ledger_changed:
            yield f"dry run of {at} sent {p.dry_received} mail(s) / changed the ledger: {p.dry_ledger_changed}"
        if not p.would_send == p.sent == len(p.received):
            yield (f"dry run of {at} said would_send {p.would_send} ({sorted(p.planned)}); the real run sent "
                   f"{p.sent} and the server got {len(p.received)} ({sorted(p.received)})")
        elif p.would_send <= 50 and Counter(p.planned) != Counter(p.received):
            yield f"dry run of {at} planned {sorted(p.planned)}; the server got mail for {sorted(p.received)}"


def due_mailbox_violations(record: Record) -> Iterator[str]:
    """One mailbox, one mail — but one: with no caps and no quiet hours to defer anything,
    a win-back or onboarding run reaches exactly the mailboxes that have a customer due
    (stage, sign-up day, consent, no suppression, category kept) and no mail of that
    trigger within its re-entry period."""
    policy = record.timeline.policy
    if policy.caps or policy.quiet:
        return
    for run in record.runs:
        file = FILES[run.trigger]
        if not run.audience or run.crashed_before or file.kind not in ("campaign", "onboarding"):
            continue
        day = timedelta(days=int(re.sub(r"\D", "", run.trigger) or 0))
        expected, unsure = set(), False
        for c in run.customers:
            if file.kind == "campaign":  # the win-back's audience: stage lapsed, no order for 365 days
                if c.last_order is None:
                    continue
                quiet_for = run.moment - c.last_order
                unsure |= abs(quiet_for - timedelta(days=365)) < timedelta(days=1)
                due = quiet_for >= timedelta(days=365)
            else:
                assert c.signed_up is not None
                since = run.moment - day - c.signed_up
                unsure |= min(abs(since), abs(since - timedelta(days=2))) < timedelta(minutes=1)
                due = timedelta(0) <= since < timedelta(days=2)
            if due and c.consent and c.address.lower() not in run.suppressed and file.kind not in c.opt_outs:
                expected.add(c.address.lower())
        earlier = [m for m in record.mails if m.trigger == run.trigger and m.run < run.run and entry(m)]
        cooldown = file.cooldown or timedelta(days=36500)
        expected -= {m.mailbox for m in earlier if run.moment - m.moment < cooldown}
        got = {m.mailbox for m in record.mails if m.run == run.run and m.trigger == run.trigger and entry(m)}
        if not unsure and got != expected:
            yield (f"{run.trigger} at {run.moment:%Y-%m-%d %H:%M} reached {sorted(got)}; due were {sorted(expected)}")


CHECKS = {
    "exactly once": exactly_once_violations,
    "re-entry per customer": lambda r: reentry_violations(r.mails, "customer"),
    "re-entry per mailbox": lambda r: reentry_violations(r.mails, "mailbox"),
    "send window": send_window_violations,
    "consent and suppressions": consent_violations,
    "quiet hours and caps": policy_violations,
    "dry run predicts the run": prediction_violations,
    "every mailbox due gets its mail": due_mailbox_violations,
}


def violations(record: Record) -> dict[str, list[str]]:
    found = {name: list(check(record)) for name, check in CHECKS.items()}
    return {name: v for name, v in found.items() if v}


def assert_kept(record: Record) -> None:
    broken = violations(record)
    assert not broken, "\n".join(f"{name}:\n  " + "\n  ".join(v) for name, v in broken.items())


# -- fixtures -----------------------------------------------------------------------

@pytest.fixture
def stores(db_url: str, tmp_path: Path) -> Stores:
    return Stores(db_url, tmp_path)


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> Projects:
    """One for the module: loading a policy variant's project (every template checked) costs
    half a second, and the tests only read it, so each variant is loaded once, not once a test."""
    return Projects(copy_project(tmp_path_factory.mktemp("projects") / "project"))


# -- the property -------------------------------------------------------------------

@given(timeline=timelines)
def test_random_timelines_keep_every_promise(timeline: Timeline, stores: Stores, projects: Projects,
                                             settings: Settings, smtp: SmtpServer) -> None:
    record = play(timeline, stores, projects, settings, smtp)
    target(float(len(record.mails)), label="mails received")  # timelines that send are the ones that test
    event(f"mails: {min(len(record.mails), 5)}{'+' if len(record.mails) >= 5 else ''}")
    event(f"dry runs compared: {min(len(record.predictions), 2)}")
    event(f"mailboxes shared: {len({m.mailbox for m in record.mails if m.mailbox in shared(timeline)}) > 0}")
    assert_kept(record)


def shared(timeline: Timeline) -> set[str]:
    """Mailboxes of two customers or more (a guest and an account, say)."""
    boxes = Counter(p.mailbox for p in timeline.people)
    boxes.update(s.person.mailbox for _, s in timeline.steps if isinstance(s, SignUp))
    return {MAILBOXES[b] for b, n in boxes.items() if n > 1}


def test_the_invariants_catch_what_they_are_about(stores: Stores, projects: Projects, settings: Settings,
                                                 smtp: SmtpServer) -> None:
    """Each check fails on a record that breaks it: a check that cannot fail guards nothing."""
    timeline = Timeline(datetime(2026, 12, 14, 8, 0, tzinfo=UTC), (Person(),),
                        ((timedelta(hours=2), Run("winback-lapsed")),), policy=PolicyVariant(caps=(), quiet=None))
    record = play(timeline, stores, projects, settings, smtp)
    assert_kept(record)
    [mail] = record.mails
    from dataclasses import replace

    def broken(*mails: Mail, policy: PolicyVariant = timeline.policy) -> dict[str, list[str]]:
        return violations(Record(replace(timeline, policy=policy), mails=list(mails)))

    later = replace(mail, moment=mail.moment + timedelta(days=10), message_id="<other@x>")
    assert set(broken(mail, mail)) == {"exactly once", "re-entry per customer"}
    assert set(broken(mail, later)) == {"re-entry per customer", "send window"}
    twin = replace(mail, customer="p-2", message_id="<twin@x>", moment=mail.moment + timedelta(hours=1))
    assert set(broken(mail, twin)) == {"re-entry per mailbox"}
    assert set(broken(replace(mail, consent=False))) == {"consent and suppressions"}
    assert set(broken(replace(mail, opt_outs=frozenset({"campaign"})))) == {"consent and suppressions"}
    night = replace(mail, moment=datetime(2026, 12, 14, 21, 30, tzinfo=UTC))
    assert set(broken(night, policy=SHIPPED_POLICY)) == {"quiet hours and caps"}
    assert set(broken(mail, twin, policy=PolicyVariant(caps=(Cap(1, timedelta(hours=16)),), quiet=None))) == {
        "quiet hours and caps", "re-entry per mailbox"}


# -- failures found, as plain regression tests -------------------------------------

_ = (Crash, Fact, SignUp, Sweep)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def timeline_of(start: str, *steps: tuple[str, object], people: tuple[Person, ...] = (Person(),),
                policy: PolicyVariant = SHIPPED_POLICY, batch_size: int = 500) -> Timeline:
    """A timeline written as moments (UTC) and steps, for the regression tests below."""
    moments = [at(start)] + [at(moment) for moment, _ in steps]
    gaps = [b - a for a, b in pairwise(moments)]
    return Timeline(moments[0], people, tuple(zip(gaps, (step for _, step in steps), strict=True)),  # type: ignore[arg-type]
                    policy=policy, batch_size=batch_size)


def test_a_win_back_deferred_for_the_cap_and_sent_late_blocks_the_next_slot(
        stores: Stores, projects: Projects, settings: Settings, smtp: SmtpServer) -> None:
    """``lifecycle demo``'s story: a cart reminder makes the Monday win-back wait for the 16 h
    cap; sent on Sunday, it must keep the next Monday's slot away (re-entry 60d)."""
    record = play(timeline_of(
        "2026-12-14T08:00",
        ("2026-12-14T08:10", Fact("cart")),
        ("2026-12-14T10:15", Run("abandoned-cart")),
        ("2026-12-14T10:25", Run("winback-lapsed")),  # deferred: the cart reminder was 10 minutes ago
        ("2026-12-20T09:00", Run("winback-lapsed")),
        ("2026-12-21T10:00", Run("winback-lapsed")),
    ), stores, projects, settings, smtp)
    assert [(m.trigger, f"{m.moment:%m-%d %H:%M}") for m in record.mails] == [
        ("abandoned-cart", "12-14 10:15"), ("winback-lapsed", "12-20 09:00")]
    assert_kept(record)


NO_PRESSURE = PolicyVariant(caps=(), quiet=None)


def test_a_shared_mailbox_gets_its_onboarding_mail_when_the_other_customer_is_not_due(
        stores: Stores, projects: Projects, settings: Settings, smtp: SmtpServer) -> None:
    """A guest who signed up today shares the address of an old account: the mailbox gets
    the welcome mail once, not never."""
    record = play(timeline_of(
        "2026-12-14T08:00", ("2026-12-14T08:20", Run("onboarding-day-0")),
        people=(Person(signed_up_days=0, last_order_days=None), Person(signed_up_days=600, last_order_days=None)),
        policy=NO_PRESSURE), stores, projects, settings, smtp)
    assert [(m.customer, m.trigger) for m in record.mails] == [("p-1", "onboarding-day-0")]
    assert_kept(record)


def test_a_shared_mailbox_gets_its_onboarding_mail_when_the_other_customer_has_no_consent(
        stores: Stores, projects: Projects, settings: Settings, smtp: SmtpServer) -> None:
    """Both signed up today with one address; only one may be written to: that one is."""
    record = play(timeline_of(
        "2026-12-14T08:00", ("2026-12-14T08:20", Run("onboarding-day-0")),
        people=(Person(signed_up_days=0, last_order_days=None),
                Person(consent="none", signed_up_days=0, last_order_days=None)),
        policy=NO_PRESSURE), stores, projects, settings, smtp)
    assert [(m.customer, m.trigger) for m in record.mails] == [("p-1", "onboarding-day-0")]
    assert_kept(record)


def test_a_shared_mailbox_gets_the_win_back_when_only_one_of_its_customers_is_lapsed(
        stores: Stores, projects: Projects, settings: Settings, smtp: SmtpServer) -> None:
    """p-1 last ordered 500 days ago (lapsed), p-2 with the same address 10 days ago (not in
    the win-back's audience): the mailbox gets the win-back once."""
    record = play(timeline_of(
        "2026-12-14T08:00", ("2026-12-14T10:00", Run("winback-lapsed")),
        people=(Person(last_order_days=500), Person(last_order_days=10)), policy=NO_PRESSURE),
        stores, projects, settings, smtp)
    assert [(m.customer, m.trigger) for m in record.mails] == [("p-1", "winback-lapsed")]
    assert_kept(record)
