"""SMTP delivery: a few reused connections, retries for what is temporary, nothing twice.

Only this module talks to the SMTP server. Each message goes MAIL → RCPT → DATA on
one of ``connections`` open sessions. When the server offers PIPELINING (RFC 2920),
MAIL, RCPT and DATA go in one write and their three replies are read in order; and a
message's content goes in one write with the next message's MAIL, RCPT and DATA (the
RFC lets the content open a group), its reply read before theirs. So a session's first
message costs two round trips and each one after it one, where one command at a time
costs four: across a network, round trips are what a send costs. A server without it
gets one command per round trip. A 4xx reply or a dropped connection before
DATA is retried with exponential backoff (tenacity); a 5xx is final. A connection
lost *during* DATA is ambiguous (the server may have accepted the message), so it
is never retried: it is reported ``in_doubt`` and its claim stays in the ledger.

Each permanent refusal is classified (``flows.feedback.bounces.classify``) as it comes back, and a
``Breaker`` watches them: when they say the relay is at fault rather than the
recipients (a login refused, a streak of policy refusals, most of a batch's first
recipients refused), the batch stops at once with ``RelayRefused`` and its refusals
are handed back undecided, so nobody is blamed for the relay's configuration.
"""

import asyncio
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
from aiolimiter import AsyncLimiter
from aiosmtplib import (
    SMTPDataError,
    SMTPException,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPSenderRefused,
)
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from flows.feedback.bounces import Verdict, classify, enhanced_code
from flows.outcomes import Outcome
from flows.redaction import redact_url
from models import FeedbackKind
from models.types import stored_address


@dataclass(frozen=True)
class SmtpConfig:
    hostname: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: str = "none"  # none | starttls | ssl
    timeout: float = 30.0
    connections: int = 4  # concurrent sessions this provider allows us
    rate: float | None = None  # messages per second this provider allows us (None: unlimited)

    @classmethod
    def from_url(cls, url: str) -> "SmtpConfig":
        """``smtp://user:pass@host:587?tls=starttls&connections=4&rate=50&timeout=30`` (``smtps://`` = TLS).

        Every error shows the URL with its password hidden (``redact_url``), and chains no
        parser's error: those quote pieces of the URL, a password's among them."""
        shown = redact_url(url)
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError(f"LIFECYCLE_SMTP_URL must look like smtp://user:pass@host:587?tls=starttls, got {shown!r}")
        if "@" in parts.path + parts.query + parts.fragment:
            # A password with a raw / ? or # in it: the rest of it would be read as the host and port.
            raise ValueError("LIFECYCLE_SMTP_URL: percent-encode / ? # @ in the user or password "
                             f"(%2F %3F %23 %40), got {shown!r}")
        try:
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            tls = "ssl" if parts.scheme == "smtps" else query.get("tls", "none")
            if tls not in ("none", "starttls", "ssl"):
                raise ValueError(f"tls must be none, starttls or ssl, got {tls!r}")
            default_port = {"ssl": 465, "starttls": 587}.get(tls, 25)
            return cls(
                hostname=parts.hostname,
                port=parts.port or default_port,
                username=unquote(parts.username) if parts.username else None,
                password=unquote(parts.password) if parts.password else None,
                tls=tls,
                timeout=float(query.get("timeout", 30)),
                connections=max(1, int(query.get("connections", 4))),
                rate=float(query["rate"]) if "rate" in query else None,
            )
        except ValueError as exc:
            why = (str(exc) if str(exc).startswith("tls must be")
                   else "a port, timeout, connections or rate is not a number")
            raise ValueError(f"LIFECYCLE_SMTP_URL: {why}, got {shown!r}") from None


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    backoff: float = 1.0
    backoff_max: float = 30.0


@dataclass(frozen=True, slots=True)
class Envelope:
    key: str
    sender: str
    recipient: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Delivery:
    key: str
    result: Outcome  # sent, retry, in doubt, or refused for good (bounced, soft bounce, rejected)
    reply: str
    verdict: Verdict | None = None  # a permanent refusal (bounced, rejected): what it says about the address
    code: int | None = None  # the refusal's SMTP reply code
    ours: bool = False  # refused here, before the server saw it: nothing for the breaker to judge


