"""DKIM signatures (dkimpy) over the headers receivers and RFC 8058 care about.

dkimpy is imported only by a run that signs: it costs about 3 MB in every process that
imports it, each sender's included.
"""

from dataclasses import dataclass, field
from pathlib import Path

# Signed when present: the identity, the content's framing, and the unsubscribe headers
# (RFC 8058 requires List-Unsubscribe and List-Unsubscribe-Post to be covered).
SIGNED = (b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type",
          b"list-unsubscribe", b"list-unsubscribe-post", b"list-id")


@dataclass(frozen=True)
class DkimSigner:
    selector: str
    domain: str
    private_key: bytes = field(repr=False)  # never in a repr, a log or a traceback

    @classmethod
    def from_settings(cls, selector: str | None, domain: str | None, key: str | None, key_file: Path | None,
                      sender_domain: str) -> "DkimSigner | None":
        if not selector:
            return None
        pem = key.encode() if key else key_file.read_bytes() if key_file else None
        if not pem:
            raise ValueError("LIFECYCLE_DKIM_SELECTOR is set but neither LIFECYCLE_DKIM_PRIVATE_KEY "
                             "nor LIFECYCLE_DKIM_PRIVATE_KEY_FILE")
        return cls(selector, domain or sender_domain, pem)

    def sign(self, message: bytes) -> bytes:
        """The message with a DKIM-Signature header in front."""
        import dkim

        head = b"\r\n" + message.split(b"\r\n\r\n", 1)[0].lower()
        present = [name for name in SIGNED if b"\r\n" + name + b":" in head]
        signature: bytes = dkim.sign(message, self.selector.encode(), self.domain.encode(), self.private_key,
                              include_headers=present, linesep=b"\r\n")
        return signature + message
