"""The registry of trigger kinds: ``kind:`` in a trigger file names one of these."""

from typing import Any

from flows.kinds import (
    abandoned_cart,
    campaign,
    complaint,
    consent_confirmation,
    inactivity,
    onboarding,
    post_purchase,
)
from flows.kinds.base import Kind

KINDS: dict[str, Kind[Any]] = {
    module.KIND.name: module.KIND
    for module in (abandoned_cart, inactivity, onboarding, complaint, campaign, consent_confirmation,
                   post_purchase)
}

__all__ = ["KINDS", "Kind"]