# SMTP AUTH refused (RFC 4954): 530 authentication required, 534 mechanism too weak, 535 credentials invalid.
AUTH_CODES = frozenset({530, 534, 535})
# The share sign needs at least this many refusals (a small batch's refusals are judged at its
# end instead: see ``Breaker.settle``).
MIN_SHARE_REFUSALS = 3


@dataclass(frozen=True)
class BreakerPolicy:
    """When a batch's refusals are the relay's fault (``LIFECYCLE_BREAKER_*``).

    The streak and the share count message-level refusals (the verdict is not about the
    address: policy, relay denial, authentication, content, size); a bounce neither
    counts toward them nor resets the streak. A relay can also call every address
    unknown (a relay that thinks the recipients' domain is its own): more than
    ``bounce_share`` of the sample refused for any reason, bounces included, trips too.
    """

    consecutive: int = 10  # message-level refusals in a row (a sent mail resets the streak)
    sample: int = 50  # the first recipients of a batch (all of them in a smaller batch) ...
    share: float = 0.2  # ... of which more than this share refused at message level trips
    bounce_share: float = 0.5  # ... or more than this share refused, bounces included


class SmtpUnavailable(Exception):
    """The server could not be reached even after retries; ``done`` lists what was delivered."""

    def __init__(self, message: str, done: list[Delivery]) -> None:
        super().__init__(message)
        self.done = done

    # Raised in a sender process, re-raised in the flow's.
    def __reduce__(self) -> tuple[type[Self], tuple[str, list[Delivery]]]:
        return (type(self), (str(self), self.done))


class RelayRefused(SmtpUnavailable):
    """The relay refused in a way that is its own fault (login, policy for everyone): the
    batch stopped at once. ``done`` lists the deliveries decided before it stopped; the
    refusals that tripped the breaker are not among them, so their claims are released
    and nobody is suppressed for them. The message quotes the relay, never a password."""


class Breaker:
    """One batch's judgement of its refusals, shared by all of its connections.

    A message-level refusal is held (left undecided) while it may still prove the relay's
    fault: during the batch's sample, and while its streak lasts. It is decided (returned
    for the ledger) once the sample is over and a later mail was accepted, or when the
    batch ends untripped (``settle``). When the breaker trips, whatever it holds stays
    undecided: those claims go back to the ledger unsent.

    "Later" is by when a mail started, not when its reply came: over several sessions, and
    with a mail's commands sent ahead behind another's content, a mail started before a
    refusal came back may be answered after it, and its acceptance says nothing about the
    relay since. An accepted mail vouches for what was observed before it started
    (``observe``'s ``started``): only those refusals leave the streak, and only those held
    are decided.
    """

    def __init__(self, policy: BreakerPolicy, recipients: int | None = None) -> None:
        self.policy = policy
        self.sample = min(policy.sample, recipients) if recipients else policy.sample
        self.seen = self.sampled_refusals = self.sampled_bounces = self.accepted = 0
        self.held: dict[str, Delivery] = {}
        self._held_at: dict[str, int] = {}  # each held delivery's place among those observed
        self._refusals: list[int] = []  # the places of the message-level refusals no acceptance vouched for
        self._vouched = 0  # every delivery observed up to here is vouched for by a later acceptance
        self.tripped: str | None = None  # why, in the relay's words

    @property
    def streak(self) -> int:
        """Message-level refusals in a row: since the last acceptance that vouches for them."""
        return len(self._refusals)

    def observe(self, delivery: Delivery, started: int | None = None) -> list[Delivery]:
        """Count one delivery; returns the deliveries decided by it (itself, or none, or
        the refusals it clears). A bounce within the sample is held as well: until the
        sample is judged, it may be the relay calling everyone unknown. ``started``: how
        many deliveries had been observed when this mail started (``seen`` then; None: it
        started after all of them)."""
        self.seen += 1
        verdict, in_sample = delivery.verdict, self.seen <= self.sample
        if verdict is not None and (not verdict.about_the_address or in_sample):
            self.held[delivery.key], self._held_at[delivery.key] = delivery, self.seen
            if not verdict.about_the_address:
                self._refusals.append(self.seen)
                if in_sample:
                    self.sampled_refusals += 1
            else:
                self.sampled_bounces += 1
            if self.tripped is None:
                self.tripped = self._trips(delivery)
            return []
        if delivery.result == Outcome.SENT:
            self.accepted += 1
            self._vouched = max(self._vouched, self.seen if started is None else started)
            self._refusals = [place for place in self._refusals if place > self._vouched]
        decided = [delivery]
        if self.tripped is None and self.seen >= self.sample:
            cleared = [key for key, place in self._held_at.items() if place <= self._vouched]
            decided.extend(self.held.pop(key) for key in cleared)
            for key in cleared:
                del self._held_at[key]
        return decided

    def _trips(self, refusal: Delivery) -> str | None:
        policy = self.policy
        if refusal.code in AUTH_CODES:
            return f"refused our login: {refusal.reply}"
        if self.streak >= policy.consecutive:
            return f"refused {self.streak} mails in a row (the last: {refusal.reply})"
        if self.sampled_refusals >= MIN_SHARE_REFUSALS and self.sampled_refusals > policy.share * self.sample:
            return (f"refused {self.sampled_refusals} of the batch's first {self.sample} recipients, more than "
                    f"{policy.share:.0%} (the last: {refusal.reply})")
        refused = self.sampled_refusals + self.sampled_bounces
        if refused >= MIN_SHARE_REFUSALS and refused > policy.bounce_share * self.sample:
            return (f"refused {refused} of the batch's first {self.sample} recipients, more than "
                    f"{policy.bounce_share:.0%}, most as unknown addresses (the last: {refusal.reply})")
        return None

    def settle(self) -> list[Delivery]:
        """The batch ended: what was held is decided after all, unless the relay accepted
        none of the batch and refused at message level all the same (a run of one or two
        mails to a relay that denies everyone): then it trips, and those go back unsent."""
        if self.tripped is None and self.held and not self.accepted:
            refusals = [d for d in self.held.values() if d.verdict is not None and not d.verdict.about_the_address]
            if refusals:
                self.tripped = (f"accepted none of the batch's {self.seen} mails and refused {len(refusals)} "
                                f"(the last: {refusals[-1].reply})")
        decided = [] if self.tripped else list(self.held.values())
        if decided:
            self.held.clear()
            self._held_at.clear()
        return decided


