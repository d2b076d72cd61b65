"""Settings: every ``LIFECYCLE_*`` variable as one typed value; secrets never come from files in the repo.

The surfaces make them (``flows.surfaces.environment``: the environment, and Prefect
Secret blocks named ``prefect-secret:NAME``) and pass them to a run as a value.
"""

import hashlib
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from flows.redaction import redact_url
from flows.spec.common import check_sender

if TYPE_CHECKING:
    from flows.feedback.bounces import SoftBounceRule

log = logging.getLogger(__name__)

SECRET_BLOCK_PREFIX = "prefect-secret:"
# SHA-256 of secrets that were once published (an old development default): refused everywhere.
PUBLISHED_SECRETS = frozenset({"437a320ba614e1e2aeab5b66099c9865cdf1c80ba4f792b1c58da169bcfb2588"})

# LIFECYCLE_DATABASE_URL and LIFECYCLE_SMTP_URL hold a password; every message that shows
# one shows ``redact_url(url)`` (flows.redaction). The other secrets (LIFECYCLE_SECRET, the
# DKIM key, the Postmark webhook password, the store's signing secret) are SecretStr.


class Settings(BaseSettings):
    # A validation error never echoes its input: the input is the environment, secrets and all.
    model_config = SettingsConfigDict(env_prefix="LIFECYCLE_", extra="ignore", hide_input_in_errors=True)

    environment: Literal["development", "production"] = "development"
    database_url: str = Field("sqlite:///lifecycle.db", description="SQLAlchemy URL of the customer store.")
    smtp_url: str = Field(
        "smtp://127.0.0.1:25", description="smtp://user:pass@host:587?tls=starttls&connections=4&timeout=30"
    )
    triggers_dir: Path = Path("triggers")
    templates_dir: Path = Path("templates")
    sender: str = "Lifecycle Shop <hello@shop.example>"
    secret: SecretStr | None = Field(None, description="Signs links and Message-IDs. Unset (development only): "
                                     "a random secret generated once and kept in the store.")
    base_url: str = Field("http://127.0.0.1:8025", description="Where unsubscribe links point.")
    shop_url: str = "https://shop.example"
    unsubscribe_mailbox: str | None = Field(
        None, description="mailto: in List-Unsubscribe; default unsubscribe@<sender domain>.")
    default_language: str = "en"
    dkim_selector: str | None = Field(None, description="Signs every mail with DKIM when set.")
    dkim_domain: str | None = Field(None, description="d= of the signature; default: the sender's domain.")
    dkim_private_key: SecretStr | None = Field(None, description="PEM; or use dkim_private_key_file.")
    dkim_private_key_file: Path | None = None
    dkim_ed25519_selector: str | None = Field(
        None, description="Adds an Ed25519 signature (RFC 8463) beside the RSA one; receivers still need RSA.")
    dkim_ed25519_private_key: SecretStr | None = Field(None, description="PEM; or use dkim_ed25519_private_key_file.")
    dkim_ed25519_private_key_file: Path | None = None
    batch_size: int = Field(500, ge=1, le=20000, description="Recipients per render/dispatch task.")
    in_flight: int = Field(32, ge=1, le=5000, description="Ledger claims taken at once while sending.")
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=64,
                         description="Processes that send a run of more than one batch, the run's own included "
                                     "(1: only the run's process).")
    claim_lease_seconds: float = Field(600, ge=0, description="After this, a dead run's unsent claims are taken over.")
    shard_attempts: int = Field(3, ge=1, le=10, description="A deployed run's shard that fails, crashes or stalls "
                                "is run again, up to this many runs in all.")
    shard_stall_seconds: float = Field(900, gt=0, description="A deployed run's shard whose progress stands still "
                                       "this long is taken for lost (its worker gone): marked Crashed, run again.")
    smtp_attempts: int = Field(5, ge=1, le=20)
    smtp_backoff_seconds: float = Field(1.0, ge=0)
    smtp_backoff_max_seconds: float = Field(30.0, ge=0)
    soft_bounce_limit: int = Field(3, ge=1, description="Soft bounces within the window that suppress an address.")
    soft_bounce_window_days: float = Field(30, gt=0)
    breaker_consecutive: int = Field(10, ge=1, description="Message-level refusals in a row that stop a batch "
                                                           "(the relay's fault, not the recipients').")
    breaker_sample: int = Field(50, ge=1, description="The first recipients of a batch that the share applies to.")
    breaker_share: float = Field(0.2, gt=0, le=1, description="More than this share of the sample refused at "
                                                              "message level stops the batch.")
    breaker_bounce_share: float = Field(0.5, gt=0, le=1, description="More than this share of the sample refused "
                                        "for any reason, unknown addresses included, stops a batch too.")
    bounce_address: str | None = Field(None, description="Envelope sender; +TOKEN (VERP) is inserted before the @. "
                                                         "Default: bounces@<sender domain>.")
    ses_topic_arns: str = Field("", description="Comma-separated SNS topic ARNs whose SES notifications are accepted.")
    sns_trusted_url_prefixes: str = Field("", description="For tests only: extra URL prefixes trusted for SNS "
                                                          "certificates and SubscribeURLs; refused in production.")
    web_statement_timeout_seconds: float = Field(5, gt=0, le=300, description="`lifecycle web`: a database statement "
                                                 "(a lock wait included) that takes longer is cancelled; the request "
                                                 "gets 503 with Retry-After and changes nothing.")
    postmark_webhook_user: str | None = Field(None, description="Basic-auth user in Postmark's webhook URL.")
    postmark_webhook_password: SecretStr | None = None
    admin_token: SecretStr | None = Field(
        None, description="Opens the reports page of lifecycle web (business figures); unset, the page is off.")
    write_keys: SecretStr | None = Field(
        None, description="The tracking API's write keys, one per source: source:key pairs separated by commas. "
                          "Unset, /v1/ accepts nothing.")
    collect_max_pending: int = Field(20_000, ge=100, description="`lifecycle web`: events received but not yet "
                                     "committed, per process, beyond which the tracking API answers 503 with "
                                     "Retry-After, so that clients back off instead of queueing without end.")

    @property
    def signing_secret(self) -> str:
        """The secret that signs links; ``flows.signing_secret.resolved`` fills it in from the
        store when ``LIFECYCLE_SECRET`` is unset, once, before the run or app starts."""
        if self.secret is None:
            raise RuntimeError("no signing secret: settings must pass through flows.signing_secret.resolved first")
        return self.secret.get_secret_value()

    @property
    def reports_page_on(self) -> bool:
        """``lifecycle web`` serves the reports page only with a non-empty ``LIFECYCLE_ADMIN_TOKEN``:
        an empty one is no token (the page and the report's artifacts agree on it)."""
        return self.admin_token is not None and bool(self.admin_token.get_secret_value())

    @property
    def claim_lease(self) -> timedelta:
        return timedelta(seconds=self.claim_lease_seconds)

    @property
    def soft_bounce_rule(self) -> "SoftBounceRule":
        from flows.feedback.bounces import SoftBounceRule

        return SoftBounceRule(self.soft_bounce_limit, timedelta(days=self.soft_bounce_window_days))

    @staticmethod
    def _listed(value: str) -> list[str]:
        return [item.strip() for item in value.split(",") if item.strip()]

    @property
    def ses_topics(self) -> list[str]:
        return self._listed(self.ses_topic_arns)

    @property
    def sns_trusted_prefixes(self) -> list[str]:
        return self._listed(self.sns_trusted_url_prefixes)

    @field_validator("bounce_address")
    @classmethod
    def _bounce_address(cls, value: str | None) -> str | None:
        """A plain address whose local part still fits 64 octets (RFC 5321) with ``+TOKEN`` added."""
        if value is None:
            return None
        from flows.content.links import TOKEN_LENGTH

        local, at, domain = value.strip().rpartition("@")
        if not at or not local or not domain or any(ch in value for ch in "<>\" ,;\r\n\t"):
            raise ValueError("LIFECYCLE_BOUNCE_ADDRESS must be a plain address such as bounces@shop.example, "
                             f"got {value!r}")
        if len(local.encode()) + 1 + TOKEN_LENGTH > 64:
            raise ValueError(f"LIFECYCLE_BOUNCE_ADDRESS: local part {local!r} is too long; with +TOKEN "
                             f"({TOKEN_LENGTH + 1} characters) it must fit 64 octets")
        return value.strip()

    @field_validator("database_url", "smtp_url", "secret", "dkim_private_key", "dkim_ed25519_private_key",
                     "postmark_webhook_password",
                     "admin_token", "write_keys", mode="before")
    @classmethod
    def _no_secret_block_name(cls, value: object) -> object:
        """``prefect-secret:NAME`` is resolved by the surfaces (``flows.surfaces.environment``)
        before settings are made; one that reaches here was never looked up."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(raw, str) and raw.startswith(SECRET_BLOCK_PREFIX):
            raise ValueError(f"{raw.split(':', 1)[0]}: names a Prefect Secret block; build the settings with "
                             "flows.surfaces.environment.settings_from_environment(), which reads it")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        """A URL SQLAlchemy reads as written: a password's ``@`` unencoded would make the rest of
        the password the host, shown in every connection error."""
        from sqlalchemy.engine import make_url

        try:
            parsed = make_url(value)
            parsed.port  # noqa: B018 - parsed on access
        except Exception:  # noqa: BLE001 - whatever it says may quote the password
            raise ValueError("LIFECYCLE_DATABASE_URL must look like postgresql://user:password@host:5432/db "
                             f"or sqlite:///lifecycle.db, got {redact_url(value)!r}") from None
        if "@" in (parsed.host or ""):
            raise ValueError(f"LIFECYCLE_DATABASE_URL: percent-encode an @ in the user or password as %40, "
                             f"got {redact_url(value)!r}")
        return value

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if isinstance(value, str) else value

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        return check_sender(value)

    @model_validator(mode="after")
    def _stall_outlasts_the_lease(self) -> "Settings":
        """A shard run taken for lost is run again once its claims can be taken over: sooner,
        the new run would skip the lost one's claimed mails, and they would wait a run."""
        if self.shard_stall_seconds <= self.claim_lease_seconds:
            raise ValueError(f"LIFECYCLE_SHARD_STALL_SECONDS ({self.shard_stall_seconds:g}) must be longer than "
                             f"LIFECYCLE_CLAIM_LEASE_SECONDS ({self.claim_lease_seconds:g})")
        return self

    @model_validator(mode="after")
    def _no_unsafe_defaults(self) -> "Settings":
        if self.secret is None:
            if self.environment == "production":
                raise ValueError("LIFECYCLE_SECRET must be set in production (it signs unsubscribe links)")
        elif len(self.secret.get_secret_value()) < 16:
            raise ValueError("LIFECYCLE_SECRET must be at least 16 characters")
        elif hashlib.sha256(self.secret.get_secret_value().encode()).hexdigest() in PUBLISHED_SECRETS:
            raise ValueError("LIFECYCLE_SECRET is a value published with earlier releases: anyone could forge "
                             "unsubscribe and confirmation links with it; choose a random one")
        if self.environment == "production" and self.sns_trusted_prefixes:
            raise ValueError("LIFECYCLE_SNS_TRUSTED_URL_PREFIXES is for tests; production trusts only "
                             "https://sns.<region>.amazonaws.com")
        return self
