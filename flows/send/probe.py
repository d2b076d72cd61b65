"""Before the first batch: reach the relay and log in, so a run whose relay is down or
refuses our login fails before it claims anything."""

import asyncio

from flows.send.smtp import BreakerPolicy, Mailer, RetryPolicy, SmtpConfig
from flows.settings import Settings


def smtp_policies(settings: Settings) -> tuple[SmtpConfig, RetryPolicy, BreakerPolicy]:
    """The relay, its retry policy and its circuit breaker, as the settings configure them."""
    policy = RetryPolicy(settings.smtp_attempts, settings.smtp_backoff_seconds, settings.smtp_backoff_max_seconds)
    breaker = BreakerPolicy(settings.breaker_consecutive, settings.breaker_sample, settings.breaker_share,
                            settings.breaker_bounce_share)
    return SmtpConfig.from_url(settings.smtp_url), policy, breaker


def check_smtp(settings: Settings) -> None:
    """Connect and log in once; raises ``SmtpUnavailable`` naming the relay (never its password)."""

    async def probe() -> None:
        async with Mailer(*smtp_policies(settings)) as mailer:
            await mailer.check()

    asyncio.run(probe())