class _InDoubt(Exception):
    pass


class _PipelinedProtocol(aiosmtplib.protocol.SMTPProtocol):
    """aiosmtplib's protocol, able to read replies to commands written together (RFC 2920).

    aiosmtplib reads one reply per command written: data arriving once a reply is parsed
    but not yet picked up is dropped, and a reply already in its buffer is never looked at
    again. While ``pipelined`` is set, every byte is kept, and each ``read_response`` first
    takes a complete reply from the buffer. A session's protocol becomes this class as it
    connects (``Mailer._connect``); nothing else about aiosmtplib changes.
    """

    pipelined = False

    def data_received(self, data: bytes) -> None:
        if not self.pipelined:
            super().data_received(data)
            return
        self._buffer.extend(data)
        self._deliver()

    async def read_response(self, timeout: float | None = None) -> aiosmtplib.SMTPResponse:
        if self.pipelined:
            self._deliver()
        return await super().read_response(timeout)

    def _deliver(self) -> None:
        waiter = self._response_waiter
        if waiter is None or waiter.done():
            return
        try:
            response = self._read_response_from_buffer()
        except Exception as exc:  # noqa: BLE001 - a malformed reply fails the read, as in aiosmtplib
            self._set_response_exception(waiter, exc)
        else:
            if response is not None:
                waiter.set_result(response)


@dataclass(eq=False)
class _Ahead:
    """The next mail of a session, its MAIL, RCPT and DATA written behind the content of the
    one before it (``_content``): the session they went out on, their replies once read (or
    what lost them), and, if the mail ahead of it was retried on that session, this mail's
    whole outcome, sent to its end first (``Mailer._finish``)."""

    envelope: "Envelope"
    protocol: "_PipelinedProtocol"
    replies: list[aiosmtplib.SMTPResponse] = field(default_factory=list)
    error: BaseException | None = None
    answered: bool = False  # the replies were read (all three, or up to ``error``)
    outcome: str | BaseException | None = None
    started: int = 0  # deliveries the breaker had observed when its commands went out


class _Offer:
    """A session's next mail, offered to the content write of the mail before it: ``take``
    hands it over (or None: it needs its own transaction, or there is none); ``ahead`` is
    what became of it."""

    def __init__(self, take: "Callable[[], tuple[Envelope, bytes, int] | None]", stopped: Callable[[], bool]) -> None:
        self.take, self.stopped = take, stopped
        self.ahead: _Ahead | None = None


