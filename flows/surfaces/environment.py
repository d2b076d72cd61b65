"""Where the surfaces read their settings: the environment, once per command or run start.

``LIFECYCLE_DATABASE_URL``, ``LIFECYCLE_SMTP_URL``, ``LIFECYCLE_SECRET``, the DKIM key and
the Postmark webhook password may name a Prefect Secret block (``prefect-secret:NAME``);
it is read here, so the settings a run receives hold the values themselves and the
core never talks to Prefect.
"""

import os
from functools import lru_cache
from typing import Any

from flows.settings import SECRET_BLOCK_PREFIX, Settings

SECRET_BLOCK_FIELDS = ("database_url", "smtp_url", "secret", "dkim_private_key", "dkim_ed25519_private_key",
                       "postmark_webhook_password", "admin_token", "write_keys")


@lru_cache
def settings_from_environment() -> Settings:
    """The settings of this process (``cache_clear()`` after changing the environment)."""
    values: dict[str, Any] = {}
    for name in SECRET_BLOCK_FIELDS:
        raw = os.environ.get(f"LIFECYCLE_{name.upper()}", "")
        if raw.startswith(SECRET_BLOCK_PREFIX):
            from prefect.blocks.system import Secret

            block = Secret.load(raw.removeprefix(SECRET_BLOCK_PREFIX))
            assert isinstance(block, Secret)  # called from sync code: the block itself, not a coroutine
            values[name] = block.get()
    return Settings(**values)
