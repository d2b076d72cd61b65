"""Who is held out of a trigger: a deterministic draw from the trigger, a salt and the customer.

The draw is the first 64 bits of SHA-256 over the trigger's name, the salt and the shop's
own customer id, as a fraction of 2⁶⁴, compared with the share: the same customer lands in
the same group in every run, on every machine and in every copy of the store; a new salt
(stated in the trigger file) draws a new group, and two triggers never share a group even
when they state the same salt.
"""

import hashlib

_SCALE = float(2**64)


def draw(trigger: str, salt: str, customer: str) -> float:
    """A number in [0, 1), uniform over customers, fixed for (trigger, salt, customer)."""
    digest = hashlib.sha256(f"{trigger}\x1f{salt}\x1f{customer}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def held_out(share: float | None, trigger: str, salt: str, customer: str) -> bool:
    return share is not None and draw(trigger, salt, customer) < share