class _NoSmtpUtf8(Exception):
    """The recipient needs SMTPUTF8 and the server does not offer it."""


def _code(exc: BaseException) -> int | None:
    return exc.code if isinstance(exc, SMTPResponseException) else None


def _connection_lost(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectionError, TimeoutError, OSError)) and _code(exc) is None


def is_transient(exc: BaseException) -> bool:
    code = _code(exc)
    return (code is not None and 400 <= code < 500) or _connection_lost(exc)


class Mailer:
    """``async with Mailer(config, policy) as mailer: await mailer.send(envelopes)``, then
    ``mailer.settle()`` for the refusals the breaker held until the end.

    One Mailer sends one batch (``recipients`` long, when known): its breaker judges that
    batch's refusals across every window and connection.
    """

    def __init__(self, config: SmtpConfig, policy: RetryPolicy, breaker: BreakerPolicy = BreakerPolicy(),
                 recipients: int | None = None) -> None:
        self.config, self.policy = config, policy
        self.breaker = Breaker(breaker, recipients)
        self._idle: list[aiosmtplib.SMTP] = []
        # One message per 1/rate seconds, shared by all connections: no bursts above the limit.
        self._pace = AsyncLimiter(1, 1 / config.rate) if config.rate else None

    async def __aenter__(self) -> "Mailer":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(self._close(client) for client in self._idle))
        self._idle.clear()

    async def check(self) -> None:
        """Before the first mail: reach the server (with the usual retries) or fail the run."""
        try:
            async for attempt in self._retrying():
                with attempt:
                    client = await self._connect()
                    await client.noop()
        except SMTPException as exc:
            if is_transient(exc):
                raise SmtpUnavailable(self._unreachable(exc), []) from exc
            # Reached, but refused: a login refused, a greeting of 554, AUTH not offered.
            code = _code(exc)
            what = "refused our login" if code in AUTH_CODES else "refused the session"
            raise RelayRefused(self._refused(f"{what}: {_reply(exc)}"), []) from exc
        except Exception as exc:  # whatever else stops us reaching it fails the run
            raise SmtpUnavailable(self._unreachable(exc), []) from exc
        self._idle.append(client)

    def _unreachable(self, exc: BaseException) -> str:
        return (f"SMTP server {self.config.hostname}:{self.config.port} unreachable after "
                f"{self.policy.attempts} attempts: {exc!r}")

    def _refused(self, why: str) -> str:
        """One line for the operator: the relay's words, never the URL (it may hold a password)."""
        return (f"SMTP relay {self.config.hostname}:{self.config.port} {why}; the batch stopped, its unsent mails "
                f"stay for the next run and nobody was suppressed for it (check the relay's credentials and what it "
                f"allows)")

    def settle(self) -> list[Delivery]:
        """After the batch's last window: the refusals the breaker held, decided; raises
        ``RelayRefused`` when the batch's end shows the relay at fault."""
        decided = self.breaker.settle()
        if self.breaker.tripped is not None:
            raise RelayRefused(self._refused(self.breaker.tripped), [])
        return decided

    def _retrying(self, after_first: bool = False) -> AsyncRetrying:
        """Attempts with exponential backoff; ``after_first``: the rest of them, once a first
        attempt made outside (see ``_deliver``) has failed and its backoff been waited."""
        policy, skipped = self.policy, 1 if after_first else 0
        return AsyncRetrying(
            stop=stop_after_attempt(policy.attempts - skipped),
            wait=wait_exponential(multiplier=policy.backoff * 2**skipped, max=policy.backoff_max),
            retry=retry_if_exception(is_transient),
            reraise=True,
        )

    async def send(self, envelopes: Sequence[Envelope]) -> list[Delivery]:
        """Send a window; returns the deliveries decided (a refusal the breaker holds comes
        back from a later call or ``settle``). Raises ``RelayRefused`` as soon as the
        breaker trips (no connection takes another envelope), ``SmtpUnavailable`` when the
        server stays unreachable."""
        queue = deque(envelopes)
        done: list[Delivery] = []
        unreachable: list[BaseException] = []
        breaker = self.breaker

        def stopped() -> bool:
            return bool(unreachable) or breaker.tripped is not None

        def take() -> tuple[Envelope, bytes, int] | None:
            """The next mail, if its commands may follow a content in one write: it, those
            commands, and when it started."""
            if not queue or stopped() or self._pace is not None or not queue[0].recipient.isascii():
                return None  # over SMTPUTF8, a mail has a transaction of its own
            try:
                group = _group(queue[0].sender, queue[0].recipient)
            except SMTPResponseException:
                return None  # its own transaction says what is wrong with it
            return queue.popleft(), group, breaker.seen

        def report(delivery: Delivery, started: int) -> None:
            done.extend([delivery] if delivery.ours else breaker.observe(delivery, started))

        async def worker() -> None:
            client = self._idle.pop() if self._idle else None
            ahead: _Ahead | None = None  # its commands already on this session, behind the last content
            try:
                while ahead is not None or (queue and not stopped()):
                    if ahead is not None and stopped() and ahead.outcome is None:
                        # Its DATA may be accepted but its content never went: ending the
                        # session drops it, and its claim goes back with the batch's.
                        if client is not None:
                            client.close()
                        client, ahead = None, None
                        break
                    current, ahead = ahead, None
                    if current is not None:
                        envelope, started = current.envelope, current.started
                    else:
                        envelope, started = queue.popleft(), breaker.seen
                    offer = _Offer(take, stopped)
                    try:
                        delivery, client = await self._deliver(client, envelope, current, offer)
                    except Exception as exc:  # noqa: BLE001 - connection failures outlasting every retry
                        unreachable.append(exc)
                        sent_ahead = offer.ahead.outcome if offer.ahead is not None else None
                        if sent_ahead is not None and not (isinstance(sent_ahead, BaseException)
                                                           and is_transient(sent_ahead)):
                            # Sent to its end before this mail's retries ran out: its outcome is
                            # known and needs no session (a temporary refusal just goes back).
                            assert offer.ahead is not None
                            report((await self._deliver(None, offer.ahead.envelope, offer.ahead))[0],
                                   offer.ahead.started)
                        return
                    report(delivery, started)
                    ahead = offer.ahead
            finally:
                if client is not None and client.is_connected:
                    if ahead is None:
                        self._idle.append(client)
                    else:  # commands of a mail not sent wait on it: nobody else may use it
                        client.close()

        workers = min(self.config.connections, len(envelopes))
        await asyncio.gather(*(worker() for _ in range(workers)))
        if breaker.tripped is not None:
            raise RelayRefused(self._refused(breaker.tripped), done)
        if unreachable:
            raise SmtpUnavailable(self._unreachable(unreachable[0]), done)
        return done

    async def _deliver(self, client: aiosmtplib.SMTP | None, envelope: Envelope, ahead: _Ahead | None = None,
                       offer: _Offer | None = None) -> tuple[Delivery, aiosmtplib.SMTP | None]:
        """One mail, with its retries. ``ahead``: its commands went out behind the last
        content (or it was sent to its end already); ``offer``: the session's next mail,
        for this one's content write to carry its commands (first attempt only)."""
        connection = client

        async def attempt() -> str:
            nonlocal connection, ahead, offer
            answered, ahead = ahead, None  # an answer read ahead is used once
            offered, offer = offer, None
            if answered is not None and answered.outcome is not None:
                if isinstance(answered.outcome, BaseException):
                    raise answered.outcome
                return answered.outcome
            if self._pace is not None:
                await self._pace.acquire()
            if connection is None or not connection.is_connected:
                connection = await self._connect()
            try:
                return await self._transaction(connection, envelope, answered, offered)
            except Exception as exc:
                if _connection_lost(exc) or _code(exc) == 421:
                    await self._close(connection)
                    connection = None
                raise

        first_offer = offer
        try:
            try:
                # Nearly every mail goes on its first try: that one skips the retry machinery
                # (about 25 µs a mail, a tenth of what its SMTP commands cost).
                reply = await attempt()
            except Exception as exc:
                if not is_transient(exc) or self.policy.attempts < 2:
                    raise
                if first_offer is not None and first_offer.ahead is not None:
                    # The session is this mail's again.
                    await self._finish(connection, first_offer.ahead, first_offer.stopped)
                await asyncio.sleep(min(self.policy.backoff, self.policy.backoff_max))
                reply = await self._retrying(after_first=True)(attempt)
            return Delivery(envelope.key, Outcome.SENT, reply), connection
        except _InDoubt as exc:
            return Delivery(envelope.key, Outcome.IN_DOUBT, str(exc)), connection
        except _NoSmtpUtf8 as exc:  # recorded failed, once: the next run does not try it again
            return Delivery(envelope.key, Outcome.REJECTED, str(exc), Verdict(FeedbackKind.MESSAGE_FAILURE, "5.6.7"),
                            553, ours=True), connection
        except SMTPResponseException as exc:
            code, reply = exc.code, _reply(exc)
            if code >= 500:
                if isinstance(exc, (SMTPRecipientRefused, SMTPDataError)):  # one recipient per transaction
                    verdict = classify(code, exc.message)
                else:  # MAIL (the sender), AUTH, the greeting: never about the recipient
                    verdict = Verdict(FeedbackKind.MESSAGE_FAILURE, enhanced_code(exc.message))
                return Delivery(envelope.key, Outcome.refused(verdict.kind), reply, verdict, code), connection
            return Delivery(envelope.key, Outcome.RETRY, reply), connection

    async def _finish(self, client: aiosmtplib.SMTP | None, ahead: _Ahead, stopped: Callable[[], bool]) -> None:
        """The mail whose commands followed a content that failed, sent to its end (its
        outcome kept for its turn), so that the failed one's retry finds the session free.
        If the batch is stopping, its content is not sent: the session is ended instead (the
        worker then drops the mail, unsent), as when the breaker trips between two mails."""
        if not ahead.answered or ahead.error is not None or client is None or not client.is_connected \
                or client.protocol is not ahead.protocol:
            return  # its commands were lost with the session: it starts afresh on its turn
        if stopped():
            client.close()
            return
        try:
            ahead.outcome = await self._transaction(client, ahead.envelope, ahead, None)
        except Exception as exc:  # noqa: BLE001 - kept, and raised on its turn as if it happened then
            ahead.outcome = exc
            if not isinstance(exc, SMTPResponseException) or exc.code in (421, -1):
                # The session's state is not known (a reply late, lost, or unreadable): a reply
                # still on its way must not be read as the retried mail's.
                await self._close(client)

    async def _transaction(self, client: aiosmtplib.SMTP, envelope: Envelope, ahead: _Ahead | None = None,
                           offer: _Offer | None = None) -> str:
        if ahead is not None and ahead.answered and client.protocol is ahead.protocol:
            try:
                await self._answer(client, ahead.protocol, ahead.envelope.sender, ahead.envelope.recipient,
                                   ahead.replies, ahead.error)
            except SMTPResponseException:
                await _reset(client)
                raise
            return await self._data(client, envelope.data, True, offer)
        recipient = envelope.recipient
        if not recipient.isascii():  # the domain in ASCII, if a store still held Unicode
            recipient = stored_address(recipient)
        utf8 = not recipient.isascii()
        started = False  # DATA accepted already (a pipelined group)
        try:
            if utf8:  # a local part in Unicode: only over SMTPUTF8 (RFC 6531), if this server offers it
                if client.is_ehlo_or_helo_needed:
                    await client.ehlo()
                if not client.supports_extension("smtputf8"):
                    raise _NoSmtpUtf8(f"553 5.6.7 {client.hostname} does not offer SMTPUTF8, which the address's "
                                      "Unicode local part needs: not sent")
                await _command(client, b"MAIL", b"FROM:", envelope.sender, SMTPSenderRefused, (250,), utf8=True)
            elif client.is_ehlo_or_helo_needed and not await _greet(client):  # HELO: no extensions
                await client.mail(envelope.sender)
            elif client.supports_extension("pipelining"):
                await self._pipelined(client, envelope.sender, recipient)
                started = True
            else:
                await _command(client, b"MAIL", b"FROM:", envelope.sender, SMTPSenderRefused, (250,))
            if not started:
                await _command(client, b"RCPT", b"TO:", recipient, SMTPRecipientRefused, (250, 251), utf8=utf8)
        except SMTPResponseException:
            await _reset(client)
            raise
        return await self._data(client, envelope.data, started, offer)

    async def _pipelined(self, client: aiosmtplib.SMTP, sender: str, recipient: str) -> None:
        """MAIL, RCPT and DATA in one write, their three replies matched in order (RFC 2920):
        a refused sender or recipient fails this message only, as one command at a time would.
        Returns once DATA is accepted (354)."""
        protocol = client.protocol
        assert isinstance(protocol, _PipelinedProtocol), "a session's protocol is set as it connects"
        protocol._response_pending = True  # aiosmtplib's flag: a reply is awaited
        protocol.write(_group(sender, recipient))
        replies, error = await _read_group(protocol, self.config.timeout)
        await self._answer(client, protocol, sender, recipient, replies, error)

    async def _answer(self, client: aiosmtplib.SMTP, protocol: "_PipelinedProtocol", sender: str, recipient: str,
                      replies: list[aiosmtplib.SMTPResponse], error: BaseException | None) -> None:
        """A pipelined group's replies, judged: returns once DATA is accepted (354), raises
        the first refusal, or the loss of the session. ``protocol``: the session's, as the
        group was written (a lost session's client has none any more)."""
        if error is not None:
            await self._close(client)
            # A server that refuses and hangs up (421 at RCPT) is answered by its refusal, as one
            # command at a time would have seen it; lost before any refusal, the loss it is.
            if all(reply.code in (250, 251) for reply in replies):
                raise error
        mail, rcpt, start = (replies + [aiosmtplib.SMTPResponse(-1, "")] * 3)[:3]
        if start.code == 354 and (mail.code != 250 or rcpt.code not in (250, 251)):
            # The server took DATA though MAIL or RCPT failed: end it with nothing in it (RFC 2920 3.1).
            protocol.write(b".\r\n")
            await protocol.read_response(self.config.timeout)
        if mail.code != 250:
            raise SMTPSenderRefused(mail.code, mail.message, sender)
        if rcpt.code not in (250, 251):
            raise SMTPRecipientRefused(rcpt.code, rcpt.message, recipient)
        if start.code != 354:
            raise SMTPDataError(start.code, start.message)

    async def _data(self, client: aiosmtplib.SMTP, data: bytes, started: bool = False,
                    offer: _Offer | None = None) -> str:
        """The message's content (``started``: DATA was already accepted, pipelined; then
        ``offer``'s mail, if it takes one, has its commands written right behind it)."""
        try:
            if started:
                response = await _content(client, data, self.config.timeout, offer)
            else:
                response = await client.data(data)
        except SMTPResponseException:
            if offer is None or offer.ahead is None:  # its transaction is over; so is the next one's group
                await _reset(client)
            raise
        except Exception as exc:
            if _connection_lost(exc):
                await self._close(client)
                raise _InDoubt(f"connection lost during DATA: {exc!r}") from None
            raise
        return f"{response.code} {response.message}"

    async def _connect(self) -> aiosmtplib.SMTP:
        config = self.config
        client = aiosmtplib.SMTP(
            hostname=config.hostname,
            port=config.port,
            username=config.username,
            password=config.password,
            use_tls=config.tls == "ssl",
            start_tls=config.tls == "starttls",
            timeout=config.timeout,
        )
        await client.connect()
        protocol = client.protocol
        if protocol is not None and type(protocol) is aiosmtplib.protocol.SMTPProtocol:
            protocol.__class__ = _PipelinedProtocol  # adds behaviour only, no state (see the class)
        return client

    @staticmethod
    async def _close(client: aiosmtplib.SMTP) -> None:
        try:
            if client.is_connected:
                await client.quit()
        except Exception:  # noqa: BLE001 - closing anyway
            client.close()


