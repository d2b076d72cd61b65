"""MIME: a rendered mail becomes multipart/alternative bytes ready for SMTP.

Header values are built from customer data, so every one passes ``one_line`` first:
a CR/LF in a name or subject cannot start a new header. Non-ASCII names and subjects
are RFC 2047 encoded; the Message-ID is derived from the send key, so a message
sent twice (which the ledger prevents) would at least carry the same ID.
"""

import hashlib
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, parseaddr

from flows.dkim_signer import DkimSigner
from flows.render import Rendered, one_line


@dataclass(frozen=True, slots=True)
class Sender:
    name: str
    address: str

    @classmethod
    def parse(cls, value: str) -> "Sender":
        name, address = parseaddr(value)
        return cls(one_line(name), address)

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2] or "localhost"


def message_id(send_key: str, sender: Sender) -> str:
    digest = hashlib.sha256(send_key.encode()).hexdigest()[:32]
    return f"<{digest}@{sender.domain}>"


def build_message(
    rendered: Rendered,
    *,
    sender: Sender,
    to_address: str,
    to_name: str,
    msg_id: str,
    date: datetime,
    extra_headers: dict[str, str] | None = None,
    signer: DkimSigner | None = None,
) -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = Address(display_name=sender.name, addr_spec=sender.address)
    msg["To"] = Address(display_name=one_line(to_name), addr_spec=to_address)
    msg["Subject"] = one_line(rendered.subject)
    msg["Date"] = format_datetime(date)
    msg["Message-ID"] = msg_id
    for name, value in (extra_headers or {}).items():
        msg[name] = one_line(value)
    msg.set_content(rendered.text, charset="utf-8")
    msg.add_alternative(rendered.html, subtype="html", charset="utf-8")
    data = msg.as_bytes()
    return signer.sign(data) if signer else data
