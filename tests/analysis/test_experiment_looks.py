"""The winner rule at work in real runs: a look once every arm has its checkpoint of mature
recipients, recorded with its figures; the winner's mail for everyone after; one look per
checkpoint, whatever the runs in between."""

import json
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, select
from sqlmodel import Session, col

from flows.analysis.timeline import timeline
from flows.settings import Settings
from models import Customer, Engagement, ExperimentLook, Send, SendStatus
from tests.support.builders import NOW, Store, ago
from tests.support.runs import run
from tests.support.smtp_server import SmtpServer

AB = """\
name: winback-ab
description: A win-back with two subjects, the better one to win.
kind: inactivity
inactive_for: 90d
schedule: {cron: "0 10 * * 1", timezone: Europe/Berlin}
reentry: once
steps:
  - name: first
    wait: 0s
    email: {template: we_miss_you, subject: "Plain"}
    experiment:
      metric: clicks
      pick_winner: {min_per_variant: 100, probability: 0.95}
      variants:
        - {name: a, subject: "Subject A"}
        - {name: b, subject: "Subject B"}
"""


def sends(engine: Engine) -> list[Send]:
    with Session(engine) as session:
        return list(session.execute(select(Send).where(col(Send.trigger) == "winback-ab")
                                    .order_by(col(Send.id))).scalars())


def looks(engine: Engine) -> list[ExperimentLook]:
    with Session(engine) as session:
        return list(session.execute(select(ExperimentLook).order_by(col(ExperimentLook.look))).scalars())