def _reply(exc: SMTPException) -> str:
    """``554 5.7.1 Relay access denied``: a multi-line reply on one line."""
    code = _code(exc)
    return f"{code or ''} {' / '.join(exc.message.splitlines())}".strip()


# Printable ASCII but space, "<" and ">": what may stand between the brackets of MAIL FROM:<…>
# and RCPT TO:<…> without smuggling in a parameter or a command (recipients were validated at
# ingest; this is the last line). Under SMTPUTF8, printable characters beyond ASCII too (no
# Unicode space, control or format character).
_SAFE_ADDRESS = re.compile(r"[!-;=?-~]+\Z")
_SAFE_UTF8_ADDRESS = re.compile(r"[!-;=?-~\u00a0-\U0010ffff]+\Z")


def _safe(address: str, prefix: bytes, refused: type[SMTPSenderRefused] | type[SMTPRecipientRefused],
          utf8: bool = False) -> bytes:
    """``FROM:<address>`` or ``TO:<address>``, or the refusal if the address could smuggle
    in a parameter or a command."""
    safe = _SAFE_UTF8_ADDRESS.match(address) and address.isprintable() if utf8 else _SAFE_ADDRESS.match(address)
    if not safe:
        raise refused(553, "5.1.3 address not allowed on an SMTP command line", address)
    return prefix + b"<" + address.encode("utf-8" if utf8 else "ascii") + b">"


