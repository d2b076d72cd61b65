"""The run summary: what a part of a run hands the run that adds it up survives JSON unchanged, but for
the planned mails, which are personal."""

import json
from collections import Counter

from flows.outcomes import Outcome
from flows.summary import PlannedMail, RunSummary
from tests.support.builders import NOW


def test_a_parts_record_comes_back_as_the_same_summary_through_json() -> None:
    part = RunSummary("winback-lapsed", NOW, dry_run=True, interrupted=True)
    part.add("lapsed", Outcome.WOULD_SEND, 7)
    part.add("lapsed", Outcome.HELD_OUT, 2)
    part.add("at_risk", Outcome.NO_EMAIL)
    part.planned.append(PlannedMail("c1", "lapsed", "de", "winback", "Jürgen, 15 % Rabatt"))
    part.templates.add(("winback.html.j2", "lapsed", "de", "", ""))

    back = RunSummary.from_record(json.loads(json.dumps(part.to_record())))

    assert back.planned == [] and "Jürgen" not in json.dumps(part.to_record())  # personal: kept to the terminal
    back.planned = part.planned
    assert back == part


def test_parts_added_up_count_as_the_whole() -> None:
    whole = RunSummary("winback-lapsed", NOW)
    for sent, held in ((5, 1), (3, 2)):
        part = RunSummary("winback-lapsed", NOW)
        part.add("lapsed", Outcome.SENT, sent)
        part.add("lapsed", Outcome.HELD_OUT, held)
        whole.combine(RunSummary.from_record(part.to_record()))
    assert whole.counts == Counter({("lapsed", Outcome.SENT): 8, ("lapsed", Outcome.HELD_OUT): 3})
