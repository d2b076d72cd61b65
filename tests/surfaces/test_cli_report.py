"""``lifecycle report``, ``customer``, ``attribute``, ``stages`` and ``forget`` as a marketer,
support and the data protection officer use them."""

import csv
import io
import json
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from flows.settings import Settings
from flows.surfaces.cli import app
from tests.support.builders import NOW, Store, ago
from tests.support.children import lifecycle
from tests.support.outcomes import Outcomes

runner = CliRunner()
AT = ["--now", NOW.isoformat()]
LONG = "spring-clearance-for-those-who-bought-boots-last-autumn-2026"  # 60 of the 64 a name may have


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")


def clicked_and_bought(store: Store, trigger: str = "abandoned-cart", currency: str = "EUR"):
    """A customer who got ``trigger``'s mail four days ago, clicked it, and ordered an hour later
    (no attribution yet)."""
    o = Outcomes(store)
    customer = store.customer("Lea")
    send = o.send(customer, trigger, ago(days=4))
    o.click(send, ago(days=4) + timedelta(hours=2))
    order = o.order(customer, ago(days=4) + timedelta(hours=3), total=59.0, currency=currency)
    return customer, send, order


def test_report_attributes_new_orders_first_and_says_so(settings: Settings, store: Store) -> None:
    clicked_and_bought(store)
    result = runner.invoke(app, ["report", "--format", "json", *AT])
    assert result.exit_code == 0, result.output
    assert "Refreshed attribution as of 2026-03-16T12:00:00+00:00: 1 order(s) looked at, 1 attributed" in result.stderr
    data = json.loads(result.stdout)  # stdout is the JSON alone
    row = next(r for r in data["rows"] if r["trigger"] == "abandoned-cart" and r["dimension"] == "trigger")
    assert (row["delivered"], row["unique_clicks"], row["conversions"], row["revenue"]) == (1, 1, 1, {"EUR": 5900})


def test_report_without_attribution_counts_new_orders_as_pending(settings: Settings, store: Store) -> None:
    clicked_and_bought(store)
    result = runner.invoke(app, ["report", "--no-attribute", *AT])
    assert result.exit_code == 0, result.output
    assert "Attribution not refreshed (--no-attribute)" in result.stdout
    assert "1 order(s) are not attributed yet (run `lifecycle attribute`)" in result.stdout


def test_report_piped_keeps_long_trigger_names_and_headers_whole(settings: Settings, store: Store) -> None:
    clicked_and_bought(store, trigger=LONG)
    done = lifecycle("report", *AT, settings=settings, COLUMNS="40", timeout=120)
    assert done.returncode == 0, done.stderr
    assert LONG in done.stdout  # one piece, on one line
    lines = done.stdout.splitlines()
    header = next(line for line in lines if "delivered" in line and "trigger" in line)
    for column in ("trigger", "delivered", "bounced", "clicked", "click rate", "orders", "conversion", "revenue",
                   "revenue/recipient"):
        assert column in header
    assert "…" not in done.stdout
    row = next(line for line in lines if LONG in line)
    assert "EUR 59.00" in row and "100.0%" in row
    assert any(line.startswith(f"{LONG}: 1 delivered, 1 clicked") for line in lines)  # the summary line, unwrapped


def test_report_csv_parses_with_one_column_per_currency(settings: Settings, store: Store) -> None:
    clicked_and_bought(store)
    clicked_and_bought(store, trigger="winback-lapsed", currency="USD")
    result = runner.invoke(app, ["report", "--format", "csv", *AT])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    by_trigger = {r["trigger"]: r for r in rows if r["dimension"] == "trigger"}
    assert by_trigger["abandoned-cart"]["revenue_cents_EUR"] == "5900"
    assert by_trigger["abandoned-cart"]["revenue_cents_USD"] == "0"
    assert by_trigger["winback-lapsed"]["revenue_cents_USD"] == "5900"
    assert rows[-1]["dimension"] == "unattributed"


def test_report_period_and_trigger_options(settings: Settings, store: Store) -> None:
    clicked_and_bought(store)
    clicked_and_bought(store, trigger="winback-lapsed")
    only = runner.invoke(app, ["report", "--format", "json", "--trigger", "winback-lapsed", *AT])
    assert {r["trigger"] for r in json.loads(only.stdout)["rows"]} == {"winback-lapsed"}
    later = runner.invoke(app, ["report", "--format", "json", "--since", "2026-03-13", "--until",
                                "2026-03-16T12:00:00Z", *AT])
    data = json.loads(later.stdout)
    assert data["rows"] == [] and data["period"]["since"] == "2026-03-13T00:00:00+00:00"
    bad = runner.invoke(app, ["report", "--since", "last week"])
    assert bad.exit_code == 2 and "--since must be a date such as 2026-03-14" in bad.stderr
    backwards = runner.invoke(app, ["report", "--since", "2026-03-16", "--until", "2026-03-01"])
    assert backwards.exit_code == 2


