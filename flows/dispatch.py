"""SMTP delivery: a few reused connections, retries for what is temporary, nothing twice.

Only this module talks to the SMTP server. Each message goes MAIL → RCPT → DATA on
one of ``connections`` open sessions. A 4xx reply or a dropped connection before
DATA is retried with exponential backoff (tenacity); a 5xx is final. A connection
lost *during* DATA is ambiguous (the server may have accepted the message), so it
is never retried: it is reported ``in_doubt`` and its claim stays in the ledger.
"""

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
from aiolimiter import AsyncLimiter
from aiosmtplib import SMTPRecipientRefused, SMTPResponseException
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)


@dataclass(frozen=True)
class SmtpConfig:
    hostname: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: str = "none"  # none | starttls | ssl
    timeout: float = 30.0
    connections: int = 4  # concurrent sessions this provider allows us
    rate: float | None = None  # messages per second this provider allows us (None: unlimited)

    @classmethod
    def from_url(cls, url: str) -> "SmtpConfig":
        """``smtp://user:pass@host:587?tls=starttls&connections=4&rate=50&timeout=30`` (``smtps://`` = TLS)."""
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError(f"LIFECYCLE_SMTP_URL must look like smtp://user:pass@host:587?tls=starttls, got {url!r}")
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


class Result(StrEnum):
    SENT = "sent"
    BOUNCED = "bounced"  # the recipient was refused permanently (5xx at RCPT)
    REJECTED = "rejected"  # the message was refused permanently (5xx at MAIL or DATA)
    DEFERRED = "deferred"  # still temporary after every retry: nothing was accepted
    IN_DOUBT = "in_doubt"  # connection lost during DATA: maybe accepted


@dataclass(frozen=True, slots=True)
class Delivery:
    key: str
    result: Result
    reply: str


class SmtpUnavailable(Exception):
    """The server could not be reached even after retries; ``done`` lists what was delivered."""

    def __init__(self, message: str, done: list[Delivery]) -> None:
        super().__init__(message)
        self.done = done

    def __reduce__(self) -> tuple:  # raised in a sender process, re-raised in the flow's
        return (type(self), (str(self), self.done))


class _InDoubt(Exception):
    pass


def _code(exc: BaseException) -> int | None:
    return exc.code if isinstance(exc, SMTPResponseException) else None


def _connection_lost(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectionError, TimeoutError, OSError)) and _code(exc) is None


def is_transient(exc: BaseException) -> bool:
    code = _code(exc)
    return (code is not None and 400 <= code < 500) or _connection_lost(exc)


class Mailer:
    """``async with Mailer(config, policy) as mailer: await mailer.send(envelopes)``."""

    def __init__(self, config: SmtpConfig, policy: RetryPolicy) -> None:
        self.config, self.policy = config, policy
        self._idle: list[aiosmtplib.SMTP] = []
        # One message per 1/rate seconds, shared by all connections: no bursts above the limit.
        self._pace = AsyncLimiter(1, 1 / config.rate) if config.rate else None

    async def __aenter__(self) -> "Mailer":
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await asyncio.gather(*(self._close(client) for client in self._idle))
        self._idle.clear()

    async def check(self) -> None:
        """Before the first mail: reach the server (with the usual retries) or fail the run."""
        try:
            async for attempt in self._retrying():
                with attempt:
                    client = await self._connect()
                    await client.noop()
        except Exception as exc:
            raise SmtpUnavailable(self._unreachable(exc), []) from exc
        self._idle.append(client)

    def _unreachable(self, exc: BaseException) -> str:
        return (f"SMTP server {self.config.hostname}:{self.config.port} unreachable after "
                f"{self.policy.attempts} attempts: {exc!r}")

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
        queue = deque(envelopes)
        done: list[Delivery] = []
        unreachable: list[BaseException] = []

        async def worker() -> None:
            client = self._idle.pop() if self._idle else None
            try:
                while queue and not unreachable:
                    envelope = queue.popleft()
                    try:
                        delivery, client = await self._deliver(client, envelope)
                    except Exception as exc:  # connection failures outlasting every retry
                        unreachable.append(exc)
                        return
                    done.append(delivery)
            finally:
                if client is not None and client.is_connected:
                    self._idle.append(client)

        workers = min(self.config.connections, len(envelopes))
        await asyncio.gather(*(worker() for _ in range(workers)))
        if unreachable:
            raise SmtpUnavailable(self._unreachable(unreachable[0]), done)
        return done

    async def _deliver(self, client: aiosmtplib.SMTP | None, envelope: Envelope) -> tuple[Delivery, aiosmtplib.SMTP | None]:
        connection = client

        async def attempt() -> str:
            nonlocal connection
            if self._pace is not None:
                await self._pace.acquire()
            if connection is None or not connection.is_connected:
                connection = await self._connect()
            try:
                return await self._transaction(connection, envelope)
            except Exception as exc:
                if _connection_lost(exc) or _code(exc) == 421:
                    await self._close(connection)
                    connection = None
                raise

        try:
            try:
                # Nearly every mail goes on its first try: that one skips the retry machinery
                # (about 25 µs a mail, a tenth of what its SMTP commands cost).
                reply = await attempt()
            except Exception as exc:
                if not is_transient(exc) or self.policy.attempts < 2:
                    raise
                await asyncio.sleep(min(self.policy.backoff, self.policy.backoff_max))
                reply = await self._retrying(after_first=True)(attempt)
            return Delivery(envelope.key, Result.SENT, reply), connection
        except _InDoubt as exc:
            return Delivery(envelope.key, Result.IN_DOUBT, str(exc)), connection
        except SMTPResponseException as exc:
            code = exc.code
            reply = f"{code} {exc.message}"
            if code >= 500:
                result = Result.BOUNCED if isinstance(exc, SMTPRecipientRefused) else Result.REJECTED
                return Delivery(envelope.key, result, reply), connection
            return Delivery(envelope.key, Result.DEFERRED, reply), connection

    async def _transaction(self, client: aiosmtplib.SMTP, envelope: Envelope) -> str:
        try:
            await client.mail(envelope.sender)
            await client.rcpt(envelope.recipient)  # a refusal raises SMTPRecipientRefused
        except SMTPResponseException:
            await _reset(client)
            raise
        try:
            response = await client.data(envelope.data)
        except SMTPResponseException:
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
        return client

    @staticmethod
    async def _close(client: aiosmtplib.SMTP) -> None:
        try:
            if client.is_connected:
                await client.quit()
        except Exception:
            client.close()


async def _reset(client: aiosmtplib.SMTP) -> None:
    try:
        await client.rset()
    except Exception:
        pass
