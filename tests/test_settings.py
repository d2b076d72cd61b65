"""Settings come from the environment or Prefect Secret blocks, and refuse unsafe production defaults."""

import pytest
from pydantic import ValidationError

from flows.settings import Settings
from flows.surfaces.environment import settings_from_environment


def test_no_secret_is_built_in_and_production_refuses_to_start_without_one(monkeypatch) -> None:
    monkeypatch.delenv("LIFECYCLE_SECRET", raising=False)
    assert Settings().secret is None  # development: the store's own is used (flows.signing_secret)
    with pytest.raises(RuntimeError, match="signing secret"):
        _ = Settings().signing_secret
    monkeypatch.setenv("LIFECYCLE_ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="LIFECYCLE_SECRET must be set in production"):
        Settings()
    monkeypatch.setenv("LIFECYCLE_SECRET", "short")
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings()


def test_a_bad_sender_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("LIFECYCLE_SENDER", "Shop <not an address>")
    with pytest.raises(ValidationError, match="sender"):
        Settings()


@pytest.mark.usefixtures("prefect")
def test_values_can_come_from_prefect_secret_blocks(monkeypatch) -> None:
    from prefect.blocks.system import Secret

    Secret(value="smtp://mailer:s3cret@mail.example:587?tls=starttls").save("lifecycle-smtp-url", overwrite=True)
    Secret(value="a-secret-kept-in-a-prefect-block").save("lifecycle-secret", overwrite=True)
    monkeypatch.setenv("LIFECYCLE_SMTP_URL", "prefect-secret:lifecycle-smtp-url")
    monkeypatch.setenv("LIFECYCLE_SECRET", "prefect-secret:lifecycle-secret")
    settings_from_environment.cache_clear()
    try:
        settings = settings_from_environment()  # the surfaces read the blocks: the core never talks to Prefect
    finally:
        settings_from_environment.cache_clear()
    assert settings.smtp_url == "smtp://mailer:s3cret@mail.example:587?tls=starttls"
    assert settings.secret.get_secret_value() == "a-secret-kept-in-a-prefect-block"
    with pytest.raises(ValidationError, match="names a Prefect Secret block"):
        Settings()  # made directly, a block's name is refused, never taken for the value


@pytest.mark.parametrize("environment", ["development", "production"])
def test_a_secret_published_with_an_earlier_release_is_refused(monkeypatch, environment: str) -> None:
    monkeypatch.setenv("LIFECYCLE_ENVIRONMENT", environment)
    monkeypatch.setenv("LIFECYCLE_SECRET", "lifecycle-development-secret-do-not-use-in-production")
    with pytest.raises(ValidationError, match="published with earlier releases"):
        Settings()


def test_a_key_value_database_url_is_shown_without_its_password() -> None:
    from flows.redaction import redact_url

    shown = redact_url("host=db port=5432 user=app password=Sup3r-marker-pw dbname=shop")
    assert "Sup3r-marker-pw" not in shown and "password=***" in shown and "host=db" in shown
    assert "marker" not in redact_url("host=db password='a quoted marker' dbname=shop")


def test_a_shards_stall_limit_must_outlast_the_claim_lease(monkeypatch) -> None:
    """A lost shard's run is replaced only once its claims can be taken over."""
    monkeypatch.setenv("LIFECYCLE_CLAIM_LEASE_SECONDS", "900")
    with pytest.raises(ValidationError, match=r"LIFECYCLE_SHARD_STALL_SECONDS \(900\) must be longer than "
                                              r"LIFECYCLE_CLAIM_LEASE_SECONDS \(900\)"):
        Settings()
    monkeypatch.setenv("LIFECYCLE_SHARD_STALL_SECONDS", "901")
    assert Settings().shard_stall_seconds == 901