def _line(verb: bytes, prefix: bytes, address: str,
          refused: type[SMTPSenderRefused] | type[SMTPRecipientRefused]) -> bytes:
    """A whole command line for a pipelined group (ASCII addresses only)."""
    return verb + b" " + _safe(address, prefix, refused) + b"\r\n"


def _group(sender: str, recipient: str) -> bytes:
    """MAIL, RCPT and DATA as one pipelined write (ASCII addresses only)."""
    return (_line(b"MAIL", b"FROM:", sender, SMTPSenderRefused)
            + _line(b"RCPT", b"TO:", recipient, SMTPRecipientRefused) + b"DATA\r\n")


async def _read_group(protocol: "_PipelinedProtocol", timeout: float) -> tuple[list[aiosmtplib.SMTPResponse],
                                                                              BaseException | None]:
    """The three replies to a pipelined MAIL, RCPT and DATA, in order; or those read before
    the session was lost, and the loss."""
    replies: list[aiosmtplib.SMTPResponse] = []
    protocol.pipelined = True
    try:
        for _ in range(3):
            replies.append(await protocol.read_response(timeout))
    except Exception as exc:
        if not _connection_lost(exc):
            raise
        return replies, exc
    finally:
        protocol.pipelined = False
    return replies, None


async def _content(client: aiosmtplib.SMTP, data: bytes, timeout: float,
                   offer: _Offer | None = None) -> aiosmtplib.SMTPResponse:
    """The message after a pipelined DATA's 354: dot-stuffed and ended as aiosmtplib would,
    and, if ``offer`` hands over the session's next mail, its MAIL, RCPT and DATA in the
    same write. This message's reply comes first, then theirs (kept in ``offer.ahead``):
    this message is decided by its own reply, whatever happens to the session after it."""
    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

    protocol = client.protocol
    assert isinstance(protocol, _PipelinedProtocol), "a session's protocol is set as it connects"
    taken = offer.take() if offer is not None else None
    group = b""
    if taken is not None:
        assert offer is not None
        following, group, started = taken
        offer.ahead = _Ahead(following, protocol, started=started)  # from here on, the worker owes it a turn
    protocol._response_pending = True  # aiosmtplib's flag: a reply is awaited
    protocol.pipelined = bool(group)  # replies to several commands in one write: keep every byte
    try:
        protocol.write(PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n" + group)
        response = await protocol.read_response(timeout)
    finally:
        protocol.pipelined = False
    if offer is not None and offer.ahead is not None:
        try:
            offer.ahead.replies, offer.ahead.error = await _read_group(protocol, timeout)
        except Exception as exc:  # noqa: BLE001 - a reply that cannot be read: the next mail's, not this one's
            offer.ahead.replies, offer.ahead.error = [], exc
        offer.ahead.answered = True
        if offer.ahead.error is not None:
            client.close()  # this message has its reply; the session is gone for the next one
    if response.code != 250:
        raise SMTPDataError(response.code, response.message)
    return response


async def _command(client: aiosmtplib.SMTP, verb: bytes, prefix: bytes, address: str,
                   refused: type[SMTPSenderRefused] | type[SMTPRecipientRefused], accepted: tuple[int, ...],
                   utf8: bool = False) -> None:
    """MAIL or RCPT without aiosmtplib's address parsing (``email.utils.parseaddr``, a
    character loop in Python): for the long VERP sender, about 0.1 ms a mail. ``utf8``: the
    transaction is SMTPUTF8 (its MAIL says so, its addresses go as UTF-8)."""
    line = _safe(address, prefix, refused, utf8)
    response = await client.execute_command(verb, line, *([b"SMTPUTF8"] if utf8 and verb == b"MAIL" else []))
    if response.code not in accepted:
        raise refused(response.code, response.message, address)


async def _greet(client: aiosmtplib.SMTP) -> bool:
    """EHLO, so that a session's first mail may be pipelined too; False if the server wants
    HELO (then aiosmtplib's MAIL greets it, and no extension applies)."""
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        return False
    return True


async def _reset(client: aiosmtplib.SMTP) -> None:
    try:
        await client.rset()
    except Exception:  # noqa: BLE001 - the connection is reset or replaced on the next use
        pass
