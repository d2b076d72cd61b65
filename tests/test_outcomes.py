"""One vocabulary of outcomes: one spelling each, a family each, one mapping onto the ledger."""

import pytest

from flows.outcomes import FAMILIES, Outcome
from flows.summary import RunSummary
from models import FeedbackKind, SendStatus
from tests.support.builders import NOW


def test_every_outcome_is_spelled_family_colon_reason_or_is_a_family() -> None:
    for outcome in Outcome:
        family, colon, reason = outcome.value.partition(":")
        assert family in FAMILIES, outcome
        assert outcome.family == family
        assert (colon and reason) or outcome.value in FAMILIES, outcome
    assert len({o.value for o in Outcome}) == len(Outcome)


def test_deferred_means_a_hold_until_a_moment_and_never_an_smtp_retry() -> None:
    """The policy's holds, an earlier run's hold still waiting, and a journey step's time of day."""
    assert {o for o in Outcome if o.deferred} == {Outcome.QUIET_HOURS, Outcome.FREQUENCY_CAP, Outcome.WAITING,
                                                  Outcome.TIME_OF_DAY}
    assert Outcome.RETRY.family == "retry" and not Outcome.RETRY.deferred


def test_smtp_outcomes_map_onto_ledger_states_in_one_place() -> None:
    assert Outcome.SENT.ledger_status is SendStatus.SENT
    for refused in (Outcome.BOUNCED, Outcome.SOFT_BOUNCED, Outcome.REJECTED):
        assert refused.ledger_status is SendStatus.FAILED
    assert Outcome.RETRY.ledger_status is None  # released: the next run tries again
    with pytest.raises(ValueError, match="stays sending"):
        Outcome.IN_DOUBT.ledger_status  # noqa: B018 -- never recorded


def test_a_permanent_refusal_is_counted_by_what_it_says_about_the_address() -> None:
    assert Outcome.refused(FeedbackKind.HARD_BOUNCE) is Outcome.BOUNCED
    assert Outcome.refused(FeedbackKind.SOFT_BOUNCE) is Outcome.SOFT_BOUNCED
    assert Outcome.refused(FeedbackKind.MESSAGE_FAILURE) is Outcome.REJECTED


def test_the_state_message_groups_a_run_by_family_in_a_fixed_order() -> None:
    summary = RunSummary("winback", NOW)
    summary.add("lapsed", Outcome.SENT, 9)
    summary.add("lapsed", Outcome.NO_CONSENT, 50)
    summary.add("loyal", Outcome.ALREADY_SENT, 3)
    summary.add("loyal", Outcome.QUIET_HOURS, 5)
    summary.add("loyal", Outcome.BOUNCED, 1)
    assert summary.state_message() == "sent 9; deferred 5; skipped 53; failed 1"
    assert summary.headline().endswith("sent 9; deferred:quiet_hours 5, failed:bounced 1, "
                                       "skipped:already_sent 3, skipped:no_consent 50")
    nothing = RunSummary("winback", NOW, dry_run=True)
    assert nothing.state_message() == "would send 0"