def test_report_with_two_triggers_reports_both_and_only_them(settings: Settings, store: Store) -> None:
    o = Outcomes(store)
    for trigger in ("abandoned-cart", "winback-lapsed", "spring-sale"):
        clicked_and_bought(store, trigger=trigger)
        o.send(store.customer(f"held-{trigger}"), trigger, ago(days=4), "held_out")
    result = runner.invoke(app, ["report", "--format", "json", "--trigger", "winback-lapsed",
                                 "--trigger", "spring-sale", *AT])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {r["trigger"] for r in data["rows"]} == {"winback-lapsed", "spring-sale"}
    assert {h["trigger"] for h in data["holdouts"]} == {"winback-lapsed", "spring-sale"}
    everything = json.loads(runner.invoke(app, ["report", "--format", "json", *AT]).stdout)
    assert {r["trigger"] for r in everything["rows"]} == {"abandoned-cart", "winback-lapsed", "spring-sale"}


def holdout_of_six_against_two(store: Store) -> None:
    o = Outcomes(store)
    for n in range(6):
        person = store.customer(f"T{n}")
        o.send(person, "winback-lapsed", ago(days=20), stage="lapsed")
        if n < 3:
            o.order(person, ago(days=19))
    for n in range(2):
        o.send(store.customer(f"H{n}"), "winback-lapsed", ago(days=20), "held_out", stage="lapsed")


def test_report_effect_sets_the_lift_a_holdout_s_sample_size_is_for(settings: Settings, store: Store) -> None:
    from flows.analysis.lift import sample_size

    holdout_of_six_against_two(store)

    def holdout(*options: str) -> dict:
        result = runner.invoke(app, ["report", "--format", "json", *options, *AT])
        assert result.exit_code == 0, result.output
        [found] = json.loads(result.stdout)["holdouts"]
        return found

    # Both arms: 8 recipients, 3 converted; 6 treated per 2 held out.
    usual, two, half = holdout(), holdout("--effect", "2%"), holdout("--effect", "0.5")
    assert usual["needed_per_arm"] == sample_size(3 / 8, 0.01, 3.0)
    assert two["needed_per_arm"] == sample_size(3 / 8, 0.02, 3.0) < usual["needed_per_arm"]
    assert half["needed_per_arm"] == sample_size(3 / 8, 0.005, 3.0) > usual["needed_per_arm"]
    assert "would detect a lift of 1.0 points" in usual["verdict"]
    assert "would detect a lift of 2.0 points" in two["verdict"]
    assert two["lift_ci"] == usual["lift_ci"]  # the effect changes the sample size only
    for bad in ("0%", "100", "-1%", "two"):
        refused = runner.invoke(app, ["report", "--effect", bad, *AT])
        assert refused.exit_code == 2 and "--effect must be a lift in percentage points" in refused.stderr, bad


def test_report_shows_the_holdout_lift_with_its_interval_and_verdict(settings: Settings, store: Store) -> None:
    holdout_of_six_against_two(store)
    result = runner.invoke(app, ["report", *AT])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any("Holdout lift" in line for line in lines)
    row = next(line for line in lines if line.startswith("│ winback-lapsed") and " to " in line and "pp" in line)
    assert "not yet conclusive" in row  # six against two: the interval spans zero


def test_customer_shows_a_click_and_an_attributed_order(settings: Settings, store: Store) -> None:
    customer, send, order = clicked_and_bought(store)
    assert runner.invoke(app, ["attribute", *AT]).exit_code == 0
    result = runner.invoke(app, ["customer", customer.external_id, *AT])
    assert result.exit_code == 0, result.output
    assert "sent abandoned-cart" in result.stdout
    assert "clicked https://shop.example/cart in abandoned-cart, by a person" in result.stdout
    assert f"ordered {order.external_id} (EUR 59.00): attributed to abandoned-cart (send {send.id}), by its click" \
        in result.stdout
    data = json.loads(runner.invoke(app, ["customer", customer.email, "--format", "json", *AT]).stdout)
    assert data["customer"]["external_id"] == customer.external_id
    assert [e["kind"] for e in data["entries"]] == ["mail", "click", "order"]
    unknown = runner.invoke(app, ["customer", "nobody"])
    assert unknown.exit_code == 1 and "No customer is known as 'nobody'" in unknown.stderr


