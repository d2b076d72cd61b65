"""Settings come from the environment or Prefect Secret blocks, and refuse unsafe production defaults."""

import pytest
from pydantic import ValidationError

from flows.settings import Settings


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
    settings = Settings()
    assert settings.smtp_url == "smtp://mailer:s3cret@mail.example:587?tls=starttls"
    assert settings.secret.get_secret_value() == "a-secret-kept-in-a-prefect-block"