def test_the_better_subject_wins_at_its_checkpoint_and_takes_every_later_mail(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    (Path(settings.triggers_dir) / "winback_ab.yaml").write_text(AB, encoding="utf-8")
    for i in range(260):
        store.customer(f"P{i}", last_seen=ago(days=200))
    first = run(settings, "winback-ab")
    mailed = sends(engine)
    by_variant = {v: [s for s in mailed if s.variant == v] for v in ("a", "b")}
    assert min(len(by_variant["a"]), len(by_variant["b"])) >= 100, {v: len(s) for v, s in by_variant.items()}
    assert first.decisions == {}  # nobody is mature yet: no look
    with Session(engine) as session:
        for variant, share in (("a", 5), ("b", 2)):  # 1 in 20 of a's recipients click, 1 in 2 of b's
            for n, send in enumerate(by_variant[variant]):
                if n % share == 0:
                    session.add(Engagement(send_id=send.id, customer_id=send.customer_id, kind="click", link=0,
                                           at=NOW + timedelta(hours=2)))
        session.commit()

    early = run(settings, "winback-ab", NOW + timedelta(hours=20))  # not a day old yet: still no look
    assert early.decisions == {} and looks(engine) == []

    for i in range(30):  # enter after the winner is named
        store.customer(f"Late{i}", last_seen=NOW - timedelta(days=91))
    later = run(settings, "winback-ab", NOW + timedelta(days=2))
    (look,) = looks(engine)
    assert (look.look, look.checkpoint, look.winner) == (1, 100, "b")
    figures = json.loads(look.figures)
    assert [v["name"] for v in figures["variants"]] == ["a", "b"]
    assert [v["n"] for v in figures["variants"]] == [100, 100]  # each arm's first 100, in send order
    assert figures["variants"][1]["k"] == 50 and figures["variants"][0]["k"] == 20
    assert later.decisions["first"].startswith("b wins")
    late = [s for s in sends(engine) if s.id not in {m.id for m in mailed}]
    assert len(late) == 30 and {s.variant for s in late} == {"b"}
    assert all(s.status == SendStatus.SENT for s in late)

    again = run(settings, "winback-ab", NOW + timedelta(days=3))
    assert again.decisions == {"first": "b won at look 1 (2026-03-18): " + look.reason} and len(looks(engine)) == 1

    # Support sees the arm a customer got, and the decision, in `lifecycle customer`.
    with Session(engine) as session:
        early_bird = session.get(Customer, by_variant["a"][0].customer_id)
    assert early_bird is not None
    story = timeline(engine, early_bird.external_id, now=NOW + timedelta(days=3))
    assert story is not None
    (mail,) = story.of_kind("mail")
    assert "winback-ab step first" in mail.what and "variant a" in mail.what
    assert "b won the experiment on 2026-03-18 (look 1)" in mail.what
    assert (mail.detail["step"], mail.detail["variant"]) == ("first", "a")
    before = timeline(engine, early_bird.external_id, now=NOW + timedelta(days=1))
    assert before is not None and "won the experiment" not in before.of_kind("mail")[0].what

    # The report: each arm's figures and the decision, as a table and as JSON.
    from typer.testing import CliRunner

    from flows.surfaces.cli import app

    period = ["--since", "2026-03-15", "--until", "2026-03-20", "--now", "2026-03-19T12:00:00Z"]
    shown = CliRunner().invoke(app, ["report", *period, "--no-attribute"])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert "Experiment: winback-ab, step first" in text and "b won: b has P(best)" in text
    data = json.loads(CliRunner().invoke(app, ["report", *period, "--no-attribute", "--format", "json"]).stdout)
    (experiment,) = data["experiments"]
    assert (experiment["step"], experiment["winner"]) == ("first", "b")
    arms = {arm["variant"]: arm for arm in experiment["arms"]}
    assert set(arms) == {"a", "b"} and arms["b"]["recipients"] == len(by_variant["b"]) + 30
    assert arms["b"]["clicks"] == (len(by_variant["b"]) + 1) // 2 and arms["b"]["click_p_best"] > 0.99
    # The report's rows per variant are the arms too.
    from flows.analysis.report import build_report
    from flows.spec.policy import Policy

    report = build_report(engine, since=NOW - timedelta(days=1), until=NOW + timedelta(days=4), policy=Policy(),
                          now=NOW + timedelta(days=3))
    variants = {row.value: row for row in report.rows_of("variant") if row.trigger == "winback-ab"}
    assert set(variants) == {"a", "b"}
    assert variants["a"].delivered == len(by_variant["a"]) and variants["b"].delivered == len(by_variant["b"]) + 30
    assert variants["b"].unique_clicks == (len(by_variant["b"]) + 1) // 2


def test_the_report_gives_each_arm_its_rates_intervals_and_p_best_and_the_held_out_their_own(
        settings: Settings, store: Store, engine: Engine, smtp: SmtpServer) -> None:
    from flows.analysis.experiment_looks import results

    text = AB.replace("reentry: once\n", "reentry: once\nholdout: 20%\n")
    (Path(settings.triggers_dir) / "winback_ab.yaml").write_text(text, encoding="utf-8")
    people = [store.customer(f"P{i}", last_seen=ago(days=200)) for i in range(120)]
    run(settings, "winback-ab")
    mailed = sends(engine)
    with Session(engine) as session:
        for n, send in enumerate(s for s in mailed if s.variant == "b"):
            if n % 2 == 0:
                session.add(Engagement(send_id=send.id, customer_id=send.customer_id, kind="click", link=0,
                                       at=NOW + timedelta(hours=1)))
        session.commit()
    held = [s for s in mailed if s.status == SendStatus.HELD_OUT]
    store.order(next(p for p in people if p.id == held[0].customer_id), NOW + timedelta(days=1))

    (found,) = results(engine, since=NOW - timedelta(days=1), until=NOW + timedelta(days=1),
                       now=NOW + timedelta(days=2), window=timedelta(days=5))
    arms = {arm.variant: arm for arm in found.arms}
    assert set(arms) == {"a", "b", ""}
    counted = {v: sum(1 for s in mailed if s.variant == v and s.status != SendStatus.HELD_OUT) for v in "ab"}
    assert (arms["a"].recipients, arms["b"].recipients, arms[""].recipients) == (counted["a"], counted["b"],
                                                                                 len(held))
    assert arms["a"].clicks == 0 and arms["b"].clicks == (counted["b"] + 1) // 2
    assert arms[""].clicks == 0 and arms[""].conversions == 1 and arms[""].click_p_best is None
    assert arms["b"].click_p_best is not None and arms["b"].click_p_best > 0.99
    low, high = arms["b"].click_interval
    assert low < arms["b"].click_rate < high
    assert found.decision is None and found.winner is None
    assert found.to_json()["arms"][-1]["variant"] == "held_out"
