"""Who is held out of a trigger: a deterministic draw from the customer, the trigger and a salt.

The draw is the first 64 bits of SHA-256 over ``salt`` and the shop's own customer id, as
a fraction of 2⁶⁴, compared with the share: the same customer lands in the same group in
every run, on every machine and in every copy of the store, and a new salt (stated in the
trigger file) draws a new group. The trigger's name is not in the hash beyond the salt's
default, so renaming a trigger with a stated salt keeps its groups.
"""

import hashlib

_SCALE = float(2**64)


def draw(salt: str, customer: str) -> float:
    """A number in [0, 1), uniform over customers, fixed for (salt, customer)."""
    digest = hashlib.sha256(f"{salt}\x1f{customer}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def held_out(share: float | None, salt: str, customer: str) -> bool:
    return share is not None and draw(salt, customer) < share
