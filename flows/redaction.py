"""What no log line, error message or page shows: a URL's credentials or a signed token.

One ``redact(text)`` for both, and one log-record hook (``redact_every_record``) that
applies it to every record a process makes: its message, arguments, traceback and stack.
The messages are clean at their source; the hook is the last line of defence, for a
library's message that is not.

- **URLs** (``redact_url``): ``LIFECYCLE_DATABASE_URL`` and ``LIFECYCLE_SMTP_URL`` hold a
  password; a URL's user info (user and password, since some relays take an API token as
  the user name) and any credential-like query parameter become ``***``, valid or not
  (the user info runs to the *last* ``@``); libpq's ``password=…`` form too. Never a
  prefix, never a length. The other secrets are ``SecretStr`` and never shown.
- **Tokens** (``redact_tokens``): every path that carries one (``TOKEN_ROUTES``) is written
  as ``/u/…``, every query string as ``?…``, and a signed token anywhere else as ``…``.
"""

import logging
import re
from typing import Any
from urllib.parse import parse_qsl

REDACTED = "***"
# A query parameter that may carry a credential (libpq takes ``?password=``).
_SECRET_PARAMETER = re.compile(r"pass|secret|token|key|auth", re.IGNORECASE)
_URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_KEY_VALUE_PASSWORD = re.compile(r"\b(password|passwd|sslpassword)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with its user info (user and password), and any ``password=`` parameter, as ``***``.

    Valid or not: the user info runs to the *last* ``@`` (a password with an unencoded
    ``/``, ``#``, ``?`` or ``@`` is hidden whole, however a URL parser would split it), and
    a URL without ``scheme://`` is read the same way. Never a prefix, never a length."""
    head, sep, rest = url.partition("://")
    if not sep:
        if _KEY_VALUE_PASSWORD.search(url):  # libpq's "host=… password=…" form
            return _KEY_VALUE_PASSWORD.sub(lambda m: f"{m.group(1)}={REDACTED}", url)
        head, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if at and userinfo:
        # The user too: some relays take an API token as the user name (Postmark's SMTP).
        rest = f"{REDACTED}@{host}"
    base, question, query = rest.partition("?")
    if question and _SECRET_PARAMETER.search(query):
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{k}={REDACTED if _SECRET_PARAMETER.search(k) else v}" for k, v in pairs) or REDACTED
        rest = f"{base}?{query}"
    return f"{head}{sep}{rest}"


def redact_urls(text: str) -> str:
    """``text`` with every URL in it as ``redact_url`` shows it (for messages we did not write)."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


# -- tokens -------------------------------------------------------------------------------

# Every first path segment whose next segment is a token: the links in mails (``/u/``
# unsubscribe, ``/preferences/``, ``/confirm/``, and the ``/c/`` clicks and ``/o/`` opens
# to come) and the previews linked from runs. tests/surfaces/test_web_security.py fails for a
# route with a path parameter whose prefix is missing here.
TOKEN_ROUTES = ("u", "preferences", "confirm", "preview", "c", "o")
ELIDED = "…"
_ROUTES = "|".join(map(re.escape, TOKEN_ROUTES))
_TOKEN_PATH = re.compile(rf"/({_ROUTES})/[^/?#\s\"'<>]+")
_QUERY = re.compile(r"((?:[a-z][a-z0-9+.-]*://[^\s/?#\"'<>]+)?/[^\s?#\"'<>]*)\?[^\s#\"'<>]+", re.IGNORECASE)
# A token signed by flows.content.links (itsdangerous: base64 JSON, or "." and zlib, then "." and
# the signature) or any JWT-shaped string, wherever it stands.
_BARE_TOKEN = re.compile(r"(?:eyJ|(?<![\w-])\.eJ)[\w-]{4,}\.[\w-]{16,}")


def redact_tokens(text: str) -> str:
    """``text`` with every token path as ``/u/…``, every query string as ``?…`` and every
    signed token as ``…``."""
    if "/" not in text and "J" not in text:  # neither a path nor a signed token
        return text
    if "?" in text:  # without one it cannot match, and it backtracks through a long token: 35 µs a click's path
        text = _QUERY.sub(lambda m: m.group(1) + "?" + ELIDED, text)
    text = _TOKEN_PATH.sub(lambda m: f"/{m.group(1)}/{ELIDED}", text)
    return _BARE_TOKEN.sub(ELIDED, text)


def redact(text: str) -> str:
    """``text`` with every URL's credentials and every token hidden."""
    return redact_tokens(redact_urls(text))


_PLAIN = (int, float, bool, type(None))


def _redacted_arg(arg: Any) -> Any:
    if isinstance(arg, str):
        return redact(arg)
    if isinstance(arg, _PLAIN):
        return arg
    text = str(arg)
    clean = redact(text)
    return arg if clean == text else clean


def _redacted_args(args: Any) -> Any:
    if isinstance(args, dict):
        return {key: _redacted_arg(value) for key, value in args.items()}
    if isinstance(args, tuple):
        return tuple(_redacted_arg(arg) for arg in args)
    return _redacted_arg(args)


_TRACEBACKS = logging.Formatter()


def redact_record(record: logging.LogRecord) -> None:
    """Redact ``record`` in place: its message, its arguments, its traceback and stack."""
    if record.args:
        record.args = _redacted_args(record.args)  # the format itself is left whole: it has the %s
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's to report, as without us
            message = None
        # A token put together from the format and its arguments: keep the redacted text.
        # (Not for uvicorn's access log: its formatter unpacks the arguments, never split so.)
        if message is not None and record.name != "uvicorn.access" and redact(message) != message:
            record.msg, record.args = redact(message), ()
    elif isinstance(record.msg, str):
        record.msg = redact(record.msg)
    elif not isinstance(record.msg, _PLAIN):
        record.msg = _redacted_arg(record.msg)
    if record.exc_info and not record.exc_text:
        record.exc_text = _TRACEBACKS.formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


class Redacting(logging.Filter):
    """A logging filter that lets every record through, redacted (``redact_record``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def redact_every_record() -> None:
    """Redact every log record this process makes, whichever logger and handler it goes to
    (Prefect's API log handler too): every ``lifecycle`` command installs it at start
    (``flows.surfaces.cli``), and so does every process that runs the flows (``flows.surfaces.prefect_flows``)."""
    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def make_redacted(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        redact_record(record)
        return record

    make_redacted.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make_redacted)
