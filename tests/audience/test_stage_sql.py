"""Stages are evaluated in SQL at the evaluation time, on SQLite and PostgreSQL alike."""


from sqlmodel import Session

from flows.audience.stage_sql import customer_stages
from flows.spec.project import load_project
from tests.support import ROOT
from tests.support.builders import NOW, Store, ago


def stages_at(store: Store, moment=NOW) -> dict[int, str]:
    rules = load_project(ROOT / "triggers", ROOT / "templates").stages
    with Session(store.engine) as session:
        return {row.id: row.stage for row in session.execute(customer_stages(rules, moment))}


def test_default_stages_follow_the_customer_lifecycle(store: Store) -> None:
    prospect = store.customer("Pia")
    new = store.customer("Nina")
    store.order(new, ago(days=10))
    active = store.customer("Ali")
    store.order(active, ago(days=200))
    store.order(active, ago(days=30))
    loyal = store.customer("Lou")
    for days in (20, 40, 60, 80, 100):
        store.order(loyal, ago(days=days))
    big_spender = store.customer("Ben")
    store.order(big_spender, ago(days=90), total=800)
    at_risk = store.customer("Rita")
    store.order(at_risk, ago(days=150))
    lapsed = store.customer("Lars")
    store.order(lapsed, ago(days=400), total=900)  # high value long ago: still lapsed (rule order)

    stages = stages_at(store)
    assert stages[prospect.id] == "prospect"
    assert stages[new.id] == "new"
    assert stages[active.id] == "active"
    assert stages[loyal.id] == "loyal"
    assert stages[big_spender.id] == "loyal"
    assert stages[at_risk.id] == "at_risk"
    assert stages[lapsed.id] == "lapsed"


def test_orders_after_the_evaluation_time_do_not_count(store: Store) -> None:
    customer = store.customer("Zoë")
    store.order(customer, ago(days=1))
    assert stages_at(store, ago(days=2))[customer.id] == "prospect"
    assert stages_at(store)[customer.id] == "new"
