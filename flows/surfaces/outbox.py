"""A capture SMTP server on loopback: every accepted message becomes a file in ``outbox/``.

Used by ``lifecycle demo`` (and the tests) so the whole pipeline runs against a real
SMTP conversation without any mail leaving the machine.
"""

import itertools
import re
import socket
import threading
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class OutboxHandler:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        start = max((int(p.name.split("-", 1)[0]) for p in folder.glob("[0-9]*-*.eml")), default=0)
        self._numbers = itertools.count(start + 1)
        self.received = 0

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        for recipient in envelope.rcpt_tos:
            with self._lock:
                number = next(self._numbers)
                self.received += 1
            safe = re.sub(r"[^A-Za-z0-9@._-]", "_", recipient)[:80]
            (self.folder / f"{number:05d}-{safe}.eml").write_bytes(content)
        return "250 Message accepted for delivery"


class Outbox:
    """``with Outbox(Path('outbox')) as box: ... box.url`` — an SMTP URL for LIFECYCLE_SMTP_URL."""

    def __init__(self, folder: Path, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.handler = OutboxHandler(folder)
        self.host, self.port = host, port or free_port(host)
        self.controller = Controller(self.handler, hostname=host, port=self.port, decode_data=False)

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def __enter__(self) -> "Outbox":
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()
