"""MIME: a rendered mail becomes multipart/alternative bytes ready for SMTP.

Header values are built from customer data, so every one passes ``one_line`` first:
a CR/LF in a name or subject cannot start a new header. Non-ASCII names and subjects
are RFC 2047 encoded; an address's domain is written in its ASCII (IDNA) form, unless
its local part is Unicode (an SMTPUTF8 message, whose To header is UTF-8); the Message-ID is derived from the send key, so a message
sent twice (which the ledger prevents) would at least carry the same ID.
"""  # noqa: E501 -- one long line in the module docstring, kept as written

import binascii
import hashlib
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime, formataddr, parseaddr

from flows.content.links import send_digest
from flows.content.render import Rendered, one_line
from flows.message.dkim import DkimSigner
from models.types import display_address, stored_address


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


def message_id(send_key: str, sender: Sender, secret: str) -> str:
    """Derived from the send key (the same mail always has the same one), keyed by the secret."""
    return f"<{send_digest(secret, send_key)}@{sender.domain}>"


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
    """multipart/alternative (text, then HTML), UTF-8, quoted-printable, CRLF line ends.

    Written directly rather than through ``email.message.EmailMessage``, which builds
    about 500 messages a second here and was the send path's bottleneck; this builds
    several thousand, and Python's email parser reads the result back the same
    (see tests/message/test_compose.py).
    """
    boundary = "=_" + hashlib.sha256(msg_id.encode()).hexdigest()[:24]
    # The domain in its ASCII form, as the envelope has it (a store may still hold Unicode):
    # an ASCII message any relay takes. A local part in Unicode needs SMTPUTF8 anyway, and
    # such a message may carry UTF-8 headers (RFC 6532): it shows the Unicode domain too.
    if not to_address.isascii():
        to_address = stored_address(to_address)
    international = not to_address.isascii()
    headers = [
        ("From", _address(sender.name, sender.address)),
        ("To", _address(one_line(to_name), display_address(to_address) if international else to_address)),
        ("Subject", _text(one_line(rendered.subject), "Subject")),
        ("Date", format_datetime(date)),
        ("Message-ID", msg_id),
        *((name, _text(one_line(value), name)) for name, value in (extra_headers or {}).items()),
        ("MIME-Version", "1.0"),
        ("Content-Type", f'multipart/alternative; boundary="{boundary}"'),
    ]
    head = "".join(f"{name}: {value}\r\n" for name, value in headers).encode("utf-8" if international else "ascii")
    delimiter = f"--{boundary}\r\n".encode()
    data = b"".join((
        head, b"\r\n",
        delimiter, _TEXT_PART, _quoted_printable(rendered.text), b"\r\n",
        delimiter, _HTML_PART, _quoted_printable(rendered.html), b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ))
    return signer.sign(data) if signer else data


_TEXT_PART = b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
_HTML_PART = b'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'


def _quoted_printable(text: str) -> bytes:
    body = text.replace("\r\n", "\n").replace("\r", "\n").encode("utf-8")
    return binascii.b2a_qp(body, quotetabs=False, istext=True, header=False).replace(b"\n", b"\r\n")


def _text(value: str, name: str) -> str:
    """An unstructured header value: as is when ASCII, else RFC 2047 encoded words.

    Base64 words (binascii, in C); the standard library's Header picks Q-encoding one
    character at a time in Python, which was a third of the cost of a message.
    """
    if value.isascii():
        return value
    words: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    # The first word shares its line with "Name: "; base64 turns 3 bytes into 4 characters.
    budget = min(_WORD_BYTES, (78 - len(name) - 2 - len("=?utf-8?b??=")) // 4 * 3)
    for char in value:
        encoded = char.encode("utf-8")
        if size + len(encoded) > budget:  # never split a character across words
            words.append(b"".join(chunk))
            chunk, size, budget = [], 0, _WORD_BYTES
        chunk.append(encoded)
        size += len(encoded)
    words.append(b"".join(chunk))
    return "\r\n ".join(f"=?utf-8?b?{binascii.b2a_base64(word, newline=False).decode()}?=" for word in words)


# 45 bytes of UTF-8 become 60 characters of base64: with "=?utf-8?b?…?=" a word stays
# within 75 characters, and a folded line within 78 (RFC 2047, RFC 5322).
_WORD_BYTES = 45


def _address(name: str, address: str) -> str:
    if not name:
        return address
    if address.isascii():
        return formataddr((name, address), charset="utf-8")
    # formataddr refuses a UTF-8 address (RFC 6532 allows it): the name as it would encode it.
    return formataddr((name, "_@_"), charset="utf-8").removesuffix("<_@_>") + f"<{address}>"