def test_customer_says_why_a_trigger_due_for_them_would_not_mail_them_now(settings: Settings, store: Store) -> None:
    """A skip leaves no ledger row: the timeline asks each trigger what it would decide now."""
    quiet = store.customer("Quinn", consent=False)
    store.cart(quiet, ago(hours=3))  # abandoned-cart's audience
    result = runner.invoke(app, ["customer", quiet.external_id, *AT])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "If the triggers ran now (2026-03-16 12:00 UTC)" in text
    assert "abandoned-cart │ reminder │ skipped:no_consent" in text
    data = json.loads(runner.invoke(app, ["customer", quiet.external_id, "--format", "json", *AT]).stdout)
    decided = {(d["trigger"], d["step"]): d["outcome"] for d in data["now"]}
    assert decided[("abandoned-cart", "reminder")] == "skipped:no_consent"
    assert ("abandoned-cart", "nudge") not in decided  # not due: nothing to say
    with_consent = store.customer("Wendy")
    store.cart(with_consent, ago(hours=3))
    data = json.loads(runner.invoke(app, ["customer", with_consent.external_id, "--format", "json", *AT]).stdout)
    assert {(d["trigger"], d["step"]): d["outcome"] for d in data["now"]}[("abandoned-cart", "reminder")] == \
        "would_send"
    assert [e["kind"] for e in data["entries"]] == []  # and nothing was written


def test_attribute_prints_the_tally_and_a_rebuild_gives_the_same(settings: Settings, store: Store) -> None:
    clicked_and_bought(store)
    Outcomes(store).order(store.customer("Ohne"), ago(days=1))  # no mail: unattributed
    first = runner.invoke(app, ["attribute", *AT])
    assert first.exit_code == 0, first.output
    assert "2 order(s) looked at, 1 attributed to a mail (click 1), 1 unattributed." in first.stdout
    again = runner.invoke(app, ["attribute", *AT])
    assert "0 order(s) looked at" in again.stdout  # incremental: nothing new
    rebuilt = runner.invoke(app, ["attribute", "--rebuild", *AT])
    assert "Rebuilt attribution" in rebuilt.stdout and "2 order(s) looked at, 1 attributed" in rebuilt.stdout


def test_stages_prints_the_distribution_and_the_transition_matrix(settings: Settings, store: Store) -> None:
    newcomer = store.customer("Neu")
    store.order(newcomer, ago(days=3))  # a prospect until three days ago, new since
    store.customer("Nie")  # never orders: a prospect throughout
    result = runner.invoke(app, ["stages", "--since", "2026-03-01", "--until", "2026-03-16", *AT])
    assert result.exit_code == 0, result.output
    assert "Customers per stage at each week's end" in result.stdout
    assert "2026-03-01" in result.stdout and "2026-03-08" in result.stdout
    data = json.loads(runner.invoke(app, ["stages", "--since", "2026-03-01", "--until", "2026-03-16",
                                          "--format", "json", *AT]).stdout)
    assert data["transitions"]["prospect"]["new"] == 1 and data["transitions"]["prospect"]["prospect"] == 1
    assert [d["counts"]["prospect"] for d in data["distribution"]] == [2, 2, 1]  # at the ends of 1, 8 and 15 March
    assert next(k for k in data["kpis"] if k["stage"] == "prospect")["conversion_rate"] == 0.5


def test_forget_asks_first_erases_once_and_says_what_it_did(settings: Settings, store: Store) -> None:
    customer, _, _ = clicked_and_bought(store)
    declined = runner.invoke(app, ["forget", customer.external_id], input="n\n")
    assert declined.exit_code == 1 and "Nothing erased." in declined.stderr
    done = runner.invoke(app, ["forget", customer.external_id], input="y\n")
    assert done.exit_code == 0, done.output
    assert f"Forgot '{customer.external_id}'" in done.stdout and "engagements" in done.stdout
    again = runner.invoke(app, ["forget", customer.external_id, "--yes"])
    assert again.exit_code == 0 and "was forgotten before: nothing changed" in again.stdout
    gone = runner.invoke(app, ["customer", customer.external_id])
    assert gone.exit_code == 1 and "was forgotten on" in gone.stderr
