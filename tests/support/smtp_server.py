"""A real SMTP server on loopback (aiosmtpd) that records what it accepts and can be told to fail."""

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from flows.surfaces.outbox import free_port


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    peer: tuple = ()  # the client's address and port: one per SMTP session
    at: float = 0.0  # when the server accepted it (monotonic)

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=policy.default)  # type: ignore[return-value]


@dataclass
class Script:
    """Replies to give, in order, for one recipient: at RCPT, or at DATA."""

    rcpt: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    drop_at_data: int = 0  # close the connection at the DATA end this many times
    drop_at_rcpt: int = 0  # close the connection at RCPT (before any DATA) this many times


class RecordingHandler:
    def __init__(self, data_delay: float = 0.0, pipelining: bool = False, keep_data: bool = True) -> None:
        self.data_delay = data_delay  # seconds before answering DATA: a slow server
        self.keep_data = keep_data  # False: envelopes only (a large campaign counted at the server)
        self.pipelining = pipelining  # offer PIPELINING (RFC 2920); aiosmtpd reads commands in order either way
        self.received: list[Received] = []
        self.scripts: dict[str, Script] = defaultdict(Script)
        self.rcpt_attempts: dict[str, int] = defaultdict(int)
        self.refuse_every_rcpt: str | None = None  # a reply to every RCPT no script answers: a broken relay
        self.lock = threading.Lock()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.lock:
            self.rcpt_attempts[address] += 1
            script = self.scripts.get(address)
            if script and script.drop_at_rcpt:
                script.drop_at_rcpt -= 1
                server.transport.close()
                return "421 closing"
            if script and script.rcpt:
                return script.rcpt.pop(0)
            if self.refuse_every_rcpt:
                return self.refuse_every_rcpt
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        recipient = envelope.rcpt_tos[0]
        with self.lock:
            script = self.scripts.get(recipient)
            if script and script.drop_at_data:
                script.drop_at_data -= 1
                server.transport.close()
                return "421 closing"
            if script and script.data:
                return script.data.pop(0)
            data = envelope.original_content if self.keep_data else b""
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), data, tuple(session.peer),
                                          time.monotonic()))
        return "250 2.0.0 queued"

    def to(self, address: str) -> list[Received]:
        return [r for r in self.received if address in r.recipients]


class SmtpServer:
    """``credentials``: the server offers AUTH (PLAIN, LOGIN; without TLS, loopback only) and
    takes only this login; ``auth_required``: MAIL before a login is answered 530."""

    def __init__(self, data_delay: float = 0.0, credentials: tuple[str, str] | None = None,
                 auth_required: bool = False, pipelining: bool = False, keep_data: bool = True) -> None:
        self.handler = RecordingHandler(data_delay, pipelining, keep_data)
        self.port = free_port()
        self.credentials = credentials
        self.logins: list[tuple[str, bool]] = []  # (login, accepted), one per AUTH attempt
        auth = {"auth_require_tls": False, "authenticator": self._authenticate} if credentials else {}
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, decode_data=False,
                                     auth_required=auth_required, **auth)

    def _authenticate(self, server: object, session: object, envelope: object, mechanism: str,
                      auth_data: object) -> AuthResult:
        assert self.credentials is not None and isinstance(auth_data, LoginPassword)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        accepted = (login, password) == self.credentials
        self.logins.append((login, accepted))
        return AuthResult(success=accepted, handled=False, auth_data=auth_data if accepted else None)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}?connections=2&timeout=5"

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def start(self) -> "SmtpServer":
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


class PostfixSink:
    """Postfix's ``smtp-sink`` on loopback (Debian package ``postfix``), counting at its dump file.

    ``flags`` inject faults the way Postfix's own tests do: ``-r RCPT`` (4xx at every RCPT),
    ``-f RCPT`` (5xx), ``-Q RCPT`` (421 and hang up), ``-w 1`` (slow DATA replies).
    """

    def __init__(self, *flags: str, port: int | None = None) -> None:
        self.flags, self.port = list(flags), port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        # The sink writes as ``nobody`` when started by root: a folder it may write to.
        folder = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
        folder.chmod(0o777)
        self.dump = folder / "dump"

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}?connections=2&timeout=5"

    def start(self) -> "PostfixSink":
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen([binary, *user, "-D", str(self.dump), *self.flags,
                                         f"127.0.0.1:{self.port}", "100"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.02)
        raise TimeoutError(f"smtp-sink did not listen on {self.port}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait()
        shutil.rmtree(self.dump.parent, ignore_errors=True)

    def recipients(self) -> list[str]:
        """One entry per accepted message (its RCPT), from the sink's own dump."""
        if not self.dump.exists():
            return []
        return [line.split(":", 1)[1].strip().strip("<>") for line in self.dump.read_text(errors="replace").splitlines()
                if line.startswith("X-Rcpt-Args:")]
