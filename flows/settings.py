"""Settings from the environment (``LIFECYCLE_*``); secrets never come from files in the repo."""

import logging
import os
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from flows.spec.common import check_sender

if TYPE_CHECKING:
    from flows.bounces import SoftBounceRule

log = logging.getLogger(__name__)

SECRET_BLOCK_PREFIX = "prefect-secret:"

# Signs unsubscribe links in development only; production refuses to start with it.
DEVELOPMENT_SECRET = "lifecycle-development-secret-do-not-use-in-production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIFECYCLE_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    database_url: str = Field("sqlite:///lifecycle.db", description="SQLAlchemy URL of the customer store.")
    smtp_url: str = Field(
        "smtp://127.0.0.1:25", description="smtp://user:pass@host:587?tls=starttls&connections=4&timeout=30"
    )
    triggers_dir: Path = Path("triggers")
    templates_dir: Path = Path("templates")
    sender: str = "Lifecycle Shop <hello@shop.example>"
    secret: SecretStr = SecretStr(DEVELOPMENT_SECRET)
    base_url: str = Field("http://127.0.0.1:8025", description="Where unsubscribe links point.")
    shop_url: str = "https://shop.example"
    unsubscribe_mailbox: str | None = Field(None, description="mailto: in List-Unsubscribe; default unsubscribe@<sender domain>.")
    default_language: str = "en"
    dkim_selector: str | None = Field(None, description="Signs every mail with DKIM when set.")
    dkim_domain: str | None = Field(None, description="d= of the signature; default: the sender's domain.")
    dkim_private_key: SecretStr | None = Field(None, description="PEM; or use dkim_private_key_file.")
    dkim_private_key_file: Path | None = None
    batch_size: int = Field(500, ge=1, le=20000, description="Recipients per render/dispatch task.")
    in_flight: int = Field(32, ge=1, le=5000, description="Ledger claims taken at once while sending.")
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=64,
                         description="Processes that send a run of more than one batch, the run's own included "
                                     "(1: only the run's process).")
    claim_lease_seconds: float = Field(600, ge=0, description="After this, a dead run's unsent claims are taken over.")
    smtp_attempts: int = Field(5, ge=1, le=20)
    smtp_backoff_seconds: float = Field(1.0, ge=0)
    smtp_backoff_max_seconds: float = Field(30.0, ge=0)
    soft_bounce_limit: int = Field(3, ge=1, description="Soft bounces within the window that suppress an address.")
    soft_bounce_window_days: float = Field(30, gt=0)

    @property
    def claim_lease(self) -> timedelta:
        return timedelta(seconds=self.claim_lease_seconds)

    @property
    def soft_bounce_rule(self) -> "SoftBounceRule":
        from flows.bounces import SoftBounceRule

        return SoftBounceRule(self.soft_bounce_limit, timedelta(days=self.soft_bounce_window_days))

    @field_validator("database_url", "smtp_url", "secret", "dkim_private_key", mode="before")
    @classmethod
    def _from_secret_block(cls, value: object) -> object:
        """``prefect-secret:NAME`` reads the value from the Prefect Secret block NAME."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(raw, str) and raw.startswith(SECRET_BLOCK_PREFIX):
            from prefect.blocks.system import Secret

            return Secret.load(raw.removeprefix(SECRET_BLOCK_PREFIX)).get()
        return value

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        return check_sender(value)

    @model_validator(mode="after")
    def _no_unsafe_defaults(self) -> "Settings":
        if self.secret.get_secret_value() == DEVELOPMENT_SECRET:
            if self.environment == "production":
                raise ValueError("LIFECYCLE_SECRET must be set in production (it signs unsubscribe links)")
        elif len(self.secret.get_secret_value()) < 16:
            raise ValueError("LIFECYCLE_SECRET must be at least 16 characters")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
